"""The code location loads with every asset, check and resource a user expects."""

from __future__ import annotations

import json

import dagster as dg

from sleeptrain_assets.definitions import defs

ASSETS = {
    "people_profiles",
    "conversation_templates",
    "templated_conversations",
    "evaluation_questions",
    "validated_queue",
    "hippocampus_memories",
    "consolidated_memories",
    "replay_targets",
    "lora_adapter",
    "benchmark_scores",
    "leaderboard",
}
QUEUE_CHECKS = {
    "queue_has_no_duplicates",
    "queue_is_balanced_across_people",
    "queue_covers_every_fact",
    "queue_is_interleaved",
    "queue_excludes_evaluation_questions",
    "queue_fits_chat_template",
}
RESOURCES = {"embedder", "memory_store", "base_model", "trainer", "registry", "tracker"}


def test_definitions_hold_the_whole_graph() -> None:
    definitions = defs()
    graph = definitions.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert ASSETS <= keys
    checks = {key.name for key in graph.asset_check_keys if key.asset_key == dg.AssetKey("validated_queue")}
    assert QUEUE_CHECKS <= checks
    assert RESOURCES <= set(definitions.resources or {})
    # Lineage: each stage reads the one before it.
    parents = {key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys} for key in graph.get_all_asset_keys()}
    assert "validated_queue" in parents["hippocampus_memories"]
    assert {"consolidated_memories", "replay_targets"} <= parents["lora_adapter"]
    assert {"lora_adapter", "evaluation_questions"} <= parents["benchmark_scores"]
    assert "benchmark_scores" in parents["leaderboard"]


def test_every_asset_has_a_one_line_description() -> None:
    graph = defs().resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        description = graph.get(key).description
        assert description and "\n" not in description.strip(), f"{key.to_user_string()} needs a one-line description"


def test_jobs_cover_the_graph_and_the_gpu_job_carries_k8s_run_tags() -> None:
    definitions = defs()
    full = definitions.resolve_job_def("full_pipeline")
    assert ASSETS <= {key.to_user_string() for key in full.asset_layer.selected_asset_keys}
    gpu = definitions.resolve_job_def("sleep_on_gpu")
    selected = {key.to_user_string() for key in gpu.asset_layer.selected_asset_keys}
    assert selected == {"replay_targets", "lora_adapter", "benchmark_scores", "leaderboard"}
    k8s = gpu.tags["dagster-k8s/config"]
    k8s = json.loads(k8s) if isinstance(k8s, str) else k8s
    assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
