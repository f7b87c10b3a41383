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
        "-m", "sleeptrain_assets.definitions", "--select", "*leaderboard",
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
