"""Seed spread of the quality figures: the whole graph trained with several seeds, validation and test side by side.

Each seed runs the real lineage (curation -> hippocampus -> LoRA training -> benchmark_scores) in a fresh
SLEEPTRAIN_HOME (the base model's answers are shared through one cache, so only the first seed pays for
them) with `LoraConfig.seed` set, and the adapter's rates are read per kind on both splits. Printed: mean,
standard deviation, min and max per kind and split over the seeds, and the per-seed rates; last line JSON.

The default profile takes ~25-35 min of training per seed on 2 CPU cores; `--people` and `--steps` give a
reduced run (say which in any figure you quote):

    python benchmarks/quality_seeds.py                                  # default profile, 3 seeds
    python benchmarks/quality_seeds.py --people chidinma_oyelaran kasimir_wolanski oriana_castelvetri \
        --steps 80 --seeds 1 2 3                                        # reduced: 3 people, 80 steps
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KINDS = ("recall", "paraphrase", "multi_turn", "correction", "confirmation", "identity", "locality", "unchanged",
         "neighbourhood", "interference", "hallucination")
PERSON_KINDS = ("recall", "paraphrase", "multi_turn", "correction", "confirmation", "identity", "interference")


def _data_dir(people: list[str] | None, root: Path) -> Path:
    """The repo's data, or a copy holding only `people` (look-alike links to people left out are dropped)."""
    source = Path(os.environ.get("SLEEPTRAIN_DATA_DIR", REPO / "data"))
    if not people:
        return source
    import yaml

    data = root / "data"
    shutil.copytree(source / "templates", data / "templates")
    if (source / "benchmarks").is_dir():
        shutil.copytree(source / "benchmarks", data / "benchmarks")
    (data / "people").mkdir(parents=True)
    for pid in people:
        record = yaml.safe_load((source / "people" / f"{pid}.yaml").read_text())
        record["lookalike_of"] = [p for p in record.get("lookalike_of") or [] if p in people]
        (data / "people" / f"{pid}.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    return data


def workspace(prefix: str, people: list[str] | None) -> tuple[Path, Path, Path]:
    """(scratch root, model cache, data folder) for a benchmark that runs the graph several times."""
    os.environ.setdefault("SLEEPTRAIN_PROFILE", "default")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix=prefix))
    model_cache = Path(os.environ.get("SLEEPTRAIN_MODEL_CACHE", REPO / ".sleeptrain" / "models"))
    return root, model_cache, _data_dir(people, root)


def _rates(summary: dict, kind: str) -> float | None:
    section = "fictional_by_kind" if kind in PERSON_KINDS else "by_kind"
    return ((summary.get(section) or {}).get(kind) or {}).get("rate")


def run_seed(seed: int, steps: int | None, data: Path, root: Path, model_cache: Path) -> dict:
    import dagster as dg

    home = root / f"home-seed{seed}"
    os.environ.update(SLEEPTRAIN_HOME=str(home), SLEEPTRAIN_DATA_DIR=str(data), SLEEPTRAIN_TRACKING="disabled",
                      SLEEPTRAIN_MODEL_CACHE=str(model_cache))
    shared_cache = root / "base_answers"
    (home / "cache").mkdir(parents=True, exist_ok=True)
    shared_cache.mkdir(exist_ok=True)
    (home / "cache" / "base_answers").symlink_to(shared_cache, target_is_directory=True)
    from sleeptrain_assets.definitions import defs

    lora = {"seed": seed, **({"max_steps": steps} if steps else {})}
    run_config = {"ops": {"lora_adapter": {"config": lora}, "benchmark_scores": {"config": {"external": False}}}}
    start = time.perf_counter()
    result = defs().resolve_job_def("full_pipeline").execute_in_process(
        run_config=run_config, instance=dg.DagsterInstance.ephemeral())
    if not result.success:
        raise SystemExit(f"seed {seed}: the run failed")
    run = result.output_for_node("benchmark_scores")
    adapter = run["systems"]["adapter"]
    return {"seed": seed, "seconds": round(time.perf_counter() - start, 1),
            "test": {k: _rates(adapter, k) for k in KINDS},
            "validation": {k: _rates(adapter["validation"], k) for k in KINDS},
            "n_test": {k: ((adapter.get("by_kind") or {}).get(k) or {}).get("count", 0) for k in KINDS}}


def spread(runs: list[dict], split: str) -> dict[str, dict[str, float | None]]:
    out = {}
    for kind in KINDS:
        values = [r[split][kind] for r in runs if r[split][kind] is not None]
        out[kind] = {
            "mean": round(statistics.fmean(values), 4) if values else None,
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
            "min": min(values) if values else None,
            "max": max(values) if values else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    parser.add_argument("--people", nargs="*", help="person ids to teach (default: every person in the data)")
    parser.add_argument("--steps", type=int, help="optimizer steps per seed (default: the profile's epochs)")
    args = parser.parse_args(argv)
    root, model_cache, data = workspace("sleeptrain-seeds-", args.people)
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, args.steps, data, root, model_cache))
        print(f"seed {seed}: {runs[-1]['seconds']} s; test " +
              ", ".join(f"{k} {v:.3f}" for k, v in runs[-1]["test"].items() if v is not None), flush=True)
    summary = {split: spread(runs, split) for split in ("validation", "test")}
    print(f"\n{'kind':<14}" + "".join(f"{split + ' mean ± sd':>24}" for split in summary))
    for kind in KINDS:
        cells = []
        for split in summary:
            s = summary[split][kind]
            cells.append("—" if s["mean"] is None else f"{100 * s['mean']:.1f} ± {100 * (s['sd'] or 0):.1f}")
        print(f"{kind:<14}" + "".join(f"{c:>24}" for c in cells))
    profile = os.environ["SLEEPTRAIN_PROFILE"]
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"profile": profile, "people": args.people or "all", "steps": args.steps,
                      "seeds": args.seeds, "n_test": runs[0]["n_test"], "spread": summary, "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
