"""People met in the inbox, persisted under ``$SLEEPTRAIN_HOME/people/<id>.yaml`` in the `data/people` format.

Their facts are what they said about themselves, as the memory store holds it after each cycle. Those facts
are not a trusted profile: the hippocampus sees such people by name only, so a later statement that
contradicts an earlier one corrects it (with history in the store) instead of being rejected as a lie.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from sleeptrain_assets.lib import settings
from sleeptrain_assets.lib.atomic import write_text_atomic
from sleeptrain_assets.lib.catalog import PATH_TOKEN, CatalogError, load_people
from sleeptrain_assets.lib.records import Memory, Person

LEARNED_KIND = "fictional"  # not a public figure: the base model cannot know them


def learned_people_dir() -> Path:
    return settings.state_dir() / "people"


def load_all_people(data_dir: Path | None = None) -> tuple[dict[str, Person], set[str]]:
    """`data/people` plus the people learned from the inbox (ids in the second value); data wins on a clash."""
    people = load_people((data_dir or settings.data_dir()) / "people")
    folder = learned_people_dir()
    learned: set[str] = set()
    if folder.is_dir() and any(folder.glob("*.yaml")):
        for pid, person in load_people(folder).items():
            if pid in people:
                continue
            people[pid] = person
            learned.add(pid)
    return people, learned


def trusted_profiles(people: Mapping[str, Person], learned: Iterable[str]) -> dict[str, Person]:
    """Profiles the hippocampus may check claims against: learned people keep their name, not their facts."""
    learned = set(learned)
    return {pid: replace(p, facts={}) if pid in learned else p for pid, p in people.items()}


def facts_from_memories(memories: Iterable[Memory]) -> dict[str, Any]:
    """Nested `facts` from active memories' slots (`birth.year`, `awards[0].name`); highest importance wins."""
    facts: dict[str, Any] = {}
    taken: set[str] = set()
    for memory in sorted(memories, key=lambda m: (m.slot, -m.importance, m.id)):
        if memory.status != "active" or memory.slot in taken:
            continue
        tokens = PATH_TOKEN.findall(memory.slot)
        if not tokens or not tokens[0][0]:
            continue
        taken.add(memory.slot)
        node: Any = facts
        for index, (name, idx) in enumerate(tokens):
            last = index == len(tokens) - 1
            key: Any = name if name else int(idx)
            nxt_is_index = not last and not tokens[index + 1][0]
            empty: Any = [] if nxt_is_index else {}
            if isinstance(node, list):
                while len(node) <= key:
                    node.append({} if not nxt_is_index else [])
                if last:
                    node[key] = _value(memory.value)
                else:
                    node = node[key]
            else:
                if last:
                    node[key] = _value(memory.value)
                else:
                    node = node.setdefault(key, empty)
    return facts


def _value(text: str) -> Any:
    stripped = text.strip()
    return int(stripped) if stripped.isdigit() and len(stripped) <= 6 else stripped


def write_learned_person(person_id: str, name: str, memories: Iterable[Memory]) -> Path | None:
    """Persist (or refresh) one learned person from their active memories; None when they hold no fact yet."""
    facts = facts_from_memories(memories)
    if not facts:
        return None
    path = learned_people_dir() / f"{person_id}.yaml"
    record = {"id": person_id, "name": name, "kind": LEARNED_KIND, "facts": facts}
    text = "# Learned from the inbox by SleepTrain; facts are the person's own words as the memory store holds them.\n"
    write_text_atomic(path, text + yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
    try:  # the file must load as any data/people file does
        load_people(path.parent)
    except CatalogError as exc:
        path.unlink(missing_ok=True)
        raise ValueError(f"learned person {person_id!r} would not load back: {exc}") from exc
    return path
