"""A cycle killed mid-training leaves the champion valid and untouched, and the next cycle runs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sleeptrain_resources.llm import BaseModel
from sleeptrain_resources.registry import AdapterRegistry
from tests.lora_helpers import make_adapter

REPO = Path(__file__).resolve().parents[1]


def _person(pid: str, name: str, city: str, year: int) -> str:
    return json.dumps({"person": pid, "name": name, "messages": [
        {"role": "user", "content": f"I was born in {city} in {year}. I work as a bookbinder."}]}) + "\n"


def _cycle(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sleeptrain_assets.cli", "cycle"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_cycle_killed_mid_training_leaves_the_champion_and_the_next_cycle_runs(
        tmp_path: Path, sleeptrain_env: Path) -> None:
    registry = AdapterRegistry()
    champion = registry.register(make_adapter(BaseModel(), tmp_path / "champion"))
    weights = registry.path(champion) / "adapter_model.safetensors"
    champion_sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    data = tmp_path / "data"
    data.mkdir()
    for sub in ("people", "templates", "benchmarks"):
        (data / sub).symlink_to(REPO / "data" / sub)
    (data / "inbox").mkdir()
    (data / "inbox" / "day1.jsonl").write_text(_person("ilse_maren", "Ilse Maren", "Bergen", 1983))
    env = {**os.environ, "SLEEPTRAIN_DATA_DIR": str(data), "DAGSTER_HOME": str(tmp_path / "dagster"),
           "PYTHONPATH": str(REPO)}
    (tmp_path / "dagster").mkdir()

    killed = _cycle(env)
    seen = []
    deadline = time.monotonic() + 600
    assert killed.stdout is not None
    for line in killed.stdout:  # the challenger logs its training set right before the trainer starts
        seen.append(line)
        if "challenger_adapter" in line and "training set" in line:
            time.sleep(2)
            killed.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "".join(seen[-20:])
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "".join(seen[-20:])
    assert registry.current() == champion
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == champion_sha
    assert registry.versions() == [champion], "no half-written challenger became a version"

    (data / "inbox" / "day2.jsonl").write_text(_person("joris_anker", "Joris Anker", "Delft", 1990))
    done = subprocess.run([sys.executable, "-m", "sleeptrain_assets.cli", "cycle"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "cycle-000002:" in done.stdout
    report = json.loads((sleeptrain_env / "cycles" / "cycle-000002" / "report.json").read_text())
    assert report["status"] in ("promoted", "rejected") and report["decision"]["reasons"]
    assert [f["name"] for f in report["files"]] == ["day2.jsonl"]
    current = registry.current()
    assert current in registry.versions() and (registry.path(current) / "adapter_model.safetensors").is_file()
