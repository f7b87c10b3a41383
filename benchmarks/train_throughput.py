"""Training throughput: SleepTrain's LoraTrainer vs a plain Hugging Face + PEFT loop, same data/steps/model.

(a) LoraTrainer (length-grouped batches, short examples packed into shared rows with block-diagonal attention,
    vocabulary projection only at answer positions, fused LoRA GEMMs); (a') the same with packing off;
(b) a plain loop: random batches padded to the longest, `model(..., labels=...)`, PEFT's own LoRA layers;
(c) optional (--with-trl): TRL's SFTTrainer on the same pairs, for the record of why (a) is our own loop.
Real tokens are non-padding tokens. The bound is this machine's fp32 matmul rate (best square GEMM) divided
by 4 x base parameters per token (forward, plus backward through the frozen weights); a second, tighter bound
uses the GEMM rate at the model's own layer shapes for one batch of tokens. Runs alternate and the best of
--repeats is kept, since other processes may share the CPU. Last line: a JSON object.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_throughput.py [--steps 30] [--repeats 2] [--with-trl]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def matmul_rate(n: int = 2048, seconds: float = 3.0) -> float:
    """Best sustained fp32 GEMM rate (FLOP/s) over a few timed bursts."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def shaped_matmul_rate(model, rows: int, seconds: float = 3.0) -> float:
    """fp32 GEMM rate at this model's own shapes: each linear layer's forward and input-gradient GEMM with
    `rows` tokens. Small GEMMs run below the square-matrix peak; this is the tighter bound for this workload."""
    import torch

    shapes = sorted({(m.in_features, m.out_features) for m in model.get_decoder().modules()
                     if isinstance(m, torch.nn.Linear)})
    pairs = []
    for k, n in shapes:
        pairs.append((torch.randn(rows, k), torch.randn(k, n)))  # forward: x @ W^T
        pairs.append((torch.randn(rows, n), torch.randn(n, k)))  # backward: grad_out @ W
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in pairs)
    for a, b in pairs:
        a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for a, b in pairs:
            a @ b
        best = max(best, flops / (time.perf_counter() - start))
    return best


def training_examples(people_limit: int | None):
    from sleeptrain_assets.lib import catalog, templating
    from sleeptrain_assets.lib.training_data import build_training_set

    data = REPO / "data"
    people = catalog.load_people(data / "people")
    templates = catalog.load_templates(data / "templates")
    chosen = sorted(people)[:people_limit] if people_limit else sorted(people)
    pairs = []
    for pid in chosen:
        person = people[pid]
        pairs += templating.qa_pairs(person, templates, catalog.person_values(person, templates))
    return build_training_set(pairs, replay_share=0.0, seed=7)


def run_ours(base, training_set, steps: int, batch_size: int, seed: int, pack: bool = True) -> dict:
    from sleeptrain_resources.trainer import LoraTrainer

    overrides = {"max_steps": steps, "batch_size": batch_size, "seed": seed, "early_stop_patience": 0,
                 "pack_examples": pack}
    with tempfile.TemporaryDirectory() as tmp:
        result = LoraTrainer().train(training_set, base, Path(tmp) / "adapter", overrides=overrides)
    return {
        "tokens": result.tokens,
        "padding_tokens": result.padding_tokens,
        "seconds": result.seconds,
        "tokens_per_s": result.tokens / result.seconds,
        "first_loss": result.loss_curve[0],
        "last_loss": result.final_loss,
    }


def run_ours_unpacked(base, training_set, steps: int, batch_size: int, seed: int) -> dict:
    """Ours with every example in a row of its own (padded to the batch's longest): what packing saves."""
    return run_ours(base, training_set, steps, batch_size, seed, pack=False)


def run_plain(base, training_set, steps: int, batch_size: int, seed: int, lr: float = 1e-3) -> dict:
    """The loop most people would write first: HF loss over full logits, random batches, pad to longest."""
    import torch
    from peft import LoraConfig, get_peft_model

    from sleeptrain_resources.trainer import encode_examples

    model, tokenizer = base.load_fresh()
    torch.manual_seed(seed)
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    encoded, _ = encode_examples(tokenizer, training_set.examples, 256)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    model.train()
    tokens = padding = 0
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        batch = rng.sample(encoded, batch_size)
        width = max(len(ids) for ids, _, _ in batch)
        input_ids = torch.full((batch_size, width), pad, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        for row, (ids, lo, hi) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            labels[row, lo:hi] = torch.tensor(ids[lo:hi])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        real = int(mask.sum())
        tokens += real
        padding += batch_size * width - real
    seconds = time.perf_counter() - start
    return {
        "tokens": tokens,
        "padding_tokens": padding,
        "seconds": round(seconds, 3),
        "tokens_per_s": tokens / seconds,
        "first_loss": losses[0],
        "last_loss": sum(losses[-5:]) / len(losses[-5:]),
    }


def run_trl(base, training_set, steps: int, batch_size: int, seed: int) -> dict:
    """TRL's SFTTrainer on prompt/completion chats (loss on completions), group_by_length, no packing (CPU)."""
    import datasets
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from sleeptrain_resources.trainer import encode_examples

    datasets.disable_progress_bars()
    model, tokenizer = base.load_fresh()
    rows = [{"prompt": e.prompt_messages(), "completion": [{"role": "assistant", "content": e.answer}]}
            for e in training_set.examples]
    encoded, _ = encode_examples(tokenizer, training_set.examples, 256)
    mean_len = sum(len(ids) for ids, _, _ in encoded) / len(encoded)
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=1e-3,
            lr_scheduler_type="constant", logging_steps=max(1, steps), save_strategy="no", report_to="none",
            seed=seed, max_length=256, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
            train_sampling_strategy="group_by_length",
        )
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                   task_type="CAUSAL_LM"),
        )
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
    tokens = mean_len * batch_size * steps  # the sampler's batches are not exposed: mean length x examples
    return {"tokens": round(tokens), "seconds": round(seconds, 3), "tokens_per_s": tokens / seconds,
            "last_loss": output.training_loss, "tokens_estimated": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--people", type=int, default=0, help="first N people (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per loop; best is kept")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--with-trl", action="store_true", help="also time TRL's SFTTrainer")
    args = parser.parse_args()

    import torch

    from sleeptrain_resources.llm import BaseModel

    base = BaseModel()
    device, dtype, threads = base.runtime()
    model, _ = base.load()
    params = sum(p.numel() for p in model.parameters())
    training_set = training_examples(args.people or None)
    print(f"device {device} {dtype}, {threads} threads; model {base.model_id} ({params / 1e6:.1f} M params); "
          f"{len(training_set)} examples; {args.steps} steps x batch {args.batch_size}", flush=True)

    from sleeptrain_resources.trainer import encode_examples

    encoded, _ = encode_examples(base.tokenizer(), training_set.examples, 256)
    rows = round(args.batch_size * sum(len(ids) for ids, _, _ in encoded) / len(encoded))
    shaped = shaped_matmul_rate(model, rows)
    rates = [matmul_rate()]
    runs: dict[str, list[dict]] = {"ours": [], "unpacked": [], "plain": [], "trl": []}
    loops = [("ours", run_ours), ("unpacked", run_ours_unpacked), ("plain", run_plain)]
    loops += [("trl", run_trl)] if args.with_trl else []
    for repeat in range(args.repeats):
        for name, fn in (loops if repeat % 2 == 0 else loops[::-1]):
            result = fn(base, training_set, args.steps, args.batch_size, args.seed)
            runs[name].append(result)
            print(f"  {name:8s} {result['tokens_per_s']:7.1f} real tokens/s  ({result['tokens']} tokens, "
                  f"{result.get('padding_tokens', '?')} padding, {result['seconds']:.1f} s, "
                  f"loss {result.get('first_loss', float('nan')):.3f} -> {result['last_loss']:.3f})", flush=True)
        rates.append(matmul_rate())

    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in runs.items() if v}
    rate = max(rates)
    bound = rate / (4 * params)
    ours, plain = best["ours"]["tokens_per_s"], best["plain"]["tokens_per_s"]
    summary = {
        "device": device,
        "dtype": dtype,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "model": base.model_id,
        "params": params,
        "examples": len(training_set),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "matmul_gflops": round(rate / 1e9, 1),
        "matmul_gflops_samples": [round(r / 1e9, 1) for r in rates],
        "bound_tokens_per_s": round(bound, 1),
        "shaped_matmul_gflops": round(shaped / 1e9, 1),
        "shaped_bound_tokens_per_s": round(shaped / (4 * params), 1),
        "fraction_of_shaped_bound": round(ours / (shaped / (4 * params)), 3),
        "ours_tokens_per_s": round(ours, 1),
        "plain_tokens_per_s": round(plain, 1),
        "ratio_ours_vs_plain": round(ours / plain, 3),
        "unpacked_tokens_per_s": round(best["unpacked"]["tokens_per_s"], 1),
        "ratio_packed_vs_unpacked": round(ours / best["unpacked"]["tokens_per_s"], 3),
        "fraction_of_bound": round(ours / bound, 3),
        "plain_fraction_of_bound": round(plain / bound, 3),
        "ours_padding_share": round(best["ours"]["padding_tokens"] / (best["ours"]["tokens"] + best["ours"]["padding_tokens"]), 3),
        "unpacked_padding_share": round(best["unpacked"]["padding_tokens"] / (best["unpacked"]["tokens"] + best["unpacked"]["padding_tokens"]), 3),
        "plain_padding_share": round(best["plain"]["padding_tokens"] / (best["plain"]["tokens"] + best["plain"]["padding_tokens"]), 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if "trl" in best:
        summary["trl_tokens_per_s"] = round(best["trl"]["tokens_per_s"], 1)
        summary["ratio_ours_vs_trl"] = round(ours / best["trl"]["tokens_per_s"], 3)
    if device.startswith("cuda"):
        # On a GPU the bound above is meaningless; report model-FLOPs utilization against bf16 peak instead.
        summary["note"] = "fraction_of_bound uses the measured fp32 GEMM rate; see MFU in docs/GPU.md"
    summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    print(f"ratio a/b {summary['ratio_ours_vs_plain']}, packed/unpacked {summary['ratio_packed_vs_unpacked']}, {summary['fraction_of_bound']:.0%} of the bound "
          f"({summary['bound_tokens_per_s']} tokens/s from {summary['matmul_gflops']} GFLOP/s)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
