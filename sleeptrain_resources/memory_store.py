"""Where hippocampus decisions and memories persist: one contract, two backends, chosen in one place.

- `LocalMemoryStore`: rows in SQLite (WAL, one transaction per write) plus a FAISS index of the vectors
  that is rebuilt from the rows whenever it is missing, stale or corrupt (the rows are the truth).
- `PgVectorMemoryStore`: Postgres with pgvector, `vector(384)` and an HNSW cosine index. New rows reach the
  index in folds rather than one by one (an HNSW insert costs ~50x a row write); until then an exact scan of
  the small unindexed tail keeps every query complete.

Both share the write planner below, so a decision means the same thing on either backend. Every change
appends an operation-log row (STORE, REJECT, CORRECT, MERGE, EVICT, PROMOTE) with its reason in the same
transaction; rows are never deleted and never changed without a log row. At most one memory per person
and slot is active (a unique index enforces it), so concurrent writers cannot leave two.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
from pydantic import PrivateAttr

from sleeptrain_assets.lib import settings
from sleeptrain_assets.lib.hippocampus import memory_id as deterministic_memory_id
from sleeptrain_assets.lib.records import Decision, Memory
from sleeptrain_assets.lib.atomic import write_text_atomic
from sleeptrain_resources.embedding import DIM, MODEL_ID

log = logging.getLogger(__name__)

STATUSES = ("active", "superseded", "evicted")
OPS = ("STORE", "REJECT", "CORRECT", "MERGE", "EVICT", "PROMOTE")
DECISION_ACTIONS = ("STORE", "REJECT", "CORRECT", "MERGE")
SCHEMA_VERSION = "1"
_MEMORY_COLUMNS = (
    "id", "person_id", "person_key", "slot", "slot_key", "value", "text", "embedding", "importance",
    "source", "sources", "status", "tier", "created_at", "updated_at",
)
_LOG_COLUMNS = ("at", "op", "memory_id", "person_id", "slot", "value", "reason", "related_id", "details")


class EmbeddingMismatchError(ValueError):
    """The store holds vectors of another embedding model or dimension."""


class MemoryStoreError(ValueError):
    """Bad input to the store: the message names the record and the field; nothing was written."""


class MemoryStoreUnreachable(dg.Failure):
    """The store's database server cannot be reached: one line naming the host (never the password), no stack
    of driver internals; Dagster may retry the step."""

    def __init__(self, description: str):
        super().__init__(description=description, allow_retries=True)


@dataclass(frozen=True)
class ApplyReport:
    """What one write did: log rows per operation and the memories it touched."""

    operations: dict[str, int]
    written: tuple[str, ...] = ()  # inserted or re-activated
    superseded: tuple[str, ...] = ()
    merged: tuple[str, ...] = ()  # memories that absorbed a new source
    changed: tuple[str, ...] = ()  # evicted or promoted

    @property
    def log_rows(self) -> int:
        return sum(self.operations.values())

    def to_dict(self) -> dict[str, Any]:
        return {"operations": dict(self.operations), "written": len(self.written),
                "superseded": len(self.superseded), "merged": len(self.merged), "changed": len(self.changed),
                "log_rows": self.log_rows}


@dataclass(frozen=True)
class StatusChange:
    """One consolidation step: EVICT (-> evicted), MERGE or CORRECT (-> superseded, into `related_id`),
    PROMOTE (-> long-term tier, stays active)."""

    op: str
    memory_id: str
    reason: str
    related_id: str | None = None

    def status(self) -> str:
        targets = {"EVICT": "evicted", "MERGE": "superseded", "CORRECT": "superseded", "PROMOTE": "active"}
        if self.op not in targets:
            raise MemoryStoreError(f"status change of {self.memory_id!r}: op {self.op!r} is not one of "
                                   f"{sorted(targets)}")
        return targets[self.op]


def _key(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:32]


def person_key(person_id: str) -> str:
    return _key(person_id)


def slot_key(person_id: str, slot: str) -> str:
    return _key(person_id, slot)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value or "")


# --------------------------------------------------------------------------- the write planner


@dataclass
class _Row:
    """A memory row as a write sees it; `vector` is set for rows this write inserts."""

    id: str
    person_id: str
    slot: str
    value: str
    text: str
    importance: float
    source: str
    sources: list[str]
    status: str
    tier: str
    created_at: datetime
    updated_at: datetime
    vector: np.ndarray | None = None
    new: bool = False
    was_active: bool = False

    @property
    def slot_key(self) -> str:
        return slot_key(self.person_id, self.slot)


@dataclass
class _Plan:
    """Applies operations to a snapshot of the rows they touch; the backend then persists the result."""

    rows: dict[str, _Row]
    now: datetime
    active: dict[str, str] = field(default_factory=dict)  # slot key -> active memory id
    changed: set[str] = field(default_factory=set)
    inserted: list[str] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    status_changed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for row in self.rows.values():
            row.was_active = row.status == "active"
            if row.status == "active":
                self.active[row.slot_key] = row.id

    def _log(self, op: str, row_like: _Row, reason: str, related: str | None, details: Mapping[str, Any]) -> None:
        self.log.append({
            "at": self.now, "op": op, "memory_id": row_like.id, "person_id": row_like.person_id,
            "slot": row_like.slot, "value": row_like.value, "reason": reason, "related_id": related,
            "details": json.dumps(dict(details), ensure_ascii=False, sort_keys=True, default=str),
        })

    def _touch(self, row: _Row) -> None:
        row.updated_at = self.now
        if not row.new:
            self.changed.add(row.id)

    def _supersede(self, old_id: str, by: _Row, reason: str, details: Mapping[str, Any]) -> None:
        old = self.rows[old_id]
        old.status = "superseded"
        self._touch(old)
        if self.active.get(old.slot_key) == old.id:
            del self.active[old.slot_key]
        self.superseded.append(old.id)
        self._log("CORRECT", old, f"superseded by {by.id} ({by.slot} = {by.value!r}): {reason}", by.id, details)

    def put(self, new: _Row, op: str, reason: str, details: Mapping[str, Any], supersede: Sequence[str] = ()) -> None:
        """Make `new` the active memory of its slot, retiring whatever held the slot (logged as CORRECT)."""
        label = op
        current = self.active.get(new.slot_key)
        retire = [s for s in (*supersede, current) if s and s != new.id and s in self.rows
                  and self.rows[s].status == "active"]
        for sid in dict.fromkeys(retire):
            if op == "STORE":
                label = "CORRECT"
                reason = f"the slot was held by {sid} with another value; {reason}"
            self._supersede(sid, new, reason, details)
        related = retire[0] if retire else None
        existing = self.rows.get(new.id)
        if existing is not None and existing.status == "active":
            self.merge(existing.id, new, reason, details)
            return
        if existing is not None:
            previous = existing.status
            existing.status = "active"
            existing.importance = max(existing.importance, new.importance)
            if new.source and new.source not in existing.sources:
                existing.sources.append(new.source)
            self._touch(existing)
            self.active[existing.slot_key] = existing.id
            self.written.append(existing.id)
            self._log(label, existing, f"{reason} (re-activates a {previous} memory)", related, details)
            return
        new.new = True
        new.status = "active"
        self.rows[new.id] = new
        self.inserted.append(new.id)
        self.active[new.slot_key] = new.id
        self.written.append(new.id)
        self._log(label, new, reason, related, details)

    def merge(self, target_id: str | None, new: _Row, reason: str, details: Mapping[str, Any]) -> None:
        target = self.rows.get(target_id or "")
        if target is None or target.status != "active":
            state = "missing" if target is None else target.status
            self.put(new, "STORE", f"merge target {target_id} is {state}, stored instead: {reason}", details)
            return
        related = new.id if new.id != target.id else None
        if new.source and new.source in target.sources:
            self._log("MERGE", target, f"{reason}; source {new.source} already recorded, nothing changed",
                      related, details)
            return
        before = target.importance
        target.importance = max(target.importance, new.importance)
        if new.source:
            target.sources.append(new.source)
        self._touch(target)
        self.merged.append(target.id)
        self._log("MERGE", target, f"{reason} (importance {before:.2f} -> {target.importance:.2f})", related, details)

    def reject(self, row_like: _Row, reason: str, details: Mapping[str, Any]) -> None:
        self._log("REJECT", row_like, reason, None, details)

    def set_status(self, ids: Sequence[str], status: str, op: str, reason: str, related: str | None) -> None:
        for mid in dict.fromkeys(ids):
            row = self.rows.get(mid)
            if row is None:
                raise MemoryStoreError(f"set_status: memory {mid!r} does not exist")
            if op == "PROMOTE":
                if row.status != "active":
                    raise MemoryStoreError(f"set_status: cannot PROMOTE memory {mid!r}, it is {row.status}")
                if row.tier == "long":
                    continue
                row.tier = "long"
            else:
                if row.status == status:
                    continue
                if row.status != "active":
                    raise MemoryStoreError(f"set_status: memory {mid!r} is {row.status}; only active memories "
                                           f"can be {status}")
                row.status = status
                if self.active.get(row.slot_key) == row.id:
                    del self.active[row.slot_key]
            self._touch(row)
            self.status_changed.append(row.id)
            self._log(op, row, reason, related, {"status": row.status, "tier": row.tier})

    def report(self) -> ApplyReport:
        counts = {op: 0 for op in OPS}
        for entry in self.log:
            counts[entry["op"]] += 1
        return ApplyReport(counts, tuple(self.written), tuple(self.superseded), tuple(self.merged),
                           tuple(self.status_changed))

    def changed_rows(self) -> tuple[list[_Row], list[_Row]]:
        """(rows leaving `active` first, then the other changed rows): that order never has two actives."""
        rows = [self.rows[i] for i in sorted(self.changed)]
        leaving = [r for r in rows if r.was_active and r.status != "active"]
        others = [r for r in rows if not (r.was_active and r.status != "active")]
        return leaving, others


# --------------------------------------------------------------------------- validation


_NUL = "\x00"


def _check_text(where: str, field_name: str, value: Any, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise MemoryStoreError(f"{where}: field {field_name!r} must be a string, got {type(value).__name__}")
    if _NUL in value:
        raise MemoryStoreError(f"{where}: field {field_name!r} contains a NUL character, which no backend stores")
    if not allow_empty and not value.strip():
        raise MemoryStoreError(f"{where}: field {field_name!r} is empty")
    return value


def _unit(where: str, vector: Any, dim: int) -> np.ndarray:
    try:
        arr = np.asarray(vector, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise MemoryStoreError(f"{where}: field 'embedding' is not a numeric vector ({exc})") from exc
    if arr.shape[0] != dim:
        raise EmbeddingMismatchError(f"{where}: embedding has {arr.shape[0]} dimensions, the store holds {dim}")
    if not np.all(np.isfinite(arr)):
        raise MemoryStoreError(f"{where}: field 'embedding' holds NaN or infinite values")
    norm = float(np.linalg.norm(arr))
    if norm == 0.0:
        raise MemoryStoreError(f"{where}: field 'embedding' is the zero vector")
    return arr / norm


def _unit_rows(where: str, vectors: Any, n: int, dim: int, labels: Sequence[str] | None = None) -> np.ndarray:
    """Unit rows of an n x dim matrix; a bad row is named by its label (the record it belongs to)."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise MemoryStoreError(f"{where}: embeddings must have one row per item ({n}), got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise EmbeddingMismatchError(f"{where}: embeddings have {arr.shape[1]} dimensions, the store holds {dim}")

    def name(row: int) -> str:
        return labels[row] if labels is not None else f"{where}: embedding row {row}"

    finite = np.all(np.isfinite(arr), axis=1)
    if not np.all(finite):
        raise MemoryStoreError(f"{name(int(np.argmin(finite)))}: field 'embedding' holds NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise MemoryStoreError(f"{name(int(np.argmin(norms[:, 0])))}: field 'embedding' is the zero vector")
    return arr / norms


def _finite(where: str, field_name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise MemoryStoreError(f"{where}: field {field_name!r} is not a number ({value!r})") from exc
    if not math.isfinite(number):
        raise MemoryStoreError(f"{where}: field {field_name!r} is not finite ({value!r})")
    return number


# --------------------------------------------------------------------------- the contract


class MemoryStore(dg.ConfigurableResource, ABC):
    """Where hippocampus decisions and memories persist; every change is logged with its reason."""

    embedding_model: str = MODEL_ID
    embedding_dim: int = DIM

    # ---- writes (shared: the planner decides, the backend persists in one transaction)

    def apply(self, decisions: Sequence[Decision], embeddings: Any) -> ApplyReport:
        """Apply hippocampus decisions atomically: STORE inserts, CORRECT supersedes and inserts, MERGE
        strengthens the memory it names, REJECT is logged only. `embeddings` has one row per decision
        (the vector of its candidate's text; rows of REJECTs are not read)."""
        decisions = list(decisions)
        if not decisions:
            return _Plan({}, _now()).report()
        writes = [i for i, d in enumerate(decisions) if d.action != "REJECT"]
        vectors = np.zeros((len(decisions), self.embedding_dim), dtype=np.float32)
        if writes:
            raw = np.asarray(embeddings, dtype=np.float32)
            if raw.ndim != 2 or raw.shape[0] != len(decisions):
                raise MemoryStoreError(f"apply: embeddings must have one row per decision ({len(decisions)}), "
                                       f"got shape {raw.shape}")
            labels = [f"decision {i} ({decisions[i].action} {decisions[i].candidate.person_id!r}/"
                      f"{decisions[i].candidate.slot!r})" for i in writes]
            vectors[writes] = _unit_rows("apply", raw[writes], len(writes), self.embedding_dim, labels)
        rows: list[_Row] = []
        now = _now()
        for i, d in enumerate(decisions):
            where = f"decision {i} ({d.action} {d.candidate.person_id!r}/{d.candidate.slot!r})"
            if d.action not in DECISION_ACTIONS:
                raise MemoryStoreError(f"{where}: field 'action' is {d.action!r}, not one of {DECISION_ACTIONS}")
            c = d.candidate
            for name in ("person_id", "slot"):
                _check_text(where, name, getattr(c, name), allow_empty=False)
            for name in ("value", "text", "conversation_id"):
                _check_text(where, name, getattr(c, name))
            _check_text(where, "reason", d.reason)
            importance = _finite(where, "importance", d.importance)
            own_id = deterministic_memory_id(c.person_id, c.slot, c.value)
            rows.append(_Row(
                id=(d.memory_id if d.action in ("STORE", "CORRECT", "REJECT") and d.memory_id else own_id),
                person_id=c.person_id, slot=c.slot, value=c.value, text=c.text, importance=importance,
                source=f"{c.conversation_id}#{c.turn_index}", sources=[f"{c.conversation_id}#{c.turn_index}"],
                status="active", tier="short", created_at=now, updated_at=now, vector=vectors[i],
            ))
        ids = {r.id for r in rows} | {d.memory_id for d in decisions if d.memory_id}
        ids |= {d.superseded_id for d in decisions if d.superseded_id}
        slots = {r.slot_key for r in rows}

        def plan(snapshot: dict[str, _Row]) -> _Plan:
            p = _Plan(snapshot, now)
            for d, row in zip(decisions, rows):
                details = {"importance": row.importance, "scores": d.scores, "source": row.source,
                           "claim": d.candidate.claim, "template_id": d.candidate.template_id, "text": row.text,
                           "decision": d.action}
                if d.action == "REJECT":
                    p.reject(row, d.reason, details)
                elif d.action == "MERGE":
                    p.merge(d.memory_id, _fresh(row), d.reason, details)
                else:
                    supersede = [d.superseded_id] if d.superseded_id else []
                    p.put(_fresh(row), d.action, d.reason, details, supersede)
            return p

        return self._write(ids, slots, plan).report()

    def upsert(self, memories: Sequence[Memory], embeddings: Any = None) -> ApplyReport:
        """Insert memories in one transaction (a memory whose id exists absorbs the new source; one whose slot
        is held by another value supersedes it). `embeddings` (n x dim) overrides `Memory.embedding`."""
        memories = list(memories)
        if not memories:
            return _Plan({}, _now()).report()
        if embeddings is not None:
            vectors = _unit_rows("upsert", embeddings, len(memories), self.embedding_dim,
                                 [f"memory {i} ({m.id!r})" for i, m in enumerate(memories)])
        else:
            vectors = np.stack([_unit(f"memory {i} ({m.id!r})", m.embedding, self.embedding_dim)
                                for i, m in enumerate(memories)])
        now = _now()
        rows: list[_Row] = []
        for i, m in enumerate(memories):
            where = f"memory {i} ({m.id!r})" if isinstance(m.id, str) else f"memory {i}"
            _check_text(where, "id", m.id, allow_empty=False)
            for name in ("person_id", "slot"):
                _check_text(where, name, getattr(m, name), allow_empty=False)
            for name in ("value", "text", "source"):
                _check_text(where, name, getattr(m, name))
            if m.status != "active":
                raise MemoryStoreError(f"{where}: field 'status' is {m.status!r}; upsert writes active memories "
                                       "(use set_status to retire one)")
            rows.append(_Row(m.id, m.person_id, m.slot, m.value, m.text, _finite(where, "importance", m.importance),
                             m.source, [m.source] if m.source else [], "active", "short", now, now, vectors[i]))
        ids = {r.id for r in rows}
        slots = {r.slot_key for r in rows}

        def plan(snapshot: dict[str, _Row]) -> _Plan:
            p = _Plan(snapshot, now)
            for row in rows:
                details = {"importance": row.importance, "source": row.source, "via": "upsert"}
                p.put(_fresh(row), "STORE", "upserted", details)
            return p

        return self._write(ids, slots, plan).report()

    def set_status(self, ids: Sequence[str], status: str, op: str, reason: str,
                   related_id: str | None = None) -> int:
        """Retire or promote memories (EVICT -> evicted, MERGE/CORRECT -> superseded, PROMOTE -> long-term
        tier, still active), each with a log row; returns how many changed."""
        changes = [StatusChange(op, i, reason, related_id) for i in ids]
        if changes and changes[0].status() != status:
            raise MemoryStoreError(f"set_status: op {op} sets status {changes[0].status()!r}, not {status!r}")
        return len(self.apply_status_changes(changes).changed)

    def apply_status_changes(self, changes: Sequence[StatusChange]) -> ApplyReport:
        """Several status changes (e.g. one consolidation pass) in one transaction, each with its own reason.
        A change that would not change anything (already evicted, already promoted) writes no log row."""
        changes = list(changes)
        for i, change in enumerate(changes):
            change.status()
            _check_text(f"status change {i}", "memory_id", change.memory_id, allow_empty=False)
            _check_text(f"status change {i}", "reason", change.reason, allow_empty=False)
        if not changes:
            return _Plan({}, _now()).report()
        now = _now()

        def plan(snapshot: dict[str, _Row]) -> _Plan:
            p = _Plan(snapshot, now)
            for change in changes:
                related = p.rows.get(change.related_id or "")
                if change.related_id is not None and related is None:
                    raise MemoryStoreError(f"{change.op} {change.memory_id!r}: related memory "
                                           f"{change.related_id!r} does not exist")
                if change.op == "MERGE" and (related is None or related.status != "active"
                                             or change.related_id == change.memory_id):
                    raise MemoryStoreError(f"MERGE {change.memory_id!r} needs another, active memory to merge "
                                           f"into (got {change.related_id!r})")
                p.set_status([change.memory_id], change.status(), change.op, change.reason, change.related_id)
            return p

        ids = {c.memory_id for c in changes} | {c.related_id for c in changes if c.related_id}
        return self._write(ids, set(), plan).report()

    # ---- reads and backend primitives

    @abstractmethod
    def _write(self, ids: set[str], slot_keys: set[str], plan: Callable[[dict[str, _Row]], _Plan]) -> _Plan:
        """In one transaction holding the store's writer lock: snapshot the rows with these ids and the active
        rows of these slots, build the plan, persist its rows and log rows; commit."""

    @abstractmethod
    def get(self, memory_id: str) -> Memory | None: ...

    @abstractmethod
    def by_person(self, person_id: str, status: str | None = "active") -> list[Memory]: ...

    @abstractmethod
    def by_slot(self, person_id: str, slot: str, status: str | None = "active") -> list[Memory]: ...

    @abstractmethod
    def nearest(self, embedding: Any, k: int = 10, person_id: str | None = None,
                status: str | None = "active") -> list[tuple[Memory, float]]:
        """The k memories closest to `embedding` by cosine (highest first), filtered by person and status;
        k rows whenever k match the filter."""

    @abstractmethod
    def history(self, memory_id: str) -> list[dict[str, Any]]:
        """Log rows about a memory (as subject or as the related memory), oldest first."""

    @abstractmethod
    def operations(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The operation log, oldest first (the last `limit` rows when given)."""

    @abstractmethod
    def active_memories(self, person_id: str | None = None) -> list[Memory]: ...

    @abstractmethod
    def promoted_ids(self) -> set[str]:
        """Ids of memories promoted to the long-term tier."""

    @abstractmethod
    def count(self, status: str | None = "active") -> int: ...

    @abstractmethod
    def count_by_person(self, status: str | None = "active") -> dict[str, int]: ...

    @abstractmethod
    def stored_embedding(self) -> tuple[str, int]:
        """(model id, dimension) the store was created for."""

    def check_embedding(self, model_id: str, dim: int) -> None:
        """Refuse vectors from another model or dimension than the store holds."""
        held_model, held_dim = self.stored_embedding()
        if (held_model, int(held_dim)) != (model_id, int(dim)):
            raise EmbeddingMismatchError(
                f"{self.describe()} holds {held_dim}-d vectors from {held_model!r}; refusing {dim}-d vectors from "
                f"{model_id!r}. Point the store elsewhere or re-embed its memories."
            )

    def _refuse_mismatch(self, held: Mapping[str, str]) -> None:
        """Opening a store configured for other vectors than it holds fails before anything is read."""
        if (held["embedding_model"], int(held["embedding_dim"])) != (self.embedding_model, int(self.embedding_dim)):
            raise EmbeddingMismatchError(
                f"{self.describe()} holds {held['embedding_dim']}-d vectors from {held['embedding_model']!r}, but "
                f"this store is configured for {self.embedding_dim}-d vectors from {self.embedding_model!r}"
            )

    @abstractmethod
    def describe(self) -> str:
        """Where the store lives (no secrets)."""

    def index_pending(self) -> int:
        """Bring deferred index work up to date (a maintenance step); returns the rows it indexed."""
        return 0

    def close(self) -> None:
        """Release connections and in-memory indexes."""

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def _validate_status(self, status: str | None) -> None:
        if status is not None and status not in STATUSES:
            raise MemoryStoreError(f"status {status!r} is not one of {STATUSES} (or None for all)")

    def _query_vector(self, embedding: Any, k: int) -> np.ndarray:
        if not isinstance(k, int) or k < 1:
            raise MemoryStoreError(f"nearest: k must be a positive integer, got {k!r}")
        return _unit("nearest", embedding, self.embedding_dim)


def _fresh(row: _Row) -> _Row:
    return _Row(**{**row.__dict__, "sources": list(row.sources)})


def _memory(id: str, person_id: str, slot: str, value: str, text: str, vector: Any, importance: float,
            source: str, status: str, created_at: Any, updated_at: Any) -> Memory:
    if hasattr(vector, "to_numpy"):  # pgvector's Vector
        vector = vector.to_numpy()
    vec = np.asarray(vector, dtype=np.float32).reshape(-1)
    return Memory(id=id, person_id=person_id, slot=slot, value=value, text=text,
                  embedding=tuple(vec.tolist()), importance=float(importance), source=source, status=status,
                  created_at=_iso(created_at), updated_at=_iso(updated_at))


# --------------------------------------------------------------------------- local: SQLite + FAISS


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS memories (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    person_id TEXT NOT NULL,
    person_key TEXT NOT NULL,
    slot TEXT NOT NULL,
    slot_key TEXT NOT NULL,
    value TEXT NOT NULL,
    text TEXT NOT NULL,
    embedding BLOB NOT NULL,
    importance REAL NOT NULL,
    source TEXT NOT NULL,
    sources TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'superseded', 'evicted')),
    tier TEXT NOT NULL CHECK (tier IN ('short', 'long')),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS memories_one_active_per_slot ON memories (slot_key) WHERE status = 'active';
CREATE INDEX IF NOT EXISTS memories_by_person ON memories (person_key, status);
CREATE INDEX IF NOT EXISTS memories_by_slot ON memories (slot_key, status);
CREATE TABLE IF NOT EXISTS operations (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('STORE', 'REJECT', 'CORRECT', 'MERGE', 'EVICT', 'PROMOTE')),
    memory_id TEXT,
    person_id TEXT NOT NULL,
    slot TEXT NOT NULL,
    value TEXT NOT NULL,
    reason TEXT NOT NULL,
    related_id TEXT,
    details TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS operations_by_memory ON operations (memory_id);
CREATE INDEX IF NOT EXISTS operations_by_related ON operations (related_id);
"""
_SQLITE_MEMORY = ("id, person_id, slot, value, text, embedding, importance, source, status, created_at, "
                  "updated_at")
_CHUNK = 900  # stays under SQLite's bound-parameter limit on every build


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class LocalMemoryStore(MemoryStore):
    """Embedded store: SQLite rows (WAL) + a FAISS index rebuilt from the rows when missing or stale."""

    root: str = ""  # empty: SLEEPTRAIN_HOME/memory, resolved at first use
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 64
    exact_below: int = 4096  # fewer vectors than this: an exact (flat) index

    _conn: Any = PrivateAttr(default=None)
    _pid: int = PrivateAttr(default=0)
    _lock: Any = PrivateAttr(default_factory=threading.RLock)
    _index: Any = PrivateAttr(default=None)
    _indexed_max: int = PrivateAttr(default=0)
    _unsaved: int = PrivateAttr(default=0)
    _meta: dict[str, str] = PrivateAttr(default_factory=dict)

    # ---- files and connection

    @property
    def folder(self) -> Path:
        path = Path(self.root).expanduser() if self.root else settings.state_subdir("memory")
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def db_path(self) -> Path:
        return self.folder / "memories.sqlite"

    @property
    def index_path(self) -> Path:
        return self.folder / "faiss.index"

    @property
    def index_meta_path(self) -> Path:
        return self.folder / "faiss.meta.json"

    def describe(self) -> str:
        return f"local memory store at {self.folder}"

    def _db(self) -> sqlite3.Connection:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                return self._conn
            conn = sqlite3.connect(self.db_path, timeout=60.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SQLITE_SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                held = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                if not held:
                    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
                        ("embedding_model", self.embedding_model), ("embedding_dim", str(self.embedding_dim)),
                        ("store_uuid", uuid.uuid4().hex), ("schema_version", SCHEMA_VERSION)])
                    held = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                conn.close()
                raise
            try:
                self._refuse_mismatch(held)
            except EmbeddingMismatchError:
                conn.close()
                raise
            self._conn, self._pid, self._index, self._indexed_max = conn, os.getpid(), None, 0
            self._meta = held
            return conn

    def stored_embedding(self) -> tuple[str, int]:
        self._db()
        return self._meta["embedding_model"], int(self._meta["embedding_dim"])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._save_index_if_dirty()
                self._conn.close()
            self._conn, self._index, self._indexed_max, self._unsaved = None, None, 0, 0

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._db()
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    # ---- writes

    def _write(self, ids: set[str], slot_keys: set[str], plan: Callable[[dict[str, _Row]], _Plan]) -> _Plan:
        with self._transaction() as conn:
            snapshot: dict[str, _Row] = {}
            select = ("SELECT id, person_id, slot, value, text, importance, source, sources, status, tier, "
                      "created_at, updated_at FROM memories WHERE ")
            id_list, key_list = sorted(ids), sorted(slot_keys)
            for part in _chunks(id_list):
                q = select + f"id IN ({','.join('?' * len(part))})"
                for r in conn.execute(q, tuple(part)):
                    snapshot[r[0]] = self._row(r)
            for part in _chunks(key_list):
                q = select + f"status = 'active' AND slot_key IN ({','.join('?' * len(part))})"
                for r in conn.execute(q, tuple(part)):
                    snapshot.setdefault(r[0], self._row(r))
            result = plan(snapshot)
            leaving, others = result.changed_rows()
            update = ("UPDATE memories SET status = ?, tier = ?, importance = ?, sources = ?, updated_at = ? "
                      "WHERE id = ?")
            for group in (leaving, others):
                conn.executemany(update, [(r.status, r.tier, r.importance, json.dumps(r.sources, ensure_ascii=False),
                                           _iso(r.updated_at), r.id) for r in group])
            new_rows = [result.rows[i] for i in result.inserted]
            conn.executemany(
                f"INSERT INTO memories ({', '.join(c for c in _MEMORY_COLUMNS)}) VALUES "
                f"({', '.join('?' * len(_MEMORY_COLUMNS))})",
                [(r.id, r.person_id, person_key(r.person_id), r.slot, r.slot_key, r.value, r.text,
                  np.ascontiguousarray(r.vector, dtype=np.float32).tobytes(), r.importance, r.source,
                  json.dumps(r.sources, ensure_ascii=False), r.status, r.tier, _iso(r.created_at),
                  _iso(r.updated_at)) for r in new_rows],
            )
            conn.executemany(
                f"INSERT INTO operations ({', '.join(_LOG_COLUMNS)}) VALUES ({', '.join('?' * len(_LOG_COLUMNS))})",
                [tuple(_iso(e[c]) if c == "at" else e[c] for c in _LOG_COLUMNS) for e in result.log],
            )
        return result

    @staticmethod
    def _row(r: Sequence[Any]) -> _Row:
        return _Row(id=r[0], person_id=r[1], slot=r[2], value=r[3], text=r[4], importance=float(r[5]), source=r[6],
                    sources=json.loads(r[7]), status=r[8], tier=r[9], created_at=datetime.fromisoformat(r[10]),
                    updated_at=datetime.fromisoformat(r[11]))

    # ---- reads

    def _memories(self, where: str, params: Sequence[Any], order: str = "seq") -> list[Memory]:
        rows = self._db().execute(f"SELECT {_SQLITE_MEMORY} FROM memories WHERE {where} ORDER BY {order}", params)
        return [self._to_memory(r) for r in rows.fetchall()]

    @staticmethod
    def _to_memory(r: Sequence[Any]) -> Memory:
        return Memory(id=r[0], person_id=r[1], slot=r[2], value=r[3], text=r[4],
                      embedding=tuple(np.frombuffer(r[5], dtype=np.float32).tolist()), importance=float(r[6]),
                      source=r[7], status=r[8], created_at=r[9], updated_at=r[10])

    @staticmethod
    def _status_clause(status: str | None) -> tuple[str, tuple[Any, ...]]:
        return ("1 = 1", ()) if status is None else ("status = ?", (status,))

    def get(self, memory_id: str) -> Memory | None:
        found = self._memories("id = ?", (memory_id,))
        return found[0] if found else None

    def by_person(self, person_id: str, status: str | None = "active") -> list[Memory]:
        self._validate_status(status)
        clause, params = self._status_clause(status)
        return self._memories(f"person_key = ? AND person_id = ? AND {clause}",
                              (person_key(person_id), person_id, *params))

    def by_slot(self, person_id: str, slot: str, status: str | None = "active") -> list[Memory]:
        self._validate_status(status)
        clause, params = self._status_clause(status)
        return self._memories(f"slot_key = ? AND person_id = ? AND slot = ? AND {clause}",
                              (slot_key(person_id, slot), person_id, slot, *params))

    def active_memories(self, person_id: str | None = None) -> list[Memory]:
        return self.by_person(person_id) if person_id is not None else self._memories("status = 'active'", ())

    def promoted_ids(self) -> set[str]:
        return {r[0] for r in self._db().execute("SELECT id FROM memories WHERE tier = 'long'")}

    def count(self, status: str | None = "active") -> int:
        self._validate_status(status)
        clause, params = self._status_clause(status)
        return int(self._db().execute(f"SELECT count(*) FROM memories WHERE {clause}", params).fetchone()[0])

    def count_by_person(self, status: str | None = "active") -> dict[str, int]:
        self._validate_status(status)
        clause, params = self._status_clause(status)
        rows = self._db().execute(f"SELECT person_id, count(*) FROM memories WHERE {clause} GROUP BY person_id "
                                  "ORDER BY person_id", params)
        return {p: int(n) for p, n in rows}

    def history(self, memory_id: str) -> list[dict[str, Any]]:
        return self._ops("memory_id = ? OR related_id = ?", (memory_id, memory_id))

    def operations(self, limit: int | None = None) -> list[dict[str, Any]]:
        return self._ops("1 = 1", (), limit)

    def _ops(self, where: str, params: Sequence[Any], limit: int | None = None) -> list[dict[str, Any]]:
        cols = ("id", *_LOG_COLUMNS)
        query = f"SELECT {', '.join(cols)} FROM operations WHERE {where} ORDER BY id DESC"
        if limit is not None:
            query += " LIMIT ?"
            params = (*params, max(0, int(limit)))
        rows = self._db().execute(query, params).fetchall()
        return [_log_row(dict(zip(cols, r))) for r in reversed(rows)]

    # ---- nearest neighbours

    def nearest(self, embedding: Any, k: int = 10, person_id: str | None = None,
                status: str | None = "active") -> list[tuple[Memory, float]]:
        self._validate_status(status)
        q = self._query_vector(embedding, k)
        conn = self._db()
        clause, params = self._status_clause(status)
        if person_id is not None:
            # A person's memories are few: an exact scan is both fast and deterministic.
            rows = conn.execute(f"SELECT {_SQLITE_MEMORY} FROM memories WHERE person_key = ? AND person_id = ? "
                                f"AND {clause}", (person_key(person_id), person_id, *params)).fetchall()
            return self._ranked(rows, q, k)
        with self._lock:
            index, ntotal = self._synced_index()
        if ntotal == 0:
            return []
        fetch = min(ntotal, k + 4)
        select = f"SELECT seq, {_SQLITE_MEMORY} FROM memories WHERE {clause} AND seq IN "
        while True:
            # Flat and HNSW indexes both score candidates on the stored vectors: exact cosines, best first.
            scores, found = index.search(q[None, :], fetch)
            ranked = [(int(seq), float(score)) for seq, score in zip(found[0], scores[0]) if seq >= 0]
            rows: dict[int, Any] = {}
            pos, window = 0, k
            while len(rows) < k and pos < len(ranked):
                part = [seq for seq, _ in ranked[pos : pos + min(window, _CHUNK)]]
                pos += len(part)
                rows.update((r[0], r[1:]) for r in conn.execute(
                    select + f"({','.join('?' * len(part))})", (*params, *part)))
                window = max(8, 2 * (k - len(rows)))
            if len(rows) >= k or fetch >= ntotal:
                break
            fetch = min(ntotal, fetch * 4)
        if len(rows) < k:
            # The index could not supply k rows that pass the filter (or its graph left some unreachable):
            # an exact scan returns every match.
            return self._ranked(conn.execute(f"SELECT {_SQLITE_MEMORY} FROM memories WHERE {clause}",
                                             params).fetchall(), q, k)
        hits = [(seq, score) for seq, score in ranked if seq in rows][:k]
        return sorted(((self._to_memory(rows[seq]), score) for seq, score in hits), key=lambda h: (-h[1], h[0].id))

    def _ranked(self, rows: Sequence[Any], q: np.ndarray, k: int) -> list[tuple[Memory, float]]:
        if not rows:
            return []
        vectors = np.stack([np.frombuffer(r[5], dtype=np.float32) for r in rows])
        scores = vectors @ q
        order = sorted(range(len(rows)), key=lambda i: (-float(scores[i]), rows[i][0]))[:k]
        return [(self._to_memory(rows[i]), float(scores[i])) for i in order]

    # ---- the FAISS index (derived from the rows; never the source of truth)

    def rebuild_index(self) -> int:
        """Rebuild the FAISS index from the rows and save it; returns the number of vectors."""
        with self._lock:
            self._db()
            self._index = None
            self._build_index()
            self._save_index()
            return int(self._index.ntotal)

    def _synced_index(self) -> tuple[Any, int]:
        conn = self._db()
        db_max = int(conn.execute("SELECT coalesce(max(seq), 0) FROM memories").fetchone()[0])
        if self._index is None:
            self._load_index()
        if self._index is None or self._indexed_max > db_max:
            self._build_index()
            self._save_index()
        elif self._indexed_max < db_max:
            added = self._add_rows(self._indexed_max)
            if self._flat() and self._index.ntotal >= self.exact_below:
                self._build_index()
                self._save_index()
            else:
                self._unsaved += added
                if self._unsaved >= max(1000, self._index.ntotal // 10):
                    self._save_index()
        return self._index, int(self._index.ntotal)

    def _flat(self) -> bool:
        import faiss

        return isinstance(faiss.downcast_index(self._index.index), faiss.IndexFlat)

    def _new_index(self, n: int) -> Any:
        import faiss

        if n < self.exact_below:
            inner = faiss.IndexFlatIP(self.embedding_dim)
        else:
            inner = faiss.IndexHNSWFlat(self.embedding_dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.hnsw_ef_construction
            inner.hnsw.efSearch = self.hnsw_ef_search
        return faiss.IndexIDMap2(inner)

    def _build_index(self) -> None:
        n = int(self._db().execute("SELECT count(*) FROM memories").fetchone()[0])
        self._index = self._new_index(n)
        self._indexed_max = 0
        self._add_rows(0)

    def _add_rows(self, after: int) -> int:
        conn = self._db()
        added = 0
        last = after
        while True:
            rows = conn.execute("SELECT seq, embedding FROM memories WHERE seq > ? ORDER BY seq LIMIT 20000",
                                (last,)).fetchall()
            if not rows:
                break
            seqs = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.embedding_dim)
            self._index.add_with_ids(np.ascontiguousarray(vectors), seqs)
            last = int(seqs[-1])
            added += len(rows)
        self._indexed_max = last
        return added

    def _index_meta(self) -> dict[str, Any]:
        return {"store_uuid": self._meta["store_uuid"], "embedding_model": self._meta["embedding_model"],
                "embedding_dim": int(self._meta["embedding_dim"])}

    def _save_index(self) -> None:
        import faiss

        folder = self.folder
        fd, tmp = tempfile.mkstemp(prefix=".faiss.index.", dir=folder)
        os.close(fd)
        try:
            faiss.write_index(self._index, tmp)
            digest = _file_sha256(Path(tmp))
            os.replace(tmp, self.index_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        meta = {**self._index_meta(), "max_seq": self._indexed_max, "ntotal": int(self._index.ntotal),
                "sha256": digest, "size": self.index_path.stat().st_size}
        write_text_atomic(self.index_meta_path, json.dumps(meta, indent=1, sort_keys=True))
        self._unsaved = 0

    def _save_index_if_dirty(self) -> None:
        if self._index is not None and self._unsaved:
            try:
                self._save_index()
            except OSError as exc:
                log.warning("could not save the FAISS index of %s: %s", self.describe(), exc)

    def _load_index(self) -> None:
        """Load the saved index if it matches the rows; anything else leaves `_index` unset (-> rebuild)."""
        import faiss

        self._index = None
        path, meta_path = self.index_path, self.index_meta_path
        if not path.is_file() or not meta_path.is_file():
            if path.exists() or meta_path.exists():
                log.warning("%s: FAISS index or its metadata is missing; rebuilding from the rows", self.describe())
            return
        try:
            meta = json.loads(meta_path.read_text())
            problem = None
            if {k: meta.get(k) for k in self._index_meta()} != self._index_meta():
                problem = "it belongs to another store or embedding model"
            elif path.stat().st_size != meta.get("size") or _file_sha256(path) != meta.get("sha256"):
                problem = "its checksum does not match (corrupt or half-written)"
            if problem is None:
                index = faiss.read_index(str(path))
                max_seq = int(meta["max_seq"])
                rows = int(self._db().execute("SELECT count(*) FROM memories WHERE seq <= ?", (max_seq,)).fetchone()[0])
                if index.ntotal != meta.get("ntotal") or index.ntotal != rows:
                    problem = f"it holds {index.ntotal} vectors for {rows} rows"
                else:
                    inner = faiss.downcast_index(index.index)
                    if hasattr(inner, "hnsw"):
                        inner.hnsw.efSearch = self.hnsw_ef_search
                    self._index, self._indexed_max = index, max_seq
                    return
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            problem = f"it cannot be read ({exc})"
        log.warning("%s: FAISS index %s is unusable (%s); rebuilding from the rows", self.describe(), path, problem)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _log_row(row: dict[str, Any]) -> dict[str, Any]:
    row["at"] = _iso(row["at"])
    try:
        row["details"] = json.loads(row["details"]) if isinstance(row["details"], str) else row["details"]
    except ValueError:
        pass
    return row


# --------------------------------------------------------------------------- Postgres + pgvector


_PG_MEMORIES = "sleeptrain_memories"
_PG_OPS = "sleeptrain_memory_ops"
_PG_META = "sleeptrain_memory_meta"
_PG_HNSW = "sleeptrain_memories_embedding_hnsw"
_PG_SCHEMA_LOCK = 0x51EE_7A1A  # advisory lock key for schema set-up
_PG_TAIL = "sleeptrain_memories_unindexed"  # btree over the rows not yet in the HNSW index
_PG_SELECT = ("id, person_id, slot, value, text, embedding, importance, source, status, created_at, updated_at")


def normalize_postgres_url(url: str) -> str:
    """postgresql://, postgres:// and SQLAlchemy's postgresql+driver:// URLs as libpq understands them."""
    url = url.strip()
    match = re.match(r"^(postgres(?:ql)?)(\+[A-Za-z0-9_]+)?://", url)
    if not match:
        raise MemoryStoreError("SLEEPTRAIN_DATABASE_URL must start with postgresql:// (or postgres://, "
                               "postgresql+psycopg2://)")
    return "postgresql://" + url[match.end():]


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _endpoint(url: str) -> str:
    """`host:port/database` of a libpq URL (the socket folder for a local socket)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - a URL libpq cannot parse is still reported, redacted
        return _redact(url)
    return f"{info.get('host') or 'localhost'}:{info.get('port') or 5432}/{info.get('dbname') or ''}"


def _reconnecting(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run once more on a fresh connection when the server dropped this one (a restart, a failover): the
    failed attempt's transaction was rolled back, and writes are idempotent (ids are derived from content)."""

    @functools.wraps(method)
    def wrapper(self: PgVectorMemoryStore, *args: Any, **kwargs: Any) -> Any:
        import psycopg

        try:
            return method(self, *args, **kwargs)
        except psycopg.OperationalError:
            if self._conn is None or not self._conn.broken:
                raise
            log.warning("%s: the connection was lost; reconnecting once", self.describe())
            self.close()
            return method(self, *args, **kwargs)

    return wrapper


class PgVectorMemoryStore(MemoryStore):
    """Postgres + pgvector store: vector(384) rows with an HNSW cosine index; set-up is idempotent."""

    url: str
    ef_search: int = 100
    connect_timeout: int = 10  # seconds before an unreachable server is reported
    bulk_rebuild_min_rows: int = 5000  # batches this large (and larger than the table) rebuild the HNSW index
    # Rows written but not yet in the HNSW index, at most; a write that goes past it folds them in. 0: every
    # row enters the index in its own write (the slow path, ~50x the cost of the row itself).
    max_unindexed: int = 5000
    # A fold rebuilds the whole index when the tail is at least this share of the indexed rows, else inserts
    # the tail row by row. Measured (2 shared cores): a bulk build costs ~0.65 ms per row of the table, a
    # folded row ~3 ms, so a rebuild is the cheaper fold from about a quarter.
    rebuild_share: float = 0.25

    _conn: Any = PrivateAttr(default=None)
    _pid: int = PrivateAttr(default=0)
    _lock: Any = PrivateAttr(default_factory=threading.RLock)
    _meta: dict[str, str] = PrivateAttr(default_factory=dict)

    def _url(self) -> str:
        raw = self.url.get_value() if isinstance(self.url, dg.EnvVar) else self.url
        if not raw:
            raise MemoryStoreError("PgVectorMemoryStore: no database URL (set SLEEPTRAIN_DATABASE_URL)")
        return normalize_postgres_url(raw)

    def describe(self) -> str:
        return f"pgvector memory store at {_redact(self._url())}"

    def _db(self) -> Any:
        import psycopg

        with self._lock:
            if self._conn is not None and self._pid == os.getpid() and not self._conn.closed:
                if not self._conn.broken:
                    return self._conn
                self._conn.close()
            from pgvector.psycopg import register_vector

            url = self._url()
            try:
                conn = psycopg.connect(url, autocommit=True, connect_timeout=self.connect_timeout)
            except psycopg.OperationalError as exc:
                reason = " ".join(str(exc).split())
                raise MemoryStoreUnreachable(
                    f"cannot reach the Postgres memory store at {_endpoint(url)} (SLEEPTRAIN_DATABASE_URL): "
                    f"{reason}. Start the server or correct the URL."
                ) from None
            try:
                self._ensure_schema(conn)
                self._refuse_mismatch(self._meta)
                register_vector(conn)
                conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(int(self.ef_search)),))
                conn.execute("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', false)")
            except BaseException:
                conn.close()
                raise
            self._conn, self._pid = conn, os.getpid()
            return conn

    def _ensure_schema(self, conn: Any) -> None:
        from psycopg import sql

        dim = int(self.embedding_dim)
        if not 1 <= dim <= 16000:
            raise MemoryStoreError(f"embedding_dim={dim} is outside pgvector's range")
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK,))
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            conn.execute(f"CREATE TABLE IF NOT EXISTS {_PG_META} (key text PRIMARY KEY, value text NOT NULL)")
            conn.execute(sql.SQL(f"""
                CREATE TABLE IF NOT EXISTS {_PG_MEMORIES} (
                    seq bigserial UNIQUE,
                    id text PRIMARY KEY,
                    person_id text NOT NULL,
                    person_key text NOT NULL,
                    slot text NOT NULL,
                    slot_key text NOT NULL,
                    value text NOT NULL,
                    text text NOT NULL,
                    embedding vector({{dim}}) NOT NULL,
                    importance double precision NOT NULL,
                    source text NOT NULL,
                    sources text NOT NULL,
                    status text NOT NULL CHECK (status IN ('active', 'superseded', 'evicted')),
                    tier text NOT NULL CHECK (tier IN ('short', 'long')),
                    created_at timestamptz NOT NULL,
                    updated_at timestamptz NOT NULL
                )""").format(dim=sql.Literal(dim)))
            conn.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {_PG_MEMORIES}_one_active_per_slot "
                         f"ON {_PG_MEMORIES} (slot_key) WHERE status = 'active'")
            conn.execute(f"CREATE INDEX IF NOT EXISTS {_PG_MEMORIES}_by_person ON {_PG_MEMORIES} (person_key, status)")
            # Rows that existed before deferred indexing are in the index: the default covers them.
            conn.execute(f"ALTER TABLE {_PG_MEMORIES} ADD COLUMN IF NOT EXISTS indexed boolean NOT NULL DEFAULT true")
            conn.execute(f"CREATE INDEX IF NOT EXISTS {_PG_TAIL} ON {_PG_MEMORIES} (seq) WHERE NOT indexed")
            old = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (_PG_HNSW,)).fetchone()
            if old and "WHERE" not in old[0]:
                log.warning("%s: rebuilding the HNSW index as a partial index over indexed rows (once)",
                            self.describe())
                conn.execute(f"DROP INDEX {_PG_HNSW}")
            conn.execute(f"CREATE INDEX IF NOT EXISTS {_PG_HNSW} ON {_PG_MEMORIES} "
                         "USING hnsw (embedding vector_cosine_ops) WHERE indexed")
            conn.execute(f"""
                CREATE TABLE IF NOT EXISTS {_PG_OPS} (
                    id bigserial PRIMARY KEY,
                    at timestamptz NOT NULL,
                    op text NOT NULL CHECK (op IN ('STORE', 'REJECT', 'CORRECT', 'MERGE', 'EVICT', 'PROMOTE')),
                    memory_id text,
                    person_id text NOT NULL,
                    slot text NOT NULL,
                    value text NOT NULL,
                    reason text NOT NULL,
                    related_id text,
                    details text NOT NULL
                )""")
            conn.execute(f"CREATE INDEX IF NOT EXISTS {_PG_OPS}_by_memory ON {_PG_OPS} (memory_id)")
            conn.execute(f"CREATE INDEX IF NOT EXISTS {_PG_OPS}_by_related ON {_PG_OPS} (related_id)")
            for key, value in (("embedding_model", self.embedding_model), ("embedding_dim", str(dim)),
                               ("store_uuid", uuid.uuid4().hex), ("schema_version", SCHEMA_VERSION)):
                conn.execute(f"INSERT INTO {_PG_META} (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                             (key, value))
            self._meta = dict(conn.execute(f"SELECT key, value FROM {_PG_META}").fetchall())

    def stored_embedding(self) -> tuple[str, int]:
        self._db()
        return self._meta["embedding_model"], int(self._meta["embedding_dim"])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # ---- writes

    @_reconnecting
    def _write(self, ids: set[str], slot_keys: set[str], plan: Callable[[dict[str, _Row]], _Plan]) -> _Plan:
        conn = self._db()
        with self._lock, conn.transaction():
            # One writer at a time; readers are not blocked (SHARE ROW EXCLUSIVE conflicts with itself only
            # among the modes readers and writers of this store take).
            conn.execute(f"LOCK TABLE {_PG_MEMORIES} IN SHARE ROW EXCLUSIVE MODE")
            select = (f"SELECT id, person_id, slot, value, text, importance, source, sources, status, tier, "
                      f"created_at, updated_at FROM {_PG_MEMORIES} WHERE ")
            snapshot: dict[str, _Row] = {}
            if ids:
                for r in conn.execute(select + "id = ANY(%s)", (sorted(ids),)):
                    snapshot[r[0]] = self._row(r)
            if slot_keys:
                for r in conn.execute(select + "status = 'active' AND slot_key = ANY(%s)", (sorted(slot_keys),)):
                    snapshot.setdefault(r[0], self._row(r))
            result = plan(snapshot)
            leaving, others = result.changed_rows()
            update = (f"UPDATE {_PG_MEMORIES} SET status = %s, tier = %s, importance = %s, sources = %s, "
                      "updated_at = %s WHERE id = %s")
            with conn.cursor() as cur:
                for group in (leaving, others):
                    if group:
                        cur.executemany(update, [(r.status, r.tier, r.importance,
                                                  json.dumps(r.sources, ensure_ascii=False), r.updated_at, r.id)
                                                 for r in group])
            new_rows = [result.rows[i] for i in result.inserted]
            rebuild = False
            if len(new_rows) >= self.bulk_rebuild_min_rows:
                existing = int(conn.execute(f"SELECT count(*) FROM {_PG_MEMORIES}").fetchone()[0])
                rebuild = len(new_rows) >= existing
            if rebuild:
                # pgvector builds an HNSW index far faster in one go than row by row: drop it for a bulk load
                # and build it again before the commit (readers wait for the commit, never see it missing).
                conn.execute(f"DROP INDEX IF EXISTS {_PG_HNSW}")
            defer = bool(self.max_unindexed) and not rebuild
            self._copy(conn, _PG_MEMORIES, (*_MEMORY_COLUMNS, "indexed"),
                       ["text"] * 7 + ["vector", "float8", "text", "text", "text", "text", "timestamptz", "timestamptz",
                                       "bool"],
                       ((r.id, r.person_id, person_key(r.person_id), r.slot, r.slot_key, r.value, r.text,
                         np.ascontiguousarray(r.vector, dtype=np.float32), float(r.importance), r.source,
                         json.dumps(r.sources, ensure_ascii=False), r.status, r.tier, r.created_at, r.updated_at,
                         not defer)
                        for r in new_rows))
            if rebuild:
                self._build_index(conn)
            elif defer and new_rows and self._unindexed(conn) > self.max_unindexed:
                self._fold(conn)
            self._copy(conn, _PG_OPS, _LOG_COLUMNS, ["timestamptz"] + ["text"] * 8,
                       (tuple(e[c] for c in _LOG_COLUMNS) for e in result.log))
        return result

    @_reconnecting
    def index_pending(self) -> int:
        """Fold the rows written since the last fold into the HNSW index now (a maintenance step); returns how
        many. Queries never need it: the unindexed tail is scanned exactly."""
        conn = self._db()
        with self._lock, conn.transaction():
            conn.execute(f"LOCK TABLE {_PG_MEMORIES} IN SHARE ROW EXCLUSIVE MODE")
            return self._fold(conn)

    @_reconnecting
    def unindexed(self) -> int:
        """Rows not yet in the HNSW index."""
        return self._unindexed(self._db())

    @staticmethod
    def _unindexed(conn: Any) -> int:
        return int(conn.execute(f"SELECT count(*) FROM {_PG_MEMORIES} WHERE NOT indexed").fetchone()[0])

    def _fold(self, conn: Any) -> int:
        tail = self._unindexed(conn)
        if not tail:
            return 0
        total = int(conn.execute(f"SELECT count(*) FROM {_PG_MEMORIES}").fetchone()[0])
        rebuild = tail >= self.rebuild_share * (total - tail)
        if rebuild:
            conn.execute(f"DROP INDEX IF EXISTS {_PG_HNSW}")
        conn.execute(f"UPDATE {_PG_MEMORIES} SET indexed = true WHERE NOT indexed")
        if rebuild:
            self._build_index(conn)
        log.info("%s: folded %d rows into the HNSW index (%s)", self.describe(), tail,
                 "rebuilt" if rebuild else "inserted")
        return tail

    @staticmethod
    def _build_index(conn: Any) -> None:
        conn.execute("SELECT set_config('maintenance_work_mem', '1GB', true)")
        conn.execute(f"CREATE INDEX {_PG_HNSW} ON {_PG_MEMORIES} USING hnsw (embedding vector_cosine_ops) "
                     "WHERE indexed")
        # Fresh statistics: without them the planner guesses the status filter is selective and sorts every
        # row by distance instead of walking the HNSW index.
        conn.execute(f"ANALYZE {_PG_MEMORIES}")

    @staticmethod
    def _copy(conn: Any, table: str, columns: Sequence[str], types: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        with conn.cursor() as cur:
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(list(types))
                for row in rows:
                    copy.write_row(row)

    @staticmethod
    def _row(r: Sequence[Any]) -> _Row:
        return _Row(id=r[0], person_id=r[1], slot=r[2], value=r[3], text=r[4], importance=float(r[5]), source=r[6],
                    sources=json.loads(r[7]), status=r[8], tier=r[9], created_at=r[10], updated_at=r[11])

    # ---- reads

    @_reconnecting
    def _memories(self, where: str, params: Sequence[Any], order: str = "seq") -> list[Memory]:
        rows = self._db().execute(f"SELECT {_PG_SELECT} FROM {_PG_MEMORIES} WHERE {where} ORDER BY {order}",
                                  tuple(params)).fetchall()
        return [_memory(*r) for r in rows]

    @staticmethod
    def _status_clause(status: str | None) -> tuple[str, tuple[Any, ...]]:
        return ("TRUE", ()) if status is None else ("status = %s", (status,))

    def get(self, memory_id: str) -> Memory | None:
        found = self._memories("id = %s", (memory_id,))
        return found[0] if found else None

    def by_person(self, person_id: str, status: str | None = "active") -> list[Memory]:
        self._validate_status(status)
        clause, params = self._status_clause(status)
        return self._memories(f"person_key = %s AND person_id = %s AND {clause}",
                              (person_key(person_id), person_id, *params))

    def by_slot(self, person_id: str, slot: str, status: str | None = "active") -> list[Memory]:
        self._validate_status(status)
        clause, params = self._status_clause(status)
        return self._memories(f"slot_key = %s AND person_id = %s AND slot = %s AND {clause}",
                              (slot_key(person_id, slot), person_id, slot, *params))

    def active_memories(self, person_id: str | None = None) -> list[Memory]:
        return self.by_person(person_id) if person_id is not None else self._memories("status = 'active'", ())

    @_reconnecting
    def promoted_ids(self) -> set[str]:
        return {r[0] for r in self._db().execute(f"SELECT id FROM {_PG_MEMORIES} WHERE tier = 'long'")}

    @_reconnecting
    def count(self, status: str | None = "active") -> int:
        self._validate_status(status)
        clause, params = self._status_clause(status)
        return int(self._db().execute(f"SELECT count(*) FROM {_PG_MEMORIES} WHERE {clause}", params).fetchone()[0])

    @_reconnecting
    def count_by_person(self, status: str | None = "active") -> dict[str, int]:
        self._validate_status(status)
        clause, params = self._status_clause(status)
        rows = self._db().execute(f"SELECT person_id, count(*) FROM {_PG_MEMORIES} WHERE {clause} "
                                  "GROUP BY person_id ORDER BY person_id", params)
        return {p: int(n) for p, n in rows}

    def history(self, memory_id: str) -> list[dict[str, Any]]:
        return self._ops("memory_id = %s OR related_id = %s", (memory_id, memory_id))

    def operations(self, limit: int | None = None) -> list[dict[str, Any]]:
        return self._ops("TRUE", (), limit)

    @_reconnecting
    def _ops(self, where: str, params: Sequence[Any], limit: int | None = None) -> list[dict[str, Any]]:
        cols = ("id", *_LOG_COLUMNS)
        query = f"SELECT {', '.join(cols)} FROM {_PG_OPS} WHERE {where} ORDER BY id DESC"
        if limit is not None:
            query += " LIMIT %s"
            params = (*params, max(0, int(limit)))
        rows = self._db().execute(query, tuple(params)).fetchall()
        return [_log_row(dict(zip(cols, r))) for r in reversed(rows)]

    @_reconnecting
    def nearest(self, embedding: Any, k: int = 10, person_id: str | None = None,
                status: str | None = "active") -> list[tuple[Memory, float]]:
        self._validate_status(status)
        q = self._query_vector(embedding, k)
        conn = self._db()
        where, params = self._status_clause(status)
        if person_id is not None:
            where += " AND person_key = %s AND person_id = %s"
            params = (*params, person_key(person_id), person_id)
        # The HNSW scan (iterative, relaxed order) filters after the index; the tail not yet in the index is
        # scanned exactly; both are re-ranked exactly together.
        select = f"SELECT {_PG_SELECT}, 1 - (embedding <=> %s) AS score FROM {_PG_MEMORIES} WHERE {where}"
        rows = conn.execute(f"{select} AND indexed ORDER BY embedding <=> %s LIMIT %s", (q, *params, q, k),
                            binary=True).fetchall()
        if len(rows) < k:
            # Fewer than k indexed rows survived the filter: an exact scan returns every match (the "+ 0" keeps
            # the planner off the approximate index).
            rows = conn.execute(f"{select} ORDER BY (embedding <=> %s) + 0 LIMIT %s", (q, *params, q, k),
                                binary=True).fetchall()
        else:
            rows += conn.execute(f"{select} AND NOT indexed ORDER BY (embedding <=> %s) + 0 LIMIT %s",
                                 (q, *params, q, k), binary=True).fetchall()
        ranked = sorted(rows, key=lambda r: (-float(r[-1]), r[0]))[:k]
        return [(_memory(*r[:-1]), float(r[-1])) for r in ranked]


def memory_store_from_env() -> MemoryStore:
    """PgVectorMemoryStore when SLEEPTRAIN_DATABASE_URL is set, else the local store under SLEEPTRAIN_HOME."""
    if settings.database_url():
        return PgVectorMemoryStore(url=dg.EnvVar("SLEEPTRAIN_DATABASE_URL"))
    return LocalMemoryStore()
