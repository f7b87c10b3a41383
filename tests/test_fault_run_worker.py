"""The run worker killed -9 in the middle of `lora_adapter` (a real `dagster asset materialize` process on the
smoke profile): no adapter is registered, the next run marks the dead run failed, removes its staging and
trains to the end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parents[1]
DAGSTER = str(Path(sys.executable).with_name("dagster"))


def _materialize(selection: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([DAGSTER, "asset", "materialize", "-m", "sleeptrain_assets.definitions", "--select",
                           selection], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_run_worker_killed_mid_training_registers_nothing_and_the_next_run_recovers(sleeptrain_env: Path) -> None:
    dagster_home = sleeptrain_env / "dagster"
    dagster_home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "PYTHONUNBUFFERED": "1"}
    upstream = _materialize("*consolidated_memories,replay_targets", env)
    assert upstream.returncode == 0, upstream.stderr[-4000:]

    worker = subprocess.Popen([DAGSTER, "asset", "materialize", "-m", "sleeptrain_assets.definitions", "--select",
                               "lora_adapter"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    seen: list[str] = []
    deadline = time.monotonic() + 600
    try:
        # The trainer's progress line proves an optimizer step ran and the adapter is not written yet.
        for line in worker.stdout:
            seen.append(line)
            if "lora_adapter - step 1/" in line:
                os.killpg(worker.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "no training step within 10 minutes"
    finally:
        if worker.poll() is None and not any("lora_adapter - step 1/" in s for s in seen):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=60)
    assert worker.returncode == -signal.SIGKILL, "".join(seen[-40:])
    total = int(next(s for s in seen if "lora_adapter - step 1/" in s).split("step 1/")[1].split()[0])
    assert total > 1, "the kill must land before the last step"

    adapters, staging = sleeptrain_env / "adapters", sleeptrain_env / "staging"
    assert not (adapters / "current").exists()
    assert not [p for p in (adapters / "versions").iterdir()] if (adapters / "versions").exists() else True
    leftover = [p for p in staging.iterdir()]
    assert len(leftover) == 1 and (leftover[0] / "owner.json").is_file() and not (leftover[0] / "adapter").exists()
    killed_run = leftover[0].name
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert instance.get_run_by_id(killed_run).status == dg.DagsterRunStatus.STARTED

    again = _materialize("lora_adapter", env)
    assert again.returncode == 0, again.stderr[-4000:]
    # Without the recovery the dead run keeps the `gpu` pool's only slot and this step waits forever.
    out = again.stdout + again.stderr
    assert "freed the concurrency slots it held" in out and "marked the run failed" in out
    assert "removed the staging left by a dead training run" in out
    assert list(staging.iterdir()) == []
    versions = sorted(p.name for p in (adapters / "versions").iterdir())
    assert len(versions) == 1 and (adapters / "current").read_text().strip() == versions[0]
    assert (adapters / "versions" / versions[0] / "adapter_model.safetensors").is_file()
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        dead = instance.get_run_by_id(killed_run)
        assert dead.status == dg.DagsterRunStatus.FAILURE
        failure = instance.get_records_for_run(killed_run, of_type=dg.DagsterEventType.RUN_FAILURE).records
        assert "died in lora_adapter" in failure[-1].event_log_entry.dagster_event.message


def test_recovery_fails_a_dead_run_frees_its_slot_and_keeps_live_ones(tmp_path: Path) -> None:
    """The same recovery in process, fast: which staging folders go, what happens to their runs."""
    from dagster._core.test_utils import create_run_for_test

    from sleeptrain_resources.staging import claim_staging, recover_dead_training_runs

    staging = tmp_path / "staging"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        dead, live = (create_run_for_test(instance, status=dg.DagsterRunStatus.STARTED) for _ in range(2))
        storage.claim_concurrency_slot("gpu", dead.run_id, "lora_adapter")
        claim_staging(staging, live.run_id)  # owned by this (live) process
        folder = claim_staging(staging, dead.run_id)
        (folder / "owner.json").write_text(f'{{"owner": "{dead_pid}@{os.uname().nodename}"}}')
        assert storage.get_concurrency_run_ids() == {dead.run_id}

        messages: list[str] = []
        assert recover_dead_training_runs(instance, staging, "this-run", messages.append) == [dead.run_id]
        assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(live.run_id).status == dg.DagsterRunStatus.STARTED
        assert storage.get_concurrency_run_ids() == set()
        assert sorted(p.name for p in staging.iterdir()) == [live.run_id]
        assert any("freed the concurrency slots" in m for m in messages)
