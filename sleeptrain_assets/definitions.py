"""The SleepTrain Dagster code location."""

from pathlib import Path

import dagster as dg

from sleeptrain_assets.lib import settings


@dg.definitions
def defs() -> dg.Definitions:
    # An unknown SLEEPTRAIN_PROFILE fails the code location's load naming the choices, not a step minutes later.
    settings.profile()
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
