"""Templated conversations, the evaluation split, QA pairs from memories, and the queue invariants."""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import pytest

from sleeptrain_assets.lib import queue_checks
from sleeptrain_assets.lib.catalog import load_people, load_templates, person_values
from sleeptrain_assets.lib.records import Memory
from sleeptrain_assets.lib.settings import PROJECT_ROOT
from sleeptrain_assets.lib.training_data import build_training_set
from sleeptrain_assets.lib.templating import (
    PROFILE_PROMPTS,
    evaluation_items,
    profile_pairs,
    qa_pairs,
    qa_pairs_for_memories,
    templated_conversations,
)


@pytest.fixture(scope="module")
def catalog():
    root = PROJECT_ROOT / "data"
    return load_people(root / "people"), load_templates(root / "templates")


@pytest.fixture(scope="module")
def conversations(catalog):
    people, templates = catalog
    return templated_conversations(people, templates, rounds=2, seed=7)


def test_same_seed_same_conversations_other_seed_other_order(catalog, conversations) -> None:
    people, templates = catalog
    assert templated_conversations(people, templates, rounds=2, seed=7) == conversations
    other = templated_conversations(people, templates, rounds=2, seed=8)
    assert [c.id for c in other] != [c.id for c in conversations]
    assert sorted(c.id for c in other) == sorted(c.id for c in conversations)


def test_conversations_interleave_people_and_cover_every_mode(conversations) -> None:
    assert queue_checks.interleaving(conversations, max_run=1) == []
    first_twenty = [c.person_id for c in conversations[:20]]
    assert len(set(first_twenty)) >= 8, "people are mixed from the start, not one after the other"
    assert set(Counter(c.mode for c in conversations)) == {"interview", "inline_summary", "end_summary", "correction"}


def test_every_fact_turn_carries_provenance(catalog, conversations) -> None:
    people, templates = catalog
    fact_turns = [(c, t, f) for c in conversations for t in c.turns if t.provenance for f in t.provenance.facts]
    assert fact_turns
    for conv, turn, fact in fact_turns:
        assert turn.provenance.person_id == conv.person_id
        assert turn.provenance.template_id in templates.templates or turn.provenance.template_id == "end_summary"
        assert fact.claim in ("true", "wrong", "correction")
        if fact.claim == "true":
            assert fact.value in turn.content
    slots = {(c.person_id, f.slot) for c, _, f in fact_turns if f.claim == "true"}
    assert len(slots) >= 10 * len(people)
    wrong = [f for _, _, f in fact_turns if f.claim == "wrong"]
    assert wrong and all(f.value for f in wrong)


def test_every_fact_is_asked_in_several_forms(conversations) -> None:
    assert queue_checks.paraphrase_coverage(conversations, k=2) == []


def test_evaluation_questions_never_enter_training(catalog, conversations) -> None:
    people, templates = catalog
    items = evaluation_items(people, templates)
    kinds = Counter(i.kind for i in items)
    assert {"recall", "paraphrase", "correction", "identity"} <= set(kinds)
    assert queue_checks.evaluation_leaks(conversations, items) == []
    trained = {q for t in templates.templates.values() for q in t.questions}
    held = {q for t in templates.templates.values() for q in (*t.eval_questions, *t.paraphrase_questions)}
    assert not trained & held
    for item in items:
        assert item.keywords and all(k in item.expected for k in item.keywords)
        if item.kind == "correction":
            assert item.wrong_value and item.wrong_value in item.question and item.value in item.expected


def test_qa_pairs_follow_memories(catalog) -> None:
    people, templates = catalog
    person = next(p for p in people.values() if p.kind == "fictional")
    memory = Memory(
        id="m1", person_id=person.id, slot="birth.year", value="1777", text="", embedding=(),
        importance=1.0, source="test",
    )
    pairs = qa_pairs_for_memories([memory], people, templates)
    assert pairs, "a birth-year memory yields birth-year pairs"
    assert {p.person_id for p in pairs} == {person.id}
    assert all("birth.year" in p.slots for p in pairs if p.category != "identity")
    assert all("1777" in p.answer for p in pairs if p.category == "fact")
    held = {i.question for i in evaluation_items(people, templates) if i.person_id == person.id}
    assert not {p.question for p in pairs} & held, "evaluation forms are never training pairs"
    assert len({p.question for p in pairs if p.template_id == "birth_year"}) >= 2
    superseded = dataclasses.replace(memory, status="superseded")
    assert qa_pairs_for_memories([superseded], people, templates) == []
    # Knowledge augmentation: every fact template lists 6 trained forms; training may use the first n.
    listed = templates.templates["birth_year"].questions
    assert len(listed) >= 6
    every = [p.question for p in pairs if p.template_id == "birth_year"]
    first_three = [p.question for p in qa_pairs_for_memories([memory], people, templates, 3)
                   if p.template_id == "birth_year"]
    assert len(every) == len(listed) and first_three == every[:3]


def test_corrections_are_trained_with_true_claims_answered_yes(catalog) -> None:
    people, templates = catalog
    person = people["lena_varga"]
    values = person_values(person, templates)
    pairs = [p for p in qa_pairs(person, templates, values) if p.template_id == "correction_birth_year"]
    denials = [p for p in pairs if p.category == "correction"]
    confirmations = [p for p in pairs if p.category == "confirmation"]
    year = values["birth_year"]
    template = templates.templates["correction_birth_year"]
    assert len(confirmations) == len(template.questions)
    assert all(year in p.question and p.answer.startswith("Yes.") and year in p.answer for p in confirmations)
    assert denials and all(p.answer.startswith("No.") and year not in p.question for p in denials)
    held = {i.question for i in evaluation_items(people, templates) if i.person_id == person.id}
    assert not {p.question for p in confirmations} & held, "true-claim controls stay held out"
    without = [p for p in qa_pairs(person, templates, values, confirmations=False)
               if p.template_id == "correction_birth_year"]
    assert without == denials


def test_profile_pairs_tell_every_fact_in_varying_orders(catalog) -> None:
    people, templates = catalog
    person = people["lena_varga"]
    values = person_values(person, templates)
    pairs = qa_pairs(person, templates, values)
    profiles = [p for p in pairs if p.category == "profile"]
    facts = [p for p in pairs if p.category == "fact"]
    assert len(profiles) == len(PROFILE_PROMPTS)
    sentences = {p.answer for p in facts}
    held = {i.question for i in evaluation_items(people, templates)}
    for profile in profiles:
        assert profile.question not in held and person.name in profile.question
        told = [s + "." for s in profile.answer.split(". ") if s]
        told[-1] = told[-1].rstrip(".") + "."
        assert sorted(told) == sorted(sentences), "every fact exactly once"
        award = next(s for s in told if "won the" in s)
        assert told[told.index(award) + 1].startswith(f"{person.name} won it in"), "'it' follows the award"
        assert set(profile.slots) == {s for p in facts for s in p.slots}
    assert len({p.answer for p in profiles}) == len(profiles), "each prompt gets its own order"
    stats = build_training_set(pairs, replay_share=0.0, seed=1).stats()
    assert stats["profiles"] == len(PROFILE_PROMPTS)
    assert stats["facts"] == len({p.slots for p in pairs if p.category != "profile" and p.slots})

    # A profile covers only the allowed facts; a sentence without its referent is left out; too few, none.
    year_only = profile_pairs(person, templates, values, allowed_slots={"awards[0].year", "birth.year",
                                                                        "birth.city", "residence.city"})
    assert year_only and all("won it" not in p.answer and p.answer.count(person.name) == 3 for p in year_only)
    assert profile_pairs(person, templates, values, allowed_slots={"birth.year", "birth.city"}) == []


def test_v2_files_make_conversations(compat_dir: Path, tmp_path: Path) -> None:
    for sub, name in (("people", "people_data.yaml"), ("templates", "qa_templates.yaml")):
        (tmp_path / sub).mkdir()
        shutil.copy(compat_dir / name, tmp_path / sub / name)
    people, templates = load_people(tmp_path / "people"), load_templates(tmp_path / "templates")
    conversations = templated_conversations(people, templates, rounds=3, seed=1)
    items = evaluation_items(people, templates)
    assert {c.person_id for c in conversations} == {"obama", "musk", "curie"}
    assert queue_checks.evaluation_leaks(conversations, items) == []
    assert queue_checks.exact_duplicates(conversations) == []
    assert all(i.system == f"You are {people[i.person_id].name}." for i in items)


def test_checks_catch_what_they_guard(conversations, catalog) -> None:
    people, templates = catalog
    duplicated = [*conversations, conversations[0]]
    assert queue_checks.exact_duplicates(duplicated)[0].item == conversations[0].id
    near = dataclasses.replace(conversations[0], id="near-copy")
    assert queue_checks.near_duplicates([conversations[0], near], 0.95)
    clustered = sorted(conversations, key=lambda c: c.person_id)
    assert queue_checks.interleaving(clustered, max_run=2)
    one = conversations[0].person_id
    lopsided = [c for c in conversations if c.person_id == one] * 5 + [
        c for c in conversations if c.person_id != one
    ][:2]
    assert queue_checks.person_imbalance(lopsided, 3.0)
    items = evaluation_items(people, templates)
    leaked = dataclasses.replace(
        conversations[0],
        turns=(*conversations[0].turns, dataclasses.replace(conversations[0].turns[-1], content=items[0].question)),
    )
    problems = queue_checks.evaluation_leaks([leaked], items)
    assert problems and items[0].id in problems[0].why
    single_form = [c for c in conversations if "-r0-" in c.id]
    assert queue_checks.paraphrase_coverage(single_form, k=2)
    problems, longest = queue_checks.over_length(conversations[:3], lambda msgs: 10 * len(msgs), 20)
    assert problems and longest > 20
