"""People and template loading: our format, the v2 format, and every bad input named precisely."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from sleeptrain_assets.lib.catalog import CatalogError, load_people, load_templates, resolve, validate_catalog
from sleeptrain_assets.lib.settings import PROJECT_ROOT

PERSON = {
    "id": "ada_test",
    "name": "Ada Test",
    "kind": "fictional",
    "facts": {"birth": {"year": 1911, "city": "Gouda"}, "awards": [{"name": "Blue Kite", "year": 1950}]},
    "wrong_values": {"birth_year": [1912, 1913]},
}
TEMPLATES = {
    "templates": {
        "birth_year": {
            "category": "fact",
            "questions": ["When was {name} born?", "What year was {name} born?"],
            "eval_questions": ["What is {name}'s year of birth?"],
            "statement": "I was born in {birth_year}.",
            "answer": "{name} was born in {birth_year}.",
            "keywords": ["{birth_year}"],
        },
        "award_name": {
            "category": "fact",
            "questions": ["Which award did {name} win?", "What prize did {name} get?"],
            "statement": "I won the {award_name}.",
            "answer": "{name} won the {award_name}.",
            "keywords": ["{award_name}"],
        },
    },
    "extractors": {"birth_year": {"path": "facts.birth.year"}, "award_name": {"path": "facts.awards[0].name"}},
}


def write_dataset(root: Path, person: dict | None = None, templates: dict | None = None) -> Path:
    (root / "people").mkdir(parents=True, exist_ok=True)
    (root / "templates").mkdir(parents=True, exist_ok=True)
    (root / "people" / "ada_test.yaml").write_text(yaml.safe_dump(person or PERSON))
    (root / "templates" / "facts.yaml").write_text(yaml.safe_dump(templates or TEMPLATES))
    return root


def load_all(root: Path):
    people, templates = load_people(root / "people"), load_templates(root / "templates")
    validate_catalog(people, templates)
    return people, templates


def test_valid_dataset_loads(tmp_path: Path) -> None:
    people, templates = load_all(write_dataset(tmp_path))
    assert list(people) == ["ada_test"]
    assert resolve(people["ada_test"], "facts.awards[0].name") == "Blue Kite"
    assert templates.slot("award_name") == "awards[0].name"
    assert templates.templates["birth_year"].eval_questions == ("What is {name}'s year of birth?",)


def test_repository_data_is_valid() -> None:
    people, templates = load_all(PROJECT_ROOT / "data")
    kinds = [p.kind for p in people.values()]
    assert kinds.count("real") >= 3 and kinds.count("fictional") >= 8
    assert any(p.lookalike_of for p in people.values()), "look-alike people measure interference"
    categories = {t.category for t in templates.templates.values()}
    assert {"fact", "correction", "identity"} <= categories


def test_v2_compat_files_load_unchanged(compat_dir: Path, tmp_path: Path) -> None:
    for sub, name in (("people", "people_data.yaml"), ("templates", "qa_templates.yaml")):
        (tmp_path / sub).mkdir()
        shutil.copy(compat_dir / name, tmp_path / sub / name)
    people, templates = load_all(tmp_path)
    assert set(people) == {"obama", "musk", "curie"}
    assert people["obama"].wrong_values["birth_year"] == [1867, 1971, 1903]
    assert templates.slot("award_name") == "awards[0].name"
    # v2 answers are first person: they are asked under a persona system prompt.
    assert templates.templates["birth_year"].persona
    # v2 templates carry no held-out forms: the last question forms are held out for evaluation.
    assert templates.templates["birth_year"].eval_questions


def _mutate(**changes):
    person = yaml.safe_load(yaml.safe_dump(PERSON))
    person.update(changes)
    return person


@pytest.mark.parametrize(
    ("person", "templates", "expected"),
    [
        (_mutate(name=""), None, ["ada_test.yaml", "'name'", "missing or empty"]),
        (_mutate(facts={"birth": {"year": None, "city": "Gouda"}, "awards": [{"name": "Blue Kite"}]}), None,
         ["ada_test.yaml", "'ada_test'", "facts.birth.year", "has no value"]),
        (None, {"templates": {**TEMPLATES["templates"], "x": {"questions": ["Is {name} {colour}?"], "answer": "{colour}"}},
                "extractors": TEMPLATES["extractors"]},
         ["facts.yaml", "'x'", "{colour}", "no extractor"]),
    ],
    ids=["missing-name", "placeholder-without-value", "placeholder-without-extractor"],
)
def test_bad_records_name_file_record_and_field(tmp_path: Path, person, templates, expected) -> None:
    root = write_dataset(tmp_path, person, templates)
    with pytest.raises(CatalogError) as info:
        load_all(root)
    for part in expected:
        assert part in str(info.value)


def test_duplicate_id_names_both_files(tmp_path: Path) -> None:
    root = write_dataset(tmp_path)
    (root / "people" / "copy.yaml").write_text(yaml.safe_dump(PERSON))
    with pytest.raises(CatalogError, match=r"copy\.yaml.*'ada_test'.*'id'.*duplicate id.*ada_test\.yaml"):
        load_all(root)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"   \n# only a comment\n", "is empty"),
        (b"name: Caf\xe9\n", "is not UTF-8"),
        (b"!!python/object/apply:os.system ['echo pwned']\n", "!!python"),
        (b"id: x\nname: [unclosed\n", "is not valid YAML"),
    ],
    ids=["empty", "comment-only", "non-utf8", "python-tag", "broken-yaml"],
)
def test_unreadable_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    root = write_dataset(tmp_path)
    (root / "people" / "bad.yaml").write_bytes(content)
    with pytest.raises(CatalogError, match="bad.yaml") as info:
        load_all(root)
    assert message in str(info.value)


def test_wrong_value_equal_to_truth_is_refused(tmp_path: Path) -> None:
    corrections = {
        "templates": {
            **TEMPLATES["templates"],
            "correction_birth_year": {
                "category": "correction",
                "questions": ["Was {name} born in {wrong_value}?"],
                "statement": "No, I was born in {correct_value}.",
                "answer": "No. {name} was born in {correct_value}.",
                "keywords": ["{correct_value}"],
            },
        },
        "extractors": TEMPLATES["extractors"],
    }
    root = write_dataset(tmp_path, _mutate(wrong_values={"birth_year": [1911]}), corrections)
    with pytest.raises(CatalogError, match=r"wrong_values\.birth_year.*equals the true value"):
        load_all(root)


@pytest.mark.parametrize(
    ("person", "templates", "expected"),
    [
        (_mutate(facts={**PERSON["facts"], "birth": {"year": "nineteen", "city": "Gouda"}}), None,
         ["ada_test.yaml", "'ada_test'", "'facts.birth.year'", "{birth_year}", "year", "'nineteen'"]),
        (_mutate(wrong_values={"birth_year": [1912, "soon"]}), None,
         ["ada_test.yaml", "'ada_test'", "'wrong_values.birth_year[1]'", "year", "'soon'"]),
        (None, {**TEMPLATES, "extractors": {**TEMPLATES["extractors"],
                                             "award_name": {"path": "facts.awards[0].name", "type": "number"}}},
         ["ada_test.yaml", "'facts.awards[0].name'", "{award_name}", "must be a number", "'Blue Kite'"]),
        (None, {**TEMPLATES, "extractors": {**TEMPLATES["extractors"],
                                             "award_name": {"path": "facts.awards[0].name", "type": "colour"}}},
         ["facts.yaml", "'award_name'", "'extractors.type'", "'colour'"]),
    ],
    ids=["year-in-words", "wrong-value-not-a-year", "declared-number", "unknown-type"],
)
def test_values_are_checked_against_their_extractor_type(tmp_path: Path, person, templates, expected) -> None:
    root = write_dataset(tmp_path, person, templates)
    with pytest.raises(CatalogError) as info:
        load_all(root)
    for part in expected:
        assert part in str(info.value)


def test_years_in_digits_pass_as_numbers_or_strings(tmp_path: Path) -> None:
    person = _mutate(facts={**PERSON["facts"], "birth": {"year": "1911", "city": "Gouda"}})
    people, templates = load_all(write_dataset(tmp_path, person))
    assert templates.types == {"birth_year": "year", "award_name": "text"}
    assert resolve(people["ada_test"], "facts.birth.year") == "1911"


def test_template_nobody_can_fill_is_skipped_with_a_note(tmp_path: Path) -> None:
    """People met in the inbox may have a fact no profile has: its templates wait instead of failing the run."""
    templates = {**TEMPLATES, "extractors": {**TEMPLATES["extractors"], "birth_year": {"path": "facts.birth.yeer"}}}
    root = write_dataset(tmp_path, None, templates)
    people, loaded = load_people(root / "people"), load_templates(root / "templates")
    notes = validate_catalog(people, loaded)
    skipped = [n for n in notes if "no known person has it" in n]
    assert len(skipped) == 1 and "facts.yaml" in skipped[0] and "'facts.birth.yeer'" in skipped[0]
    assert "birth_year" in skipped[0]


def test_self_reported_person_without_a_template_is_a_note_not_an_error(tmp_path: Path) -> None:
    root = write_dataset(tmp_path)
    (root / "people" / "quiet.yaml").write_text(yaml.safe_dump(
        {"id": "quiet", "name": "Quiet Person", "kind": "fictional", "facts": {"note": {"love": {"name": "Jazz"}}}}))
    people, templates = load_people(root / "people"), load_templates(root / "templates")
    with pytest.raises(CatalogError, match="no template applies"):
        validate_catalog(people, templates)
    notes = validate_catalog(people, templates, self_reported={"quiet"})
    assert any(n.startswith("quiet:") for n in notes)
