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


# A child that registers or switches the pointer and stops at a point inside the operation: it says "paused"
# and waits for a line on stdin that never comes, so the kill lands exactly there.
CRASH = textwrap.dedent(
    """
    import os, shutil, sys
    sys.path.insert(0, sys.argv[1])
    import sleeptrain_resources.registry as reg

    def pause():
        print("paused", flush=True)
        sys.stdin.readline()

    point = sys.argv[3]
    registry = reg.AdapterRegistry(root=sys.argv[2])
    if point == "copy":
        real_copytree = shutil.copytree
        def copy_one_file_then_pause(src, dst, *a, **k):
            copied = []
            def copy(s, d, **kw):
                if copied:
                    pause()
                copied.append(shutil.copy2(s, d, **kw))
            return real_copytree(src, dst, *a, copy_function=copy, **k)
        reg.shutil.copytree = copy_one_file_then_pause
        registry.register(sys.argv[4])
    elif point == "pointer":
        real_replace = os.replace
        def pause_then_replace(src, dst):
            pause()
            real_replace(src, dst)
        reg.os.replace = pause_then_replace
        registry.set_current(sys.argv[4], "promote")
    elif point == "log":
        real_write = os.write
        def pause_before_the_log_line(fd, data):
            if os.readlink(f"/proc/self/fd/{fd}").endswith("history.jsonl"):
                pause()
            return real_write(fd, data)
        reg.os.write = pause_before_the_log_line
        registry.set_current(sys.argv[4], "promote")
    print("survived", flush=True)
    """
)


def _crash(registry: AdapterRegistry, point: str, arg: str) -> None:
    """Run the child to its pause point, check the point was reached, then kill -9 it there."""
    proc = subprocess.Popen([sys.executable, "-c", CRASH, str(REPO), str(registry.root_dir), point, arg],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line == "paused", f"the child never reached {point!r}: {line!r} {proc.stderr.read()}"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def test_killed_while_copying_a_version_in(registry: AdapterRegistry, tmp_path: Path) -> None:
    first = registry.register(adapter(tmp_path / "a", 1))
    _crash(registry, "copy", str(adapter(tmp_path / "b", 2)))
    assert registry.versions() == [first] and registry.current() == first
    incoming = list((registry.root_dir / "versions").glob(".incoming-*"))
    assert len(incoming) == 1 and len(list(incoming[0].iterdir())) == 1, "the kill must land after one file of three"
    second = registry.register(tmp_path / "b")
    assert registry.versions() == [first, second]
    assert not list((registry.root_dir / "versions").glob(".incoming-*")), "stale copy of a dead writer kept"
    assert [e["action"] for e in registry.history()] == ["register", "set_current", "register"]


def test_killed_before_the_pointer_switch_keeps_the_old_current(registry: AdapterRegistry, tmp_path: Path) -> None:
    first = registry.register(adapter(tmp_path / "a", 1))
    second = registry.register(adapter(tmp_path / "b", 2))
    _crash(registry, "pointer", second)
    drafts = list(registry.root_dir.glob(".current.*"))
    assert len(drafts) == 1 and drafts[0].read_text() == second + "\n", "killed with the new pointer drafted"
    assert registry.current() == first
    assert (registry.current_path() / "adapter_model.safetensors").is_file()
    registry.set_current(second, "promote again")
    assert registry.current() == second
    assert not list(registry.root_dir.glob(".current.*")), "the dead writer's pointer draft was kept"


def test_killed_after_the_pointer_switch_has_the_new_current(registry: AdapterRegistry, tmp_path: Path) -> None:
    registry.register(adapter(tmp_path / "a", 1))
    second = registry.register(adapter(tmp_path / "b", 2))
    _crash(registry, "log", second)
    assert registry.current() == second
    assert (registry.current_path() / "adapter_config.json").is_file()
    # The switch happened but its log line never did: rollback has nothing to go back to, and says so.
    assert [e["action"] for e in registry.history()] == ["register", "set_current", "register"]


REGISTER_AT_ONCE = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    import sleeptrain_resources.registry as reg

    root, source, mark, go = sys.argv[2:6]
    real_rename = os.rename
    def rename_when_told(src, dst):
        # The version number is chosen: wait here until the test says go.
        open(mark, "w").close()
        while not os.path.exists(go):
            time.sleep(0.005)
        real_rename(src, dst)
    reg.os.rename = rename_when_told
    print(reg.AdapterRegistry(root=root).register(source), flush=True)
    """
)


def test_two_processes_registering_at_once_get_distinct_versions_and_full_history(registry: AdapterRegistry,
                                                                                  tmp_path: Path) -> None:
    import time

    go = tmp_path / "go"
    marks = [tmp_path / f"at-rename-{i}" for i in (1, 2)]
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER_AT_ONCE, str(REPO), str(registry.root_dir),
                               str(adapter(tmp_path / f"src{i}", i)), str(marks[i - 1]), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    deadline = time.monotonic() + 60
    while not any(m.exists() for m in marks):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no writer reached the rename"
        time.sleep(0.01)
    # Without a writer lock the other one picks the same number within this window; with it, it waits.
    time.sleep(2.0)
    go.touch()
    versions = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        versions.append(out.strip())
    numbers = sorted(int(v[1:5]) for v in versions)
    assert numbers == [1, 2], versions
    assert registry.versions() == sorted(versions)
    history = registry.history()
    assert sorted(e["version"] for e in history if e["action"] == "register") == sorted(versions)
    assert [e["action"] for e in history].count("set_current") == 1, "only the first adapter becomes current"
    assert registry.current() == registry.versions()[0]


def test_a_pointer_naming_a_missing_version_is_named_and_rollback_repairs_it(registry: AdapterRegistry,
                                                                            tmp_path: Path) -> None:
    import shutil

    first = registry.register(adapter(tmp_path / "a", 1))
    second = registry.register(adapter(tmp_path / "b", 2))
    registry.set_current(second, "promote")
    shutil.rmtree(registry.root_dir / "versions" / second)  # e.g. an operator's disk clean-up
    pointer = registry.root_dir / "current"
    with pytest.raises(RegistryError, match=rf"{pointer}.*names version '{second}'.*rollback"):
        registry.current()
    assert registry.rollback() == first
    assert registry.current() == first
    assert registry.history()[-1] == {**registry.history()[-1], "version": first, "previous": second}
    pointer.write_text("latest\n")
    with pytest.raises(RegistryError, match=rf"{pointer}.*'latest'.*not a version name"):
        registry.current_path()
    registry.rollback(first, reason="repair")
    assert registry.current() == first


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_corrupt_manifest_is_named(registry: AdapterRegistry, tmp_path: Path, content: str) -> None:
    version = registry.register(adapter(tmp_path / "a", 1))
    manifest = registry.root_dir / "versions" / version / "manifest.json"
    manifest.write_text(content)
    with pytest.raises(RegistryError, match=rf"{manifest}: manifest (is not valid JSON|must be a JSON object)"):
        registry.manifest(version)
    assert registry.current() == version, "the adapter itself stays usable"
    assert registry.register(adapter(tmp_path / "b", 2)).startswith("v0002-")


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
