"""Who is writing where: owner tags on temporary and staging folders, and recovery from training runs whose
worker died (kill -9, OOM, a lost node).

A folder written by one process carries `<pid>@<host>`. The next start on the same host removes folders whose
process is gone; folders of another host are left alone unless Dagster says their run has finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGING_OWNER = "owner.json"  # in $SLEEPTRAIN_HOME/staging/<run_id>/: which process trains there
RUN_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def owner_tag() -> str:
    """`<pid>@<host>` of this process."""
    return f"{os.getpid()}@{socket.gethostname()}"


def owner_alive(owner: str | None) -> bool | None:
    """Whether the process an owner tag names still runs; None when that cannot be known from here (another
    host, or no readable tag)."""
    pid, _, host = str(owner or "").partition("@")
    if not pid.isdigit() or host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp_adapters(folder: Path) -> list[Path]:
    """Remove half-written `.<name>.tmp-<pid>@<host>-*` folders whose writer on this host no longer runs."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(".*.tmp-*"):
        owner = path.name.split(".tmp-", 1)[1].rsplit("-", 1)[0]
        if path.is_dir() and owner_alive(owner) is False:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def claim_staging(staging: Path, run_id: str) -> Path:
    """This run's staging folder, tagged with this process as its owner."""
    from sleeptrain_assets.lib.atomic import write_json_atomic

    run_dir = staging / run_id
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    write_json_atomic(run_dir / STAGING_OWNER, {"owner": owner_tag(), "run_id": run_id})
    return run_dir


def recover_dead_training_runs(instance: Any, staging: Path, this_run_id: str | None,
                               log: Callable[[str], None]) -> list[str]:
    """Remove the staging of training runs that died, mark such a run failed if the Dagster instance still shows
    it in progress, and free the concurrency slots (the `gpu` pool) it held, which would otherwise block every
    later training step. Returns the run ids recovered.

    In a deployment, Dagster's run monitoring does the marking for launchers that can check a worker's health;
    `dagster asset materialize` and the default run launcher cannot, so the next training run does it.
    """
    recovered = []
    if not staging.is_dir():
        return recovered
    for entry in sorted(p for p in staging.iterdir() if p.is_dir() and p.name != this_run_id):
        try:
            owner = json.loads((entry / STAGING_OWNER).read_text(encoding="utf-8")).get("owner")
        except (OSError, ValueError, AttributeError):
            owner = None
        alive = owner_alive(owner)
        run = instance.get_run_by_id(entry.name) if instance is not None and RUN_ID.match(entry.name) else None
        if alive or (alive is None and not (run is not None and run.is_finished)):
            continue  # a live writer, or one on another host whose run may still be going
        if run is not None:
            if not run.is_finished:
                instance.report_run_failed(run, f"its run worker ({owner}) died in lora_adapter; found by run "
                                                f"{this_run_id}")
                log(f"run {run.run_id}: worker {owner} is gone; marked the run failed")
            storage = instance.event_log_storage
            if storage.supports_global_concurrency_limits and run.run_id in storage.get_concurrency_run_ids():
                storage.free_concurrency_slots_for_run(run.run_id)
                log(f"run {run.run_id}: freed the concurrency slots it held")
        shutil.rmtree(entry, ignore_errors=True)
        log(f"removed the staging left by a dead training run: {entry}")
        recovered.append(entry.name)
    return recovered
