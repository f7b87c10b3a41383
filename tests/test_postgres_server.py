"""`make dev-postgres`'s server runner: one real embedded PostgreSQL, started, used by a command, stopped cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sleeptrain_resources.postgres_server import sqlalchemy_url

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server_root() -> Iterator[Path]:
    # Outside pytest's numbered temp folders, which concurrent pytest sessions prune (the socket lives here).
    root = Path(tempfile.mkdtemp(prefix="sleeptrain-pgrun-"))
    try:
        yield root
    finally:
        _stop_leftover_server(root / "data")
        shutil.rmtree(root, ignore_errors=True)


def _postmaster_pid(pgdata: Path) -> int | None:
    pid_file = pgdata / "postmaster.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.is_file() else None


def _alive(pid: int | None, settle_seconds: float = 10.0) -> bool:
    """Whether ``pid`` still runs; a stopped postmaster may take a moment to exit and be reaped after pg_ctl returns."""
    import psutil

    deadline = time.monotonic() + settle_seconds
    while pid is not None and psutil.pid_exists(pid):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)
    return False


def _stop_leftover_server(pgdata: Path) -> None:
    pid = _postmaster_pid(pgdata)
    if _alive(pid, settle_seconds=0):
        os.kill(pid, signal.SIGQUIT)


def _runner(server_root: Path, script: str) -> list[str]:
    return [sys.executable, "-m", "sleeptrain_resources.postgres_server", "run",
            "--data-dir", str(server_root / "data"), "--dagster-home", str(server_root / "dagster"),
            "--", sys.executable, "-c", textwrap.dedent(script)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


WRITE_ROW = """
    import os, psycopg
    with psycopg.connect(os.environ["SLEEPTRAIN_DATABASE_URL"], autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (body text)")
        conn.execute("INSERT INTO notes VALUES (%s)", (os.environ["NOTE"],))
        rows = [r[0] for r in conn.execute("SELECT body FROM notes ORDER BY body")]
        vector = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    print("ROWS", ",".join(rows), "VECTOR", vector is not None, "HOME", os.environ["DAGSTER_HOME"])
"""


def test_the_command_sees_both_databases_and_a_second_start_reuses_the_data(server_root: Path) -> None:
    seen = []
    for note in ("first", "second"):
        done = subprocess.run(_runner(server_root, WRITE_ROW), env={**_env(), "NOTE": note}, cwd=REPO,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        seen.append(next(line for line in done.stdout.splitlines() if line.startswith("ROWS")))
        assert not _alive(_postmaster_pid(server_root / "data")), "the server outlived the command"
    assert seen[0] == f"ROWS first VECTOR True HOME {server_root / 'dagster'}"
    assert seen[1].startswith("ROWS first,second VECTOR True"), seen[1]
    # Dagster gets the Postgres-backed instance file, and a URL that names the psycopg2 driver.
    assert (server_root / "dagster" / "dagster.yaml").read_text() == (REPO / "deploy" / "dagster.yaml").read_text()


def test_ctrl_c_stops_the_command_first_and_the_server_after_it(server_root: Path) -> None:
    # The command writes a row when it is interrupted: that only works if the server is still up at that moment.
    script = """
        import os, signal, sys, time, psycopg
        def stop(signum, frame):
            with psycopg.connect(os.environ["SLEEPTRAIN_DATABASE_URL"], autocommit=True) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS shutdown (signum int)")
                conn.execute("INSERT INTO shutdown VALUES (%s)", (signum,))
            sys.exit(0)
        signal.signal(signal.SIGINT, stop)
        open(os.environ["READY"], "w").close()
        time.sleep(120)
    """
    ready = server_root / "ready"
    runner = subprocess.Popen(_runner(server_root, script), env={**_env(), "READY": str(ready)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert runner.poll() is None, runner.stdout.read()
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.2)
        server_pid = _postmaster_pid(server_root / "data")
        assert _alive(server_pid, settle_seconds=0)
        runner.send_signal(signal.SIGINT)
        output, _ = runner.communicate(timeout=90)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == 0, output
    assert not _alive(server_pid), "the server is still running after Ctrl-C"
    check = subprocess.run(_runner(server_root, """
        import os, psycopg
        with psycopg.connect(os.environ["SLEEPTRAIN_DATABASE_URL"]) as conn:
            print("SIGNALS", [r[0] for r in conn.execute("SELECT signum FROM shutdown")])
    """), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert f"SIGNALS [{int(signal.SIGINT)}]" in check.stdout, check.stdout + check.stderr


def test_a_killed_runner_does_not_keep_the_server_up_forever(server_root: Path) -> None:
    pgdata = server_root / "data"
    done = subprocess.run(_runner(server_root, "pass"), env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    # A runner killed with -9 leaves its handle behind; a pid that no longer exists stands for it.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (pgdata / ".handle_pids.json").write_text(json.dumps([dead.pid]))
    done = subprocess.run(_runner(server_root, "pass"), env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert not _alive(_postmaster_pid(pgdata)), "a dead process's handle kept the server running"


def test_dagster_gets_the_psycopg2_driver() -> None:
    assert sqlalchemy_url("postgresql://postgres:@/dagster?host=/tmp/x") == "postgresql+psycopg2://postgres:@/dagster?host=/tmp/x"
    assert sqlalchemy_url("postgres://u:p@h:5432/d") == "postgresql+psycopg2://u:p@h:5432/d"
    with pytest.raises(ValueError):
        sqlalchemy_url("mysql://u@h/d")


def test_the_gpu_pool_gets_one_slot_per_gpu_unless_someone_set_it(postgres_url: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import dagster as dg

    from sleeptrain_resources.postgres_server import GPU_POOL, limit_gpu_pool, prepare_dagster_home

    home = prepare_dagster_home(tmp_path / "dagster-home")
    monkeypatch.setenv("SLEEPTRAIN_DAGSTER_STORAGE_URL", sqlalchemy_url(postgres_url))

    def limits() -> dict[str, tuple[int, bool]]:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            return {p.name: (p.limit, p.from_default) for p in instance.event_log_storage.get_pool_limits()}

    assert limit_gpu_pool(home, 1) is None and GPU_POOL not in limits()
    assert limit_gpu_pool(home, 4) == 4
    assert limits()[GPU_POOL] == (4, False)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 2)  # an operator's choice
    assert limit_gpu_pool(home, 8) is None
    assert limits()[GPU_POOL] == (2, False)


def test_a_second_command_joins_the_running_server_and_leaves_it_running(server_root: Path) -> None:
    ready = server_root / "ready"
    first = subprocess.Popen(
        _runner(server_root, "import os, time; open(os.environ['READY'], 'w').close(); time.sleep(120)"),
        env={**_env(), "READY": str(ready)}, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first command never started"
            time.sleep(0.2)
        server_pid = _postmaster_pid(server_root / "data")
        second = subprocess.run(_runner(server_root, WRITE_ROW), env={**_env(), "NOTE": "joined"}, cwd=REPO,
                                capture_output=True, text=True, timeout=180)
        assert second.returncode == 0, second.stderr
        assert "ROWS joined" in second.stdout
        # Same server, still up for the first command.
        assert _postmaster_pid(server_root / "data") == server_pid
        assert _alive(server_pid, settle_seconds=0)
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=90) == 130  # the command died of the forwarded Ctrl-C
        assert not _alive(server_pid)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
