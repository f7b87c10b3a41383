"""Evaluation speed: the generation loop before issue 14 vs the one `benchmark_scores` runs now, same items.

(a) before: one system at a time (adapter, then base, then retrieval), each through `eval_suite.answer_plan`
    with batches of 16 through transformers' `generate` (`BaseModel(decoder="hf")`): every row of a batch
    keeps computing until the batch's longest answer ends;
(b) after: the compacting decoder (a finished answer leaves its batch), the base and retrieval answers in the
    same batches (`eval_suite.answer_single` / `run_conversations_for`, as `benchmark_scores` calls them),
    batches of --batch-size.
The items are an evaluation plan built from data/ like `benchmark_scores` builds it (held-out questions of
every person, interference, locality, unchanged, neighbourhood, hallucination probes, 6-turn conversations),
smaller by --per-slot, --cap and --conversations. Retrieval prompts carry the top-k memories a real local
memory store (MiniLM embeddings) returns for each item. The adapter is --adapter, else the registry's current
adapter under $SLEEPTRAIN_HOME, else one trained here for --train-steps steps on the people's QA pairs. No
answer cache is read or written. Both paths must give the same answers; the run fails if they do not.
Last line: a JSON object.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eval_speed.py [--per-slot 1] [--cap 8] [--conversations 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BEFORE_BATCH = 16  # EvaluationConfig.batch_size before issue 14


def build_items(args: argparse.Namespace):
    """(plan, retrieval augment) from data/, with memories in a throwaway local store."""
    from sleeptrain_assets.defs.evaluation import _retrieved
    from sleeptrain_assets.lib import eval_suite, settings
    from sleeptrain_assets.lib.catalog import load_people, load_templates, person_values
    from sleeptrain_assets.lib.records import Memory
    from sleeptrain_assets.lib.templating import evaluation_items, qa_pairs
    from sleeptrain_resources.embedding import Embedder
    from sleeptrain_resources.memory_store import LocalMemoryStore

    people = load_people(settings.data_dir() / "people")
    templates = load_templates(settings.data_dir() / "templates")
    locality = eval_suite.load_locality_items(settings.benchmark_path(eval_suite.GENERAL_KNOWLEDGE_FILE))
    probes = eval_suite.load_hallucination_probes(settings.benchmark_path(eval_suite.UNKNOWN_PEOPLE_FILE), people)
    plan = eval_suite.build_plan(evaluation_items(people, templates), people, locality, probes, cap=args.cap,
                                 per_slot=args.per_slot, taught=set(people), max_conversations=args.conversations)
    embedder = Embedder()
    store = LocalMemoryStore(root=str(Path(args.home) / "memory"))
    pairs = [p for person in people.values() for p in qa_pairs(person, templates, person_values(person, templates))]
    memories = [Memory(id=f"{p.person_id}:{p.slots[0]}", person_id=p.person_id, slot=p.slots[0], value=p.values[0],
                       text=p.answer, embedding=(), importance=1.0, source="bench#0")
                for p in {(p.person_id, p.slots[0]): p for p in pairs if p.slots and not p.system}.values()]
    store.upsert(memories, embedder.embed([m.text for m in memories]))
    names = {pid: person.name for pid, person in people.items()}
    found = _retrieved(plan, embedder, store, settings.profile().retrieval_top_k, names)

    def with_memories(item, messages):
        return eval_suite.retrieval_messages(messages, found[item.id], names)

    return plan, with_memories, pairs


def pick_adapter(args: argparse.Namespace, base_model, pairs) -> tuple[Path, str]:
    if args.adapter:
        return Path(args.adapter), "given"
    from sleeptrain_resources.registry import AdapterRegistry

    current = AdapterRegistry().current_path()
    if current is not None:
        return current, "registry current"
    from sleeptrain_assets.lib.training_data import build_training_set
    from sleeptrain_resources.trainer import LoraTrainer

    out = Path(args.home) / "adapter"
    LoraTrainer(max_steps=args.train_steps, batch_size=8, probe_every=10_000).train(
        build_training_set(pairs), base_model, out)
    return out, f"trained here, {args.train_steps} steps"


def before(plan, with_memories, adapter: Path, max_new_tokens: int) -> tuple[dict, dict]:
    """Today's loop before issue 14: benchmark_scores' per-system answer_plan, generate in batches of 16."""
    from sleeptrain_assets.lib import eval_suite
    from sleeptrain_resources.llm import BaseModel, GenerationTally

    model = BaseModel(decoder="hf")
    answers, seconds, tallies = {}, {}, {}
    for system, path, augment in (("adapter", adapter, None), ("base", None, None),
                                  ("retrieval", None, with_memories)):
        tally = GenerationTally()

        def generate(conversations, path=path, tally=tally):
            return model.generate(conversations, adapter=path, max_new_tokens=max_new_tokens,
                                  batch_size=BEFORE_BATCH, cache=False, tally=tally)

        start = time.perf_counter()
        answers[system] = eval_suite.answer_plan(generate, plan, augment)
        seconds[system] = time.perf_counter() - start
        tallies[system] = tally.to_dict()
    return answers, {"seconds": seconds, "generation": tallies}


def after(plan, with_memories, adapter: Path, max_new_tokens: int, batch_size: int) -> tuple[dict, dict]:
    """benchmark_scores' passes now: the adapter, then base and retrieval together, compacting decoder."""
    from sleeptrain_assets.lib import eval_suite
    from sleeptrain_resources.llm import BaseModel, GenerationTally

    model = BaseModel(decoder="compacting")
    answers, seconds, tallies = {}, {}, {}
    for name, path, augments in (("adapter", adapter, {"adapter": None}),
                                 ("base+retrieval", None, {"base": None, "retrieval": with_memories})):
        tally = GenerationTally()

        def generate(conversations, path=path, tally=tally):
            return model.generate(conversations, adapter=path, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, cache=False, tally=tally)

        start = time.perf_counter()
        answers.update(eval_suite.answer_systems(generate, plan, augments))
        seconds[name] = time.perf_counter() - start
        tallies[name] = tally.to_dict()
    return answers, {"seconds": seconds, "generation": tallies}


def _rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-slot", type=int, default=1, help="held-out questions per kind, split and slot")
    parser.add_argument("--cap", type=int, default=8, help="items per kind and split")
    parser.add_argument("--conversations", type=int, default=4, help="6-turn conversations")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=None, help="after: prompts per batch "
                        "(default: EvaluationConfig's default)")
    parser.add_argument("--adapter", default="", help="adapter folder (default: the registry's current, or train)")
    parser.add_argument("--train-steps", type=int, default=16)
    parser.add_argument("--order", choices=("before-first", "after-first"), default="before-first")
    args = parser.parse_args()

    from sleeptrain_assets.defs.evaluation import EvaluationConfig
    from sleeptrain_resources.llm import BaseModel

    batch_size = args.batch_size or EvaluationConfig().batch_size
    with tempfile.TemporaryDirectory(prefix="sleeptrain-eval-speed-") as home:
        args.home = home
        plan, with_memories, pairs = build_items(args)
        base_model = BaseModel()
        _, _, threads = base_model.runtime()
        adapter, adapter_source = pick_adapter(args, base_model, pairs)
        # Load weights and the adapter once, outside the timed runs.
        base_model.generate([[{"role": "user", "content": "Hello."}]], adapter=adapter, max_new_tokens=2, cache=False)
        items = len(plan.items())
        print(f"{items} items per system ({plan.counts()}), 3 systems, max_new_tokens {args.max_new_tokens}, "
              f"{threads} torch thread(s), adapter {adapter} ({adapter_source})")
        runs = {}
        order = ("before", "after") if args.order == "before-first" else ("after", "before")
        for which in order:
            start = time.perf_counter()
            if which == "before":
                answers, detail = before(plan, with_memories, adapter, args.max_new_tokens)
            else:
                answers, detail = after(plan, with_memories, adapter, args.max_new_tokens, batch_size)
            total = time.perf_counter() - start
            runs[which] = {"answers": answers, "total": total, **detail}
            rate = 3 * items / total
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in detail["seconds"].items())
            prefill = sum(t["prefill_tokens"] for t in detail["generation"].values())
            row_steps = sum(t["row_steps"] for t in detail["generation"].values())
            print(f"{which:>6}: {total:7.1f} s  {rate:6.2f} items/s  ({parts}; {prefill} prefill positions, "
                  f"{row_steps} decoding row-steps)")

    differing = [(system, item_id) for system, given in runs["before"]["answers"].items()
                 for item_id, answer in given.items() if runs["after"]["answers"][system][item_id] != answer]
    ratio = runs["before"]["total"] / runs["after"]["total"]
    print(f"speed-up {ratio:.2f}x; answers identical: {not differing} "
          f"({len(differing)} of {3 * items} differ{': ' + str(differing[:5]) if differing else ''})")
    result = {
        "benchmark": "eval_speed", "items_per_system": items, "systems": 3, "counts": plan.counts(),
        "max_new_tokens": args.max_new_tokens, "threads": threads, "adapter": adapter_source,
        "before": {"batch_size": BEFORE_BATCH, "decoder": "hf", "seconds": round(runs["before"]["total"], 2),
                   "items_per_s": round(3 * items / runs["before"]["total"], 3),
                   "pass_seconds": _rounded(runs["before"]["seconds"]), "generation": runs["before"]["generation"]},
        "after": {"batch_size": batch_size, "decoder": "compacting", "seconds": round(runs["after"]["total"], 2),
                  "items_per_s": round(3 * items / runs["after"]["total"], 3),
                  "pass_seconds": _rounded(runs["after"]["seconds"]), "generation": runs["after"]["generation"]},
        "speedup": round(ratio, 3), "identical_answers": not differing, "differing": len(differing),
    }
    print(json.dumps(result))
    if differing:
        sys.exit(1)


if __name__ == "__main__":
    main()
