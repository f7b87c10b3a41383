"""Invariants of a training queue; each returns the offending items so a failed check says which and why."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sleeptrain_assets.lib.records import Conversation, EvalItem
from sleeptrain_assets.lib.templating import conversation_text

_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Problem:
    item: str
    why: str


def _normalize(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = _normalize(text).split()
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def exact_duplicates(conversations: Sequence[Conversation]) -> list[Problem]:
    seen: dict[str, str] = {}
    problems = []
    for conv in conversations:
        key = _normalize(conversation_text(conv))
        if key in seen:
            problems.append(Problem(conv.id, f"exact duplicate of {seen[key]}"))
        else:
            seen[key] = conv.id
    return problems


def near_duplicates(conversations: Sequence[Conversation], threshold: float) -> list[Problem]:
    """Pairs of one person's conversations whose word-trigram Jaccard similarity reaches `threshold`."""
    problems = []
    by_person: dict[str, list[tuple[str, set]]] = defaultdict(list)
    for conv in conversations:
        by_person[conv.person_id].append((conv.id, _shingles(conversation_text(conv))))
    for items in by_person.values():
        for i, (id_a, sh_a) in enumerate(items):
            for id_b, sh_b in items[i + 1 :]:
                union = len(sh_a | sh_b)
                sim = len(sh_a & sh_b) / union if union else 1.0
                if sim >= threshold:
                    problems.append(Problem(id_b, f"near duplicate of {id_a} (similarity {sim:.2f} >= {threshold})"))
    return problems


def person_counts(conversations: Sequence[Conversation]) -> Counter:
    return Counter(c.person_id for c in conversations)


def person_imbalance(conversations: Sequence[Conversation], max_ratio: float) -> list[Problem]:
    """Most- to least-represented person (by turns stating facts) must stay within `max_ratio`."""
    facts = Counter(c.person_id for c in conversations for _ in c.facts())
    if not facts:
        return [Problem("queue", "no conversation states any fact")]
    (top, most), (low, least) = facts.most_common(1)[0], min(facts.items(), key=lambda kv: kv[1])
    ratio = most / max(least, 1)
    if ratio > max_ratio:
        return [Problem(low, f"has {least} fact turns against {most} for {top}: ratio {ratio:.2f} > {max_ratio}")]
    return []


def paraphrase_coverage(conversations: Sequence[Conversation], k: int) -> list[Problem]:
    """Every true fact must be asked in at least `k` different question forms."""
    forms: dict[tuple[str, str], set[str]] = defaultdict(set)
    for conv in conversations:
        for turn, fact in conv.facts():
            if fact.claim == "true":
                forms[(conv.person_id, fact.slot)]
                if turn.provenance and turn.provenance.question:
                    forms[(conv.person_id, fact.slot)].add(turn.provenance.question)
    return [
        Problem(f"{person}:{slot}", f"asked in {len(qs)} question form(s), needs {k}")
        for (person, slot), qs in sorted(forms.items())
        if len(qs) < k
    ]


def interleaving(conversations: Sequence[Conversation], max_run: int) -> list[Problem]:
    """No more than `max_run` consecutive conversations of one person."""
    problems = []
    run, prev = 0, None
    for index, conv in enumerate(conversations):
        run = run + 1 if conv.person_id == prev else 1
        prev = conv.person_id
        if run == max_run + 1:
            problems.append(Problem(conv.id, f"position {index}: {run} conversations of {prev} in a row (max {max_run})"))
    return problems


def evaluation_leaks(conversations: Sequence[Conversation], items: Sequence[EvalItem]) -> list[Problem]:
    """No held-out evaluation question may appear in any training turn, alone or inside a longer turn."""
    held = [(_normalize(i.question), i.id) for i in items]
    problems = []
    for conv in conversations:
        for turn in conv.turns:
            text = _normalize(turn.content)
            for question, item in held:
                if question and question in text:
                    problems.append(Problem(conv.id, f"turn {turn.content!r} holds evaluation question {item}"))
    return problems


def over_length(
    conversations: Sequence[Conversation], count_tokens: Callable[[list[dict[str, str]]], int], max_len: int
) -> tuple[list[Problem], int]:
    """Conversations whose chat-template rendering exceeds `max_len` tokens; also the longest length seen."""
    problems, longest = [], 0
    for conv in conversations:
        n = count_tokens(conv.messages())
        longest = max(longest, n)
        if n > max_len:
            problems.append(Problem(conv.id, f"{n} tokens with the chat template > max length {max_len}"))
    return problems, longest


def describe(problems: Sequence[Problem], limit: int = 20) -> str:
    lines = [f"{p.item}: {p.why}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return "\n".join(lines)
