"""The deployment files load as what they claim: deploy/dagster.yaml is a Postgres-backed instance with run
monitoring, crash retries and the gpu pool; the Helm values give the cluster the same instance settings."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INSTANCE_FILE = REPO / "deploy" / "dagster.yaml"
HELM_VALUES = REPO / "deploy" / "helm" / "values.yaml"
# Settings the Helm values pass through additionalInstanceConfig; they must say what deploy/dagster.yaml says.
SHARED_SETTINGS = ("run_monitoring", "run_retries", "nux")


def _instance_settings() -> dict[str, Any]:
    return yaml.safe_load(INSTANCE_FILE.read_text())


def _helm() -> dict[str, Any]:
    return yaml.safe_load(HELM_VALUES.read_text())


def test_the_instance_file_loads_a_postgres_backed_instance(postgres_url: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from sleeptrain_resources.postgres_server import sqlalchemy_url

    home = tmp_path / "dagster-home"
    home.mkdir()
    shutil.copy(INSTANCE_FILE, home / "dagster.yaml")
    monkeypatch.setenv("SLEEPTRAIN_DAGSTER_STORAGE_URL", sqlalchemy_url(postgres_url))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert instance.run_monitoring_enabled and instance.run_monitoring_max_runtime_seconds > 0
        assert instance.run_retries_enabled and instance.run_retries_max_retries >= 1
        # Only crashed runs are retried: a failed check or a NaN loss would fail again.
        assert instance.run_retries_retry_on_asset_or_op_failure is False
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        # The storage works: a run written here is read back from Postgres.
        run = instance.create_run_for_job(dg.GraphDefinition(name="probe", node_defs=[]).to_job())
        assert instance.get_run_by_id(run.run_id) is not None
    # No SQLite files next to it: the instance did not fall back to local storage.
    assert not list(home.rglob("*.db"))


def test_helm_values_give_the_cluster_the_instance_settings_of_one_server(tmp_path: Path) -> None:
    helm, instance = _helm(), _instance_settings()
    extra = helm["additionalInstanceConfig"]
    for key in SHARED_SETTINGS:
        assert extra[key] == instance[key], f"{key}: deploy/helm/values.yaml and deploy/dagster.yaml differ"
    assert extra["concurrency"]["pools"]["default_limit"] >= 1
    # The chart's own renderings of these blocks are off, so dagster.yaml gets each key exactly once.
    assert helm["dagsterDaemon"]["runMonitoring"]["enabled"] is False
    assert helm["dagsterDaemon"]["runRetries"]["enabled"] is False
    # What the chart renders from additionalInstanceConfig is valid instance config for this Dagster version.
    from dagster._core.instance.config import dagster_instance_config

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({**extra, "telemetry": helm["telemetry"]}))
    config, _ = dagster_instance_config(str(home))
    assert config["run_monitoring"]["max_runtime_seconds"] == instance["run_monitoring"]["max_runtime_seconds"]


def test_helm_values_run_our_code_location_with_k8s_runs_and_postgres() -> None:
    helm = _helm()
    (deployment,) = helm["dagster-user-deployments"]["deployments"]
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    module = workspace["load_from"][0]["python_module"]["module_name"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", module]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    env = {item["name"]: item["value"] for item in deployment["env"]}
    mounts = {m["mountPath"] for m in deployment["volumeMounts"]}
    assert env["SLEEPTRAIN_HOME"] in mounts, "SLEEPTRAIN_HOME must be on the shared volume"
    assert helm["runLauncher"]["type"] == "K8sRunLauncher"
    assert helm["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    # The image the values name is the one deploy/Dockerfile builds for this module.
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert f'"-m", "{module}"' in dockerfile and "dagster-k8s==" in dockerfile


def test_training_runs_ask_kubernetes_for_a_gpu() -> None:
    from sleeptrain_assets.definitions import defs

    job = defs().resolve_job_def("sleep_on_gpu")
    config = job.tags["dagster-k8s/config"]
    config = yaml.safe_load(config) if isinstance(config, str) else config
    resources = config["container_config"]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert "lora_adapter" in {key.to_user_string() for key in job.asset_layer.selected_asset_keys}
