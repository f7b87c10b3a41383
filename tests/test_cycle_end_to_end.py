"""Real sleep cycles on the smoke profile: promote a challenger that learned, reject one made to forget."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg
import pytest

from sleeptrain_assets.cli import _person_name
from sleeptrain_assets.defs.cycles import run_cycle_now
from sleeptrain_resources.registry import AdapterRegistry

NEWCOMERS = [
    {"person": "saskia_claes", "name": "Saskia Claes", "messages": [
        {"role": "assistant", "content": "Tell me a little about yourself."},
        {"role": "user", "content": "I was born in Ghent in 1979. These days I work as a luthier."}]},
    {"person": "bram_vethaak", "name": "Bram Vethaak", "messages": [
        {"role": "user", "content": "I was born in Zwolle in 1991. I work as a cartographer."}]},
]
LATECOMER = [{"person": "oona_pirkola", "name": "Oona Pirkola", "messages": [
    {"role": "user", "content": "I was born in Oulu in 1968. I work as a glazier."}]}]

# Smoke trains 4 steps; learning a person's facts needs a few epochs. Held-out wordings are what is scored.
LEARN = {"max_steps": 14, "batch_size": 8, "learning_rate": 0.002, "early_stop_patience": 0}
EVAL = {"max_earlier_items": 12, "max_locality_items": 12, "batch_size": 16}
# What 14 smoke steps can show: a challenger far better than the base on held-out wordings of new facts (the
# default gate asks 90%). The locality gate is off here: 14 steps at twice the default learning rate change
# general answers (measured with the strict scorer on validation general questions: 1.0 -> 0.67 on 12 items),
# which is the open locality work, not what this test is about; test_promotion_policy.py shows that gate
# rejecting. The retention gate keeps its default budget.
GATES = {"min_new_fact_recall": 0.75, "locality_budget": 1.0}



def _write(folder: Path, name: str, records: list[dict]) -> None:
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


def _report(home: Path, cycle: str) -> dict:
    return json.loads((home / "cycles" / cycle / "report.json").read_text())


@pytest.mark.slow
def test_a_cycle_promotes_what_it_learned_and_a_forgetting_challenger_is_rejected(
        inbox_dir: Path, sleeptrain_env: Path) -> None:
    registry = AdapterRegistry()
    _write(inbox_dir, "day1.jsonl", NEWCOMERS[:1])
    with dg.instance_for_test() as instance:
        key, _, result = run_cycle_now(instance, extra_run_config={"ops": {
            "challenger_adapter": {"config": LEARN}, "cycle_evaluation": {"config": EVAL},
            "promotion_decision": {"config": GATES}}})
        report = _report(sleeptrain_env, key)
        print(json.dumps({k: report.get(k) for k in ("status", "decision", "evaluation", "training")}, indent=1))
        assert result.success and key == "cycle-000001"
        [gate] = result.get_asset_check_evaluations()
        assert gate.check_name == "challenger_passes_promotion_gates" and gate.passed
        assert report["status"] == "promoted" and report["decision"]["accepted"]
        champion = registry.current()
        assert champion == report["promoted_version"] == report["champion_after"]
        assert (sleeptrain_env / "people" / "saskia_claes.yaml").is_file()
        assert _person_name("saskia_claes") == "Saskia Claes", "`sleeptrain ask --person` knows her now"
        hedge = report["hedge"]
        assert hedge["reward"] > 0 and hedge["after"]["STORE"] > hedge["before"]["STORE"]
        assert (sleeptrain_env / "hedge" / "policy.json").is_file()
        assert "Retention across cycles" in (sleeptrain_env / "cycles" / key / "report.md").read_text()
        assert report["evaluation"]["challenger"]["new_fact_recall"] >= 0.75
        assert report["evaluation"]["champion"]["new_fact_recall"] <= 0.2, "the base model cannot know her"
        # The audit's per-item verdicts are the ones the gate's rate rests on.
        answers = json.loads((sleeptrain_env / "cycles" / key / "answers.json").read_text())
        verdicts = [a["passed"]["challenger"] for a in answers
                    if a["role"] == "new_facts" and a["passed"]["challenger"] is not None]
        assert verdicts and round(sum(verdicts) / len(verdicts), 4) == report["evaluation"]["challenger"]["new_fact_recall"]
        assert report["hard_cases"] is False, "off by default"
        assert report["hard_case_values"]["saskia_claes"], "mined for the evaluation even when not trained"
        assert report["evaluation"]["counts"]["new_fact_corrections"] >= 2, "held-out mined claims asked anyway"
        champion_sha = _sha(registry.path(champion))

        _write(inbox_dir, "day2.jsonl", LATECOMER)
        forget = {**LEARN, "replay_share": 0.0, "replay_every_older_fact": False, "learning_rate": 0.005}
        key2, _, result2 = run_cycle_now(instance, hard_cases=True, self_training=True, extra_run_config={"ops": {
            "challenger_adapter": {"config": forget}, "cycle_evaluation": {"config": EVAL},
            "promotion_decision": {"config": GATES}}})
        report2 = _report(sleeptrain_env, key2)
        print(json.dumps({k: report2.get(k) for k in ("status", "decision", "evaluation", "training")}, indent=1))
        # Hard cases (asked for here; off by default): Oona listed no wrong values, so they were mined from other
        # people's values (closest first), trained as denials and asked as held-out correction/confirmation items.
        assert report2["hard_cases"] is True
        mined = report2["hard_case_values"]["oona_pirkola"]
        assert mined["birth_year"] and "1968" not in mined["birth_year"]
        assert report2["evaluation"]["counts"]["new_fact_corrections"] >= 2
        assert report2["evaluation"]["challenger"]["new_fact_correction_items"] >= 2
        assert "## Hard cases" in (sleeptrain_env / "cycles" / key2 / "report.md").read_text()
        # Self-training (asked for here; off by default): the champion answered Oona's fact questions with her
        # words in context; the answers the scorer passed were trained beside the templated pairs.
        assert report["training"].get("self_training") is None, "off by default"
        seal = report2["training"]["self_training"]
        assert seal["model"] == champion and seal["questions"] >= 3 and seal["samples"] == 4 * seal["questions"]
        assert 0 < seal["examples"] <= 2 * seal["questions"] and seal["passing_samples"] >= seal["examples"]
        assert report2["training"]["training_set"]["by_source"]["self_taught"] == seal["examples"]
        assert "Self-training: " in (sleeptrain_env / "cycles" / key2 / "report.md").read_text()
        assert key2 == "cycle-000002" and not result2.success, "the blocking gate stops the run"
        [gate2] = result2.get_asset_check_evaluations()
        assert not gate2.passed and gate2.asset_check_key.asset_key == dg.AssetKey("promotion_decision")
        assert [e.step_key for e in result2.all_events if e.is_step_failure] == ["promotion_decision"]
        assert report2["status"] == "rejected" and not report2["decision"]["accepted"]
        failed = {g["gate"] for g in report2["decision"]["gates"] if not g["passed"]}
        assert "retention_budget" in failed, report2["decision"]["reasons"]
        assert report2["hedge"]["reward"] < 0, "a rejected cycle is a negative reward for what routing kept"
        cohorts = report2["retention"]["cohorts"]
        assert cohorts[0]["values"][1] is not None, "cycle 1's facts are re-scored in cycle 2"
        assert registry.current() == champion and _sha(registry.path(champion)) == champion_sha
        assert report2["decision"]["challenger"] in registry.versions(), "a rejected challenger is still kept"
