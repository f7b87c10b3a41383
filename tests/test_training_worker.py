"""lora_adapter trained in a Dagster Pipes worker process (the real SmolLM2, smoke-sized), as on a GPU machine."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from sleeptrain_assets.defs.training import LoraConfig, lora_adapter, replay_targets
from sleeptrain_assets.lib import settings
from sleeptrain_assets.lib.catalog import TemplateSet, load_people, load_templates
from sleeptrain_assets.lib.records import Memory, Person
from sleeptrain_assets.lib.training_data import build_training_set
from sleeptrain_resources.llm import BaseModel
from sleeptrain_resources.adapter_io import AdapterRefIOManager
from sleeptrain_resources.registry import AdapterRegistry
from sleeptrain_resources.trainer import ADAPTER_WEIGHTS, LoraTrainer, trainer_from_env
from sleeptrain_resources.training_worker import local, portable, read_job, write_job
from tests.lora_helpers import qa_pairs
from tests.test_training_asset import _memories

SMOKE = LoraConfig(max_steps=3, early_stop_patience=0)
SMALL_REPLAY = {"max_prompts": 8, "max_new_tokens": 24}


def _materialize(memories: list[Memory], trainer: LoraTrainer, registry: AdapterRegistry,
                 instance: dg.DagsterInstance, config: LoraConfig = SMOKE) -> dg.ExecuteInProcessResult:
    """lora_adapter with upstream assets that produce the pipeline's real objects, kept small."""

    @dg.asset
    def people_profiles() -> dict[str, Person]:
        return load_people(settings.data_dir() / "people")

    @dg.asset
    def conversation_templates() -> TemplateSet:
        return load_templates(settings.data_dir() / "templates")

    @dg.asset
    def consolidated_memories() -> list[Memory]:
        return memories

    return dg.materialize(
        [people_profiles, conversation_templates, consolidated_memories, replay_targets, lora_adapter],
        resources={"base_model": BaseModel(), "trainer": trainer, "registry": registry,
                   "adapter_io_manager": AdapterRefIOManager()},
        instance=instance,
        run_config={"ops": {"lora_adapter": {"config": config.model_dump()},
                            "replay_targets": {"config": SMALL_REPLAY}}},
        raise_on_error=False,
    )


def _people_memories(*person_ids: str) -> list[Memory]:
    data = settings.data_dir()
    people, templates = load_people(data / "people"), load_templates(data / "templates")
    return [m for pid in person_ids for m in _memories(pid, people, templates)]


def _materialization(result: dg.ExecuteInProcessResult) -> dg.AssetMaterialization:
    return result.asset_materializations_for_node("lora_adapter")[0]


def _log_lines(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id) if e.dagster_event is None]


def _step_error(result: dg.ExecuteInProcessResult) -> str:
    (failure,) = [e for e in result.all_events if e.is_step_failure and e.step_key == "lora_adapter"]
    error = failure.event_specific_data.error
    return error.to_string()


def _staging_leftovers() -> list[str]:
    staging = settings.state_dir() / "staging"
    return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []


@pytest.mark.slow
def test_pipes_worker_reports_back_and_trains_the_same_adapter_as_in_process(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    memories = _people_memories("lena_varga")
    registry = AdapterRegistry()

    piped = _materialize(memories, LoraTrainer(launcher="pipes_subprocess"), registry, instance)
    assert piped.success, _step_error(piped)
    materialization = _materialization(piped)
    meta = materialization.metadata
    worker = meta["trained_on"].value
    assert worker["launcher"] == "pipes_subprocess" and worker["pid"] != os.getpid()
    assert worker["device"] == "cpu" and meta["steps"].value == 3 and len(meta["loss_curve"].value) == 3
    adapter_sha = materialization.tags["dagster/data_version"]
    value = piped.output_for_node("lora_adapter")
    assert value["adapter_sha256"] == adapter_sha and registry.current() == value["version"]
    assert registry.manifest(value["version"])["adapter_sha256"] == adapter_sha
    assert _staging_leftovers() == [], "job file or adapter left in staging"

    # The worker's own log lines and its step metrics are in the run's event log.
    lines = _log_lines(instance, piped.run_id)
    assert any(line.startswith(f"training worker pid {worker['pid']} (cpu") for line in lines), lines
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/3", "2/3", "3/3"] and all(" loss " in s and " lr " in s for s in steps)
    assert any(line.startswith(f"adapter {adapter_sha[:12]} written to ") for line in lines)

    # Same seed, same data, same machine: training in the step's own process gives the same weights.
    in_process = _materialize(memories, LoraTrainer(), AdapterRegistry(root=str(tmp_path / "in-process")), instance)
    assert in_process.success, _step_error(in_process)
    assert in_process.output_for_node("lora_adapter")["data_sha256"] == value["data_sha256"]
    assert _materialization(in_process).metadata["trained_on"].value["pid"] == os.getpid()
    assert _materialization(in_process).tags["dagster/data_version"] == adapter_sha
    assert _materialization(in_process).metadata["loss_curve"].value == meta["loss_curve"].value


@pytest.mark.slow
def test_worker_stopped_by_its_nan_guard_fails_the_step_with_its_message_and_registers_nothing() -> None:
    from safetensors.torch import load_file, save_file

    instance = dg.DagsterInstance.ephemeral()
    registry = AdapterRegistry()
    first = _materialize(_people_memories("lena_varga"), LoraTrainer(), registry, instance,
                         LoraConfig(max_steps=1, early_stop_patience=0))
    assert first.success, _step_error(first)
    current = registry.current()
    # A current adapter whose weights went bad on disk: the next cycle continues from it.
    weights = registry.path(current) / ADAPTER_WEIGHTS
    tensors = load_file(str(weights))
    tensors = {name: t.fill_(float("nan")) if "lora_B" in name else t for name, t in tensors.items()}
    save_file(tensors, str(weights))
    before = (registry.versions(), registry.current(), len(registry.history()))

    failed = _materialize(_people_memories("lena_varga", "tobias_renner"), LoraTrainer(launcher="pipes_subprocess"),
                          registry, instance)
    assert not failed.success
    assert (registry.versions(), registry.current(), len(registry.history())) == before
    error = _step_error(failed)
    assert "training worker failed: TrainingFailed: non-finite loss nan at step 1" in error, error
    assert not failed.asset_materializations_for_node("lora_adapter")
    assert _staging_leftovers() == []


@pytest.mark.slow
def test_worker_killed_mid_training_fails_the_step_and_registers_nothing() -> None:
    instance = dg.DagsterInstance.ephemeral()
    killed: list[int] = []

    def kill_worker_once_it_trains() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for run in instance.get_runs():
                lines = _log_lines(instance, run.run_id)
                pid = next((int(line.split()[3]) for line in lines if line.startswith("training worker pid ")), None)
                if pid and any(line.startswith("step ") for line in lines):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_worker_once_it_trains, daemon=True)
    killer.start()
    registry = AdapterRegistry()
    result = _materialize(_people_memories("lena_varga"), LoraTrainer(launcher="pipes_subprocess"), registry, instance,
                          LoraConfig(max_steps=20, early_stop_patience=0))
    killer.join(timeout=5)
    assert killed and not result.success
    assert "training worker failed: External execution process failed with code -9 (killed by SIGKILL)" in \
        _step_error(result)
    assert registry.versions() == [] and registry.current() is None
    assert _staging_leftovers() == []


def test_job_file_round_trips_and_a_changed_job_is_refused(tmp_path: Path) -> None:
    training_set = build_training_set(qa_pairs(), replay_share=0.0, seed=3)
    hp = LoraTrainer().hyperparams(max_steps=2)
    staging = settings.state_subdir("staging")
    job_file, out = staging / "adapter-x.job.json", staging / "adapter-x"
    digest = write_job(job_file, training_set, BaseModel(), hp, out, None, {"profile": "smoke"})
    assert json.loads(job_file.read_text())["output_dir"] == "$SLEEPTRAIN_HOME/staging/adapter-x"
    assert local(portable(out)) == out and portable(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")

    job = read_job(job_file, digest)
    assert job.training_set == training_set and job.output_dir == out and job.init_adapter is None
    assert job.hyperparameters["max_steps"] == 2 and job.extra_manifest == {"profile": "smoke"}
    assert job.base_model_sha256 == BaseModel().source_hash() and job.base_model.model_path == ""

    changed = job_file.read_text().replace('"max_steps": 2', '"max_steps": 2000')
    job_file.write_text(changed)
    with pytest.raises(ValueError, match=r"adapter-x\.job\.json: the training job's sha256 differs"):
        read_job(job_file, digest)
    job_file.write_text(json.dumps({"format": "sleeptrain-training-job/0"}))
    with pytest.raises(ValueError, match=r"adapter-x\.job\.json: field 'format' must be 'sleeptrain-training-job/1'"):
        read_job(job_file, hashlib.sha256(job_file.read_bytes()).hexdigest())


def test_launcher_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert trainer_from_env().launcher == "in_process"
    monkeypatch.setenv("SLEEPTRAIN_TRAINER_LAUNCHER", "pipes_subprocess")
    assert trainer_from_env().launcher == "pipes_subprocess"
    monkeypatch.setenv("SLEEPTRAIN_TRAINER_LAUNCHER", "gpu")
    with pytest.raises(ValueError, match="SLEEPTRAIN_TRAINER_LAUNCHER='gpu': use one of in_process, pipes_subprocess"):
        trainer_from_env()


def test_worker_started_outside_pipes_exits_with_a_clear_message() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    done = subprocess.run([sys.executable, "-m", "sleeptrain_resources.training_worker"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "started outside Dagster Pipes" in done.stderr


class _CompletedWorker:
    """What a Pipes client hands back after the worker exited 0: the results the worker reported."""

    def __init__(self, *results: dg.MaterializeResult) -> None:
        self.results = results

    def get_results(self, *, implicit_materializations: bool = True) -> tuple[dg.MaterializeResult, ...]:
        return self.results


def test_an_adapter_that_differs_from_the_workers_report_is_refused(tmp_path: Path) -> None:
    from sleeptrain_resources.trainer import TrainingFailed
    from sleeptrain_resources.training_worker import _checked_result

    training_set = build_training_set(qa_pairs()[:4], replay_share=0.0, seed=3)
    folder = tmp_path / "adapter"
    sha = LoraTrainer().train(training_set, BaseModel(), folder, overrides={"max_steps": 1}).adapter_sha256
    other = "0" * 64  # e.g. a stale folder on a volume the worker does not share
    with pytest.raises(TrainingFailed, match=f"{sha[:12]} .* differs from the {other[:12]} the worker reported"):
        _checked_result(_CompletedWorker(dg.MaterializeResult(data_version=dg.DataVersion(other))), folder)
    with pytest.raises(TrainingFailed, match="exited without reporting an adapter"):
        _checked_result(_CompletedWorker(), folder)
    with pytest.raises(TrainingFailed, match="this machine sees no adapter_model.safetensors"):
        _checked_result(_CompletedWorker(dg.MaterializeResult(data_version=dg.DataVersion(sha))), tmp_path / "gone")


class _PipesSession:
    """The part of a dagster_pipes context the worker uses: extras in, log and reports out."""

    def __init__(self, **extras: str) -> None:
        self.extras = extras
        self.log = logging.getLogger("training-worker-test")
        self.reported: list[dict] = []

    def get_extra(self, key: str) -> str:
        return self.extras[key]

    def report_asset_materialization(self, **report) -> None:
        self.reported.append(report)


def test_worker_refuses_a_base_model_other_than_the_one_planned_with() -> None:
    from sleeptrain_resources.training_worker import run_job

    staging = settings.state_subdir("staging")
    job_file, out = staging / "adapter-y.job.json", staging / "adapter-y"
    training_set = build_training_set(qa_pairs()[:4], replay_share=0.0, seed=3)
    write_job(job_file, training_set, BaseModel(), LoraTrainer().hyperparams(max_steps=1), out, None, None)
    job = json.loads(job_file.read_text())
    job["base_model"]["sha256"] = "f" * 64  # planned with other weights than the worker finds at that path
    job_file.write_text(json.dumps(job))
    pipes = _PipesSession(job=portable(job_file), job_sha256=hashlib.sha256(job_file.read_bytes()).hexdigest(),
                          launcher="pipes_subprocess")
    with pytest.raises(ValueError, match="has sha256 .* on this machine, the orchestrator planned with ffffffffffff"):
        run_job(pipes)
    assert not out.exists() and pipes.reported == []
