"""Training-set assembly: interleaving, paraphrases, importance-ranked and general replay, determinism."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from sleeptrain_assets.lib.records import Memory, QAPair
from sleeptrain_assets.lib.training_data import (
    NEW,
    REPLAY_GENERAL,
    REPLAY_MEMORY,
    build_training_set,
    interleave,
    load_replay_prompts,
    longest_run,
    memory_key,
    pair_importance,
    pick_general_prompts,
    replay_counts,
    select_older_pairs,
    split_memories,
    usable_answer,
)
from tests.lora_helpers import qa_pairs

REPO = Path(__file__).resolve().parents[1]


def _pair(pid: str, slot: str, n: int) -> QAPair:
    return QAPair(pid, slot, "fact", f"Question {n} about {pid} {slot}?", f"{pid} {slot} answer.", (slot,), ("v",))


def _memory(pid: str, slot: str, importance: float, value: str = "v") -> Memory:
    return Memory(id=f"{pid}-{slot}", person_id=pid, slot=slot, value=value, text="", embedding=(),
                  importance=importance, source="c#0")


def test_new_pairs_are_all_kept_and_interleaved_across_people() -> None:
    pairs = [_pair("a", f"s{i}", k) for i in range(10) for k in range(3)] + [_pair("b", "s", k) for k in range(6)]
    pairs += [_pair("c", "s", k) for k in range(6)]
    ts = build_training_set(pairs, replay_share=0.0, seed=1)
    assert sorted(e.messages for e in ts.examples) == sorted(tuple((m["role"], m["content"]) for m in p.messages())
                                                             for p in pairs)
    stats = ts.stats()
    assert stats["min_paraphrases_per_fact"] == 3 and stats["people"] == 3
    # 30 of 42 are one person: runs of 3 are unavoidable (30 items, 13 gaps); left over at the end they'd be 18.
    assert stats["longest_run_of_one_person"] <= 4
    balanced = build_training_set(qa_pairs(), replay_share=0.0, seed=1)
    assert balanced.stats()["longest_run_of_one_person"] == 1


def test_same_seed_same_set_and_hash_other_seed_other_order() -> None:
    one = build_training_set(qa_pairs(), replay_share=0.0, seed=5)
    assert build_training_set(qa_pairs(), replay_share=0.0, seed=5) == one
    other = build_training_set(qa_pairs(), replay_share=0.0, seed=6)
    assert other.data_hash != one.data_hash
    assert sorted(e.messages for e in other.examples) == sorted(e.messages for e in one.examples)


def test_replay_fills_its_share_from_older_memories_and_general_answers() -> None:
    new = qa_pairs()  # 14 pairs
    older = [(_pair("old", f"slot{i}", k), float(i)) for i in range(10) for k in range(2)]
    general = [(f"Everyday prompt {i}?", f"A complete answer number {i}.") for i in range(3)]
    ts = build_training_set(new, older, general, replay_share=0.5, seed=2)
    counts = ts.stats()["by_source"]
    assert counts[NEW] == 14
    assert counts[REPLAY_MEMORY] + counts[REPLAY_GENERAL] == 14
    assert counts[REPLAY_MEMORY] == 7 and counts[REPLAY_GENERAL] == 7  # 3 answers, repeated to fill their half
    replayed = {e.fact for e in ts.examples if e.source == REPLAY_MEMORY}
    assert replayed == {f"old:slot{i}" for i in range(3, 10)}, "the most important older facts come first"


def test_every_older_fact_is_replayed_when_asked_up_to_as_many_as_the_new_pairs() -> None:
    new = qa_pairs()  # 14 pairs
    older = [(_pair("old", f"slot{i}", k), float(i)) for i in range(10) for k in range(2)]
    general = [(f"Everyday prompt {i}?", f"A complete answer number {i}.") for i in range(3)]
    sparse = build_training_set(new, older, general, replay_share=0.25, seed=2)
    assert sparse.stats()["by_source"][REPLAY_MEMORY] == 3, "the budget alone: a quarter, split with general"
    every = build_training_set(new, older, general, replay_share=0.25, seed=2, replay_every_older_fact=True)
    assert {e.fact for e in every.examples if e.source == REPLAY_MEMORY} == {f"old:slot{i}" for i in range(10)}
    assert every.stats()["by_source"][REPLAY_MEMORY] == 10
    assert every.stats()["by_source"][REPLAY_GENERAL] == sparse.stats()["by_source"][REPLAY_GENERAL] == 2
    many = [(_pair("old", f"slot{i}", 0), 1.0) for i in range(40)]
    capped = build_training_set(new, many, general, replay_share=0.25, seed=2, replay_every_older_fact=True)
    assert capped.stats()["by_source"][REPLAY_MEMORY] == 14, "never more older pairs than new ones"


def test_older_pairs_spread_over_facts_before_repeating_paraphrases() -> None:
    older = [(_pair("p", "a", k), 9.0) for k in range(5)] + [(_pair("p", "b", k), 1.0) for k in range(5)]
    chosen = select_older_pairs(older, 4, seed=0)
    assert [p.slots[0] for p in chosen] == ["a", "b", "a", "b"]
    assert select_older_pairs(older, 4, seed=0) == chosen


def test_replay_counts() -> None:
    assert replay_counts(30, 0.25, 100, 100) == (5, 5)
    assert replay_counts(30, 0.25, 2, 100) == (2, 8)
    assert replay_counts(30, 0.25, 100, 0) == (10, 0)
    assert replay_counts(30, 0.0, 100, 100) == (0, 0)
    assert replay_counts(30, 0.25, 100, 100, older_facts=20) == (20, 5), "older facts past the budget"
    assert replay_counts(10, 0.25, 100, 100, older_facts=40) == (10, 1), "at most as many as the new pairs"
    assert replay_counts(30, 0.25, 4, 100, older_facts=20) == (4, 6), "no more than there are"
    assert replay_counts(30, 0.25, 100, 0, older_facts=20) == (20, 0)
    with pytest.raises(ValueError, match="replay_share"):
        replay_counts(30, 1.0, 1, 1)


def test_usable_answer_cuts_back_to_the_last_full_sentence() -> None:
    assert usable_answer("Boil water. Add the egg. Wait ten min") == "Boil water. Add the egg."
    assert usable_answer("Drink water before bed!") == "Drink water before bed!"
    assert usable_answer("Sure, here is a long sentence that never") is None
    assert usable_answer("Ok.") is None


def test_memories_split_by_what_the_adapter_holds() -> None:
    a, b = _memory("p", "birth.year", 5.0), _memory("p", "birth.city", 2.0)
    corrected = _memory("p", "birth.year", 5.0, value="1985")
    new, older = split_memories([corrected, b], [memory_key(a), memory_key(b)])
    assert new == [corrected] and older == [b]
    weighted = pair_importance([_pair("p", "birth.city", 0)], [a, b])
    assert weighted[0][1] == 2.0


def test_interleave_helpers() -> None:
    assert longest_run("aabbbc") == 3
    order = interleave(list("aaaabbbbcc"), key=lambda x: x, seed=0)
    assert longest_run(order) == 1 and sorted(order) == sorted("aaaabbbbcc")
    assert pick_general_prompts(["x", "y", "x", "z"], 2, seed=1) == pick_general_prompts(["x", "y", "z"], 2, seed=1)


def test_empty_or_malformed_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no new QA pairs"):
        build_training_set([])
    with pytest.raises(ValueError, match=r"new_pairs\[0\] \(p/t\)"):
        build_training_set([QAPair("p", "t", "fact", "Q?", " ", ("s",), ("v",))])
    bad = tmp_path / "prompts.yaml"
    bad.write_text("prompts:\n  - fine\n  - 3\n")
    with pytest.raises(ValueError, match=r"prompts.yaml: prompts\[1\]"):
        load_replay_prompts(bad)


def _normalized(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def test_shipped_replay_prompts_are_many_and_never_evaluation_questions() -> None:
    prompts = load_replay_prompts(REPO / "data" / "benchmarks" / "replay_prompts.yaml")
    assert len(prompts) >= 50
    evaluation = set()
    for path in (REPO / "data" / "benchmarks").glob("*.yaml"):
        if path.name == "replay_prompts.yaml":
            continue
        data = yaml.safe_load(path.read_text())
        for item in (data or {}).get("questions", []) if isinstance(data, dict) else []:
            if isinstance(item, dict) and "question" in item:
                evaluation.add(_normalized(item["question"]))
    overlap = [p for p in prompts if _normalized(p) in evaluation]
    assert not overlap, f"replay prompts reuse evaluation questions: {overlap}"


def test_replay_teachers_travel_with_their_examples() -> None:
    from sleeptrain_assets.lib.training_data import ReplayTarget, ReplayTargets, TrainingExample

    teacher = (((5, 9), (-0.2, -1.9)), ((2, 7), (-0.01, -5.0)))
    targets = ReplayTargets(targets=(ReplayTarget("How do I boil an egg?", "Boil it.", teacher),),
                            base_sha256="a" * 64, top_k=2, max_new_tokens=24, prompts_sha256="b" * 64,
                            unusable=("Write a poem.",))
    assert ReplayTargets.from_dict(json.loads(json.dumps(targets.to_dict()))) == targets
    built = build_training_set(qa_pairs(), general_answers=targets.answers(), replay_share=0.25, seed=1)
    general = [e for e in built.examples if e.source == REPLAY_GENERAL]
    assert general and all(e.teacher == teacher for e in general)
    assert all(e.teacher is None for e in built.examples if e.source != REPLAY_GENERAL)
    for example in general[:1] + [e for e in built.examples if e.source != REPLAY_GENERAL][:1]:
        assert TrainingExample.from_dict(json.loads(json.dumps(example.to_dict()))) == example
    # The teacher is part of what was trained on.
    plain = build_training_set(qa_pairs(), general_answers=[t[:2] for t in targets.answers()], replay_share=0.25,
                               seed=1)
    assert plain.data_hash != built.data_hash
