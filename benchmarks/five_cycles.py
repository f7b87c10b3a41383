"""Five sleep cycles in a row: each teaches new people from the inbox; what each cycle learned and what stayed.

A fresh SLEEPTRAIN_HOME runs `--cycles` cycles through Dagster under the default gates, each on `--people` made-up
people (as in cycle_latency.py). After every cycle the model in service (the champion) is scored on the test
split, which no gate ever sees: recall/paraphrase items of each cohort's facts (cohort k: the people of cycle
k) and general questions (locality, counted where the base model answers right). Printed: each decision with
its reasons, the cohort x cycle recall table, and the issue's targets: each cycle's new facts >= 90% when
first scored, cohort 1 keeping >= 95% of its cycle-1 score, locality within 1 point of the first adapter's.
Every rate comes with n and a 95% Wilson interval. Last line: a JSON object.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/five_cycles.py [--cycles 5] [--people 2] [--profile default]
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

FACT_KINDS = ("recall", "paraphrase")


def score_in_service(cohorts: list[set[str]]) -> dict:
    """The champion on test-split items: recall per cohort and locality."""
    from sleeptrain_assets.defs.cycles import _catalog, answer_and_score
    from sleeptrain_assets.lib import eval_suite, settings
    from sleeptrain_assets.lib.templating import evaluation_items
    from sleeptrain_resources.embedding import Embedder
    from sleeptrain_resources.llm import BaseModel
    from sleeptrain_resources.registry import AdapterRegistry

    people, _, templates, _ = _catalog()
    taught = set().union(*cohorts)
    facts = [i for i in evaluation_items({p: people[p] for p in taught if p in people}, templates)
             if i.split == "test" and i.kind in FACT_KINDS]
    general = [i for i in eval_suite.load_locality_items(settings.benchmark_path(eval_suite.GENERAL_KNOWLEDGE_FILE))
               if i.kind == "locality" and i.split == "test"]
    plan = eval_suite.SuitePlan(single=tuple(facts + general), groups=())
    registry = AdapterRegistry()
    champion = registry.current()
    systems = {"base": None, "champion": registry.path(champion) if champion else None}
    _, scored = answer_and_score(plan, systems, BaseModel(), Embedder(), settings.profile().max_new_tokens)
    scores = {s.item_id: s for s in scored["champion"]}
    out = {"champion": champion, "cohorts": []}
    for cohort in cohorts:
        verdicts = [scores[i.id] for i in facts if i.person_id in cohort and scores[i.id].counted]
        out["cohorts"].append(rate(sum(v.passed for v in verdicts), len(verdicts)))
    local = [scores[i.id] for i in general if scores[i.id].counted]
    out["locality"] = rate(sum(v.passed for v in local), len(local))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--people", type=int, default=2, help="new people per cycle (one conversation each)")
    parser.add_argument("--profile", default="default", choices=["smoke", "default"])
    args = parser.parse_args()
    os.environ.setdefault("SLEEPTRAIN_MODEL_CACHE", str(REPO / ".sleeptrain" / "models"))
    import dagster as dg

    from sleeptrain_assets.defs.cycles import run_cycle_now
    from sleeptrain_assets.lib import settings

    rows, cohorts = [], []
    with tempfile.TemporaryDirectory(prefix="five-cycles-") as tmp:
        data = fresh_workspace(Path(tmp), args.profile)
        for number in range(1, args.cycles + 1):
            records = people(args.people, f"c{number}")
            (data / "inbox" / f"day{number}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            start = time.perf_counter()
            with dg.DagsterInstance.get() as instance:
                key, skipped, _ = run_cycle_now(instance)
            seconds = time.perf_counter() - start
            if key is None:
                raise SystemExit(f"cycle {number}: no cycle ran ({skipped})")
            report = json.loads((settings.state_dir() / "cycles" / key / "report.json").read_text())
            cohorts.append({r["person"] for r in records})
            scored = score_in_service(cohorts)
            decision = report.get("decision") or {}
            rows.append({"cycle": key, "status": report.get("status"), "seconds": round(seconds, 1),
                         "reasons": decision.get("reasons", []), "validation": (report.get("evaluation") or {}),
                         "test": scored})
            print(f"{key}: {report.get('status')} in {seconds:.0f} s; " + "; ".join(decision.get("reasons", [])),
                  flush=True)
            print(f"  test split, champion {scored['champion']}: cohorts "
                  + ", ".join(fmt(c) for c in scored["cohorts"]) + f"; locality {fmt(scored['locality'])}", flush=True)

    print("\n| cohort | " + " | ".join(r["cycle"] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in range(len(rows)):
        print(f"| {k + 1} | " + " | ".join(fmt(r["test"]["cohorts"][k]) if k < len(r["test"]["cohorts"]) else ""
                                          for r in rows) + " |")
    print("| locality | " + " | ".join(fmt(r["test"]["locality"]) for r in rows) + " |")
    first_scores = [r["test"]["cohorts"][k]["rate"] for k, r in enumerate(rows)]
    cohort1 = [r["test"]["cohorts"][0]["rate"] for r in rows]
    first_locality = next((r["test"]["locality"]["rate"] for r in rows if r["test"]["champion"]), None)
    targets = {
        "new_facts_at_least_90pct": [s is not None and s >= 0.9 for s in first_scores],
        "cohort1_keeps_95pct": bool(cohort1[-1] is not None and cohort1[0] and cohort1[-1] >= 0.95 * cohort1[0]),
        "locality_within_1pt_of_first_adapter": (
            first_locality is not None and rows[-1]["test"]["locality"]["rate"] is not None
            and rows[-1]["test"]["locality"]["rate"] >= first_locality - 0.01),
        "every_decision_explained": all(r["reasons"] for r in rows),
    }
    print(f"\ntargets: {targets}")
    print(json.dumps({"profile": args.profile, "cycles": args.cycles, "people_per_cycle": args.people,
                      "rows": rows, "targets": targets}))


if __name__ == "__main__":
    main()
