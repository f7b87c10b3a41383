"""Sleep cycles: inbox conversations -> memories -> challenger adapter -> gated promotion -> champion, per cycle.

Each cycle is a dynamic partition (`cycle-000001`, ...) opened by the inbox sensor (or the 03:00 schedule, or
`sleeptrain cycle`). The challenger starts from the champion (or a pinned baseline), trains on the cycle's new
memories plus bounded replay, and is scored with the champion on the same items; a blocking check stops a
challenger that fails a gate before anything touches the registry's `current` pointer.
"""


import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from sleeptrain_assets.defs.evaluation import LEADERBOARD_HTML, LEADERBOARD_JSON
from sleeptrain_assets.defs.memory import HEDGE_STATE, HippocampusConfig, apply_hippocampus
from sleeptrain_assets.defs.training import GPU_OP_TAGS, LoraConfig, compatible_with, hyperparams, train_adapter
from sleeptrain_assets.lib import cycle_report, eval_suite, inbox, leaderboard_report, self_training, settings
from sleeptrain_assets.lib.atomic import write_json_atomic
from sleeptrain_assets.lib.catalog import load_templates, validate_catalog
from sleeptrain_assets.lib.hard_cases import with_hard_cases
from sleeptrain_assets.lib.hedge import HedgePolicy
from sleeptrain_assets.lib.hippocampus import candidates_from_conversations
from sleeptrain_assets.lib.hippocampus import summarize as summarize_decisions
from sleeptrain_assets.lib.markdown import table
from sleeptrain_assets.lib.learned_people import load_all_people, trusted_profiles, write_learned_person
from sleeptrain_assets.lib.promotion import PromotionPolicy
from sleeptrain_assets.lib.records import Memory, Person, QAPair
from sleeptrain_assets.lib.templating import competing_values, evaluation_items, qa_pairs_for_memories, slot_values
from sleeptrain_assets.lib.training_data import ReplayTargets, TrainingExample, memory_key, split_memories
from sleeptrain_resources.embedding import Embedder
from sleeptrain_resources.llm import BaseModel
from sleeptrain_resources.memory_store import MemoryStore
from sleeptrain_resources.registry import AdapterRegistry
from sleeptrain_resources.trainer import LoraTrainer

GROUP = "cycles"
JOB_NAME = "sleep_cycle"
MIN_CONVERSATIONS_ENV = "SLEEPTRAIN_CYCLE_MIN_CONVERSATIONS"

cycles_partitions = dg.DynamicPartitionsDefinition(name="cycles")


class CycleConfig(dg.Config):
    """What one cycle takes from the inbox and how it may end."""

    files: list[str] = Field(default_factory=list, description="inbox file names; empty: every file not yet taken")
    sha256: list[str] = Field(default_factory=list, description="expected sha256 per file (as the sensor saw it)")
    dry_run: bool = Field(False, description="train and evaluate, promote nothing, still write the report")
    baseline_version: str | None = Field(None, description="start from and compare with this registry version "
                                         "instead of the champion")
    hard_cases: bool | None = Field(None, description="train denials of wrong values mined for people who list "
                                    "none (their corrected statements, other people's values); the evaluation "
                                    "asks the held-out ones either way (default: profile cycle_hard_cases)")
    self_training: bool | None = Field(None, description="SEAL-style: the model in service answers the new facts' "
                                       "questions several times with the fact in context; answers the scorer "
                                       "passes become extra, reward-weighted training examples (default: profile "
                                       "cycle_self_training)")


class CycleEvaluationConfig(dg.Config):
    max_earlier_items: int | None = Field(None, ge=0, description="items re-asking earlier facts (default: 4 x the "
                                          "profile's per-kind cap, 48 without a cap)")
    max_locality_items: int | None = Field(None, ge=0, description="general-knowledge items of the validation split "
                                          "(default: the profile's per-kind cap, 96 without a cap)")
    batch_size: int = Field(32, ge=1, le=512, description="prompts per generation batch")


class PromotionConfig(dg.Config):
    min_new_fact_recall: float = Field(0.9, ge=0.0, le=1.0, description="challenger recall on the cycle's new facts")
    retention_budget: float = Field(0.05, ge=0.0, le=1.0, description="largest allowed drop on earlier facts")
    locality_budget: float = Field(0.05, ge=0.0, le=1.0, description="largest allowed drop on general questions")
    min_items: int = Field(10, ge=1, description="fewest evaluated items a decision may rest on")

    def policy(self) -> PromotionPolicy:
        return PromotionPolicy(self.min_new_fact_recall, self.retention_budget, self.locality_budget, self.min_items)


def cycle_folder(cycle: str) -> Path:
    return settings.state_subdir("cycles", cycle)


def _catalog() -> tuple[dict[str, Person], set[str], Any, list[str]]:
    people, learned = load_all_people()
    templates = load_templates(settings.data_dir() / "templates")
    notes = validate_catalog(people, templates, self_reported=learned)
    return people, learned, templates, notes


def _cycle_people(memory_store: MemoryStore, mine: bool = True) -> tuple[dict[str, Person], Any, dict[str, Any]]:
    """The catalog a cycle trains or evaluates with; with `mine`, every person holding memories but no wrong
    values gets mined ones (the same for training and evaluation, so the held-out one stays held out)."""
    people, _, templates, _ = _catalog()
    if not mine:
        return people, templates, {}
    holders = {m.person_id for m in memory_store.active_memories()}
    superseded = {}
    for pid in sorted(holders):
        for memory in sorted(memory_store.by_person(pid, status="superseded"), key=lambda m: m.updated_at, reverse=True):
            superseded.setdefault((pid, memory.slot), []).append(memory.value)
    people, mined = with_hard_cases(people, templates, holders, superseded)
    return people, templates, mined


def known_names() -> dict[str, str]:
    people, _ = load_all_people()
    return {pid: p.name for pid, p in people.items()}


def min_conversations() -> int:
    raw = os.environ.get(MIN_CONVERSATIONS_ENV, "").strip()
    try:
        return max(1, int(raw)) if raw else 1
    except ValueError as exc:
        raise ValueError(f"{MIN_CONVERSATIONS_ENV}={raw!r} must be a whole number") from exc


def run_config(plan: inbox.BatchPlan, dry_run: bool = False, baseline_version: str | None = None,
               hard_cases: bool | None = None, self_training: bool | None = None) -> dict[str, Any]:
    config = {"files": [f.name for f in plan.files], "sha256": [f.sha256 for f in plan.files], "dry_run": dry_run}
    if baseline_version:
        config["baseline_version"] = baseline_version
    if hard_cases is not None:
        config["hard_cases"] = hard_cases
    if self_training is not None:
        config["self_training"] = self_training
    return {"ops": {"cycle_inbox_batch": {"config": config}}}


def set_aside(plan: inbox.BatchPlan) -> None:
    """Record every rejected file of a plan (idempotent: a retried tick rewrites the same record)."""
    for read in plan.rejected:
        inbox.write_rejection(read)
    if plan.rejected:
        inbox.record_files("", {r.name: r.sha256 for r in plan.rejected}, "rejected")


# --------------------------------------------------------------------------- assets


@dg.asset(group_name=GROUP, partitions_def=cycles_partitions)
def cycle_inbox_batch(context: dg.AssetExecutionContext, config: CycleConfig) -> dg.Output[dict[str, Any]]:
    """The inbox conversations this cycle consolidates (files whole or not at all; bad ones set aside)."""
    cycle = context.partition_key
    folder = inbox.inbox_dir()
    known = known_names()
    if config.files:
        if config.sha256 and len(config.sha256) != len(config.files):
            raise ValueError(f"{cycle}: config gives {len(config.sha256)} sha256 values for {len(config.files)} files")
        reads = [inbox.read_inbox_file(folder / name, known) for name in config.files]
        for read, expected in zip(reads, config.sha256):
            if read.ok and read.sha256 != expected:
                raise ValueError(f"{folder / read.name}: changed since the cycle was opened (sha256 {read.sha256[:12]} "
                                 f"!= {expected[:12]}); a later cycle will take the new content")
        plan = inbox.BatchPlan(tuple(r for r in reads if r.ok), tuple(r for r in reads if not r.ok), 1)
    else:
        plan = inbox.plan_batch(folder, inbox.ledger_seen(inbox.load_ledger()), known, 1)
    set_aside(plan)
    for read in plan.rejected:
        context.log.warning(f"set aside: {read.error}")
    if not plan.files:
        raise ValueError(f"{cycle}: no readable new conversation file in {folder} "
                         f"({', '.join(str(r.error) for r in plan.rejected) or 'the inbox holds nothing new'})")
    inbox.record_files(cycle, {f.name: f.sha256 for f in plan.files}, "processed")
    conversations = [c for f in plan.files for c in f.conversations]
    names = {pid: name for f in plan.files for pid, name in f.names.items()}
    batch = {
        "cycle": cycle, "time": inbox.now(), "dry_run": config.dry_run, "baseline_version": config.baseline_version,
        "hard_cases": settings.profile().cycle_hard_cases if config.hard_cases is None else config.hard_cases,
        "self_training": (settings.profile().cycle_self_training if config.self_training is None
                          else config.self_training),
        "files": [{"name": f.name, "sha256": f.sha256, "conversations": len(f.conversations)} for f in plan.files],
        "rejected_files": [{**r.error.to_dict(), "sha256": r.sha256} for r in plan.rejected if r.error],
        "conversations": conversations, "names": names,
    }
    cycle_report.write_report(cycle_folder(cycle), {**{k: v for k, v in batch.items() if k != "conversations"},
                                                    "conversation_ids": [c.id for c in conversations],
                                                    "status": "running"})
    return dg.Output(batch, metadata={
        "files": dg.MetadataValue.json(batch["files"]), "conversations": len(conversations),
        "people": dg.MetadataValue.json(dict(Counter(c.person_id for c in conversations))),
        "set_aside": dg.MetadataValue.json(batch["rejected_files"]), "dry_run": config.dry_run,
    })


def _baseline(registry: AdapterRegistry, batch: dict[str, Any]) -> str | None:
    pinned = batch.get("baseline_version")
    if pinned:
        registry.path(pinned)  # a pinned version must exist
        return pinned
    return registry.current()


@dg.asset(group_name=GROUP, partitions_def=cycles_partitions)
def cycle_memories(
    context: dg.AssetExecutionContext,
    config: HippocampusConfig,
    cycle_inbox_batch: dict[str, Any],
    memory_store: MemoryStore,
    embedder: Embedder,
    base_model: BaseModel,
    registry: AdapterRegistry,
) -> dg.Output[dict[str, Any]]:
    """The hippocampus on the cycle's conversations (STORE/REJECT/CORRECT/MERGE with reasons); new people kept."""
    batch = cycle_inbox_batch
    people, learned, _, _ = _catalog()
    newcomers = {pid: Person(pid, name, {}, kind="fictional", source="inbox")
                 for pid, name in batch["names"].items() if pid not in people}
    self_reported = learned | set(newcomers)
    profiles = trusted_profiles({**people, **newcomers}, self_reported)
    conversations = batch["conversations"]
    candidates = candidates_from_conversations(conversations, profiles)
    baseline = _baseline(registry, batch)
    decisions, report, routing, scored_on = apply_hippocampus(
        context, config, candidates, conversations, profiles, memory_store, embedder, base_model,
        registry.path(baseline) if baseline else None)
    # New: what this batch says that the baseline's weights do not hold yet. MERGEs count too, so a cycle re-run
    # after a crash (its memories already stored) still trains and evaluates them.
    trained = set(registry.manifest(baseline).get("memories", [])) if baseline else set()
    kept_ids = {d.memory_id for d in decisions if d.action != "REJECT" and d.memory_id}
    new_memories = [m for mid in sorted(kept_ids) if (m := memory_store.get(mid)) is not None
                    and m.status == "active" and memory_key(m) not in trained]
    persisted = {}
    for pid in sorted({c.person_id for c in conversations} & self_reported):
        name = profiles[pid].name
        path = write_learned_person(pid, name, memory_store.by_person(pid))
        if path is not None:
            persisted[pid] = str(path)
    counts = summarize_decisions(decisions)
    rows = [[d.action, d.candidate.person_id, d.candidate.slot, d.candidate.value, d.reason] for d in decisions]
    summary = {"counts": counts, "new_people": sorted(newcomers), "persisted_people": persisted, "table": rows,
               "scored_on": scored_on, "routing": routing}
    cycle_report.update_report(cycle_folder(batch["cycle"]), hippocampus=summary)
    context.log.info(f"decisions {counts}; {len(new_memories)} new memories; people kept {sorted(persisted)}")
    return dg.Output(
        {"decisions": decisions, "new_memories": new_memories, "summary": summary},
        metadata={"decisions": dg.MetadataValue.json(counts), "new_memories": len(new_memories),
                  "new_people": dg.MetadataValue.json(sorted(newcomers)),
                  "store_operations": dg.MetadataValue.json(report.operations), "scored_on": scored_on},
    )


@dg.asset(group_name=GROUP, partitions_def=cycles_partitions, pool="gpu", op_tags=GPU_OP_TAGS)
def challenger_adapter(
    context: dg.AssetExecutionContext,
    config: LoraConfig,
    cycle_inbox_batch: dict[str, Any],
    cycle_memories: dict[str, Any],
    memory_store: MemoryStore,
    replay_targets: ReplayTargets,
    base_model: BaseModel,
    embedder: Embedder,
    trainer: LoraTrainer,
    registry: AdapterRegistry,
) -> dg.Output[dict[str, Any]]:
    """An adapter trained from the champion on the cycle's new memories plus bounded replay; saved, not promoted."""
    batch = cycle_inbox_batch
    baseline = _baseline(registry, batch)
    # Hard cases off: no mined denial is trained, but the evaluation still asks the held-out ones.
    people, templates, mined = _cycle_people(memory_store, mine=batch.get("hard_cases", False))
    if mined:
        context.log.info(f"hard cases: training denials of wrong values mined for {sorted(mined)}")
    manifest = registry.manifest(baseline) if baseline else {}
    resume = bool(baseline) and compatible_with(manifest, base_model.source_hash(), hyperparams(trainer, config))
    trained_keys = manifest.get("memories", []) if resume else []
    cycle_new = cycle_memories["new_memories"]
    new, older = split_memories(memory_store.active_memories(), trained_keys)
    out: dict[str, Any] = {"version": None, "trained": False, "baseline": baseline, "path": None}
    if not cycle_new:
        out["reason"] = "the hippocampus kept no new memory in this cycle"
    elif not qa_pairs_for_memories(new, people, templates):
        out["reason"] = "the new memories fill no template, so there is nothing to train on"
    if "reason" in out:
        context.log.info(f"no challenger: {out['reason']}")
        cycle_report.update_report(cycle_folder(batch["cycle"]), training={"reason": out["reason"]})
        return dg.Output(out, metadata={"trained": False, "reason": out["reason"]})
    self_taught: dict[str, Any] = {}
    extra_examples = None
    if batch.get("self_training"):
        def extra_examples(pairs: list[QAPair]) -> list[TrainingExample]:
            examples, self_taught["stats"] = sample_self_taught(
                pairs, new, people, templates, base_model, embedder,
                adapter=registry.path(baseline) if resume and baseline else None, seed=hyperparams(trainer, config).seed)
            context.log.info(f"self-training: {self_taught['stats']}")
            return examples
    trained = train_adapter(
        context, config, new=new, older=older, trained_keys=trained_keys, people=people, templates=templates,
        replay=replay_targets, base_model=base_model, trainer=trainer, registry=registry, init_version=baseline if resume else None,
        promote_if_empty=False, extra_manifest={"cycle": batch["cycle"]},
        default_epochs=settings.profile().cycle_train_epochs, extra_examples=extra_examples,
        default_replay_share=settings.profile().cycle_continued_replay_share if resume else None,
    )
    out.update(version=trained.version, trained=True, path=str(registry.path(trained.version)),
               adapter_sha256=trained.result.adapter_sha256, continued_from=baseline if resume else None)
    meta = trained.metadata
    cycle_report.update_report(cycle_folder(batch["cycle"]), training={
        "version": trained.version, "continued_from": baseline if resume else "base model",
        "steps": meta["steps"], "initial_loss": round(meta["initial_loss"], 4),
        "final_loss": round(meta["final_loss"], 4), "seconds": meta["seconds"],
        "training_set": meta["training_set"].value, "new_memories": len(new), "replayed_memories": len(older),
        **({"self_training": self_taught["stats"]} if "stats" in self_taught else {})})
    if "stats" in self_taught:
        meta["self_training"] = dg.MetadataValue.json(self_taught["stats"])
    return dg.Output(out, metadata={"version": trained.version, **meta},
                     data_version=dg.DataVersion(trained.result.adapter_sha256))


SELF_TRAINING_SAMPLES = 4  # answers sampled per new-fact question
SELF_TRAINING_KEEP = 2  # best distinct passing answers kept per question


def sample_self_taught(
    pairs: list[QAPair], memories: list[Memory], people: dict[str, Person], templates: Any, base_model: BaseModel,
    embedder: Embedder, adapter: Path | None, seed: int,
) -> tuple[list[TrainingExample], dict[str, Any]]:
    """SEAL-style: the model in service (`adapter`, or the base model) answers each new-fact question of `pairs`
    SELF_TRAINING_SAMPLES times with its memory in context; lib/self_training scores, keeps and weights them."""
    by_person = slot_values(people, templates)
    competing = {(m.person_id, m.slot): competing_values(people[m.person_id], m.slot, m.value, templates, by_person)
                 for m in memories if m.person_id in people}
    prompts = self_training.prompts_for(pairs, memories, {p.id: p.name for p in people.values()}, competing)
    samples = base_model.sample([list(p.messages) for p in prompts], SELF_TRAINING_SAMPLES, adapter=adapter,
                                max_new_tokens=settings.profile().max_new_tokens, seed=seed)
    texts = sorted({a for answers in samples for a in answers} | {p.item.expected for p in prompts})
    vectors = dict(zip(texts, embedder.embed(texts), strict=True))
    examples: list[TrainingExample] = []
    passing = 0
    for prompt, answers in zip(prompts, samples, strict=True):
        rewards = [self_training.reward(prompt, a, float(vectors[a] @ vectors[prompt.item.expected])) for a in answers]
        passing += sum(r > 0 for r in rewards)
        examples += self_training.self_taught_examples(prompt, answers, rewards, SELF_TRAINING_KEEP)
    total = sum(len(a) for a in samples)
    return examples, {
        "questions": len(prompts), "samples": total, "passing_samples": passing,
        "passing_share": round(passing / total, 4) if total else None, "examples": len(examples),
        "weight": round(sum(e.weight for e in examples), 4), "model": str(adapter.name) if adapter else "base model",
    }


def _earlier_facts(registry: AdapterRegistry, baseline: str | None, memory_store: MemoryStore) -> list[tuple[str, str]]:
    """Facts of earlier cycles first (in cycle order), then every other fact in the baseline's weights."""
    history = cycle_report.read_json(cycle_folder_root() / cycle_report.RETENTION_FILE, {"cycles": []})
    facts: list[tuple[str, str]] = []
    for entry in history.get("cycles", []):
        for key in entry.get("facts", {}):
            pid, _, slot = key.partition("/")
            facts.append((pid, slot))
    trained = set(registry.manifest(baseline).get("memories", [])) if baseline else set()
    facts += sorted((m.person_id, m.slot) for m in memory_store.active_memories() if memory_key(m) in trained)
    return list(dict.fromkeys(facts))


def cycle_folder_root() -> Path:
    return settings.state_subdir("cycles")


@dg.asset(group_name=GROUP, partitions_def=cycles_partitions, pool="gpu")
def cycle_evaluation(
    context: dg.AssetExecutionContext,
    config: CycleEvaluationConfig,
    cycle_inbox_batch: dict[str, Any],
    cycle_memories: dict[str, Any],
    challenger_adapter: dict[str, Any],
    memory_store: MemoryStore,
    base_model: BaseModel,
    embedder: Embedder,
    registry: AdapterRegistry,
) -> dg.Output[dict[str, Any]]:
    """Champion and challenger on the same items: the cycle's new facts, earlier facts, general questions."""
    batch = cycle_inbox_batch
    profile = settings.profile()
    people, templates, mined = _cycle_people(memory_store)
    cycle_report.update_report(cycle_folder(batch["cycle"]), hard_case_values=mined)
    baseline = challenger_adapter["baseline"]
    cap = profile.eval_max_items_per_kind
    items = cycle_report.select_items(
        evaluation_items(people, templates),
        # General questions of the validation split: gates are chosen on validation items, never on test ones.
        [i for i in eval_suite.load_locality_items(settings.benchmark_path(eval_suite.GENERAL_KNOWLEDGE_FILE))
         if i.kind == "locality" and i.split == "validation"],
        {(m.person_id, m.slot) for m in cycle_memories["new_memories"]},
        _earlier_facts(registry, baseline, memory_store),
        max_earlier=config.max_earlier_items if config.max_earlier_items is not None else 4 * (cap or 12),
        max_locality=config.max_locality_items if config.max_locality_items is not None else (cap or 96),
        seed=batch["cycle"],
    )
    context.log.info(f"items {items.counts()} ({items.note})")
    plan = eval_suite.SuitePlan(single=tuple(items.all()), groups=())
    systems: dict[str, Path | None] = {"base": None, "champion": registry.path(baseline) if baseline else None}
    if challenger_adapter["trained"]:
        systems["challenger"] = Path(challenger_adapter["path"])
    answers, scores = answer_and_score(plan, systems, base_model, embedder, profile.max_new_tokens, config.batch_size)
    result: dict[str, Any] = {"split": items.split, "note": items.note, "counts": items.counts(),
                              "champion_version": baseline, "challenger_version": challenger_adapter["version"]}
    for system in systems:
        result[system] = cycle_report.metrics(items, scores[system])
        result[f"{system}_facts"] = cycle_report.fact_rates(items, scores[system])
    # Per item: each system's answer and verdict (None where the item is not counted, e.g. the base model got
    # a general question wrong), so the audit shows which answers a gate's rate rests on.
    verdicts = {s: {v.item_id: v.passed if v.counted else None for v in scores[s]} for s in systems}
    result["answers"] = [
        {"id": i.id, "role": next(r for r, group in items.by_role.items() if i in group), "question": i.question,
         "expected": i.expected, **{s: answers[s][i.id] for s in systems},
         "passed": {s: verdicts[s].get(i.id) for s in systems}} for i in plan.single]
    report_view = {k: v for k, v in result.items() if k not in ("answers",) and not k.endswith("_facts")}
    report_view.setdefault("challenger", {})
    cycle_report.update_report(cycle_folder(batch["cycle"]), evaluation=report_view)
    write_json_atomic(cycle_folder(batch["cycle"]) / "answers.json", result["answers"])
    rows = [[name, *(result.get(s, {}).get(name) for s in ("champion", "challenger"))]
            for _, name in cycle_report.ROLE_METRICS]
    return dg.Output(result, metadata={
        "items": dg.MetadataValue.json(items.counts()), "split": items.split,
        "scores": dg.MetadataValue.md(table(["metric", "champion", "challenger"], rows)),
    })


def answer_and_score(
    plan: eval_suite.SuitePlan,
    systems: dict[str, Path | None],
    base_model: BaseModel,
    embedder: Embedder,
    max_new_tokens: int,
    batch_size: int = 32,
) -> tuple[dict[str, dict[str, str]], dict[str, list[Any]]]:
    """Every system (name -> adapter folder, None for the base model, which must be one of them as "base")
    answers the plan; every answer scored with the base model as the locality reference."""
    answers = {}
    for system, adapter in systems.items():
        def generate(conversations: list[list[dict[str, str]]], adapter: Path | None = adapter) -> list[str]:
            return base_model.generate(conversations, adapter=adapter, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size)
        answers[system] = eval_suite.answer_plan(generate=generate, plan=plan)
    texts = eval_suite.texts_to_embed(plan=plan, answers=answers)
    vectors = dict(zip(texts, embedder.embed(texts), strict=True))
    return answers, eval_suite.score_plan(plan=plan, answers=answers, vectors=vectors, reference="base")


def _hedge_reward(batch: dict[str, Any], memories: dict[str, Any], decision: dict[str, Any]) -> dict[str, Any] | None:
    """Reward what the routing kept: recall on new facts when promoted, minus the failed-gate share otherwise."""
    actions = [a for a in ("STORE", "CORRECT") if memories["summary"]["counts"].get(a)]
    if batch["dry_run"] or decision.get("challenger") is None or not actions:
        return None
    gates = decision.get("gates", [])
    recall = decision["metrics"]["challenger"].get("new_fact_recall") or 0.0
    reward = round(recall if decision["accepted"] else -sum(not g["passed"] for g in gates) / max(1, len(gates)), 4)
    path = settings.state_subdir("hedge") / HEDGE_STATE
    policy = HedgePolicy.load_or_create(path)
    before = policy.probabilities()
    for action in actions:
        policy.update(action, reward)
    policy.save(path)
    return {"reward": reward, "actions": actions, "before": {k: round(v, 4) for k, v in before.items()},
            "after": {k: round(v, 4) for k, v in policy.probabilities().items()}}


GATE_CHECK = "challenger_passes_promotion_gates"


# The gate is a check spec of the asset itself, so it judges this partition's decision (a separate
# @asset_check on a partitioned asset would load the decisions of every cycle).
@dg.asset(group_name=GROUP, partitions_def=cycles_partitions, check_specs=[dg.AssetCheckSpec(
    GATE_CHECK, asset="promotion_decision", blocking=True,
    description="Every promotion gate passed (or there is no challenger); a failure stops the cycle before the "
                "registry.")])
def promotion_decision(
    context: dg.AssetExecutionContext,
    config: PromotionConfig,
    cycle_inbox_batch: dict[str, Any],
    cycle_memories: dict[str, Any],
    challenger_adapter: dict[str, Any],
    cycle_evaluation: dict[str, Any],
):
    """Whether the challenger replaces the champion: every gate with its verdict, the reasons and the metrics."""
    batch = cycle_inbox_batch
    if not challenger_adapter["trained"]:
        decision = {"accepted": False, "challenger": None, "reasons": [f"no challenger: {challenger_adapter['reason']}"],
                    "gates": [], "metrics": {"champion": cycle_evaluation["champion"], "challenger": {}}}
    else:
        challenger = cycle_evaluation["challenger"]
        items = sum(challenger.get(f"{m}_items", 0) for m in ("new_fact_recall", "retention", "locality"))
        decision = config.policy().decide(challenger, cycle_evaluation["champion"], items)
        decision["challenger"] = challenger_adapter["version"]
    decision["champion"] = challenger_adapter["baseline"]
    decision["dry_run"] = batch["dry_run"]
    in_service = "challenger" if decision["accepted"] and not batch["dry_run"] else "champion"
    history_path = cycle_folder_root() / cycle_report.RETENTION_FILE
    history = cycle_report.record_retention(
        cycle_report.read_json(history_path, {"cycles": []}), batch["cycle"],
        decision["challenger"] if in_service == "challenger" else decision["champion"], inbox.now(),
        cycle_evaluation[f"{in_service}_facts"])
    write_json_atomic(history_path, history)
    curve = cycle_report.retention_curve(history)
    reports = settings.state_subdir("reports")
    leaderboard_report.refresh_page(reports / LEADERBOARD_JSON, reports / LEADERBOARD_HTML, curve)
    hedge = _hedge_reward(batch, cycle_memories, decision)
    status = ("dry run" if batch["dry_run"] else "promoting") if decision["accepted"] else (
        "nothing to learn" if decision["challenger"] is None else "rejected")
    cycle_report.update_report(cycle_folder(batch["cycle"]), decision=decision, status=status, hedge=hedge,
                               retention=curve, champion_after=decision["champion"] if in_service == "champion"
                               else None)
    for reason in decision["reasons"]:
        context.log.info(f"{'accepted' if decision['accepted'] else 'rejected'}: {reason}")
    yield dg.Output(decision, metadata={
        "accepted": decision["accepted"], "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision["reasons"])),
        "metrics": dg.MetadataValue.json(decision["metrics"]), "retention": dg.MetadataValue.md(
            cycle_report.retention_markdown(curve)),
        "hedge": dg.MetadataValue.json(hedge or {}),
        "report": dg.MetadataValue.path(str(cycle_folder(batch["cycle"]) / cycle_report.REPORT_MD)),
    })
    yield gate_result(decision)


def gate_result(decision: dict[str, Any]) -> dg.AssetCheckResult:
    """The blocking check's verdict on one decision: accepted, reasons and metrics in its metadata."""
    return dg.AssetCheckResult(
        check_name=GATE_CHECK,
        passed=bool(decision["accepted"] or decision["challenger"] is None),
        description="; ".join(decision["reasons"]),
        metadata={"accepted": decision["accepted"], "reasons": dg.MetadataValue.json(decision["reasons"]),
                  "metrics": dg.MetadataValue.json(decision["metrics"]),
                  "challenger": str(decision["challenger"]), "champion": str(decision["champion"])},
    )


@dg.asset(group_name=GROUP, partitions_def=cycles_partitions)
def champion_adapter(
    context: dg.AssetExecutionContext,
    cycle_inbox_batch: dict[str, Any],
    promotion_decision: dict[str, Any],
    registry: AdapterRegistry,
) -> dg.Output[dict[str, Any]]:
    """The registry's current adapter after the cycle: the accepted challenger, moved in atomically."""
    batch, decision = cycle_inbox_batch, promotion_decision
    promoted = None
    if decision["accepted"] and not batch["dry_run"]:
        now_current = registry.current()
        if now_current != decision["champion"] and not batch.get("baseline_version"):
            # The challenger beat the champion it was compared with, not whatever is current now.
            raise RuntimeError(f"{batch['cycle']}: the champion moved from {decision['champion']} to {now_current} "
                               "during the cycle; nothing promoted, run a new cycle against the new champion")
        prior = registry.promote(decision["challenger"], cycle=batch["cycle"], metrics=decision["metrics"],
                                 decision={"accepted": True, "reasons": decision["reasons"]})
        promoted = decision["challenger"]
        context.log.info(f"promoted {promoted} (prior champion {prior})")
    current = registry.current()
    status = "promoted" if promoted else ("dry run" if batch["dry_run"] else "nothing to learn")
    report = cycle_report.update_report(cycle_folder(batch["cycle"]), status=status, promoted_version=promoted,
                                        champion_after=current, finished=inbox.now())
    sha = registry.manifest(current).get("adapter_sha256", current) if current else "none"
    return dg.Output({"current": current, "promoted": promoted, "status": status},
                     metadata={"current": str(current), "promoted": str(promoted),
                               "report": dg.MetadataValue.md(cycle_report.report_markdown(report))},
                     data_version=dg.DataVersion(str(sha)))


CYCLE_ASSETS = [cycle_inbox_batch, cycle_memories, challenger_adapter, cycle_evaluation, promotion_decision,
                champion_adapter]

sleep_cycle = dg.define_asset_job(
    name=JOB_NAME,
    # replay_targets is unpartitioned and cached by the base model's hash: in a cycle it is a cache read.
    selection=dg.AssetSelection.assets(*CYCLE_ASSETS, "replay_targets"),
    partitions_def=cycles_partitions,
    description="One sleep cycle: inbox -> memories -> challenger -> evaluation -> gated promotion.",
)


# --------------------------------------------------------------------------- automation


def open_cycle(plan: inbox.BatchPlan, last_number: int) -> tuple[str, dg.RunRequest]:
    key = inbox.cycle_key(last_number + 1)
    return key, dg.RunRequest(run_key=key, partition_key=key, run_config=run_config(plan),
                              tags={"sleeptrain/cycle": key})


@dg.sensor(job=sleep_cycle, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def inbox_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Opens a cycle when the inbox holds enough new conversations; the cursor keeps files and hashes taken."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    seen_by_cursor: dict[str, str] = cursor.get("seen", {})
    ledger = inbox.load_ledger()
    plan = inbox.plan_batch(inbox.inbox_dir(), {**inbox.ledger_seen(ledger), **seen_by_cursor}, known_names(),
                            min_conversations())
    set_aside(plan)
    seen = {**seen_by_cursor, **{r.name: r.sha256 for r in plan.rejected}}
    last = max(int(cursor.get("last_cycle", 0)), inbox.last_cycle_number(ledger))
    if plan.skip_reason:
        return dg.SensorResult(skip_reason=plan.skip_reason, cursor=json.dumps({"seen": seen, "last_cycle": last}))
    key, request = open_cycle(plan, last)
    context.log.info(f"{key}: {plan.conversations} conversations in {[f.name for f in plan.files]}")
    return dg.SensorResult(
        run_requests=[request],
        dynamic_partitions_requests=[cycles_partitions.build_add_request([key])],
        cursor=json.dumps({"seen": {**seen, **plan.claimed()}, "last_cycle": last + 1}),
    )


@dg.schedule(job=sleep_cycle, cron_schedule="0 3 * * *", default_status=dg.DefaultScheduleStatus.STOPPED,
             execution_timezone="UTC")
def nightly_sleep(context: dg.ScheduleEvaluationContext):
    """Sleep at 03:00: one cycle on whatever is new in the inbox (use this or the sensor, not both)."""
    ledger = inbox.load_ledger()
    plan = inbox.plan_batch(inbox.inbox_dir(), inbox.ledger_seen(ledger), known_names(), min_conversations())
    set_aside(plan)
    if plan.skip_reason:
        return dg.SkipReason(plan.skip_reason)
    last = inbox.last_cycle_number(ledger, context.instance.get_dynamic_partitions(cycles_partitions.name))
    key, request = open_cycle(plan, last)
    context.instance.add_dynamic_partitions(cycles_partitions.name, [key])
    return request


@dg.run_failure_sensor(monitored_jobs=[sleep_cycle], default_status=dg.DefaultSensorStatus.RUNNING)
def failed_cycle_recorder(context: dg.RunFailureSensorContext) -> None:
    """Writes a failed cycle into its report: which step failed and why (a gate rejection says so instead)."""
    cycle = context.dagster_run.tags.get("dagster/partition")
    if not cycle:
        return
    record_cycle_failure(cycle, context.dagster_run.run_id, context.failure_event.message or "run failed")


def record_cycle_failure(cycle: str, run_id: str, message: str) -> None:
    """Mark a cycle's report failed, unless the run stopped at the promotion gate (a rejection, recorded as one)."""
    folder = cycle_folder(cycle)
    report = cycle_report.read_json(folder / cycle_report.REPORT_JSON, {"cycle": cycle})
    if report.get("status") == "rejected":
        cycle_report.update_report(folder, run_stopped_by="the blocking promotion check (expected on a rejection)")
        return
    cycle_report.update_report(folder, status="failed", failure={"run_id": run_id, "message": message,
                                                                 "time": inbox.now()})


@dg.definitions
def cycle_definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=CYCLE_ASSETS,
        jobs=[sleep_cycle],
        sensors=[inbox_sensor, failed_cycle_recorder],
        schedules=[nightly_sleep],
    )


def run_cycle_now(
    instance: dg.DagsterInstance,
    *,
    dry_run: bool = False,
    baseline_version: str | None = None,
    hard_cases: bool | None = None,
    self_training: bool | None = None,
    extra_run_config: dict[str, Any] | None = None,
) -> tuple[str | None, str, dg.ExecuteInProcessResult | None]:
    """Open a cycle on what is new in the inbox, as the sensor would, and run it in this process.

    Returns (cycle key or None, skip reason or '', result). Used by `sleeptrain cycle` and the tests.
    """
    from sleeptrain_assets.definitions import defs

    ledger = inbox.load_ledger()
    plan = inbox.plan_batch(inbox.inbox_dir(), inbox.ledger_seen(ledger), known_names(), 1)
    set_aside(plan)
    if plan.skip_reason:
        return None, plan.skip_reason, None
    last = inbox.last_cycle_number(ledger, instance.get_dynamic_partitions(cycles_partitions.name))
    key = inbox.cycle_key(last + 1)
    instance.add_dynamic_partitions(cycles_partitions.name, [key])
    config = run_config(plan, dry_run=dry_run, baseline_version=baseline_version, hard_cases=hard_cases,
                        self_training=self_training)
    for op, op_config in (extra_run_config or {}).get("ops", {}).items():
        config["ops"].setdefault(op, {}).update(op_config)
    job = defs().resolve_job_def(JOB_NAME)
    result = job.execute_in_process(run_config=config, instance=instance, partition_key=key, raise_on_error=False,
                                    tags={"sleeptrain/cycle": key, "sleeptrain/launched_by": "sleeptrain cycle"})
    if not result.success:
        # In-process runs do not reach the run-failure sensor: record the failure the same way.
        failures = [e.message or "" for e in result.all_events if e.is_step_failure]
        record_cycle_failure(key, result.run_id, "; ".join(failures) or "run failed")
    return key, "", result
