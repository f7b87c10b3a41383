"""Hard cases in a sleep cycle: the same inbox learned with and without mined denials, side by side.

For each setting a fresh SLEEPTRAIN_HOME runs one cycle, through Dagster, on N made-up people (as in
cycle_latency.py) who list no wrong values. With hard cases on, the challenger also trains denials of mined wrong
values (their corrected statements, other people's values, closest first); either way the cycle asks the
held-out mined value (deny it) and the true one (confirm it) on the validation split. Printed per setting:
challenger and champion (base model) on new-fact recall, those correction items, locality, and the cycle time,
each rate with n and a 95% Wilson interval. Last line: a JSON object.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cycle_hard_cases.py [--people 4] [--profile default]
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
from cycle_latency import REPO, fmt, fresh_workspace, people, rate  # noqa: E402  (sets the offline environment too)

METRICS = ("new_fact_recall", "new_fact_correction", "locality")


def run_setting(hard_cases: bool, records: list[dict], profile: str, shared_cache: Path) -> dict:
    import dagster as dg

    from sleeptrain_assets.defs.cycles import run_cycle_now
    from sleeptrain_assets.lib import settings

    with tempfile.TemporaryDirectory(prefix="cycle-hard-cases-") as tmp:
        root = Path(tmp)
        data = fresh_workspace(root, profile)
        (root / "home" / "cache").mkdir(parents=True)
        # Replay targets and base answers do not depend on the setting: computed once, shared by both runs.
        for sub in ("replay_targets", "base_answers"):
            (shared_cache / sub).mkdir(parents=True, exist_ok=True)
            (root / "home" / "cache" / sub).symlink_to(shared_cache / sub)
        (data / "inbox" / "day1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        start = time.perf_counter()
        with dg.DagsterInstance.get() as instance:
            key, skipped, _ = run_cycle_now(instance, hard_cases=hard_cases)
        seconds = time.perf_counter() - start
        if key is None:
            raise SystemExit(f"no cycle ran: {skipped}")
        report = json.loads((settings.state_dir() / "cycles" / key / "report.json").read_text())
    evaluation = report.get("evaluation") or {}
    row = {"hard_cases": hard_cases, "status": report.get("status"), "cycle_s": round(seconds, 1),
           "training_steps": (report.get("training") or {}).get("steps"),
           "training_set": (report.get("training") or {}).get("training_set"),
           "mined": report.get("hard_case_values", {})}
    for system in ("champion", "challenger"):
        scores = evaluation.get(system) or {}
        row[system] = {m: rate(round((scores.get(m) or 0) * (scores.get(f"{m}_items") or 0)),
                               scores.get(f"{m}_items") or 0) for m in METRICS}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=4, help="new people in the inbox (one conversation each)")
    parser.add_argument("--profile", default="default", choices=["smoke", "default"])
    parser.add_argument("--seed", default="hard-cases")
    args = parser.parse_args()
    os.environ.setdefault("SLEEPTRAIN_MODEL_CACHE", str(REPO / ".sleeptrain" / "models"))
    records = people(args.people, args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cycle-hard-cases-cache-") as shared:
        for hard_cases in (False, True):
            row = run_setting(hard_cases, records, args.profile, Path(shared))
            rows.append(row)
            c = row["challenger"]
            print(f"hard cases {'on ' if hard_cases else 'off'}: {row['status']}, {row['cycle_s']} s, "
                  f"{row['training_steps']} steps; challenger recall {fmt(c['new_fact_recall'], True)}, correction "
                  f"{fmt(c['new_fact_correction'], True)}, locality {fmt(c['locality'], True)}; base correction "
                  f"{fmt(row['champion']['new_fact_correction'], True)}", flush=True)
    print(json.dumps({"profile": args.profile, "people": args.people, "rows": rows}))


if __name__ == "__main__":
    main()
