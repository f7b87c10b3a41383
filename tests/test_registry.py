"""AdapterRegistry: versions, the atomic `current` pointer, history, rollback, and crashes mid-write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sleeptrain_resources.registry import AdapterRegistry, RegistryError

REPO = Path(__file__).resolve().parents[1]


def adapter(folder: Path, seed: int) -> Path:
    """An adapter folder in PEFT's on-disk format (real safetensors file, real LoRA config)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": rng.standard_normal((4, 576), dtype=np.float32),
               f"{prefix}.lora_B.weight": rng.standard_normal((576, 4), dtype=np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    (folder / "manifest.json").write_text(json.dumps({"seed": seed}))
    return folder


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(root=str(tmp_path / "adapters"))


def test_default_root_is_under_sleeptrain_home(sleeptrain_env: Path) -> None:
    assert AdapterRegistry().root_dir == sleeptrain_env / "adapters"


def test_first_adapter_becomes_current_later_ones_wait(registry: AdapterRegistry, tmp_path: Path) -> None:
    assert registry.current() is None and registry.current_path() is None and registry.versions() == []
    first = registry.register(adapter(tmp_path / "a", 1))
    second = registry.register(adapter(tmp_path / "b", 2))
    assert first.startswith("v0001-") and second.startswith("v0002-")
    assert registry.versions() == [first, second]
    assert registry.current() == first
    assert registry.current_path() == registry.root_dir / "versions" / first
    assert registry.manifest(first) == {"seed": 1}
    assert registry.register(tmp_path / "b") == second, "the same weights registered twice are one version"
    assert len(registry.versions()) == 2
    third = registry.register(adapter(tmp_path / "c", 3), promote_if_empty=False)
    assert registry.current() == first and third in registry.versions()


def test_set_current_logs_and_rollback_returns_to_the_previous(registry: AdapterRegistry, tmp_path: Path) -> None:
    first = registry.register(adapter(tmp_path / "a", 1))
    second = registry.register(adapter(tmp_path / "b", 2))
    registry.set_current(second, "scores improved")
    assert registry.current() == second
    assert registry.rollback() == first
    assert registry.current() == first
    actions = [(e["action"], e["version"], e.get("reason")) for e in registry.history()]
    assert actions == [
        ("register", first, None),
        ("set_current", first, "first adapter of an empty registry"),
        ("register", second, None),
        ("set_current", second, "scores improved"),
        ("set_current", first, "rollback"),
    ]
    registry.rollback(second, reason="operator")
    assert registry.current() == second


def test_bad_input_is_named_and_changes_nothing(registry: AdapterRegistry, tmp_path: Path) -> None:
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "adapter_config.json").write_text("{}")
    with pytest.raises(RegistryError, match="incomplete.*adapter_model.safetensors"):
        registry.register(incomplete)
    with pytest.raises(RegistryError, match="not a version name"):
        registry.set_current("latest", "typo")
    with pytest.raises(RegistryError, match="missing"):
        registry.set_current("v0009-deadbeef", "absent")
    with pytest.raises(RegistryError, match="no earlier current version"):
        registry.rollback()
    assert registry.versions() == [] and registry.current() is None and registry.history() == []


def test_resolve_takes_versions_and_folders(registry: AdapterRegistry, tmp_path: Path) -> None:
    folder = adapter(tmp_path / "a", 1)
    version = registry.register(folder)
    assert registry.resolve(version) == registry.path(version)
    assert registry.resolve(str(folder)) == folder.resolve()
    with pytest.raises(RegistryError, match="neither a registered version nor an adapter folder"):
        registry.resolve(tmp_path / "nowhere")


def test_a_torn_history_line_is_skipped_and_not_glued_to_the_next(registry: AdapterRegistry, tmp_path: Path) -> None:
    first = registry.register(adapter(tmp_path / "a", 1))
    with open(registry.root_dir / "history.jsonl", "a") as fh:
        fh.write('{"action": "set_cur')
    second = registry.register(adapter(tmp_path / "b", 2))
    assert [e["version"] for e in registry.history()] == [first, first, second]


CRASH = textwrap.dedent(
    """
    import os, shutil, signal, sys
    sys.path.insert(0, sys.argv[1])
    import sleeptrain_resources.registry as reg

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    point = sys.argv[3]
    registry = reg.AdapterRegistry(root=sys.argv[2])
    if point == "copy":
        real_copytree = shutil.copytree
        def copy_then_die(src, dst, *a, **k):
            real_copytree(src, dst, *a, **k)
            die()
        reg.shutil.copytree = copy_then_die
        registry.register(sys.argv[4])
    elif point == "pointer":
        reg.os.replace = die
        registry.set_current(sys.argv[4], "promote")
    elif point == "log":
        reg.os.fsync = lambda fd: die() if os.fstat(fd).st_size > 0 and reg.os.path.basename(
            os.readlink(f"/proc/self/fd/{fd}")) == "history.jsonl" else None
        registry.set_current(sys.argv[4], "promote")
    print("survived")
    """
)


def _crash(registry: AdapterRegistry, point: str, arg: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASH, str(REPO), str(registry.root_dir), point, arg],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


def test_killed_while_copying_a_version_in(registry: AdapterRegistry, tmp_path: Path) -> None:
    first = registry.register(adapter(tmp_path / "a", 1))
    _crash(registry, "copy", str(adapter(tmp_path / "b", 2)))
    assert registry.versions() == [first] and registry.current() == first
    assert list((registry.root_dir / "versions").glob(".incoming-*")), "the kill should have hit mid-copy"
    second = registry.register(tmp_path / "b")
    assert registry.versions() == [first, second]
    assert not list((registry.root_dir / "versions").glob(".incoming-*")), "stale copy of a dead writer kept"


def test_killed_before_the_pointer_switch_keeps_the_old_current(registry: AdapterRegistry, tmp_path: Path) -> None:
    first = registry.register(adapter(tmp_path / "a", 1))
    second = registry.register(adapter(tmp_path / "b", 2))
    _crash(registry, "pointer", second)
    assert registry.current() == first
    assert (registry.current_path() / "adapter_model.safetensors").is_file()


def test_killed_after_the_pointer_switch_has_the_new_current(registry: AdapterRegistry, tmp_path: Path) -> None:
    registry.register(adapter(tmp_path / "a", 1))
    second = registry.register(adapter(tmp_path / "b", 2))
    _crash(registry, "log", second)
    assert registry.current() == second
    assert (registry.current_path() / "adapter_config.json").is_file()
    assert os.path.getsize(registry.root_dir / "history.jsonl") > 0


def test_promote_moves_current_and_records_cycle_metrics_and_prior_champion(
        registry: AdapterRegistry, tmp_path: Path) -> None:
    first = registry.register(adapter(tmp_path / "a", 1))
    second = registry.register(adapter(tmp_path / "b", 2), promote_if_empty=False)
    prior = registry.promote(second, cycle="cycle-000001", metrics={"new_fact_recall": 1.0},
                             decision={"accepted": True, "reasons": ["all gates passed"]})
    assert prior == first and registry.current() == second
    entry = registry.history()[-1]
    assert entry["promoted_by"] == "cycle-000001" and entry["prior_champion"] == first
    assert entry["metrics"] == {"new_fact_recall": 1.0} and entry["decision"]["accepted"]
    registry.rollback(first, reason="rollback by ops: cycle-000001 answers worse in production")
    reigns = registry.champions()
    assert [r["version"] for r in reigns] == [first, second, first]
    assert reigns[1]["cycle"] == "cycle-000001" and reigns[1]["until"] == reigns[2]["since"]
    assert reigns[2]["reason"].startswith("rollback by ops") and reigns[2]["previous"] == second
    assert reigns[2]["until"] is None
