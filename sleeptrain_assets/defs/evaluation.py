"""Evaluation: the adapter, the base model and the retrieval baseline on the same held-out items -> leaderboard."""

import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, field_validator

from sleeptrain_assets.defs.training import REPLAY_PROMPTS_FILE
from sleeptrain_assets.lib import cycle_report, eval_suite, leaderboard_report, scoring, settings, templating
from sleeptrain_assets.lib.catalog import SPLITS, TemplateSet
from sleeptrain_assets.lib.external_benchmarks import LOADERS, contains_match, load_paths, run_benchmark
from sleeptrain_assets.lib.records import EvalItem, Memory, Person
from sleeptrain_assets.lib.training_data import load_replay_prompts
from sleeptrain_resources.embedding import Embedder
from sleeptrain_resources.llm import BaseModel, GenerationTally
from sleeptrain_resources.memory_store import MemoryStore
from sleeptrain_resources.registry import AdapterRegistry
from sleeptrain_resources.tracking import Tracker

GROUP = "evaluation"
HISTORY_FILE = "retention_history.json"
LEADERBOARD_JSON = "leaderboard.json"
LEADERBOARD_HTML = "leaderboard.html"


class EvaluationConfig(dg.Config):
    batch_size: int = Field(32, ge=1, le=512, description="prompts per generation batch")
    items_per_slot: int | None = Field(
        None, ge=1, description="held-out questions per kind, split and fact slot; default: the profile's "
        "eval_items_per_slot"
    )
    max_items_per_kind: int | None = Field(
        None, ge=1, description="cap per kind (and split) of the items; default: the profile's eval_max_items_per_kind"
    )
    retrieval_top_k: int | None = Field(None, ge=1, le=50, description="memories in the retrieval baseline's prompt")
    external: bool = Field(True, description="also run the external suites listed in data/benchmarks/paths.yaml")
    retrieval: bool = Field(True, description="also score the retrieval baseline (base model + top-k memories)")
    splits: list[str] = Field(["validation", "test"], min_length=1,
                              description="which held-out splits to ask: validation (for choosing) and/or test "
                              "(the reported figures)")

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown splits {unknown}; choose from {list(SPLITS)}")
        return value


@dg.asset_check(asset="evaluation_questions", additional_ins={"conversation_templates": dg.AssetIn()}, blocking=True)
def test_forms_far_from_trained(conversation_templates: TemplateSet) -> dg.AssetCheckResult:
    """No test question form equals, or shares six words in a row with, a trained or validation form."""
    problems = templating.leaking_test_forms(conversation_templates)
    return dg.AssetCheckResult(passed=not problems, metadata={
        "problems": len(problems), "ngram": templating.NGRAM,
        "details": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems[:50]) or "none")})


@dg.asset_check(asset="evaluation_questions")
def every_slot_in_both_splits(evaluation_questions: list[EvalItem]) -> dg.AssetCheckResult:
    """Each person x slot x kind held out in the validation and the test split alike."""
    gaps = templating.split_coverage_gaps(evaluation_questions)
    counts = Counter(f"{i.split}/{i.kind}" for i in evaluation_questions)
    return dg.AssetCheckResult(
        passed=not gaps, severity=dg.AssetCheckSeverity.WARN,
        metadata={"gaps": len(gaps), "items": dg.MetadataValue.json(dict(sorted(counts.items()))),
                  "details": dg.MetadataValue.md("\n".join(f"- {g}" for g in gaps[:50]) or "none")})


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


@contextmanager
def _timed(stages: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    stages[name] = round(time.perf_counter() - start, 2)


def _retrieved(plan: eval_suite.SuitePlan, embedder: Embedder, store: MemoryStore, k: int,
               names: dict[str, str]) -> dict[str, list[Memory]]:
    items = plan.items()
    vectors = embedder.embed([eval_suite.retrieval_query(item) for item in items])
    return {
        item.id: [m for m, _ in store.nearest(vec, k=k, person_id=eval_suite.linked_person(item, names))]
        for item, vec in zip(items, vectors, strict=True)
    }


@dg.asset(group_name=GROUP, pool="gpu")
def benchmark_scores(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    lora_adapter: dict[str, Any],
    evaluation_questions: list[EvalItem],
    people_profiles: dict[str, Person],
    base_model: BaseModel,
    registry: AdapterRegistry,
    memory_store: MemoryStore,
    embedder: Embedder,
    tracker: Tracker,
) -> dg.Output[dict[str, Any]]:
    """The adapter, the base model and base + retrieved memories scored on the same held-out items, per cycle."""
    started = time.perf_counter()
    profile = settings.profile()
    cap = config.max_items_per_kind or profile.eval_max_items_per_kind
    per_slot = config.items_per_slot or profile.eval_items_per_slot
    top_k = config.retrieval_top_k or profile.retrieval_top_k
    version = str(lora_adapter["version"])
    adapter_path = registry.resolve(lora_adapter.get("path") or version)
    locality = eval_suite.load_locality_items(settings.benchmark_path(eval_suite.GENERAL_KNOWLEDGE_FILE))
    probes = eval_suite.load_hallucination_probes(settings.benchmark_path(eval_suite.UNKNOWN_PEOPLE_FILE),
                                                  people_profiles)
    replay_file = settings.benchmark_path(REPLAY_PROMPTS_FILE)
    if replay_file.is_file():
        shared = eval_suite.trained_overlap([*locality, *probes], load_replay_prompts(replay_file))
        if shared:
            raise ValueError(f"{replay_file}: replay prompts repeat evaluation questions {shared[:5]}; "
                             "locality and hallucination items must never be trained")
    taught = set(memory_store.count_by_person()) & set(people_profiles)
    plan = eval_suite.build_plan(evaluation_questions, people_profiles, locality, probes, cap=cap, per_slot=per_slot,
                                 taught=taught, max_conversations=profile.eval_max_conversations,
                                 splits=config.splits)
    context.log.info(f"evaluating {version} on {plan.counts()} ({per_slot} per kind, split and slot; "
                     f"{len(plan.groups)} conversations; retrieval top-{top_k})")

    stages: dict[str, float] = {}
    timed = partial(_timed, stages)
    tallies = {"adapter": GenerationTally(), "base": GenerationTally()}

    def generator(adapter: Path | None, tally: GenerationTally):
        def generate(conversations: list[list[dict[str, str]]]) -> list[str]:
            return base_model.generate(conversations, adapter=adapter, max_new_tokens=profile.max_new_tokens,
                                       batch_size=config.batch_size, tally=tally)
        return generate

    names = {pid: person.name for pid, person in people_profiles.items()}
    with timed("retrieval_search"):
        memories = _retrieved(plan, embedder, memory_store, top_k, names) if config.retrieval else {}

    def with_memories(item: EvalItem, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        return eval_suite.retrieval_messages(messages, memories[item.id], names)

    # The base model answers plain and with retrieved memories in the same batches: one model, two prompt sets.
    passes = [("adapter", generator(adapter_path, tallies["adapter"]), {"adapter": None}),
              ("base", generator(None, tallies["base"]),
               {"base": None, "retrieval": with_memories} if config.retrieval else {"base": None})]
    answers: dict[str, dict[str, str]] = {}
    seconds: dict[str, float] = {}
    for name, generate, augments in passes:
        with timed(f"{name}_answers"):
            single = eval_suite.answer_single(generate, plan.single, augments)
        with timed(f"{name}_multi_turn"):
            turns = eval_suite.run_conversations_for(generate, plan.groups, augments)
        for system in augments:  # base and retrieval share their pass, so they show the same seconds
            answers[system] = single[system] | turns[system]
            seconds[system] = round(stages[f"{name}_answers"] + stages[f"{name}_multi_turn"], 2)
        context.log.info(f"{' + '.join(augments)}: {sum(len(answers[s]) for s in augments)} answers in "
                         f"{seconds[name]} s ({tallies[name].from_cache} of {tallies[name].distinct} distinct "
                         "prompts from the base-answer cache)")

    with timed("answer_embedding"):
        texts = eval_suite.texts_to_embed(plan, answers)
        vectors = dict(zip(texts, embedder.embed(texts), strict=True))
    budget = profile.max_new_tokens
    scoring_started = time.perf_counter()
    cut = {system: _cut_at_budget(base_model, given, budget) for system, given in answers.items()}
    scores = eval_suite.score_plan(plan, answers, vectors, cuts=cut)
    items_by_id = {item.id: item for item in plan.items()}
    kinds = {pid: p.kind for pid, p in people_profiles.items()}
    systems = {}
    for system, system_scores in scores.items():
        split_scores = eval_suite.by_split(system_scores, items_by_id)
        # Reported figures are the test split's; the validation split is what defaults and gates are chosen on.
        systems[system] = {**scoring.summarize(split_scores["test"], kinds),
                           "validation": scoring.summarize(split_scores["validation"], kinds),
                           "extras": eval_suite.extras(split_scores["test"]), "seconds": seconds[system],
                           "max_new_tokens": budget}
    breakdown = {
        "slot": {s: eval_suite.fact_breakdown(eval_suite.by_split(v, items_by_id)["test"], items_by_id, "slot")
                 for s, v in scores.items()},
        "person": {s: eval_suite.fact_breakdown(eval_suite.by_split(v, items_by_id)["test"], items_by_id, "person")
                   for s, v in scores.items()},
    }
    expected_tokens = max(base_model.token_counts([i.expected for i in plan.items() if i.expected]) or [0])
    if expected_tokens >= budget:
        context.log.warning(f"the longest expected answer has {expected_tokens} tokens, at or over the "
                            f"{budget}-token budget: right answers may be cut")
    targets = leaderboard_report.evaluate_targets(systems)

    now = _now()
    reports = settings.state_subdir("reports")
    history = leaderboard_report.record_cycle(
        leaderboard_report.read_json(reports / HISTORY_FILE, {"cycles": []}),
        version,
        now,
        scoring.fact_scores(scores["adapter"], items_by_id),
        {k: v["rate"] for k, v in systems["adapter"]["by_kind"].items()},
    )
    leaderboard_report.write_json_atomic(reports / HISTORY_FILE, history)
    retention = leaderboard_report.retention(history)

    stages["scoring"] = round(time.perf_counter() - scoring_started, 2)

    external = []
    if config.external:
        with timed("external_suites"):
            external = _external(context, base_model, adapter_path, cap, config.batch_size, profile.max_new_tokens)
    stages["total"] = round(time.perf_counter() - started, 2)
    generation = {name: tally.to_dict() for name, tally in tallies.items()}

    run = {
        "model": base_model.model_id,
        "adapter_version": version,
        "adapter_path": str(adapter_path),
        "current_adapter": registry.current(),
        "time": now,
        "profile": profile.name,
        "cap_per_kind": cap,
        "items_per_slot": per_slot,
        "taught_people": sorted(taught),
        "reported_split": "test",
        "longest_expected_tokens": expected_tokens,
        "retrieval_top_k": top_k,
        "cycle": next(c["cycle"] for c in history["cycles"] if c["adapter_version"] == version),
        "counts": plan.counts(),
        "systems": systems,
        "targets": targets,
        "breakdown": breakdown,
        "retention": retention,
        "stage_seconds": stages,
        "generation": generation,
        "external": [r.to_dict(with_items=False) | {"system": s, "metric": "contains"} for s, r in external],
    }
    report_path = reports / "runs" / f"{_safe(version)}__{now[:19].replace(':', '')}.json"
    leaderboard_report.write_json_atomic(report_path, _detailed_report(run, plan, answers, scores, memories, external))
    run["report_path"] = str(report_path)

    _track(tracker, run, plan, answers, scores)
    return dg.Output(
        run,
        metadata={
            "scores": dg.MetadataValue.md(leaderboard_report.kinds_markdown(systems)),
            "validation_scores": dg.MetadataValue.md(leaderboard_report.kinds_markdown(
                {s: v["validation"] for s, v in systems.items()})),
            "per_slot": dg.MetadataValue.md(leaderboard_report.breakdown_markdown(breakdown["slot"], "slot")),
            "per_person": dg.MetadataValue.md(leaderboard_report.breakdown_markdown(breakdown["person"], "person")),
            "targets": dg.MetadataValue.md(leaderboard_report.targets_markdown(targets)),
            "answers_cut_at_budget": dg.MetadataValue.json({s: v["answers_cut"] for s, v in systems.items()}),
            "targets_met": sum(t["met"] for t in targets),
            "items": dg.MetadataValue.json(plan.counts()),
            "seconds": dg.MetadataValue.json(seconds),
            "stage_seconds": dg.MetadataValue.json(stages),
            "answers_from_cache": dg.MetadataValue.json(
                {name: f"{t['from_cache']} of {t['distinct']}" for name, t in generation.items()}),
            "generation": dg.MetadataValue.json(generation),
            "backward_transfer": retention["bwt"],
            "cycle": run["cycle"],
            "report": dg.MetadataValue.path(str(report_path)),
        },
    )


def _cut_at_budget(base_model: BaseModel, answers: dict[str, str], budget: int) -> dict[str, bool]:
    """Item id -> whether generation stopped at the token budget (the answer may be cut short)."""
    ids = list(answers)
    counts = base_model.token_counts([answers[i] for i in ids])
    # A decoded answer loses at most its end-of-turn token; one that stopped by itself is shorter.
    return {i: n >= budget - 1 for i, n in zip(ids, counts, strict=True)}


def _external(context: dg.AssetExecutionContext, base_model: BaseModel, adapter_path: Path,
              cap: int | None, batch_size: int, max_new_tokens: int) -> list[tuple[str, Any]]:
    paths_yaml = settings.benchmark_path("paths.yaml")
    if not paths_yaml.is_file():
        context.log.warning(f"{paths_yaml} not found: no external suites run")
        return []
    results = []
    for name, path in load_paths(paths_yaml).items():
        dataset = LOADERS[name](path).load().head(cap)
        for system, adapter in (("adapter", adapter_path), ("base", None)):
            def model_fn(examples: list[dict[str, Any]], adapter: Path | None = adapter) -> list[str]:
                conversations = [[{"role": "user", "content": str(e["input"])}] for e in examples]
                return base_model.generate(conversations, adapter=adapter, max_new_tokens=max_new_tokens,
                                           batch_size=batch_size)
            result = run_benchmark(model_fn, dataset, contains_match, batched=True)
            context.log.info(f"{name} ({system}): {result.avg_score:.3f} on {result.count}")
            results.append((system, result))
    return results


def _detailed_report(run: dict[str, Any], plan: eval_suite.SuitePlan, answers: dict[str, dict[str, str]],
                     scores: dict[str, list[scoring.ItemScore]], memories: dict[str, list[Memory]],
                     external: list[tuple[str, Any]]) -> dict[str, Any]:
    verdicts = {system: {s.item_id: s for s in system_scores} for system, system_scores in scores.items()}
    items = []
    for item in plan.items():
        items.append({
            "id": item.id, "kind": item.kind, "split": item.split, "slot": item.slot, "category": item.category,
            "person_id": item.person_id,
            "group": item.group, "system_prompt": item.system, "question": item.question, "expected": item.expected,
            "keywords": list(item.keywords), "wrong_value": item.wrong_value,
            "retrieved": [m.text for m in memories.get(item.id, [])],
            "answers": {system: answers[system][item.id] for system in answers},
            "verdicts": {system: {"passed": verdicts[system][item.id].passed, "counted": verdicts[system][item.id].counted,
                                  "reason": verdicts[system][item.id].reason, "details": verdicts[system][item.id].details}
                         for system in verdicts},
        })
    return {"run": run, "items": items,
            "external": [r.to_dict() | {"system": system} for system, r in external]}


def _track(tracker: Tracker, run: dict[str, Any], plan: eval_suite.SuitePlan, answers: dict[str, dict[str, str]],
           scores: dict[str, list[scoring.ItemScore]]) -> None:
    if not tracker.enabled:
        return
    tracker.start(name=f"eval-{run['adapter_version']}", job_type="evaluation",
                  config={k: run[k] for k in ("model", "adapter_version", "profile", "cap_per_kind", "retrieval_top_k")})
    metrics: dict[str, Any] = {}
    for system, summary in run["systems"].items():
        metrics.update({f"{system}/{kind}": entry["rate"] for kind, entry in summary["by_kind"].items()})
    metrics.update({f"target/{t['name']}": t["value"] for t in run["targets"]})
    metrics.update({f"external/{r['benchmark']}/{r['system']}": r["avg_score"] for r in run["external"]})
    metrics["retention/bwt"] = run["retention"]["bwt"]
    tracker.log_metrics(metrics)
    verdicts = {system: {s.item_id: s.passed for s in system_scores} for system, system_scores in scores.items()}
    rows = [[item.id, item.kind, item.person_id or "", item.question, item.expected,
             *(answers.get(s, {}).get(item.id, "") for s in ("adapter", "base", "retrieval")),
             *(verdicts.get(s, {}).get(item.id) for s in ("adapter", "base", "retrieval"))] for item in plan.items()]
    tracker.log_table("answers", ["id", "kind", "person", "question", "expected", "adapter", "base", "retrieval",
                                  "adapter_pass", "base_pass", "retrieval_pass"], rows)
    tracker.finish()


@dg.asset(group_name=GROUP)
def leaderboard(context: dg.AssetExecutionContext, benchmark_scores: dict[str, Any]) -> dg.MaterializeResult:
    """leaderboard.json (one row per model x adapter version x benchmark) and a static leaderboard.html."""
    reports = settings.state_subdir("reports")
    json_path, html_path = reports / LEADERBOARD_JSON, reports / LEADERBOARD_HTML
    existing = leaderboard_report.read_json(json_path, {"rows": []})
    rows = leaderboard_report.merge_rows(existing.get("rows", []), leaderboard_report.rows_from_run(benchmark_scores))
    cycles_history = settings.state_dir() / "cycles" / cycle_report.RETENTION_FILE
    cycle_curve = cycle_report.retention_curve(leaderboard_report.read_json(cycles_history, {"cycles": []}))
    page = leaderboard_report.render_html(rows, benchmark_scores, benchmark_scores.get("retention"),
                                          cycle_retention=cycle_curve)
    leaderboard_report.write_json_atomic(json_path, {"updated": benchmark_scores["time"], "rows": rows,
                                                     "latest_run": benchmark_scores})
    leaderboard_report.write_text_atomic(html_path, page)
    missed = [t for t in benchmark_scores["targets"] if not t["met"]]
    for t in missed:
        context.log.warning(f"target not met: {t['label']} {t['value']} < {t['goal']} ({t['detail']})")
    return dg.MaterializeResult(
        metadata={
            "leaderboard": dg.MetadataValue.md(leaderboard_report.markdown_table(rows)),
            "targets": dg.MetadataValue.md(leaderboard_report.targets_markdown(benchmark_scores["targets"])),
            "targets_missed": len(missed),
            "html": dg.MetadataValue.path(str(html_path)),
            "json": dg.MetadataValue.path(str(json_path)),
            "rows": len(rows),
        }
    )
