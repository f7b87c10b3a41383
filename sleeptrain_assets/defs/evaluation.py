"""Evaluation: the adapter, the base model and the retrieval baseline on the same held-out items -> leaderboard."""

import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from sleeptrain_assets.defs.training import REPLAY_PROMPTS_FILE
from sleeptrain_assets.lib import eval_suite, leaderboard_report, scoring, settings
from sleeptrain_assets.lib.external_benchmarks import LOADERS, contains_match, load_paths, run_benchmark
from sleeptrain_assets.lib.records import EvalItem, Memory, Person
from sleeptrain_assets.lib.training_data import load_replay_prompts
from sleeptrain_resources.embedding import Embedder
from sleeptrain_resources.llm import BaseModel
from sleeptrain_resources.memory_store import MemoryStore
from sleeptrain_resources.registry import AdapterRegistry
from sleeptrain_resources.tracking import Tracker

GROUP = "evaluation"
HISTORY_FILE = "retention_history.json"
LEADERBOARD_JSON = "leaderboard.json"
LEADERBOARD_HTML = "leaderboard.html"


class EvaluationConfig(dg.Config):
    batch_size: int = Field(16, ge=1, le=512, description="prompts per generation batch")
    max_items_per_kind: int | None = Field(
        None, ge=1, description="cap per item kind; default: the profile's eval_max_items_per_kind"
    )
    retrieval_top_k: int | None = Field(None, ge=1, le=50, description="memories in the retrieval baseline's prompt")
    external: bool = Field(True, description="also run the external suites listed in data/benchmarks/paths.yaml")


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


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
    profile = settings.profile()
    cap = config.max_items_per_kind or profile.eval_max_items_per_kind
    top_k = config.retrieval_top_k or profile.retrieval_top_k
    version = str(lora_adapter["version"])
    adapter_path = registry.resolve(lora_adapter.get("path") or version)
    bench_dir = settings.benchmark_path("paths.yaml").parent  # the external suites' paths resolve against it
    locality = eval_suite.load_locality_items(settings.benchmark_path(eval_suite.GENERAL_KNOWLEDGE_FILE))
    probes = eval_suite.load_hallucination_probes(settings.benchmark_path(eval_suite.UNKNOWN_PEOPLE_FILE),
                                                  people_profiles)
    replay_file = settings.benchmark_path(REPLAY_PROMPTS_FILE)
    if replay_file.is_file():
        shared = eval_suite.trained_overlap([*locality, *probes], load_replay_prompts(replay_file))
        if shared:
            raise ValueError(f"{replay_file}: replay prompts repeat evaluation questions {shared[:5]}; "
                             "locality and hallucination items must never be trained")
    plan = eval_suite.build_plan(evaluation_questions, people_profiles, locality, probes, cap=cap)
    context.log.info(f"evaluating {version} on {plan.counts()} (cap {cap}, retrieval top-{top_k})")

    def generator(adapter: Path | None):
        def generate(conversations: list[list[dict[str, str]]]) -> list[str]:
            return base_model.generate(conversations, adapter=adapter, max_new_tokens=profile.max_new_tokens,
                                       batch_size=config.batch_size)
        return generate

    names = {pid: person.name for pid, person in people_profiles.items()}
    memories = _retrieved(plan, embedder, memory_store, top_k, names)

    def with_memories(item: EvalItem, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        return eval_suite.retrieval_messages(messages, memories[item.id], names)

    answers: dict[str, dict[str, str]] = {}
    seconds: dict[str, float] = {}
    for system, generate, augment in (
        ("adapter", generator(adapter_path), None),
        ("base", generator(None), None),
        ("retrieval", generator(None), with_memories),
    ):
        start = time.perf_counter()
        answers[system] = eval_suite.answer_plan(generate, plan, augment)
        seconds[system] = round(time.perf_counter() - start, 2)
        context.log.info(f"{system}: {len(answers[system])} answers in {seconds[system]} s")

    texts = eval_suite.texts_to_embed(plan, answers)
    vectors = dict(zip(texts, embedder.embed(texts), strict=True))
    scores = eval_suite.score_plan(plan, answers, vectors)
    kinds = {pid: p.kind for pid, p in people_profiles.items()}
    systems = {}
    for system, system_scores in scores.items():
        systems[system] = {**scoring.summarize(system_scores, kinds), "extras": eval_suite.extras(system_scores),
                           "seconds": seconds[system]}
    targets = leaderboard_report.evaluate_targets(systems)

    now = _now()
    reports = settings.state_subdir("reports")
    items_by_id = {item.id: item for item in plan.items()}
    history = leaderboard_report.record_cycle(
        leaderboard_report.read_json(reports / HISTORY_FILE, {"cycles": []}),
        version,
        now,
        scoring.fact_scores(scores["adapter"], items_by_id),
        {k: v["rate"] for k, v in systems["adapter"]["by_kind"].items()},
    )
    leaderboard_report.write_json_atomic(reports / HISTORY_FILE, history)
    retention = leaderboard_report.retention(history)

    external = []
    if config.external:
        external = _external(context, base_model, adapter_path, bench_dir, cap, config.batch_size, profile.max_new_tokens)

    run = {
        "model": base_model.model_id,
        "adapter_version": version,
        "adapter_path": str(adapter_path),
        "current_adapter": registry.current(),
        "time": now,
        "profile": profile.name,
        "cap_per_kind": cap,
        "retrieval_top_k": top_k,
        "cycle": next(c["cycle"] for c in history["cycles"] if c["adapter_version"] == version),
        "counts": plan.counts(),
        "systems": systems,
        "targets": targets,
        "retention": retention,
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
            "targets": dg.MetadataValue.md(leaderboard_report.targets_markdown(targets)),
            "targets_met": sum(t["met"] for t in targets),
            "items": dg.MetadataValue.json(plan.counts()),
            "seconds": dg.MetadataValue.json(seconds),
            "backward_transfer": retention["bwt"],
            "cycle": run["cycle"],
            "report": dg.MetadataValue.path(str(report_path)),
        },
    )


def _external(context: dg.AssetExecutionContext, base_model: BaseModel, adapter_path: Path, bench_dir: Path,
              cap: int | None, batch_size: int, max_new_tokens: int) -> list[tuple[str, Any]]:
    paths_yaml = bench_dir / "paths.yaml"
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
            "id": item.id, "kind": item.kind, "category": item.category, "person_id": item.person_id,
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
             *(answers[s][item.id] for s in ("adapter", "base", "retrieval")),
             *(verdicts[s][item.id] for s in ("adapter", "base", "retrieval"))] for item in plan.items()]
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
    page = leaderboard_report.render_html(rows, benchmark_scores, benchmark_scores.get("retention"))
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
