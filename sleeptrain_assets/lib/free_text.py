"""Facts in free text with no slot annotations: a person's own statements, their values and a guessed slot.

A heuristic reader, not a parser: it finds years, dates, numbers, names and places in first-person
sentences and names the slot from keywords (born, moved, work, married, award, ...). Slots follow the
profile layout (``birth.year``, ``residence.city``, ``family.spouse``) so a free-text fact meets the
same fact from a profile or a template; a sentence with no known keyword gets ``note.<verb>.<kind>``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

MONTHS = (
    "january", "february", "march", "april", "may", "june",
    "july", "august", "september", "october", "november", "december",
)
_MONTH = r"(january|february|march|april|may|june|july|august|september|october|november|december)"
_DATE_MDY = re.compile(_MONTH + r"\s+(\d{1,2})(?:st|nd|rd|th)?,?\s+(\d{4})\b", re.IGNORECASE)
_DATE_DMY = re.compile(r"\b(\d{1,2})(?:st|nd|rd|th)?\s+(?:of\s+)?" + _MONTH + r",?\s+(\d{4})\b", re.IGNORECASE)
_DATE_ISO = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_YEAR = re.compile(r"(?<![\d.,])(1[0-9]{3}|20[0-9]{2})(?![\d.,]\d)")
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.]\w)")
_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
}
_COUNTED = re.compile(
    r"(?<![\w.])(\d+(?:\.\d+)?|" + "|".join(_NUMBER_WORDS) + r")\s+(?:[a-z]+\s+)?[a-z]+", re.IGNORECASE
)
_WORD = re.compile(r"[^\W_][\w'’\-]*|[.,;:!?]")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)]*\s+(?=[\"'“‘(]*[^\W\d_])")
_FIRST_PERSON = {"i", "i'm", "i’m", "i've", "i’ve", "i'd", "i’d", "my", "me", "mine", "we", "our", "us", "myself"}
_NAME_LINKS = {"of", "de", "van", "der", "den", "von", "la", "le", "du", "da", "del", "di", "y", "bin", "al"}
# Capitalised words that open sentences or name times rather than people, places or organisations.
_NOT_NAMES = {
    "i", "i'm", "i’m", "i've", "i’ve", "i'd", "i’d", "my", "we", "our", "the", "a", "an", "in", "on", "at",
    "last", "this", "that", "since", "after", "before", "when", "yes", "no", "now", "then", "today",
    "yesterday", "tomorrow", "and", "but", "so", "also", "back", "later", "recently", "actually", "well",
    "oh", "hi", "hello", "thanks", "by", "from", "to", "for", "with", "as", "it", "there", "here",
    "these", "those", "nowadays", "currently", "lately", "today's", "every", "each", "some", "most",
    "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", *MONTHS,
}
_AUXILIARIES = {
    "am", "was", "were", "have", "had", "has", "got", "get", "did", "do", "will", "would", "just", "also",
    "then", "finally", "recently", "actually", "really", "first", "once", "eventually", "'ve", "’ve", "'m",
    "’m", "'d", "’d", "never", "still", "always",
}
_PREPOSITIONS = {"in", "to", "from", "at", "near", "into", "for", "with", "by"}


@dataclass(frozen=True)
class Topic:
    name: str
    cue: re.Pattern[str]
    slots: dict[str, str]  # value kind -> slot


TOPICS: tuple[Topic, ...] = (
    Topic("birth", re.compile(r"\b(born|birth|birthday)\b", re.I),
          {"date": "birth.date", "year": "birth.year", "place": "birth.city"}),
    Topic("death", re.compile(r"\b(died|death|passed away)\b", re.I),
          {"date": "death.date", "year": "death.year", "place": "death.city"}),
    Topic("spouse", re.compile(r"\b(married|marry|marrying|wife|husband|spouse|partner|wedding)\b", re.I),
          {"name": "family.spouse", "year": "family.married_since"}),
    Topic("children", re.compile(r"\b(children|kids|child|sons?|daughters?)\b", re.I),
          {"number": "family.children"}),
    Topic("award", re.compile(r"\b(award|awarded|prize|medal|won|win|honou?red|trophy)\b", re.I),
          {"name": "awards[0].name", "year": "awards[0].year"}),
    Topic("education", re.compile(r"\b(studied|study|studying|graduated|graduate|degree|university|school|college)\b", re.I),
          {"subject": "education.degree", "name": "education.school", "year": "education.year"}),
    Topic("career", re.compile(r"\b(work|works|worked|working|job|employed|employer|joined|occupation|career|profession|hired)\b", re.I),
          {"role": "career.occupation", "name": "career.employer", "year": "career.since"}),
    Topic("residence", re.compile(r"\b(moved|move|moving|live|lives|lived|living|relocated|reside|resides|settled)\b", re.I),
          {"place": "residence.city", "year": "residence.since"}),
    Topic("hobby", re.compile(r"\b(hobby|hobbies|pastime|in my free time|spare time)\b", re.I),
          {"activity": "hobby.name"}),
)


@dataclass(frozen=True)
class ExtractedFact:
    slot: str
    value: str
    kind: str  # date | year | number | name | place | role | subject | activity
    sentence: str


# --------------------------------------------------------------------------- values


def normalize_value(value: object) -> str:
    """Case-, accent-width- and spacing-insensitive form of a value, for ids and comparisons."""
    text = unicodedata.normalize("NFKC", str(value)).casefold().strip()
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .;:!?\"'“”‘’")


def parse_date(text: str) -> str | None:
    """ISO date (YYYY-MM-DD) of the first full date in `text`, or None."""
    for pattern, order in ((_DATE_MDY, "mdy"), (_DATE_DMY, "dmy"), (_DATE_ISO, "ymd")):
        match = pattern.search(text)
        if not match:
            continue
        a, b, c = match.groups()
        if order == "mdy":
            month, day, year = MONTHS.index(a.lower()) + 1, int(b), int(c)
        elif order == "dmy":
            day, month, year = int(a), MONTHS.index(b.lower()) + 1, int(c)
        else:
            year, month, day = int(a), int(b), int(c)
        if 1 <= month <= 12 and 1 <= day <= 31:
            return f"{year:04d}-{month:02d}-{day:02d}"
    return None


def parse_number(text: str) -> float | None:
    norm = normalize_value(text)
    if norm in _NUMBER_WORDS:
        return float(_NUMBER_WORDS[norm])
    try:
        return float(norm.replace(",", ""))
    except ValueError:
        return None


def same_value(a: object, b: object) -> bool:
    """Whether two renderings name the same value: `March 3, 1984` = `3 March 1984`, `two` = `2`,
    `Leuven` = `Leuven, Belgium`."""
    na, nb = normalize_value(a), normalize_value(b)
    if na == nb:
        return True
    da, db = parse_date(str(a)), parse_date(str(b))
    if da and db:
        return da == db
    xa, xb = parse_number(na), parse_number(nb)
    if xa is not None and xb is not None:
        return xa == xb
    head_a, head_b = na.split(",")[0].strip(), nb.split(",")[0].strip()
    return bool(head_a) and head_a == head_b and ("," in na) != ("," in nb)


def value_kind(value: object) -> str:
    text = str(value).strip()
    if parse_date(text):
        return "date"
    if _YEAR.fullmatch(text):
        return "year"
    if parse_number(text) is not None:
        return "number"
    if text[:1].isupper():
        return "name"
    return "text"


def mask_values(text: str) -> str:
    """The sentence with dates, years, numbers and names replaced by their kind, lower-cased.

    Two statements with the same mask and different values say different things about the same fact.
    """
    masked = _DATE_MDY.sub(" xdatex ", text)
    masked = _DATE_DMY.sub(" xdatex ", masked)
    masked = _DATE_ISO.sub(" xdatex ", masked)
    masked = _YEAR.sub(" xyearx ", masked)
    masked = _NUMBER.sub(" xnumberx ", masked)
    tokens = _WORD.findall(masked)
    out: list[str] = []
    for i, tok in enumerate(tokens):
        lowered = tok.casefold()
        if lowered in _NUMBER_WORDS:
            out.append("xnumberx")
        elif tok[:1].isupper() and lowered not in _NOT_NAMES and (i > 0 or len(tokens) == 1):
            if not out or out[-1] != "xnamex":
                out.append("xnamex")
        elif tok not in ".,;:!?":
            out.append(lowered)
    return " ".join(out)


def values_in(text: str) -> set[str]:
    """Normalized dates, years, numbers and names a sentence states."""
    found: set[str] = set()
    for pattern in (_DATE_MDY, _DATE_DMY, _DATE_ISO):
        for m in pattern.finditer(text):
            iso = parse_date(m.group(0))
            if iso:
                found.add(iso)
    stripped = _DATE_ISO.sub(" ", _DATE_DMY.sub(" ", _DATE_MDY.sub(" ", text)))
    found |= {m.group(1) for m in _YEAR.finditer(stripped)}
    found |= {m.group(1) for m in _NUMBER.finditer(stripped) if not _YEAR.fullmatch(m.group(1))}
    found |= {normalize_value(name) for name, _ in _capitalised_runs(_WORD.findall(text))}
    return found


# --------------------------------------------------------------------------- sentences


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def sentence_with(text: str, value: str) -> str:
    """The sentence of `text` that states `value` (a leading `Label:` and quotes removed), else all of it."""
    wanted = normalize_value(value)
    sentences = split_sentences(text)
    pattern = re.compile(r"(?<!\w)" + re.escape(wanted) + r"(?!\w)") if wanted else None
    chosen = next((s for s in sentences if pattern and pattern.search(normalize_value(s))), text.strip())
    label = re.match(r"^[^:\"“]{1,40}:\s+(.+)$", chosen)
    if label and len(label.group(1).split()) >= 2:
        chosen = label.group(1)
    return chosen.strip().strip("\"“”").strip()


def is_first_person_statement(sentence: str) -> bool:
    if sentence.rstrip().endswith("?"):
        return False
    return any(tok.casefold() in _FIRST_PERSON for tok in _WORD.findall(sentence))


def _capitalised_runs(tokens: list[str]) -> list[tuple[str, int]]:
    """(name, index of its first token) for every run of capitalised words, sentence-initial words excepted
    when they are common sentence openers."""
    runs: list[tuple[str, int]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok[:1].isupper() and tok.casefold() not in _NOT_NAMES:
            start, parts = i, [tok]
            j = i + 1
            while j < len(tokens):
                nxt = tokens[j]
                if nxt[:1].isupper() and nxt.casefold() not in _NOT_NAMES:
                    parts.append(nxt)
                elif nxt.casefold() in _NAME_LINKS and j + 1 < len(tokens) and tokens[j + 1][:1].isupper():
                    parts.append(nxt)
                else:
                    break
                j += 1
            runs.append((" ".join(parts), start))
            i = j
        else:
            i += 1
    return runs


def _after(tokens: list[str], words: set[str], start: int = 0) -> int | None:
    for i in range(start, len(tokens)):
        if tokens[i].casefold() in words:
            return i
    return None


def _phrase(tokens: list[str], start: int, stop: set[str]) -> str:
    """Lower-case words from `start` up to punctuation, a stop word, a name or a number."""
    words: list[str] = []
    for tok in tokens[start:]:
        low = tok.casefold()
        if tok in ".,;:!?" or low in stop or tok[:1].isupper() or tok[:1].isdigit():
            break
        words.append(tok)
    return " ".join(words)


def _verb(tokens: list[str]) -> str:
    """The first word after the sentence's subject pronoun that is not an auxiliary (for `note.*` slots)."""
    for i, tok in enumerate(tokens):
        if tok.casefold() in {"i", "we", "i've", "i’ve", "i'm", "i’m", "i'd", "i’d"}:
            for nxt in tokens[i + 1 :]:
                low = nxt.casefold()
                if low in _AUXILIARIES or nxt in ".,;:!?":
                    continue
                return re.sub(r"[^a-z0-9]", "", low) or "said"
    return "said"


def extract_facts(text: str, person_name: str | None = None) -> list[ExtractedFact]:
    """Facts a person states about themself in `text` (first-person sentences only)."""
    own_name = normalize_value(person_name) if person_name else None
    facts: list[ExtractedFact] = []
    seen: set[tuple[str, str]] = set()
    for sentence in split_sentences(text):
        if not is_first_person_statement(sentence):
            continue
        tokens = _WORD.findall(sentence)
        topics = [t for t in TOPICS if t.cue.search(sentence)]
        found: list[tuple[str, str]] = []  # (kind, value)

        date_match = next((m for p in (_DATE_MDY, _DATE_DMY, _DATE_ISO) if (m := p.search(sentence))), None)
        if date_match:
            found.append(("date", date_match.group(0)))
        rest = sentence.replace(date_match.group(0), " ") if date_match else sentence
        years = [m.group(1) for m in _YEAR.finditer(rest)]
        if date_match:
            years.insert(0, parse_date(date_match.group(0))[:4])  # type: ignore[index]
        if years:
            found.append(("year", years[0]))
        counts = (m.group(1) for m in _COUNTED.finditer(rest) if not _YEAR.fullmatch(m.group(1)))
        count = next(counts, None)
        if count is not None:
            number = parse_number(count)
            found.append(("number", f"{number:g}" if number is not None else count))

        runs = [(name, idx) for name, idx in _capitalised_runs(tokens) if normalize_value(name) != own_name]
        places = [name for name, idx in runs if idx > 0 and tokens[idx - 1].casefold() in _PREPOSITIONS]
        if places:
            found.append(("place", places[0].split(",")[0]))
        named = [name for name, _ in runs if name not in places[:1]] or [name for name, _ in runs]
        if named:
            found.append(("name", named[0]))

        role_at = _after(tokens, {"as"})
        if role_at is not None:
            start = role_at + 1 + (1 if role_at + 1 < len(tokens) and tokens[role_at + 1].casefold() in {"a", "an", "the"} else 0)
            role = _phrase(tokens, start, {"at", "for", "in", "since", "with", "and", "from"})
            if role:
                found.append(("role", role))
        study_at = _after(tokens, {"studied", "study", "studying", "majored"})
        if study_at is not None:
            subject = _phrase(tokens, study_at + 1, {"at", "in", "for", "since", "with", "and", "from"})
            if subject:
                found.append(("subject", subject))
        if any(t.name == "hobby" for t in topics):
            cue = _after(tokens, {"enjoy", "love", "like", "is", "are"})
            if cue is not None:
                activity = _phrase(tokens, cue + 1, {"in", "at", "on", "with", "since", "and"})
                if activity:
                    found.append(("activity", activity))

        has_name = any(kind == "name" and value not in places[:1] for kind, value in found)
        for kind, value in found:
            if topics:
                slot = next((t.slots[kind] for t in topics if kind in t.slots), None)
                if slot is None and kind == "place" and not has_name:
                    # "I work at Atelier Noord": the place is the organisation the topic names.
                    slot = next((t.slots["name"] for t in topics if "name" in t.slots), None)
                if slot is None:
                    continue
            elif kind in ("date", "year", "number", "name", "place"):
                slot = f"note.{_verb(tokens)}.{kind}"
            else:
                continue
            key = (slot, normalize_value(value))
            if key in seen:
                continue
            seen.add(key)
            facts.append(ExtractedFact(slot=slot, value=value.strip(), kind=kind, sentence=sentence))
    # A topic slot filled twice in one text (two places for `residence.city`) keeps only the first value.
    first_per_slot: dict[str, ExtractedFact] = {}
    for fact in facts:
        first_per_slot.setdefault(fact.slot, fact)
    return [f for f in facts if first_per_slot[f.slot] is f]
