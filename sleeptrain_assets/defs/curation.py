"""Day data: people profiles and templates -> templated conversations -> validated training queue."""

from collections import Counter
from pathlib import Path

import dagster as dg

from sleeptrain_assets.lib import queue_checks, settings
from sleeptrain_assets.lib.markdown import table
from sleeptrain_assets.lib.catalog import TemplateSet, load_people, load_templates, validate_catalog
from sleeptrain_assets.lib.records import Conversation, EvalItem, Person
from sleeptrain_assets.lib.templating import conversation_text, evaluation_items, templated_conversations as build
from sleeptrain_resources.llm import BaseModel

GROUP = "curation"


def _inputs_ready(context: dg.AssetExecutionContext) -> Path:
    """Fail the first step, before any work, on an unknown profile or inputs that are truly missing."""
    profile = settings.profile()
    missing = settings.missing_inputs()
    if missing:
        raise FileNotFoundError("SleepTrain inputs are missing:\n- " + "\n- ".join(missing))
    context.log.info(f"profile {profile.name}; inputs from {settings.data_dir()}")
    return settings.data_dir()


@dg.asset(group_name=GROUP)
def people_profiles(context: dg.AssetExecutionContext) -> dg.Output[dict[str, Person]]:
    """Validated people profiles from SLEEPTRAIN_DATA_DIR/people; a bad file fails naming file, record and field."""
    root = _inputs_ready(context)
    people = load_people(root / "people")
    # Values are checked against the templates' extractor types (a year must be a year) before anything trains.
    for note in validate_catalog(people, load_templates(root / "templates")):
        context.log.info(note)
    kinds = Counter(p.kind for p in people.values())
    return dg.Output(
        people,
        metadata={
            "people": len(people),
            "real": kinds.get("real", 0),
            "fictional": kinds.get("fictional", 0),
            "data_dir": str(root),
            "profiles": dg.MetadataValue.md(
                table(
                    ["id", "name", "kind", "look-alike of", "file"],
                    [[p.id, p.name, p.kind, ", ".join(p.lookalike_of), p.source] for p in people.values()],
                )
            ),
        },
    )


@dg.asset(group_name=GROUP)
def conversation_templates(context: dg.AssetExecutionContext) -> dg.Output[TemplateSet]:
    """Question, answer and conversation templates from SLEEPTRAIN_DATA_DIR/templates."""
    root = _inputs_ready(context)
    templates = load_templates(root / "templates")
    return dg.Output(
        templates,
        metadata={
            "templates": len(templates.templates),
            "extractors": len(templates.extractors),
            "by_category": dg.MetadataValue.json(dict(Counter(t.category for t in templates.templates.values()))),
            "files": dg.MetadataValue.json(list(templates.sources)),
        },
    )


@dg.asset(group_name=GROUP)
def templated_conversations(
    context: dg.AssetExecutionContext, people_profiles: dict[str, Person], conversation_templates: TemplateSet
) -> dg.Output[list[Conversation]]:
    """Multi-turn day conversations, interleaved across people, each turn with provenance."""
    profile = settings.profile()
    conversations = build(people_profiles, conversation_templates, profile.conversation_rounds, profile.seed)
    per_person = Counter(c.person_id for c in conversations)
    per_mode = Counter(c.mode for c in conversations)
    per_category = Counter(
        conversation_templates.templates[t.provenance.template_id].category
        for c in conversations
        for t in c.turns
        if t.provenance and t.provenance.template_id in conversation_templates.templates
    )
    sample = "\n\n---\n\n".join(f"**{c.id}** ({c.mode})\n\n```\n{conversation_text(c)}\n```" for c in conversations[:3])
    context.log.info(f"{len(conversations)} conversations")
    return dg.Output(
        conversations,
        metadata={
            "conversations": len(conversations),
            "turns": sum(len(c.turns) for c in conversations),
            "profile": profile.name,
            "seed": profile.seed,
            "per_person": dg.MetadataValue.json(dict(sorted(per_person.items()))),
            "per_mode": dg.MetadataValue.json(dict(sorted(per_mode.items()))),
            "fact_turns_per_category": dg.MetadataValue.json(dict(sorted(per_category.items()))),
            "sample": dg.MetadataValue.md(sample),
        },
    )


@dg.asset(group_name=GROUP)
def evaluation_questions(
    context: dg.AssetExecutionContext, people_profiles: dict[str, Person], conversation_templates: TemplateSet
) -> dg.Output[list[EvalItem]]:
    """Held-out evaluation questions; never used for training."""
    items = evaluation_items(people_profiles, conversation_templates)
    context.log.info(f"{len(items)} held-out evaluation questions")
    return dg.Output(
        items,
        metadata={
            "questions": len(items),
            "per_kind": dg.MetadataValue.json(dict(sorted(Counter(i.kind for i in items).items()))),
            "per_person": dg.MetadataValue.json(dict(sorted(Counter(i.person_id for i in items).items()))),
        },
    )


# The queue's blocking leak check reads the held-out questions: `*validated_queue` must build them too.
@dg.asset(group_name=GROUP, deps=[evaluation_questions])
def validated_queue(context: dg.AssetExecutionContext, templated_conversations: list[Conversation]) -> dg.Output:
    """The training queue: templated conversations without exact duplicates, guarded by blocking checks."""
    dropped = queue_checks.exact_duplicates(templated_conversations)
    drop_ids = {p.item for p in dropped}
    queue = [c for c in templated_conversations if c.id not in drop_ids]
    for problem in dropped:
        context.log.warning(f"dropped {problem.item}: {problem.why}")
    return dg.Output(
        queue,
        metadata={
            "conversations": len(queue),
            "dropped_exact_duplicates": len(dropped),
            "per_person": dg.MetadataValue.json(dict(sorted(Counter(c.person_id for c in queue).items()))),
            "per_mode": dg.MetadataValue.json(dict(sorted(Counter(c.mode for c in queue).items()))),
        },
    )


def _result(problems: list[queue_checks.Problem], **metadata: object) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=not problems,
        description=queue_checks.describe(problems) if problems else None,
        metadata={"problems": len(problems), **metadata},
    )


@dg.asset_check(asset=validated_queue, blocking=True)
def queue_has_no_duplicates(validated_queue: list[Conversation]) -> dg.AssetCheckResult:
    """No two conversations are the same or nearly the same (word-trigram Jaccard)."""
    threshold = settings.profile().near_duplicate_threshold
    problems = queue_checks.exact_duplicates(validated_queue) + queue_checks.near_duplicates(validated_queue, threshold)
    return _result(problems, threshold=threshold)


@dg.asset_check(asset=validated_queue, blocking=True)
def queue_is_balanced_across_people(validated_queue: list[Conversation]) -> dg.AssetCheckResult:
    """Fact turns per person stay within the profile's max imbalance ratio."""
    max_ratio = settings.profile().max_person_imbalance
    return _result(queue_checks.person_imbalance(validated_queue, max_ratio), max_ratio=max_ratio)


@dg.asset_check(asset=validated_queue, blocking=True)
def queue_covers_every_fact(validated_queue: list[Conversation]) -> dg.AssetCheckResult:
    """Every fact is asked in at least k different question forms."""
    k = settings.profile().min_paraphrases_per_fact
    return _result(queue_checks.paraphrase_coverage(validated_queue, k), k=k)


@dg.asset_check(asset=validated_queue, blocking=True)
def queue_is_interleaved(validated_queue: list[Conversation]) -> dg.AssetCheckResult:
    """No person has more than the allowed run of consecutive conversations."""
    max_run = settings.profile().max_same_person_run
    return _result(queue_checks.interleaving(validated_queue, max_run), max_run=max_run)


@dg.asset_check(asset=validated_queue, blocking=True, additional_ins={"evaluation_questions": dg.AssetIn()})
def queue_excludes_evaluation_questions(
    validated_queue: list[Conversation], evaluation_questions: list[EvalItem]
) -> dg.AssetCheckResult:
    """No held-out evaluation question appears in any training turn."""
    return _result(queue_checks.evaluation_leaks(validated_queue, evaluation_questions),
                   evaluation_questions=len(evaluation_questions))


@dg.asset_check(asset=validated_queue, blocking=True)
def queue_fits_chat_template(validated_queue: list[Conversation], base_model: BaseModel) -> dg.AssetCheckResult:
    """Every conversation renders with the base model's chat template within the max sequence length."""
    max_len = settings.profile().max_seq_len
    _, tokenizer = base_model.load()

    def count(messages: list[dict[str, str]]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True))

    problems, longest = queue_checks.over_length(validated_queue, count, max_len)
    return _result(problems, max_len=max_len, longest_tokens=longest, tokenizer=base_model.model_id)
