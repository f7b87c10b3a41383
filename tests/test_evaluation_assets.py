"""benchmark_scores + leaderboard materialized with the real SmolLM2, MiniLM, local memory store and a real
(tiny) LoRA adapter; upstream assets here produce the same real objects as the pipeline's, kept small."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from sleeptrain_assets.defs.evaluation import EvaluationConfig, benchmark_scores, leaderboard
from sleeptrain_assets.lib import eval_suite, leaderboard_report, settings
from sleeptrain_assets.lib.catalog import load_people, load_templates, person_values
from sleeptrain_assets.lib.records import Memory, Person
from sleeptrain_assets.lib.templating import evaluation_items, qa_pairs
from sleeptrain_assets.lib.training_data import build_training_set
from sleeptrain_resources.embedding import Embedder
from sleeptrain_resources.llm import BaseModel
from sleeptrain_resources.memory_store import LocalMemoryStore
from sleeptrain_resources.registry import AdapterRegistry
from sleeptrain_resources.tracking import Tracker
from sleeptrain_resources.trainer import LoraTrainer

TAUGHT = ("lena_varga", "tobias_renker")  # fictional: the targets are read on these


@dg.asset
def people_profiles() -> dict[str, Person]:
    return load_people(settings.data_dir() / "people")


@dg.asset
def evaluation_questions(people_profiles: dict[str, Person]):
    return evaluation_items({p: people_profiles[p] for p in TAUGHT}, load_templates(settings.data_dir() / "templates"))


@dg.asset
def lora_adapter(people_profiles: dict[str, Person], base_model: BaseModel, memory_store: LocalMemoryStore,
                 embedder: Embedder, registry: AdapterRegistry) -> dict:
    templates = load_templates(settings.data_dir() / "templates")
    pairs = [pair for pid in TAUGHT
             for pair in qa_pairs(people_profiles[pid], templates, person_values(people_profiles[pid], templates))]
    memories = [Memory(id=f"{p.person_id}:{p.slots[0]}", person_id=p.person_id, slot=p.slots[0], value=p.values[0],
                       text=p.answer, embedding=(), importance=1.0, source="test#0")
                for p in {(p.person_id, p.slots[0]): p for p in pairs if p.slots and not p.system}.values()]
    memory_store.upsert(memories, embedder.embed([m.text for m in memories]))
    trained = settings.state_subdir("incoming") / "adapter"
    LoraTrainer(max_steps=2, batch_size=4, probe_every=100).train(build_training_set(pairs), base_model, trained)
    version = registry.register(trained)
    return {"version": version, "path": str(registry.path(version))}


@pytest.mark.slow
def test_benchmark_scores_and_leaderboard_materialize(sleeptrain_env: Path):
    assets = [people_profiles, evaluation_questions, lora_adapter, benchmark_scores, leaderboard]
    resources = {"base_model": BaseModel(), "embedder": Embedder(), "memory_store": LocalMemoryStore(),
                 "registry": AdapterRegistry(), "tracker": Tracker(mode="offline")}
    config = EvaluationConfig(items_per_slot=1, max_items_per_kind=2, batch_size=16)
    result = dg.materialize(assets, resources=resources, instance=dg.DagsterInstance.ephemeral(),
                            run_config={"ops": {"benchmark_scores": {"config": config.model_dump()}}})
    assert result.success
    run = result.output_for_node("benchmark_scores")
    assert set(run["systems"]) == {"adapter", "base", "retrieval"}
    for system in run["systems"].values():
        for kind in ("recall", "paraphrase", "multi_turn", "correction", "confirmation", "identity", "locality",
                     "unchanged", "neighbourhood", "hallucination"):
            assert system["by_kind"][kind]["count"] >= 1, kind  # the reported (test) split
        for kind in ("recall", "paraphrase", "correction", "confirmation"):
            assert system["validation"]["by_kind"][kind]["count"] >= 1, kind
    # One multi-turn conversation of 6 turns per taught person (the smoke profile keeps at most 2).
    assert run["counts"]["multi_turn"] == 12 and run["cycle"] == 1
    base, adapter = run["systems"]["base"], run["systems"]["adapter"]
    # The base model is its own reference: it cannot change its answers, nor lose what it knows.
    assert base["by_kind"]["unchanged"]["rate"] == 1.0
    assert base["by_kind"]["locality"]["rate"] in (1.0, None)
    # Nobody taught the base model these invented people.
    assert base["fictional_by_kind"]["recall"]["rate"] <= 0.25
    # Every target has n, a 95% interval around its value and a verdict.
    for target in run["targets"]:
        if target["value"] is not None and target["name"] != "retrieval_ratio":
            assert target["count"] >= 1 and target["ci_low"] <= target["value"] <= target["ci_high"], target
        assert target["verdict"] in ("met", "met, not yet sure", "not met", "not met, not yet sure")
    detail = json.loads(Path(run["report_path"]).read_text())
    # Per-slot and per-person results cover every slot and person asked about in the test split.
    asked = [i for i in detail["items"] if i["kind"] in ("recall", "paraphrase") and i["split"] == "test"]
    assert len({i["slot"] for i in asked}) >= 2
    for system in ("adapter", "base", "retrieval"):
        assert set(run["breakdown"]["slot"][system]) == {i["slot"] for i in asked}
        assert set(run["breakdown"]["person"][system]) == {i["person_id"] for i in asked}
    assert adapter["answers_cut"]["of"] > 0 and 0 <= adapter["answers_cut"]["cut"] <= adapter["answers_cut"]["of"]
    # Seconds per stage and what generation cost, in the run and in the report it wrote.
    stages = run["stage_seconds"]
    assert set(stages) == {"retrieval_search", "adapter_answers", "adapter_multi_turn", "base_answers",
                           "base_multi_turn", "answer_embedding", "scoring", "external_suites", "total"}
    assert all(v >= 0 for v in stages.values()) and stages["total"] >= stages["base_answers"] > 0
    assert detail["run"]["stage_seconds"] == stages and detail["run"]["generation"] == run["generation"]
    # Base and retrieval prompts went through one pass; in a fresh home only a conversation's first turn, the
    # same prompt as a single question asked just before, comes from the base-answer cache.
    base_pass = run["generation"]["base"]
    assert base_pass["generated"] > 0 and base_pass["generated"] + base_pass["from_cache"] == base_pass["distinct"]
    assert base_pass["from_cache"] <= run["counts"]["multi_turn"] // eval_suite.MULTI_TURN_TURNS
    assert base_pass["distinct"] > len({i["question"] for i in detail["items"] if i["kind"] != "multi_turn"})
    assert {(r["benchmark"], r["system"]) for r in run["external"]} == {
        (b, s) for b in ("TRACE", "MemoryBench", "BABILong", "InfiniteBench") for s in ("adapter", "base")}

    reports = settings.state_subdir("reports")
    board = json.loads((reports / "leaderboard.json").read_text())
    people_rows = [r for r in board["rows"] if r["benchmark"] == leaderboard_report.BENCHMARK]
    version = run["adapter_version"]
    assert run["current_adapter"] == version  # the first adapter of an empty registry is current
    assert [r["adapter_version"] for r in people_rows] == [version, "base"]
    for row in people_rows:
        assert all(row["metrics"][k] is not None for k in leaderboard_report.HEADLINE_KINDS)
        assert row["retrieval"]["recall"] is not None
    page = (reports / "leaderboard.html").read_text()
    assert version in page and "<svg" in page and "Per slot (test split)" in page and "Validation split" in page
    assert all(set(i["answers"]) == {"adapter", "base", "retrieval"} for i in detail["items"])
    assert any(i["retrieved"] for i in detail["items"])  # the retrieval baseline saw memories
    assert json.loads((reports / "retention_history.json").read_text())["cycles"][0]["adapter_version"] == version
    assert list((sleeptrain_env / "tracking").rglob("*.wandb")), "offline tracking files under SLEEPTRAIN_HOME"
    materialization = result.asset_materializations_for_node("leaderboard")[0]
    assert materialization.metadata["html"].value == str(reports / "leaderboard.html")
