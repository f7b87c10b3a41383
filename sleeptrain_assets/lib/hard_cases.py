"""SPICE-style hard cases: wrong values mined for people who listed none, so they too learn to deny false claims.

A person read from the inbox states only their own facts; with no `wrong_values` no correction template applies
to them, so a challenger never trains a denial for them and the cycle never asks one. Mining gives each of their
slots wrong values in order of difficulty: values the person once stated and later corrected (superseded
memories: the near-contradictions), then other people's values of the same slot, closest first (the nearest year,
the most similar name). The last mined value is held out for the evaluation item, like a listed one
(`templating.eval_wrong_value`), the others become training denials.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from sleeptrain_assets.lib.records import Person
from sleeptrain_assets.lib.templating import (
    TemplateSet,
    competing_values,
    person_values,
    slot_values,
)

WRONG_VALUES_PER_SLOT = 3  # two trained denials and one held out for evaluation
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def hardness(true_value: str, wrong: str) -> tuple[float, str]:
    """Sort key, hardest first: numeric distance for numbers (1980 is harder than 1920 against 1979), text
    similarity otherwise; ties by value."""
    a, b = _NUMBER.fullmatch(true_value.strip()), _NUMBER.fullmatch(wrong.strip())
    if a and b:
        return abs(float(a.group()) - float(b.group())), wrong
    return 1.0 - difflib.SequenceMatcher(None, true_value.lower(), wrong.lower()).ratio(), wrong


def rank_wrong_values(true_value: str, superseded: Sequence[str], others: Iterable[str],
                      count: int = WRONG_VALUES_PER_SLOT) -> list[str]:
    """Up to `count` wrong values, hardest first: corrected statements, then other people's values by hardness."""
    truth = true_value.strip().lower()
    seen = {truth}
    ranked: list[str] = []
    for value in [*superseded, *sorted(set(others), key=lambda v: hardness(true_value, v))]:
        key = value.strip().lower()
        # "Ghent" against "Ghent, Belgium" is no false claim: a denial would have to contradict itself.
        if key and key not in seen and key not in truth and truth not in key:
            seen.add(key)
            ranked.append(value)
    return ranked[:count]


def with_hard_cases(
    people: Mapping[str, Person],
    templates: TemplateSet,
    person_ids: Iterable[str],
    superseded: Mapping[tuple[str, str], Sequence[str]],
    count: int = WRONG_VALUES_PER_SLOT,
) -> tuple[dict[str, Person], dict[str, dict[str, list[str]]]]:
    """`people` with mined wrong values for each of `person_ids`' correction slots that lists none.

    `superseded` maps (person id, slot) to the values that person stated before correcting them, newest first.
    Returns the people (others unchanged) and what was mined: person id -> wrong key -> values.
    """
    by_person = slot_values(people, templates)
    out = dict(people)
    mined: dict[str, dict[str, list[str]]] = {}
    wrong_keys = sorted({t.wrong_key for t in templates.templates.values() if t.category == "correction" and t.wrong_key})
    for pid in sorted(set(person_ids)):
        person = people.get(pid)
        if person is None:
            continue
        values = person_values(person, templates)
        added: dict[str, list[str]] = {}
        for key in wrong_keys:
            if person.wrong_values.get(key) or key not in values or key not in templates.extractors:
                continue
            slot = templates.slot(key)
            from_profiles = competing_values(person, slot, values[key], templates, by_person)
            ranked = rank_wrong_values(values[key], superseded.get((pid, slot), ()), from_profiles, count)
            if ranked:
                added[key] = ranked
        if added:
            out[pid] = replace(person, wrong_values={**person.wrong_values, **added})
            mined[pid] = added
    return out, mined
