"""One sleep cycle on paper: which items judge it, what each system scored, the retention curve, the report.

Pure logic: the Dagster assets in `defs/cycles.py` call these and write the files.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sleeptrain_assets.lib.atomic import write_json_atomic, write_text_atomic
from sleeptrain_assets.lib.leaderboard_report import retention
from sleeptrain_assets.lib.markdown import table
from sleeptrain_assets.lib.records import EvalItem
from sleeptrain_assets.lib.scoring import ItemScore

FACT_KINDS = ("recall", "paraphrase")
CORRECTION_KINDS = ("correction", "confirmation")
GATE_SPLIT = "validation"
NEW, EARLIER, LOCALITY = "new_facts", "earlier_facts", "locality"
CORRECTIONS = "new_fact_corrections"  # a false claim to deny and a true one to confirm, per new fact
ROLE_METRICS = ((NEW, "new_fact_recall"), (EARLIER, "retention"), (LOCALITY, "locality"),
                (CORRECTIONS, "new_fact_correction"))
REPORT_JSON, REPORT_MD = "report.json", "report.md"
RETENTION_FILE = "retention_history.json"

Fact = tuple[str, str]  # (person id, slot)


@dataclass(frozen=True)
class CycleItems:
    """The items one cycle asks champion and challenger alike, by role, and how they were chosen."""

    by_role: Mapping[str, tuple[EvalItem, ...]]
    split: str
    note: str

    def all(self) -> list[EvalItem]:
        seen: dict[str, EvalItem] = {}
        for items in self.by_role.values():
            for item in items:
                seen.setdefault(item.id, item)
        return list(seen.values())

    def counts(self) -> dict[str, int]:
        return {role: len(items) for role, items in self.by_role.items()}


def _rank(item: EvalItem, seed: str) -> str:
    return hashlib.sha256(f"{seed}|{item.id}".encode()).hexdigest()


def gate_split(items: Sequence[EvalItem]) -> tuple[list[EvalItem], str, str]:
    """Validation items when there are any (gates must not tune on the test split), else every item, noted."""
    validation = [i for i in items if i.split == GATE_SPLIT]
    if validation:
        return validation, GATE_SPLIT, f"{len(validation)} validation items of {len(items)}"
    return list(items), "all", (f"no validation items among {len(items)}: gates use every split (the test split "
                                "is then not held out from promotion decisions)")


def select_items(
    questions: Sequence[EvalItem],
    locality: Sequence[EvalItem],
    new_facts: Iterable[Fact],
    earlier_facts: Sequence[Fact],
    *,
    max_earlier: int,
    max_locality: int,
    seed: str,
) -> CycleItems:
    """New facts: every recall/paraphrase item of each new fact, and apart every correction/confirmation item
    of them. Earlier facts: one item per fact in `earlier_facts` order (earlier cycles first), round after
    round, up to `max_earlier`. Locality: a deterministic sample of `max_locality`."""
    pool, split, note = gate_split(questions)
    by_fact: dict[Fact, list[EvalItem]] = defaultdict(list)
    claims: dict[Fact, list[EvalItem]] = defaultdict(list)
    for item in sorted(pool, key=lambda i: _rank(i, seed)):
        if item.kind in FACT_KINDS and item.person_id and item.slot:
            by_fact[(item.person_id, item.slot)].append(item)
        elif item.kind in CORRECTION_KINDS and item.person_id and item.slot:
            claims[(item.person_id, item.slot)].append(item)
    new = set(new_facts)
    new_items = [i for fact in sorted(new) for i in by_fact.get(fact, [])]
    correction_items = [i for fact in sorted(new) for i in claims.get(fact, [])]
    earlier: list[EvalItem] = []
    queue = [list(by_fact[f]) for f in dict.fromkeys(earlier_facts) if f not in new and by_fact.get(f)]
    while queue and len(earlier) < max_earlier:
        for items in queue:
            if items and len(earlier) < max_earlier:
                earlier.append(items.pop(0))
        queue = [q for q in queue if q]
    local = sorted(locality, key=lambda i: _rank(i, seed))[:max_locality]
    roles = {NEW: tuple(new_items), EARLIER: tuple(earlier), LOCALITY: tuple(local), CORRECTIONS: tuple(correction_items)}
    return CycleItems(roles, split, note)


def _rate(scores: Sequence[ItemScore]) -> float | None:
    counted = [s for s in scores if s.counted]
    return round(sum(s.passed for s in counted) / len(counted), 4) if counted else None


def metrics(items: CycleItems, scores: Sequence[ItemScore]) -> dict[str, Any]:
    """Pass rates per role (new_fact_recall, retention, locality, new_fact_correction) and how many items each
    rests on."""
    by_id = {s.item_id: s for s in scores}
    out: dict[str, Any] = {}
    for role, name in ROLE_METRICS:
        role_scores = [by_id[i.id] for i in items.by_role.get(role, ()) if i.id in by_id]
        out[name] = _rate(role_scores)
        out[f"{name}_items"] = sum(s.counted for s in role_scores)
    return out


def fact_rates(items: CycleItems, scores: Sequence[ItemScore]) -> dict[str, float]:
    """Pass rate per fact (`person/slot`) over the fact items: the unit of the retention curve."""
    by_id = {s.item_id: s for s in scores}
    groups: dict[str, list[bool]] = defaultdict(list)
    for item in items.all():
        score = by_id.get(item.id)
        if score is not None and score.counted and item.kind in FACT_KINDS and item.person_id and item.slot:
            groups[f"{item.person_id}/{item.slot}"].append(score.passed)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items())}


# --------------------------------------------------------------------------- retention over cycles


def read_json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fix or remove it") from exc


def record_retention(history: Mapping[str, Any], cycle: str, version: str | None, time: str,
                     facts: Mapping[str, float]) -> dict[str, Any]:
    """History with this cycle's per-fact scores of the model in service after it (one entry per cycle)."""
    cycles = [dict(c) for c in history.get("cycles", []) if c.get("cycle_key") != cycle]
    cycles.append({"cycle_key": cycle, "adapter_version": version or "base", "time": time, "facts": dict(facts)})
    cycles.sort(key=lambda c: c["cycle_key"])
    for index, entry in enumerate(cycles, start=1):
        entry["cycle"] = index
    return {"cycles": cycles}


def retention_curve(history: Mapping[str, Any]) -> dict[str, Any]:
    """Cohort curves (facts first scored in cycle k, at cycles k, k+1, ...) and backward transfer."""
    curve = retention(history)
    curve["cycle_keys"] = [c["cycle_key"] for c in history.get("cycles", [])]
    return curve


def retention_markdown(curve: Mapping[str, Any]) -> str:
    keys = curve.get("cycle_keys", [])
    if not curve.get("cohorts"):
        return "_no retention history yet_"
    rows = []
    for cohort in curve["cohorts"]:
        label = keys[cohort["cycle"] - 1] if cohort["cycle"] - 1 < len(keys) else str(cohort["cycle"])
        rows.append([f"facts of {label} ({cohort['facts']})",
                     *("" if v is None else f"{100 * v:.0f}%" for v in cohort["values"])])
    bwt = curve.get("bwt")
    return table(["cohort", *keys], rows) + (f"\n\nbackward transfer: {bwt:+.3f}" if bwt is not None else "")


# --------------------------------------------------------------------------- the report


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def report_markdown(report: Mapping[str, Any]) -> str:
    """The cycle report for people: what came in, what was kept, how both models did, what was decided."""
    decision = report.get("decision") or {}
    status = report.get("status", "running")
    lines = [f"# {report['cycle']} — {status}", "",
             f"time {report.get('time', '')}; dry run: {report.get('dry_run', False)}; "
             f"baseline: {report.get('baseline_version') or 'champion'}", ""]
    files = report.get("files", [])
    lines += ["## Inbox", table(["file", "sha256", "conversations"],
                                [[f["name"], f["sha256"][:12], f["conversations"]] for f in files]) if files else "_none_", ""]
    if report.get("rejected_files"):
        lines += ["Set aside: " + "; ".join(f"{r['file']} line {r.get('line')} field {r.get('field')}: {r['problem']}"
                                            for r in report["rejected_files"]), ""]
    if report.get("hippocampus"):
        h = report["hippocampus"]
        lines += ["## Hippocampus", f"decisions {h.get('counts')}; new people {h.get('new_people')}", ""]
        if h.get("table"):
            lines += [table(["action", "person", "slot", "value", "reason"], h["table"]), ""]
    if report.get("hard_case_values"):
        rows = [[pid, key, ", ".join(values)] for pid, keys in sorted(report["hard_case_values"].items())
                for key, values in sorted(keys.items())]
        trained = "trained as denials" if report.get("hard_cases") else "not trained (hard cases off)"
        lines += ["## Hard cases", f"Wrong values mined for people who list none, all but the last {trained}; the "
                  "last one is held out for the correction item:", table(["person", "slot", "wrong values"], rows), ""]
    if report.get("training"):
        t = report["training"]
        lines += ["## Challenger", f"version {t.get('version')} from {t.get('continued_from')}; {t.get('steps')} steps, "
                  f"loss {t.get('initial_loss')} -> {t.get('final_loss')}; training set {t.get('training_set')}", ""]
        if t.get("self_training"):
            seal = t["self_training"]
            lines += [f"Self-training: {seal['model']} answered {seal['questions']} new-fact questions "
                      f"{seal['samples']} times with the fact in context; {seal['passing_samples']} answers passed "
                      f"the scorer, {seal['examples']} kept as examples (total weight {seal['weight']}).", ""]
    if report.get("evaluation"):
        e = report["evaluation"]
        rows = [[name, _pct(e["champion"].get(name)), _pct(e["challenger"].get(name)),
                 e["challenger"].get(f"{name}_items")] for _, name in ROLE_METRICS]
        lines += ["## Evaluation (same items)", f"split: {e.get('split')} ({e.get('note')})",
                  table(["metric", f"champion {e.get('champion_version') or 'base'}", "challenger", "items"], rows), ""]
    if decision:
        lines += ["## Decision", f"**{'accepted' if decision.get('accepted') else 'rejected'}**"]
        lines += [f"- {r}" for r in decision.get("reasons", [])]
        lines += [""]
    if report.get("promoted_version") is not None or "champion_after" in report:
        lines += [f"champion after the cycle: {report.get('champion_after') or 'none'}"
                  f" (promoted: {report.get('promoted_version') or 'nothing'})", ""]
    if report.get("hedge"):
        lines += ["## Hedge routing", f"reward {report['hedge'].get('reward')}: "
                  f"{report['hedge'].get('before')} -> {report['hedge'].get('after')}", ""]
    if report.get("retention"):
        lines += ["## Retention across cycles", retention_markdown(report["retention"]), ""]
    if report.get("failure"):
        lines += ["## Failure", str(report["failure"]), ""]
    return "\n".join(lines)


def write_report(folder: Path, report: Mapping[str, Any]) -> Path:
    write_json_atomic(folder / REPORT_JSON, report)
    write_text_atomic(folder / REPORT_MD, report_markdown(report))
    return folder / REPORT_JSON


def update_report(folder: Path, **fields: Any) -> dict[str, Any]:
    report = {**read_json(folder / REPORT_JSON, {"cycle": folder.name}), **fields}
    write_report(folder, report)
    return report
