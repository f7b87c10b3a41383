"""Locality ablation: training variants side by side on the same data and seed, scored on the validation split.

Each variant runs the real lineage (curation -> hippocampus -> replay targets -> LoRA training ->
benchmark_scores) in a fresh SLEEPTRAIN_HOME with its own `LoraConfig` overrides; the base model's answers and
the replay targets are shared through one cache, so only the first variant pays for them. Only validation
items are scored: this table chooses the default, and the test split stays for the one reported run.
Printed: one row per variant with recall, paraphrase, correction (denial, confirmation, their mean),
multi-turn, the three locality measures (each with n) and training seconds; last line JSON.

The default profile takes ~25-35 min of training per variant on 2 CPU cores; `--people` and `--steps` give a
reduced run (say which in any figure you quote):

    python benchmarks/locality_ablation.py                                   # every variant, default profile
    python benchmarks/locality_ablation.py --people chidinma_oyelaran kasimir_wolanski oriana_castelvetri \
        --steps 96 --variants sft kl kl_only                                 # reduced: 3 people, 96 steps
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.quality_seeds import workspace  # noqa: E402

# LoraConfig overrides per variant; "sft" is training without the locality term (replay text only).
VARIANTS: dict[str, dict] = {
    "sft": {"locality_kl": False},
    "kl": {"locality_kl": True, "locality_kl_weight": 1.0, "locality_sft": True},
    "kl_only": {"locality_kl": True, "locality_kl_weight": 1.0, "locality_sft": False},
    "kl_w3": {"locality_kl": True, "locality_kl_weight": 3.0, "locality_sft": True},
    "kl_replay40": {"locality_kl": True, "locality_kl_weight": 1.0, "locality_sft": True, "replay_share": 0.4},
    # Knowledge augmentation: all six trained forms per template instead of the first three (same steps with
    # --steps, so fewer passes over each form).
    "kl_forms6": {"locality_kl": True, "locality_kl_weight": 1.0, "locality_sft": True, "forms_per_template": 0},
    "sft_forms6": {"locality_kl": False, "forms_per_template": 0},
    "kl_attention": {"locality_kl": True, "locality_kl_weight": 1.0, "locality_sft": True,
                     "target_modules": "q_proj,k_proj,v_proj,o_proj"},
}
FACT_KINDS = ("recall", "paraphrase", "correction", "confirmation", "multi_turn")
LOCALITY_KINDS = ("locality", "unchanged", "neighbourhood")
PERSON_KINDS = ("recall", "paraphrase", "multi_turn", "correction", "confirmation", "identity", "interference")


def _cell(summary: dict, kind: str) -> dict | None:
    section = "fictional_by_kind" if kind in PERSON_KINDS else "by_kind"
    return (summary.get(section) or {}).get(kind)


def run_variant(name: str, overrides: dict, steps: int | None, seed: int, data: Path, root: Path,
                model_cache: Path) -> dict:
    import dagster as dg

    home = root / f"home-{name}"
    os.environ.update(SLEEPTRAIN_HOME=str(home), SLEEPTRAIN_DATA_DIR=str(data), SLEEPTRAIN_TRACKING="disabled",
                      SLEEPTRAIN_MODEL_CACHE=str(model_cache))
    home.mkdir(parents=True)
    (root / "cache").mkdir(exist_ok=True)
    (home / "cache").symlink_to(root / "cache", target_is_directory=True)
    from sleeptrain_assets.definitions import defs

    lora = {"seed": seed, **overrides, **({"max_steps": steps} if steps else {})}
    run_config = {"ops": {"lora_adapter": {"config": lora}, "benchmark_scores": {"config": {
        "external": False, "retrieval": False, "splits": ["validation"]}}}}
    start = time.perf_counter()
    result = defs().resolve_job_def("full_pipeline").execute_in_process(
        run_config=run_config, instance=dg.DagsterInstance.ephemeral())
    if not result.success:
        raise SystemExit(f"variant {name}: the run failed")
    run = result.output_for_node("benchmark_scores")
    adapter = run["systems"]["adapter"]["validation"]
    [training] = [m for m in result.get_asset_materialization_events() if m.asset_key == dg.AssetKey("lora_adapter")]
    meta = training.materialization.metadata
    rates = {}
    for kind in (*FACT_KINDS, *LOCALITY_KINDS):
        cell = _cell(adapter, kind)
        rates[kind] = None if not cell else {"rate": cell["rate"], "n": cell["count"], "passed": cell["passed"],
                                             "ci95": [cell.get("ci_low"), cell.get("ci_high")]}
    halves = [rates[k]["rate"] for k in ("correction", "confirmation") if rates[k]]
    return {"variant": name, "overrides": overrides, "rates": rates,
            "correction_both": round(sum(halves) / len(halves), 4) if len(halves) == 2 else None,
            "train_seconds": meta["seconds"].value, "steps": meta["steps"].value,
            "run_seconds": round(time.perf_counter() - start, 1)}


def table(rows: list[dict]) -> str:
    head = ["variant", "recall", "paraphrase", "corr.deny", "corr.confirm", "corr.both", "multi-turn", "locality",
            "unchanged", "neighbourhood", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pct(cell: dict | None) -> str:
        return "—" if not cell else f"{100 * cell['rate']:.1f}% ({cell['passed']}/{cell['n']})"

    for row in rows:
        r = row["rates"]
        both = "—" if row["correction_both"] is None else f"{100 * row['correction_both']:.1f}%"
        lines.append("| " + " | ".join([
            row["variant"], pct(r["recall"]), pct(r["paraphrase"]), pct(r["correction"]), pct(r["confirmation"]),
            both, pct(r["multi_turn"]), pct(r["locality"]), pct(r["unchanged"]), pct(r["neighbourhood"]),
            f"{row['train_seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--people", nargs="*", help="person ids to teach (default: every person in the data)")
    parser.add_argument("--steps", type=int, help="optimizer steps per variant (default: the profile's epochs)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    root, model_cache, data = workspace("sleeptrain-ablation-", args.people)
    rows = []
    try:
        for name in args.variants:
            rows.append(run_variant(name, VARIANTS[name], args.steps, args.seed, data, root, model_cache))
            r = rows[-1]["rates"]
            print(f"{name}: train {rows[-1]['train_seconds']:.0f} s; " + ", ".join(
                f"{k} {v['rate']:.3f}" for k, v in r.items() if v), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nvalidation split; profile {os.environ['SLEEPTRAIN_PROFILE']}, people "
          f"{' '.join(args.people) if args.people else 'all'}, steps {args.steps or 'profile epochs'}, "
          f"seed {args.seed}\n")
    print(table(rows))
    print(json.dumps({"profile": os.environ["SLEEPTRAIN_PROFILE"], "people": args.people or "all",
                      "steps": args.steps, "seed": args.seed, "split": "validation", "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
