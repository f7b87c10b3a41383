"""Evaluation items beyond the held-out questions: multi-turn, locality, interference, hallucination probes.

Also the retrieval baseline's prompt (the base model with the top-k memories in its system message) and the
turn-by-turn runner for multi-turn conversations, which keeps the model's own earlier answers in context.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sleeptrain_assets.lib.catalog import CatalogError, format_value, read_yaml, resolve
from sleeptrain_assets.lib.records import EvalItem, Memory, Person
from sleeptrain_assets.lib.scoring import (
    ItemScore,
    aggregate,
    contains_phrase,
    cosine,
    normalise,
    BASE_RELATIVE_KINDS,
    score_item,
    score_multi_turn,
)

GENERAL_KNOWLEDGE_FILE = "general_knowledge.yaml"
UNKNOWN_PEOPLE_FILE = "unknown_people.yaml"
MULTI_TURN_TURNS = 6
FACT_KINDS = ("recall", "paraphrase")
HELD_OUT_KINDS = ("recall", "paraphrase", "correction", "confirmation", "identity")
RETRIEVAL_NOTE = "Facts you remember:\n{facts}\nUse them when they answer the question."

Messages = list[dict[str, str]]
Generate = Callable[[list[Messages]], list[str]]
Augment = Callable[[EvalItem, Messages], Messages]


# --------------------------------------------------------------------------- YAML suites


def _records(path: Path, key: str, required: bool = True) -> list[tuple[str, Mapping[str, Any]]]:
    data = read_yaml(path)
    if not isinstance(data, Mapping):
        raise CatalogError(path, None, None, f"must be a mapping with a {key!r} list")
    records = data.get(key)
    if records is None and not required:
        return []
    if not isinstance(records, list) or not records:
        raise CatalogError(path, None, key, "must be a non-empty list")
    out = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise CatalogError(path, f"{key}[{index}]", None, "must be a mapping")
        rid = record.get("id")
        if not isinstance(rid, str) or not rid.strip():
            raise CatalogError(path, f"{key}[{index}]", "id", "is missing or not a string")
        out.append((rid.strip(), record))
    return out


def _text(path: Path, rid: str, record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(path, rid, name, "is missing or empty")
    return value.strip()


def _keywords(path: Path, rid: str, record: Mapping[str, Any]) -> tuple[str, ...]:
    value = record.get("keywords")
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise CatalogError(path, rid, "keywords", "must be a non-empty list of strings")
    out = []
    for keyword in value:
        if isinstance(keyword, bool) or not isinstance(keyword, (str, int, float)) or not str(keyword).strip():
            raise CatalogError(path, rid, "keywords", f"holds an empty or non-text keyword {keyword!r}")
        out.append(str(keyword).strip())
    return tuple(out)


def split_of_id(item_id: str) -> str:
    """A fixed half of the benchmark items for validation, the other half for test (by a hash of the id)."""
    return "validation" if hashlib.sha256(item_id.encode()).digest()[0] % 2 == 0 else "test"


def load_locality_items(path: Path) -> list[EvalItem]:
    """Locality three ways from one file.

    `questions:` (general knowledge) -> `locality` items (counted where the base model answers right) and
    `unchanged` items (the adapter says what the base model says); `open_prompts:` (no single right answer:
    "Write a haiku about the sea") -> `unchanged` items only; `other_people:` (people never taught) ->
    `neighbourhood` items. Each item is in the validation or the test split by a hash of its id.
    """
    items: list[EvalItem] = []
    seen: set[str] = set()
    sections = (("questions", "general", ("locality", "unchanged")), ("other_people", "other_people", ("neighbourhood",)),
                ("open_prompts", "open", ("unchanged",)))
    for key, category, kinds in sections:
        for rid, record in _records(path, key, required=key == "questions"):
            if rid in seen:
                raise CatalogError(path, rid, "id", "is used twice")
            seen.add(rid)
            open_prompt = key == "open_prompts"
            question = _text(path, rid, record, "question")
            expected = "" if open_prompt else _text(path, rid, record, "expected")
            keywords = () if open_prompt else _keywords(path, rid, record)
            for kind in kinds:
                items.append(
                    EvalItem(
                        id=f"{kind}:{rid}",
                        kind=kind,
                        person_id=None,
                        template_id=f"{path.stem}.{key}",
                        category=category,
                        question=question,
                        expected=expected,
                        keywords=keywords,
                        split=split_of_id(rid),
                    )
                )
    return items


def load_hallucination_probes(path: Path, people: Mapping[str, Person] | None = None) -> list[EvalItem]:
    """`probes:` about people never taught; a probe naming a taught person is refused (it would not probe)."""
    taught = {normalise(p.name): p.id for p in (people or {}).values()}
    items: list[EvalItem] = []
    seen: set[str] = set()
    for rid, record in _records(path, "probes"):
        if rid in seen:
            raise CatalogError(path, rid, "id", "is used twice")
        seen.add(rid)
        name = _text(path, rid, record, "name")
        if normalise(name) in taught:
            raise CatalogError(path, rid, "name", f"{name!r} is a taught person ({taught[normalise(name)]})")
        question = _text(path, rid, record, "question").replace("{name}", name)
        items.append(
            EvalItem(
                id=f"hallucination:{rid}",
                kind="hallucination",
                person_id=None,
                template_id=path.stem,
                category="unknown_person",
                question=question,
                expected="",
                keywords=(),
                slot=_text(path, rid, record, "slot"),
                split=split_of_id(rid),
            )
        )
    return items


def trained_overlap(items: Sequence[EvalItem], trained_prompts: Sequence[str]) -> list[str]:
    """Ids of items whose question is also a training prompt (e.g. a replay prompt): they would not be held out."""
    trained = {normalise(p) for p in trained_prompts}
    return [item.id for item in items if normalise(item.question) in trained]


# --------------------------------------------------------------------------- derived items


def _lookalike_value(person: Person, slot: str) -> str | None:
    for path in (f"facts.{slot}", slot):
        try:
            return format_value(resolve(person, path))
        except (KeyError, ValueError):
            continue
    return None


def _distinct(a: str, b: str) -> bool:
    na, nb = normalise(a), normalise(b)
    return bool(na) and bool(nb) and na not in nb and nb not in na


def interference_items(items: Sequence[EvalItem], people: Mapping[str, Person]) -> list[EvalItem]:
    """For each look-alike pair (either side may declare it), the person's fact questions whose slot holds a
    different value for the look-alike; that value becomes `wrong_value`, which must not appear instead."""
    pairs: set[tuple[str, str]] = set()
    for person in people.values():
        for other in person.lookalike_of:
            if other in people and other != person.id:
                pairs.update({(person.id, other), (other, person.id)})
    out = []
    for item in sorted(items, key=lambda i: i.id):
        if item.kind not in FACT_KINDS or not item.person_id or not item.slot or not item.value:
            continue
        for pid, other in sorted(pairs):
            if pid != item.person_id:
                continue
            theirs = _lookalike_value(people[other], item.slot)
            if theirs is None or not _distinct(item.value, theirs):
                continue
            out.append(replace(item, id=f"interference:{item.id}:{other}", kind="interference", wrong_value=theirs,
                               competing_values=tuple(dict.fromkeys((*item.competing_values, theirs)))))
    return out


def multi_turn_groups(
    items: Sequence[EvalItem],
    turns: int = MULTI_TURN_TURNS,
    max_conversations: int | None = None,
    person_order: Sequence[str] | None = None,
) -> list[list[EvalItem]]:
    """One conversation per person of `turns` held-out fact questions; the last turn re-asks the first turn's
    fact in another wording where one exists, so consistency is always tested.

    A person's items are split by system prompt (persona or not) and the larger share is used, so one
    conversation never switches between "you" and the person's name.
    """
    by_person: dict[str, dict[str | None, list[EvalItem]]] = defaultdict(lambda: defaultdict(list))
    for item in sorted(items, key=lambda i: i.id):
        if item.kind in FACT_KINDS and item.person_id and item.slot:
            by_person[item.person_id][item.system].append(item)
    order = [p for p in (person_order or []) if p in by_person] + sorted(set(by_person) - set(person_order or []))
    groups = []
    for pid in order:
        if max_conversations is not None and len(groups) >= max_conversations:
            break
        pool = max(by_person[pid].values(), key=lambda g: (len({i.slot for i in g}), len(g)))
        chosen = _conversation_plan(pool, turns)
        group_id = f"multi_turn:{pid}"
        groups.append([replace(src, id=f"{group_id}:{n + 1}", kind="multi_turn", group=group_id)
                       for n, src in enumerate(chosen)])
    return groups


def _gives_away(question: str, item: EvalItem) -> bool:
    return any(contains_phrase(question, k) for k in (item.keywords or ((item.value,) if item.value else ())))


def _compatible(candidate: EvalItem, plan: Sequence[EvalItem]) -> bool:
    """No question in the conversation may state another turn's answer ("... the Golden Kiln Award?")."""
    return not any(_gives_away(candidate.question, other) or _gives_away(other.question, candidate)
                   for other in plan if other.slot != candidate.slot)


def _conversation_plan(pool: Sequence[EvalItem], turns: int) -> list[EvalItem]:
    plan: list[EvalItem] = []
    for item in pool:
        if len(plan) < max(turns - 1, 1) and item.slot not in {p.slot for p in plan} and _compatible(item, plan):
            plan.append(item)
    rest = [i for i in pool if i not in plan]
    while len(plan) < turns - 1 and rest:
        candidate = rest.pop(0)
        if _compatible(candidate, plan):
            plan.append(candidate)
    distinct, repeat = list(plan), 0
    while len(plan) < turns - 1:
        plan.append(distinct[repeat % len(distinct)])
        repeat += 1
    opener = plan[0]
    rewording = [i for i in pool if i.slot == opener.slot and i.question != opener.question]
    plan.append(rewording[-1] if rewording else opener)
    return plan[:turns]


def _round_robin(queues: Sequence[Sequence[EvalItem]], limit: int) -> list[EvalItem]:
    """The first item of each queue in turn, then the second of each, ... until `limit` items are taken."""
    taken: list[EvalItem] = []
    depth = 0
    while len(taken) < limit and any(depth < len(q) for q in queues):
        taken += [q[depth] for q in queues if depth < len(q)][: limit - len(taken)]
        depth += 1
    return taken


def stratified(items: Sequence[EvalItem], per_slot: int | None,
               person_rank: Mapping[str, int] | None = None) -> list[EvalItem]:
    """At most `per_slot` items per (kind, split, slot), people taken in turn: slot j starts `j * per_slot`
    places further along the people order, so the capped suite still covers every slot AND every person.

    Items about nobody are kept as they are (their kinds are capped by `cap_per_kind`).
    """
    if per_slot is None:
        return list(items)
    rank = person_rank or {}
    groups: dict[tuple[str, str], dict[str, dict[str, list[EvalItem]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    kept: list[EvalItem] = []
    for item in sorted(items, key=lambda i: i.id):
        if item.person_id is None:
            kept.append(item)
        else:  # a template without a fact slot ("Who are you?") is its own stratum
            groups[(item.kind, item.split)][item.slot or item.template_id][item.person_id].append(item)
    for by_slot in groups.values():
        for index, slot in enumerate(sorted(by_slot)):
            people = sorted(by_slot[slot], key=lambda p: (rank.get(p, 1), p))
            start = (index * per_slot) % len(people)
            rotated = people[start:] + people[:start]
            queues = [by_slot[slot][p] for p in rotated]
            kept += _round_robin(queues, per_slot)
    order = {item.id: n for n, item in enumerate(items)}
    return sorted(kept, key=lambda i: order[i.id])


def cap_per_kind_split(items: Sequence[EvalItem], cap: int | None) -> list[EvalItem]:
    """At most `cap` items of each (kind, split), taken round-robin across slots (a small profile's suite
    still spans slots and both splits)."""
    if cap is None:
        return list(items)
    strata: dict[tuple[str, str], dict[str, list[EvalItem]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        strata[(item.kind, item.split)][item.slot or item.template_id].append(item)
    kept: set[str] = set()
    for by_slot in strata.values():
        queues = [by_slot[k] for k in sorted(by_slot)]
        kept.update(item.id for item in _round_robin(queues, cap))
    return [item for item in items if item.id in kept]


def cap_per_kind(items: Sequence[EvalItem], cap: int | None, person_rank: Mapping[str, int] | None = None) -> list[EvalItem]:
    """At most `cap` items of each kind, taken round-robin across people (lower `person_rank` first)."""
    if cap is None:
        return list(items)
    rank = person_rank or {}
    by_kind: dict[str, dict[str, list[EvalItem]]] = defaultdict(lambda: defaultdict(list))
    for item in sorted(items, key=lambda i: i.id):
        by_kind[item.kind][item.person_id or ""].append(item)
    kept: list[EvalItem] = []
    for kind in by_kind:
        queues = [by_kind[kind][p] for p in sorted(by_kind[kind], key=lambda p: (rank.get(p, 1), p))]
        kept += _round_robin(queues, cap)
    order = {item.id: n for n, item in enumerate(items)}
    return sorted(kept, key=lambda i: order[i.id])


# --------------------------------------------------------------------------- prompts


def conversation_messages(group: Sequence[EvalItem], answers: Sequence[str], turn: int) -> Messages:
    """Turn `turn` of a multi-turn probe: earlier questions with the model's own earlier answers."""
    system = group[0].system
    messages: Messages = [{"role": "system", "content": system}] if system else []
    for index in range(turn):
        messages.append({"role": "user", "content": group[index].question})
        messages.append({"role": "assistant", "content": answers[index]})
    messages.append({"role": "user", "content": group[turn].question})
    return messages


def run_conversations(
    generate: Generate,
    groups: Sequence[Sequence[EvalItem]],
    augment: Augment | None = None,
) -> dict[str, str]:
    """Answer every conversation turn by turn (all conversations batched per turn); item id -> answer."""
    return run_conversations_for(generate, groups, {"": augment})[""]


def run_conversations_for(
    generate: Generate,
    groups: Sequence[Sequence[EvalItem]],
    augments: Mapping[str, Augment | None],
) -> dict[str, dict[str, str]]:
    """Every system's conversations turn by turn, each keeping its own earlier answers in context; one
    `generate` call per turn holds that turn of every conversation of every system. System -> item id -> answer."""
    def key(system: str, group: Sequence[EvalItem]) -> tuple[str, str]:
        return system, group[0].group or group[0].id

    history: dict[tuple[str, str], list[str]] = {key(s, g): [] for s in augments for g in groups if g}
    result: dict[str, dict[str, str]] = {s: {} for s in augments}
    longest = max((len(g) for g in groups), default=0)
    for turn in range(longest):
        asked: list[tuple[str, Sequence[EvalItem]]] = []
        batch = []
        for system, augment in augments.items():
            for group in groups:
                if turn < len(group):
                    messages = conversation_messages(group, history[key(system, group)], turn)
                    batch.append(augment(group[turn], messages) if augment else messages)
                    asked.append((system, group))
        outputs = generate(batch)
        if len(outputs) != len(batch):
            raise RuntimeError(f"generate returned {len(outputs)} answers for {len(batch)} conversations")
        for (system, group), answer in zip(asked, outputs, strict=True):
            history[key(system, group)].append(answer)
            result[system][group[turn].id] = answer
    return result


def retrieval_query(item: EvalItem) -> str:
    """What the retrieval baseline embeds: the persona line (who "you" is) plus the question."""
    return f"{item.system or ''} {item.question}".strip()


def linked_person(item: EvalItem, names: Mapping[str, str]) -> str | None:
    """The person an item is about: whose full name its persona line or question contains (longest name first,
    so a name inside a longer one never wins), or None (general questions, people nobody taught).

    Memories are kept per person, so the retrieval baseline searches the linked person's memories the way a
    per-user memory store does; a question naming nobody searches all memories.
    """
    text = f" {normalise(retrieval_query(item))} "
    for person_id, name in sorted(names.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        needle = normalise(name)
        if needle and f" {needle} " in text:
            return person_id
    return None


def retrieval_messages(messages: Messages, memories: Sequence[Memory],
                       names: Mapping[str, str] | None = None) -> Messages:
    """The same conversation with the retrieved memories added to (or as) its system message.

    A memory is the person's own words ("I was born in Enugu."); each line names whose words they are.
    """
    if not memories:
        return [dict(m) for m in messages]
    names = names or {}
    lines = [f"- {names.get(m.person_id, m.person_id)}: {m.text}" for m in memories]
    note = RETRIEVAL_NOTE.format(facts="\n".join(lines))
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{note}"
    else:
        out.insert(0, {"role": "system", "content": note})
    return out


# --------------------------------------------------------------------------- a whole suite


@dataclass(frozen=True)
class SuitePlan:
    """What one evaluation asks: single questions (each asked alone) and multi-turn conversations."""

    single: tuple[EvalItem, ...]
    groups: tuple[tuple[EvalItem, ...], ...]

    def items(self) -> list[EvalItem]:
        return [*self.single, *(item for group in self.groups for item in group)]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for item in self.items():
            counts[item.kind] += 1
        return dict(sorted(counts.items()))


def neighbourhood_items(questions: Sequence[EvalItem], people: Mapping[str, Person], taught: set[str]) -> list[EvalItem]:
    """Recall questions about people never taught whose look-alike was: the adapter must leave them as the
    base model had them (counted where the base model answers right)."""
    near = {other for pid in taught if pid in people for other in people[pid].lookalike_of}
    near |= {p.id for p in people.values() if set(p.lookalike_of) & taught}
    return [replace(q, id=f"neighbourhood:{q.id}", kind="neighbourhood")
            for q in questions if q.kind == "recall" and q.person_id in near - taught]


def build_plan(
    questions: Sequence[EvalItem],
    people: Mapping[str, Person],
    locality: Sequence[EvalItem] = (),
    probes: Sequence[EvalItem] = (),
    cap: int | None = None,
    turns: int = MULTI_TURN_TURNS,
    per_slot: int | None = None,
    taught: set[str] | None = None,
    max_conversations: int | None = None,
    splits: Sequence[str] = ("validation", "test"),
) -> SuitePlan:
    """Held-out questions (at most `per_slot` per kind, split and slot, across all people) plus interference,
    locality, unchanged, neighbourhood and hallucination items, at most `cap` per kind and split, and one
    multi-turn conversation per taught person (at most `max_conversations`) from the test split.

    `taught`: people the adapter learned; held-out questions about anyone else are not asked as recall (an
    untaught look-alike's become neighbourhood items). None: everyone in `people`.
    """
    taught = set(people) if taught is None else set(taught)
    rank = {pid: (0 if p.kind == "fictional" else 1) for pid, p in people.items()}
    in_splits = [q for q in questions if q.split in splits]
    held_out = [q for q in in_splits if q.kind in HELD_OUT_KINDS and q.person_id in taught]
    held_out = cap_per_kind_split(stratified(held_out, per_slot, rank), cap)
    others = [*neighbourhood_items(in_splits, people, taught),
              *(i for i in (*locality, *probes) if i.split in splits)]
    single = [*held_out, *interference_items(held_out, people), *cap_per_kind_split(others, cap)]
    person_order = sorted(taught & set(people), key=lambda pid: (rank[pid], pid))
    conversation_pool = [q for q in questions if q.split == "test" and q.kind in FACT_KINDS and q.person_id in taught]
    if "test" not in splits:
        conversation_pool = [q for q in in_splits if q.kind in FACT_KINDS and q.person_id in taught]
    groups = multi_turn_groups(conversation_pool, turns, max_conversations, person_order)
    return SuitePlan(tuple(single), tuple(tuple(g) for g in groups))


def answer_plan(generate: Generate, plan: SuitePlan, augment: Augment | None = None) -> dict[str, str]:
    """Answers to every item; identical prompts (e.g. interference items reusing a recall question) are
    generated once."""
    return answer_systems(generate, plan, {"": augment})[""]


def answer_systems(generate: Generate, plan: SuitePlan,
                   augments: Mapping[str, Augment | None]) -> dict[str, dict[str, str]]:
    """Answers of several systems that share one model (the base model alone and with retrieved memories):
    single items in one `generate` call, then the conversations turn by turn. System -> item id -> answer."""
    answers = answer_single(generate, plan.single, augments)
    for system, turns in run_conversations_for(generate, plan.groups, augments).items():
        answers[system].update(turns)
    return answers


def answer_single(generate: Generate, items: Sequence[EvalItem],
                  augments: Mapping[str, Augment | None]) -> dict[str, dict[str, str]]:
    """Every system's answer to each single item from one `generate` call, so the systems fill the same
    length-sorted batches; a prompt asked twice (an interference item reusing a recall question, a retrieval
    prompt with no memories, which is the base prompt) is generated once. System -> item id -> answer."""
    prompts = {system: [augment(item, item.messages()) if augment else item.messages() for item in items]
               for system, augment in augments.items()}
    unique: dict[str, Messages] = {}
    for per_system in prompts.values():
        for messages in per_system:
            unique.setdefault(json.dumps(messages, sort_keys=True), messages)
    keys = list(unique)
    outputs = generate([unique[k] for k in keys]) if keys else []
    if len(outputs) != len(keys):
        raise RuntimeError(f"generate returned {len(outputs)} answers for {len(keys)} prompts")
    by_key = dict(zip(keys, outputs, strict=True))
    return {system: {item.id: by_key[json.dumps(messages, sort_keys=True)]
                     for item, messages in zip(items, per_system, strict=True)}
            for system, per_system in prompts.items()}


def texts_to_embed(plan: SuitePlan, answers: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Every distinct answer and expected text the scorer compares."""
    texts = {item.expected for item in plan.items() if item.expected}
    for per_system in answers.values():
        texts.update(a for a in per_system.values() if a)
    return sorted(texts)


def score_plan(
    plan: SuitePlan,
    answers: Mapping[str, Mapping[str, str]],
    vectors: Mapping[str, Any],
    reference: str = "base",
    cuts: Mapping[str, Mapping[str, bool]] | None = None,
) -> dict[str, list[ItemScore]]:
    """Scores per system; locality, unchanged and neighbourhood compare each system with the `reference`
    system's answers. `cuts`: per system, item id -> whether the answer stopped at the token budget."""
    def sim(a: str | None, b: str | None) -> float | None:
        if not a or not b:
            return None if not b else 0.0
        return cosine(vectors.get(a), vectors.get(b))

    base_answers = answers.get(reference, {})
    out: dict[str, list[ItemScore]] = {}
    for system, given in answers.items():
        cut = (cuts or {}).get(system, {})
        scores = []
        for item in plan.single:
            answer = given[item.id]
            if item.kind in BASE_RELATIVE_KINDS:
                base = base_answers.get(item.id)
                if base is None:
                    raise KeyError(f"{item.kind} item {item.id!r} has no {reference!r} answer to compare with")
                scores.append(score_item(item, answer, sim(answer, item.expected), base, sim(base, item.expected),
                                         sim(answer, base), cut=cut.get(item.id)))
            else:
                scores.append(score_item(item, answer, sim(answer, item.expected), cut=cut.get(item.id)))
        for group in plan.groups:
            turn_answers = [given[item.id] for item in group]
            scores += score_multi_turn(group, turn_answers,
                                       [sim(a, i.expected) for a, i in zip(turn_answers, group, strict=True)],
                                       cuts=[cut.get(item.id) for item in group])
        out[system] = scores
    return out


def by_split(scores: Sequence[ItemScore], items: Mapping[str, EvalItem]) -> dict[str, list[ItemScore]]:
    """Scores grouped by their item's split (`validation`, `test`)."""
    out: dict[str, list[ItemScore]] = {"validation": [], "test": []}
    for s in scores:
        out.setdefault(items[s.item_id].split, []).append(s)
    return out


def fact_breakdown(scores: Sequence[ItemScore], items: Mapping[str, EvalItem], by: str) -> dict[str, dict[str, Any]]:
    """Pass rates of the held-out fact questions (recall and paraphrase) per `slot` or per `person`."""
    def key(s: ItemScore) -> str | None:
        item = items[s.item_id]
        if item.kind not in FACT_KINDS:
            return None
        return item.slot if by == "slot" else item.person_id
    return aggregate(scores, key)


def extras(scores: Sequence[ItemScore]) -> dict[str, float | None]:
    """Rates the leaderboard notes beside the pass rates: whole consistent conversations, unchanged locality
    answers, hedged hallucination probes."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for s in scores:
        if s.kind == "multi_turn":
            groups[str(s.details.get("group"))].append(s.passed)
    locality = [s for s in scores if s.kind == "locality"]
    probes = [s for s in scores if s.kind == "hallucination"]

    def rate(values: Sequence[bool]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    return {
        "conversations_all_turns_right": rate([all(v) for v in groups.values()]),
        "locality_unchanged": rate([bool(s.details.get("unchanged")) for s in locality]),
        "hallucination_hedged": rate([s.reason == "hedged" for s in probes]),
    }
