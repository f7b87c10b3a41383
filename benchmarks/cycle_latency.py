"""Cycle latency: time from an inbox file to a decided (promoted or rejected) adapter, through Dagster.

For each batch size N (new conversations, one new person each) and history factor H, a fresh SLEEPTRAIN_HOME
first runs an untimed cycle with H x N earlier people, promoted whatever its scores (the history: memories in
the champion's weights to replay, facts to re-score), then the timed cycle on N new people under the default
gates. Targets (issue 12): a cycle with two new people <= 10 minutes on 2 CPU
cores; 10x history <= 1.5x the cycle time. Last line: a JSON object.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cycle_latency.py [--sizes 1,10,50] [--history 1,10] [--profile smoke]
"""

from __future__ import annotations

import argparse
import json
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

SYLLABLES = ("ka", "lo", "mi", "ren", "sa", "tor", "vel", "un", "dra", "pe", "zo", "bri", "nal", "quo", "fen")
CITIES = ("Ghent", "Zwolle", "Oulu", "Bergen", "Delft", "Tartu", "Porto", "Lyon", "Graz", "Aarhus", "Cork", "Brno")
JOBS = ("luthier", "cartographer", "glazier", "bookbinder", "farrier", "cooper", "chandler", "typesetter")


def people(count: int, seed: str) -> list[dict]:
    """`count` made-up people, each telling birth city, year and occupation in one conversation."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        first = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
        pid = f"{first}_{last}_{seed}_{index}".lower()
        text = (f"I was born in {rng.choice(CITIES)} in {rng.randint(1950, 2001)}. "
                f"I work as a {rng.choice(JOBS)}.")
        out.append({"person": pid, "name": f"{first} {last}", "messages": [{"role": "user", "content": text}]})
    return out


# The history must end up in the champion's weights (as after nights of promotions), whatever smoke can learn.
ACCEPT_HISTORY = {"ops": {"promotion_decision": {"config": {
    "min_new_fact_recall": 0.0, "retention_budget": 1.0, "locality_budget": 1.0, "min_items": 1}}}}


def one_cycle(inbox: Path, name: str, records: list[dict], run_config: dict | None = None) -> tuple[float, str]:
    import dagster as dg

    from sleeptrain_assets.defs.cycles import run_cycle_now
    from sleeptrain_assets.lib import settings

    (inbox / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    start = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        key, skipped, _ = run_cycle_now(instance, extra_run_config=run_config)
    seconds = time.perf_counter() - start
    report = json.loads((settings.state_dir() / "cycles" / str(key) / "report.json").read_text()) if key else {}
    return seconds, report.get("status", skipped)


def rate(passed: int, n: int) -> dict:
    """A pass rate with n and its 95% Wilson interval, as the cycle benchmarks print and store it."""
    from sleeptrain_assets.lib.stats import wilson_interval

    if not n:
        return {"rate": None, "passed": 0, "n": 0}
    low, high = wilson_interval(passed, n)
    return {"rate": round(passed / n, 4), "passed": passed, "n": n, "ci95": [round(low, 3), round(high, 3)]}


def fmt(cell: dict | None, interval: bool = False) -> str:
    if not cell or cell.get("rate") is None:
        return "n/a"
    ci = f", {cell['ci95'][0]:.0%}-{cell['ci95'][1]:.0%}" if interval else ""
    return f"{cell['rate']:.0%} ({cell['passed']}/{cell['n']}{ci})"


def fresh_workspace(root: Path, profile: str) -> Path:
    """A data folder (the repo's people, templates and benchmarks; an empty inbox), SLEEPTRAIN_HOME and
    DAGSTER_HOME under `root`, set in the environment; returns the data folder."""
    data = root / "data"
    (data / "inbox").mkdir(parents=True)
    for sub in ("people", "templates", "benchmarks"):
        (data / sub).symlink_to(REPO / "data" / sub)
    (root / "dagster").mkdir()
    (root / "home").mkdir(exist_ok=True)
    os.environ.update(SLEEPTRAIN_HOME=str(root / "home"), SLEEPTRAIN_DATA_DIR=str(data),
                      DAGSTER_HOME=str(root / "dagster"), SLEEPTRAIN_PROFILE=profile, SLEEPTRAIN_TRACKING="disabled")
    return data


def measure(n: int, history: int, profile: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="cycle-latency-") as tmp:
        root = Path(tmp)
        data = fresh_workspace(root, profile)
        warmup, warm_status = one_cycle(data / "inbox", "history.jsonl", people(history * n, f"h{history}x{n}"),
                                        ACCEPT_HISTORY)
        seconds, status = one_cycle(data / "inbox", "new.jsonl", people(n, f"n{n}"))
    return {"new_conversations": n, "history_factor": history, "history_cycle_s": round(warmup, 1),
            "history_status": warm_status, "cycle_s": round(seconds, 1), "status": status}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,50")
    parser.add_argument("--history", default="1,10")
    parser.add_argument("--profile", default="smoke", choices=["smoke", "default"])
    args = parser.parse_args()
    os.environ.setdefault("SLEEPTRAIN_MODEL_CACHE", str(REPO / ".sleeptrain" / "models"))
    rows = []
    for n in map(int, args.sizes.split(",")):
        for h in map(int, args.history.split(",")):
            row = measure(n, h, args.profile)
            rows.append(row)
            print(f"{n:>3} new, history x{h:<3} {row['cycle_s']:>8.1f} s  {row['status']} "
                  f"(history cycle {row['history_cycle_s']} s, {row['history_status']})", flush=True)
    ratios = {}
    for n in {r["new_conversations"] for r in rows}:
        times = {r["history_factor"]: r["cycle_s"] for r in rows if r["new_conversations"] == n}
        if 1 in times and 10 in times:
            ratios[str(n)] = round(times[10] / times[1], 3)
    print(json.dumps({"profile": args.profile, "cpu_count": os.cpu_count(), "rows": rows,
                      "history_10x_over_1x": ratios}))


if __name__ == "__main__":
    main()
