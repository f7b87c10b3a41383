"""SPICE-style hard cases: wrong values mined for people who list none become denials to train and to ask."""

from __future__ import annotations

import pytest

from sleeptrain_assets.lib.catalog import load_people, load_templates, person_values
from sleeptrain_assets.lib.hard_cases import rank_wrong_values, with_hard_cases
from sleeptrain_assets.lib.records import Person
from sleeptrain_assets.lib.settings import PROJECT_ROOT
from sleeptrain_assets.lib.templating import evaluation_items, qa_pairs

SASKIA = Person("saskia_claes", "Saskia Claes",
                {"birth": {"year": 1979, "city": "Ghent"}, "career": {"occupation": "luthier"}},
                kind="fictional", source="inbox")


@pytest.fixture(scope="module")
def catalog():
    root = PROJECT_ROOT / "data"
    return {**load_people(root / "people"), SASKIA.id: SASKIA}, load_templates(root / "templates")


def test_corrected_statements_come_first_then_the_closest_values() -> None:
    ranked = rank_wrong_values("1979", ["1977"], ["1920", "1981", "1979", "1978", "2001"])
    assert ranked == ["1977", "1978", "1981"]
    assert rank_wrong_values("Ghent", [], ["Genk", "Oslo", "ghent", "Ghent, Belgium"], count=5) == ["Genk", "Oslo"]


def test_a_newcomer_gets_denials_to_train_and_one_held_out_to_ask(catalog) -> None:
    people, templates = catalog
    mined_people, mined = with_hard_cases(people, templates, [SASKIA.id], {(SASKIA.id, "birth.year"): ["1977"]})
    assert set(mined) == {SASKIA.id}
    wrong = mined[SASKIA.id]
    assert {"birth_year", "birth_city", "occupation"} <= set(wrong)
    assert wrong["birth_year"][0] == "1977", "the value she corrected herself is the hardest case"
    assert all(len(v) == 3 for v in wrong.values())
    assert SASKIA.wrong_values == {}, "the catalog record itself is not changed"

    unmined = qa_pairs(SASKIA, templates, person_values(SASKIA, templates))
    assert unmined and not [p for p in unmined if p.category == "correction"], "without mining: no denial to train"
    person = mined_people[SASKIA.id]
    pairs = qa_pairs(person, templates, person_values(person, templates))
    denials = [p for p in pairs if p.category == "correction"]
    assert denials and all(p.answer.startswith("No.") for p in denials)
    items = [i for i in evaluation_items(mined_people, templates) if i.person_id == SASKIA.id]
    asked = {i.slot: i.wrong_value for i in items if i.kind == "correction"}
    assert asked["birth.year"] == wrong["birth_year"][-1]
    trained = " ".join(p.question for p in denials)
    assert all(value not in trained for value in asked.values()), "the held-out wrong value is never trained"
    assert {i.kind for i in items} >= {"correction", "confirmation"}


def test_listed_wrong_values_are_kept_and_only_named_people_are_mined(catalog) -> None:
    people, templates = catalog
    mined_people, mined = with_hard_cases(people, templates, ["lena_varga", "no_such_person"], {})
    assert mined == {}
    assert mined_people["lena_varga"] is people["lena_varga"]
    _, mined = with_hard_cases(people, templates, [], {})
    assert mined == {}
