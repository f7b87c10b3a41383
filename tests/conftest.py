"""Every test runs against its own SLEEPTRAIN_HOME on the smoke profile; models are converted once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
COMPAT = REPO.parent / "shared" / "compat"

pytest_plugins = ["tests.postgres_fixture", "tests.graph_on_postgres"]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One converted SmolLM2 per test session, shared by every SLEEPTRAIN_HOME."""
    existing = os.environ.get("SLEEPTRAIN_MODEL_CACHE")
    return Path(existing) if existing else tmp_path_factory.mktemp("model-cache")


@pytest.fixture(autouse=True)
def sleeptrain_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_cache: Path) -> Path:
    home = tmp_path / "sleeptrain-home"
    monkeypatch.setenv("SLEEPTRAIN_HOME", str(home))
    monkeypatch.setenv("SLEEPTRAIN_PROFILE", "smoke")
    monkeypatch.setenv("SLEEPTRAIN_MODEL_CACHE", str(model_cache))
    monkeypatch.setenv("SLEEPTRAIN_TRACKING", "disabled")
    monkeypatch.setenv("SLEEPTRAIN_DATA_DIR", str(REPO / "data"))
    monkeypatch.delenv("SLEEPTRAIN_DATABASE_URL", raising=False)
    monkeypatch.delenv("SLEEPTRAIN_BASE_MODEL", raising=False)
    return home


@pytest.fixture
def compat_dir() -> Path:
    if not COMPAT.is_dir():
        pytest.skip(f"SleepTrain v2 compatibility files not found at {COMPAT}")
    return COMPAT


@pytest.fixture
def inbox_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data dir whose people and templates are the repository's, with an inbox of its own."""
    data = tmp_path / "data"
    data.mkdir()
    repo_data = Path(__file__).resolve().parents[1] / "data"
    for sub in ("people", "templates", "benchmarks"):
        (data / sub).symlink_to(repo_data / sub)
    (data / "inbox").mkdir()
    monkeypatch.setenv("SLEEPTRAIN_DATA_DIR", str(data))
    return data / "inbox"
