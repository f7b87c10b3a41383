"""The lora_adapter asset on real resources: first cycle, nothing new, a later cycle continuing with replay."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from sleeptrain_assets.defs.training import GPU_OP_TAGS, LoraConfig, lora_adapter
from sleeptrain_assets.lib import settings
from sleeptrain_assets.lib.catalog import load_people, load_templates, person_values
from sleeptrain_assets.lib.records import Memory
from sleeptrain_resources.llm import BaseModel
from sleeptrain_resources.registry import AdapterRegistry
from sleeptrain_resources.trainer import LoraTrainer
from tests.lora_helpers import small_replay_targets

SLOTS = ("birth.year", "career.occupation")


def _memories(person_id: str, people, templates) -> list[Memory]:
    values = person_values(people[person_id], templates)
    memories = []
    for placeholder, value in sorted(values.items()):
        slot = templates.slot(placeholder) if placeholder in templates.extractors else None
        if slot in SLOTS and all(m.slot != slot for m in memories):
            memories.append(Memory(id=f"{person_id}:{slot}", person_id=person_id, slot=slot, value=value,
                                   text=f"{slot} = {value}", embedding=(), importance=5.0, source="test#0"))
    return memories


def _run(memories, people, templates, registry, config=None):
    context = dg.build_asset_context()
    output = lora_adapter(
        context,
        config=config or LoraConfig(max_steps=3, early_stop_patience=0),
        consolidated_memories=memories,
        people_profiles=people,
        conversation_templates=templates,
        replay_targets=small_replay_targets(),
        base_model=BaseModel(),
        trainer=LoraTrainer(),
        registry=registry,
    )
    return output


def test_asset_definition_runs_in_the_gpu_pool_with_k8s_gpu_tags() -> None:
    spec = lora_adapter.get_asset_spec()
    assert lora_adapter.op.pool == "gpu"
    k8s = json.loads(lora_adapter.op.tags["dagster-k8s/config"])  # Dagster stores op tag values as JSON
    limits = k8s["container_config"]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and GPU_OP_TAGS["dagster-k8s/config"]["container_config"]
    assert {d.asset_key.path[-1] for d in spec.deps} == {
        "consolidated_memories", "people_profiles", "conversation_templates", "replay_targets"}


def test_first_cycle_trains_and_becomes_current_later_cycle_continues_with_replay() -> None:
    data = settings.data_dir()
    people, templates = load_people(data / "people"), load_templates(data / "templates")
    registry = AdapterRegistry()
    lena = _memories("lena_varga", people, templates)
    assert len(lena) == 2

    first = _run(lena, people, templates, registry)
    version = first.value["version"]
    assert first.value["trained"] and registry.current() == version == first.value["current"]
    assert first.data_version.value == first.value["adapter_sha256"]
    meta = first.metadata
    for key in ("loss_curve", "steps", "tokens", "tokens_per_s", "trainable_params"):
        assert key in meta
    assert meta["steps"].value == 3
    stats = meta["training_set"].value
    assert stats["by_source"]["new"] > 0 and stats["by_source"].get("replay_general", 0) > 0
    manifest = registry.manifest(version)
    assert len(manifest["memories"]) == 2 and manifest["previous_version"] is None

    again = _run(lena, people, templates, registry)
    assert not again.value["trained"] and again.value["version"] == version

    tobias = _memories("tobias_renner", people, templates)
    later = _run(lena + tobias, people, templates, registry)
    new_version = later.value["version"]
    assert later.value["trained"] and new_version != version
    assert registry.current() == version, "promotion past the first adapter is gated elsewhere"
    manifest = registry.manifest(new_version)
    assert manifest["previous_version"] == version
    assert manifest["initialized_from"]["adapter_sha256"] == first.value["adapter_sha256"]
    assert len(manifest["memories"]) == 4
    by_source = later.metadata["training_set"].value["by_source"]
    assert by_source.get("replay_memory", 0) > 0
    assert later.metadata["replayed_memories"].value == 2
    assert not list(Path(settings.state_dir() / "staging").iterdir()), "staging copy left behind"


def test_steps_follow_epochs_over_the_training_set() -> None:
    assert settings.training_steps(1504, 8, 3.0) == 564
    assert settings.training_steps(1504, 8, 3.0, cap=100) == 100
    assert settings.training_steps(3, 8, 0.1) == 1
    data = settings.data_dir()
    people, templates = load_people(data / "people"), load_templates(data / "templates")
    out = _run(_memories("lena_varga", people, templates), people, templates, AdapterRegistry(),
               LoraConfig(epochs=0.25, batch_size=4, early_stop_patience=0))
    examples = out.metadata["training_set"].value["examples"]
    cap = settings.profile().train_max_steps
    steps = out.metadata["steps"].value
    assert steps == settings.training_steps(examples, 4, 0.25, cap)
    assert out.metadata["epochs"].value == round(steps * 4 / examples, 3)


def test_the_adapter_reference_shows_the_adapter_folder_as_its_path(tmp_path: Path) -> None:
    from sleeptrain_assets.defs.resources import resources
    from sleeptrain_assets.defs.training import ADAPTER_IO_MANAGER
    from sleeptrain_resources.adapter_io import AdapterRefIOManager
    from tests.test_registry import adapter

    assert lora_adapter.get_io_manager_key_for_asset_key(dg.AssetKey("lora_adapter")) == ADAPTER_IO_MANAGER
    assert isinstance(resources().resources[ADAPTER_IO_MANAGER], AdapterRefIOManager)
    registry = AdapterRegistry()
    version = registry.register(adapter(tmp_path / "a", 1))

    @dg.asset(name="lora_adapter", io_manager_key=ADAPTER_IO_MANAGER)
    def stand_in() -> dict:
        return {"version": version, "path": str(registry.path(version))}

    @dg.asset
    def reader(lora_adapter: dict) -> str:
        return lora_adapter["path"]

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = dg.materialize([stand_in, reader], instance=instance,
                                resources={ADAPTER_IO_MANAGER: AdapterRefIOManager()})
        assert result.success
        event = instance.get_latest_materialization_event(dg.AssetKey("lora_adapter"))
        assert event.asset_materialization.metadata["path"].value == str(registry.path(version))
        assert result.output_for_node("reader") == str(registry.path(version))
