"""Experiment tracking: a thin resource over wandb that is offline by default and can be switched off."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from sleeptrain_assets.lib import settings

MODES = ("offline", "online", "disabled")


class Tracker(dg.ConfigurableResource):
    """Logs metrics and tables to wandb: offline files under SLEEPTRAIN_HOME/tracking unless told otherwise."""

    mode: str | None = Field(
        default=None,
        description="offline | online | disabled; default: SLEEPTRAIN_TRACKING, else offline. "
        "online needs WANDB_API_KEY.",
    )
    project: str = Field(default="sleeptrain", description="wandb project")
    entity: str | None = Field(default=None, description="wandb entity (team or user) for online runs")
    directory: str | None = Field(default=None, description="where offline runs are written; default SLEEPTRAIN_HOME/tracking")

    _run: Any = PrivateAttr(default=None)

    def resolved_mode(self) -> str:
        mode = (self.mode or os.environ.get("SLEEPTRAIN_TRACKING", "") or "offline").strip().lower()
        if mode not in MODES:
            raise ValueError(f"tracker mode {mode!r} (setting `mode` or SLEEPTRAIN_TRACKING) must be one of {MODES}")
        if mode == "online" and not os.environ.get("WANDB_API_KEY", "").strip():
            raise ValueError("tracker mode 'online' needs WANDB_API_KEY; set it, or use mode 'offline' or 'disabled'")
        return mode

    @property
    def enabled(self) -> bool:
        return self.resolved_mode() != "disabled"

    def run_dir(self) -> Path | None:
        """Folder of the open run's files, or None when nothing is being tracked."""
        return Path(self._run.dir).parent if self._run is not None else None

    def start(self, name: str, config: Mapping[str, Any] | None = None, job_type: str | None = None,
              tags: Sequence[str] = ()) -> None:
        """Open a run (finishing any run this resource still has open)."""
        mode = self.resolved_mode()
        if mode == "disabled":
            return
        self.finish()
        import wandb

        directory = Path(self.directory) if self.directory else settings.state_subdir("tracking")
        directory.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=self.project,
            entity=self.entity if mode == "online" else None,
            name=name,
            job_type=job_type,
            tags=list(tags),
            config=dict(config or {}),
            dir=str(directory),
            mode=mode,
            reinit="create_new",
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def _ensure_run(self) -> bool:
        if self.resolved_mode() == "disabled":
            return False
        if self._run is None:
            self.start(name=self.project)
        return True

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numbers; None and non-finite values are left out (wandb would chart them as gaps anyway)."""
        if not self._ensure_run():
            return
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        clean.update({k: int(v) for k, v in metrics.items() if isinstance(v, bool)})
        if clean:
            self._run.log(clean, step=step)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if not self._ensure_run():
            return
        import wandb

        self._run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def finish(self) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            run.finish()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.finish()
