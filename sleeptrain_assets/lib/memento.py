"""Memento consolidation: promote strong memories, evict weak ones, merge near-duplicates, each with a reason.

Pure policy: it reads memories and returns actions; the memory store applies and logs them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from sleeptrain_assets.lib.free_text import same_value
from sleeptrain_assets.lib.records import Memory

OPS = ("MERGE", "EVICT", "PROMOTE")


@dataclass(frozen=True)
class MementoPolicy:
    """Thresholds on the hippocampus' 0-10 importance scale and on cosine similarity."""

    promote_threshold: float = 7.0
    evict_threshold: float = 1.0
    merge_similarity_threshold: float = 0.92

    def __post_init__(self) -> None:
        if self.evict_threshold > self.promote_threshold:
            raise ValueError(
                f"MementoPolicy.evict_threshold={self.evict_threshold} is above "
                f"promote_threshold={self.promote_threshold}"
            )
        if not -1.0 <= self.merge_similarity_threshold <= 1.0:
            raise ValueError(f"MementoPolicy.merge_similarity_threshold={self.merge_similarity_threshold} "
                             "must be a cosine in [-1, 1]")


@dataclass(frozen=True)
class MementoAction:
    op: str  # MERGE | EVICT | PROMOTE
    memory_id: str
    person_id: str
    reason: str
    score: float  # importance, or the cosine for a MERGE
    into: str | None = None  # the memory a MERGE folds this one into


def _rank(memory: Memory) -> tuple[float, str, str]:
    """Keep order: higher importance first, then the older memory, then the id."""
    return (-memory.importance, memory.created_at, memory.id)


def consolidate(
    memories: Sequence[Memory], policy: MementoPolicy | None = None, promoted: Collection[str] = ()
) -> list[MementoAction]:
    """Actions for the active memories: MERGE near-duplicates with the same value into the stronger one,
    then EVICT what stays below the evict threshold and PROMOTE (once) what reaches the promote threshold.

    Deterministic: memories are visited in a fixed order and ties break on creation time and id.
    """
    policy = policy or MementoPolicy()
    promoted = set(promoted)
    actions: list[MementoAction] = []
    by_person: dict[str, list[Memory]] = defaultdict(list)
    for memory in memories:
        if memory.status == "active":
            by_person[memory.person_id].append(memory)

    for person_id in sorted(by_person):
        kept: list[Memory] = []
        comparable: list[Memory] = []  # kept memories with an embedding
        vectors: list[np.ndarray] = []
        for memory in sorted(by_person[person_id], key=_rank):
            vector = np.asarray(memory.embedding, dtype=np.float32) if memory.embedding else None
            target: tuple[Memory, float] | None = None
            if vector is not None and vectors:
                sims = np.stack(vectors) @ vector
                for j in np.argsort(-sims, kind="stable"):
                    if sims[j] < policy.merge_similarity_threshold:
                        break
                    if same_value(comparable[j].value, memory.value):
                        target = (comparable[j], float(sims[j]))
                        break
            if target is not None:
                into, sim = target
                actions.append(MementoAction(
                    "MERGE", memory.id, person_id,
                    f"near-duplicate of {into.id} (cosine {sim:.3f} >= {policy.merge_similarity_threshold}) "
                    f"with the same value {memory.value!r}; {into.id} is kept (importance "
                    f"{into.importance:.2f} >= {memory.importance:.2f})",
                    round(sim, 4), into=into.id))
                continue
            kept.append(memory)
            if vector is not None:
                comparable.append(memory)
                vectors.append(vector)
        for memory in sorted(kept, key=lambda m: m.id):
            if memory.id in promoted:
                continue
            if memory.importance < policy.evict_threshold:
                actions.append(MementoAction(
                    "EVICT", memory.id, person_id,
                    f"importance {memory.importance:.2f} is below the evict threshold {policy.evict_threshold}",
                    round(memory.importance, 4)))
            elif memory.importance >= policy.promote_threshold:
                actions.append(MementoAction(
                    "PROMOTE", memory.id, person_id,
                    f"importance {memory.importance:.2f} reaches the promote threshold {policy.promote_threshold}",
                    round(memory.importance, 4)))
    return actions


def summarize(actions: Sequence[MementoAction]) -> dict[str, int]:
    counts = {op: 0 for op in OPS}
    for action in actions:
        counts[action.op] += 1
    return counts
