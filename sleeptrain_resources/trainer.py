"""LoRA training of the base model on a TrainingSet, with guards, early stopping and an atomic adapter write.

Our own loop rather than TRL's SFTTrainer, decided by measurement (benchmarks/train_throughput.py; 2-core
Xeon, fp32, SmolLM2-135M, 1128 QA pairs, 30 steps x batch 8, real tokens/s): this loop 394, a plain HF + PEFT
loop 289, SFTTrainer 267. On CPU SFTTrainer can only pad (its padding-free packing needs flash-attention),
projects every position onto the 49k-word vocabulary and adds per-step Trainer overhead. This loop groups
batches by length, packs a batch's short examples into shared rows with a block-diagonal causal mask (padding
7.6% instead of 18.5% unpacked on the demo set: 1.14x), projects onto the vocabulary only at the answer
positions the loss is taken on, fuses each LoRA branch into one extra GEMM, and tokenizes and pads every batch
once for the whole run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

import dagster as dg
from pydantic import Field

from sleeptrain_assets.lib.training_data import NEW, TrainingExample, TrainingSet, data_hash
from sleeptrain_resources.llm import BaseModel, encode_supervised, file_sha256
from sleeptrain_resources.staging import clean_stale_temp_adapters, owner_tag

ALL_LINEAR = "all-linear"
MANIFEST = "manifest.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
WORKER_MODULE = "sleeptrain_resources.training_worker"
Launcher = Literal["in_process", "pipes_subprocess"]
LAUNCHERS: tuple[str, ...] = get_args(Launcher)
_CODE_FILES = (
    Path(__file__),
    Path(__file__).with_name("llm.py"),
    Path(__file__).resolve().parents[1] / "sleeptrain_assets" / "lib" / "training_data.py",
)


class TrainingFailed(RuntimeError):
    """The run was stopped by a guard; no adapter was written."""


@dataclass(frozen=True)
class Hyperparams:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str = ALL_LINEAR
    learning_rate: float = 1e-3
    max_steps: int = 160
    batch_size: int = 8
    max_seq_len: int = 256
    seed: int = 7
    warmup_steps: int = 8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    divergence_factor: float = 3.0
    early_stop_patience: int = 5
    early_stop_min_delta: float = 0.02
    probe_every: int = 20
    probe_size: int = 24
    length_window: int = 8
    # Short examples of a batch share rows (block-diagonal attention, positions restarting per example) instead
    # of each padding to the longest: the same loss with less padding computed.
    pack_examples: bool = True
    # Locality term: KL(base || adapter) over the base model's top-k next tokens at each supervised position of
    # the general replay examples (see `top_k_kl`), times this weight; 0 switches it off.
    locality_kl_weight: float = 0.0
    # Whether general replay answers are also trained with cross-entropy on the base model's greedy text.
    locality_sft: bool = True

    def validate(self) -> Hyperparams:
        positive = ("rank", "alpha", "max_steps", "batch_size", "max_seq_len", "probe_every", "length_window")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"trainer.dropout must be in [0, 1), got {self.dropout}")
        if not self.learning_rate > 0 or not self.max_grad_norm > 0 or not self.divergence_factor > 1:
            raise ValueError("trainer.learning_rate and max_grad_norm must be > 0, divergence_factor > 1")
        if not self.locality_kl_weight >= 0:
            raise ValueError(f"trainer.locality_kl_weight must be >= 0, got {self.locality_kl_weight}")
        if not self.locality_sft and self.locality_kl_weight == 0:
            raise ValueError("trainer.locality_sft=False needs locality_kl_weight > 0: general replay would train nothing")
        return self

    def targets(self) -> str | list[str]:
        if self.target_modules.strip() == ALL_LINEAR:
            return ALL_LINEAR
        names = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        if not names:
            raise ValueError("trainer.target_modules is empty; use 'all-linear' or comma-separated names")
        return names


@dataclass(frozen=True)
class StepInfo:
    """What a step callback sees; `model` is the live PEFT model (for progress hooks and fault injection)."""

    step: int
    loss: float
    grad_norm: float
    learning_rate: float
    model: Any = field(repr=False, default=None)


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    adapter_sha256: str
    steps: int
    stopped: str  # max_steps | plateau (then the weights are those of the best held-in probe)
    weights_from_step: int  # the step whose weights were saved: `steps`, or the best probe's after a plateau
    loss_curve: list[float]
    probe_curve: list[tuple[int, float]]
    tokens: int  # real (non-padding) tokens through forward and backward
    answer_tokens: int  # tokens the loss was taken on
    padding_tokens: int
    seconds: float
    tokens_per_s: float
    trainable_params: int
    total_params: int
    examples: int
    dropped_too_long: int
    hyperparameters: dict[str, Any]
    manifest: dict[str, Any]
    trained_on: dict[str, Any] = field(default_factory=dict)  # launcher, host, pid, device, threads, torch

    @property
    def initial_loss(self) -> float:
        return self.loss_curve[0]

    @property
    def final_loss(self) -> float:
        tail = self.loss_curve[-5:]
        return sum(tail) / len(tail)


@dataclass
class _Batch:
    input_ids: Any
    attention_mask: Any  # None when no row is padded; a 4-D block-diagonal causal mask when rows are packed
    rows: Any
    positions: Any  # hidden-state positions whose next token is supervised
    targets: Any
    real_tokens: int
    padding: int
    # Locality term: which supervised positions have a teacher, its top-k ids and log-probs, and which positions
    # take cross-entropy (None: all of them).
    kl_index: Any = None
    teacher_ids: Any = None
    teacher_logprobs: Any = None
    ce_index: Any = None
    position_ids: Any = None  # packed rows only: each example's positions start again at 0
    # Per supervised position: its example's loss weight (None: every example weighs 1).
    token_weights: Any = None


def code_version() -> str:
    digest = hashlib.sha256()
    for path in _CODE_FILES:
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def encode_examples(
    tokenizer: Any, examples: Sequence[TrainingExample], max_seq_len: int
) -> tuple[list[tuple[list[int], int, int]], list[int]]:
    """(ids, label_start, label_end) per kept example and the indices dropped for length.

    Labels cover the answer and the end-of-turn token after it, so the model also learns where to stop.
    """
    encoded: list[tuple[list[int], int, int]] = []
    dropped: list[int] = []
    for i, ex in enumerate(examples):
        ids, start, end = encode_supervised(tokenizer, ex.prompt_messages(), ex.answer)
        if len(ids) > max_seq_len or end <= start:
            dropped.append(i)
            continue
        encoded.append((ids, start, end))
    return encoded, dropped


def plan_batches(lengths: Sequence[int], batch_size: int, window: int, seed: int) -> list[list[int]]:
    """Batches of example indices: length-sorted within windows of `window` batches of the given order.

    The input order is already interleaved across people, so each window still mixes people while sorting
    inside it removes most padding; batch order is then shuffled by the seed.
    """
    span = batch_size * window
    batches: list[list[int]] = []
    for lo in range(0, len(lengths), span):
        chunk = sorted(range(lo, min(lo + span, len(lengths))), key=lambda i: (lengths[i], i))
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    random.Random(f"batches:{seed}").shuffle(batches)
    return batches


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: the given example indices grouped into rows of at most `width` tokens.

    Each row keeps its examples in the order given, so a batch's supervised positions keep their order.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(width - lengths[i])
    return [sorted(row) for row in rows]


def _collate(
    encoded: Sequence[tuple[list[int], int, int]],
    idx: Sequence[int],
    pad_id: int,
    device: str,
    teachers: Sequence[Any] | None = None,
    sft_on_teacher: bool = True,
    pack: bool = False,
    weights: Sequence[float] | None = None,
) -> _Batch:
    """One batch of the examples `idx`; with `teachers` (per encoded example, None where there is none) the
    locality targets; with `weights` (per encoded example) each example's cross-entropy weight.

    Unpacked, each example is a row padded to the longest. Packed, short examples share a row as wide as the
    longest example, each with its own positions and a block-diagonal causal mask, so no token attends across
    examples and the loss is the unpacked one up to float rounding, with less padding to compute.
    """
    import torch

    width = max(len(encoded[i][0]) for i in idx)
    layout = pack_rows([len(encoded[i][0]) for i in idx], width) if pack else [[j] for j in range(len(idx))]
    packed = len(layout) < len(idx)
    ids = torch.full((len(layout), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(layout), width), dtype=torch.long)
    # Packed rows: which example each token belongs to (padding: -1) and its position inside that example.
    segment = torch.full((len(layout), width), -1, dtype=torch.long)
    position_ids = torch.zeros((len(layout), width), dtype=torch.long)
    place: dict[int, tuple[int, int]] = {}  # batch slot -> (row, offset)
    for row, slots in enumerate(layout):
        offset = 0
        for j in slots:
            seq = encoded[idx[j]][0]
            ids[row, offset : offset + len(seq)] = torch.tensor(seq)
            mask[row, offset : offset + len(seq)] = 1
            segment[row, offset : offset + len(seq)] = j
            position_ids[row, offset : offset + len(seq)] = torch.arange(len(seq))
            place[j] = (row, offset)
            offset += len(seq)
    rows: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    token_weights: list[float] = []
    real = 0
    for j, i in enumerate(idx):
        seq, start, end = encoded[i]
        row, offset = place[j]
        real += len(seq)
        rows += [row] * (end - start)
        if weights is not None:
            token_weights += [float(weights[i])] * (end - start)
        positions += range(offset + start - 1, offset + end - 1)
        targets += seq[start:end]
    width_total = len(layout) * width
    if packed:
        # Attend to earlier tokens of the same example; a padding token only to itself (a row of nothing but
        # masked keys would turn the softmax into NaN).
        same = segment[:, :, None] == segment[:, None, :]
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        own = torch.eye(width, dtype=torch.bool) & (segment < 0)[:, :, None]
        attention = (((same & (segment >= 0)[:, :, None]) | own) & causal)[:, None]
    else:
        attention = mask if real < width_total else None
    batch = _Batch(
        input_ids=ids.to(device),
        attention_mask=attention.to(device) if attention is not None else None,
        rows=torch.tensor(rows, device=device),
        positions=torch.tensor(positions, device=device),
        targets=torch.tensor(targets, device=device),
        real_tokens=real,
        padding=width_total - real,
        position_ids=position_ids.to(device) if packed else None,
        token_weights=(torch.tensor(token_weights, dtype=torch.float32, device=device)
                       if weights is not None and any(w != 1.0 for w in token_weights) else None),
    )
    if teachers is None or all(teachers[i] is None for i in idx):
        return batch
    kl_index: list[int] = []
    ce_index: list[int] = []
    teacher_ids: list[tuple[int, ...]] = []
    teacher_logprobs: list[tuple[float, ...]] = []
    offset = 0
    for i in idx:
        _, start, end = encoded[i]
        span = range(offset, offset + end - start)
        teacher = teachers[i]
        if teacher is None:
            ce_index += span
        else:
            if len(teacher) != end - start:
                raise ValueError(
                    f"replay teacher has {len(teacher)} positions but the answer has {end - start} supervised "
                    "tokens: the replay targets were computed with another tokenizer or chat template"
                )
            kl_index += span
            if sft_on_teacher:
                ce_index += span
            teacher_ids += [ids_ for ids_, _ in teacher]
            teacher_logprobs += [lp for _, lp in teacher]
        offset += end - start
    batch.kl_index = torch.tensor(kl_index, device=device)
    batch.teacher_ids = torch.tensor(teacher_ids, dtype=torch.long, device=device)
    batch.teacher_logprobs = torch.tensor(teacher_logprobs, dtype=torch.float32, device=device)
    batch.ce_index = None if len(ce_index) == offset else torch.tensor(ce_index, dtype=torch.long, device=device)
    return batch


def fuse_lora_forward(peft_model: Any) -> int:
    """Give each plain LoRA linear of a training model a two-GEMM forward; returns how many were fused.

    PEFT computes base(x) + B(A(x)) * scaling as four ops plus per-call Python checks; for 210 small layers
    on a CPU those extra elementwise passes and dispatches cost more than the adapter's matmuls.
    ``addmm`` folds the scaling and the sum into the second GEMM. Same math, same parameters, same saved
    file; only this run's throwaway model is touched, and layers with dropout or LoRA variants keep PEFT's path.
    """
    import types

    import torch
    import torch.nn.functional as F
    from peft.tuners.lora.layer import Linear as LoraLinear

    def forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        name = self.active_adapters[0]
        weight_a = self.lora_A[name].weight
        out = F.linear(x, self.base_layer.weight, self.base_layer.bias)
        shape = out.shape
        low = F.linear(x, weight_a).reshape(-1, weight_a.shape[0])
        fused = torch.addmm(out.reshape(-1, shape[-1]), low, self.lora_B[name].weight.t(), alpha=self.scaling[name])
        return fused.view(shape)

    count = 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLinear) or module.merged or len(module.active_adapters) != 1:
            continue
        name = module.active_adapters[0]
        if name in module.lora_variant or not isinstance(module.lora_dropout[name], torch.nn.Identity):
            continue
        if not isinstance(module.base_layer, torch.nn.Linear):
            continue
        if module.lora_A[name].weight.dtype != module.base_layer.weight.dtype:
            continue  # mixed precision (bf16 base, fp32 adapter) needs PEFT's casts
        module.forward = types.MethodType(forward, module)
        count += 1
    return count


def answer_logits(causal_lm: Any, batch: _Batch) -> Any:
    """Logits at the supervised positions only (projecting every position onto the vocabulary costs more)."""
    hidden = causal_lm.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    return causal_lm.get_output_embeddings()(hidden[batch.rows, batch.positions]).float()


def answer_loss(causal_lm: Any, batch: _Batch) -> Any:
    """Mean cross-entropy over answer tokens, each weighted by its example's weight."""
    return weighted_cross_entropy(answer_logits(causal_lm, batch), batch.targets, batch.token_weights)


def weighted_cross_entropy(logits: Any, targets: Any, weights: Any = None) -> Any:
    """Mean over positions of weight x cross-entropy: reward-weighted regression when weights are rewards (a
    position of weight 0 adds nothing; with every weight 1 it is the plain mean)."""
    import torch.nn.functional as F

    if weights is None:
        return F.cross_entropy(logits, targets)
    return (F.cross_entropy(logits, targets, reduction="none") * weights).mean()


def top_k_kl(logits: Any, teacher_ids: Any, teacher_logprobs: Any) -> Any:
    """Mean KL(base || adapter) per position over the teacher's top-k tokens plus one bin for all other tokens.

    Coarsening the vocabulary to k + 1 bins keeps it a true KL divergence (zero only when the adapter gives
    every top-k token and the rest the base model's probability) while storing k numbers per position.
    """
    import torch

    student = torch.log_softmax(logits.float(), dim=-1).gather(-1, teacher_ids)
    teacher = teacher_logprobs.exp()
    eps = 1e-6
    teacher_rest = (1.0 - teacher.sum(-1)).clamp_min(eps)
    student_rest = (1.0 - student.exp().sum(-1)).clamp_min(eps)
    per_position = (teacher * (teacher_logprobs - student)).sum(-1) + teacher_rest * (
        teacher_rest.log() - student_rest.log()
    )
    return per_position.mean()


def training_loss(causal_lm: Any, batch: _Batch, kl_weight: float) -> tuple[Any, float | None]:
    """(loss, locality KL or None): cross-entropy on answer tokens plus `kl_weight` x the locality KL."""
    if batch.kl_index is None or kl_weight <= 0:
        return answer_loss(causal_lm, batch), None
    logits = answer_logits(causal_lm, batch)
    kl = top_k_kl(logits[batch.kl_index], batch.teacher_ids, batch.teacher_logprobs)
    weights = batch.token_weights
    if batch.ce_index is None:
        ce = weighted_cross_entropy(logits, batch.targets, weights)
    elif batch.ce_index.numel():
        ce = weighted_cross_entropy(logits[batch.ce_index], batch.targets[batch.ce_index],
                                    None if weights is None else weights[batch.ce_index])
    else:
        ce = kl.new_zeros(())
    return ce + kl_weight * kl, float(kl.detach())


class LoraTrainer(dg.ConfigurableResource):
    """Trains a PEFT LoRA adapter on a TrainingSet (loss on answers only) and writes it atomically."""

    launcher: Launcher = Field(
        "in_process",
        description="where `train_for_asset` trains: in the step's process, or in a Dagster Pipes worker process "
        "(`python -m sleeptrain_resources.training_worker`)",
    )
    # Mirrors Hyperparams: the resource is the configurable face, Hyperparams the frozen record in manifests.
    rank: int = 16
    alpha: int = 32
    # No dropout by default: the goal is to memorize facts; replay, not dropout, guards untaught behaviour.
    dropout: float = 0.0
    target_modules: str = ALL_LINEAR
    learning_rate: float = 1e-3
    max_steps: int = 160
    batch_size: int = 8
    max_seq_len: int = 256
    seed: int = 7
    warmup_steps: int = 8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    divergence_factor: float = 3.0
    early_stop_patience: int = 5
    early_stop_min_delta: float = 0.02
    probe_every: int = 20
    probe_size: int = 24
    length_window: int = 8
    pack_examples: bool = True
    locality_kl_weight: float = 0.0
    locality_sft: bool = True

    def hyperparams(self, **overrides: Any) -> Hyperparams:
        names = {f.name for f in fields(Hyperparams)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown trainer settings {sorted(unknown)}")
        values = {n: getattr(self, n) for n in names}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Hyperparams(**values).validate()

    def train(
        self,
        training_set: TrainingSet | Sequence[TrainingExample],
        base_model: BaseModel,
        output_dir: str | Path,
        *,
        init_adapter: str | Path | None = None,
        extra_manifest: Mapping[str, Any] | None = None,
        on_step: Callable[[StepInfo], None] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> TrainResult:
        """Train and write the adapter to `output_dir` (must not exist); raises TrainingFailed on a guard."""
        hp = self.hyperparams(**dict(overrides or {}))
        output_dir = Path(output_dir)
        if output_dir.exists():
            raise FileExistsError(f"{output_dir}: adapter output folder already exists")
        clean_stale_temp_adapters(output_dir.parent)
        examples = list(training_set.examples if isinstance(training_set, TrainingSet) else training_set)
        if not examples:
            raise ValueError("trainer.train: the training set is empty")
        run = _Run(hp, base_model, examples, init_adapter, on_step)
        metrics = run.fit()
        manifest = {
            "format": "sleeptrain-adapter/1",
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_model": {
                "id": base_model.model_id,
                "sha256": base_model.source_hash(),
                "path": str(base_model.model_dir),
            },
            "training_data": {
                "sha256": training_set.data_hash if isinstance(training_set, TrainingSet) else data_hash(examples),
                "examples": len(examples),
                **({"stats": training_set.stats()} if isinstance(training_set, TrainingSet) else {}),
            },
            "hyperparameters": asdict(hp),
            "metrics": metrics,
            "code_version": code_version(),
            "initialized_from": run.init_info,
            **dict(extra_manifest or {}),
        }
        _write_adapter(run.model, output_dir, manifest)
        return result_from_manifest(output_dir, manifest, trained_on("in_process", metrics))

    def train_for_asset(
        self,
        context: dg.AssetExecutionContext,
        training_set: TrainingSet,
        base_model: BaseModel,
        output_dir: str | Path,
        *,
        init_adapter: str | Path | None = None,
        extra_manifest: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> TrainResult:
        """Train for a Dagster step with the configured `launcher`, logging progress to the step's log.

        Either way the adapter lands in `output_dir` and the result is the same. A failed run raises (a guard or
        a failed worker: TrainingFailed with the reason) and leaves nothing in `output_dir`.
        """
        hp = self.hyperparams(**dict(overrides or {}))
        if self.launcher == "in_process":
            return self.train(
                training_set, base_model, output_dir, init_adapter=init_adapter, extra_manifest=extra_manifest,
                on_step=step_logger(context.log, hp.max_steps), overrides=asdict(hp),
            )
        from sleeptrain_resources.training_worker import train_in_worker

        return train_in_worker(
            self, context, training_set, base_model, Path(output_dir), hp,
            init_adapter=init_adapter, extra_manifest=extra_manifest,
        )

    def run_worker(self, context: dg.AssetExecutionContext, extras: Mapping[str, Any]) -> Any:
        """Run the training worker under Dagster Pipes and wait for it; returns the completed invocation.

        This runs it as a local subprocess. To run the same worker on another machine, override this with
        another Pipes client, e.g. `PipesK8sClient` for a GPU pod (docs/GPU.md).
        """
        return dg.PipesSubprocessClient().run(
            context=context, command=[sys.executable, "-m", WORKER_MODULE], extras=dict(extras)
        )


def trainer_from_env() -> LoraTrainer:
    """The trainer with the launcher named by SLEEPTRAIN_TRAINER_LAUNCHER (default in_process)."""
    launcher = os.environ.get("SLEEPTRAIN_TRAINER_LAUNCHER", "").strip() or "in_process"
    if launcher not in LAUNCHERS:
        raise ValueError(f"SLEEPTRAIN_TRAINER_LAUNCHER={launcher!r}: use one of {', '.join(LAUNCHERS)}")
    return LoraTrainer(launcher=launcher)


def trained_on(launcher: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Where and how a run trained, for the materialization's metadata."""
    import torch

    return {
        "launcher": launcher,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": metrics.get("device"),
        "threads": metrics.get("threads"),
        "torch": torch.__version__,
    }


def result_from_manifest(
    adapter_dir: Path, manifest: Mapping[str, Any], runtime: Mapping[str, Any]
) -> TrainResult:
    """The TrainResult of a written adapter folder, from the metrics its manifest records."""
    metrics = manifest["metrics"]
    return TrainResult(
        adapter_dir=Path(adapter_dir),
        adapter_sha256=manifest["adapter_sha256"],
        steps=metrics["steps"],
        stopped=metrics["stopped"],
        weights_from_step=metrics["weights_from_step"],
        loss_curve=list(metrics["loss_curve"]),
        probe_curve=[tuple(p) for p in metrics["probe_curve"]],
        tokens=metrics["tokens"],
        answer_tokens=metrics["answer_tokens"],
        padding_tokens=metrics["padding_tokens"],
        seconds=metrics["seconds"],
        tokens_per_s=metrics["tokens_per_s"],
        trainable_params=metrics["trainable_params"],
        total_params=metrics["total_params"],
        examples=manifest["training_data"]["examples"],
        dropped_too_long=metrics["dropped_too_long"],
        hyperparameters=dict(manifest["hyperparameters"]),
        manifest=dict(manifest),
        trained_on=dict(runtime),
    )


def step_logger(log: Any, max_steps: int) -> Callable[[StepInfo], None]:
    """An on_step callback that logs loss, gradient norm and learning rate about ten times per run."""
    every = max(1, max_steps // 10)

    def log_step(step: StepInfo) -> None:
        if step.step % every == 0 or step.step == max_steps:
            log.info(
                f"step {step.step}/{max_steps} loss {step.loss:.4f} grad {step.grad_norm:.3f} "
                f"lr {step.learning_rate:.2e}"
            )

    return log_step


class _Run:
    """One training run's state; kept out of the resource so the resource stays plain configuration."""

    def __init__(
        self,
        hp: Hyperparams,
        base_model: BaseModel,
        examples: list[TrainingExample],
        init_adapter: str | Path | None,
        on_step: Callable[[StepInfo], None] | None,
    ) -> None:
        self.hp = hp
        self.base_model = base_model
        self.examples = examples
        self.init_adapter = Path(init_adapter) if init_adapter else None
        self.on_step = on_step
        self.model: Any = None
        self.init_info: dict[str, Any] | None = None

    def _build_model(self) -> tuple[Any, Any, str]:
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model

        device, _, _ = self.base_model.runtime()
        model, tokenizer = self.base_model.load_fresh()
        model.config.use_cache = False
        torch.manual_seed(self.hp.seed)
        with warnings.catch_warnings():
            # PEFT probes a transformers attribute that transformers 5 deprecates; nothing to act on.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
            if self.init_adapter is not None:
                weights = self.init_adapter / ADAPTER_WEIGHTS
                if not weights.is_file():
                    raise FileNotFoundError(f"{self.init_adapter}: no {ADAPTER_WEIGHTS} to continue from")
                peft_model = PeftModel.from_pretrained(model, str(self.init_adapter), is_trainable=True)
                self.init_info = {"path": str(self.init_adapter), "adapter_sha256": file_sha256(weights)}
            else:
                config = LoraConfig(
                    r=self.hp.rank,
                    lora_alpha=self.hp.alpha,
                    lora_dropout=self.hp.dropout,
                    target_modules=self.hp.targets(),
                    bias="none",
                    task_type="CAUSAL_LM",
                )
                peft_model = get_peft_model(model, config)
        peft_model.to(device)
        fuse_lora_forward(peft_model)
        return peft_model, tokenizer, device

    def fit(self) -> dict[str, Any]:
        import torch

        hp = self.hp
        peft_model, tokenizer, device = self._build_model()
        self.model = peft_model
        causal_lm = peft_model.get_base_model()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        encoded, dropped = encode_examples(tokenizer, self.examples, hp.max_seq_len)
        if not encoded:
            raise ValueError(
                f"trainer.train: every example is longer than max_seq_len={hp.max_seq_len} tokens"
            )
        lengths = [len(e[0]) for e in encoded]
        dropped_set = set(dropped)
        kept = [ex for i, ex in enumerate(self.examples) if i not in dropped_set]
        sources = [ex.source for ex in kept]
        teachers = [ex.teacher for ex in kept] if hp.locality_kl_weight > 0 else None
        weights = [ex.weight for ex in kept] if any(ex.weight != 1.0 for ex in kept) else None
        # The block-diagonal mask is a boolean 4-D mask, which PyTorch's SDPA reads as such; eager attention would
        # add it to the scores and flash-attention ignores it, so other attention kernels train unpacked.
        pack = hp.pack_examples and getattr(causal_lm.config, "_attn_implementation", None) == "sdpa"
        batches = [
            _collate(encoded, idx, pad_id, device, teachers, hp.locality_sft, pack=pack, weights=weights)
            for idx in plan_batches(lengths, hp.batch_size, hp.length_window, hp.seed)
        ]
        probe = self._probe_batches(encoded, sources, pad_id, device, pack)

        params = [p for p in peft_model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        total = sum(p.numel() for p in peft_model.parameters())
        optimizer = torch.optim.AdamW(
            params, lr=hp.learning_rate, weight_decay=hp.weight_decay, foreach=True
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(hp.warmup_steps, hp.max_steps))

        losses: list[float] = []
        kl_values: list[float] = []
        probe_curve: list[tuple[int, float]] = []
        tokens = answer_tokens = padding = 0
        stopped = "max_steps"
        best_probe = math.inf
        stale = 0
        ema: float | None = None
        peft_model.train()
        started = time.perf_counter()
        best_step = 0
        best_weights: list[Any] = []
        if probe:
            probe_curve.append((0, self._probe_loss(causal_lm, probe)))
            best_probe = probe_curve[-1][1]
            best_weights = [p.detach().clone() for p in params]
            peft_model.train()
        step = 0
        order = list(range(len(batches)))
        while step < hp.max_steps:
            epoch, position = divmod(step, len(batches))
            if position == 0 and epoch > 0:  # a new pass: same batches (padded once), new order
                random.Random(f"epoch:{hp.seed}:{epoch}").shuffle(order)
            batch = batches[order[position]]
            loss, kl = training_loss(causal_lm, batch, hp.locality_kl_weight)
            if kl is not None:
                kl_values.append(kl)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingFailed(f"non-finite loss {value} at step {step + 1}; no adapter written")
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise TrainingFailed(f"non-finite gradient norm at step {step + 1}; no adapter written")
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(value)
            tokens += batch.real_tokens
            answer_tokens += int(batch.targets.numel())
            padding += batch.padding
            ema = value if ema is None else 0.7 * ema + 0.3 * value
            # Against the highest of the first losses, and by a full nat at least: batches differ in how
            # much they already know (replay vs new facts), and a low first batch must not trip the guard.
            start_loss = max(losses[:3])
            if step > 3 and ema > hp.divergence_factor * start_loss and ema > start_loss + 1.0:
                raise TrainingFailed(
                    f"loss rose from {start_loss:.3f} to {ema:.3f} (x{hp.divergence_factor} guard) at "
                    f"step {step}; no adapter written"
                )
            if self.on_step is not None:
                self.on_step(StepInfo(step, value, grad_norm, schedule.get_last_lr()[0], peft_model))
            if probe and (step % hp.probe_every == 0 or step == hp.max_steps):
                current = self._probe_loss(causal_lm, probe)
                peft_model.train()
                probe_curve.append((step, current))
                if not math.isfinite(current):
                    raise TrainingFailed(f"non-finite held-in loss at step {step}; no adapter written")
                if current < best_probe * (1 - hp.early_stop_min_delta):
                    best_probe, best_step, stale = current, step, 0
                    best_weights = [p.detach().clone() for p in params]
                else:
                    stale += 1
                    if hp.early_stop_patience and stale >= hp.early_stop_patience and step < hp.max_steps:
                        # The weights of the last probes were no better (often noisier, mid-schedule): keep the
                        # best ones, the way Trainer's load_best_model_at_end does.
                        with torch.no_grad():
                            for param, best in zip(params, best_weights, strict=True):
                                param.copy_(best)
                        stopped = "plateau"
                        break
        seconds = time.perf_counter() - started
        peft_model.eval()
        return {
            "steps": step,
            "stopped": stopped,
            "weights_from_step": best_step if stopped == "plateau" else step,
            "loss_curve": [round(v, 5) for v in losses],
            "probe_curve": [[s, round(v, 5)] for s, v in probe_curve],
            "initial_loss": round(losses[0], 5),
            "final_loss": round(sum(losses[-5:]) / len(losses[-5:]), 5),
            "tokens": tokens,
            "answer_tokens": answer_tokens,
            "padding_tokens": padding,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else 0.0,
            "trainable_params": trainable,
            "total_params": total,
            "dropped_too_long": len(dropped),
            "packed": pack,
            "locality_kl_batches": len(kl_values),
            "locality_kl_first": round(sum(kl_values[:5]) / len(kl_values[:5]), 5) if kl_values else None,
            "locality_kl_last": round(sum(kl_values[-5:]) / len(kl_values[-5:]), 5) if kl_values else None,
            "device": device,
            "threads": torch.get_num_threads(),
        }

    def _probe_batches(
        self, encoded: list[tuple[list[int], int, int]], sources: list[str], pad_id: int, device: str, pack: bool
    ) -> list[_Batch]:
        """A fixed held-in sample of new-fact examples whose loss decides early stopping."""
        if self.hp.early_stop_patience <= 0 or self.hp.probe_size <= 0:
            return []
        pool = [i for i, source in enumerate(sources) if source == NEW] or list(range(len(encoded)))
        rng = random.Random(f"probe:{self.hp.seed}")
        sample = sorted(rng.sample(pool, min(self.hp.probe_size, len(pool))))
        sample.sort(key=lambda i: len(encoded[i][0]))
        size = max(self.hp.batch_size, 8)
        return [
            _collate(encoded, sample[j : j + size], pad_id, device, pack=pack)
            for j in range(0, len(sample), size)
        ]

    @staticmethod
    def _probe_loss(causal_lm: Any, probe: list[_Batch]) -> float:
        import torch

        causal_lm.eval()
        total = count = 0.0
        with torch.no_grad():
            for batch in probe:
                n = int(batch.targets.numel())
                total += float(answer_loss(causal_lm, batch)) * n
                count += n
        return total / count


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    warmup = max(0, min(warmup, total // 4))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_adapter(peft_model: Any, output_dir: Path, manifest: dict[str, Any]) -> str:
    """Save into a temporary sibling, then rename into place: a crash leaves no half adapter behind."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # The owner tag lets the next run on this host remove the folder if this process dies mid-write.
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-{owner_tag()}-", dir=output_dir.parent))
    try:
        tmp.chmod(0o755)
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        for required in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            if not (tmp / required).is_file():
                raise TrainingFailed(f"PEFT did not write {required}; no adapter written")
        adapter_sha = file_sha256(tmp / ADAPTER_WEIGHTS)
        manifest["adapter_sha256"] = adapter_sha
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
        _fsync_tree(tmp)
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return adapter_sha


def read_manifest(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ValueError(f"{path}: manifest is not valid JSON ({exc})") from exc
