"""Score model answers to held-out items: a strict keyword rule with a narrow MiniLM rescue, plus corrections,
true-claim controls, locality, unchanged answers, neighbourhood, interference and hallucination.

Rules (every threshold was measured with all-MiniLM-L6-v2 on SleepTrain-style answers before it was set):
- **Own phrase.** A keyword (the fact's value) counts only where it stands as its own phrase. An occurrence
  inside a longer known value that embeds it (one of the item's `other_values` or `competing_values` in which
  the keyword is glued to other words by spaces: "Leuven" in "KU Leuven", not in "Leuven, Belgium") is no
  evidence, nor is one glued by a space to a capitalised word that makes it a longer proper name ("the KU
  Leuven campus", "Leuven Glass Museum"). A capital that only starts a sentence ("In Leuven.") is not a name
  part unless the word is an acronym ("KU"); the asked person's name is never a name part. Why: "Lena Varga
  studied at KU Leuven." passed the birth-city question on its keyword at cosine 0.83.
- **Counts.** A count from zero to twenty, or a ten up to ninety, is one value in digits or in words: "3"
  states "three", and a competing "4" is stated by "four". Why: a sleep-cycle challenger's right "The answer to
  this classic problem is 3." failed "How many sides does a triangle have?" (keyword "three") and cost a gate.
  A decimal is one number ("18.0" never states 0 and "2.5" never 5): "The freezing point of water is -18.0°C."
  passed the freezing-point question. A dotted date ("15.01.1929") is still read as its parts.
- **Asserted, not negated.** A mention counts as stated only when it is not negated ("not 1988", "never won
  the X", "rather than X", "instead of X", "X is wrong/incorrect", "X isn't right", "it is not true that ... X")
  and not inside a question ("Was she born in 1988? No."). A right value that is only negated is not given.
- **Competing values fail.** An answer that states a competing value of the item's slot (another person's
  value for the same slot, a listed wrong value, or the correction's wrong value) fails whatever else it says:
  recall, paraphrase, multi-turn, identity, correction, confirmation, locality, neighbourhood, interference.
  Competitors that equal or sit inside the right value or its keywords are ignored, and so are competitors
  that are one of the person's own values for another slot (Mechelen: Lena Varga's residence and a listed
  wrong birth city), which an answer may mention truthfully.
- ``KEYWORD_PASS = 0.5``: an answer passes on keywords when it states at least half of the item's keywords
  (and at least one).
- ``SEMANTIC_FLOOR = 0.25``: a keyword hit also needs this cosine to the expected answer, which rejects a value
  dropped into an unrelated answer. Right answers worded differently measure 0.38 ("1984" vs "Lena Varga was
  born in 1984.") to 0.9; a refusal measures about 0.06-0.16.
- ``SEMANTIC_PASS = 0.85``: without a keyword hit, an answer passes on meaning only when it is this close AND
  shares a content word with a keyword ("a marine scientist" for "marine biologist") AND no keyword holds a
  digit or a capitalised word AND it states no competing value. Cosine cannot tell values apart inside one
  sentence frame, least of all names: "Halvor Ostby won the Silver Anchor Award." measures 0.94 to "... the
  Golden Anchor Award.", Lena Varga's "Golden Kiln Award" 0.85, "I was born in 1985." vs "... 1984." 0.90.
- **Correction** (a false claim): passes only when the answer denies the claim AND states the right value AND
  does not state the wrong value (or any competitor) as true. "No, Lena Varga was born in 1988, not 1984."
  fails; "No. Lena Varga was born in 1984, not 1988." passes.
- **Confirmation** (a true claim, the control beside each correction): passes only when the answer confirms
  (opens with yes / correct / that's right ..., or states the true value) without denying the claim, does not
  negate the true value and states no competitor. A model that always says "No" fails every one.
- ``SAME_ANSWER = 0.90``: *unchanged* (the adapter says what the base model says) holds when the answers or
  their first sentences (``MIN_FIRST_SENTENCE_WORDS = 3`` words or more, so a "Sure!" opener does not decide
  it) are equal after `normalise`, or the whole answers' cosine is at least this. Measured on 16 pairs:
  rewordings of one answer 0.93-0.99 (6 of 6 pass; "The capital of France is Paris." vs "Paris is the capital
  of France." 0.99, a haiku reworded 0.93), different answers to one prompt 0.11-0.65 (6 of 6 fail), but a
  changed fact in one sentence frame 0.75-0.97 (2 of 4 pass: "... boils at 100 degrees" vs "... 90 degrees"
  0.97). So *unchanged* measures drift in what the model says, not whether a fact survived: locality's
  keyword rule checks that. Unchanged items always count.
- **Locality / neighbourhood**: counted only where the base model answers right (by these same rules); pass
  when the answer is still right.
- **Cut answers**: the caller says whether generation stopped at its token budget (`cut=` on `score_item`,
  `cuts=` on `score_multi_turn`); it is kept in `details["cut"]` and `summarize` counts it (`answers_cut`).
- **Intervals**: every rate carries n and its 95% Wilson interval (`stats.wilson_interval`).
The hybrid score reported next to pass/fail is ``0.7 * keyword fraction + 0.3 * max(cosine, 0)``.
Keywords the prompt itself contains (the name in "You are Lena Varga.") are not evidence and are dropped.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np

from sleeptrain_assets.lib.records import EvalItem
from sleeptrain_assets.lib.stats import wilson_interval

KEYWORD_PASS = 0.5
SEMANTIC_FLOOR = 0.25
SEMANTIC_PASS = 0.85
SAME_ANSWER = 0.90
MIN_FIRST_SENTENCE_WORDS = 3
KEYWORD_WEIGHT = 0.7
_FUNCTION_WORDS = frozenset("the and for with from into of in on at to by an a or".split())

KIND_ORDER = (
    "recall",
    "paraphrase",
    "multi_turn",
    "correction",
    "confirmation",
    "identity",
    "locality",
    "unchanged",
    "neighbourhood",
    "interference",
    "hallucination",
)
BASE_RELATIVE_KINDS = ("locality", "unchanged", "neighbourhood")  # kinds scored against the base model's answer

_DENIAL = re.compile(
    r"\b(no|nope|not|never|incorrect|wrong|false|untrue|mistaken|mistake|actually|rather)\b|n't\b|n’t\b"
)
_AFFIRM_START = re.compile(
    r"^\W*(yes|yeah|yep|yup|correct|right|true|indeed|exactly|absolutely|that's right|that is right"
    r"|that's correct|that is correct|that's true|that is true)\b"
)
# A denial of the claim itself (not of one value inside the answer): what a confirmation must not contain.
_CLAIM_DENIAL = re.compile(
    r"^\W*(no|nope|nah|not|never|incorrect|wrong|false|untrue|that's not|that is not|that isn't|this is not"
    r"|it is not|it's not|it isn't)\b"
    r"|\b(that|this|it|the claim|the statement)('s| is| was)? (not|n't) (true|right|correct|accurate)\b"
    r"|\b(that|this|it)( is|'s|n't| isn't) (wrong|incorrect|false|untrue|inaccurate|mistaken)\b"
    r"|\b(isn't|is not|wasn't|was not) (true|right|correct|accurate)\b"
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

# Mention analysis: tokens mirror `normalise` ("1,984" is one token), the gaps between them keep punctuation.
_DECIMAL = r"(?<!\d)(?<!\d\.)\d+\.\d+(?!\.?\d)"  # "18.0", not a dotted date "15.01.1929"
_TOKEN = re.compile(rf"{_DECIMAL}|\d{{1,3}}(?:[,_]\d{{3}})+(?!\d)|\w+")
_CLAUSE_BREAK = frozenset(",;.!?:()[]{}\"“”—–\n")
_SENTENCE_BREAK = frozenset(".!?:;\n")
_NEGATORS = frozenset({"not", "never", "nor", "neither"})
_NEGATING_PAIRS = frozenset({("rather", "than"), ("instead", "of")})
_CLAUSE_WORDS = frozenset({"but", "and", "however", "although", "though", "while", "whereas", "yet", "so",
                           "because", "which", "that", "who", "when", "where"})
_COPULAS = frozenset({"is", "was", "are", "were", "be", "been", "isn", "wasn", "aren", "weren", "seems", "sounds"})
_FALSE_WORDS = frozenset({"wrong", "incorrect", "false", "untrue", "mistaken", "mistake", "inaccurate"})
_TRUTH_WORDS = frozenset({"true", "correct", "right", "accurate", "case"})
_NEGATION_WINDOW = 4  # tokens either side of a mention searched for a negation of it
# A small count written in digits or in words is one value ("3" answers "three sides"); larger numbers (years,
# distances) are compared as written.
_NUMBER_WORDS = dict(enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split()))
_NUMBER_WORDS.update({n: w for n, w in zip(range(30, 100, 10),
                                            "thirty forty fifty sixty seventy eighty ninety".split(), strict=True)})
_NUMBER_SPELLINGS = {**{str(n): w for n, w in _NUMBER_WORDS.items()}, **{w: str(n) for n, w in _NUMBER_WORDS.items()}}


def normalise(text: str) -> str:
    """Casefolded, accents stripped, punctuation to spaces, digits grouped ("1,984" -> "1984"), a decimal one word
    ("18.0" -> "18point0", so its digits are never a number of their own)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    text = text.replace("’", "'")
    text = re.sub(r"(?<=\d)[,_](?=\d{3}\b)", "", text)
    text = re.sub(_DECIMAL, lambda m: m.group(0).replace(".", "point"), text)
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


# --------------------------------------------------------------------------- mentions


@dataclass(frozen=True)
class _Token:
    norm: str
    text: str
    start: int
    end: int


class _Text:
    """An answer as normalised tokens that remember their spelling and the punctuation between them."""

    def __init__(self, text: str) -> None:
        plain = unicodedata.normalize("NFKD", text)
        self.plain = "".join(c for c in plain if not unicodedata.combining(c)).replace("’", "'")
        self.tokens = [_Token(word, m.group(0), m.start(), m.end())
                       for m in _TOKEN.finditer(self.plain) for word in normalise(m.group(0)).split()]
        self.norms = [t.norm for t in self.tokens]

    def gap(self, k: int) -> str:
        """The text between token k-1 and token k (before the first token for k = 0, after the last for len)."""
        start = self.tokens[k - 1].end if k > 0 else 0
        end = self.tokens[k].start if k < len(self.tokens) else len(self.plain)
        return self.plain[start:end]

    def glued(self, k: int) -> bool:
        """Token k follows token k-1 with nothing but spaces between (one word group, no punctuation)."""
        return 0 < k < len(self.tokens) and not self.gap(k).strip(" \t")

    def sentence_start(self, k: int) -> bool:
        return k == 0 or any(c in _SENTENCE_BREAK for c in self.gap(k))

    def find(self, phrase: str) -> list[tuple[int, int]]:
        """Token spans [i, j) where the normalised phrase occurs as whole words."""
        needle = normalise(phrase).split()
        n = len(needle)
        if not n:
            return []
        return [(i, i + n) for i in range(len(self.norms) - n + 1) if self.norms[i:i + n] == needle]

    def name_part(self, k: int, asked: frozenset[str]) -> bool:
        """Token k is a capitalised word that extends a proper name (not a sentence's first word, not the asker's)."""
        token = self.tokens[k]
        if not token.text[:1].isupper() or token.norm in _COMMON_CAPITALISED or token.norm in asked:
            return False
        acronym = sum(c.isalpha() for c in token.text) >= 2 and token.text.isupper()
        return acronym or not self.sentence_start(k)

    def negated(self, i: int, j: int) -> bool:
        """The mention at [i, j) is negated within its clause ("not X", "X is wrong") or sits in a denied claim
        ("it is not true that she was born in X")."""
        if self._in_denied_claim(i):
            return True
        for k in range(i - 1, max(-1, i - 1 - _NEGATION_WINDOW), -1):
            if any(c in _CLAUSE_BREAK for c in self.gap(k + 1)):
                break
            word = self.norms[k]
            if word in _NEGATORS or (word == "t" and k > 0 and self.norms[k - 1].endswith("n")):
                return True
            if k > 0 and (self.norms[k - 1], word) in _NEGATING_PAIRS:
                return True
            if word in _CLAUSE_WORDS:
                break
        copula = False
        for k in range(j, min(len(self.tokens), j + _NEGATION_WINDOW)):
            if any(c in _CLAUSE_BREAK for c in self.gap(k)):
                break
            word = self.norms[k]
            if word in _FALSE_WORDS:
                return True
            if copula and (word in _NEGATORS or word == "t"):
                return True
            if word in _CLAUSE_WORDS:
                break
            copula = copula or word in _COPULAS
        return False

    def _in_denied_claim(self, i: int) -> bool:
        """Token i follows "not true that" / "false that" / "not the case that" earlier in its clause."""
        for k in range(i - 1, 0, -1):
            if any(c in _CLAUSE_BREAK for c in self.gap(k + 1)) or self.norms[k] in ("but", "however"):
                return False
            if self.norms[k] != "that":
                continue
            before = self.norms[max(0, k - 3):k]
            if before[-1:] and before[-1] in _FALSE_WORDS:
                return True
            if before[-1:] and before[-1] in _TRUTH_WORDS and any(w in _NEGATORS or w == "t" for w in before[:-1]):
                return True
        return False

    def in_question(self, j: int) -> bool:
        """The sentence holding the token before j ends with a question mark."""
        rest = self.plain[self.tokens[j - 1].end:]
        end = next((c for c in rest if c in ".!?\n"), "")
        return end == "?"


@lru_cache(maxsize=4096)
def _text(text: str) -> _Text:
    """The tokenised text, cached: one answer is checked against every keyword and competitor of its item."""
    return _Text(text)


@lru_cache(maxsize=4096)
def _embeds(longer: str, phrase: str) -> bool:
    """`longer` strictly contains `phrase` glued to its other words by spaces ("KU Leuven", not "Leuven, Belgium")."""
    if normalise(longer) == normalise(phrase) or not contains_phrase(longer, phrase):
        return False
    text = _text(longer)
    return any(text.glued(i) or text.glued(j) for i, j in text.find(phrase))


@dataclass(frozen=True)
class Mention:
    """One occurrence of a phrase in an answer: whether it stands as its own phrase and whether it is asserted."""

    start: int
    end: int
    own_phrase: bool
    negated: bool
    in_question: bool

    @property
    def asserted(self) -> bool:
        return self.own_phrase and not self.negated and not self.in_question


def mentions(answer: str, phrase: str, known: Iterable[str] = (), asked: str = "") -> list[Mention]:
    """Every occurrence of `phrase` in `answer` (a count from zero to twenty, or a ten up to ninety, in digits or
    in words), judged by the own-phrase and negation rules of this module.

    `known`: other values the answer may mention (the person's other slots, competitors); an occurrence inside
    one that embeds the phrase is not its own phrase. `asked`: the prompt; its words never extend a name.
    """
    text = _text(answer)
    other_spelling = _NUMBER_SPELLINGS.get(normalise(phrase))
    spans = sorted(text.find(phrase) + (text.find(other_spelling) if other_spelling else []))
    if not spans:
        return []
    longer = [k for k in known if normalise(k) != normalise(phrase) and contains_phrase(k, phrase)]
    embedding = [span for k in longer if _embeds(k, phrase) for span in text.find(k)]
    qualifying = [span for k in longer if not _embeds(k, phrase) for span in text.find(k)]
    asked_words = frozenset(normalise(asked).split())

    def extends_name(i: int, j: int, k: int) -> bool:
        """Neighbour k of the mention [i, j) makes it part of a longer proper name ("Leuven Glass Museum")."""
        glue = i if k < i else j
        in_qualifier = any(a <= min(i, k) and max(j, k + 1) <= b for a, b in qualifying)  # "Leuven Belgium"
        return 0 <= k < len(text.tokens) and text.glued(glue) and text.name_part(k, asked_words) and not in_qualifier

    out = []
    for i, j in spans:
        inside = any(a <= i and j <= b for a, b in embedding)
        glued_name = text.tokens[i].text[:1].isupper() and (extends_name(i, j, i - 1) or extends_name(i, j, j))
        out.append(Mention(i, j, not inside and not glued_name, text.negated(i, j), text.in_question(j)))
    return out


def asserts(answer: str, phrase: str, known: Iterable[str] = (), asked: str = "") -> bool:
    """`answer` states `phrase` as true: an own-phrase mention, not negated, not inside a question."""
    return any(m.asserted for m in mentions(answer, phrase, known, asked))


def negates_only(answer: str, phrase: str, known: Iterable[str] = (), asked: str = "") -> bool:
    """`phrase` is mentioned as its own phrase, and only in negated form ("not 1984")."""
    found = [m for m in mentions(answer, phrase, known, asked) if m.own_phrase]
    return bool(found) and not any(m.asserted for m in found)


def has_proper_name_or_digit(keyword: str) -> bool:
    """A keyword holding a digit or a capitalised word: a value that cosine cannot tell from its neighbours."""
    return bool(_NUMBER.search(keyword)) or any(w[0].isupper() for w in re.findall(r"[^\W\d_]+", keyword))


# --------------------------------------------------------------------------- item verdicts


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
    slot: str | None = None
    split: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _verdict(item: EvalItem, passed: bool, score: float, reason: str, details: dict[str, Any],
             counted: bool = True) -> ItemScore:
    return ItemScore(item.id, item.kind, item.category, item.person_id, passed, round(score, 4), counted, reason,
                     details, item.slot, item.split)


def keyword_fraction(answer: str, keywords: Iterable[str], known: Iterable[str] = (),
                     asked: str = "") -> tuple[float, list[str]]:
    """The fraction of keywords the answer states (own phrase, not negated) and which ones."""
    keys = [k for k in keywords if normalise(k)]
    if not keys:
        return 0.0, []
    known = tuple(known)
    hits = [k for k in keys if asserts(answer, k, known, asked)]
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


def competitors(item: EvalItem) -> tuple[str, ...]:
    """The wrong values of the item's slot an answer must not state (see the module docstring for exclusions)."""
    right = [r for r in (item.value, *item.keywords) if r and normalise(r)]
    own_other = {normalise(v) for v in item.other_values}
    out: list[str] = []
    for value in (*item.competing_values, item.wrong_value or ""):
        key = normalise(value)
        if not key or key in own_other or any(contains_phrase(r, value) for r in right):
            continue
        if key not in {normalise(v) for v in out}:
            out.append(value)
    return tuple(out)


def _known(item: EvalItem) -> tuple[str, ...]:
    return (*item.other_values, *item.competing_values, *((item.wrong_value,) if item.wrong_value else ()))


def _asked(item: EvalItem) -> str:
    return f"{item.system or ''} {item.question}"


def stated_competitors(item: EvalItem, answer: str) -> list[str]:
    """The competitors of the item's slot that the answer states as true."""
    known, asked = _known(item), _asked(item)
    return [c for c in competitors(item) if asserts(answer, c, known, asked)]


def hybrid(
    answer: str,
    keywords: Sequence[str],
    similarity: float | None,
    known: Iterable[str] = (),
    stated_wrong: Sequence[str] = (),
    asked: str = "",
) -> tuple[bool, float, str, dict[str, Any]]:
    """(passed, score, reason, details) of the keyword + semantic rule documented at the top of this module.

    `known`: values that may embed a keyword (own-phrase rule); `stated_wrong`: competitors the answer states,
    which fail it whatever else it says.
    """
    fraction, hits = keyword_fraction(answer, keywords, known, asked)
    score = KEYWORD_WEIGHT * fraction + (1 - KEYWORD_WEIGHT) * max(similarity or 0.0, 0.0)
    details = {"keyword_fraction": round(fraction, 4), "keywords_hit": hits,
               "cosine": None if similarity is None else round(similarity, 4),
               "competing_values_stated": list(stated_wrong)}
    if not answer.strip():
        return False, 0.0, "empty answer", details
    if stated_wrong:
        return False, score, f"states a competing value {stated_wrong[0]!r}", details
    if keywords and fraction >= KEYWORD_PASS and hits:
        if similarity is not None and similarity < SEMANTIC_FLOOR:
            return False, score, f"keywords hit but cosine {similarity:.2f} < floor {SEMANTIC_FLOOR}", details
        return True, score, f"keywords {len(hits)}/{len([k for k in keywords if normalise(k)])}", details
    rescuable = not any(has_proper_name_or_digit(k) for k in keywords)
    shares_a_word = not keywords or bool(keyword_words(keywords) & set(normalise(answer).split()))
    if similarity is not None and similarity >= SEMANTIC_PASS and rescuable and shares_a_word:
        return True, score, f"cosine {similarity:.2f} >= {SEMANTIC_PASS}", details
    if keywords:
        return False, score, f"keywords {len(hits)}/{len(keywords)} below {KEYWORD_PASS}", details
    return False, score, "no keywords and cosine below the semantic pass line", details


def _hybrid_item(item: EvalItem, answer: str, similarity: float | None,
                 keys: Sequence[str] | None = None) -> tuple[bool, float, str, dict[str, Any]]:
    keys = item_keywords(item) if keys is None else keys
    return hybrid(answer, keys, similarity, _known(item), stated_competitors(item, answer), _asked(item))


def score_answer(item: EvalItem, answer: str, similarity: float | None = None, context: str = "") -> ItemScore:
    """Recall, paraphrase, identity and multi-turn turns: the strict rule against `item.expected`."""
    keys = item_keywords(item, context)
    if not keys and (item.keywords or item.value):
        return _verdict(item, False, 0.0, "an earlier question gave the answer away", {"keywords_hit": []})
    passed, score, reason, details = _hybrid_item(item, answer, similarity, keys)
    return _verdict(item, passed, score, reason, details)


def denies(answer: str) -> bool:
    """The answer rejects the claim: it does not open by agreeing and it carries a negation or a correction cue."""
    text = answer.strip().casefold().replace("’", "'")
    return not _AFFIRM_START.search(text) and bool(_DENIAL.search(text))


def denies_claim(answer: str) -> bool:
    """The answer rejects the claim as a whole ("No, ...", "That's not right") rather than negating one value."""
    return bool(_CLAIM_DENIAL.search(answer.strip().casefold().replace("’", "'")))


def confirms_opening(answer: str) -> bool:
    """The answer opens by agreeing ("Yes", "Correct", "That's right")."""
    return bool(_AFFIRM_START.search(answer.strip().casefold().replace("’", "'")))


def score_correction(item: EvalItem, answer: str, similarity: float | None = None) -> ItemScore:
    """A false claim passes only when the answer denies it, states the right value and asserts no wrong one."""
    keys = item_keywords(item)
    known, asked = _known(item), _asked(item)
    fraction, hits = keyword_fraction(answer, keys, known, asked)
    denial = denies(answer)
    gives_value = bool(hits) and fraction >= KEYWORD_PASS
    stated_wrong = stated_competitors(item, answer)
    details = {
        "denies": denial,
        "gives_right_value": gives_value,
        "mentions_wrong_value": bool(item.wrong_value) and contains_phrase(answer, item.wrong_value or ""),
        "asserts_wrong_value": bool(stated_wrong),
        "competing_values_stated": stated_wrong,
        "keywords_hit": hits,
        "cosine": None if similarity is None else round(similarity, 4),
    }
    score = (denial + gives_value + (not stated_wrong)) / 3
    if stated_wrong:
        reason = f"states the wrong value {stated_wrong[0]!r} as true"
    elif denial and gives_value:
        reason = "denies and gives the right value"
    elif denial:
        reason = "denies but does not state the right value"
    elif gives_value:
        reason = "gives the right value without denying the claim"
    else:
        reason = "neither denies nor corrects"
    return _verdict(item, denial and gives_value and not stated_wrong, score, reason, details)


def score_confirmation(item: EvalItem, answer: str, similarity: float | None = None) -> ItemScore:
    """A true claim passes only when the answer confirms it, keeps the true value and states no wrong one."""
    keys = item_keywords(item)
    known, asked = _known(item), _asked(item)
    fraction, hits = keyword_fraction(answer, keys, known, asked)
    opens_yes = confirms_opening(answer)
    denial = denies_claim(answer)
    negated = [k for k in keys if negates_only(answer, k, known, asked)]
    stated_wrong = stated_competitors(item, answer)
    states_value = bool(hits) and fraction >= KEYWORD_PASS
    details = {
        "opens_yes": opens_yes,
        "denies": denial,
        "states_true_value": states_value,
        "negates_true_value": bool(negated),
        "competing_values_stated": stated_wrong,
        "keywords_hit": hits,
        "cosine": None if similarity is None else round(similarity, 4),
    }
    if not answer.strip():
        reason = "empty answer"
    elif denial:
        reason = "denies a true claim"
    elif stated_wrong:
        reason = f"states a competing value {stated_wrong[0]!r}"
    elif negated:
        reason = f"negates the true value {negated[0]!r}"
    elif opens_yes or states_value:
        reason = "confirms" if opens_yes else "states the true value"
    else:
        reason = "neither confirms nor states the true value"
    passed = reason in ("confirms", "states the true value")
    return _verdict(item, passed, 1.0 if passed else 0.0, reason, details)


def first_sentence(text: str) -> str:
    """The text up to the first sentence end ("." "!" "?" followed by a space) or line break."""
    return re.split(r"(?<=[.!?])\s+|\n+", text.strip(), maxsplit=1)[0]


def same_first_sentence(a: str, b: str) -> bool:
    """Equal first sentences after normalising, of ``MIN_FIRST_SENTENCE_WORDS`` words or more ("Sure!" is not one)."""
    first = normalise(first_sentence(a))
    return len(first.split()) >= MIN_FIRST_SENTENCE_WORDS and first == normalise(first_sentence(b))


def same_answer(a: str, b: str, similarity: float | None) -> bool:
    """Two answers say the same: equal, equal first sentences, or cosine >= ``SAME_ANSWER``."""
    return (normalise(a) == normalise(b) or same_first_sentence(a, b)
            or (similarity is not None and similarity >= SAME_ANSWER))


def _score_against_base(item: EvalItem, answer: str, base_answer: str, similarity: float | None,
                        base_similarity: float | None, answer_base_similarity: float | None) -> ItemScore:
    base_right, _, _, _ = _hybrid_item(item, base_answer, base_similarity)
    still_right, score, reason, details = _hybrid_item(item, answer, similarity)
    details = {**details, "base_right": base_right, "unchanged": same_answer(answer, base_answer, answer_base_similarity)}
    if not base_right:
        return _verdict(item, False, 0.0, "base model answers wrong: not counted", details, counted=False)
    return _verdict(item, still_right, score, "still right" if still_right else f"changed: {reason}", details)


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
    return _score_against_base(item, answer, base_answer, similarity, base_similarity, answer_base_similarity)


def score_neighbourhood(
    item: EvalItem,
    answer: str,
    base_answer: str,
    similarity: float | None = None,
    base_similarity: float | None = None,
    answer_base_similarity: float | None = None,
) -> ItemScore:
    """A fact of a person never taught: counted where the base model knows it, passes when still known."""
    return _score_against_base(item, answer, base_answer, similarity, base_similarity, answer_base_similarity)


def score_unchanged(item: EvalItem, answer: str, base_answer: str,
                    answer_base_similarity: float | None = None) -> ItemScore:
    """Passes when the adapter's answer says what the base model's does (`same_answer`); always counted."""
    same_first = same_first_sentence(answer, base_answer)
    passed = same_answer(answer, base_answer, answer_base_similarity)
    details = {"same_first_sentence": same_first,
               "cosine": None if answer_base_similarity is None else round(answer_base_similarity, 4)}
    if same_first:
        reason = "same first sentence"
    elif passed and answer_base_similarity is None:
        reason = "the same answer after normalising"
    elif passed:
        reason = f"cosine {answer_base_similarity:.2f} >= {SAME_ANSWER}"
    else:
        shown = "unknown" if answer_base_similarity is None else f"{answer_base_similarity:.2f}"
        reason = f"changed: cosine {shown} < {SAME_ANSWER}"
    return _verdict(item, passed, max(answer_base_similarity or 0.0, float(same_first)), reason, details)


def score_interference(item: EvalItem, answer: str) -> ItemScore:
    """Fails when the answer states the look-alike's value (`item.wrong_value`) or any other competitor."""
    own_fraction, own_hits = keyword_fraction(answer, item_keywords(item), _known(item), _asked(item))
    own = bool(own_hits) and own_fraction >= KEYWORD_PASS
    stated_wrong = stated_competitors(item, answer)
    interfered = bool(stated_wrong)
    details = {"own_value": own, "lookalike_value": interfered, "lookalike_value_text": item.wrong_value,
               "competing_values_stated": stated_wrong}
    if interfered:
        reason = f"gave a competing value {stated_wrong[0]!r}"
    elif own:
        reason = "own value"
    else:
        reason = "neither value"
    return _verdict(item, not interfered, 1.0 if own and not interfered else (0.0 if interfered else 0.5),
                    reason, details)



# --------------------------------------------------------------------------- hallucination


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
    return _verdict(item, passed, 1.0 if passed else 0.0, verdict, {"evidence": evidence})



def score_multi_turn(items: Sequence[EvalItem], answers: Sequence[str], similarities: Sequence[float | None],
                     cuts: Sequence[bool | None] | None = None) -> list[ItemScore]:
    """One conversation: a turn passes when it is right and no turn on the same slot disagrees with it.

    A keyword that an earlier question of the conversation already said does not count for a later turn.
    `cuts`: per turn, whether its answer stopped at the token budget (kept in `details["cut"]`).
    """
    base = [
        score_answer(item, answer, sim, context=" ".join(i.question for i in items[:n]))
        for n, (item, answer, sim) in enumerate(zip(items, answers, similarities, strict=True))
    ]
    cut_flags = list(cuts) if cuts is not None else [None] * len(items)
    by_slot: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_slot[item.slot or item.template_id].append(index)
    results = []
    for index, (item, verdict, cut) in enumerate(zip(items, base, cut_flags, strict=True)):
        peers = [j for j in by_slot[item.slot or item.template_id] if j != index]
        consistent = all(base[j].passed == verdict.passed for j in peers)
        passed = verdict.passed and consistent
        reason = verdict.reason if consistent else f"{verdict.reason}; inconsistent with turn(s) {[j + 1 for j in peers]}"
        details = {**verdict.details, "turn": index + 1, "consistent": consistent, "group": item.group}
        if cut is not None:
            details["cut"] = bool(cut)
        results.append(_verdict(item, passed, verdict.score, reason, details))
    return results


def score_item(
    item: EvalItem,
    answer: str,
    similarity: float | None = None,
    base_answer: str | None = None,
    base_similarity: float | None = None,
    answer_base_similarity: float | None = None,
    cut: bool | None = None,
) -> ItemScore:
    """Dispatch on `item.kind` (multi-turn conversations go through `score_multi_turn`).

    Locality, unchanged and neighbourhood items need `base_answer`. `cut`: whether the answer stopped at the
    generation token budget; kept in `details["cut"]` and counted by `summarize`.
    """
    if item.kind in BASE_RELATIVE_KINDS and base_answer is None:
        raise ValueError(f"{item.kind} item {item.id!r} needs the base model's answer")
    if item.kind == "correction":
        verdict = score_correction(item, answer, similarity)
    elif item.kind == "confirmation":
        verdict = score_confirmation(item, answer, similarity)
    elif item.kind == "locality":
        verdict = score_locality(item, answer, base_answer or "", similarity, base_similarity, answer_base_similarity)
    elif item.kind == "neighbourhood":
        verdict = score_neighbourhood(item, answer, base_answer or "", similarity, base_similarity,
                                      answer_base_similarity)
    elif item.kind == "unchanged":
        verdict = score_unchanged(item, answer, base_answer or "", answer_base_similarity)
    elif item.kind == "interference":
        verdict = score_interference(item, answer)
    elif item.kind == "hallucination":
        verdict = score_hallucination(item, answer)
    else:
        verdict = score_answer(item, answer, similarity)
    return verdict if cut is None else replace(verdict, details={**verdict.details, "cut": bool(cut)})


# --------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Rate:
    """A pass rate over `count` counted items, with its 95% Wilson interval."""

    passed: int
    count: int
    mean_score: float

    @property
    def rate(self) -> float | None:
        return self.passed / self.count if self.count else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson_interval(self.passed, self.count)

    def to_dict(self) -> dict[str, Any]:
        interval = self.interval
        return {"rate": None if self.rate is None else round(self.rate, 4), "passed": self.passed,
                "count": self.count, "n": self.count, "mean_score": round(self.mean_score, 4),
                "ci_low": None if interval is None else round(interval[0], 4),
                "ci_high": None if interval is None else round(interval[1], 4)}


def aggregate(scores: Iterable[ItemScore], key: Callable[[ItemScore], str | None]) -> dict[str, dict[str, Any]]:
    """Pass rate, n, interval and mean hybrid score per key over counted items; keys that are None are skipped."""
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


def correction_both(by_kind: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The mean of the correction and confirmation rates (None unless both were measured), with both halves.

    Either half alone can be gamed (always "No" passes corrections, always "Yes" confirmations); their mean
    cannot. No interval is given for the mean: each half carries its own.
    """
    halves = {kind: dict(by_kind.get(kind) or Rate(0, 0, 0.0).to_dict()) for kind in ("correction", "confirmation")}
    rates = [h["rate"] for h in halves.values()]
    mean = None if any(r is None for r in rates) else round(sum(rates) / 2, 4)
    return {"rate": mean, **halves}


def summarize(scores: Sequence[ItemScore], people_kind: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Rates (with n and 95% interval) per kind, category, person, slot and split/kind, plus per kind over
    fictional people only (the targets), the correction/confirmation mean and how many answers were cut."""
    people_kind = people_kind or {}
    fictional = [s for s in scores if s.person_id and people_kind.get(s.person_id) == "fictional"]
    by_kind = aggregate(scores, lambda s: s.kind)
    fictional_by_kind = aggregate(fictional, lambda s: s.kind)
    cut_known = [s for s in scores if "cut" in s.details]
    return {
        "by_kind": {k: by_kind[k] for k in sorted(by_kind, key=_kind_rank)},
        "by_category": aggregate(scores, lambda s: s.category),
        "by_person": aggregate(scores, lambda s: s.person_id),
        "by_person_kind": aggregate(scores, lambda s: f"{s.person_id}/{s.kind}" if s.person_id else None),
        "by_slot": aggregate(scores, lambda s: s.slot),
        "by_split_kind": aggregate(scores, _split_kind),
        "fictional_by_kind": fictional_by_kind,
        "fictional_by_split_kind": aggregate(fictional, _split_kind),
        "correction_both": correction_both(by_kind),
        "fictional_correction_both": correction_both(fictional_by_kind),
        "answers_cut": {"cut": sum(bool(s.details["cut"]) for s in cut_known), "of": len(cut_known)},
        "not_counted": sum(not s.counted for s in scores),
    }


def _split_kind(score: ItemScore) -> str | None:
    return f"{score.split}/{score.kind}" if score.split else None


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
