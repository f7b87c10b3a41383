"""One whole-graph smoke run with Dagster's storage and the memory store on the same real PostgreSQL, shared by the
tests that read it back (SQL, a second Dagster process, the UI): the graph trains once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DAGSTER = str(Path(sys.executable).with_name("dagster"))


def expected_definitions() -> dict[str, set]:
    """What the code location holds, read from it, so tests follow when assets, jobs, sensors or schedules are added."""
    from sleeptrain_assets.definitions import defs

    import dagster as dg

    definitions = defs()
    graph = definitions.resolve_asset_graph()
    # The lineage `make run` materializes (`--select '*leaderboard'`); the sleep-cycle assets are partitioned per
    # cycle and only run when a cycle opens.
    lineage = {k.to_user_string() for k in dg.AssetSelection.assets("leaderboard").upstream().resolve(graph)}
    return {
        "assets": {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).is_materializable},
        "lineage": lineage,
        "lineage_checks": {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys
                           if k.asset_key.to_user_string() in lineage},
        "checks": {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys},
        "groups": {graph.get(k).group_name for k in graph.get_all_asset_keys()},
        "jobs": {job.name for job in definitions.jobs or []},
        "sensors": {sensor.name for sensor in definitions.sensors or []},
        "schedules": {schedule.name for schedule in definitions.schedules or []},
    }


@dataclass(frozen=True)
class GraphOnPostgres:
    env: dict[str, str]  # what every Dagster process of this deployment runs with
    dagster_home: Path
    sleeptrain_home: Path
    dagster_db_url: str  # psycopg URL of Dagster's database
    memory_db_url: str  # psycopg URL of the memory store's database
    output: str  # the materialize command's stdout + stderr


@pytest.fixture(scope="session")
def graph_on_postgres(postgres_server: Any, model_cache: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[GraphOnPostgres]:
    from sleeptrain_resources.postgres_server import (
        create_database,
        drop_database,
        prepare_dagster_home,
        sqlalchemy_url,
    )

    admin = postgres_server.get_uri()
    suffix = uuid.uuid4().hex[:10]
    dagster_db, memory_db = f"dagster_{suffix}", f"memory_{suffix}"
    create_database(admin, dagster_db)
    create_database(admin, memory_db, extensions=("vector",))
    root = tmp_path_factory.mktemp("graph-on-postgres")
    sleeptrain_home, dagster_home = root / "sleeptrain-home", root / "dagster-home"
    prepare_dagster_home(dagster_home)
    env = {key: value for key, value in os.environ.items()
           if key not in {"SLEEPTRAIN_BASE_MODEL", "SLEEPTRAIN_DATABASE_URL", "DAGSTER_HOME"}}
    env.update({
        "DAGSTER_HOME": str(dagster_home),
        "SLEEPTRAIN_DAGSTER_STORAGE_URL": sqlalchemy_url(postgres_server.get_uri(database=dagster_db)),
        "SLEEPTRAIN_DATABASE_URL": postgres_server.get_uri(database=memory_db),
        "SLEEPTRAIN_HOME": str(sleeptrain_home),
        "SLEEPTRAIN_PROFILE": "smoke",
        "SLEEPTRAIN_MODEL_CACHE": str(model_cache),
        "SLEEPTRAIN_TRACKING": "disabled",
        "SLEEPTRAIN_DATA_DIR": str(REPO / "data"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    })
    try:
        done = subprocess.run(
            [DAGSTER, "asset", "materialize", "-m", "sleeptrain_assets.definitions", "--select", "*leaderboard"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"materialize on Postgres failed (rc {done.returncode}):\n{output[-6000:]}"
        yield GraphOnPostgres(
            env=env, dagster_home=dagster_home, sleeptrain_home=sleeptrain_home,
            dagster_db_url=postgres_server.get_uri(database=dagster_db),
            memory_db_url=postgres_server.get_uri(database=memory_db), output=output,
        )
    finally:
        drop_database(admin, dagster_db)
        drop_database(admin, memory_db)
        shutil.rmtree(root, ignore_errors=True)
