"""One contract, two backends: every test runs against LocalMemoryStore and PgVectorMemoryStore (real Postgres)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from sleeptrain_assets.lib.hippocampus import memory_id
from sleeptrain_assets.lib.records import CandidateFact, Decision, Memory
from sleeptrain_resources.embedding import DIM, MODEL_ID
from sleeptrain_resources.memory_store import (
    EmbeddingMismatchError,
    LocalMemoryStore,
    MemoryStore,
    MemoryStoreError,
    PgVectorMemoryStore,
    StatusChange,
    memory_store_from_env,
    normalize_postgres_url,
)

RNG_SEED = 1234


def unit(seed: int | str, dim: int = DIM) -> np.ndarray:
    if isinstance(seed, str):
        seed = int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def memory(person: str, slot: str, value: str, *, text: str | None = None, importance: float = 5.0,
           source: str = "c0#1", vector: np.ndarray | None = None) -> Memory:
    vec = unit(f"{person}/{slot}/{value}") if vector is None else vector
    return Memory(id=memory_id(person, slot, value), person_id=person, slot=slot, value=value,
                  text=text or f"{person} {slot} is {value}.", embedding=tuple(float(x) for x in vec),
                  importance=importance, source=source)


def decision(action: str, person: str, slot: str, value: str, *, importance: float = 5.0, conv: str = "c1",
             turn: int = 1, memory: str | None = None, superseded: str | None = None, reason: str = "") -> Decision:
    cand = CandidateFact(person_id=person, slot=slot, value=value, text=f"{person} {slot} is {value}.",
                         conversation_id=conv, turn_index=turn, template_id="t")
    mid = memory or (memory_id(person, slot, value) if action != "MERGE" else None)
    return Decision(action=action, candidate=cand, reason=reason or f"{action.lower()} for the test",
                    importance=importance, scores={"importance": importance}, memory_id=mid,
                    superseded_id=superseded)


def vectors_for(decisions: list[Decision]) -> np.ndarray:
    return np.stack([unit(f"{d.candidate.person_id}/{d.candidate.slot}/{d.candidate.value}") for d in decisions])


@pytest.fixture(params=["local", "pgvector"])
def make_store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Callable[..., MemoryStore]]:
    created: list[MemoryStore] = []

    def make(local: dict | None = None, pg: dict | None = None, **common) -> MemoryStore:
        if request.param == "local":
            store: MemoryStore = LocalMemoryStore(root=str(tmp_path / "store"), **common, **(local or {}))
        else:
            store = PgVectorMemoryStore(url=request.getfixturevalue("postgres_url"), **common, **(pg or {}))
        created.append(store)
        return store

    yield make
    for store in created:
        store.close()


@pytest.fixture
def store(make_store: Callable[..., MemoryStore]) -> MemoryStore:
    return make_store()


def ops(store: MemoryStore) -> list[str]:
    return [row["op"] for row in store.operations()]


# --------------------------------------------------------------------------- writes


def test_upsert_round_trips_every_field(store: MemoryStore) -> None:
    m = memory("lena", "birth.year", "1984", text="Lena Varga was born in 1984.", importance=6.25, source="c9#3")
    report = store.upsert([m])
    assert report.operations["STORE"] == 1 and report.written == (m.id,)
    got = store.get(m.id)
    assert got is not None
    assert (got.id, got.person_id, got.slot, got.value, got.text, got.importance, got.source, got.status) == (
        m.id, "lena", "birth.year", "1984", "Lena Varga was born in 1984.", 6.25, "c9#3", "active")
    assert np.allclose(got.embedding, m.embedding, atol=1e-6)
    assert got.created_at and got.updated_at
    assert store.get("m-unknown") is None
    assert store.count() == 1 and store.count(None) == 1
    assert store.stored_embedding() == (MODEL_ID, DIM)


def test_same_inputs_give_the_same_memory(store: MemoryStore) -> None:
    first = [decision("STORE", "lena", "birth.year", "1984", conv="a")]
    store.apply(first, vectors_for(first))
    again = [decision("STORE", "lena", "birth.year", " 1984 ", conv="b", importance=7.0)]
    report = store.apply(again, vectors_for(again))
    assert memory_id("lena", "birth.year", "1984") == memory_id("lena", "birth.year", " 1984 ")
    assert store.count() == 1
    assert report.operations["MERGE"] == 1 and report.merged == (memory_id("lena", "birth.year", "1984"),)
    assert store.get(memory_id("lena", "birth.year", "1984")).importance == 7.0
    # The same source a second time changes nothing, and says so.
    store.apply(again, vectors_for(again))
    last = store.operations(limit=1)[0]
    assert last["op"] == "MERGE" and "already recorded" in last["reason"]
    assert store.get(memory_id("lena", "birth.year", "1984")).importance == 7.0


def test_apply_store_correct_merge_reject(store: MemoryStore) -> None:
    old, new = memory_id("lena", "birth.year", "1986"), memory_id("lena", "birth.year", "1984")
    batch = [
        decision("STORE", "lena", "birth.year", "1986", importance=4.0, reason="new fact"),
        decision("STORE", "lena", "birth.city", "Leuven", importance=5.0, reason="new fact"),
        decision("REJECT", "lena", "occupation", "potter", reason="contradicts the profile"),
    ]
    store.apply(batch, vectors_for(batch))
    batch = [
        decision("CORRECT", "lena", "birth.year", "1984", importance=6.0, superseded=old, reason="profile says 1984",
                 conv="c2"),
        decision("MERGE", "lena", "birth.city", "Leuven", importance=5.5, memory=memory_id("lena", "birth.city", "Leuven"),
                 conv="c2", reason="seen again"),
    ]
    report = store.apply(batch, vectors_for(batch))
    assert report.operations == {"STORE": 0, "REJECT": 0, "CORRECT": 2, "MERGE": 1, "EVICT": 0, "PROMOTE": 0}
    assert report.superseded == (old,) and report.written == (new,)

    assert [m.value for m in store.by_slot("lena", "birth.year")] == ["1984"]
    assert [(m.value, m.status) for m in store.by_slot("lena", "birth.year", status=None)] == [
        ("1986", "superseded"), ("1984", "active")]
    assert store.get(old).status == "superseded"
    assert store.get(memory_id("lena", "birth.city", "Leuven")).importance == 5.5
    assert sorted(m.slot for m in store.by_person("lena")) == ["birth.city", "birth.year"]
    assert store.by_person("nobody") == []

    history = store.history(old)
    assert [(h["op"], h["memory_id"]) for h in history] == [("STORE", old), ("CORRECT", old), ("CORRECT", new)]
    assert "profile says 1984" in history[1]["reason"] and history[1]["related_id"] == new
    assert history[2]["related_id"] == old
    assert ops(store) == ["STORE", "STORE", "REJECT", "CORRECT", "CORRECT", "MERGE"]
    rejected = store.operations()[2]
    assert rejected["reason"] == "contradicts the profile" and rejected["value"] == "potter"
    assert rejected["details"]["scores"] == {"importance": 5.0}
    assert store.count() == 2 and store.count("superseded") == 1 and store.count(None) == 3


def test_a_store_into_a_held_slot_supersedes_it(store: MemoryStore) -> None:
    store.upsert([memory("lena", "residence.city", "Hasselt")])
    report = store.upsert([memory("lena", "residence.city", "Mechelen", source="c2#1")])
    assert report.operations["CORRECT"] == 2
    assert [m.value for m in store.by_slot("lena", "residence.city")] == ["Mechelen"]
    # Going back to the first value re-activates that memory rather than writing a second row.
    store.upsert([memory("lena", "residence.city", "Hasselt", source="c3#1")])
    rows = store.by_slot("lena", "residence.city", status=None)
    assert [(m.value, m.status) for m in rows] == [("Hasselt", "active"), ("Mechelen", "superseded")]
    assert "re-activates a superseded memory" in store.history(memory_id("lena", "residence.city", "Hasselt"))[-1]["reason"]


def test_merge_into_a_missing_target_stores_instead(store: MemoryStore) -> None:
    batch = [decision("MERGE", "lena", "hobby.name", "clocks", memory="m-does-not-exist")]
    report = store.apply(batch, vectors_for(batch))
    assert report.operations["STORE"] == 1
    assert "merge target m-does-not-exist is missing" in store.operations()[-1]["reason"]
    assert store.by_slot("lena", "hobby.name")[0].value == "clocks"


def test_bad_input_names_the_record_and_changes_nothing(store: MemoryStore) -> None:
    batch = [decision("STORE", "lena", "birth.year", "1984"), decision("STORE", "lena", "birth.city", "Leu\x00ven")]
    with pytest.raises(MemoryStoreError, match=r"decision 1 .*'value'.*NUL"):
        store.apply(batch, vectors_for(batch))
    with pytest.raises(MemoryStoreError, match="one row per decision"):
        store.apply(batch[:1], np.zeros((2, DIM)))
    with pytest.raises(MemoryStoreError, match="'action'"):
        store.apply([decision("FORGET", "lena", "x", "y")], np.ones((1, DIM)))
    bad_importance = [decision("STORE", "lena", "birth.year", "1984", importance=float("nan"))]
    with pytest.raises(MemoryStoreError, match="importance"):
        store.apply(bad_importance, vectors_for(bad_importance))
    with pytest.raises(MemoryStoreError, match="zero vector"):
        store.upsert([memory("lena", "a", "b", vector=np.zeros(DIM, dtype=np.float32))])
    assert store.count(None) == 0 and store.operations() == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_refused_naming_the_record(store: MemoryStore, bad: float) -> None:
    good, poisoned = memory("lena", "a", "1"), memory("lena", "birth.year", "1984")
    vectors = np.stack([np.asarray(good.embedding), np.asarray(poisoned.embedding)]).astype(np.float32)
    vectors[1, 7] = bad
    with pytest.raises(MemoryStoreError, match=rf"memory 1 \('{poisoned.id}'\): field 'embedding' holds NaN"):
        store.upsert([good, poisoned], vectors)
    with pytest.raises(MemoryStoreError, match=rf"memory 0 \('{poisoned.id}'\): field 'embedding' holds NaN"):
        store.upsert([memory("lena", "birth.year", "1984", vector=vectors[1])])
    batch = [decision("REJECT", "lena", "x", "y"), decision("STORE", "lena", "birth.year", "1984")]
    rows = vectors_for(batch)
    rows[1, 0] = bad
    with pytest.raises(MemoryStoreError, match=r"decision 1 \(STORE 'lena'/'birth.year'\): field 'embedding' holds NaN"):
        store.apply(batch, rows)
    assert store.count(None) == 0 and store.operations() == []


def test_a_failure_inside_the_transaction_rolls_everything_back(store: MemoryStore) -> None:
    store.upsert([memory("lena", "a", "1"), memory("lena", "b", "2")])
    before = store.operations()
    keep = memory_id("lena", "a", "1")
    with pytest.raises(MemoryStoreError, match="does not exist"):
        store.apply_status_changes([StatusChange("EVICT", keep, "weak"), StatusChange("EVICT", "m-missing", "weak")])
    assert store.get(keep).status == "active" and store.operations() == before


def test_status_changes_are_logged_and_idempotent(store: MemoryStore) -> None:
    a, b, c = (memory("lena", s, v) for s, v in (("a", "1"), ("b", "2"), ("c", "3")))
    store.upsert([a, b, c])
    assert store.set_status([a.id], "evicted", "EVICT", "importance 0.4 below 1.0") == 1
    assert store.set_status([a.id], "evicted", "EVICT", "again") == 0
    assert store.set_status([b.id], "active", "PROMOTE", "importance 8 reaches 7") == 1
    assert store.set_status([b.id], "active", "PROMOTE", "again") == 0
    assert store.promoted_ids() == {b.id}
    assert store.set_status([c.id], "superseded", "MERGE", "near-duplicate", related_id=b.id) == 1
    assert store.get(a.id).status == "evicted" and store.get(b.id).status == "active"
    assert store.get(c.id).status == "superseded"
    merged = store.history(c.id)[-1]
    assert merged["op"] == "MERGE" and merged["related_id"] == b.id and merged["reason"] == "near-duplicate"
    assert ops(store)[-3:] == ["EVICT", "PROMOTE", "MERGE"]
    with pytest.raises(MemoryStoreError, match="only active memories"):
        store.set_status([a.id], "superseded", "MERGE", "x", related_id=b.id)
    with pytest.raises(MemoryStoreError, match="cannot PROMOTE"):
        store.set_status([c.id], "active", "PROMOTE", "x")
    with pytest.raises(MemoryStoreError, match="sets status"):
        store.set_status([b.id], "superseded", "EVICT", "x")
    with pytest.raises(MemoryStoreError, match="another, active memory"):
        store.apply_status_changes([StatusChange("MERGE", b.id, "x", a.id)])
    assert store.count() == 1 and store.count_by_person() == {"lena": 1}


def test_operations_limit_returns_the_latest_rows_in_order(store: MemoryStore) -> None:
    store.upsert([memory("p", f"s{i}", str(i)) for i in range(5)])
    assert [r["value"] for r in store.operations(limit=2)] == ["3", "4"]
    assert len(store.operations()) == 5 and store.operations(limit=0) == []


# --------------------------------------------------------------------------- queries


def test_nearest_ranks_by_cosine_and_filters(store: MemoryStore) -> None:
    q = unit(7)
    near = [memory("ann", f"s{i}", str(i), vector=(q + 0.1 * (i + 1) * unit(100 + i)) / np.linalg.norm(
        q + 0.1 * (i + 1) * unit(100 + i))) for i in range(6)]
    other = [memory("bob", f"s{i}", str(i), vector=unit(200 + i)) for i in range(4)]
    store.upsert(near + other)
    got = store.nearest(q, k=3)
    assert [m.id for m, _ in got] == [m.id for m in near[:3]]
    for m, score in got:
        assert score == pytest.approx(float(np.dot(q, np.asarray(m.embedding))), abs=1e-5)
    assert all(got[i][1] >= got[i + 1][1] for i in range(len(got) - 1))
    bob = store.nearest(q, k=10, person_id="bob")
    assert {m.person_id for m, _ in bob} == {"bob"} and len(bob) == 4
    store.set_status([near[0].id], "evicted", "EVICT", "test")
    assert near[0].id not in [m.id for m, _ in store.nearest(q, k=3)]
    assert [m.id for m, _ in store.nearest(q, k=3, status="evicted")] == [near[0].id]
    assert near[0].id in [m.id for m, _ in store.nearest(q, k=3, status=None)]
    assert store.nearest(q, k=5, person_id="nobody") == []
    with pytest.raises(MemoryStoreError, match="k must be"):
        store.nearest(q, k=0)
    with pytest.raises(EmbeddingMismatchError):
        store.nearest(q[:100], k=1)


def test_filtered_nearest_returns_k_rows_when_k_exist(make_store: Callable[..., MemoryStore]) -> None:
    """Most rows sit next to the query but fail the filter; the few that pass are far away. An index scan
    that filters afterwards would come back short; the contract says k rows."""
    store = make_store(local={"exact_below": 32}, pg={"ef_search": 10})
    q = unit(11)
    rng = np.random.default_rng(RNG_SEED)
    crowd = []
    for i in range(400):
        v = q + 0.15 * rng.standard_normal(DIM).astype(np.float32)
        crowd.append(memory("crowd", f"s{i}", str(i), vector=v / np.linalg.norm(v)))
    far = [memory("far", f"s{i}", str(i), vector=unit(5000 + i)) for i in range(12)]
    store.upsert(crowd + far)
    store.apply_status_changes([StatusChange("EVICT", m.id, "test") for m in far])
    got = store.nearest(q, k=10, status="evicted")
    assert len(got) == 10
    exact = sorted(far, key=lambda m: -float(np.dot(q, np.asarray(m.embedding))))[:10]
    assert [m.id for m, _ in got] == [m.id for m in exact]
    assert len(store.nearest(q, k=10, person_id="far", status=None)) == 10
    top = store.nearest(q, k=10)
    brute = sorted(crowd, key=lambda m: -float(np.dot(q, np.asarray(m.embedding))))[:10]
    assert len({m.id for m, _ in top} & {m.id for m in brute}) >= 9


# --------------------------------------------------------------------------- embedding model


def test_embedding_model_and_dimension_mismatches_are_refused(make_store: Callable[..., MemoryStore]) -> None:
    store = make_store()
    store.upsert([memory("lena", "a", "1")])
    store.check_embedding(MODEL_ID, DIM)
    with pytest.raises(EmbeddingMismatchError, match="refusing 768-d vectors"):
        store.check_embedding("other/model", 768)
    with pytest.raises(EmbeddingMismatchError, match="383 dimensions"):
        store.upsert([memory("lena", "b", "2", vector=unit(3, dim=383))])
    other = make_store(embedding_model="intfloat/e5-small")
    for _ in range(2):  # refused every time, not only on first use
        with pytest.raises(EmbeddingMismatchError, match="configured for 384-d vectors from 'intfloat/e5-small'"):
            other.count()
    with pytest.raises(EmbeddingMismatchError):
        other.upsert([memory("lena", "c", "3")])
    assert store.count() == 1 and store.count(None) == 1


# --------------------------------------------------------------------------- choosing the backend


def test_the_environment_picks_the_backend(postgres_url: str, monkeypatch: pytest.MonkeyPatch, sleeptrain_env) -> None:
    local = memory_store_from_env()
    assert isinstance(local, LocalMemoryStore)
    local.upsert([memory("lena", "a", "1")])
    assert (sleeptrain_env / "memory" / "memories.sqlite").is_file()
    local.close()

    monkeypatch.setenv("SLEEPTRAIN_DATABASE_URL", postgres_url.replace("postgresql://", "postgresql+psycopg2://"))
    pg = memory_store_from_env()
    assert isinstance(pg, PgVectorMemoryStore)
    pg.upsert([memory("lena", "a", "1")])
    assert pg.count() == 1 and "pgvector memory store" in pg.describe()
    pg.close()


def test_postgres_urls_are_normalized() -> None:
    assert normalize_postgres_url("postgresql+psycopg2://u:p@h:5432/db") == "postgresql://u:p@h:5432/db"
    assert normalize_postgres_url("postgres://u@h/db") == "postgresql://u@h/db"
    assert normalize_postgres_url("postgresql://u@/db?host=/tmp/x") == "postgresql://u@/db?host=/tmp/x"
    with pytest.raises(MemoryStoreError, match="must start with postgresql://"):
        normalize_postgres_url("mysql://u@h/db")
    assert "***" in PgVectorMemoryStore(url="postgresql://u:secret@h/db").describe()


def test_pgvector_filtered_queries_walk_the_index_past_filtered_rows(postgres_url: str) -> None:
    """The planner picks the HNSW index for a person filter that keeps half the rows; the index's nearest
    rows all belong to someone else. pgvector filters after the scan, so a plain scan comes back empty;
    the store's iterative scan (and exact fallback) still returns the k nearest of that person."""
    from sleeptrain_resources.memory_store import person_key

    store = PgVectorMemoryStore(url=postgres_url, ef_search=10, bulk_rebuild_min_rows=1000)
    q = unit(11)
    rng = np.random.default_rng(RNG_SEED)
    near = []
    for i in range(1500):
        v = q + 0.15 * rng.standard_normal(DIM).astype(np.float32)
        near.append(memory("near", f"s{i}", str(i), vector=v / np.linalg.norm(v)))
    far = [memory("far", f"s{i}", str(i), vector=unit(5000 + i)) for i in range(1500)]
    store.upsert(near + far)
    try:
        got = store.nearest(q, k=10, person_id="far")
        exact = sorted(far, key=lambda m: -float(np.dot(q, np.asarray(m.embedding))))[:10]
        assert [m.id for m, _ in got] == [m.id for m in exact]

        conn = store._db()
        query = ("SELECT id FROM sleeptrain_memories WHERE status = 'active' AND person_key = %s AND person_id = %s "
                 "AND indexed ORDER BY embedding <=> %s LIMIT 10")
        params = (person_key("far"), "far", q)
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) " + query, params).fetchall())
        assert "sleeptrain_memories_embedding_hnsw" in plan
        assert len(conn.execute(query, params).fetchall()) == 10
        conn.execute("SELECT set_config('hnsw.iterative_scan', 'off', false)")
        assert len(conn.execute(query, params).fetchall()) < 10
    finally:
        store.close()


def test_pgvector_rows_written_after_the_index_are_found_and_folded_in(postgres_url: str) -> None:
    """Rows of a write into a filled table stay out of the HNSW index (a cheap write) until a fold; queries
    see them all along, and a write past `max_unindexed` folds the tail in."""
    store = PgVectorMemoryStore(url=postgres_url, bulk_rebuild_min_rows=100, max_unindexed=150)
    try:
        first = [memory("p", f"s{i}", str(i)) for i in range(300)]
        store.upsert(first)  # a bulk load into an empty table: indexed by one build
        assert store.unindexed() == 0
        late = [memory("p", f"late{i}", str(i)) for i in range(100)]
        store.upsert(late)
        assert store.unindexed() == 100
        for m in (late[0], late[99], first[5]):
            assert store.nearest(m.embedding, k=3)[0][0].id == m.id
        store.upsert([memory("p", f"more{i}", str(i)) for i in range(60)])  # 160 > 150: folded in
        assert store.unindexed() == 0
        assert store.nearest(late[42].embedding, k=1)[0][0].id == late[42].id
        store.upsert([memory("p", "last", "x")])
        assert store.index_pending() == 1 and store.unindexed() == 0
        assert store.count() == 461
    finally:
        store.close()
