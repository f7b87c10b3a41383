"""The whole graph through the real `dagster asset materialize` command, as CI and `make run` use it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_whole_graph_materializes_from_the_command_line(sleeptrain_env: Path, tmp_path: Path) -> None:
    dagster_home = sleeptrain_env / "dagster"
    dagster_home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home)}
    command = [
        str(Path(sys.executable).with_name("dagster")), "asset", "materialize",
        "-m", "sleeptrain_assets.definitions", "--select", "*",
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "RUN_SUCCESS" in done.stdout + done.stderr

    reports = sleeptrain_env / "reports"
    rows = json.loads((reports / "leaderboard.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert rows, "the leaderboard has rows"
    assert (reports / "leaderboard.html").stat().st_size > 1000
    current = (sleeptrain_env / "adapters" / "current").read_text().strip()
    assert (sleeptrain_env / "adapters" / "versions" / current / "adapter_model.safetensors").is_file()
    # The persistent Dagster home keeps the run: a second command sees the materializations.
    assert any(dagster_home.rglob("*.db"))
    # The adapter's page in the UI links the adapter folder, not the IO manager's storage file.
    seen = subprocess.run([sys.executable, "-c", LATEST_PATH], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert seen.returncode == 0, seen.stderr[-2000:]
    assert seen.stdout.strip() == str(sleeptrain_env / "adapters" / "versions" / current)


LATEST_PATH = """
import dagster as dg
with dg.DagsterInstance.get() as instance:
    event = instance.get_latest_materialization_event(dg.AssetKey("lora_adapter"))
    print(event.asset_materialization.metadata["path"].value)
"""


def test_one_asset_materializes_alone_from_the_command_line(sleeptrain_env: Path) -> None:
    # `people_profiles` once shared a non-subsettable multi-asset with `conversation_templates`.
    dagster_home = sleeptrain_env / "dagster"
    dagster_home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home)}
    command = [str(Path(sys.executable).with_name("dagster")), "asset", "materialize",
               "-m", "sleeptrain_assets.definitions", "--select", "people_profiles"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "RUN_SUCCESS" in out and 'Materialized value people_profiles' in out
    assert 'Started execution of step "conversation_templates"' not in out
