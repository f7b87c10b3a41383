"""`sleeptrain ask`: base model, current adapter, explicit adapter, persona."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sleeptrain_assets.cli import main
from sleeptrain_resources.llm import BaseModel
from sleeptrain_resources.registry import AdapterRegistry
from tests.lora_helpers import make_adapter

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?"


def _ask(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, str]:
    assert main(["ask", "--max-new-tokens", "16", *argv]) == 0
    out, err = capsys.readouterr()
    return out.strip(), err


def _expected(question: str, adapter: Path | None = None, system: str | None = None) -> str:
    """A fresh generation: the base-answer cache the CLI filled must not answer for it (that would compare the
    CLI's own answer with itself)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return BaseModel().generate([messages], adapter=adapter, max_new_tokens=16, cache=False)[0]


def test_without_an_adapter_the_base_model_answers(capsys: pytest.CaptureFixture[str]) -> None:
    answer, err = _ask(capsys, QUESTION)
    assert "Paris" in answer
    assert "no current adapter" in err
    assert _ask(capsys, "--base", QUESTION)[0] == answer


def test_current_adapter_by_default_base_on_request(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    registry = AdapterRegistry()
    version = registry.register(make_adapter(BaseModel(), tmp_path / "adapter", scale=0.5))
    current = registry.current_path()
    assert registry.current() == version

    adapted, err = _ask(capsys, "--verbose", QUESTION)
    assert str(current) in err
    assert adapted == _expected(QUESTION, adapter=current)
    base, err = _ask(capsys, "--base", "--verbose", QUESTION)
    assert "none (base model)" in err
    assert base == _expected(QUESTION) and "Paris" in base
    assert adapted != base, "a strongly perturbed adapter should change the answer"
    assert _ask(capsys, "--adapter", version, QUESTION)[0] == adapted
    assert _ask(capsys, "--adapter", str(tmp_path / "adapter"), QUESTION)[0] == adapted


def test_person_adds_the_persona_system_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    answer, _ = _ask(capsys, "--base", "--person", "lena_varga", "Where were you born?")
    assert answer == _expected("Where were you born?", system="You are Lena Varga.")
    with pytest.raises(SystemExit, match="no person 'nobody'"):
        main(["ask", "--person", "nobody", "Hi"])


def test_unknown_adapter_version_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="v0042-deadbeef"):
        main(["ask", "--adapter", "v0042-deadbeef", QUESTION])


def test_console_entry_point_runs_as_a_program() -> None:
    proc = subprocess.run([sys.executable, "-m", "sleeptrain_assets.cli", "ask", "--base", "--max-new-tokens", "12",
                           QUESTION], cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
