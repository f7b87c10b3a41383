"""Cycle items (validation split for gates, earlier cycles first), metrics, the retention curve and the report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sleeptrain_assets.definitions import defs
from sleeptrain_assets.lib import cycle_report
from sleeptrain_assets.lib.records import EvalItem
from sleeptrain_assets.lib.scoring import ItemScore


def _item(pid: str, slot: str, n: int, split: str = "test", kind: str = "recall") -> EvalItem:
    return EvalItem(id=f"{pid}:{slot}:{kind}:{n}", kind=kind, person_id=pid, template_id=slot, category="fact",
                    question=f"q {pid} {slot} {n}", expected="e", keywords=("e",), slot=slot, value="v", split=split)


def test_gates_use_validation_items_when_there_are_any_and_say_so_when_not() -> None:
    items = [_item("a", "birth.year", n) for n in range(3)]
    chosen, split, note = cycle_report.gate_split(items)
    assert split == "all" and len(chosen) == 3 and "no validation items" in note
    items.append(replace(items[0], id="a:v", split="validation"))
    chosen, split, _ = cycle_report.gate_split(items)
    assert split == "validation" and [i.id for i in chosen] == ["a:v"]


def test_new_facts_take_every_item_earlier_facts_spread_and_capped() -> None:
    questions = [_item(p, s, n, kind=k) for p in ("new", "old1", "old2") for s in ("birth.year", "birth.city")
                 for n, k in enumerate(("recall", "paraphrase", "paraphrase", "correction", "confirmation"))]
    locality = [EvalItem(id=f"locality:{n}", kind="locality", person_id=None, template_id="g", category="general",
                         question=f"g{n}", expected="x", keywords=("x",)) for n in range(5)]
    earlier = [("old2", "birth.city"), ("old1", "birth.year"), ("old1", "birth.city")]
    items = cycle_report.select_items(questions, locality, {("new", "birth.year")}, earlier, max_earlier=4,
                                      max_locality=2, seed="cycle-000003")
    assert {i.id.rsplit(":", 2)[0] for i in items.by_role["new_facts"]} == {"new:birth.year"}
    assert len(items.by_role["new_facts"]) == 3
    claims = items.by_role["new_fact_corrections"]
    assert sorted(i.kind for i in claims) == ["confirmation", "correction"], "denials of new facts, scored apart"
    assert {(i.person_id, i.slot) for i in claims} == {("new", "birth.year")}
    facts = [(i.person_id, i.slot) for i in items.by_role["earlier_facts"]]
    assert len(facts) == 4 and facts[:3] == earlier, "one item per earlier fact first, in the given order"
    assert len(items.by_role["locality"]) == 2
    again = cycle_report.select_items(questions, locality, {("new", "birth.year")}, earlier, max_earlier=4,
                                      max_locality=2, seed="cycle-000003")
    assert again == items, "the same cycle asks the same items"

    scores = [ItemScore(i.id, i.kind, i.category, i.person_id, i.person_id == "new", 1.0, True, "", {})
              for i in items.all()]
    m = cycle_report.metrics(items, scores)
    assert m["new_fact_recall"] == 1.0 and m["retention"] == 0.0 and m["locality"] == 0.0
    assert m["new_fact_correction"] == 1.0 and m["new_fact_correction_items"] == 2
    assert (m["new_fact_recall_items"], m["retention_items"], m["locality_items"]) == (3, 4, 2)
    assert cycle_report.fact_rates(items, scores)["new/birth.year"] == 1.0


def test_retention_curve_follows_each_cycles_facts_across_later_cycles(tmp_path: Path) -> None:
    history = {"cycles": []}
    history = cycle_report.record_retention(history, "cycle-000001", "v0001-aaaaaaaa", "t1", {"a/x": 1.0})
    history = cycle_report.record_retention(history, "cycle-000002", "v0002-bbbbbbbb", "t2", {"a/x": 0.5, "b/y": 1.0})
    history = cycle_report.record_retention(history, "cycle-000003", "v0002-bbbbbbbb", "t3", {"a/x": 0.5, "b/y": 0.0})
    again = cycle_report.record_retention(history, "cycle-000003", "v0002-bbbbbbbb", "t3", {"a/x": 0.5, "b/y": 0.0})
    assert again == history, "a re-run cycle replaces its own entry"
    curve = cycle_report.retention_curve(history)
    assert curve["cycle_keys"] == ["cycle-000001", "cycle-000002", "cycle-000003"]
    assert curve["cohorts"][0]["values"] == [1.0, 0.5, 0.5] and curve["cohorts"][1]["values"] == [None, 1.0, 0.0]
    assert curve["bwt"] == -0.75
    md = cycle_report.retention_markdown(curve)
    assert "facts of cycle-000001 (1)" in md and "backward transfer: -0.750" in md
    folder = tmp_path / "cycle-000003"
    cycle_report.write_report(folder, {"cycle": "cycle-000003", "status": "rejected", "retention": curve,
                                       "decision": {"accepted": False, "reasons": ["retention_budget: fell"]}})
    report = cycle_report.update_report(folder, run_stopped_by="gate")
    assert report["status"] == "rejected" and report["run_stopped_by"] == "gate"
    text = (folder / "report.md").read_text()
    assert "**rejected**" in text and "retention_budget: fell" in text and "Retention across cycles" in text


def test_definitions_hold_the_cycle_job_sensors_schedule_and_blocking_gate() -> None:
    definitions = defs()
    job = definitions.resolve_job_def("sleep_cycle")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {
        "cycle_inbox_batch", "cycle_memories", "replay_targets", "challenger_adapter", "cycle_evaluation",
        "promotion_decision", "champion_adapter"}
    full = definitions.resolve_job_def("full_pipeline")
    assert not {k.to_user_string() for k in full.asset_layer.selected_asset_keys} & {"cycle_inbox_batch"}
    graph = definitions.resolve_asset_graph()
    [check] = [k for k in graph.asset_check_keys if k.name == "challenger_passes_promotion_gates"]
    assert graph.get_check_spec(check).blocking
    assert {s.name for s in definitions.sensors} >= {"inbox_sensor", "failed_cycle_recorder"}
    assert {s.name for s in definitions.schedules} >= {"nightly_sleep"}


def test_a_failed_cycle_is_recorded_and_a_gate_rejection_is_not_called_a_failure(sleeptrain_env: Path) -> None:
    from sleeptrain_assets.defs.cycles import record_cycle_failure

    folder = sleeptrain_env / "cycles" / "cycle-000004"
    cycle_report.write_report(folder, {"cycle": "cycle-000004", "status": "running"})
    record_cycle_failure("cycle-000004", "run-1", "TrainingFailed: loss diverged")
    report = cycle_report.read_json(folder / cycle_report.REPORT_JSON, {})
    assert report["status"] == "failed" and report["failure"]["message"] == "TrainingFailed: loss diverged"
    assert "## Failure" in (folder / cycle_report.REPORT_MD).read_text()

    cycle_report.write_report(folder, {"cycle": "cycle-000004", "status": "rejected"})
    record_cycle_failure("cycle-000004", "run-2", "1 blocking asset check failed")
    report = cycle_report.read_json(folder / cycle_report.REPORT_JSON, {})
    assert report["status"] == "rejected" and "blocking promotion check" in report["run_stopped_by"]
