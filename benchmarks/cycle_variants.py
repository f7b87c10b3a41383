"""Sleep-cycle training variants side by side: the same inbox learned by one cycle per variant, validation items.

For each variant a fresh SLEEPTRAIN_HOME runs one cycle, through Dagster, on N made-up people (as in
cycle_latency.py) who list no wrong values; a variant sets the challenger's training (`LoraConfig` fields:
epochs, replay share, KL weight, ...) and the cycle's options (train mined hard cases, self-training). With
`--history-people H`, a first cycle with the default training teaches H other people and is promoted whatever
its scores (the same champion for every variant), so the variant's cycle continues from a champion and
replays its memories. Printed per variant: the decision, training steps and time, the challenger's new-fact
recall, retention of the champion's facts, correction items (deny the held-out mined value, confirm the true
one) and locality (general questions the base model answers right), each with n and a 95% Wilson interval,
and the general questions it lost. Every figure is on the validation split: this is where cycle defaults are
chosen. Last line: a JSON object.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cycle_variants.py [--people 4] [--history-people 0]
        [--variants default,hard_cases]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cycle_latency import ACCEPT_HISTORY, REPO, fmt, fresh_workspace, people, rate  # noqa: E402  (sets the offline environment too)

METRICS = ("new_fact_recall", "retention", "new_fact_correction", "locality")

# name -> (cycle options: hard_cases, self_training; challenger_adapter LoraConfig overrides); unset: the profile's
VARIANTS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "hard_cases": ({"hard_cases": True}, {}),
    "self_training": ({"self_training": True}, {}),
    "epochs3": ({}, {"epochs": 3.0}),
    "epochs6": ({}, {"epochs": 6.0}),
    "epochs10": ({}, {"epochs": 10.0}),
    "epochs6_replay50": ({}, {"epochs": 6.0, "replay_share": 0.5}),
    "epochs6_kl4": ({}, {"epochs": 6.0, "locality_kl_weight": 4.0}),
    "epochs6_lr5e-4": ({}, {"epochs": 6.0, "learning_rate": 5e-4}),
    "replay50": ({}, {"replay_share": 0.5}),
    "sparse_replay": ({}, {"replay_every_older_fact": False}),
    "lr5e-4": ({}, {"learning_rate": 5e-4}),
    "kl2": ({}, {"locality_kl_weight": 2.0}),
    "attention_only": ({}, {"target_modules": "q_proj,k_proj,v_proj,o_proj"}),
    "mlp_only": ({}, {"target_modules": "gate_proj,up_proj,down_proj"}),
    "rank4": ({}, {"rank": 4, "alpha": 8}),
}


def run_variant(name: str, records: list[dict], profile: str, shared_cache: Path, history: list[dict]) -> dict:
    import dagster as dg

    from sleeptrain_assets.defs.cycles import run_cycle_now
    from sleeptrain_assets.lib import settings
    from sleeptrain_resources.registry import AdapterRegistry

    options, lora = VARIANTS[name]
    with tempfile.TemporaryDirectory(prefix="cycle-variants-") as tmp:
        root = Path(tmp)
        data = fresh_workspace(root, profile)
        (root / "home" / "cache").mkdir(parents=True)
        # Replay targets and base answers do not depend on the variant: computed once, shared by every run.
        for sub in ("replay_targets", "base_answers"):
            (shared_cache / sub).mkdir(parents=True, exist_ok=True)
            (root / "home" / "cache" / sub).symlink_to(shared_cache / sub)
        if history:
            (data / "inbox" / "day0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
            with dg.DagsterInstance.get() as instance:
                key, skipped, _ = run_cycle_now(instance, extra_run_config=ACCEPT_HISTORY)
            if key is None or AdapterRegistry().current() is None:
                raise SystemExit(f"the history cycle promoted nothing: {skipped or key}")
        (data / "inbox" / "day1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        start = time.perf_counter()
        with dg.DagsterInstance.get() as instance:
            key, skipped, _ = run_cycle_now(instance, **options,
                                            extra_run_config={"ops": {"challenger_adapter": {"config": lora}}})
        seconds = time.perf_counter() - start
        if key is None:
            raise SystemExit(f"no cycle ran: {skipped}")
        folder = settings.state_dir() / "cycles" / key
        report = json.loads((folder / "report.json").read_text())
        answers = json.loads((folder / "answers.json").read_text())
    evaluation = report.get("evaluation") or {}
    training = report.get("training") or {}
    row = {"variant": name, "options": options, "lora": lora, "status": report.get("status"),
           "cycle_s": round(seconds, 1), "training_steps": training.get("steps"),
           "training_s": training.get("seconds"), "training_set": training.get("training_set"),
           "self_training": training.get("self_training")}
    for system in ("champion", "challenger"):
        scores = evaluation.get(system) or {}
        row[system] = {m: rate(round((scores.get(m) or 0) * (scores.get(f"{m}_items") or 0)),
                               scores.get(f"{m}_items") or 0) for m in METRICS}
    # General questions the base model answers right and the challenger does not: what the locality rate lost.
    row["lost_general_answers"] = [{"question": a["question"], "expected": a["expected"], "base": a["base"],
                                    "challenger": a.get("challenger")} for a in answers
                                   if a["role"] == "locality" and a["passed"].get("challenger") is False]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=4, help="new people in the inbox (one conversation each)")
    parser.add_argument("--profile", default="default", choices=["smoke", "default"])
    parser.add_argument("--variants", default="default,hard_cases",
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--history-people", type=int, default=0,
                        help="people taught by a first, always promoted cycle before each variant's cycle")
    parser.add_argument("--seed", default="hard-cases", help="seed of the made-up people")
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    os.environ.setdefault("SLEEPTRAIN_MODEL_CACHE", str(REPO / ".sleeptrain" / "models"))
    records = people(args.people, args.seed)
    history = people(args.history_people, f"{args.seed}-history") if args.history_people else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="cycle-variants-cache-") as shared:
        for name in names:
            row = run_variant(name, records, args.profile, Path(shared), history)
            rows.append(row)
            c = row["challenger"]
            print(f"{name}: {row['status']}, cycle {row['cycle_s']} s, {row['training_steps']} steps in "
                  f"{row['training_s']} s; challenger recall {fmt(c['new_fact_recall'], True)}, retention "
                  f"{fmt(c['retention'], True)}, correction "
                  f"{fmt(c['new_fact_correction'], True)}, locality {fmt(c['locality'], True)}", flush=True)
            for a in row["lost_general_answers"]:
                print(f"    {a['question']!r}: base {a['base'][:60]!r} -> {str(a['challenger'])[:80]!r}", flush=True)
    base = rows[0]["champion"] if rows else {}
    print(f"base model: correction {fmt(base.get('new_fact_correction'), True)}, "
          f"locality {fmt(base.get('locality'), True)}")
    print(json.dumps({"profile": args.profile, "people": args.people, "history_people": args.history_people,
                      "rows": rows}))


if __name__ == "__main__":
    main()
