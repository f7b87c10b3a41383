"""IO manager for `lora_adapter`: the asset's value is a small reference to a registry version, kept as JSON.

Dagster's filesystem IO manager adds a `path` metadata entry naming its own storage file, which wins over the
asset's metadata; the adapter's page in the UI would then point at a pickle instead of the adapter folder.
This one stores the reference the same way (under the instance's storage directory) and sets `path` to the
adapter folder it names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from sleeptrain_assets.lib.atomic import write_json_atomic


class _AdapterRefFiles(dg.UPathIOManager):
    extension = ".json"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: Any) -> None:
        write_json_atomic(Path(str(path)), obj)

    def load_from_path(self, context: dg.InputContext, path: Any) -> Any:
        return json.loads(Path(str(path)).read_text(encoding="utf-8"))

    def get_metadata(self, context: dg.OutputContext, obj: Any) -> dict[str, dg.RawMetadataValue]:
        folder = obj.get("path") if isinstance(obj, Mapping) else None
        return {"path": dg.MetadataValue.path(str(folder))} if folder else {}


class AdapterRefIOManager(dg.ConfigurableIOManagerFactory):
    """Stores adapter references as JSON; the `path` metadata shows the adapter folder, not the stored file."""

    base_dir: str | None = Field(default=None, description="default: the Dagster instance's storage directory")

    def create_io_manager(self, context: dg.InitResourceContext) -> _AdapterRefFiles:
        from upath import UPath

        base = self.base_dir or (context.instance.storage_directory() if context.instance else None)
        if not base:
            raise dg.DagsterInvariantViolationError("AdapterRefIOManager needs base_dir or a Dagster instance")
        return _AdapterRefFiles(base_path=UPath(base))
