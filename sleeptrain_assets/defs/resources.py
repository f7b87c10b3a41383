"""The one place where SleepTrain's resources and their backends are chosen."""

import os

import dagster as dg

from sleeptrain_resources.adapter_io import AdapterRefIOManager
from sleeptrain_resources.embedding import Embedder
from sleeptrain_resources.llm import BaseModel
from sleeptrain_resources.memory_store import memory_store_from_env
from sleeptrain_resources.registry import AdapterRegistry
from sleeptrain_resources.tracking import Tracker
from sleeptrain_resources.trainer import trainer_from_env


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        # The lineage is a chain of model-heavy steps: running them in one process loads each model once
        # instead of once per step, and there is no parallelism to lose.
        executor=dg.in_process_executor,
        resources={
            "embedder": Embedder(),
            "memory_store": memory_store_from_env(),
            "base_model": BaseModel(model_path=os.environ.get("SLEEPTRAIN_BASE_MODEL", "")),
            "trainer": trainer_from_env(),
            "registry": AdapterRegistry(),
            "tracker": Tracker(),
            "adapter_io_manager": AdapterRefIOManager(),
        }
    )
