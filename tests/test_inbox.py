"""Inbox reader: valid files become inbox conversations; a bad line sets the whole file aside, naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sleeptrain_assets.lib import inbox
from sleeptrain_assets.lib.free_text import extract_facts
from sleeptrain_assets.lib.hippocampus import candidates_from_conversations
from sleeptrain_assets.lib.learned_people import (
    facts_from_memories,
    load_all_people,
    trusted_profiles,
    write_learned_person,
)
from sleeptrain_assets.lib.records import Memory, Person

KNOWN = {"lena_varga": "Lena Varga"}
SASKIA = {"person": "saskia_claes", "name": "Saskia Claes", "messages": [
    {"role": "assistant", "content": "Tell me about yourself."},
    {"role": "user", "content": "I was born in Ghent in 1979. These days I work as a luthier."}]}


def _jsonl(*records: object) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records).encode() + b"\n"


def test_valid_file_reads_every_conversation_with_stable_ids() -> None:
    lena = {"person": "lena_varga", "messages": [{"role": "user", "content": "I moved to Ghent in 2020."}]}
    read = inbox.parse_inbox_bytes("day1.jsonl", _jsonl(SASKIA, "", lena), KNOWN)
    assert read.ok and len(read.conversations) == 2
    assert read.names == {"saskia_claes": "Saskia Claes"}
    first = read.conversations[0]
    assert first.mode == "inbox" and first.person_id == "saskia_claes"
    assert first.id == f"inbox-day1-{read.sha256[:8]}-l1" and read.conversations[1].id.endswith("-l3")
    assert inbox.parse_inbox_bytes("day1.jsonl", _jsonl(SASKIA, "", lena), KNOWN).conversations == read.conversations


@pytest.mark.parametrize(
    ("records", "line", "field", "problem"),
    [
        ((SASKIA, "{not json"), 2, None, "not valid JSON"),
        ((SASKIA, {"person": "new_one", "messages": [{"role": "user", "content": "Hi, I am new."}]}), 2, "name",
         "is required"),
        ((SASKIA, {**SASKIA, "messages": [{"role": "robot", "content": "x"}]}), 2, "messages[0].role", "must be one of"),
        (({**SASKIA, "messages": [{"role": "user", "content": "  "}]},), 1, "messages[0].content", "non-empty"),
        (({**SASKIA, "person": "Saskia Claes"},), 1, "person", "lowercase identifier"),
        (({"person": "lena_varga", "name": "Lena Vargas", "messages": SASKIA["messages"]},), 1, "name", "differs"),
        (({**SASKIA, "messages": [{"role": "assistant", "content": "Hello?"}]},), 1, "messages", "no user message"),
        ((SASKIA, {**SASKIA, "mood": "happy"}), 2, "mood", "is not a field"),
    ],
    ids=["broken-json", "unknown-person-without-name", "bad-role", "empty-content", "bad-id", "name-mismatch",
         "no-user-turn", "unknown-field"],
)
def test_a_bad_line_sets_the_whole_file_aside_naming_file_line_and_field(records, line, field, problem) -> None:
    read = inbox.parse_inbox_bytes("day2.jsonl", _jsonl(*records), KNOWN)
    assert not read.ok and read.conversations == (), "a file with a bad line is never half-read"
    assert (read.error.file, read.error.line, read.error.field) == ("day2.jsonl", line, field)
    assert problem in read.error.problem
    assert "day2.jsonl" in str(read.error) and f"line {line}" in str(read.error)


def test_unreadable_and_empty_files_are_set_aside() -> None:
    assert "not UTF-8" in inbox.parse_inbox_bytes("x.jsonl", b"\xff\xfe", KNOWN).error.problem
    assert "no conversations" in inbox.parse_inbox_bytes("x.jsonl", b"\n\n", KNOWN).error.problem


def test_plan_batch_skips_seen_files_rereads_changed_ones_and_counts_conversations(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(_jsonl(SASKIA))
    (tmp_path / "b.jsonl").write_bytes(_jsonl(SASKIA, SASKIA))
    (tmp_path / "bad.jsonl").write_bytes(b"{oops\n")
    (tmp_path / "notes.txt").write_text("not an inbox file")
    plan = inbox.plan_batch(tmp_path, {}, KNOWN, min_conversations=1)
    assert [f.name for f in plan.files] == ["a.jsonl", "b.jsonl"] and plan.conversations == 3
    assert [f.name for f in plan.rejected] == ["bad.jsonl"] and plan.skip_reason is None
    seen = plan.claimed()
    assert inbox.plan_batch(tmp_path, seen, KNOWN, 1).skip_reason.startswith("no new conversation files")
    (tmp_path / "a.jsonl").write_bytes(_jsonl(SASKIA, SASKIA))
    again = inbox.plan_batch(tmp_path, seen, KNOWN, min_conversations=3)
    assert [f.name for f in again.files] == ["a.jsonl"]
    assert "below the minimum of 3" in again.skip_reason


def test_ledger_records_cycles_and_rejections_atomically() -> None:
    assert inbox.load_ledger() == {"files": {}} and inbox.last_cycle_number(inbox.load_ledger()) == 0
    inbox.record_files("cycle-000002", {"a.jsonl": "ab" * 32}, "claimed")
    ledger = inbox.record_files("", {"bad.jsonl": "cd" * 32}, "rejected")
    assert inbox.last_cycle_number(ledger) == 2 and inbox.last_cycle_number(ledger, ["cycle-000007"]) == 7
    assert inbox.ledger_seen(inbox.load_ledger()) == {"a.jsonl": "ab" * 32, "bad.jsonl": "cd" * 32}
    bad = inbox.parse_inbox_bytes("bad.jsonl", b"{oops\n", KNOWN)
    record = json.loads(inbox.write_rejection(bad).read_text())
    assert record["file"] == "bad.jsonl" and record["line"] == 1 and record["sha256"] == bad.sha256
    assert inbox.cycle_key(12) == "cycle-000012" and inbox.cycle_number("cycle-000012") == 12


def test_the_issue_phrasing_yields_birth_and_occupation_facts() -> None:
    facts = {(f.slot, f.value) for f in extract_facts("I was born in Ghent in 1979. These days I work as a luthier.",
                                                       "Saskia Claes")}
    assert facts == {("birth.year", "1979"), ("birth.city", "Ghent"), ("career.occupation", "luthier")}
    read = inbox.parse_inbox_bytes("d.jsonl", _jsonl(SASKIA), KNOWN)
    people = {"saskia_claes": Person("saskia_claes", "Saskia Claes", {}, kind="fictional")}
    slots = {c.slot for c in candidates_from_conversations(read.conversations, people)}
    assert slots == {"birth.year", "birth.city", "career.occupation"}, "assistant turns are not the person's words"


def _memory(slot: str, value: str, importance: float = 5.0, status: str = "active") -> Memory:
    return Memory(id=f"m-{slot}-{value}", person_id="saskia_claes", slot=slot, value=value, text="", embedding=(),
                  importance=importance, source="x#1", status=status)


def test_learned_people_persist_load_with_data_people_and_are_not_trusted_profiles(sleeptrain_env: Path) -> None:
    memories = [_memory("birth.year", "1979"), _memory("birth.city", "Ghent"),
                _memory("career.occupation", "luthier"), _memory("career.occupation", "baker", status="superseded"),
                _memory("awards[0].name", "Golden Fret")]
    assert facts_from_memories(memories) == {"awards": [{"name": "Golden Fret"}], "birth": {"city": "Ghent", "year": 1979},
                                             "career": {"occupation": "luthier"}}
    path = write_learned_person("saskia_claes", "Saskia Claes", memories)
    assert path == sleeptrain_env / "people" / "saskia_claes.yaml"
    assert write_learned_person("nobody", "No Body", []) is None
    people, learned = load_all_people()
    assert learned == {"saskia_claes"} and "lena_varga" in people
    assert people["saskia_claes"].facts["birth"]["year"] == 1979 and people["saskia_claes"].name == "Saskia Claes"
    trusted = trusted_profiles(people, learned)
    assert trusted["saskia_claes"].facts == {} and trusted["lena_varga"].facts == people["lena_varga"].facts


def test_a_learned_person_contradicting_their_earlier_words_corrects_the_memory_not_rejected() -> None:
    """Their facts are their own words, not a trusted profile: "now a carpenter" supersedes "luthier"."""
    from sleeptrain_assets.lib.hippocampus import decide
    from sleeptrain_assets.lib.records import CandidateFact

    person = Person("saskia_claes", "Saskia Claes", {"career": {"occupation": "luthier"}}, kind="fictional")
    stored = [Memory(id="m-old", person_id="saskia_claes", slot="career.occupation", value="luthier",
                     text="These days I work as a luthier.", embedding=(), importance=5.0, source="c1#1")]
    claim = CandidateFact("saskia_claes", "career.occupation", "carpenter", "I work as a carpenter now.",
                          conversation_id="c2", turn_index=1)
    [as_trusted] = decide([claim], {"saskia_claes": person}, stored, losses={}, routing=None)
    assert as_trusted.action == "REJECT", "a trusted profile would refuse the change"
    [as_learned] = decide([claim], trusted_profiles({"saskia_claes": person}, {"saskia_claes"}), stored)
    assert as_learned.action == "CORRECT" and as_learned.superseded_id == "m-old"
