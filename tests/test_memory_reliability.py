"""The memory store under stress: concurrent writers, a writer killed mid-batch, hostile text, a broken index."""

from __future__ import annotations

import json
import os
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


# A child that writes one batch and stops after the last write of its transaction, before the commit: it
# reports how many rows its own (uncommitted) transaction sees and waits for a line on stdin that never comes.
KILLED_BEFORE_COMMIT = textwrap.dedent("""
    import json, sys
    from contextlib import contextmanager
    import numpy as np
    from sleeptrain_assets.lib.hippocampus import memory_id
    from sleeptrain_assets.lib.records import Memory
    from sleeptrain_resources.memory_store import LocalMemoryStore, PgVectorMemoryStore

    spec = json.loads(sys.argv[1])
    def pause(conn, table):
        print("written", conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0], flush=True)
        sys.stdin.readline()

    if spec["backend"] == "local":
        store = LocalMemoryStore(root=spec["target"])
        real = LocalMemoryStore._transaction
        @contextmanager
        def transaction_paused_before_commit(self):
            with real(self) as conn:
                yield conn
                pause(conn, "memories")
        LocalMemoryStore._transaction = transaction_paused_before_commit
    else:
        store = PgVectorMemoryStore(url=spec["target"])
        real_copy = PgVectorMemoryStore._copy
        def copy_then_pause(conn, table, *args):
            real_copy(conn, table, *args)
            if table == "sleeptrain_memory_ops":  # the transaction's last write
                pause(conn, "sleeptrain_memories")
        PgVectorMemoryStore._copy = staticmethod(copy_then_pause)
    store.count()
    facts = spec["facts"]
    vectors = np.random.default_rng(spec["seed"]).standard_normal((len(facts), 384)).astype(np.float32)
    store.upsert([Memory(id=memory_id(p, s, v), person_id=p, slot=s, value=v, text=f"{p}: {s} = {v}",
                         embedding=(), importance=5.0, source="bulk#0") for p, s, v in facts], vectors)
    print("committed", flush=True)
""")


def _committed_rows(target: tuple[str, str]) -> int:
    """Rows another connection sees, without taking the store's locks or creating anything."""
    backend, where = target
    if backend == "local":
        probe = sqlite3.connect(f"file:{Path(where) / 'memories.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            return int(probe.execute("SELECT count(*) FROM memories").fetchone()[0])
        finally:
            probe.close()
    import psycopg

    with psycopg.connect(where, autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM sleeptrain_memories").fetchone()[0])


def test_a_writer_killed_between_write_and_commit_leaves_nothing_and_the_retry_lands_once(target) -> None:
    n = 2000
    facts = [("bulk", f"slot.{i}", f"v{i}") for i in range(n)]
    spec = {"backend": target[0], "target": target[1], "seed": 3, "facts": facts}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BEFORE_COMMIT, json.dumps(spec)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    try:
        line = proc.stdout.readline().split()
        assert line == ["written", str(n)], f"the writer never reached its commit: {line} {proc.stderr.read()}"
        assert _committed_rows(target) == 0, "the batch was visible before its commit"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Postgres rolls the dead client's transaction back once it notices the broken connection.
    deadline = time.monotonic() + 30
    while _writer_holds_lock(target):
        assert time.monotonic() < deadline, "the killed writer's lock was never released"
        time.sleep(0.05)

    store = open_store(target)
    try:
        assert store.count(None) == 0 and store.operations() == [], "a killed batch left rows behind"
        vectors = np.random.default_rng(3).standard_normal((n, DIM)).astype(np.float32)
        batch = [Memory(id=memory_id(p, s, v), person_id=p, slot=s, value=v, text=f"{p}: {s} = {v}", embedding=(),
                        importance=5.0, source="bulk#0") for p, s, v in facts]
        store.upsert(batch, vectors)
        store.upsert(batch, vectors)  # a retry of a batch that did land changes nothing
        assert store.count(None) == store.count() == n
        assert [h["op"] for h in store.history(batch[17].id)] == ["STORE", "MERGE"]
        assert store.nearest(vectors[17], k=1)[0][0].id == batch[17].id
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
