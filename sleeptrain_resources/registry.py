"""Adapter registry: immutable versions plus a `current` pointer that is only ever replaced atomically.

Layout under the root: ``versions/<version>/`` (adapter_model.safetensors, adapter_config.json,
manifest.json), ``current`` (one line: the current version), ``history.jsonl`` (append-only log of
registrations and pointer switches). A version folder appears by rename of a complete copy and the pointer by
``os.replace`` of a complete file, so a crash at any point leaves ``current`` naming a complete adapter.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg

from sleeptrain_assets.lib import settings

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MANIFEST = "manifest.json"
REQUIRED = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
VERSION_RE = re.compile(r"^v(\d{4,})-([0-9a-f]{8})$")


class RegistryError(RuntimeError):
    pass


_HELD = threading.local()  # registry roots whose writer lock this thread holds (the lock is re-entrant)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AdapterRegistry(dg.ConfigurableResource):
    """Versions of trained adapters and which one is current (first adapter of an empty registry)."""

    root: str = ""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Before any step claims the `gpu` pool: a training run whose worker died still holds its slot.
        from sleeptrain_resources.staging import recover_dead_training_runs

        recover_dead_training_runs(context.instance, settings.state_subdir("staging"), context.run_id,
                                   (context.log or dg.get_dagster_logger()).warning)

    @property
    def root_dir(self) -> Path:
        path = Path(self.root).expanduser().resolve() if self.root else settings.state_subdir("adapters")
        (path / "versions").mkdir(parents=True, exist_ok=True)
        return path

    @property
    def _versions_dir(self) -> Path:
        return self.root_dir / "versions"

    def versions(self) -> list[str]:
        """Registered versions, oldest first."""
        found = [p.name for p in self._versions_dir.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
        return sorted(found, key=lambda v: int(VERSION_RE.match(v).group(1)))  # type: ignore[union-attr]

    def path(self, version: str) -> Path:
        if not VERSION_RE.match(version):
            raise RegistryError(f"{self.root_dir}: {version!r} is not a version name (like v0001-1a2b3c4d)")
        folder = self._versions_dir / version
        missing = [name for name in REQUIRED if not (folder / name).is_file()]
        if missing:
            raise RegistryError(f"{folder}: version {version} is missing {missing}")
        return folder

    def current(self) -> str | None:
        """The current version; a pointer naming a missing or incomplete version is an error naming both."""
        version = self._pointer()
        if version is None:
            return None
        try:
            self.path(version)
        except RegistryError as exc:
            raise RegistryError(
                f"{self.root_dir / 'current'} names version {version!r}, which is not a usable adapter ({exc}); "
                f"`rollback` (or set_current) points it at a registered version again"
            ) from exc
        return version

    def _pointer(self) -> str | None:
        """What the `current` file says, unchecked (None when there is no pointer yet)."""
        try:
            version = (self.root_dir / "current").read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return version or None

    def current_path(self) -> Path | None:
        version = self.current()
        return self.path(version) if version else None

    def manifest(self, version: str) -> dict[str, Any]:
        file = self.path(version) / MANIFEST
        if not file.is_file():
            return {}
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RegistryError(f"{file}: manifest is not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict):
            raise RegistryError(f"{file}: manifest must be a JSON object, got {type(manifest).__name__}")
        return manifest

    def resolve(self, ref: str | Path) -> Path:
        """A version name or an adapter folder path -> the adapter folder."""
        text = str(ref)
        if VERSION_RE.match(text):
            return self.path(text)
        folder = Path(text).expanduser().resolve()
        missing = [name for name in REQUIRED if not (folder / name).is_file()]
        if missing:
            raise RegistryError(f"{ref!r} is neither a registered version nor an adapter folder (missing {missing})")
        return folder

    def register(self, adapter_dir: str | Path, promote_if_empty: bool = True) -> str:
        """Copy a finished adapter folder in as a new version (or return the version holding the same weights)."""
        source = Path(adapter_dir)
        missing = [name for name in REQUIRED if not (source / name).is_file()]
        if missing:
            raise RegistryError(f"{source}: not a finished adapter folder, missing {missing}")
        digest = _sha256(source / ADAPTER_WEIGHTS)
        self._clean_stale_incoming()
        # Numbering and "first adapter becomes current" under one lock: released in between, a second writer could
        # register the next number and take the empty pointer first (seen in CI).
        with self._exclusive():
            version = self._existing(digest) or self._copy_in(source, digest)
            if promote_if_empty and self._pointer() is None:
                self.set_current(version, "first adapter of an empty registry")
        return version

    def _existing(self, digest: str) -> str | None:
        return next((v for v in self.versions() if v.endswith(digest[:8]) and self._same(v, digest)), None)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One registry writer at a time across processes (flock on `<root>/.lock`); re-entrant per thread."""
        root = str(self.root_dir)
        held = getattr(_HELD, "roots", None)
        if held is None:
            held = _HELD.roots = set()
        if root in held:
            yield
            return
        fd = os.open(os.path.join(root, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.add(root)
            try:
                yield
            finally:
                held.discard(root)
        finally:
            os.close(fd)  # releases the lock

    def set_current(self, version: str, reason: str, **audit: Any) -> None:
        """Point `current` at `version` (atomic replace) and log why (plus any `audit` fields)."""
        self.path(version)
        with self._exclusive():
            previous = self._pointer()
            root = self.root_dir
            for stale in root.glob(".current.*"):  # pointer drafts of writers killed before their replace
                stale.unlink(missing_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".current.", dir=root)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(version + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, root / "current")
                _fsync_dir(root)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._log({"action": "set_current", "version": version, "previous": previous, "reason": reason,
                       **audit})

    def promote(self, version: str, *, cycle: str, metrics: dict[str, Any], decision: dict[str, Any]) -> str | None:
        """Make a challenger the champion (atomic pointer move); the log keeps its cycle, metrics and the prior
        champion. Returns the prior champion."""
        with self._exclusive():
            previous = self._pointer()
            self.set_current(version, f"promoted by {cycle}", promoted_by=cycle, metrics=metrics, decision=decision,
                             prior_champion=previous)
        return previous

    def champions(self) -> list[dict[str, Any]]:
        """Who was champion when and why: one entry per pointer move, oldest first, with its end time."""
        moves = [e for e in self.history() if e.get("action") == "set_current"]
        reigns = []
        for index, entry in enumerate(moves):
            until = moves[index + 1]["time"] if index + 1 < len(moves) else None
            reigns.append({"version": entry["version"], "since": entry.get("time"), "until": until,
                           "reason": entry.get("reason", ""), "previous": entry.get("previous"),
                           "cycle": entry.get("promoted_by")})
        return reigns

    def rollback(self, version: str | None = None, reason: str = "rollback") -> str:
        """Make `version` current again; without one, the version that was current before the present one."""
        with self._exclusive():
            if version is None:
                # The pointer as written, unchecked: rollback is how a pointer naming a missing version is repaired.
                present = self._pointer()
                earlier = [
                    e["previous"]
                    for e in self.history()
                    if e.get("action") == "set_current" and e.get("version") == present and e.get("previous")
                ]
                if not earlier:
                    raise RegistryError(f"{self.root_dir}: no earlier current version to roll back to")
                version = earlier[-1]
            self.set_current(version, reason)
        return version

    def history(self) -> list[dict[str, Any]]:
        """The log, oldest first; a torn last line from a crash is skipped."""
        log = self.root_dir / "history.jsonl"
        if not log.is_file():
            return []
        entries = []
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    def _same(self, version: str, digest: str) -> bool:
        return _sha256(self._versions_dir / version / ADAPTER_WEIGHTS) == digest

    def _copy_in(self, source: Path, digest: str) -> str:
        incoming = self._versions_dir / f".incoming-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(source, incoming)
            for path in incoming.iterdir():
                if path.is_file():
                    with open(path, "rb") as fh:
                        os.fsync(fh.fileno())
            if _sha256(incoming / ADAPTER_WEIGHTS) != digest:
                raise RegistryError(f"{source}: adapter weights changed while being registered")
            # The copy runs unlocked; numbering, the rename and the log line run under the writer lock, so two
            # processes registering at once get distinct numbers and the same weights land once.
            with self._exclusive():
                existing = self._existing(digest)
                if existing:
                    shutil.rmtree(incoming, ignore_errors=True)
                    return existing
                numbers = [int(VERSION_RE.match(v).group(1)) for v in self.versions()]  # type: ignore[union-attr]
                version = f"v{(max(numbers) + 1) if numbers else 1:04d}-{digest[:8]}"
                os.rename(incoming, self._versions_dir / version)
                _fsync_dir(self._versions_dir)
                self._log({"action": "register", "version": version, "adapter_sha256": digest,
                           "source": str(source)})
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        return version

    def _clean_stale_incoming(self) -> None:
        """Remove copies left by writers that died mid-copy (their pid no longer runs)."""
        for path in self._versions_dir.glob(".incoming-*"):
            parts = path.name.split("-")
            if len(parts) >= 3 and parts[1].isdigit() and not _pid_alive(int(parts[1])):
                shutil.rmtree(path, ignore_errors=True)

    def _log(self, entry: dict[str, Any]) -> None:
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **entry}
        line = (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8")
        log = self.root_dir / "history.jsonl"
        fd = os.open(log, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a writer died mid-line: keep its fragment off this entry's line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
