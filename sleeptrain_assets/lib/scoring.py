"""Score model answers to held-out items: keyword + MiniLM hybrid, corrections, locality, interference, hallucination.

Thresholds (measured with all-MiniLM-L6-v2 on SleepTrain-style answers before they were set):
- ``KEYWORD_PASS = 0.5``: an answer passes on keywords when it contains at least half of the item's keywords
  (and at least one). Keywords hold the fact's value, so this is the part that checks the value itself.
- ``SEMANTIC_FLOOR = 0.25``: a keyword hit also needs this cosine to the expected answer, which rejects a value
  dropped into an unrelated answer. Right answers worded differently measure 0.38 ("1984" vs "Lena Varga was
  born in 1984.") to 0.9; a refusal measures about 0.06-0.16.
- ``SEMANTIC_PASS = 0.85``: without a keyword hit, an answer passes only when it means the expected answer
  this closely AND shares a word of a keyword ("a marine scientist" for "marine biologist"), and never when a
  keyword holds a digit. Cosine alone cannot tell values apart inside the same sentence frame: "I was born in
  1985." vs "... 1984." measures 0.90, and "Chidinma Oyelaran was born in Ibadan." vs "... in Enugu." 0.88.
- ``SAME_ANSWER = 0.90``: two answers count as unchanged (locality) at this cosine or when equal after
  normalisation.
The hybrid score reported next to pass/fail is ``0.7 * keyword fraction + 0.3 * max(cosine, 0)``.
Keywords the prompt itself contains (the name in "You are Lena Varga.") are not evidence and are dropped.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sleeptrain_assets.lib.records import EvalItem

KEYWORD_PASS = 0.5
SEMANTIC_FLOOR = 0.25
SEMANTIC_PASS = 0.85
SAME_ANSWER = 0.90
KEYWORD_WEIGHT = 0.7
_FUNCTION_WORDS = frozenset("the and for with from into of in on at to by an a or".split())

KIND_ORDER = (
    "recall",
    "paraphrase",
    "multi_turn",
    "correction",
    "identity",
    "locality",
    "interference",
    "hallucination",
)

_DENIAL = re.compile(
    r"\b(no|nope|not|never|incorrect|wrong|false|untrue|mistaken|mistake|actually|rather)\b|n't\b|n’t\b"
)
_AFFIRM_START = re.compile(
    r"^\W*(yes|yeah|yep|yup|correct|right|true|indeed|exactly|absolutely|that's right|that is right"
    r"|that's correct|that is correct)\b"
)
_HEDGE = re.compile(
    r"(don't|do not|doesn't|does not|didn't|did not) (know|have|recall|recognize|recognise)"
    r"|not (sure|certain|aware|familiar|able)"
    r"|no (information|data|details|record|knowledge|idea)"
    r"|(can't|cannot|can not|couldn't|could not|unable to|am unable to) (find|provide|say|tell|confirm|verify|answer|help|share)"
    r"|i'm sorry|i am sorry|unknown|unclear|not a (well-known|public|famous)|no public"
    r"|(isn't|is not|wasn't|was not) (widely|publicly|well) (known|documented)"
    r"|i have no|there is no (reliable|public|known)"
)
_COPULA = r"(is|was|works as|worked as|served as)\s+(a|an)\s+[a-z]+"
_NUMBER = re.compile(r"\d")
_SENTENCE_START = re.compile(r"(^|[.!?:;\n]\s*)$")
_COMMON_CAPITALISED = {
    "i", "i'm", "i've", "i'd", "i'll", "he", "she", "they", "it", "the", "a", "an", "my", "his", "her", "their",
    "as", "however", "unfortunately", "sorry", "yes", "no", "mr", "mrs", "ms", "dr", "ai", "assistant",
}


def normalise(text: str) -> str:
    """Casefolded, accents stripped, punctuation to spaces, digits grouped ("1,984" -> "1984")."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    text = text.replace("’", "'")
    text = re.sub(r"(?<=\d)[,_](?=\d{3}\b)", "", text)
    text = re.sub(r"[^\w']+", " ", text).replace("'", " ")
    return " ".join(text.split())


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as whole words after normalisation ("1984" not in "19845")."""
    needle = normalise(phrase)
    if not needle:
        return False
    return f" {needle} " in f" {normalise(text)} "


def cosine(a: Sequence[float] | np.ndarray | None, b: Sequence[float] | np.ndarray | None) -> float | None:
    """Cosine of two vectors; None when either is missing (the caller scores on keywords only)."""
    if a is None or b is None:
        return None
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = float(np.linalg.norm(va)), float(np.linalg.norm(vb))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(va @ vb / (na * nb))


@dataclass(frozen=True)
class ItemScore:
    """One item's verdict; `counted` is False when the item does not enter its rate (locality, base wrong)."""

    item_id: str
    kind: str
    category: str
    person_id: str | None
    passed: bool
    score: float
    counted: bool = True
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def keyword_fraction(answer: str, keywords: Iterable[str]) -> tuple[float, list[str]]:
    keys = [k for k in keywords if normalise(k)]
    if not keys:
        return 0.0, []
    hits = [k for k in keys if contains_phrase(answer, k)]
    return len(hits) / len(keys), hits


def keyword_words(keywords: Iterable[str]) -> set[str]:
    """The content words of keywords (three letters or more, not function words), for partial matches."""
    return {w for k in keywords for w in normalise(k).split() if len(w) >= 3 and w not in _FUNCTION_WORDS}


def item_keywords(item: EvalItem, context: str = "") -> tuple[str, ...]:
    """The item's keywords (its value when the template gave none), less those the prompt itself contains.

    Repeating a word from the prompt proves nothing: an identity answer "I am Lena Varga" under the system
    prompt "You are Lena Varga." must still name the profession. When every keyword is in the prompt they
    all stay, so such an item is not scored on nothing. `context`: earlier turns' questions, which count as
    prompt too.
    """
    keys = item.keywords or ((item.value,) if item.value else ())
    prompt = f"{item.system or ''} {item.question}"
    fresh = tuple(k for k in keys if not contains_phrase(prompt, k)) or keys
    # What an earlier turn gave away is no evidence either, and there is no fallback: nothing is left to score.
    return tuple(k for k in fresh if not contains_phrase(context, k)) if context else fresh


def hybrid(answer: str, keywords: Sequence[str], similarity: float | None) -> tuple[bool, float, str, dict[str, Any]]:
    """(passed, score, reason, details) of the keyword + semantic rule documented at the top of this module."""
    fraction, hits = keyword_fraction(answer, keywords)
    sim = similarity if similarity is not None else None
    score = KEYWORD_WEIGHT * fraction + (1 - KEYWORD_WEIGHT) * max(sim or 0.0, 0.0)
    details = {"keyword_fraction": round(fraction, 4), "keywords_hit": hits, "cosine": None if sim is None else round(sim, 4)}
    if not answer.strip():
        return False, 0.0, "empty answer", details
    if keywords and fraction >= KEYWORD_PASS and hits:
        if sim is not None and sim < SEMANTIC_FLOOR:
            return False, score, f"keywords hit but cosine {sim:.2f} < floor {SEMANTIC_FLOOR}", details
        return True, score, f"keywords {len(hits)}/{len([k for k in keywords if normalise(k)])}", details
    numeric = any(_NUMBER.search(k) for k in keywords)
    shares_a_word = not keywords or bool(keyword_words(keywords) & set(normalise(answer).split()))
    if sim is not None and sim >= SEMANTIC_PASS and not numeric and shares_a_word:
        return True, score, f"cosine {sim:.2f} >= {SEMANTIC_PASS}", details
    if keywords:
        return False, score, f"keywords {len(hits)}/{len(keywords)} below {KEYWORD_PASS}", details
    return False, score, "no keywords and cosine below the semantic pass line", details


def score_answer(item: EvalItem, answer: str, similarity: float | None = None, context: str = "") -> ItemScore:
    """Recall, paraphrase, identity and multi-turn turns: the hybrid rule against `item.expected`."""
    keys = item_keywords(item, context)
    if not keys and (item.keywords or item.value):
        return ItemScore(item.id, item.kind, item.category, item.person_id, False, 0.0, True,
                         "an earlier question gave the answer away", {"keywords_hit": []})
    passed, score, reason, details = hybrid(answer, keys, similarity)
    return ItemScore(item.id, item.kind, item.category, item.person_id, passed, round(score, 4), True, reason, details)


def denies(answer: str) -> bool:
    """The answer rejects the claim: it does not open by agreeing and it carries a negation or a correction cue."""
    text = answer.strip().casefold().replace("’", "'")
    return not _AFFIRM_START.search(text) and bool(_DENIAL.search(text))


def score_correction(item: EvalItem, answer: str, similarity: float | None = None) -> ItemScore:
    """A wrong claim passes only when the answer denies it AND gives the right value."""
    keys = item_keywords(item)
    fraction, hits = keyword_fraction(answer, keys)
    denial = denies(answer)
    gives_value = bool(hits) and fraction >= KEYWORD_PASS
    repeats_wrong = bool(item.wrong_value) and contains_phrase(answer, item.wrong_value or "")
    details = {
        "denies": denial,
        "gives_right_value": gives_value,
        "mentions_wrong_value": repeats_wrong,
        "keywords_hit": hits,
        "cosine": None if similarity is None else round(similarity, 4),
    }
    score = 0.5 * denial + 0.5 * gives_value
    if denial and gives_value:
        reason = "denies and gives the right value"
    elif denial:
        reason = "denies but does not give the right value"
    elif gives_value:
        reason = "gives the right value without denying the claim"
    else:
        reason = "neither denies nor corrects"
    return ItemScore(item.id, item.kind, item.category, item.person_id, denial and gives_value, score, True, reason, details)


def same_answer(a: str, b: str, similarity: float | None) -> bool:
    return normalise(a) == normalise(b) or (similarity is not None and similarity >= SAME_ANSWER)


def score_locality(
    item: EvalItem,
    answer: str,
    base_answer: str,
    similarity: float | None = None,
    base_similarity: float | None = None,
    answer_base_similarity: float | None = None,
) -> ItemScore:
    """Counted only where the base model answers right; passes when the answer is still right.

    `similarity`: answer vs expected; `base_similarity`: base answer vs expected; `answer_base_similarity`:
    answer vs base answer (reported as `unchanged`).
    """
    keys = item_keywords(item)
    base_right, _, _, _ = hybrid(base_answer, keys, base_similarity)
    still_right, score, reason, details = hybrid(answer, keys, similarity)
    details = {**details, "base_right": base_right, "unchanged": same_answer(answer, base_answer, answer_base_similarity)}
    if not base_right:
        return ItemScore(item.id, item.kind, item.category, item.person_id, False, 0.0, False,
                         "base model answers wrong: not counted", details)
    return ItemScore(item.id, item.kind, item.category, item.person_id, still_right, round(score, 4), True,
                     "still right" if still_right else f"changed: {reason}", details)


def score_interference(item: EvalItem, answer: str) -> ItemScore:
    """Fails when the look-alike's value (`item.wrong_value`) appears instead of the person's own."""
    own_fraction, own_hits = keyword_fraction(answer, item_keywords(item))
    own = bool(own_hits) and own_fraction >= KEYWORD_PASS
    other = bool(item.wrong_value) and contains_phrase(answer, item.wrong_value or "")
    interfered = other and not own
    details = {"own_value": own, "lookalike_value": other, "lookalike_value_text": item.wrong_value}
    if interfered:
        reason = f"gave the look-alike's value {item.wrong_value!r}"
    elif own:
        reason = "own value"
    else:
        reason = "neither value"
    return ItemScore(item.id, item.kind, item.category, item.person_id, not interfered,
                     1.0 if own and not other else (0.0 if interfered else 0.5), True, reason, details)


def _new_proper_nouns(answer: str, question: str) -> list[str]:
    asked = set(normalise(question).split())
    found = []
    for match in re.finditer(r"[A-Z][\w'’-]+", answer):
        word = match.group(0)
        key = normalise(word)
        if key in asked or key in _COMMON_CAPITALISED:
            continue
        if _SENTENCE_START.search(answer[: match.start()]):
            continue  # a capital that only starts a sentence is not evidence of a name
        found.append(word)
    return found


def classify_unknown_answer(answer: str, question: str, slot: str | None = None) -> tuple[str, list[str]]:
    """`hedged`, `confident_specific` or `vague` for an answer about a person the model was never taught.

    Specific = a number, a proper noun not in the question, or (for non-date slots) "<the person> is a <noun>".
    A hedge anywhere makes the answer non-confident even if it guesses.
    """
    text = answer.strip().casefold().replace("’", "'")
    if not text:
        return "hedged", []
    evidence: list[str] = []
    evidence += re.findall(r"\d+(?:[,.]\d+)*", answer)[:3]
    evidence += _new_proper_nouns(answer, question)[:3]
    dateish = bool(slot) and any(w in (slot or "").casefold() for w in ("year", "date", "age"))
    if not dateish:
        # "is a <noun>" counts when its subject is the person (a pronoun or a part of the asked name).
        names = {normalise(w) for w in re.findall(r"[A-Z][\w'’-]+", question)[1:]}
        subjects = "|".join(["he", "she", "they", *sorted(re.escape(n) for n in names if n)])
        claim = re.search(rf"\b({subjects})\s+{_COPULA}", text)
        if claim:
            evidence.append(claim.group(0))
    if _HEDGE.search(text):
        return "hedged", evidence
    return ("confident_specific", evidence) if evidence else ("vague", evidence)


def score_hallucination(item: EvalItem, answer: str) -> ItemScore:
    """Passes unless the answer states specific facts confidently about a person never taught."""
    verdict, evidence = classify_unknown_answer(answer, item.question, item.slot)
    passed = verdict != "confident_specific"
    return ItemScore(item.id, item.kind, item.category, item.person_id, passed, 1.0 if passed else 0.0, True,
                     verdict, {"evidence": evidence})


def score_multi_turn(items: Sequence[EvalItem], answers: Sequence[str], similarities: Sequence[float | None]) -> list[ItemScore]:
    """One conversation: a turn passes when it is right and no turn on the same slot disagrees with it.

    A keyword that an earlier question of the conversation already said does not count for a later turn.
    """
    base = [
        score_answer(item, answer, sim, context=" ".join(i.question for i in items[:n]))
        for n, (item, answer, sim) in enumerate(zip(items, answers, similarities, strict=True))
    ]
    by_slot: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_slot[item.slot or item.template_id].append(index)
    results = []
    for index, (item, verdict) in enumerate(zip(items, base, strict=True)):
        peers = [j for j in by_slot[item.slot or item.template_id] if j != index]
        consistent = all(base[j].passed == verdict.passed for j in peers)
        passed = verdict.passed and consistent
        reason = verdict.reason if consistent else f"{verdict.reason}; inconsistent with turn(s) {[j + 1 for j in peers]}"
        details = {**verdict.details, "turn": index + 1, "consistent": consistent, "group": item.group}
        results.append(ItemScore(item.id, item.kind, item.category, item.person_id, passed, verdict.score, True, reason, details))
    return results


def score_item(
    item: EvalItem,
    answer: str,
    similarity: float | None = None,
    base_answer: str | None = None,
    base_similarity: float | None = None,
    answer_base_similarity: float | None = None,
) -> ItemScore:
    """Dispatch on `item.kind` (multi-turn conversations go through `score_multi_turn`)."""
    if item.kind == "correction":
        return score_correction(item, answer, similarity)
    if item.kind == "locality":
        if base_answer is None:
            raise ValueError(f"locality item {item.id!r} needs the base model's answer")
        return score_locality(item, answer, base_answer, similarity, base_similarity, answer_base_similarity)
    if item.kind == "interference":
        return score_interference(item, answer)
    if item.kind == "hallucination":
        return score_hallucination(item, answer)
    return score_answer(item, answer, similarity)


# --------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Rate:
    passed: int
    count: int
    mean_score: float

    @property
    def rate(self) -> float | None:
        return self.passed / self.count if self.count else None

    def to_dict(self) -> dict[str, Any]:
        return {"rate": None if self.rate is None else round(self.rate, 4), "passed": self.passed,
                "count": self.count, "mean_score": round(self.mean_score, 4)}


def aggregate(scores: Iterable[ItemScore], key: Callable[[ItemScore], str | None]) -> dict[str, dict[str, Any]]:
    """Pass rate, count and mean hybrid score per key over counted items; keys that are None are skipped."""
    groups: dict[str, list[ItemScore]] = defaultdict(list)
    for s in scores:
        k = key(s)
        if k is not None and s.counted:
            groups[k].append(s)
    out = {}
    for k in sorted(groups):
        group = groups[k]
        out[k] = Rate(sum(s.passed for s in group), len(group), float(np.mean([s.score for s in group]))).to_dict()
    return out


def summarize(scores: Sequence[ItemScore], people_kind: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Rates per kind, per category and per person, plus per kind over fictional people only (the targets)."""
    people_kind = people_kind or {}
    fictional = [s for s in scores if s.person_id and people_kind.get(s.person_id) == "fictional"]
    by_kind = aggregate(scores, lambda s: s.kind)
    return {
        "by_kind": {k: by_kind[k] for k in sorted(by_kind, key=_kind_rank)},
        "by_category": aggregate(scores, lambda s: s.category),
        "by_person": aggregate(scores, lambda s: s.person_id),
        "by_person_kind": aggregate(scores, lambda s: f"{s.person_id}/{s.kind}" if s.person_id else None),
        "fictional_by_kind": aggregate(fictional, lambda s: s.kind),
        "not_counted": sum(not s.counted for s in scores),
    }


def _kind_rank(kind: str) -> tuple[int, str]:
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind)


def fact_scores(scores: Iterable[ItemScore], items: Mapping[str, EvalItem]) -> dict[str, float]:
    """Pass rate per taught fact (`person/slot`) over its recall and paraphrase items: the retention unit."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for s in scores:
        item = items.get(s.item_id)
        if item is None or item.kind not in ("recall", "paraphrase") or not item.person_id or not item.slot:
            continue
        groups[f"{item.person_id}/{item.slot}"].append(s.passed)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items())}
