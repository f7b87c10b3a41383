"""The hippocampus: which candidate facts the model may learn, each decision with its reason and scores.

Order of the rules for one candidate (deterministic for the same inputs and store state):
1. reality check: a claim that disagrees with the trusted profile is REJECTed, or becomes a CORRECT to the
   profile's value when a stored memory holds a wrong value for that slot;
2. contradiction: the same person and slot with a different value -> CORRECT (the old memory is superseded);
   the same value -> MERGE (repetition strengthens the memory);
3. semantic near-duplicate (cosine >= threshold) of a memory of the same person with the same value ->
   MERGE; for free text, a near statement with the same wording but another number, date or name ->
   CORRECT;
4. importance gate: a fact the current model already knows (low answer loss) is REJECTed;
5. otherwise STORE.
Candidates of one batch see the decisions before them, so a fact repeated in the batch is stored once.

Importance (0-10) = 10 x min(1, category weight x teachability), teachability = 1 - exp(-NLL / scale),
NLL the current model's mean per-token loss of the answer given the question.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from sleeptrain_assets.lib.free_text import (
    extract_facts,
    mask_values,
    normalize_value,
    same_value,
    sentence_with,
    value_kind,
    values_in,
)
from sleeptrain_assets.lib.records import CandidateFact, Conversation, Decision, Memory, Person

ACTIONS = ("STORE", "REJECT", "CORRECT", "MERGE")
ROUTED = ("STORE", "REJECT", "CORRECT")
MAX_IMPORTANCE = 10.0
_PATH_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def memory_id(person_id: str, slot: str, value: object) -> str:
    """Deterministic id of the memory holding `value` for a person's slot (same inputs, same id)."""
    key = json.dumps([person_id, slot, normalize_value(value)], ensure_ascii=False)
    return "m" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]


def candidate_id(candidate: CandidateFact) -> str:
    return memory_id(candidate.person_id, candidate.slot, candidate.value)


def source_of(candidate: CandidateFact) -> str:
    return f"{candidate.conversation_id}#{candidate.turn_index}"


@dataclass(frozen=True)
class HippocampusRules:
    """Thresholds and weights of the hippocampus (importance on a 0-10 scale)."""

    near_duplicate_threshold: float = 0.92
    contradiction_similarity: float = 0.80
    nll_scale: float = 2.0
    default_teachability: float = 0.5
    min_importance: float = 0.5
    merge_bonus: float = 0.5
    category_weights: Mapping[str, float] = field(
        default_factory=lambda: {"fact": 1.0, "correction": 1.2, "identity": 0.8, "free_text": 0.9}
    )

    def __post_init__(self) -> None:
        for name in ("near_duplicate_threshold", "contradiction_similarity"):
            value = getattr(self, name)
            if not -1.0 <= value <= 1.0:
                raise ValueError(f"HippocampusRules.{name}={value} must be a cosine in [-1, 1]")
        if self.nll_scale <= 0:
            raise ValueError(f"HippocampusRules.nll_scale={self.nll_scale} must be > 0")
        if not 0.0 <= self.default_teachability <= 1.0:
            raise ValueError(f"HippocampusRules.default_teachability={self.default_teachability} must be in [0, 1]")
        bad = {k: v for k, v in self.category_weights.items() if not (v >= 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"HippocampusRules.category_weights: negative or non-finite weights {bad}")

    def weight(self, category: str) -> float:
        return float(self.category_weights.get(category, self.category_weights.get("fact", 1.0)))


# --------------------------------------------------------------------------- candidates


def candidates_from_conversations(
    conversations: Sequence[Conversation], profiles: Mapping[str, Person] | None = None
) -> list[CandidateFact]:
    """Candidate facts: every fact claim of an annotated turn, and the person's own statements in
    conversations that carry no annotations at all (free text, e.g. the inbox)."""
    candidates: list[CandidateFact] = []
    for conversation in conversations:
        annotated = any(t.provenance for t in conversation.turns)
        for index, turn in enumerate(conversation.turns):
            seen: set[tuple[str, str]] = set()
            if turn.provenance is not None:
                for claim in turn.provenance.facts:
                    key = (claim.slot, normalize_value(claim.value))
                    if key in seen:
                        continue
                    seen.add(key)
                    candidates.append(
                        CandidateFact(
                            person_id=turn.provenance.person_id,
                            slot=claim.slot,
                            value=str(claim.value),
                            text=sentence_with(turn.content, str(claim.value)),
                            claim=claim.claim,
                            conversation_id=conversation.id,
                            turn_index=index,
                            template_id=turn.provenance.template_id,
                        )
                    )
            elif not annotated and turn.role == "user":
                person = (profiles or {}).get(conversation.person_id)
                for fact in extract_facts(turn.content, person.name if person else None):
                    candidates.append(
                        CandidateFact(
                            person_id=conversation.person_id,
                            slot=fact.slot,
                            value=fact.value,
                            text=fact.sentence,
                            claim="true",
                            conversation_id=conversation.id,
                            turn_index=index,
                            template_id=None,
                        )
                    )
    return candidates


def profile_value(person: Person | None, slot: str) -> str | None:
    """The trusted profile's value for `slot` (a path under `facts`, or `name`), formatted, else None."""
    if person is None:
        return None
    if slot == "name":
        return person.name
    node: Any = person.facts
    tokens = _PATH_TOKEN.findall(slot)
    if not tokens:
        return None
    for name, idx in tokens:
        if name:
            node = node.get(name) if isinstance(node, Mapping) else None
        else:
            i = int(idx)
            node = node[i] if isinstance(node, list) and i < len(node) else None
        if node is None:
            return None
    if isinstance(node, (Mapping, list)):
        if isinstance(node, list) and node and all(not isinstance(v, (Mapping, list)) for v in node):
            return ", ".join(str(v) for v in node)
        return None
    if isinstance(node, bool):
        return "yes" if node else "no"
    text = str(node).strip()
    return text or None


def category_of(candidate: CandidateFact) -> str:
    if candidate.claim == "correction" or (candidate.template_id or "").startswith("correction"):
        return "correction"
    if candidate.template_id is None:
        return "free_text"
    if "identity" in candidate.template_id or candidate.slot == "name":
        return "identity"
    return "fact"


def _is_first_person(candidate: CandidateFact) -> bool:
    words = {w.strip(".,;:!?\"'").casefold() for w in candidate.text.split()}
    return bool(words & {"i", "my", "me", "i'm", "i’m", "we", "our"})


def loss_request(candidate: CandidateFact, question: str | None, name: str) -> tuple[list[dict[str, str]], str]:
    """(chat messages, answer) whose answer loss measures how well the current model knows the fact.

    A person's own words are scored under the persona prompt the training uses ("You are {name}.").
    """
    if _is_first_person(candidate):
        messages = [{"role": "system", "content": f"You are {name}."},
                    {"role": "user", "content": question or "Tell me about yourself."}]
    else:
        messages = [{"role": "user", "content": question or f"What do you know about {name}?"}]
    return messages, candidate.text


def loss_requests(
    candidates: Sequence[CandidateFact],
    conversations: Sequence[Conversation],
    profiles: Mapping[str, Person],
) -> dict[str, tuple[list[dict[str, str]], str]]:
    """One loss request per distinct memory a decision may write: each candidate's, and the profile's
    value wherever a claim disagrees with the profile (a CORRECT writes that one)."""
    turns = {(c.id, i): t for c in conversations for i, t in enumerate(c.turns)}
    requests: dict[str, tuple[list[dict[str, str]], str]] = {}
    for candidate in candidates:
        person = profiles.get(candidate.person_id)
        name = person.name if person else candidate.person_id
        turn = turns.get((candidate.conversation_id, candidate.turn_index))
        question = turn.provenance.question if turn is not None and turn.provenance is not None else None
        requests.setdefault(candidate_id(candidate), loss_request(candidate, question, name))
        truth = profile_value(person, candidate.slot)
        if truth is not None and not same_value(truth, candidate.value):
            fixed = corrected_candidate(candidate, truth, name)
            requests.setdefault(candidate_id(fixed), loss_request(fixed, question, name))
    return requests


def corrected_candidate(candidate: CandidateFact, truth: str, name: str | None = None) -> CandidateFact:
    """The candidate restated with the profile's value: its sentence edited where it states the value,
    or a plain statement when it was a question or does not name the value."""
    text = candidate.text
    if candidate.value and candidate.value in text and not text.rstrip().endswith("?"):
        text = text.replace(candidate.value, truth)
    else:
        text = f"{name or candidate.person_id}: {candidate.slot} is {truth}."
    return replace(candidate, value=truth, text=text, claim="correction")


# --------------------------------------------------------------------------- decisions


@dataclass
class _Held:
    """A memory as the batch sees it: stored before the run or written by an earlier decision."""

    id: str
    person_id: str
    slot: str
    value: str
    text: str
    importance: float
    vector: np.ndarray | None


class _State:
    def __init__(self, stored: Iterable[Memory]) -> None:
        self.by_slot: dict[tuple[str, str], _Held] = {}
        self.by_id: dict[str, _Held] = {}
        for memory in sorted(stored, key=lambda m: m.id):
            if memory.status != "active":
                continue
            vector = np.asarray(memory.embedding, dtype=np.float32) if memory.embedding else None
            self.put(_Held(memory.id, memory.person_id, memory.slot, memory.value, memory.text,
                           float(memory.importance), vector))

    def put(self, held: _Held) -> None:
        old = self.by_slot.get((held.person_id, held.slot))
        if old is not None and old.id != held.id:
            self.drop(old.id)
        self.by_slot[(held.person_id, held.slot)] = held
        self.by_id[held.id] = held

    def drop(self, mid: str) -> None:
        held = self.by_id.pop(mid, None)
        if held is not None and self.by_slot.get((held.person_id, held.slot)) is held:
            del self.by_slot[(held.person_id, held.slot)]

    def neighbours(self, person_id: str, vector: np.ndarray | None, exclude: str) -> list[tuple[_Held, float]]:
        if vector is None:
            return []
        rows = [h for h in self.by_id.values() if h.person_id == person_id and h.vector is not None and h.id != exclude]
        if not rows:
            return []
        sims = np.stack([h.vector for h in rows]) @ vector  # type: ignore[misc]
        order = sorted(range(len(rows)), key=lambda i: (-float(sims[i]), rows[i].id))
        return [(rows[i], float(sims[i])) for i in order]


def teachability(nll: float | None, rules: HippocampusRules) -> float:
    if nll is None or not math.isfinite(nll):
        return rules.default_teachability
    return 1.0 - math.exp(-max(0.0, nll) / rules.nll_scale)


def _fmt(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[: limit - 1] + "…")


def _conflicting_statement(candidate: CandidateFact, held: _Held) -> str | None:
    """Why a free-text statement contradicts a held one worded the same way, or None.

    Same wording once values are masked, and a different number, date or name: "I moved to Utrecht in
    2019" against "I moved to Utrecht in 2021".
    """
    if mask_values(candidate.text) != mask_values(held.text):
        return None
    ours, theirs = values_in(candidate.text), values_in(held.text)
    if not ours or ours == theirs:
        return None
    differ = sorted((ours - theirs) | (theirs - ours))
    return f"same statement with a different {value_kind(candidate.value)} ({', '.join(differ[:4])})"


def decide(
    candidates: Sequence[CandidateFact],
    profiles: Mapping[str, Person],
    stored: Iterable[Memory] = (),
    embeddings: np.ndarray | Sequence[Sequence[float]] | None = None,
    losses: Mapping[str, float] | None = None,
    rules: HippocampusRules | None = None,
    routing: Mapping[str, float] | None = None,
) -> list[Decision]:
    """One decision per candidate, in order.

    stored: the active memories of the people involved (with embeddings for near-duplicate checks).
    embeddings: unit vectors of the candidates' texts, row i for candidate i (None: no semantic checks).
    losses: answer NLL on the current model, keyed by memory id (see `loss_requests`).
    routing: Hedge probabilities for STORE/REJECT/CORRECT; they scale the importance gate by
    p(REJECT)/p(STORE) and settle contradictions no profile can arbitrate (CORRECT unless
    p(REJECT) > p(CORRECT)). None means uniform.
    """
    rules = rules or HippocampusRules()
    losses = losses or {}
    routing = dict(routing) if routing else {a: 1.0 / len(ROUTED) for a in ROUTED}
    vectors = None if embeddings is None else np.asarray(embeddings, dtype=np.float32)
    if vectors is not None and len(vectors) != len(candidates):
        raise ValueError(f"embeddings has {len(vectors)} rows for {len(candidates)} candidates")
    p_store, p_reject, p_correct = (max(routing.get(a, 0.0), 1e-9) for a in ROUTED)
    gate = rules.min_importance * min(10.0, max(0.1, p_reject / p_store))
    state = _State(stored)
    decisions: list[Decision] = []

    for i, candidate in enumerate(candidates):
        vector = None if vectors is None else vectors[i]
        person = profiles.get(candidate.person_id)
        category = category_of(candidate)
        weight = rules.weight(category)

        def importance_of(mid: str) -> tuple[float, dict[str, float]]:
            nll = losses.get(mid)
            t = teachability(nll, rules)
            value = round(MAX_IMPORTANCE * min(1.0, weight * t), 4)
            scores = {"importance": value, "teachability": round(t, 4), "category_weight": weight, "gate": round(gate, 4)}
            if nll is not None and math.isfinite(nll):
                scores["nll"] = round(float(nll), 4)
            return value, scores

        def explain(value: float, parts: Mapping[str, float]) -> str:
            source = f" from answer NLL {parts['nll']:.2f}" if "nll" in parts else ", no loss measured"
            return (f"importance {value:.2f} ({category} weight {weight:g} x teachability "
                    f"{parts['teachability']:.2f}{source})")

        mid = candidate_id(candidate)
        importance, scores = importance_of(mid)
        why_importance = explain(importance, scores)

        def decision(action: str, reason: str, **kw: Any) -> None:
            decisions.append(Decision(action=action, candidate=kw.pop("candidate", candidate), reason=reason,
                                      importance=kw.pop("importance", importance), scores=dict(scores), **kw))

        # 1. reality check against the trusted profile
        truth = profile_value(person, candidate.slot)
        held = state.by_slot.get((candidate.person_id, candidate.slot))
        if truth is not None:
            agrees = same_value(truth, candidate.value)
            scores["profile_agrees"] = 1.0 if agrees else 0.0
            if not agrees:
                claim = f"claim {candidate.slot} = {_fmt(candidate.value)} contradicts the trusted profile ({_fmt(truth)})"
                if held is not None and not same_value(held.value, truth):
                    fixed = corrected_candidate(candidate, truth, person.name if person else None)
                    fixed_id = candidate_id(fixed)
                    fixed_importance, fixed_scores = importance_of(fixed_id)
                    scores = {**fixed_scores, "profile_agrees": 0.0}
                    decision("CORRECT", f"{claim}; stored memory {held.id} holds {_fmt(held.value)}, so it is "
                             f"replaced by the profile's value; {explain(fixed_importance, fixed_scores)}",
                             candidate=fixed, importance=fixed_importance, memory_id=fixed_id, superseded_id=held.id)
                    state.put(_Held(fixed_id, candidate.person_id, candidate.slot, truth, fixed.text,
                                    fixed_importance, vector))
                else:
                    tail = "; the store already holds the profile's value" if held is not None else ""
                    decision("REJECT", f"{claim}{tail}", memory_id=mid)
                continue
        elif candidate.claim == "wrong":
            decision("REJECT", f"claim {candidate.slot} = {_fmt(candidate.value)} is marked false by its template "
                     f"({candidate.template_id}) and no profile value confirms it", memory_id=mid)
            continue

        # 2. the same person and slot
        if held is not None:
            if same_value(held.value, candidate.value):
                merged = round(min(MAX_IMPORTANCE, max(held.importance, importance) + rules.merge_bonus), 4)
                scores["merged_importance"] = merged
                decision("MERGE", f"same fact as {held.id} ({candidate.slot} = {_fmt(held.value)}) seen again in "
                         f"{source_of(candidate)}; importance {held.importance:.2f} -> {merged:.2f}",
                         importance=merged, memory_id=held.id)
                held.importance = merged
                continue
            arbiter = "the trusted profile agrees with the new value" if truth is not None else "no profile value"
            if truth is None and p_reject > p_correct:
                decision("REJECT", f"contradicts stored memory {held.id} ({candidate.slot} = {_fmt(held.value)}); "
                         f"{arbiter}, and routing (p_reject {p_reject:.2f} > p_correct {p_correct:.2f}) keeps "
                         "the stored value", memory_id=mid)
                continue
            decision("CORRECT", f"contradicts stored memory {held.id} ({candidate.slot} = {_fmt(held.value)} -> "
                     f"{_fmt(candidate.value)}); {arbiter}, so the old memory is superseded; {why_importance}",
                     memory_id=mid, superseded_id=held.id)
            state.put(_Held(mid, candidate.person_id, candidate.slot, candidate.value, candidate.text,
                            importance, vector))
            continue

        # 3. semantic near-duplicates among the person's memories
        settled = False
        for other, similarity in state.neighbours(candidate.person_id, vector, exclude=mid):
            if similarity < min(rules.near_duplicate_threshold, rules.contradiction_similarity):
                break
            if similarity >= rules.near_duplicate_threshold and same_value(other.value, candidate.value):
                merged = round(min(MAX_IMPORTANCE, max(other.importance, importance) + rules.merge_bonus), 4)
                scores.update(similarity=round(similarity, 4), merged_importance=merged)
                decision("MERGE", f"near-duplicate (cosine {similarity:.3f}) of {other.id} ({other.slot} = "
                         f"{_fmt(other.value)}), same value; importance {other.importance:.2f} -> {merged:.2f}",
                         importance=merged, memory_id=other.id)
                other.importance = merged
                settled = True
                break
            if candidate.template_id is None and similarity >= rules.contradiction_similarity:
                conflict = _conflicting_statement(candidate, other)
                if conflict is None:
                    continue
                scores["similarity"] = round(similarity, 4)
                if p_reject > p_correct:
                    decision("REJECT", f"{conflict} than stored memory {other.id} (cosine {similarity:.3f}); "
                             f"routing (p_reject {p_reject:.2f} > p_correct {p_correct:.2f}) keeps the stored one",
                             memory_id=mid)
                else:
                    decision("CORRECT", f"{conflict} than stored memory {other.id} ({_fmt(other.text)}, cosine "
                             f"{similarity:.3f}), so it is superseded; {why_importance}",
                             memory_id=mid, superseded_id=other.id)
                    state.drop(other.id)
                    state.put(_Held(mid, candidate.person_id, candidate.slot, candidate.value, candidate.text,
                                    importance, vector))
                settled = True
                break
        if settled:
            continue

        # 4. the importance gate, 5. store
        if importance < gate and candidate.claim != "correction":
            decision("REJECT", f"the current model already knows this: {why_importance} is below the gate "
                     f"{gate:.2f}", memory_id=mid)
            continue
        checked = "matches the trusted profile" if truth is not None else "no profile value to check"
        decision("STORE", f"new fact {candidate.slot} = {_fmt(candidate.value)} ({checked}); {why_importance}",
                 memory_id=mid)
        state.put(_Held(mid, candidate.person_id, candidate.slot, candidate.value, candidate.text,
                        importance, vector))
    return decisions


def decision_texts(decisions: Sequence[Decision]) -> list[str]:
    """The text each decision's memory holds (what must be embedded to apply the decisions)."""
    return [d.candidate.text for d in decisions]


def summarize(decisions: Sequence[Decision]) -> dict[str, int]:
    counts = {a: 0 for a in ACTIONS}
    for d in decisions:
        counts[d.action] = counts.get(d.action, 0) + 1
    return counts


__all__ = [
    "ACTIONS",
    "HippocampusRules",
    "candidate_id",
    "candidates_from_conversations",
    "category_of",
    "corrected_candidate",
    "decide",
    "decision_texts",
    "loss_request",
    "loss_requests",
    "memory_id",
    "profile_value",
    "same_value",
    "source_of",
    "summarize",
    "teachability",
]
