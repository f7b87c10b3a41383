"""The records that flow between SleepTrain's stages (plain dataclasses, JSON-friendly)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Person:
    """One people profile: trusted facts (nested as in SleepTrain v2) plus wrong values for tests."""

    id: str
    name: str
    facts: dict[str, Any]
    wrong_values: dict[str, list[Any]] = field(default_factory=dict)
    kind: str = "real"  # "real" (public figure) or "fictional"
    lookalike_of: tuple[str, ...] = ()
    source: str = ""  # file the profile came from

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lookalike_of"] = list(self.lookalike_of)
        return data


@dataclass(frozen=True)
class FactClaim:
    """One fact a turn states: `slot` is the path under `facts` (e.g. ``birth.year``)."""

    slot: str
    value: str
    claim: str = "true"  # "true": agrees with the profile; "wrong": a false claim; "correction": fixes one


@dataclass(frozen=True)
class Provenance:
    """Where a turn came from, so later stages can audit it."""

    person_id: str
    template_id: str
    facts: tuple[FactClaim, ...] = ()
    question: str | None = None  # the question form that prompted this turn, if any


@dataclass(frozen=True)
class Turn:
    role: str  # "system", "user" or "assistant"
    content: str
    provenance: Provenance | None = None


@dataclass(frozen=True)
class Conversation:
    id: str
    person_id: str
    mode: str  # interview | end_summary | inline_summary | correction | inbox
    turns: tuple[Turn, ...]

    def messages(self) -> list[dict[str, str]]:
        """Chat messages as a tokenizer's chat template expects them."""
        return [{"role": t.role, "content": t.content} for t in self.turns]

    def facts(self) -> list[tuple[Turn, FactClaim]]:
        return [(t, f) for t in self.turns if t.provenance for f in t.provenance.facts]


@dataclass(frozen=True)
class EvalItem:
    """A held-out question; it never enters training.

    kind: recall (held-out question form of a trained fact), paraphrase (a wording never trained),
    correction (a wrong claim to deny), confirmation (a true claim to confirm: the control beside each
    correction), identity (who-are-you, persona), multi_turn (one turn of a 6-turn probe), locality
    (general questions the base model answers right), unchanged (the adapter's answer says what the base
    model's does), neighbourhood (facts of people never taught), interference, hallucination.
    split: ``validation`` (choosing defaults, early stopping, promotion gates) or ``test`` (reported only).
    competing_values: wrong values of the item's slot (other people's values, the person's listed wrong
    values); an answer that states one fails. other_values: the person's values of other slots; a keyword hit
    that lies only inside one of them ("Leuven" in "KU Leuven") is no evidence.
    """

    id: str
    kind: str
    person_id: str | None
    template_id: str
    category: str
    question: str
    expected: str
    keywords: tuple[str, ...]
    slot: str | None = None
    value: str | None = None
    wrong_value: str | None = None
    system: str | None = None  # persona system prompt ("You are X.") for first-person items
    group: str | None = None  # items sharing a group are asked as one multi-turn conversation
    split: str = "test"
    competing_values: tuple[str, ...] = ()
    other_values: tuple[str, ...] = ()

    def messages(self) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.question}]


# The category of a pair whose answer tells all of a person's facts (`templating.profile_pairs`).
PROFILE_CATEGORY = "profile"


@dataclass(frozen=True)
class QAPair:
    """A trainable question/answer about one person: one fact slot from a template, or a whole profile."""

    person_id: str
    template_id: str
    category: str
    question: str
    answer: str
    slots: tuple[str, ...]
    values: tuple[str, ...]
    system: str | None = None

    def messages(self) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": self.answer},
        ]


@dataclass(frozen=True)
class CandidateFact:
    """A fact the hippocampus must decide on: from a templated turn or a free-text inbox turn."""

    person_id: str
    slot: str
    value: str
    text: str  # the statement as a sentence ("Lena Varga was born in 1984.")
    claim: str = "true"
    conversation_id: str = ""
    turn_index: int = -1
    template_id: str | None = None


@dataclass(frozen=True)
class Memory:
    """A stored memory; `embedding` is a unit-norm float vector (384-d for MiniLM)."""

    id: str
    person_id: str
    slot: str
    value: str
    text: str
    embedding: tuple[float, ...]
    importance: float
    source: str  # "<conversation id>#<turn index>"
    status: str = "active"  # active | superseded | evicted
    created_at: str = ""
    updated_at: str = ""


@dataclass(frozen=True)
class Decision:
    """One hippocampus decision with its reason and scores."""

    action: str  # STORE | REJECT | CORRECT | MERGE
    candidate: CandidateFact
    reason: str
    importance: float
    scores: dict[str, float] = field(default_factory=dict)
    memory_id: str | None = None  # memory written or merged into
    superseded_id: str | None = None  # memory retired by a CORRECT
