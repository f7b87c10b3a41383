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
    board = json.loads((reports / "leaderboard.json").read_text())
    people_rows = [r for r in board["rows"] if r["benchmark"] == "sleeptrain-people"]
    assert [r["system"] for r in people_rows] == ["adapter", "base"]
    for row in people_rows:
        # Every reported rate carries its n and a 95% interval around it.
        for kind, rate in row["metrics"].items():
            if rate is not None:
                low, high = row["intervals"][kind]
                assert row["counts"][kind] >= 1 and low <= rate <= high, (row["system"], kind)
    run = board["latest_run"]
    assert run["reported_split"] == "test"
    assert run["systems"]["base"]["fictional_by_kind"]["recall"]["rate"] <= 0.25, "invented people are unknown"
    assert {t["verdict"] for t in run["targets"]} <= {"met", "met, not yet sure", "not met", "not met, not yet sure"}
    assert (reports / "leaderboard.html").stat().st_size > 1000
    current = (sleeptrain_env / "adapters" / "current").read_text().strip()
    assert (sleeptrain_env / "adapters" / "versions" / current / "adapter_model.safetensors").is_file()

    # A second process on the same persistent Dagster home sees every asset's latest materialization.
    probe = (
        "import json, sys\n"
        "import dagster as dg\n"
        "instance = dg.DagsterInstance.get()\n"
        "keys = json.loads(sys.argv[1])\n"
        "found = {k: instance.get_latest_materialization_event(dg.AssetKey(k)) is not None for k in keys}\n"
        "print(json.dumps(found))\n"
    )
    assets = ["people_profiles", "conversation_templates", "templated_conversations", "evaluation_questions",
              "validated_queue", "hippocampus_memories", "consolidated_memories", "lora_adapter",
              "benchmark_scores", "leaderboard"]
    seen = subprocess.run([sys.executable, "-c", probe, json.dumps(assets)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert seen.returncode == 0, seen.stderr[-3000:]
    assert json.loads(seen.stdout.strip().splitlines()[-1]) == {k: True for k in assets}
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
