"""Jobs users launch by name: the whole day-and-night graph, and the sleep half sent to a GPU node."""

import dagster as dg

from sleeptrain_assets.defs.training import GPU_K8S_CONFIG

# Replay targets, training and evaluation are the model-heavy steps; all belong on the accelerator.
SLEEP_SELECTION = dg.AssetSelection.assets("lora_adapter").downstream() | dg.AssetSelection.assets("replay_targets")

full_pipeline = dg.define_asset_job(
    name="full_pipeline",
    # Sleep cycles are partitioned per cycle and run as their own job (`sleep_cycle`).
    selection=dg.AssetSelection.all() - dg.AssetSelection.groups("cycles"),
    description="Every asset in lineage order: curation, hippocampus, training, benchmarks, leaderboard.",
)

# The K8sRunLauncher runs a whole run in one pod and reads *run* tags (op tags only reach per-step pods
# under the k8s_job_executor), so the GPU request is repeated here as a run tag.
sleep_on_gpu = dg.define_asset_job(
    name="sleep_on_gpu",
    selection=SLEEP_SELECTION,
    description="Train the adapter and benchmark it in a run that asks Kubernetes for a GPU node.",
    tags={"dagster-k8s/config": GPU_K8S_CONFIG, "sleeptrain/accelerator": "gpu"},
)


@dg.definitions
def jobs() -> dg.Definitions:
    return dg.Definitions(jobs=[full_pipeline, sleep_on_gpu])
