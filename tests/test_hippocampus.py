"""The hippocampus: candidates from the queue, STORE/REJECT/CORRECT/MERGE with reasons, and its Dagster assets."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from sleeptrain_assets.lib.hippocampus import (
    HippocampusRules,
    candidate_id,
    candidates_from_conversations,
    decide,
    loss_requests,
    memory_id,
    summarize,
)
from sleeptrain_assets.lib.records import CandidateFact, Conversation, FactClaim, Memory, Person, Provenance, Turn
from sleeptrain_resources.embedding import Embedder
from sleeptrain_resources.memory_store import LocalMemoryStore

LENA = Person(
    id="lena_varga",
    name="Lena Varga",
    kind="fictional",
    facts={"birth": {"year": 1984, "city": "Leuven"},
           "career": {"occupation": "glassblower", "employer": "Atelier Noord", "since": 2009},
           "residence": {"city": "Mechelen"}},
    wrong_values={"birth_year": [1986, 1981]},
)
ANN = Person(id="ann", name="Ann Peeters", kind="fictional", facts={"birth": {"year": 1990}})
PROFILES = {p.id: p for p in (LENA, ANN)}


def prov(slot: str, value: str, claim: str = "true", template: str = "birth_year", question: str | None = None,
         person: str = "lena_varga") -> Provenance:
    return Provenance(person, template, (FactClaim(slot, value, claim),), question)


def day_conversation() -> Conversation:
    return Conversation("lena-r0-interview-0", "lena_varga", "interview", (
        Turn("system", "You are a friendly assistant getting to know Lena Varga."),
        Turn("assistant", "When were you born?"),
        Turn("user", "I was born in 1984.", prov("birth.year", "1984", question="When were you born?")),
        Turn("assistant", "Noted: Lena Varga was born in 1984.", prov("birth.year", "1984")),
        Turn("user", "Could you sum up what you learned about me?"),
        Turn("assistant", "Here is what I learned: Lena Varga was born in Leuven. Lena Varga worked as a glassblower.",
             Provenance("lena_varga", "end_summary", (FactClaim("birth.city", "Leuven"),
                                                      FactClaim("career.occupation", "glassblower")))),
    ))


def correction_conversation() -> Conversation:
    question = "You were born in 1986, weren't you?"
    return Conversation("lena-r0-correction-0", "lena_varga", "correction", (
        Turn("system", "You are a friendly assistant getting to know Lena Varga."),
        Turn("assistant", question, prov("birth.year", "1986", "wrong", "correction_birth_year", question)),
        Turn("user", "No, that's wrong. I was born in 1984, not 1986.",
             prov("birth.year", "1984", "correction", "correction_birth_year", question)),
    ))


def inbox(cid: str, person: str, *texts: str) -> Conversation:
    turns = [Turn("user", t) if i % 2 == 0 else Turn("assistant", t) for i, t in enumerate(texts)]
    return Conversation(cid, person, "inbox", tuple(turns))


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture
def run(embedder: Embedder):
    def run(candidates, stored=(), losses=None, rules=None, routing=None):
        vectors = embedder.embed([c.text for c in candidates])
        return decide(candidates, PROFILES, stored, vectors, losses or {}, rules, routing)

    return run


def stored_memory(embedder: Embedder, person: str, slot: str, value: str, text: str, importance: float = 5.0) -> Memory:
    return Memory(id=memory_id(person, slot, value), person_id=person, slot=slot, value=value, text=text,
                  embedding=tuple(embedder.embed([text])[0].tolist()), importance=importance, source="old#1")


# --------------------------------------------------------------------------- candidates


def test_annotated_turns_yield_one_candidate_per_claim() -> None:
    got = candidates_from_conversations([day_conversation(), correction_conversation()], PROFILES)
    assert [(c.slot, c.value, c.claim, c.turn_index, c.text) for c in got] == [
        ("birth.year", "1984", "true", 2, "I was born in 1984."),
        ("birth.year", "1984", "true", 3, "Lena Varga was born in 1984."),
        ("birth.city", "Leuven", "true", 5, "Lena Varga was born in Leuven."),
        ("career.occupation", "glassblower", "true", 5, "Lena Varga worked as a glassblower."),
        ("birth.year", "1986", "wrong", 1, "You were born in 1986, weren't you?"),
        ("birth.year", "1984", "correction", 2, "I was born in 1984, not 1986."),
    ]
    assert {c.person_id for c in got} == {"lena_varga"}
    assert got[0].conversation_id == "lena-r0-interview-0" and got[0].template_id == "birth_year"


def test_free_text_statements_by_the_person_become_candidates() -> None:
    conv = inbox("inbox-1", "ann", "I moved to Utrecht in 2019. Do you like it there?",
                 "That sounds lovely! I moved to Paris in 2001.", "My wife Marie and I have two children.")
    got = candidates_from_conversations([conv], PROFILES)
    assert [(c.slot, c.value, c.turn_index, c.claim, c.template_id) for c in got] == [
        ("residence.since", "2019", 0, "true", None),
        ("residence.city", "Utrecht", 0, "true", None),
        ("family.children", "2", 2, "true", None),
        ("family.spouse", "Marie", 2, "true", None),
    ]
    assert got[0].text == "I moved to Utrecht in 2019."
    # Conversations that carry annotations are not mined as free text: every fact there is annotated.
    mixed = Conversation("c", "ann", "interview", (Turn("user", "I moved to Rome in 2020."),
                                                   Turn("user", "I was born in 1990.", prov("birth.year", "1990", person="ann"))))
    assert [(c.slot, c.value) for c in candidates_from_conversations([mixed], PROFILES)] == [("birth.year", "1990")]


def test_loss_requests_ask_the_question_the_fact_answers() -> None:
    convs = [day_conversation(), correction_conversation()]
    cands = candidates_from_conversations(convs, PROFILES)
    requests = loss_requests(cands, convs, PROFILES)
    persona, answer = requests[candidate_id(cands[0])]
    assert persona == [{"role": "system", "content": "You are Lena Varga."},
                       {"role": "user", "content": "When were you born?"}] and answer == "I was born in 1984."
    summary = requests[candidate_id(cands[2])]
    assert summary == ([{"role": "user", "content": "What do you know about Lena Varga?"}],
                       "Lena Varga was born in Leuven.")
    # The wrong claim is measured, and so is the profile's value a CORRECT would write instead.
    assert memory_id("lena_varga", "birth.year", "1986") in requests
    assert len(requests) == 4


# --------------------------------------------------------------------------- decisions


def test_new_facts_are_stored_once_and_repeats_merge(run) -> None:
    cands = candidates_from_conversations([day_conversation()], PROFILES)
    losses = {candidate_id(c): 2.0 for c in cands}
    got = run(cands, losses=losses)
    assert [d.action for d in got] == ["STORE", "MERGE", "STORE", "STORE"]
    first, repeat = got[0], got[1]
    assert first.memory_id == memory_id("lena_varga", "birth.year", "1984") == repeat.memory_id
    expected = round(10 * (1 - np.exp(-2.0 / 2.0)), 4)
    assert first.importance == pytest.approx(expected) and first.scores["nll"] == 2.0
    assert first.scores["profile_agrees"] == 1.0
    assert repeat.importance == pytest.approx(expected + 0.5)
    assert "matches the trusted profile" in first.reason and "seen again" in repeat.reason
    for d in got:
        assert d.reason and {"importance", "teachability", "category_weight"} <= d.scores.keys()


def test_importance_follows_what_the_model_still_has_to_learn(run) -> None:
    cands = candidates_from_conversations([day_conversation()], PROFILES)
    keys = [candidate_id(c) for c in cands]
    got = run(cands, losses={keys[0]: 0.05, keys[2]: 3.0})
    assert got[0].action == "REJECT" and "already knows" in got[0].reason
    assert got[2].action == "STORE" and got[2].importance > 7.0
    assert got[3].scores["teachability"] == HippocampusRules().default_teachability
    assert "no loss measured" in got[3].reason
    weights = run(cands[2:3], losses={keys[2]: 1.0}, rules=HippocampusRules(category_weights={"fact": 0.5}))
    assert weights[0].importance == pytest.approx(round(10 * 0.5 * (1 - np.exp(-0.5)), 4))


def test_claims_against_the_profile_are_rejected(run) -> None:
    cands = candidates_from_conversations([correction_conversation()], PROFILES)
    got = run(cands)
    assert [d.action for d in got] == ["REJECT", "STORE"]
    assert "contradicts the trusted profile ('1984')" in got[0].reason and got[0].scores["profile_agrees"] == 0.0
    free = candidates_from_conversations([inbox("i", "lena_varga", "I was born in 1990.")], PROFILES)
    assert [d.action for d in run(free)] == ["REJECT"]


def test_a_wrong_stored_value_is_corrected_to_the_profile(run, embedder: Embedder) -> None:
    wrong = stored_memory(embedder, "lena_varga", "birth.year", "1986", "I was born in 1986.")
    cands = candidates_from_conversations([correction_conversation()], PROFILES)
    got = run(cands[:1], stored=[wrong])
    (d,) = got
    assert d.action == "CORRECT" and d.superseded_id == wrong.id
    assert d.candidate.value == "1984" and d.candidate.text == "Lena Varga: birth.year is 1984."
    assert d.memory_id == memory_id("lena_varga", "birth.year", "1984")
    assert "replaced by the profile's value" in d.reason
    # The person's own correction does the same from the other side.
    (fix,) = run(cands[1:], stored=[wrong])
    assert fix.action == "CORRECT" and fix.superseded_id == wrong.id and fix.candidate.value == "1984"


def test_free_text_contradictions_supersede_the_old_statement(run, embedder: Embedder) -> None:
    convs = [inbox("i1", "ann", "I moved to Utrecht in 2019."), inbox("i2", "ann", "I moved to Utrecht in 2021.")]
    got = run(candidates_from_conversations(convs, PROFILES))
    assert [(d.action, d.candidate.slot) for d in got] == [
        ("STORE", "residence.since"), ("STORE", "residence.city"),
        ("CORRECT", "residence.since"), ("MERGE", "residence.city")]
    assert got[2].superseded_id == memory_id("ann", "residence.since", "2019")
    # Worded the same under another slot: a different number or date is still a contradiction.
    old = stored_memory(embedder, "ann", "career.start_year", "2009", "I started working at Atelier Noord in 2009.")
    cands = candidates_from_conversations([inbox("i3", "ann", "I started working at Atelier Noord in 2011.")], PROFILES)
    got = run(cands, stored=[old])
    assert got[0].action == "CORRECT" and got[0].superseded_id == old.id
    assert "different year" in got[0].reason and got[0].scores["similarity"] > 0.9


def test_semantic_near_duplicates_merge(run, embedder: Embedder) -> None:
    home = stored_memory(embedder, "ann", "residence.city", "Mechelen", "I live in Mechelen.")
    cand = CandidateFact("ann", "home.city", "Mechelen", "I am living in Mechelen these days.",
                         conversation_id="i9", turn_index=0)
    (d,) = run([cand], stored=[home])
    assert d.action == "MERGE" and d.memory_id == home.id and "near-duplicate" in d.reason
    other_person = stored_memory(embedder, "lena_varga", "note.live.place", "Mechelen", "I live in Mechelen.")
    (d,) = run([cand], stored=[other_person])
    assert d.action == "STORE"


def test_routing_biases_move_the_gate_and_settle_unverifiable_contradictions(run) -> None:
    cands = candidates_from_conversations([day_conversation()], PROFILES)[2:3]
    losses = {candidate_id(cands[0]): 0.3}
    assert run(cands, losses=losses)[0].action == "STORE"
    cautious = {"STORE": 0.1, "REJECT": 0.8, "CORRECT": 0.1}
    assert run(cands, losses=losses, routing=cautious)[0].action == "REJECT"
    convs = [inbox("i1", "ann", "I moved to Utrecht in 2019."), inbox("i2", "ann", "I moved to Utrecht in 2021.")]
    got = run(candidates_from_conversations(convs, PROFILES), routing=cautious)
    assert got[2].action == "REJECT" and "keeps the stored value" in got[2].reason


def test_decisions_are_deterministic(run) -> None:
    convs = [day_conversation(), correction_conversation(), inbox("i", "ann", "I moved to Utrecht in 2019.")]
    cands = candidates_from_conversations(convs, PROFILES)
    losses = {candidate_id(c): 1.0 + i / 10 for i, c in enumerate(cands)}
    assert run(cands, losses=losses) == run(cands, losses=losses)


def test_replaying_the_same_queue_against_the_store_writes_nothing_new(run, embedder: Embedder, tmp_path: Path) -> None:
    convs = [day_conversation(), correction_conversation(), inbox("i", "ann", "I moved to Utrecht in 2019.")]
    cands = candidates_from_conversations(convs, PROFILES)
    store = LocalMemoryStore(root=str(tmp_path / "store"))
    first = run(cands)
    store.apply(first, embedder.embed([d.candidate.text for d in first]))
    active = {m.id for m in store.active_memories()}
    assert len(active) == summarize(first)["STORE"] == 5
    stored = [m for p in ("lena_varga", "ann") for m in store.by_person(p)]
    second = run(cands, stored=stored)
    assert {d.action for d in second} <= {"MERGE", "REJECT"}
    store.apply(second, embedder.embed([d.candidate.text for d in second]))
    assert {m.id for m in store.active_memories()} == active
    history = store.history(memory_id("lena_varga", "birth.year", "1984"))
    assert [h["op"] for h in history][:1] == ["STORE"] and all(h["reason"] for h in history)
    store.close()


# --------------------------------------------------------------------------- the Dagster assets


@pytest.mark.parametrize("backend", ["local", "pgvector"])
def test_memory_assets_materialize_with_either_backend(backend: str, embedder: Embedder,
                                                       request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from sleeptrain_assets.defs.memory import consolidated_memories, hippocampus_memories
    from sleeptrain_resources.llm import BaseModel
    from sleeptrain_resources.memory_store import PgVectorMemoryStore
    from sleeptrain_resources.registry import AdapterRegistry

    conversations = [day_conversation(), correction_conversation(),
                     inbox("inbox-1", "ann", "I moved to Utrecht in 2019.")]

    @dg.asset(name="validated_queue")
    def queue() -> list[Conversation]:
        return conversations

    @dg.asset(name="people_profiles")
    def profiles() -> dict[str, Person]:
        return PROFILES

    store = (LocalMemoryStore(root=str(tmp_path / "store")) if backend == "local"
             else PgVectorMemoryStore(url=request.getfixturevalue("postgres_url")))
    resources = {"memory_store": store, "embedder": embedder, "registry": AdapterRegistry(),
                 "base_model": BaseModel()}
    instance = dg.DagsterInstance.ephemeral()
    assets = [queue, profiles, hippocampus_memories, consolidated_memories]
    result = dg.materialize(assets, resources=resources, instance=instance)
    assert result.success
    decisions = result.output_for_node("hippocampus_memories")
    assert summarize(decisions) == {"STORE": 5, "REJECT": 1, "CORRECT": 0, "MERGE": 2}
    assert all(d.scores.get("nll", 0) > 0 for d in decisions)
    memories = result.output_for_node("consolidated_memories")
    assert {m.person_id for m in memories} == {"lena_varga", "ann"}

    events = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        events[materialization.asset_key.to_user_string()] = materialization
    meta = events["hippocampus_memories"].metadata
    assert meta["decisions"].value == {"STORE": 5, "REJECT": 1, "CORRECT": 0, "MERGE": 2}
    table = meta["decision_table"].value
    assert "contradicts the trusted profile" in table and "| STORE | lena_varga | birth.year | 1984 |" in table
    assert "lena_varga" in meta["memories_per_person"].value
    assert "actions" in events["consolidated_memories"].metadata

    # A second night over the same queue strengthens what is known and writes no new memory.
    again = dg.materialize(assets, resources=resources, instance=instance)
    assert {d.action for d in again.output_for_node("hippocampus_memories")} <= {"MERGE", "REJECT"}
    assert {m.id for m in again.output_for_node("consolidated_memories")} <= {m.id for m in memories}
    ops = store.operations()
    assert {o["op"] for o in ops} >= {"STORE", "REJECT", "MERGE"} and all(o["reason"] for o in ops)
    store.close()
