"""Validation and test splits of the held-out forms, stratified selection, locality three ways, intervals."""

from __future__ import annotations

from pathlib import Path

import pytest

from sleeptrain_assets.lib import eval_suite, leaderboard_report, settings
from sleeptrain_assets.lib.catalog import CatalogError, load_people, load_templates
from sleeptrain_assets.lib.templating import (
    evaluation_items,
    split_coverage_gaps,
    leaking_test_forms,
)

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def demo():
    people = load_people(DATA / "people")
    templates = load_templates(DATA / "templates")
    return people, templates, evaluation_items(people, templates)


def _template_file(tmp_path: Path, body: str) -> Path:
    folder = tmp_path / "templates"
    folder.mkdir(parents=True)
    (folder / "t.yaml").write_text(
        "templates:\n  birth_year:\n    questions: ['When was {name} born?', 'In which year was {name} born?']\n"
        f"{body}    statement: 'I was born in {{birth_year}}.'\n    answer: '{{name}} was born in {{birth_year}}.'\n"
        "extractors:\n  birth_year: {path: facts.birth.year}\n"
    )
    return folder


def test_every_person_slot_and_kind_is_held_out_in_both_splits(demo):
    people, templates, items = demo
    assert split_coverage_gaps(items) == []
    kinds = {(i.kind, i.split) for i in items}
    for kind in ("recall", "paraphrase", "correction", "confirmation", "identity"):
        assert {(kind, "validation"), (kind, "test")} <= kinds
    fact_slots = {templates.slot(p) for t in templates.templates.values() if t.category == "fact"
                  for p in t.fact_placeholders}
    for split in ("validation", "test"):
        assert {i.slot for i in items if i.kind == "recall" and i.split == split} == fact_slots


def test_demo_test_forms_share_no_six_words_with_trained_or_validation_forms(demo):
    assert leaking_test_forms(demo[1]) == []


def test_a_test_form_that_repeats_a_trained_one_is_caught(tmp_path: Path):
    folder = _template_file(tmp_path, "    eval_questions:\n      validation: ['What is the birth year of {name}?']\n"
                                      "      test: ['Tell me: in which year was {name} born, please?']\n")
    leaks = leaking_test_forms(load_templates(folder))
    assert len(leaks) == 1 and "in which year was slotvalue born" in leaks[0] and "trained" in leaks[0]
    short = _template_file(tmp_path / "s", "    eval_questions:\n      validation: ['What is the birth year of {name}?']\n"
                                           "      test: ['Say, when was {name} born?']\n")
    assert "contains the trained form" in leaking_test_forms(load_templates(short))[0]
    # Punctuation and case do not hide a copy either.
    folder2 = _template_file(tmp_path / "b", "    eval_questions:\n      validation: ['What is the birth year of {name}?']\n"
                                             "      test: ['IN WHICH year was {name} born!']\n")
    assert "is the trained form" in leaking_test_forms(load_templates(folder2))[0]


def test_split_forms_must_not_repeat_and_splits_are_named(tmp_path: Path):
    both = _template_file(tmp_path, "    eval_questions:\n      validation: ['Birth year of {name}?']\n"
                                    "      test: ['Birth year of {name}?']\n")
    with pytest.raises(CatalogError, match=r"t\.yaml.*birth_year.*eval_questions.*both validation and test"):
        load_templates(both)
    unknown = _template_file(tmp_path / "u", "    eval_questions:\n      holdout: ['Birth year of {name}?']\n")
    with pytest.raises(CatalogError, match="splits must be"):
        load_templates(unknown)


def test_plain_lists_alternate_and_a_single_form_is_a_test_form(tmp_path: Path):
    folder = _template_file(tmp_path, "    eval_questions: ['A {name}?', 'B {name}?', 'C {name}?']\n"
                                      "    paraphrase_questions: ['D {name}?']\n")
    template = load_templates(folder).templates["birth_year"]
    assert [template.split_of(q) for q in template.eval_questions] == ["validation", "test", "validation"]
    assert template.split_of("D {name}?") == "test"


def test_items_carry_competing_and_other_values(demo):
    _, _, items = demo
    city = next(i for i in items if i.person_id == "lena_varga" and i.slot == "birth.city" and i.kind == "recall")
    assert city.value == "Leuven"
    assert "Enugu" in city.competing_values  # another person's birth city
    assert "Bruges" in city.competing_values  # Lena's listed wrong birth city
    assert "Mechelen" not in city.competing_values  # her residence: naming it is no wrong birth city
    assert "KU Leuven" in city.other_values  # a school, so "Leuven" inside it is no evidence
    year = next(i for i in items if i.person_id == "lena_varga" and i.slot == "birth.year" and i.kind == "recall")
    assert "March 3, 1984" not in year.other_values  # the birth date confirms the birth year
    assert "1984" not in year.competing_values


def test_true_claim_controls_ask_the_correction_forms_with_the_true_value(demo):
    _, _, items = demo
    lena = [i for i in items if i.person_id == "lena_varga" and i.template_id == "correction_birth_year"]
    corrections = {i.split: i for i in lena if i.kind == "correction"}
    controls = {i.split: i for i in lena if i.kind == "confirmation"}
    for split in ("validation", "test"):
        assert corrections[split].question.replace("1988", "1984") == controls[split].question
        assert controls[split].expected.startswith("Yes") and controls[split].wrong_value is None
        assert corrections[split].wrong_value == "1988"


def test_stratified_selection_covers_every_slot_and_every_person(demo):
    people, _, items = demo
    plan = eval_suite.build_plan(items, people, per_slot=4)
    for kind in ("recall", "paraphrase"):
        for split in ("validation", "test"):
            chosen = [i for i in plan.single if i.kind == kind and i.split == split]
            slots = {i.slot for i in items if i.kind == kind}
            assert {i.slot for i in chosen} == slots
            assert all(sum(i.slot == s for i in chosen) <= 4 for s in slots)
            assert {i.person_id for i in chosen} == set(people), (kind, split)
    assert len(plan.groups) == len(people), "one multi-turn conversation per taught person"
    assert all(item.split == "test" for group in plan.groups for item in group)


def test_untaught_lookalikes_become_neighbourhood_items(demo):
    people, _, items = demo
    plan = eval_suite.build_plan(items, people, per_slot=2, taught={"lena_varga"})
    asked = {i.person_id for i in plan.single if i.kind in eval_suite.HELD_OUT_KINDS}
    assert asked == {"lena_varga"}
    neighbours = [i for i in plan.single if i.kind == "neighbourhood"]
    assert neighbours and {i.person_id for i in neighbours} == {"lena_varda"}
    assert {g[0].person_id for g in plan.groups} == {"lena_varga"}


def test_locality_file_gives_three_kinds_in_both_splits():
    items = eval_suite.load_locality_items(settings.benchmark_path(eval_suite.GENERAL_KNOWLEDGE_FILE))
    kinds = {(i.kind, i.split) for i in items}
    for kind in ("locality", "unchanged", "neighbourhood"):
        assert {(kind, "validation"), (kind, "test")} <= kinds
    open_prompts = [i for i in items if i.category == "open"]
    assert open_prompts and all(i.kind == "unchanged" and not i.keywords for i in open_prompts)
    # A general question is asked once and scored twice: still right (locality) and still the same (unchanged).
    assert {i.question for i in items if i.kind == "locality"} < {i.question for i in items if i.kind == "unchanged"}


def test_targets_carry_n_intervals_and_an_honest_verdict():
    def summary(passed: int, n: int) -> dict:
        entry = {"rate": passed / n, "passed": passed, "count": n}
        return {"fictional_by_kind": {"recall": entry}, "by_kind": {"locality": entry}}

    sure = {t["name"]: t for t in leaderboard_report.evaluate_targets({"adapter": summary(200, 200)})}
    assert sure["recall"]["verdict"] == "met" and sure["recall"]["count"] == 200
    assert sure["recall"]["ci_low"] > 0.95
    one_item = {t["name"]: t for t in leaderboard_report.evaluate_targets({"adapter": summary(29, 30)})}
    assert one_item["recall"]["value"] == pytest.approx(29 / 30, abs=1e-4)
    assert one_item["recall"]["met"] and one_item["recall"]["verdict"] == "met, not yet sure"
    assert one_item["recall"]["ci_low"] < 0.95 < one_item["recall"]["ci_high"]
    missed = {t["name"]: t for t in leaderboard_report.evaluate_targets({"adapter": summary(40, 48)})}
    assert not missed["locality"]["met"] and missed["locality"]["verdict"] == "not met"
    assert missed["locality"]["ci_low"] == pytest.approx(0.705, abs=0.01)
    assert missed["locality"]["ci_high"] == pytest.approx(0.913, abs=0.01)
    assert not missed["multi_turn"]["met"], "nothing measured is not met"


def test_correction_target_needs_both_halves():
    def entry(passed: int, n: int) -> dict:
        return {"rate": passed / n, "passed": passed, "count": n}

    always_no = {"fictional_by_kind": {"correction": entry(24, 24), "confirmation": entry(0, 24)}}
    [target] = [t for t in leaderboard_report.evaluate_targets({"adapter": always_no}) if t["name"] == "correction_both"]
    assert target["value"] == pytest.approx(0.5) and not target["met"] and target["count"] == 48
