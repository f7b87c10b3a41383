"""The training set of one consolidation: new QA pairs interleaved across people, plus replay ("dream").

Replay has two parts, both drawn deterministically from the seed:
(a) QA pairs of older memories, most important first, so a later cycle does not erase earlier ones;
(b) general prompts answered by the base model itself, so behaviour nobody taught stays as it was.
The answers for (b) come from the model resource; this module only picks prompts, cleans answers and mixes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sleeptrain_assets.lib.records import PROFILE_CATEGORY, Memory, QAPair

NEW = "new"
REPLAY_MEMORY = "replay_memory"
REPLAY_GENERAL = "replay_general"
SELF_TAUGHT = "self_taught"  # the model's own reward-checked answers to new facts' questions (lib/self_training.py)
GENERAL_GROUP = "*general*"

T = TypeVar("T")
# One supervised position's teacher: the base model's top-k token ids and their log-probs, best first.
TeacherPosition = tuple[tuple[int, ...], tuple[float, ...]]


@dataclass(frozen=True)
class TrainingExample:
    """One chat whose last message is the assistant answer the loss is taken on."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    source: str  # new | replay_memory | replay_general | self_taught
    person_id: str | None = None
    fact: str | None = None  # "<person>:<slots>" for fact pairs: paraphrases of one fact share it
    category: str | None = None  # the pair's template category (fact | correction | identity | profile)
    # Replay of general prompts: the base model's distribution at each supervised position (answer tokens and
    # end-of-turn), for the locality term; None for everything else.
    teacher: tuple[TeacherPosition, ...] | None = None
    # Loss weight of the answer's tokens: 1 for templated and replayed examples, the reward share for
    # self-taught ones (lib/self_training.py).
    weight: float = 1.0

    @property
    def answer(self) -> str:
        return self.messages[-1][1]

    def prompt_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages[:-1]]

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "messages": [list(m) for m in self.messages],
            "source": self.source,
            "person_id": self.person_id,
            "fact": self.fact,
            "category": self.category,
        }
        if self.teacher is not None:
            data["teacher"] = [[list(ids), list(logprobs)] for ids, logprobs in self.teacher]
        if self.weight != 1.0:
            data["weight"] = self.weight
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingExample:
        """The inverse of `to_dict` (a training job sent to a worker carries its examples this way)."""
        return cls(
            messages=tuple((str(role), str(content)) for role, content in data["messages"]),
            source=str(data["source"]),
            person_id=data.get("person_id"),
            fact=data.get("fact"),
            category=data.get("category"),
            teacher=teacher_from_lists(data["teacher"]) if data.get("teacher") is not None else None,
            weight=float(data.get("weight", 1.0)),
        )


def teacher_from_lists(positions: Sequence[Sequence[Sequence[float]]]) -> tuple[TeacherPosition, ...]:
    """Teacher positions from their JSON form ([[ids], [log-probs]] per position)."""
    return tuple((tuple(int(t) for t in ids), tuple(float(v) for v in logprobs)) for ids, logprobs in positions)


@dataclass(frozen=True)
class ReplayTarget:
    """A general prompt, the base model's own (cleaned) answer to it, and its distribution along that answer."""

    prompt: str
    answer: str
    teacher: tuple[TeacherPosition, ...]


@dataclass(frozen=True)
class ReplayTargets:
    """What replay keeps the adapter close to: base-model answers and top-k log-probs on the replay prompts."""

    targets: tuple[ReplayTarget, ...]
    base_sha256: str
    top_k: int
    max_new_tokens: int
    prompts_sha256: str
    unusable: tuple[str, ...] = ()  # prompts whose answer had no complete sentence within the token limit

    def answers(self) -> list[tuple[str, str, tuple[TeacherPosition, ...]]]:
        return [(t.prompt, t.answer, t.teacher) for t in self.targets]

    def pick(self, n: int, seed: int) -> list[ReplayTarget]:
        """`n` distinct targets in a seeded order (see `pick_general_prompts`)."""
        by_prompt = {t.prompt: t for t in self.targets}
        return [by_prompt[p] for p in pick_general_prompts(list(by_prompt), n, seed)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_sha256": self.base_sha256, "top_k": self.top_k, "max_new_tokens": self.max_new_tokens,
            "prompts_sha256": self.prompts_sha256, "unusable": list(self.unusable),
            "targets": [{"prompt": t.prompt, "answer": t.answer,
                         "teacher": [[list(i), list(v)] for i, v in t.teacher]} for t in self.targets],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplayTargets:
        return cls(
            targets=tuple(ReplayTarget(str(t["prompt"]), str(t["answer"]), teacher_from_lists(t["teacher"]))
                          for t in data["targets"]),
            base_sha256=str(data["base_sha256"]), top_k=int(data["top_k"]),
            max_new_tokens=int(data["max_new_tokens"]), prompts_sha256=str(data["prompts_sha256"]),
            unusable=tuple(data.get("unusable", ())),
        )


def prompts_sha256(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class TrainingSet:
    examples: tuple[TrainingExample, ...]
    data_hash: str
    seed: int

    def __len__(self) -> int:
        return len(self.examples)

    def stats(self) -> dict[str, Any]:
        sources = Counter(e.source for e in self.examples)
        new = [e for e in self.examples if e.source == NEW]
        per_fact = Counter(e.fact for e in new if e.fact and e.category != PROFILE_CATEGORY)
        return {
            "examples": len(self.examples),
            "by_source": dict(sorted(sources.items())),
            "people": len({e.person_id for e in self.examples if e.person_id}),
            "facts": len(per_fact),
            "profiles": sum(e.category == PROFILE_CATEGORY for e in new),
            "min_paraphrases_per_fact": min(per_fact.values(), default=0),
            "mean_paraphrases_per_fact": round(sum(per_fact.values()) / len(per_fact), 2) if per_fact else 0.0,
            "longest_run_of_one_person": longest_run(group_key(e) for e in self.examples),
            "replay_share": round((sources.get(REPLAY_MEMORY, 0) + sources.get(REPLAY_GENERAL, 0))
                                  / len(self.examples), 3) if self.examples else 0.0,
        }


def example_from_pair(pair: QAPair, source: str = NEW) -> TrainingExample:
    fact = f"{pair.person_id}:{','.join(pair.slots)}" if pair.slots else None
    return TrainingExample(
        messages=tuple((m["role"], m["content"]) for m in pair.messages()),
        source=source,
        person_id=pair.person_id,
        fact=fact,
        category=pair.category,
    )


def example_from_prompt(
    prompt: str, answer: str, teacher: tuple[TeacherPosition, ...] | None = None
) -> TrainingExample:
    return TrainingExample(
        messages=(("user", prompt), ("assistant", answer)), source=REPLAY_GENERAL, teacher=teacher
    )


def group_key(example: TrainingExample) -> str:
    return example.person_id or GENERAL_GROUP


def replay_counts(n_new: int, replay_share: float, n_older: int, n_general: int,
                  older_facts: int = 0) -> tuple[int, int]:
    """How many (older-memory, general) replay examples make up `replay_share` of the final set.

    The budget is split evenly. Older pairs are never repeated, so a short supply hands the rest to the
    general part, which may repeat its answers (they are the model's own: repeating them only weighs
    "keep behaving as before" more). With no general answers at all, older pairs take what they can.
    `older_facts`: replay at least one pair of each of that many older facts, beyond the budget, but never more
    older pairs than new ones (a sleep cycle's small training set would otherwise overwrite the facts it does
    not replay; measured in docs/ARCHITECTURE.md).
    """
    if not 0.0 <= replay_share < 1.0:
        raise ValueError(f"replay_share must be in [0, 1), got {replay_share}")
    budget = round(n_new * replay_share / (1.0 - replay_share))
    floor = min(older_facts, n_new)
    if n_general == 0:
        return min(n_older, max(budget, floor)), 0
    older = min(n_older, math.ceil(budget / 2))
    return min(n_older, max(older, floor)), budget - older


def memory_key(memory: Memory) -> str:
    """Identity of a memory as trained: its id plus its value, so a corrected value counts as new."""
    return f"{memory.id}:{hashlib.sha256(memory.value.encode()).hexdigest()[:12]}"


def split_memories(memories: Sequence[Memory], trained: Iterable[str]) -> tuple[list[Memory], list[Memory]]:
    """(new, older): memories not yet in the adapter's weights, and those that are (by `memory_key`)."""
    known = set(trained)
    active = [m for m in memories if m.status == "active"]
    return [m for m in active if memory_key(m) not in known], [m for m in active if memory_key(m) in known]


def pair_importance(pairs: Sequence[QAPair], memories: Sequence[Memory]) -> list[tuple[QAPair, float]]:
    """Each pair with the highest importance among the memories of its person and slots."""
    weight = {(m.person_id, m.slot): m.importance for m in memories}
    return [
        (p, max((weight.get((p.person_id, s), 0.0) for s in p.slots), default=0.0)) for p in pairs
    ]


def select_older_pairs(older: Sequence[tuple[QAPair, float]], n: int, seed: int) -> list[QAPair]:
    """`n` pairs of older memories, most important facts first, one paraphrase per fact per round.

    Going round by round spreads replay over many facts instead of spending it on every paraphrase of the
    single most important one; ties in importance are broken by the seed, not by input order.
    """
    if n <= 0 or not older:
        return []
    rng = random.Random(f"older:{seed}")
    by_fact: dict[tuple[str, tuple[str, ...]], list[QAPair]] = defaultdict(list)
    importance: dict[tuple[str, tuple[str, ...]], float] = {}
    for pair, weight in older:
        key = (pair.person_id, tuple(pair.slots))
        by_fact[key].append(pair)
        importance[key] = max(importance.get(key, float("-inf")), float(weight))
    facts = sorted(by_fact)
    rng.shuffle(facts)
    facts.sort(key=lambda k: -importance[k])
    for key in facts:
        rng.shuffle(by_fact[key])
    chosen: list[QAPair] = []
    round_index = 0
    while len(chosen) < n:
        added = False
        for key in facts:
            if round_index < len(by_fact[key]):
                chosen.append(by_fact[key][round_index])
                added = True
                if len(chosen) == n:
                    break
        if not added:
            break
        round_index += 1
    return chosen


def pick_general_prompts(prompts: Sequence[str], n: int, seed: int) -> list[str]:
    """`n` distinct prompts in a seeded order (the model only has to answer these)."""
    unique = list(dict.fromkeys(prompts))
    random.Random(f"general:{seed}").shuffle(unique)
    return unique[: max(0, n)]


_SENTENCE_END = re.compile(r"[.!?)\]\"'](?=\s|$)")


def usable_answer(text: str, min_chars: int = 12) -> str | None:
    """A generated answer cut back to its last complete sentence, or None if nothing complete remains.

    Generation stops at a token limit; training on a cut-off sentence would teach the model to stop
    mid-sentence, which is exactly the untaught behaviour replay is meant to keep.
    """
    text = text.strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not ends:
        return None
    trimmed = text[: ends[-1]].strip()
    return trimmed if len(trimmed) >= min_chars else None


def interleave(items: Sequence[T], key: Any, seed: int) -> list[T]:
    """Order items so each key's items are spread evenly over the whole sequence.

    Item j of a group with n items sits at (j + offset) / n; groups get offsets spaced 1/G apart in a seeded
    order, so equal-sized groups alternate strictly and a dominant group is broken up by every other one
    instead of being left over as one long run at the end.
    """
    rng = random.Random(f"interleave:{seed}")
    groups: dict[Hashable, list[T]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    names = sorted(groups, key=str)
    rng.shuffle(names)
    placed: list[tuple[float, int, T]] = []
    for rank, name in enumerate(names):
        members = groups[name]
        rng.shuffle(members)
        offset = (rank + 0.5) / len(names)
        placed += [((j + offset) / len(members), rank, item) for j, item in enumerate(members)]
    placed.sort(key=lambda t: (t[0], t[1]))
    return [item for _, _, item in placed]


def longest_run(keys: Iterable[Hashable]) -> int:
    best = run = 0
    previous: Hashable = object()
    for k in keys:
        run = run + 1 if k == previous else 1
        best = max(best, run)
        previous = k
    return best


def data_hash(examples: Sequence[TrainingExample]) -> str:
    payload = json.dumps([e.to_dict() for e in examples], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def build_training_set(
    new_pairs: Sequence[QAPair],
    older_pairs: Sequence[tuple[QAPair, float]] = (),
    general_answers: Sequence[tuple[str, str] | tuple[str, str, tuple[TeacherPosition, ...]]] = (),
    *,
    replay_share: float = 0.25,
    seed: int = 7,
    self_taught: Sequence[TrainingExample] = (),
    replay_every_older_fact: bool = False,
) -> TrainingSet:
    """New pairs (every paraphrase) + importance-ranked older pairs + base-model answers, interleaved.

    older_pairs: (pair, importance) for memories already in the weights; general_answers: (prompt, answer) or
    (prompt, answer, teacher) from the base model, already cleaned with `usable_answer`. Replay fills
    `replay_share` of the templated set (see `replay_counts`; with `replay_every_older_fact`, at least one pair
    of every older fact, up to as many as the new pairs). self_taught: extra weighted examples of the new facts
    in the model's own words, added as they are.
    """
    if not new_pairs:
        raise ValueError("build_training_set: no new QA pairs to train on")
    for i, pair in enumerate(new_pairs):
        if not pair.question.strip() or not pair.answer.strip():
            raise ValueError(
                f"new_pairs[{i}] ({pair.person_id}/{pair.template_id}): empty question or answer"
            )
    by_prompt = {g[0].strip(): (g[1].strip(), g[2] if len(g) > 2 else None) for g in general_answers}
    general = [(q, a, t) for q, (a, t) in sorted(by_prompt.items()) if q and a]
    random.Random(f"general-mix:{seed}").shuffle(general)
    n_older, n_general = replay_counts(len(new_pairs), replay_share, len(older_pairs), len(general),
                                       older_facts=len({(p.person_id, p.slots) for p, _ in older_pairs})
                                       if replay_every_older_fact else 0)
    examples = [example_from_pair(p) for p in new_pairs]
    examples += [example_from_pair(p, REPLAY_MEMORY) for p in select_older_pairs(older_pairs, n_older, seed)]
    examples += [example_from_prompt(*general[i % len(general)]) for i in range(n_general)]
    examples += list(self_taught)
    ordered = interleave(examples, group_key, seed)
    return TrainingSet(examples=tuple(ordered), data_hash=data_hash(ordered), seed=seed)


def load_replay_prompts(path: Path) -> list[str]:
    """The `prompts:` list of a replay-prompt YAML file; errors name the file and entry."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot read replay prompts ({exc})") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list):
        raise ValueError(f"{path}: expected a mapping with a `prompts:` list")
    prompts: list[str] = []
    for i, item in enumerate(data["prompts"]):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{path}: prompts[{i}] must be a non-empty string, got {item!r}")
        prompts.append(item.strip())
    duplicates = [p for p, c in Counter(prompts).items() if c > 1]
    if duplicates:
        raise ValueError(f"{path}: duplicate prompts {duplicates[:3]}")
    return prompts
