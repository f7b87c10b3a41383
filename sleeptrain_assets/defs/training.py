"""Night, second half: consolidated memories become LoRA weights, registered as a new adapter version."""

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dagster as dg
from pydantic import Field

from sleeptrain_assets.lib import markdown, settings
from sleeptrain_assets.lib.catalog import TemplateSet
from sleeptrain_assets.lib.records import Memory, Person, QAPair
from sleeptrain_assets.lib.templating import qa_pairs_for_memories
from sleeptrain_assets.lib.atomic import write_text_atomic
from sleeptrain_assets.lib.training_data import (
    ReplayTarget,
    ReplayTargets,
    TrainingExample,
    build_training_set,
    load_replay_prompts,
    memory_key,
    pair_importance,
    pick_general_prompts,
    prompts_sha256,
    replay_counts,
    split_memories,
    usable_answer,
)
from sleeptrain_resources.llm import BaseModel
from sleeptrain_resources.registry import AdapterRegistry
from sleeptrain_resources.staging import claim_staging, recover_dead_training_runs
from sleeptrain_resources.trainer import Hyperparams, LoraTrainer, read_manifest

GROUP = "training"
REPLAY_PROMPTS_FILE = "replay_prompts.yaml"
ADAPTER_IO_MANAGER = "adapter_io_manager"

# What a Kubernetes deployment needs to put this step on a GPU node (dagster-k8s reads these op tags when the
# k8s_job_executor or the celery-k8s executor launches the step's pod). Harmless elsewhere. See docs/GPU.md.
GPU_K8S_CONFIG: dict[str, Any] = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "48Gi", "nvidia.com/gpu": "1"},
        }
    },
    "pod_spec_config": {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "node_selector": {"nvidia.com/gpu.present": "true"},
    },
}
GPU_OP_TAGS: dict[str, Any] = {"dagster-k8s/config": GPU_K8S_CONFIG, "sleeptrain/accelerator": "gpu"}


class LoraConfig(dg.Config):
    """Overrides for one training run; unset fields come from the trainer resource and the run profile."""

    epochs: float | None = Field(None, gt=0, le=100, description="passes over the training set (default: profile "
                                 "train_epochs)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs (default: from epochs, "
                                  "capped by the profile's train_max_steps)")
    batch_size: int | None = Field(None, ge=1, le=1024, description="examples per step (default: profile)")
    learning_rate: float | None = Field(None, gt=0, le=1.0, description="peak learning rate (default: profile)")
    rank: int | None = Field(None, ge=1, le=256, description="LoRA rank (default: profile lora_rank)")
    alpha: int | None = Field(None, ge=1, le=1024, description="LoRA alpha (default: profile lora_alpha)")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="LoRA dropout (default: trainer's)")
    target_modules: str | None = Field(None, description="'all-linear' or comma-separated module names")
    max_seq_len: int | None = Field(None, ge=16, description="longest example in tokens (default: profile)")
    seed: int | None = Field(None, description="seed for data order, LoRA init and replay (default: profile)")
    early_stop_patience: int | None = Field(None, ge=0, description="held-in checks without gain before stop; 0 off")
    replay_share: float | None = Field(None, ge=0.0, lt=1.0, description="share of replay examples (default: profile "
                                       "replay_share; a cycle continuing from a champion: cycle_continued_replay_share)")
    replay_every_older_fact: bool | None = Field(
        None, description="replay at least one pair of every fact already in the weights, up to as many as the new "
        "pairs, beyond replay_share (default: profile replay_every_older_fact)"
    )
    confirmations: bool | None = Field(None, description="also train correction forms asked with the true value and "
                                       "answered 'Yes' (default: profile train_confirmations)")
    forms_per_template: int | None = Field(None, ge=0, description="trained question forms used per template, in "
                                           "the order listed; 0: all (default: profile trained_forms_per_template)")
    locality_kl: bool | None = Field(
        None, description="train general replay against the base model's next-token distribution (KL term); default: "
        "profile locality_kl"
    )
    locality_kl_weight: float | None = Field(None, ge=0.0, le=100.0, description="weight of the KL locality term "
                                             "(default: profile)")
    locality_sft: bool | None = Field(
        None, description="also train general replay with cross-entropy on the base model's greedy answers "
        "(default: profile)"
    )
    continue_from_current: bool = Field(
        True, description="start from the current adapter and replay its memories instead of training from scratch"
    )


def compatible_with(manifest: dict[str, Any], base_sha: str, hp: Hyperparams) -> bool:
    """Whether training may continue from the adapter of `manifest`: same base weights, rank, alpha, modules."""
    trained = manifest.get("hyperparameters", {})
    return (
        manifest.get("base_model", {}).get("sha256") == base_sha
        and all(trained.get(k) == getattr(hp, k) for k in ("rank", "alpha", "target_modules"))
    )


def _sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    step = max(1, len(values) // width)
    sampled = values[::step]
    lo, hi = min(sampled), max(sampled)
    bars = "▁▂▃▄▅▆▇█"
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in sampled)


def hyperparams(trainer: LoraTrainer, config: LoraConfig, max_steps: int | None = None) -> Hyperparams:
    """Trainer hyperparameters for one run: the run's config over the profile over the trainer's defaults."""
    profile = settings.profile()
    kl_on = profile.locality_kl if config.locality_kl is None else config.locality_kl
    kl_weight = profile.locality_kl_weight if config.locality_kl_weight is None else config.locality_kl_weight
    return trainer.hyperparams(
        locality_kl_weight=kl_weight if kl_on else 0.0,
        locality_sft=profile.locality_sft if config.locality_sft is None else config.locality_sft,
        max_steps=max_steps,
        batch_size=config.batch_size or profile.train_batch_size,
        learning_rate=config.learning_rate or profile.learning_rate,
        rank=config.rank or profile.lora_rank,
        alpha=config.alpha or profile.lora_alpha,
        max_seq_len=config.max_seq_len or profile.max_seq_len,
        seed=profile.seed if config.seed is None else config.seed,
        dropout=config.dropout,
        target_modules=config.target_modules,
        early_stop_patience=config.early_stop_patience,
    )


class ReplayTargetsConfig(dg.Config):
    """Overrides for the replay targets; unset fields come from the run profile."""

    max_new_tokens: int | None = Field(None, ge=8, le=512, description="token limit for the base model's answers "
                                       "(default: profile replay_max_new_tokens)")
    top_k: int | None = Field(None, ge=1, le=256, description="teacher log-probs kept per position (default: "
                              "profile replay_top_k)")
    max_prompts: int | None = Field(None, ge=1, description="answer only this many replay prompts, in a seeded "
                                    "order (default: profile replay_max_prompts; none: all)")


REPLAY_TARGETS_FORMAT = 1


@dg.asset(group_name=GROUP, pool="gpu", op_tags=GPU_OP_TAGS)
def replay_targets(
    context: dg.AssetExecutionContext, config: ReplayTargetsConfig, base_model: BaseModel
) -> dg.Output[ReplayTargets]:
    """The base model's own answers and top-k next-token log-probs on the replay prompts, cached per model hash."""
    profile = settings.profile()
    max_new_tokens = config.max_new_tokens or profile.replay_max_new_tokens
    top_k = config.top_k or profile.replay_top_k
    limit = config.max_prompts or profile.replay_max_prompts
    prompts = load_replay_prompts(settings.benchmark_path(REPLAY_PROMPTS_FILE))
    if limit:
        prompts = pick_general_prompts(prompts, limit, profile.seed)
    device, dtype, _ = base_model.runtime()
    base_sha = base_model.source_hash()
    key = hashlib.sha256(json.dumps(
        [REPLAY_TARGETS_FORMAT, base_sha, device, dtype, prompts_sha256(prompts), top_k, max_new_tokens]
    ).encode()).hexdigest()
    cache_file = settings.state_subdir("cache", "replay_targets") / f"{key[:32]}.json"
    try:
        targets = ReplayTargets.from_dict(json.loads(cache_file.read_text(encoding="utf-8")))
        cached = True
    except (OSError, ValueError, KeyError, TypeError):
        cached = False
        answers = base_model.generate([[{"role": "user", "content": p}] for p in prompts], max_new_tokens=max_new_tokens)
        cleaned = [(p, usable_answer(a)) for p, a in zip(prompts, answers)]
        usable = [(p, a) for p, a in cleaned if a]
        teachers = base_model.answer_top_logprobs([([{"role": "user", "content": p}], a) for p, a in usable], top_k)
        targets = ReplayTargets(
            targets=tuple(ReplayTarget(p, a, tuple((tuple(i), tuple(v)) for i, v in t))
                          for (p, a), t in zip(usable, teachers)),
            base_sha256=base_sha, top_k=top_k, max_new_tokens=max_new_tokens, prompts_sha256=prompts_sha256(prompts),
            unusable=tuple(p for p, a in cleaned if not a),
        )
        write_text_atomic(cache_file, json.dumps(targets.to_dict(), ensure_ascii=False))
    positions = [len(t.teacher) for t in targets.targets]
    top1 = [math.exp(v[0]) for t in targets.targets for _, v in t.teacher]
    context.log.info(f"{len(targets.targets)} replay targets ({len(targets.unusable)} prompts without a complete "
                     f"answer); {'from the cache' if cached else 'computed'}")
    return dg.Output(
        targets,
        metadata={
            "prompts": len(prompts),
            "targets": len(targets.targets),
            "unusable_prompts": dg.MetadataValue.json(list(targets.unusable)),
            "supervised_positions": sum(positions),
            "mean_answer_tokens": round(sum(positions) / max(1, len(positions)), 1),
            "mean_top1_probability": round(sum(top1) / max(1, len(top1)), 4),
            "top_k": top_k,
            "max_new_tokens": max_new_tokens,
            "base_model_sha256": base_sha,
            "from_cache": cached,
            "cache_file": dg.MetadataValue.path(str(cache_file)),
            "preview": dg.MetadataValue.md(markdown.table(
                ["prompt", "base answer"], [(t.prompt, t.answer) for t in targets.targets[:8]])),
        },
        data_version=dg.DataVersion(key),
    )


# The adapter_io_manager stores the version reference and shows the adapter folder as `path` in the UI.
@dg.asset(group_name=GROUP, pool="gpu", op_tags=GPU_OP_TAGS, io_manager_key=ADAPTER_IO_MANAGER)
def lora_adapter(
    context: dg.AssetExecutionContext,
    config: LoraConfig,
    consolidated_memories: list[Memory],
    people_profiles: dict[str, Person],
    conversation_templates: TemplateSet,
    replay_targets: ReplayTargets,
    base_model: BaseModel,
    trainer: LoraTrainer,
    registry: AdapterRegistry,
) -> dg.Output[dict[str, Any]]:
    """A LoRA adapter trained on new memories plus replay, registered as a version (first one becomes current)."""
    hp = hyperparams(trainer, config)  # steps are known once the training set is
    current = registry.current()
    manifest = registry.manifest(current) if current else {}
    resume = bool(current) and config.continue_from_current and compatible_with(manifest, base_model.source_hash(), hp)
    trained_keys = manifest.get("memories", []) if resume else []
    new, older = split_memories(consolidated_memories, trained_keys)
    if not new:
        if current is None:
            raise ValueError("lora_adapter: no active memories to train on and no adapter in the registry")
        context.log.info(f"no new memories since {current}; keeping it")
        path = registry.path(current)
        return dg.Output(
            {"version": current, "path": str(path), "adapter_sha256": manifest.get("adapter_sha256", ""),
             "base_model": base_model.model_id, "trained": False, "current": current},
            metadata={"version": current, "trained": False, "reason": "no new memories",
                      "path": dg.MetadataValue.path(str(path))},
            data_version=dg.DataVersion(manifest.get("adapter_sha256") or current),
        )

    trained = train_adapter(
        context, config, new=new, older=older, trained_keys=trained_keys, people=people_profiles,
        templates=conversation_templates, replay=replay_targets, base_model=base_model, trainer=trainer,
        registry=registry, init_version=current if resume else None, promote_if_empty=True,
    )
    version, result = trained.version, trained.result
    now_current = registry.current()
    return dg.Output(
        {
            "version": version,
            "path": str(registry.path(version)),
            "adapter_sha256": result.adapter_sha256,
            "base_model": base_model.model_id,
            "trained": True,
            "current": now_current,
            "data_sha256": trained.training_set.data_hash,
        },
        metadata={"version": version, "current": str(now_current), **trained.metadata},
        data_version=dg.DataVersion(result.adapter_sha256),
    )


@dataclass(frozen=True)
class TrainedAdapter:
    version: str
    result: Any
    training_set: Any
    metadata: dict[str, Any]


def train_adapter(
    context: dg.AssetExecutionContext,
    config: LoraConfig,
    *,
    new: list[Memory],
    older: list[Memory],
    trained_keys: list[str],
    people: dict[str, Person],
    templates: TemplateSet,
    replay: ReplayTargets,
    base_model: BaseModel,
    trainer: LoraTrainer,
    registry: AdapterRegistry,
    init_version: str | None,
    promote_if_empty: bool,
    extra_manifest: dict[str, Any] | None = None,
    default_epochs: float | None = None,
    default_replay_share: float | None = None,
    extra_examples: Callable[[list[QAPair]], list[TrainingExample]] | None = None,
) -> TrainedAdapter:
    """Train on QA pairs of `new` memories plus bounded replay (older memories, `replay` targets on general
    prompts), continuing from `init_version` when given, and register the result as a version; passes over the
    training set: `config.epochs`, else `default_epochs`, else the profile's `train_epochs` (the replay share
    likewise: `config`, `default_replay_share`, the profile). `extra_examples` turns the new pairs into further
    examples added as they are (a cycle's self-taught answers)."""
    profile = settings.profile()
    current, resume = init_version, init_version is not None
    hp = hyperparams(trainer, config)
    replay_share = config.replay_share if config.replay_share is not None else (
        default_replay_share if default_replay_share is not None else profile.replay_share)
    forms = profile.trained_forms_per_template if config.forms_per_template is None else (
        config.forms_per_template or None)
    confirm = profile.train_confirmations if config.confirmations is None else config.confirmations
    new_pairs = qa_pairs_for_memories(new, people, templates, forms, confirm)
    if not new_pairs:
        raise ValueError(
            f"{len(new)} new memories but no template covers their slots; nothing to train on"
        )
    older_pairs = pair_importance(qa_pairs_for_memories(older, people, templates, forms, confirm), older)
    if replay.base_sha256 != base_model.source_hash():
        raise ValueError(
            f"replay_targets were computed on base weights {replay.base_sha256[:12]}, but this run trains "
            f"{base_model.source_hash()[:12]}: materialize replay_targets again"
        )
    _, n_general = replay_counts(len(new_pairs), replay_share, len(older_pairs), len(replay.targets))
    general = [(t.prompt, t.answer, t.teacher) for t in replay.pick(n_general, hp.seed)]
    every_older = (profile.replay_every_older_fact if config.replay_every_older_fact is None
                   else config.replay_every_older_fact)
    training_set = build_training_set(new_pairs, older_pairs, general, replay_share=replay_share, seed=hp.seed,
                                      self_taught=extra_examples(new_pairs) if extra_examples else (),
                                      replay_every_older_fact=every_older)
    epochs = config.epochs or default_epochs or profile.train_epochs
    hp = hyperparams(trainer, config, config.max_steps or settings.training_steps(
        len(training_set), hp.batch_size, epochs, profile.train_max_steps))
    stats = training_set.stats()
    context.log.info(f"training set {stats}; {hp.max_steps} steps of {hp.batch_size} "
                     f"({hp.max_steps * hp.batch_size / len(training_set):.2f} epochs); "
                     f"continuing from {current if resume else 'the base model'}")

    staging = settings.state_subdir("staging")
    recover_dead_training_runs(context.instance, staging, context.run_id, context.log.warning)
    run_dir = claim_staging(staging, context.run_id)
    try:
        result = trainer.train_for_asset(
            context,
            training_set,
            base_model,
            run_dir / "adapter",
            init_adapter=registry.path(current) if resume and current else None,
            extra_manifest={
                "memories": sorted({*trained_keys, *(memory_key(m) for m in new)}),
                "previous_version": current if resume else None,
                "profile": profile.name,
                **(extra_manifest or {}),
            },
            overrides={k: getattr(hp, k) for k in hp.__dataclass_fields__},
        )
        version = registry.register(result.adapter_dir, promote_if_empty=promote_if_empty)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return TrainedAdapter(version, result, training_set, {
        "path": dg.MetadataValue.path(str(registry.path(version))),
        "loss_curve": dg.MetadataValue.json(result.loss_curve),
        "loss_sparkline": _sparkline(result.loss_curve),
        "held_in_loss": dg.MetadataValue.json([list(p) for p in result.probe_curve]),
        "initial_loss": result.initial_loss,
        "final_loss": result.final_loss,
        "steps": result.steps,
        "stopped": result.stopped,
        "weights_from_step": result.weights_from_step,
        "tokens": result.tokens,
        "answer_tokens": result.answer_tokens,
        "tokens_per_s": result.tokens_per_s,
        "seconds": result.seconds,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "training_set": dg.MetadataValue.json(stats),
        "data_sha256": training_set.data_hash,
        "new_memories": len(new),
        "replayed_memories": len(older),
        "hyperparameters": dg.MetadataValue.json(result.hyperparameters),
        "epochs": round(result.steps * hp.batch_size / len(training_set), 3),
        "continued_from": str(current) if resume else "base model",
        "trained_on": dg.MetadataValue.json(result.trained_on),
    })
