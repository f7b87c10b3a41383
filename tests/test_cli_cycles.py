"""`sleeptrain status / versions / rollback`: the champion, its history, and a rollback to the exact bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sleeptrain_assets.cli import main
from sleeptrain_assets.lib.cycle_report import write_report
from sleeptrain_resources.registry import AdapterRegistry
from tests.test_registry import adapter


def _sha(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_rollback_restores_the_exact_previous_adapter_and_keeps_the_audit_trail(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = AdapterRegistry()
    first = registry.register(adapter(tmp_path / "a", 1))
    first_sha = _sha(registry.path(first))
    second = registry.register(adapter(tmp_path / "b", 2), promote_if_empty=False)
    registry.promote(second, cycle="cycle-000001", metrics={"new_fact_recall": 1.0}, decision={"accepted": True})
    assert _sha(registry.current_path()) != first_sha

    assert main(["rollback", first, "--reason", "answers got worse"]) == 0
    assert f"{second} -> {first}" in capsys.readouterr().out
    assert registry.current() == first and _sha(registry.current_path()) == first_sha
    last = registry.history()[-1]
    assert last["previous"] == second and "answers got worse" in last["reason"] and "rollback by" in last["reason"]

    assert main(["versions"]) == 0
    out = capsys.readouterr().out
    assert f"* {first}" in out and f"  {second}" in out
    assert "promoted by cycle-000001" in out and "answers got worse" in out

    with pytest.raises(SystemExit, match="v9999-00000000"):
        main(["rollback", "v9999-00000000"])
    assert registry.current() == first


def test_status_shows_champion_cycles_and_waiting_inbox_files(
        tmp_path: Path, sleeptrain_env: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    (data / "inbox").mkdir(parents=True)
    (data / "inbox" / "day9.jsonl").write_text(json.dumps({"person": "lena_varga", "messages": []}) + "\n")
    monkeypatch.setenv("SLEEPTRAIN_DATA_DIR", str(data))
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "champion: none" in out and "cycles: none yet" in out and "day9.jsonl" in out

    write_report(sleeptrain_env / "cycles" / "cycle-000001", {
        "cycle": "cycle-000001", "status": "rejected", "time": "2026-12-05T03:00:00+00:00",
        "decision": {"accepted": False, "reasons": ["retention_budget: retention fell 0.3"]}})
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "cycle-000001" in out and "rejected" in out and "retention fell 0.3" in out
    assert (sleeptrain_env / "cycles" / "cycle-000001" / "report.md").read_text().startswith("# cycle-000001")
