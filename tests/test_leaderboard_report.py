"""Leaderboard rows, targets, retention and the static page, built from real scorer summaries."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from sleeptrain_assets.lib import leaderboard_report as lr
from sleeptrain_assets.lib import scoring

PEOPLE = {"lena_varga": "fictional", "tobias_renker": "fictional", "nelson_mandela": "real"}


def _scores(rates: dict[str, float], n: int = 10) -> list[scoring.ItemScore]:
    """n items per kind spread over the people, the first round(rate * n) of them passed."""
    out = []
    people = sorted(PEOPLE)
    for kind, rate in rates.items():
        for i in range(n):
            person = None if kind in lr.ALL_ITEM_KINDS else people[i % len(people)]
            category = ("correction" if kind in ("correction", "confirmation") else "identity" if kind == "identity"
                        else "fact")
            out.append(scoring.ItemScore(f"{kind}:{i}", kind, category, person, i < round(rate * n), 0.5))
    return out


ADAPTER = {"recall": 0.9, "paraphrase": 0.6, "multi_turn": 0.5, "correction": 0.8, "confirmation": 0.7,
           "identity": 0.7, "locality": 1.0, "unchanged": 0.9, "neighbourhood": 1.0, "interference": 0.9,
           "hallucination": 0.3}
BASE = {k: (1.0 if k == "locality" else 0.1) for k in ADAPTER}
RETRIEVAL = {**ADAPTER, "recall": 1.0, "locality": 0.8}


def make_run(version: str = "v0002-abc", time: str = "2026-01-02T10:00:00+00:00", adapter=None, history=None,
             model: str = "SmolLM2-135M-Instruct", retrieval=None) -> dict:
    systems = {name: scoring.summarize(_scores(rates), PEOPLE)
               for name, rates in (("adapter", adapter or ADAPTER), ("base", BASE),
                                   ("retrieval", retrieval or RETRIEVAL))}
    history = lr.record_cycle(history or {"cycles": []}, version, time,
                              {"lena_varga/birth.year": 1.0, "tobias_renker/birth.city": 0.5}, {})
    return {
        "model": model, "adapter_version": version, "time": time, "profile": "smoke", "retrieval_top_k": 3,
        "cycle": len(history["cycles"]), "systems": systems, "targets": lr.evaluate_targets(systems),
        "retention": lr.retention(history),
        "external": [{"benchmark": "BABILong", "system": s, "avg_score": v, "count": 6, "path": "x/babilong.jsonl",
                      "metric": "contains"} for s, v in (("adapter", 0.5), ("base", 0.6667))],
    }


def test_targets_read_fictional_rates_and_the_retrieval_ratio():
    targets = {t["name"]: t for t in make_run()["targets"]}
    # fictional people hold 2 of every 3 person items; recall passes items 0..8 of 10
    assert targets["recall"]["count"] == 7
    assert targets["recall"]["value"] == pytest.approx(6 / 7, abs=1e-4) and not targets["recall"]["met"]
    assert targets["locality"]["value"] == 1.0 and targets["locality"]["met"]
    assert targets["retrieval_ratio"]["value"] == pytest.approx(6 / 7, abs=1e-4)  # vs 7/7 for retrieval
    assert not targets["retrieval_ratio"]["met"]
    perfect = make_run(adapter={k: 1.0 for k in ADAPTER}, retrieval={**RETRIEVAL, "recall": 0.5})
    assert all(t["met"] for t in perfect["targets"])
    # 7 fictional items all right: at the goal, but the interval still reaches below 95%.
    assert {t["name"]: t["verdict"] for t in perfect["targets"]}["recall"] == "met, not yet sure"
    empty = lr.evaluate_targets({"adapter": {}, "retrieval": {}})
    assert not any(t["met"] for t in empty) and all(t["value"] is None for t in empty)


def test_rows_carry_every_kind_and_the_retrieval_column():
    rows = lr.rows_from_run(make_run())
    people_rows = [r for r in rows if r["benchmark"] == lr.BENCHMARK]
    assert [(r["adapter_version"], r["system"]) for r in people_rows] == [("v0002-abc", "adapter"), ("base", "base")]
    for row in people_rows:
        assert set(lr.HEADLINE_KINDS) <= set(row["metrics"]) and row["retrieval"]["recall"] == 1.0
        expected = sum(row["metrics"][k] for k in lr.HEADLINE_KINDS) / len(lr.HEADLINE_KINDS)
        assert row["score"] == pytest.approx(expected, abs=1e-4)
        assert row["count"] == 10 * len(ADAPTER) and row["time"] and row["notes"]
    assert people_rows[0]["metrics"]["recall"] == 0.9 and people_rows[1]["metrics"]["recall"] == 0.1
    external = [r for r in rows if r["benchmark"] == "BABILong"]
    assert {(r["adapter_version"], r["score"]) for r in external} == {("v0002-abc", 0.5), ("base", 0.6667)}


def test_merge_replaces_same_key_and_keeps_other_versions():
    old = lr.rows_from_run(make_run("v0001-aaa", "2026-01-01T10:00:00+00:00"))
    new = lr.rows_from_run(make_run("v0002-abc"))
    merged = lr.merge_rows(old, new)
    keys = [(r["adapter_version"], r["benchmark"]) for r in merged]
    assert len(keys) == len(set(keys)) == 6  # base rows replaced, both adapter versions kept
    base = next(r for r in merged if r["adapter_version"] == "base" and r["benchmark"] == lr.BENCHMARK)
    assert base["time"] == "2026-01-02T10:00:00+00:00"
    assert merged[0]["benchmark"] == lr.BENCHMARK and merged[0]["adapter_version"] == "v0002-abc"


def test_retention_cohorts_and_backward_transfer():
    history = {"cycles": []}
    history = lr.record_cycle(history, "v1", "t1", {"a/x": 1.0, "a/y": 1.0}, {})
    history = lr.record_cycle(history, "v2", "t2", {"a/x": 0.5, "a/y": 1.0, "b/x": 1.0}, {})
    history = lr.record_cycle(history, "v3", "t3", {"a/x": 0.0, "a/y": 1.0, "b/x": 0.5, "c/z": 1.0}, {})
    ret = lr.retention(history)
    assert ret["versions"] == ["v1", "v2", "v3"]
    assert [c["values"] for c in ret["cohorts"]] == [[1.0, 0.75, 0.5], [None, 1.0, 0.5], [None, None, 1.0]]
    assert ret["bwt"] == pytest.approx(((0.5 - 1.0) + (0.5 - 1.0)) / 2)
    assert ret["overall"] == [1.0, pytest.approx(0.8333, abs=1e-4), 0.625]
    again = lr.record_cycle(history, "v2", "t4", {"a/x": 1.0}, {})
    assert [c["cycle"] for c in again["cycles"]] == [1, 2, 3] and again["cycles"][1]["time"] == "t4"
    assert lr.retention(lr.record_cycle({}, "v1", "t", {"a/x": 1.0}, {}))["bwt"] is None


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.rows = 0
        self.in_body = False
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "tbody":
            self.in_body = True
        if tag == "tr" and self.in_body:
            self.rows += 1
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.external.append(value)


def test_html_shows_table_charts_and_missed_targets():
    run = make_run(model='<script>alert("x")</script>')
    rows = lr.merge_rows([], lr.rows_from_run(run))
    page = lr.render_html(rows, run, run["retention"])
    parser = _Page()
    parser.feed(page)
    assert parser.rows == len(rows) == 4
    assert parser.tags["svg"] >= 4 and parser.tags.get("script") == 1
    assert not parser.external, "no network (or any external) assets"
    assert "Targets not met (5 of 8)" in page and "Held-out recall 85.7% (target ≥ 95%)" in page
    assert "Met, not yet sure:</b> Locality (n=10, 95% CI 72%–100%)" in page
    assert '<script>alert("x")' not in page and "&lt;script&gt;" in page
    assert page.count('class="sortable"') == 1 and "aria-sort" in page
    met = make_run(adapter={k: 1.0 for k in ADAPTER}, retrieval={**RETRIEVAL, "recall": 0.5})
    assert "All targets met" in lr.render_html(lr.rows_from_run(met), met, met["retention"])


def test_a_sleep_cycle_refreshes_the_page_with_its_retention_curve(tmp_path):
    from sleeptrain_assets.lib import cycle_report

    run = make_run()
    rows = lr.merge_rows([], lr.rows_from_run(run))
    json_path, html_path = tmp_path / "leaderboard.json", tmp_path / "leaderboard.html"
    lr.write_json_atomic(json_path, {"rows": rows, "latest_run": run})
    history = cycle_report.record_retention({"cycles": []}, "cycle-000001", "v1", "t1", {"a/x": 1.0, "a/y": 1.0})
    history = cycle_report.record_retention(history, "cycle-000002", "v2", "t2", {"a/x": 0.5, "a/y": 1.0, "b/x": 1.0})
    lr.refresh_page(json_path, html_path, cycle_report.retention_curve(history))
    page = html_path.read_text()
    assert "Retention over sleep cycles" in page and "cycle-000001, cycle-000002" in page
    assert "-25.0 pts" in page, "facts of cycle 1 fell from 100% to 75%"
    assert "Held-out recall 85.7%" in page, "the latest run's figures stay on the page"
    empty = lr.render_html(rows, run, run["retention"], cycle_retention=cycle_report.retention_curve({"cycles": []}))
    assert "Retention over sleep cycles" not in empty


def test_markdown_tables():
    run = make_run()
    table = lr.markdown_table(lr.rows_from_run(run))
    assert len(table.splitlines()) == 2 + 4 and "| v0002-abc | sleeptrain-people | " in table
    kinds = lr.kinds_markdown(run["systems"])
    assert "| Recall | 90.0% (9/10, 60%–98%) | 10.0% (1/10, 2%–40%) | 100.0% (10/10, 72%–100%) |" in kinds
    assert "**not met**" in lr.targets_markdown(run["targets"])
    assert "met, not yet sure" in lr.targets_markdown(run["targets"])


def test_atomic_writes_leave_no_temporaries_and_corrupt_json_is_named(tmp_path):
    target = tmp_path / "reports" / "leaderboard.json"
    lr.write_json_atomic(target, {"rows": [1]})
    lr.write_json_atomic(target, {"rows": [2]})
    assert json.loads(target.read_text()) == {"rows": [2]}
    assert [p.name for p in target.parent.iterdir()] == ["leaderboard.json"]

    with pytest.raises(UnicodeEncodeError):
        lr.write_text_atomic(target, '{"rows": [3]} \ud800')  # a lone surrogate fails mid-write
    assert json.loads(target.read_text()) == {"rows": [2]}
    assert [p.name for p in target.parent.iterdir()] == ["leaderboard.json"]
    target.write_text("{broken")
    with pytest.raises(ValueError, match=re.escape(str(target))):
        lr.read_json(target, {})
    assert lr.read_json(tmp_path / "missing.json", {"rows": []}) == {"rows": []}


def test_tracker_offline_files_disabled_and_online_guard(sleeptrain_env, monkeypatch):
    from sleeptrain_resources.tracking import Tracker

    tracker = Tracker(mode="offline")
    tracker.start("eval-test", config={"adapter_version": "v1"}, job_type="evaluation")
    tracker.log_metrics({"adapter/recall": 0.5, "skipped": None, "nan": float("nan"), "met": True})
    tracker.log_table("answers", ["id", "answer"], [["a", "Paris"]])
    run_dir = tracker.run_dir()
    tracker.finish()
    assert run_dir is not None and run_dir.is_relative_to(sleeptrain_env / "tracking")
    assert list(run_dir.glob("*.wandb")) and tracker.run_dir() is None

    monkeypatch.setenv("SLEEPTRAIN_TRACKING", "disabled")
    quiet = Tracker()
    quiet.log_metrics({"a": 1.0})
    assert not quiet.enabled and quiet.run_dir() is None

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ValueError, match="needs WANDB_API_KEY"):
        Tracker(mode="online").log_metrics({"a": 1.0})
    with pytest.raises(ValueError, match="must be one of"):
        Tracker(mode="loud").resolved_mode()
