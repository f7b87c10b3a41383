"""The LoRA training step as a Dagster Pipes worker: the job it receives, the worker itself, and its launch.

The orchestrator writes a job file (training set, hyperparameters, base model, output folder) next to the
output folder under $SLEEPTRAIN_HOME and passes its path and sha256 in the Pipes extras. The worker
(`python -m sleeptrain_resources.training_worker`: a local subprocess, or a GPU pod through PipesK8sClient)
trains with LoraTrainer.train, streams its log and step metrics, writes the adapter atomically into the output
folder and reports the adapter's sha256 as the data version. The orchestrator checks the folder against that
report before anything is registered. Both sides must see the same $SLEEPTRAIN_HOME (a shared volume on
Kubernetes); paths in the job are written relative to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from sleeptrain_assets.lib import settings
from sleeptrain_assets.lib.atomic import write_text_atomic
from sleeptrain_assets.lib.training_data import TrainingExample, TrainingSet, data_hash
from sleeptrain_resources.llm import BaseModel, file_sha256
from sleeptrain_resources.trainer import (
    ADAPTER_WEIGHTS,
    Hyperparams,
    LoraTrainer,
    TrainingFailed,
    TrainResult,
    read_manifest,
    result_from_manifest,
    step_logger,
)

JOB_FORMAT = "sleeptrain-training-job/1"
HOME = "$SLEEPTRAIN_HOME"


def portable(path: str | Path) -> str:
    """A path as `$SLEEPTRAIN_HOME/...` when it lies under the state folder, so another machine can mount it
    elsewhere; otherwise absolute."""
    path = Path(path).expanduser().resolve()
    try:
        return f"{HOME}/{path.relative_to(settings.state_dir()).as_posix()}"
    except ValueError:
        return str(path)


def local(text: str) -> Path:
    """The inverse of `portable` on this machine."""
    if text == HOME or text.startswith(f"{HOME}/"):
        return settings.state_dir() / text[len(HOME) + 1 :]
    return Path(text)


@dataclass(frozen=True)
class TrainingJob:
    """One training run as the worker receives it."""

    training_set: TrainingSet
    base_model: BaseModel
    base_model_sha256: str
    hyperparameters: dict[str, Any]
    output_dir: Path
    init_adapter: Path | None
    extra_manifest: dict[str, Any]


def write_job(
    path: Path,
    training_set: TrainingSet,
    base_model: BaseModel,
    hp: Hyperparams,
    output_dir: Path,
    init_adapter: str | Path | None,
    extra_manifest: Mapping[str, Any] | None,
) -> str:
    """Write the job file atomically; returns its sha256 (the worker refuses a file that differs)."""
    job = {
        "format": JOB_FORMAT,
        "training_set": {
            "data_hash": training_set.data_hash,
            "seed": training_set.seed,
            "examples": [e.to_dict() for e in training_set.examples],
        },
        # The device stays the orchestrator's setting ("auto" by default), so a GPU worker picks CUDA.
        "base_model": {
            "model_path": portable(base_model.model_path) if base_model.model_path else "",
            "device": base_model.device,
            "num_threads": base_model.num_threads,
            "sha256": base_model.source_hash(),
        },
        "hyperparameters": asdict(hp),
        "output_dir": portable(output_dir),
        "init_adapter": portable(init_adapter) if init_adapter else None,
        "extra_manifest": dict(extra_manifest or {}),
    }
    text = json.dumps(job, ensure_ascii=False, sort_keys=True)
    write_text_atomic(path, text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_job(path: Path, sha256: str) -> TrainingJob:
    """Load and check a job file; errors name the file and the field."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot read the training job ({exc}); is $SLEEPTRAIN_HOME shared?") from exc
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError(f"{path}: the training job's sha256 differs from the one Dagster sent; not training")
    try:
        job = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    found = job.get("format") if isinstance(job, dict) else job
    if found != JOB_FORMAT:
        raise ValueError(f"{path}: field 'format' must be {JOB_FORMAT!r}, got {found!r:.80}")

    def field(name: str, kind: type) -> Any:
        value = job.get(name)
        if not isinstance(value, kind):
            raise ValueError(f"{path}: field {name!r} must be a {kind.__name__}, got {value!r:.80}")
        return value

    data, model = field("training_set", dict), field("base_model", dict)
    try:
        examples = tuple(TrainingExample.from_dict(e) for e in data["examples"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: field 'training_set.examples' is malformed ({exc!r})") from exc
    if not examples or data_hash(examples) != data.get("data_hash"):
        raise ValueError(f"{path}: field 'training_set.data_hash' does not match its {len(examples)} examples")
    init = job.get("init_adapter")
    return TrainingJob(
        training_set=TrainingSet(examples=examples, data_hash=data["data_hash"], seed=int(data.get("seed", 0))),
        base_model=BaseModel(
            model_path=str(local(model["model_path"])) if model.get("model_path") else "",
            device=str(model.get("device", "auto")),
            num_threads=int(model.get("num_threads", 0)),
        ),
        base_model_sha256=str(model.get("sha256", "")),
        hyperparameters=field("hyperparameters", dict),
        output_dir=local(field("output_dir", str)),
        init_adapter=local(init) if init else None,
        extra_manifest=field("extra_manifest", dict),
    )


# ----------------------------------------------------------------------------- orchestrator side


def train_in_worker(
    trainer: LoraTrainer,
    context: dg.AssetExecutionContext,
    training_set: TrainingSet,
    base_model: BaseModel,
    output_dir: Path,
    hp: Hyperparams,
    *,
    init_adapter: str | Path | None,
    extra_manifest: Mapping[str, Any] | None,
) -> TrainResult:
    """Send the job to a Pipes worker (`trainer.run_worker`), wait, and check what it wrote against its report."""
    if output_dir.exists():
        raise FileExistsError(f"{output_dir}: adapter output folder already exists")
    job_file = output_dir.with_name(f"{output_dir.name}.job.json")
    digest = write_job(job_file, training_set, base_model, hp, output_dir, init_adapter, extra_manifest)
    extras = {"job": portable(job_file), "job_sha256": digest, "launcher": trainer.launcher}
    context.log.info(f"training in a Pipes worker ({trainer.launcher}): job {job_file}")
    try:
        try:
            invocation = trainer.run_worker(context, extras)
        except Exception as exc:  # the client's error says only "failed with code N"; the worker's says why
            raise TrainingFailed(_failure_message(context, exc)) from exc
        return _checked_result(invocation, output_dir)
    except BaseException:
        _discard(output_dir)
        raise
    finally:
        job_file.unlink(missing_ok=True)


def _checked_result(invocation: Any, output_dir: Path) -> TrainResult:
    results = invocation.get_results(implicit_materializations=False)
    reported = [r for r in results if isinstance(r, dg.MaterializeResult)]
    if len(reported) != 1 or reported[0].data_version is None:
        raise TrainingFailed("training worker exited without reporting an adapter; nothing registered")
    version = reported[0].data_version.value
    weights = output_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise TrainingFailed(
            f"{output_dir}: the worker reported adapter {version[:12]} but this machine sees no {ADAPTER_WEIGHTS} "
            "there (is $SLEEPTRAIN_HOME the same volume on both?); nothing registered"
        )
    manifest = read_manifest(output_dir)
    actual = file_sha256(weights)
    if actual != version or manifest.get("adapter_sha256") != version:
        raise TrainingFailed(
            f"{weights}: sha256 {actual[:12]} (manifest {str(manifest.get('adapter_sha256'))[:12]}) differs from "
            f"the {version[:12]} the worker reported; nothing registered"
        )
    runtime = (reported[0].metadata or {}).get("trained_on")
    return result_from_manifest(output_dir, manifest, runtime.value if runtime is not None else {})


def _failure_message(context: dg.AssetExecutionContext, exc: Exception) -> str:
    reason = str(exc)
    code = re.search(r"failed with code (-\d+)", reason)
    if code:
        try:
            reason += f" (killed by {signal.Signals(-int(code.group(1))).name})"
        except ValueError:
            pass
    worker = _worker_error(context)
    if worker:
        reason = f"{worker} ({reason})"
    return f"training worker failed: {reason}; nothing registered"


def _worker_error(context: dg.AssetExecutionContext) -> str | None:
    """The exception the worker closed its Pipes session with, as Dagster recorded it (an engine event)."""
    step_key = context.get_step_execution_context().step.key
    records = context.instance.get_records_for_run(
        run_id=context.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, ascending=False, limit=200
    ).records
    for record in records:
        event = record.event_log_entry.dagster_event
        data = event.engine_event_data if event else None
        if (event and event.step_key == step_key and data and data.error
                and "closed with exception" in (event.message or "")):
            error = data.error
            text = error.message.strip()
            # The message starts with the exception's dotted path; its class name is enough.
            path, _, rest = text.partition(": ")
            return f"{error.cls_name}: {rest}" if error.cls_name and rest and path.endswith(error.cls_name) else text
    return None


def _discard(output_dir: Path) -> None:
    """Remove what a failed worker may have left: the output folder and its half-written siblings."""
    shutil.rmtree(output_dir, ignore_errors=True)
    for partial in output_dir.parent.glob(f".{output_dir.name}.tmp-*"):
        shutil.rmtree(partial, ignore_errors=True)


# ----------------------------------------------------------------------------- worker side


def run_job(pipes: Any) -> None:
    """Train the job named in the Pipes extras and report the adapter back."""
    job = read_job(local(pipes.get_extra("job")), pipes.get_extra("job_sha256"))
    seen = job.base_model.source_hash()
    if seen != job.base_model_sha256:
        raise ValueError(
            f"base model {job.base_model.model_path or 'packaged SmolLM2'} has sha256 {seen[:12]} on this machine, "
            f"the orchestrator planned with {job.base_model_sha256[:12]}; not training"
        )
    device, _, threads = job.base_model.runtime()
    hp = LoraTrainer().hyperparams(**job.hyperparameters)
    pipes.log.info(
        f"training worker pid {os.getpid()} ({device}, {threads} threads): {len(job.training_set)} examples, "
        f"{hp.max_steps} steps of {hp.batch_size}, from {job.init_adapter or 'the base model'}"
    )
    result = LoraTrainer().train(
        job.training_set, job.base_model, job.output_dir, init_adapter=job.init_adapter,
        extra_manifest=job.extra_manifest, on_step=step_logger(pipes.log, hp.max_steps),
        overrides=job.hyperparameters,
    )
    runtime = {**result.trained_on, "launcher": pipes.get_extra("launcher")}
    pipes.log.info(
        f"adapter {result.adapter_sha256[:12]} written to {result.adapter_dir} after {result.steps} steps "
        f"({result.stopped}) in {result.seconds:.1f} s, {result.tokens_per_s:.0f} tokens/s"
    )
    pipes.report_asset_materialization(
        metadata={
            "trained_on": {"raw_value": runtime, "type": "json"},
            "adapter_dir": {"raw_value": portable(result.adapter_dir), "type": "text"},
            "steps": result.steps,
            "stopped": result.stopped,
            "final_loss": result.final_loss,
            "tokens_per_s": result.tokens_per_s,
            "seconds": result.seconds,
            "loss_curve": {"raw_value": result.loss_curve, "type": "json"},
        },
        data_version=result.adapter_sha256,
    )


def main() -> None:
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        sys.exit(
            f"{__name__}: started outside Dagster Pipes. It is launched by the `trainer` resource "
            "(SLEEPTRAIN_TRAINER_LAUNCHER=pipes_subprocess) or a Pipes client such as PipesK8sClient."
        )
    with open_dagster_pipes() as pipes:
        run_job(pipes)


if __name__ == "__main__":
    main()
