"""Leaderboard rows, retention history and the static leaderboard page (inline SVG, no network assets).

A *run* is what `benchmark_scores` produces for one adapter version: per-system summaries (``adapter``,
``base``, ``retrieval``; see `scoring.summarize`), external suite results and the retention history. Rows are
one per model x adapter version x benchmark; the base model's rows carry ``adapter_version = "base"``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sleeptrain_assets.lib import stats
from sleeptrain_assets.lib.atomic import write_json_atomic, write_text_atomic
from sleeptrain_assets.lib.markdown import table

BENCHMARK = "sleeptrain-people"
HEADLINE_KINDS = ("recall", "paraphrase", "multi_turn", "correction", "locality")
TABLE_KINDS = ("recall", "paraphrase", "multi_turn", "correction", "confirmation", "identity", "locality",
               "unchanged", "neighbourhood", "interference", "hallucination")
KIND_LABELS = {
    "recall": "Recall",
    "paraphrase": "Paraphrase",
    "multi_turn": "Multi-turn",
    "correction": "Correction",
    "confirmation": "True-claim control",
    "identity": "Identity",
    "locality": "Locality",
    "unchanged": "Unchanged answers",
    "neighbourhood": "Neighbourhood",
    "interference": "No interference",
    "hallucination": "No hallucination",
}
SYSTEMS = (("adapter", "Adapter (weights)", "#4f46e5"), ("base", "Base model", "#94a3b8"),
           ("retrieval", "Base + retrieval", "#f59e0b"))
COHORT_COLORS = ("#0ea5e9", "#10b981", "#f43f5e", "#a855f7", "#84cc16", "#f97316", "#14b8a6", "#e11d48")


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    goal: float
    source: str  # where the value comes from (documented on the page)


# The open targets of the issue tracker ("Learn the facts without changing anything else"), all on the test split.
TARGETS = (
    Target("recall", "Held-out recall", 0.95, "adapter, fictional people, test split"),
    Target("paraphrase", "Paraphrase recall", 0.90, "adapter, fictional people, test split"),
    Target("correction_both", "Correction (both halves)", 0.85,
           "adapter, fictional people, test split: mean of denying wrong claims and confirming true ones"),
    Target("multi_turn", "Multi-turn", 0.85, "adapter, fictional people, test split"),
    Target("locality", "Locality", 0.95, "adapter, general questions the base model gets right, test split"),
    Target("unchanged", "Unchanged answers", 0.90, "adapter vs base model, general and open prompts, test split"),
    Target("neighbourhood", "Neighbourhood", 0.90, "adapter, people never taught that the base model knows, test split"),
    Target("retrieval_ratio", "Adapter ÷ retrieval recall", 1.20, "held-out recall, fictional people, test split"),
)
# Kinds measured over every item rather than over fictional people (they are about nobody who was taught).
ALL_ITEM_KINDS = ("locality", "unchanged", "neighbourhood", "hallucination")


# --------------------------------------------------------------------------- files


def read_json(path: Path, default: Any) -> Any:
    """The file's JSON, or `default` when it does not exist; a corrupt file fails naming it."""
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: is not valid JSON ({exc}); move it aside to start a new one") from exc


# --------------------------------------------------------------------------- targets and rows


def _entry(summary: Mapping[str, Any] | None, section: str, kind: str) -> dict[str, Any]:
    return dict(((summary or {}).get(section) or {}).get(kind) or {})


def _rate(summary: Mapping[str, Any] | None, section: str, kind: str) -> tuple[float | None, int]:
    entry = _entry(summary, section, kind)
    return entry.get("rate"), int(entry.get("count") or 0)


def with_interval(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The rate entry with `n`, `ci_low` and `ci_high` (95% Wilson) filled in from `passed` and `count`."""
    out = dict(entry)
    n = int(out.get("n", out.get("count")) or 0)
    interval = stats.wilson_interval(int(out.get("passed") or 0), n) if n else None
    out["n"] = n
    out.setdefault("ci_low", None if interval is None else round(interval[0], 4))
    out.setdefault("ci_high", None if interval is None else round(interval[1], 4))
    return out


def correction_both(summary: Mapping[str, Any] | None, section: str) -> dict[str, Any]:
    """Mean of the correction rate and the true-claim control rate (both halves must be good); n is the sum."""
    corr, conf = with_interval(_entry(summary, section, "correction")), with_interval(_entry(summary, section, "confirmation"))
    if corr.get("rate") is None or conf.get("rate") is None:
        return {"rate": None, "n": 0, "count": 0, "passed": 0, "ci_low": None, "ci_high": None}
    # The interval of a mean of two independent proportions: each half's Wilson interval, averaged.
    return {"rate": round((corr["rate"] + conf["rate"]) / 2, 4), "passed": corr["passed"] + conf["passed"],
            "count": corr["n"] + conf["n"], "n": corr["n"] + conf["n"],
            "ci_low": round((corr["ci_low"] + conf["ci_low"]) / 2, 4),
            "ci_high": round((corr["ci_high"] + conf["ci_high"]) / 2, 4),
            "halves": {"correction": corr, "confirmation": conf}}


def _fmt_ci(entry: Mapping[str, Any]) -> str:
    if entry.get("ci_low") is None:
        return "n=0"
    return f"n={entry['n']}, 95% CI {_pct(entry['ci_low'], 0)}–{_pct(entry['ci_high'], 0)}"


def evaluate_targets(systems: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each target with its measured value, n, 95% interval and verdict; nothing measured counts as not met.

    `met` only when the rate is at or above the goal; "not yet sure" when the interval still straddles it.
    """
    adapter, retrieval = systems.get("adapter"), systems.get("retrieval")
    out = []
    for target in TARGETS:
        if target.name == "retrieval_ratio":
            ours = with_interval(_entry(adapter, "fictional_by_kind", "recall"))
            theirs = with_interval(_entry(retrieval, "fictional_by_kind", "recall"))
            value = None if ours.get("rate") is None or not theirs.get("rate") else ours["rate"] / theirs["rate"]
            entry = {"rate": value, "n": ours["n"], "ci_low": None, "ci_high": None}
            detail = f"{_pct(ours.get('rate'))} vs {_pct(theirs.get('rate'))}, n={ours['n']} each"
            verdict = stats.target_verdict({"rate": value, "ci_low": value, "ci_high": value}, target.goal)
        else:
            if target.name == "correction_both":
                entry = correction_both(adapter, "fictional_by_kind")
            else:
                section = "by_kind" if target.name in ALL_ITEM_KINDS else "fictional_by_kind"
                entry = with_interval(_entry(adapter, section, target.name))
            value = entry.get("rate")
            detail = _fmt_ci(entry)
            verdict = stats.target_verdict(entry, target.goal)
        out.append({"name": target.name, "label": target.label, "goal": target.goal,
                    "value": None if value is None else round(value, 4), "met": verdict.startswith("met"),
                    "verdict": verdict, "count": int(entry.get("n") or 0), "ci_low": entry.get("ci_low"),
                    "ci_high": entry.get("ci_high"), "detail": detail, "source": target.source})
    return out


def _headline(metrics: Mapping[str, float | None]) -> float | None:
    values = [metrics[k] for k in HEADLINE_KINDS if metrics.get(k) is not None]
    return round(sum(values) / len(values), 4) if values else None


def rows_from_run(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Leaderboard rows for one run: the adapter and the base model on the people benchmark (each with the
    retrieval baseline's rates on the same items), then one row per external suite and system."""
    systems = run["systems"]
    retrieval = systems.get("retrieval") or {}
    retrieval_metrics = {k: _rate(retrieval, "by_kind", k)[0] for k in TABLE_KINDS}
    rows = []
    for system, version in (("adapter", run["adapter_version"]), ("base", "base")):
        summary = systems.get(system)
        if not summary:
            continue
        metrics = {k: _rate(summary, "by_kind", k)[0] for k in TABLE_KINDS}
        counts = {k: _rate(summary, "by_kind", k)[1] for k in TABLE_KINDS}
        intervals = {k: [e["ci_low"], e["ci_high"]] for k in TABLE_KINDS
                     if (e := with_interval(_entry(summary, "by_kind", k)))["n"]}
        recall, theirs = _rate(summary, "fictional_by_kind", "recall")[0], _rate(retrieval, "fictional_by_kind", "recall")[0]
        notes = [f"retrieval = base + top-{run.get('retrieval_top_k', '?')} memories"]
        if system == "base":
            notes.append("locality: the reference (100% by construction)")
        if run.get("profile"):
            notes.append(f"profile {run['profile']}")
        rows.append({
            "model": run["model"],
            "adapter_version": version,
            "system": system,
            "benchmark": BENCHMARK,
            "score": _headline(metrics),
            "count": sum(counts.values()),
            "metrics": metrics,
            "counts": counts,
            "intervals": intervals,
            "split": "test",
            "fictional": {k: _rate(summary, "fictional_by_kind", k)[0] for k in TABLE_KINDS},
            "categories": {k: v.get("rate") for k, v in (summary.get("by_category") or {}).items()},
            "retrieval": retrieval_metrics,
            "retrieval_ratio": None if recall is None or not theirs else round(recall / theirs, 4),
            "notes": "; ".join(notes),
            "time": run["time"],
            "cycle": run.get("cycle"),
        })
    for result in run.get("external", []):
        version = run["adapter_version"] if result["system"] == "adapter" else "base"
        rows.append({
            "model": run["model"],
            "adapter_version": version,
            "system": result["system"],
            "benchmark": result["benchmark"],
            "score": result["avg_score"],
            "count": result["count"],
            "metrics": {},
            "counts": {},
            "notes": f"metric {result.get('metric', '?')}; {Path(result.get('path', '')).name}",
            "time": run["time"],
            "cycle": run.get("cycle"),
        })
    return rows


def merge_rows(existing: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Newer rows replace older ones with the same model, adapter version and benchmark."""
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in [*existing, *new]:
        merged[(row["model"], row["adapter_version"], row["benchmark"])] = dict(row)
    return sorted(merged.values(), key=lambda r: (r["benchmark"] != BENCHMARK, r["benchmark"], -_epoch(r["time"]),
                                                    r["adapter_version"] == "base"))


def _epoch(time: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(time.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return 0.0


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ["Model", "Adapter", "Benchmark", "Score", "Recall", "Paraphrase", "Multi-turn", "Correction",
              "Locality", "Retrieval recall", "Count"]
    cells = []
    for row in rows:
        m, r = row.get("metrics") or {}, row.get("retrieval") or {}
        cells.append([row["model"], row["adapter_version"], row["benchmark"], _pct(row.get("score")),
                      *(_pct(m.get(k)) for k in ("recall", "paraphrase", "multi_turn", "correction", "locality")),
                      _pct(r.get("recall")), str(row.get("count", ""))])
    return table(header, cells)


# --------------------------------------------------------------------------- retention


def record_cycle(history: Mapping[str, Any], adapter_version: str, time: str, facts: Mapping[str, float],
                 kinds: Mapping[str, float | None]) -> dict[str, Any]:
    """History with this version's per-fact scores; re-evaluating a version replaces its entry in place."""
    cycles = [dict(c) for c in history.get("cycles", [])]
    entry = {"adapter_version": adapter_version, "time": time, "facts": dict(facts), "kinds": dict(kinds)}
    for index, cycle in enumerate(cycles):
        if cycle["adapter_version"] == adapter_version:
            cycles[index] = {"cycle": cycle["cycle"], **entry}
            break
    else:
        cycles.append({"cycle": len(cycles) + 1, **entry})
    return {"cycles": cycles}


def retention(history: Mapping[str, Any]) -> dict[str, Any]:
    """Score per cohort (facts first evaluated in cycle c) at every later cycle, and backward transfer.

    BWT = mean over earlier cohorts c of (score at the last cycle - score at cycle c), as in TRACE; negative
    means later cycles erased earlier facts. None until there are two cycles.
    """
    cycles = history.get("cycles", [])
    first_seen: dict[str, int] = {}
    for index, cycle in enumerate(cycles):
        for fact in cycle.get("facts", {}):
            first_seen.setdefault(fact, index)
    cohorts = []
    for c in range(len(cycles)):
        members = [f for f, i in first_seen.items() if i == c]
        if not members:
            continue
        values = []
        for k, cycle in enumerate(cycles):
            scores = [cycle["facts"][f] for f in members if f in cycle.get("facts", {})]
            values.append(round(sum(scores) / len(scores), 4) if k >= c and scores else None)
        cohorts.append({"cycle": c + 1, "facts": len(members), "values": values})
    overall = []
    for cycle in cycles:
        scores = list(cycle.get("facts", {}).values())
        overall.append(round(sum(scores) / len(scores), 4) if scores else None)
    last = len(cycles) - 1
    deltas = [co["values"][last] - co["values"][co["cycle"] - 1] for co in cohorts
              if co["cycle"] - 1 < last and co["values"][last] is not None and co["values"][co["cycle"] - 1] is not None]
    return {
        "versions": [c["adapter_version"] for c in cycles],
        "times": [c["time"] for c in cycles],
        "overall": overall,
        "cohorts": cohorts,
        "bwt": round(sum(deltas) / len(deltas), 4) if deltas else None,
    }


# --------------------------------------------------------------------------- HTML


def _pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _short_time(time: str) -> str:
    return time.replace("T", " ")[:16] + " UTC" if time else ""


def _svg_bars(groups: Sequence[tuple[str, Mapping[str, float | None]]], series: Sequence[tuple[str, str, str]],
              goals: Mapping[str, float] | None = None, width: int = 1100, height: int = 300) -> str:
    """Vertical grouped bars, 0-100%, one group per label, one bar per series; dashed ticks mark goals."""
    goals = goals or {}
    left, right, top, bottom = 44, 10, 14, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    group_w = plot_w / max(len(groups), 1)
    bar_w = min(34.0, group_w * 0.78 / max(len(series), 1))
    parts = [f'<svg viewBox="0 0 {width} {height}" role="img" class="chart" xmlns="http://www.w3.org/2000/svg">']
    for tick in range(0, 101, 25):
        y = top + plot_h * (1 - tick / 100)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" class="axis" text-anchor="end">{tick}%</text>')
    for g, (label, values) in enumerate(groups):
        x0 = left + g * group_w + (group_w - bar_w * len(series)) / 2
        for s, (key, name, color) in enumerate(series):
            value = values.get(key)
            x = x0 + s * bar_w
            if value is None:
                parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h - 4:.1f}" class="na" '
                             f'text-anchor="middle">n/a</text>')
                continue
            h = max(plot_h * value, 1.5)
            y = top + plot_h - h
            parts.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" rx="2" '
                         f'fill="{color}"><title>{_e(name)} · {_e(label)}: {_pct(value)}</title></rect>')
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{y - 4:.1f}" class="val" text-anchor="middle">'
                         f'{100 * value:.0f}</text>')
        goal = goals.get(label)
        if goal is not None:
            y = top + plot_h * (1 - goal)
            gx0, gx1 = left + g * group_w + 4, left + (g + 1) * group_w - 4
            parts.append(f'<line x1="{gx0:.1f}" x2="{gx1:.1f}" y1="{y:.1f}" y2="{y:.1f}" class="goal">'
                         f'<title>target {_pct(goal, 0)}</title></line>')
        parts.append(f'<text x="{left + (g + 0.5) * group_w:.1f}" y="{height - bottom + 18}" class="label" '
                     f'text-anchor="middle">{_e(label)}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" class="baseline"/>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_pairs(rows: Sequence[tuple[str, Mapping[str, tuple[float | None, int]]]], series: Sequence[tuple[str, str, str]],
               width: int = 540) -> str:
    """Horizontal paired bars per label (0-100%), value and n at the bar end."""
    label_w, right, row_h, bar_h, top = 130, 70, 8 + 13 * len(series), 11, 8
    height = top + row_h * len(rows) + 22
    plot_w = width - label_w - right
    parts = [f'<svg viewBox="0 0 {width} {height}" role="img" class="chart" xmlns="http://www.w3.org/2000/svg">']
    for tick in range(0, 101, 25):
        x = label_w + plot_w * tick / 100
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 4}" y2="{height - 18}" class="grid"/>'
                     f'<text x="{x:.1f}" y="{height - 5}" class="axis" text-anchor="middle">{tick}%</text>')
    for r, (label, values) in enumerate(rows):
        y0 = top + r * row_h
        parts.append(f'<text x="{label_w - 8}" y="{y0 + row_h / 2 + 2:.1f}" class="label" text-anchor="end">'
                     f'{_e(_clip(label, 18))}<title>{_e(label)}</title></text>')
        for s, (key, name, color) in enumerate(series):
            value, n = values.get(key, (None, 0))
            y = y0 + 3 + s * 13
            if value is None:
                parts.append(f'<text x="{label_w + 4}" y="{y + 9}" class="na">n/a</text>')
                continue
            w = max(plot_w * value, 1.5)
            parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" rx="2" fill="{color}">'
                         f'<title>{_e(name)} · {_e(label)}: {_pct(value)} of {n}</title></rect>'
                         f'<text x="{label_w + w + 5:.1f}" y="{y + 9.5}" class="val">{100 * value:.0f}% '
                         f'<tspan class="n">n={n}</tspan></text>')
    parts.append("</svg>")
    return "".join(parts)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _svg_retention(ret: Mapping[str, Any], width: int = 540, height: int = 300) -> str:
    """Score over cycles: all evaluated facts (thick) and each cohort of facts from the cycle it was learned."""
    versions = ret.get("versions") or []
    left, right, top, bottom = 44, 16, 14, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    n = len(versions)
    pad = 40  # keeps the first and last cycle's labels inside the frame

    def x(i: int) -> float:
        return left + (plot_w / 2 if n <= 1 else pad + (plot_w - 2 * pad) * i / (n - 1))

    def y(v: float) -> float:
        return top + plot_h * (1 - v)

    parts = [f'<svg viewBox="0 0 {width} {height}" role="img" class="chart" xmlns="http://www.w3.org/2000/svg">']
    for tick in range(0, 101, 25):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(tick / 100):.1f}" y2="{y(tick / 100):.1f}" '
                     f'class="grid"/><text x="{left - 6}" y="{y(tick / 100) + 4:.1f}" class="axis" '
                     f'text-anchor="end">{tick}%</text>')
    step = max(1, math.ceil(n / 8))
    for i, version in enumerate(versions):
        if i % step == 0 or i == n - 1:
            parts.append(f'<text x="{x(i):.1f}" y="{top + plot_h + 16}" class="axis" text-anchor="middle">'
                         f'cycle {i + 1}</text><text x="{x(i):.1f}" y="{top + plot_h + 29}" class="axis small" '
                         f'text-anchor="middle">{_e(_clip(str(version), 16))}</text>')

    def line(values: Sequence[float | None], color: str, stroke: float, label: str, labelled: bool = False) -> None:
        points = [(x(i), y(v), v) for i, v in enumerate(values) if v is not None]
        if len(points) > 1:
            path = " ".join(f"{'M' if k == 0 else 'L'}{px:.1f},{py:.1f}" for k, (px, py, _) in enumerate(points))
            parts.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="{stroke}" '
                         f'stroke-linejoin="round"/>')
        for px, py, v in points:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="{stroke + 1.5}" fill="{color}">'
                         f'<title>{_e(label)}: {_pct(v)}</title></circle>')
            if labelled:
                parts.append(f'<text x="{px:.1f}" y="{py - 9:.1f}" class="val" text-anchor="middle">{_pct(v, 0)}</text>')

    cohorts = ret.get("cohorts") or []
    if len(cohorts) > 1:
        for k, cohort in enumerate(cohorts):
            color = COHORT_COLORS[k % len(COHORT_COLORS)]
            line(cohort["values"], color, 1.6, f"facts learned in cycle {cohort['cycle']}")
    line(ret.get("overall") or [], "#4f46e5", 3.0, "all evaluated facts", labelled=True)
    if n == 0:
        parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" class="na" text-anchor="middle">'
                     f'no cycles recorded yet</text>')
    parts.append("</svg>")
    return "".join(parts)


def _retention_legend(ret: Mapping[str, Any]) -> str:
    cohorts = ret.get("cohorts") or []
    series = [("all", "all evaluated facts", "#4f46e5")]
    if len(cohorts) > 1:
        series += [(str(c["cycle"]), f"learned in cycle {c['cycle']}", COHORT_COLORS[k % len(COHORT_COLORS)])
                   for k, c in enumerate(cohorts)]
    return _legend(series)


def _cycle_retention_html(curve: Mapping[str, Any] | None) -> str:
    """The sleep cycles' retention curve: each cycle's facts re-scored on the model in service after every cycle."""
    if not curve or not curve.get("versions"):
        return ""
    keys = curve.get("cycle_keys") or []
    bwt = curve.get("bwt")
    return "".join([
        '<section class="panel"><h2>Retention over sleep cycles</h2>',
        '<p class="hint">After every sleep cycle the model in service (the promoted challenger, or the champion it '
        "kept) is scored on the facts of every earlier cycle (validation forms): one line per cycle's facts. "
        f"Cycles: {_e(', '.join(keys))}.</p>",
        _retention_legend(curve),
        _svg_retention(curve),
        f'<p class="stat">Backward transfer (BWT): <b>{"—" if bwt is None else f"{100 * bwt:+.1f} pts"}</b></p>',
        "</section>",
    ])


def refresh_page(json_path: Path, html_path: Path, cycle_retention: Mapping[str, Any] | None) -> None:
    """Re-render the page from leaderboard.json (rows and latest run) with the sleep cycles' retention curve."""
    data = read_json(json_path, {"rows": []})
    latest = data.get("latest_run")
    page = render_html(data.get("rows", []), latest, (latest or {}).get("retention"), cycle_retention=cycle_retention)
    write_text_atomic(html_path, page)


def _person_fact_rates(summary: Mapping[str, Any] | None) -> dict[str, tuple[float | None, int]]:
    totals: dict[str, list[int]] = {}
    for key, entry in ((summary or {}).get("by_person_kind") or {}).items():
        person, _, kind = key.rpartition("/")
        if kind in ("recall", "paraphrase"):
            acc = totals.setdefault(person, [0, 0])
            acc[0] += int(entry["passed"])
            acc[1] += int(entry["count"])
    return {p: ((a / c) if c else None, c) for p, (a, c) in sorted(totals.items())}


CSS = """
:root{--adapter:#4f46e5;--base:#94a3b8;--retrieval:#f59e0b;--ok:#15803d;--bad:#b91c1c;--ink:#0f172a;
--muted:#64748b;--line:#e2e8f0;--bg:#f5f7fb}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--ink);background:var(--bg)}
main{max-width:1260px;margin:0 auto;padding:28px 20px 40px}
h1{font-size:26px;margin:0 0 2px;letter-spacing:-.01em}
h2{font-size:16px;margin:0 0 2px}
.sub,.hint{color:var(--muted)}
.hint{font-size:12.5px;margin:0 0 10px}
.banner{border-radius:10px;padding:12px 16px;margin:18px 0 14px;border:1px solid}
.banner.bad{background:#fef2f2;border-color:#fecaca;color:#7f1d1d}
.banner.ok{background:#f0fdf4;border-color:#bbf7d0;color:#14532d}
.banner b{font-weight:650}
.cards{display:grid;grid-template-columns:repeat(5,1fr);gap:12px}
.card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:10px 14px 12px;
border-top:4px solid var(--ok)}
.card.miss{border-top-color:var(--bad)}
.card .k{font-size:12.5px;color:var(--muted)}
.card .v{font-size:28px;font-weight:650;font-variant-numeric:tabular-nums;line-height:1.25}
.card.miss .v{color:var(--bad)}
.card .t{font-size:12px;color:var(--muted)}
.panel{background:#fff;border:1px solid var(--line);border-radius:12px;padding:14px 18px 12px;margin-top:16px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.grid2 .panel{margin-top:16px}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;font-size:12.5px;color:var(--muted);margin:0 0 6px}
.legend i{display:inline-block;width:11px;height:11px;border-radius:3px;margin-right:6px;vertical-align:-1px}
.chart{width:100%;height:auto;display:block}
.chart .grid{stroke:#eef2f7}
.chart .baseline{stroke:#cbd5e1}
.chart .goal{stroke:#dc2626;stroke-width:2;stroke-dasharray:5 3}
.chart text{font-family:inherit}
.chart .axis{font-size:11px;fill:#64748b}
.chart .axis.small{font-size:10px;fill:#94a3b8}
.chart .label{font-size:12px;fill:#334155}
.chart .val{font-size:10.5px;fill:#334155;font-variant-numeric:tabular-nums}
.chart .n{fill:#94a3b8}
.chart .na{font-size:10px;fill:#94a3b8}
.stat{font-size:13px;color:#334155;margin:6px 0 0}
.tablewrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th{background:#f1f5f9;text-align:left;cursor:pointer;padding:7px 5px;font-size:12px;vertical-align:bottom;line-height:1.2;border-bottom:1px solid var(--line);
user-select:none;font-weight:600;color:#334155}
th:hover{background:#e2e8f0}
th[aria-sort=ascending]::after{content:" ▲";font-size:10px}
th[aria-sort=descending]::after{content:" ▼";font-size:10px}
td{padding:6px 5px;border-bottom:1px solid var(--line);white-space:nowrap}
tr:hover td{background:#fafbff}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.pct{background-repeat:no-repeat;background-size:calc(var(--w) * 1%) 5px;background-position:left bottom 3px;
background-image:linear-gradient(var(--c),var(--c))}
td.notes{white-space:normal;color:var(--muted);min-width:120px;max-width:200px;font-size:11px;line-height:1.25}
td.notes div{overflow-wrap:anywhere;display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;overflow:hidden}
th.num{text-align:right}
.pill{display:inline-block;padding:1px 8px;border-radius:999px;font-size:11.5px;background:#eef2ff;color:#3730a3}
.pill.base{background:#f1f5f9;color:#475569}
.pill.ext{background:#fff7ed;color:#9a3412}
.method{font-size:12.5px;color:#334155;margin:0;padding-left:18px}
.method li{margin:2px 0}
footer{margin-top:18px;font-size:12px;color:var(--muted)}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(table){
  var heads = table.querySelectorAll('th');
  heads.forEach(function(th, col){
    th.addEventListener('click', function(){
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      heads.forEach(function(h){ h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var numeric = th.dataset.type === 'num';
      rows.sort(function(a, b){
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        if (numeric) { x = x === '' ? -Infinity : parseFloat(x); y = y === '' ? -Infinity : parseFloat(y);
          return asc ? x - y : y - x; }
        return asc ? String(x).localeCompare(String(y)) : String(y).localeCompare(String(x));
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
});
"""


def _legend(series: Sequence[tuple[str, str, str]]) -> str:
    return '<div class="legend">' + "".join(f'<span><i style="background:{c}"></i>{_e(n)}</span>' for _, n, c in series) + "</div>"


def _cell_pct(value: float | None, color: str = "rgba(79,70,229,.55)", count: int | None = None,
              interval: Sequence[float] | None = None) -> str:
    if value is None:
        return '<td class="num" data-v="">—</td>'
    title = _pct(value) + (f" of {count} items" if count else "")
    if interval and interval[0] is not None:
        title += f", 95% CI {_pct(interval[0], 0)}–{_pct(interval[1], 0)}"
    return (f'<td class="num pct" data-v="{value:.6f}" style="--w:{100 * value:.1f};--c:{color}" title="{title}">'
            f'{_pct(value, 0)}</td>')


SHORT_LABELS = {**KIND_LABELS, "interference": "No interf.", "hallucination": "No halluc."}


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    several_models = len({r["model"] for r in rows}) > 1
    cols = [("Model", "text")] if several_models else []
    cols += [("Adapter", "text"), ("Benchmark", "text"), ("Score", "num")]
    cols += [(SHORT_LABELS[k], "num") for k in TABLE_KINDS]
    cols += [("Retrieval recall", "num"), ("÷ retrieval", "num"), ("Items", "num"), ("Time", "text"),
             ("Notes", "text")]
    titles = {"÷ retrieval": "adapter recall divided by retrieval recall (fictional people)",
              "Retrieval recall": "base model + top-k memories, same items"}
    out = ['<div class="tablewrap"><table class="sortable"><thead><tr>']
    out += [f'<th data-type="{t}" class="{t}" title="{_e(titles.get(n, n))}">{_e(n)}</th>' for n, t in cols]
    out.append("</tr></thead><tbody>")
    for row in rows:
        metrics, retrieval = row.get("metrics") or {}, row.get("retrieval") or {}
        people = row["benchmark"] == BENCHMARK
        pill = "pill" if row["adapter_version"] != "base" else "pill base"
        bench_pill = "" if people else ' class="pill ext"'
        ratio = row.get("retrieval_ratio")
        cells = [f'<td data-v="{_e(row["model"])}">{_e(_clip(row["model"], 28))}</td>'] if several_models else []
        cells += [
            f'<td data-v="{_e(row["adapter_version"])}"><span class="{pill}">{_e(row["adapter_version"])}</span></td>',
            f'<td data-v="{_e(row["benchmark"])}"><span{bench_pill}>{_e(row["benchmark"])}</span></td>',
            _cell_pct(row.get("score"), "rgba(15,23,42,.45)"),
            *(_cell_pct(metrics.get(k), count=(row.get("counts") or {}).get(k),
                        interval=(row.get("intervals") or {}).get(k)) if people
              else '<td class="num" data-v="">—</td>' for k in TABLE_KINDS),
            _cell_pct(retrieval.get("recall"), "rgba(245,158,11,.7)") if people else '<td class="num" data-v="">—</td>',
            (f'<td class="num" data-v="{ratio:.6f}">{ratio:.2f}×</td>' if ratio is not None
             else '<td class="num" data-v="">—</td>'),
            f'<td class="num" data-v="{int(row.get("count") or 0)}">{int(row.get("count") or 0)}</td>',
            f'<td data-v="{_e(row.get("time", ""))}">{_e(_short_time(row.get("time", ""))[5:16])}</td>',
            f'<td class="notes" data-v="{_e(row.get("notes", ""))}" title="{_e(row.get("notes", ""))}">'
            f'<div>{_e(row.get("notes", ""))}</div></td>',
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _targets_html(targets: Sequence[Mapping[str, Any]]) -> str:
    missed = [t for t in targets if not t["met"]]
    unsure = [t for t in targets if t["met"] and "not yet sure" in t.get("verdict", "")]
    if missed:
        parts = [f"{_e(t['label'])} {_e(_fmt_target(t, t['value']))} (target ≥ {_e(_fmt_target(t, t['goal']))})"
                 for t in missed]
        banner = (f'<div class="banner bad"><b>Targets not met ({len(missed)} of {len(targets)}):</b> '
                  + "; ".join(parts) + ".</div>")
    else:
        banner = '<div class="banner ok"><b>All targets met</b> for the current adapter.</div>'
    if unsure:
        banner += ('<div class="banner bad"><b>Met, not yet sure:</b> '
                   + "; ".join(f"{_e(t['label'])} ({_e(t['detail'])})" for t in unsure)
                   + ": the 95% interval still reaches below the target.</div>")
    cards = []
    for t in targets:
        cards.append(
            f'<div class="card{"" if t["met"] else " miss"}"><div class="k">{_e(t["label"])}</div>'
            f'<div class="v">{_e(_fmt_target(t, t["value"]))}</div>'
            f'<div class="t">target ≥ {_e(_fmt_target(t, t["goal"]))} · {_e(t.get("verdict", ""))}</div>'
            f'<div class="t">{_e(t["detail"])}</div>'
            f'<div class="t">{_e(t["source"])}</div></div>'
        )
    return banner + '<div class="cards">' + "".join(cards) + "</div>"


def _breakdown_html(title: str, hint: str, breakdown: Mapping[str, Mapping[str, Mapping[str, Any]]],
                    key_label: str) -> str:
    """A sortable table: one row per key (slot or person), one column per system, rate with n and interval."""
    names = [(key, label) for key, label, _ in SYSTEMS if key in breakdown]
    keys = sorted({k for per_system in breakdown.values() for k in per_system})
    if not keys:
        return ""
    out = [f'<section class="panel"><h2>{_e(title)}</h2><p class="hint">{_e(hint)}</p>',
           '<div class="tablewrap"><table class="sortable"><thead><tr>',
           f'<th data-type="text" class="text">{_e(key_label)}</th>']
    out += [f'<th data-type="num" class="num">{_e(label)}</th>' for _, label in names]
    out.append('<th data-type="num" class="num">n</th></tr></thead><tbody>')
    for key in keys:
        cells = [f'<td data-v="{_e(key)}">{_e(key)}</td>']
        n = 0
        for system, _ in names:
            entry = with_interval(breakdown[system].get(key) or {})
            n = max(n, entry["n"])
            cells.append(_cell_pct(entry.get("rate"), count=entry["n"], interval=(entry["ci_low"], entry["ci_high"])))
        cells.append(f'<td class="num" data-v="{n}">{n}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div></section>")
    return "".join(out)


def _validation_html(systems: Mapping[str, Mapping[str, Any]]) -> str:
    names = [(key, label) for key, label, _ in SYSTEMS if (systems.get(key) or {}).get("validation")]
    if not names:
        return ""
    rows = []
    for kind in TABLE_KINDS:
        entries = {s: with_interval(_entry(systems[s]["validation"], "by_kind", kind)) for s, _ in names}
        if not any(e["n"] for e in entries.values()):
            continue
        rows.append([KIND_LABELS[kind]] + [f"{_pct(e.get('rate'))} ({_fmt_ci(e)})" if e["n"] else "—"
                                           for e in entries.values()])
    head = "".join(f"<th>{_e(label)}</th>" for _, label in names)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return ('<section class="panel"><h2>Validation split</h2><p class="hint">Question forms used to choose '
            'defaults, stop training and gate promotions; never the figures above, which are test forms only.</p>'
            f'<div class="tablewrap"><table><thead><tr><th>Kind</th>{head}</tr></thead><tbody>{body}</tbody></table>'
            '</div></section>')


def _fmt_target(target: Mapping[str, Any], value: float | None) -> str:
    if value is None:
        return "not measured"
    whole = abs(100 * value - round(100 * value)) < 1e-9
    return f"{value:.2f}×" if target["name"] == "retrieval_ratio" else _pct(value, 0 if whole else 1)


def render_html(rows: Sequence[Mapping[str, Any]], latest: Mapping[str, Any] | None, retention_data: Mapping[str, Any] | None,
                title: str = "SleepTrain leaderboard", cycle_retention: Mapping[str, Any] | None = None) -> str:
    """The whole page as one string: targets, category bars, weights vs retrieval, retention, the table."""
    latest = latest or {}
    systems = latest.get("systems") or {}
    targets = latest.get("targets") or evaluate_targets(systems)
    ret = retention_data or {}
    kinds = [k for k in TABLE_KINDS if any(_rate(systems.get(s), "by_kind", k)[1] for s, _, _ in SYSTEMS)]
    groups = [(KIND_LABELS[k], {s: _rate(systems.get(s), "by_kind", k)[0] for s, _, _ in SYSTEMS}) for k in kinds]
    goals = {KIND_LABELS[t.name]: t.goal for t in TARGETS if t.name in KIND_LABELS}
    pairs_series = [s for s in SYSTEMS if s[0] in ("adapter", "retrieval")]
    adapter_people = _person_fact_rates(systems.get("adapter"))
    retrieval_people = _person_fact_rates(systems.get("retrieval"))
    people = sorted(set(adapter_people) | set(retrieval_people))
    pair_rows = [(p, {"adapter": adapter_people.get(p, (None, 0)), "retrieval": retrieval_people.get(p, (None, 0))})
                 for p in people]
    external = [r for r in rows if r["benchmark"] != BENCHMARK and r.get("time") == latest.get("time")]
    ext_names = sorted({r["benchmark"] for r in external})
    ext_groups = [(name, {r["system"]: r["score"] for r in external if r["benchmark"] == name}) for name in ext_names]
    bwt = ret.get("bwt")
    n_cycles = len(ret.get("versions") or [])
    version = latest.get("adapter_version", "—")

    body = [
        "<header>",
        f"<h1>{_e(title)}</h1>",
        f'<div class="sub">Model <b>{_e(latest.get("model", "—"))}</b> · adapter <b>{_e(version)}</b>'
        f' · profile {_e(latest.get("profile", "—"))} · evaluated {_e(_short_time(latest.get("time", "")))}'
        f' · greedy decoding, held-out questions only · figures: test split, 95% Wilson intervals on hover</div>',
        "</header>",
        _targets_html(targets) if systems else '<div class="banner bad"><b>No evaluation yet.</b></div>',
        '<section class="panel"><h2>Scores by category</h2>',
        '<p class="hint">Pass rate on the same held-out items for the trained adapter, the base model and the base '
        'model with the top-k memories in its prompt. Dashed red ticks: targets (measured on fictional people).</p>',
        _legend(SYSTEMS),
        _svg_bars(groups, SYSTEMS, goals) if groups else '<p class="hint">No scored items.</p>',
        "</section>",
        '<div class="grid2">',
        '<section class="panel"><h2>Weights vs retrieval, per person</h2>',
        '<p class="hint">Held-out recall + paraphrase per taught person: what the weights learned next to what '
        'retrieval finds.</p>',
        _legend(pairs_series),
        _svg_pairs(pair_rows, pairs_series) if pair_rows else '<p class="hint">No per-person items.</p>',
        "</section>",
        '<section class="panel"><h2>Retention over cycles</h2>',
        '<p class="hint">Recall on facts by the cycle they were first learned; a falling line means a later '
        'adapter forgot them.</p>',
        _retention_legend(ret),
        _svg_retention(ret),
        f'<p class="stat">Backward transfer (BWT): <b>{"—" if bwt is None else f"{100 * bwt:+.1f} pts"}</b>'
        + (" · one cycle so far: the curve grows with each new adapter version" if n_cycles == 1 else "")
        + "</p>",
        "</section>",
        "</div>",
        '<section class="panel"><h2>Leaderboard</h2>',
        '<p class="hint">One row per model × adapter version × benchmark; click a column to sort. Score on '
        f'{BENCHMARK}: mean of recall, paraphrase, multi-turn, correction and locality.</p>',
        _table(rows),
        "</section>",
        _cycle_retention_html(cycle_retention),
        _breakdown_html("Per slot (test split)", "Recall + paraphrase per fact slot: every slot is asked about, "
                        "people taken in turn.", (latest.get("breakdown") or {}).get("slot") or {}, "Slot"),
        _breakdown_html("Per person (test split)", "Recall + paraphrase per taught person.",
                        (latest.get("breakdown") or {}).get("person") or {}, "Person"),
        _validation_html(systems),
        '<div class="grid2">',
        '<section class="panel"><h2>External benchmarks</h2>',
        '<p class="hint">Sample suites in the TRACE, MemoryBench, BABILong and InfiniteBench formats: checks that '
        'the adapter did not cost general ability.</p>',
        _legend([s for s in SYSTEMS if s[0] in ("adapter", "base")]),
        (_svg_bars(ext_groups, [s for s in SYSTEMS if s[0] in ("adapter", "base")], width=540, height=240)
         if ext_groups else '<p class="hint">No external suite in this run.</p>'),
        "</section>",
        '<section class="panel"><h2>How items are scored</h2><ul class="method">',
        "<li><b>Splits:</b> every person × slot has validation question forms (for choosing defaults, early "
        "stopping and promotion gates) and test forms worded further from the trained ones (reported here). No "
        "test form shares six words in a row with a trained or validation form.</li>",
        "<li><b>Recall, paraphrase, multi-turn, identity:</b> the value must appear as its own phrase (a city "
        "inside a school's name is no birth city) with MiniLM cosine ≥ 0.25 to the expected answer; an answer "
        "that also states a competing value of the slot (another person's, or a listed wrong one) fails. A "
        "meaning-only rescue (cosine ≥ 0.85) applies only to values without digits or proper names.</li>",
        "<li><b>Retrieval:</b> the base model with the top-k memories of the person the question names (all "
        "memories when it names nobody) in its system prompt, each marked with whose words it is.</li>",
        "<li><b>Multi-turn:</b> 6 turns for every taught person with the model's own answers kept in context; a "
        "turn passes only if it is right and consistent with every turn on the same fact.</li>",
        "<li><b>Correction:</b> the answer must deny the wrong claim, give the right value and not assert the "
        "wrong one. <b>True-claim controls</b> ask the same forms with the true value and pass only when the "
        "answer confirms, so a model that always says no fails them; the target is the mean of both.</li>",
        "<li><b>Locality:</b> general questions, counted where the base model answers right; passes when the "
        "answer is still right. <b>Unchanged:</b> the adapter's first sentence is the base model's, or the answers' "
        "cosine is ≥ 0.90, on those questions and on open prompts. <b>Neighbourhood:</b> facts of people never "
        "taught that the base model knows, counted where it answers right.</li>",
        "<li><b>No interference:</b> fails when a look-alike's value appears instead of the person's own.</li>",
        "<li><b>No hallucination:</b> fails on a confident specific claim (number, new name, “is a …”) about a "
        "person never taught; hedging or refusing passes.</li>",
        "<li><b>Intervals:</b> every rate carries n and a 95% Wilson interval; a target is met only at or above "
        "the goal, and “not yet sure” while the interval still straddles it.</li>",
        "</ul></section>",
        "</div>",
        f'<footer>Generated by SleepTrain · {len(rows)} leaderboard rows · static file, no network assets.</footer>',
    ]
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
        f"<style>{CSS}</style></head><body><main>" + "\n".join(body) + f"</main><script>{SORT_JS}</script></body></html>"
    )


def kinds_markdown(systems: Mapping[str, Mapping[str, Any]], section: str = "by_kind") -> str:
    """Pass rate (passed/n, 95% interval) per kind for each system, as the Dagster UI shows it."""
    names = [(key, label) for key, label, _ in SYSTEMS if key in systems]
    lines = ["| Kind | " + " | ".join(label for _, label in names) + " |", "|---|" + "---|" * len(names)]
    kinds = [k for k in TABLE_KINDS if any(_rate(systems[s], section, k)[1] for s, _ in names)]
    for kind in kinds:
        cells = []
        for system, _ in names:
            entry = with_interval(_entry(systems[system], section, kind))
            cells.append(f"{_pct(entry.get('rate'))} ({entry.get('passed', 0)}/{entry['n']}, "
                         f"{_pct(entry['ci_low'], 0)}–{_pct(entry['ci_high'], 0)})" if entry["n"] else "—")
        lines.append(f"| {KIND_LABELS[kind]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown_markdown(breakdown: Mapping[str, Mapping[str, Mapping[str, Any]]], key_label: str) -> str:
    """One row per slot or person, one column per system: rate (passed/n)."""
    names = [(key, label) for key, label, _ in SYSTEMS if key in breakdown]
    keys = sorted({k for per_system in breakdown.values() for k in per_system})
    rows = []
    for key in keys:
        cells = []
        for system, _ in names:
            entry = with_interval(breakdown[system].get(key) or {})
            cells.append(f"{_pct(entry.get('rate'), 0)} ({entry.get('passed', 0)}/{entry['n']})" if entry["n"] else "—")
        rows.append([key, *cells])
    return table([key_label, *(label for _, label in names)], rows)


def targets_markdown(targets: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| Target | Measured | Goal | Verdict |", "|---|---|---|---|"]
    for t in targets:
        verdict = t.get("verdict") or ("met" if t["met"] else "not met")
        lines.append(f"| {t['label']} | {_fmt_target(t, t['value'])} ({t['detail']}) | ≥ {_fmt_target(t, t['goal'])} | "
                     f"{verdict if t['met'] else '**' + verdict + '**'} |")
    return "\n".join(lines)
