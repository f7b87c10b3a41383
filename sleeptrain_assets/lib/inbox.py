"""The inbox of new conversations (`SLEEPTRAIN_DATA_DIR/inbox/*.jsonl`): read, validate, claim per cycle.

One conversation per line: ``{"person": "<id>", "name": "<full name>", "messages": [{"role": "user" |
"assistant", "content": "..."}]}``; ``name`` is required when the id is not a known person. A file with one
bad line is set aside whole (never half-read) with an error naming the file, line and field; the rest of the
batch goes on. Which files were taken by which cycle lives in ``$SLEEPTRAIN_HOME/cycles/inbox_state.json``;
the user's inbox itself is never moved or edited.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sleeptrain_assets.lib import settings
from sleeptrain_assets.lib.atomic import write_json_atomic
from sleeptrain_assets.lib.catalog import ID_PATTERN
from sleeptrain_assets.lib.records import Conversation, Turn

INBOX_GLOB = "*.jsonl"
ROLES = ("user", "assistant")
LEDGER_FILE = "inbox_state.json"
CYCLE_PREFIX = "cycle-"
_CYCLE_RE = re.compile(r"^cycle-(\d{6,})$")


def cycle_key(number: int) -> str:
    return f"{CYCLE_PREFIX}{number:06d}"


def cycle_number(key: str) -> int:
    match = _CYCLE_RE.match(key)
    if not match:
        raise ValueError(f"{key!r} is not a cycle key (like cycle-000001)")
    return int(match.group(1))


def inbox_dir() -> Path:
    return settings.data_dir() / "inbox"


def cycles_dir() -> Path:
    return settings.state_subdir("cycles")


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def sha256_bytes(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class InboxError:
    """Why a file was set aside: file, 1-based line (None: the whole file) and field."""

    file: str
    line: int | None
    field: str | None
    problem: str

    def __str__(self) -> str:
        where = self.file + (f", line {self.line}" if self.line else "") + (f", field {self.field!r}" if self.field else "")
        return f"{where}: {self.problem}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field, "problem": self.problem}


@dataclass(frozen=True)
class InboxFile:
    """One inbox file as read: its conversations, or the error that set it aside (then no conversations)."""

    name: str
    sha256: str
    conversations: tuple[Conversation, ...] = ()
    names: Mapping[str, str] = field(default_factory=dict)  # person id -> name given in the file
    error: InboxError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _Bad(ValueError):
    def __init__(self, line: int | None, field_name: str | None, problem: str):
        super().__init__(problem)
        self.line, self.field, self.problem = line, field_name, problem


def _conversation(record: Any, line: int, file_id: str, known: Mapping[str, str],
                  names: dict[str, str]) -> Conversation:
    if not isinstance(record, dict):
        raise _Bad(line, None, "a line must be a JSON object")
    unknown = sorted(set(record) - {"person", "name", "messages", "id"})
    if unknown:
        raise _Bad(line, unknown[0], "is not a field of an inbox conversation (person, name, messages)")
    pid = record.get("person")
    if not isinstance(pid, str) or not ID_PATTERN.match(pid):
        raise _Bad(line, "person", f"must be a lowercase identifier, got {pid!r}")
    name = record.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise _Bad(line, "name", "must be a non-empty string")
    if name is not None:
        name = " ".join(name.split())
        expected = known.get(pid) or names.get(pid)
        if expected is not None and expected != name:
            raise _Bad(line, "name", f"{name!r} differs from the known name of {pid!r} ({expected!r})")
        names[pid] = name
    elif pid not in known and pid not in names:
        raise _Bad(line, "name", f"is required: {pid!r} is not a known person")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Bad(line, "messages", "must be a non-empty list of {role, content}")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _Bad(line, where, "must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _Bad(line, f"{where}.role", f"must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise _Bad(line, f"{where}.content", "must be a non-empty string")
        turns.append(Turn(role, content.strip()))
    if not any(t.role == "user" for t in turns):
        raise _Bad(line, "messages", "holds no user message (the person speaks as `user`)")
    return Conversation(id=f"inbox-{file_id}-l{line}", person_id=pid, mode="inbox", turns=tuple(turns))


def parse_inbox_bytes(name: str, raw: bytes, known: Mapping[str, str]) -> InboxFile:
    """Every conversation of one file, or none and the first error (file, line, field)."""
    digest = sha256_bytes(raw)
    file_id = f"{re.sub(r'[^A-Za-z0-9]+', '_', Path(name).stem).strip('_')[:40]}-{digest[:8]}"
    try:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Bad(None, None, f"is not UTF-8 (byte {exc.start})") from exc
        names: dict[str, str] = {}
        conversations = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise _Bad(number, None, f"is not valid JSON ({exc})") from exc
            conversations.append(_conversation(record, number, file_id, known, names))
        if not conversations:
            raise _Bad(None, None, "holds no conversations")
    except _Bad as bad:
        return InboxFile(name, digest, error=InboxError(name, bad.line, bad.field, bad.problem))
    return InboxFile(name, digest, tuple(conversations), names)


def read_inbox_file(path: Path, known: Mapping[str, str]) -> InboxFile:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return InboxFile(path.name, "", error=InboxError(path.name, None, None, f"cannot be read ({exc.strerror})"))
    return parse_inbox_bytes(path.name, raw, known)


def inbox_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(INBOX_GLOB) if p.is_file()) if folder.is_dir() else []


# --------------------------------------------------------------------------- claiming a batch


@dataclass(frozen=True)
class BatchPlan:
    """What a sensor tick (or `sleeptrain cycle`) found new in the inbox."""

    files: tuple[InboxFile, ...]  # readable, new
    rejected: tuple[InboxFile, ...]  # new but set aside
    min_conversations: int

    @property
    def conversations(self) -> int:
        return sum(len(f.conversations) for f in self.files)

    @property
    def skip_reason(self) -> str | None:
        if not self.files:
            return "no new conversation files in the inbox" + (
                f" ({len(self.rejected)} set aside)" if self.rejected else "")
        if self.conversations < self.min_conversations:
            return (f"{self.conversations} new conversation(s) in {len(self.files)} file(s), below the minimum of "
                    f"{self.min_conversations}; waiting for more")
        return None

    def claimed(self) -> dict[str, str]:
        """file name -> sha256 of every file this plan looked at (processed or set aside)."""
        return {f.name: f.sha256 for f in (*self.files, *self.rejected)}


def plan_batch(folder: Path, seen: Mapping[str, str], known: Mapping[str, str], min_conversations: int) -> BatchPlan:
    """Files whose (name, sha256) was not seen before, read and validated; a changed file counts as new."""
    fresh, bad = [], []
    for path in inbox_files(folder):
        try:
            digest = sha256_bytes(path.read_bytes())
        except OSError:
            digest = ""
        if digest and seen.get(path.name) == digest:
            continue
        read = read_inbox_file(path, known)
        (fresh if read.ok else bad).append(read)
    return BatchPlan(tuple(fresh), tuple(bad), min_conversations)


def write_rejection(read: InboxFile) -> Path:
    """Record why a file was set aside, as `cycles/rejected/<file>.error.json` (the file stays in the inbox)."""
    assert read.error is not None
    path = settings.state_subdir("cycles", "rejected") / f"{read.name}.error.json"
    write_json_atomic(path, {**read.error.to_dict(), "sha256": read.sha256, "time": now()})
    return path


# --------------------------------------------------------------------------- the ledger


def ledger_path() -> Path:
    return cycles_dir() / LEDGER_FILE


def load_ledger() -> dict[str, Any]:
    """`files`: name -> {sha256, cycle, status}; status is claimed, processed or rejected."""
    path = ledger_path()
    if not path.is_file():
        return {"files": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: inbox state is not valid JSON ({exc}); fix or remove it") from exc
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ValueError(f"{path}: inbox state must be an object with a `files` mapping")
    return data


def record_files(cycle: str, files: Mapping[str, str], status: str) -> dict[str, Any]:
    """Mark files (name -> sha256) as taken by `cycle` with `status`; returns the new ledger."""
    ledger = load_ledger()
    for name, digest in files.items():
        ledger["files"][name] = {"sha256": digest, "cycle": cycle, "status": status, "time": now()}
    write_json_atomic(ledger_path(), ledger)
    return ledger


def ledger_seen(ledger: Mapping[str, Any]) -> dict[str, str]:
    return {name: entry["sha256"] for name, entry in ledger.get("files", {}).items()}


def last_cycle_number(ledger: Mapping[str, Any], keys: Sequence[str] = ()) -> int:
    numbers = [cycle_number(e["cycle"]) for e in ledger.get("files", {}).values() if _CYCLE_RE.match(e.get("cycle", ""))]
    numbers += [cycle_number(k) for k in keys if _CYCLE_RE.match(k)]
    return max(numbers, default=0)
