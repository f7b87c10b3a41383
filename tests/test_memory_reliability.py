"""The memory store under stress: concurrent writers, a writer killed mid-batch, hostile text, a broken index."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from sleeptrain_assets.lib.hippocampus import memory_id
from sleeptrain_assets.lib.records import Memory
from sleeptrain_resources.embedding import DIM
from sleeptrain_resources.memory_store import LocalMemoryStore, MemoryStoreError, PgVectorMemoryStore

REPO = Path(__file__).resolve().parents[1]

# A child process that opens a store, says "ready", waits for the go file, writes, and says "done".
WORKER = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from sleeptrain_assets.lib.hippocampus import memory_id
    from sleeptrain_assets.lib.records import Memory
    from sleeptrain_resources.memory_store import LocalMemoryStore, PgVectorMemoryStore

    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    store = (LocalMemoryStore(root=spec["target"]) if spec["backend"] == "local"
             else PgVectorMemoryStore(url=spec["target"]))
    store.count()
    rng = np.random.default_rng(spec["seed"])
    facts = spec["facts"]
    vectors = rng.standard_normal((len(facts), 384)).astype(np.float32)
    memories = [Memory(id=memory_id(p, s, v), person_id=p, slot=s, value=v, text=f"{p}: {s} = {v}",
                       embedding=(), importance=5.0, source=spec["source"]) for p, s, v in facts]
    print("ready", flush=True)
    while not os.path.exists(spec["go"]):
        time.sleep(0.005)
    for start in range(0, len(memories), spec["batch"]):
        store.upsert(memories[start:start + spec["batch"]], vectors[start:start + spec["batch"]])
    print("done", flush=True)
""")


def spawn(spec: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    spec_file = Path(spec["go"]).with_name(f"spec-{spec['seed']}.json")
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(spec_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise AssertionError(f"worker did not start: {line!r}\n{proc.stderr.read()}")
    return proc


@pytest.fixture(params=["local", "pgvector"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "local":
        return "local", str(tmp_path / "store")
    return "pgvector", request.getfixturevalue("postgres_url")


def open_store(target: tuple[str, str]) -> LocalMemoryStore | PgVectorMemoryStore:
    backend, where = target
    return LocalMemoryStore(root=where) if backend == "local" else PgVectorMemoryStore(url=where)


def test_two_processes_writing_the_same_facts_leave_one_active_memory(target, tmp_path: Path) -> None:
    shared = [("lena", f"fact.{i}", f"value {i}") for i in range(40)]
    # Both also claim one slot with different values: exactly one of them may stay active.
    a_facts = shared + [("lena", "residence.city", "Hasselt")]
    b_facts = list(reversed(shared)) + [("lena", "residence.city", "Ghent")]
    go = tmp_path / "go"
    workers = [spawn({"backend": target[0], "target": target[1], "seed": seed, "facts": facts, "go": str(go),
                      "source": f"worker{seed}#0", "batch": 1})
               for seed, facts in ((1, a_facts), (2, b_facts))]
    go.touch()
    for proc in workers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == "done"

    store = open_store(target)
    try:
        active = store.active_memories()
        assert len(active) == 41
        assert len({(m.person_id, m.slot) for m in active}) == 41
        cities = store.by_slot("lena", "residence.city", status=None)
        assert sorted(m.status for m in cities) == ["active", "superseded"]
        for _, slot, value in shared:
            rows = store.by_slot("lena", slot, status=None)
            assert len(rows) == 1 and rows[0].status == "active"
            log = [h["op"] for h in store.history(memory_id("lena", slot, value))]
            assert log == ["STORE", "MERGE"], log
            assert store.get(rows[0].id) is not None
        assert store.count(None) == 42
    finally:
        store.close()


def _writer_holds_lock(target: tuple[str, str]) -> bool:
    backend, where = target
    if backend == "local":
        probe = sqlite3.connect(Path(where) / "memories.sqlite", timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            probe.close()
    import psycopg

    with psycopg.connect(where, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE c.relname = 'sleeptrain_memories' AND l.mode = 'ShareRowExclusiveLock' AND l.granted "
            "AND l.pid <> pg_backend_pid()").fetchone()
        return bool(row[0])


def test_a_writer_killed_mid_batch_leaves_all_or_nothing(target, tmp_path: Path) -> None:
    n = 30000 if target[0] == "local" else 8000
    facts = [("bulk", f"slot.{i}", f"v{i}") for i in range(n)]
    go = tmp_path / "go"
    proc = spawn({"backend": target[0], "target": target[1], "seed": 3, "facts": facts, "go": str(go),
                  "source": "bulk#0", "batch": n})
    go.touch()
    deadline = time.monotonic() + 60
    while not _writer_holds_lock(target):
        assert proc.poll() is None, f"the writer finished before it could be interrupted: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the writer never took the write lock"
        time.sleep(0.002)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # Postgres rolls the dead client's transaction back once it notices the broken connection.
    deadline = time.monotonic() + 30
    while _writer_holds_lock(target):
        assert time.monotonic() < deadline, "the killed writer's lock was never released"
        time.sleep(0.05)

    store = open_store(target)
    try:
        count = store.count(None)
        assert count in (0, n), f"{count} of {n} rows survived a killed batch"
        assert len(store.operations()) == count
        # The store still takes writes, and a nearest query agrees with the rows.
        vec = np.random.default_rng(4).standard_normal(DIM).astype(np.float32)
        store.upsert([Memory(id="after-kill", person_id="bulk", slot="after", value="x", text="after the kill",
                             embedding=tuple(vec.tolist()), importance=1.0, source="t#0")])
        assert store.count(None) == count + 1
        assert store.nearest(vec, k=1)[0][0].id == "after-kill"
    finally:
        store.close()


HOSTILE = [
    ("robert'); DROP TABLE sleeptrain_memories; --", "name", "Robert'); DROP TABLE memories;--"),
    ('quote"s\'and\\backslash', "birth.city", 'O\'Brien "the" \\ city'),
    ("emoji-👩‍🔬", "hobby.name", "🧪 glass & 🔥 — naïve café"),
    ("x" * 10_000, "y" * 10_000, "z" * 10_000),
    ("sql", "value", "1; SELECT pg_sleep(10); -- %s %(name)s {0} ?"),
]


def test_hostile_text_is_stored_verbatim_and_harms_nothing(target) -> None:
    store = open_store(target)
    try:
        rng = np.random.default_rng(5)
        memories = []
        for i, (person, slot, value) in enumerate(HOSTILE):
            vec = rng.standard_normal(DIM).astype(np.float32)
            text = f"{value} " + "ü" * 10_000 if i == 3 else f"{person} said {value}"
            memories.append(Memory(id=memory_id(person, slot, value), person_id=person, slot=slot, value=value,
                                   text=text, embedding=tuple(vec.tolist()), importance=5.0, source=f"{value}#1"))
        store.upsert(memories)
        for m in memories:
            got = store.get(m.id)
            assert (got.person_id, got.slot, got.value, got.text, got.source) == (
                m.person_id, m.slot, m.value, m.text, m.source)
            assert [x.id for x in store.by_person(m.person_id)] == [m.id]
            assert [x.id for x in store.by_slot(m.person_id, m.slot)] == [m.id]
            assert store.history(m.id)[0]["value"] == m.value
            assert store.nearest(m.embedding, k=1, person_id=m.person_id)[0][0].id == m.id
            assert store.nearest(m.embedding, k=1)[0][0].id == m.id
        assert store.count() == len(HOSTILE)
        with pytest.raises(MemoryStoreError, match="NUL"):
            store.upsert([Memory(id="nul", person_id="p\x00", slot="s", value="v", text="t",
                                 embedding=memories[0].embedding, importance=1.0, source="s")])
        assert store.count(None) == len(HOSTILE)
    finally:
        store.close()


# --------------------------------------------------------------------------- the local FAISS index


def _local_store(tmp_path: Path, n: int = 300) -> tuple[LocalMemoryStore, np.ndarray]:
    store = LocalMemoryStore(root=str(tmp_path / "store"), exact_below=64)
    rng = np.random.default_rng(6)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.upsert([Memory(id=f"m{i}", person_id=f"p{i % 7}", slot=f"s{i}", value=str(i), text=f"fact {i}",
                         embedding=(), importance=5.0, source="c#0") for i in range(n)], vectors)
    return store, vectors


def _exact_top(vectors: np.ndarray, q: np.ndarray, k: int) -> list[str]:
    return [f"m{i}" for i in np.argsort(-(vectors @ q), kind="stable")[:k]]


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped", "garbage", "meta_missing", "stale"])
def test_a_damaged_faiss_index_is_rebuilt_from_the_rows(tmp_path: Path, damage: str) -> None:
    store, vectors = _local_store(tmp_path)
    q = vectors[17] + 0.05 * np.random.default_rng(7).standard_normal(DIM).astype(np.float32)
    q /= np.linalg.norm(q)
    assert [m.id for m, _ in store.nearest(q, k=5)] == _exact_top(vectors, q, 5)
    store.close()
    index, meta = store.index_path, store.index_meta_path
    assert index.is_file() and meta.is_file()
    good = json.loads(meta.read_text())
    if damage == "missing":
        index.unlink()
    elif damage == "truncated":
        index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    elif damage == "flipped":
        data = bytearray(index.read_bytes())
        data[len(data) // 2] ^= 0xFF
        index.write_bytes(bytes(data))
    elif damage == "garbage":
        index.write_bytes(b"not a faiss index at all")
    elif damage == "meta_missing":
        meta.unlink()
    elif damage == "stale":
        # Another process adds rows after the index was saved; the saved file no longer covers them.
        other = LocalMemoryStore(root=str(tmp_path / "store"), exact_below=64)
        extra = q.copy()
        other.upsert([Memory(id="late", person_id="p0", slot="late", value="late", text="late fact",
                             embedding=tuple(extra.tolist()), importance=5.0, source="c#9")])
        other.close()

    reopened = LocalMemoryStore(root=str(tmp_path / "store"), exact_below=64)
    got = [m.id for m, _ in reopened.nearest(q, k=5)]
    if damage == "stale":
        assert got[0] == "late" and got[1:] == _exact_top(vectors, q, 4)
    else:
        assert got == _exact_top(vectors, q, 5)
    reopened.close()
    assert index.is_file() and meta.is_file()
    if damage != "stale":
        rebuilt = json.loads(meta.read_text())
        assert rebuilt["ntotal"] == good["ntotal"] == 300


def test_the_rows_stay_the_truth_when_the_index_lags(tmp_path: Path) -> None:
    store, vectors = _local_store(tmp_path)
    q = vectors[3]
    assert store.nearest(q, k=1)[0][0].id == "m3"
    store.set_status(["m3"], "evicted", "EVICT", "test")
    # The index still holds m3's vector; the filter comes from the rows.
    assert "m3" not in [m.id for m, _ in store.nearest(q, k=5)]
    assert store.nearest(q, k=1, status="evicted")[0][0].id == "m3"
    assert store.rebuild_index() == 300
    store.close()
