"""The whole graph on the production path: Dagster's runs and events and the memory store in one real PostgreSQL,
read back from Postgres itself and by a second Dagster process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.graph_on_postgres import REPO, GraphOnPostgres, expected_definitions

pytestmark = pytest.mark.slow


def _rows(url: str, query: str, *params: object) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def _key(stored: str) -> str:
    # Dagster stores an AssetKey as the JSON list of its path.
    return "/".join(json.loads(stored))


def test_postgres_holds_the_run_its_materializations_checks_and_memories(graph_on_postgres: GraphOnPostgres) -> None:
    dagster_db, memory_db = graph_on_postgres.dagster_db_url, graph_on_postgres.memory_db_url
    expected = expected_definitions()
    assets, checks = expected["lineage"], expected["lineage_checks"]

    runs = _rows(dagster_db, "SELECT run_id, status FROM runs")
    assert len(runs) == 1 and runs[0][1] == "SUCCESS", runs
    run_id = runs[0][0]

    materialized = {_key(k) for (k,) in _rows(
        dagster_db, "SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' "
                    "AND run_id = %s", run_id)}
    assert materialized == assets, f"missing: {sorted(assets - materialized)}; unexpected: {sorted(materialized - assets)}"
    latest = {_key(k): r for k, r in _rows(
        dagster_db, "SELECT asset_key, last_run_id FROM asset_keys WHERE last_materialization_timestamp IS NOT NULL")}
    assert set(latest) == assets and set(latest.values()) == {run_id}

    executions = {(_key(k), name): status for k, name, status in _rows(
        dagster_db, "SELECT asset_key, check_name, execution_status FROM asset_check_executions WHERE run_id = %s",
        run_id)}
    assert set(executions) == checks, f"checks without a result: {sorted(checks - set(executions))}"
    assert set(executions.values()) == {"SUCCEEDED"}, executions
    evaluations = _rows(dagster_db, "SELECT count(*) FROM event_logs WHERE run_id = %s "
                                    "AND dagster_event_type = 'ASSET_CHECK_EVALUATION'", run_id)[0][0]
    assert evaluations == len(checks)

    # The memory store wrote to the same server: decisions with reasons, active memories with 384-d embeddings.
    people, active, dims = _rows(memory_db, "SELECT count(DISTINCT person_id), count(*), min(vector_dims(embedding)) "
                                            "FROM sleeptrain_memories WHERE status = 'active'")[0]
    assert active > 0 and people > 1 and dims == 384, (people, active, dims)
    ops = dict(_rows(memory_db, "SELECT op, count(*) FROM sleeptrain_memory_ops GROUP BY op"))
    assert ops.get("STORE", 0) > 0, ops
    # Nothing went to the local SQLite store or to SQLite-backed Dagster storage.
    assert not (graph_on_postgres.sleeptrain_home / "memory").exists()
    assert not list(graph_on_postgres.dagster_home.rglob("*.db"))


SECOND_PROCESS = """
    import json
    import sys
    import dagster as dg
    keys = [dg.AssetKey(k) for k in json.loads(sys.argv[1])]
    with dg.DagsterInstance.get() as instance:
        events = instance.get_latest_materialization_events(keys)
        print(json.dumps({
            "storage": type(instance.event_log_storage).__name__,
            "runs": [(r.run_id, r.status.value) for r in instance.get_runs()],
            "materialized": sorted(k.to_user_string() for k, e in events.items() if e is not None),
        }))
"""


def test_a_second_dagster_process_sees_the_materializations(graph_on_postgres: GraphOnPostgres) -> None:
    assets = expected_definitions()["lineage"]
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SECOND_PROCESS), json.dumps(sorted(assets))],
                          cwd=REPO, env=graph_on_postgres.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["storage"] == "PostgresEventLogStorage"
    assert [status for _, status in seen["runs"]] == ["SUCCESS"]
    assert set(seen["materialized"]) == assets
    # The `dagster` CLI itself, in another process, reads the same run from Postgres.
    listed = subprocess.run([sys.executable, "-m", "dagster", "run", "list"],
                            cwd=REPO, env=graph_on_postgres.env, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert seen["runs"][0][0] in listed.stdout
