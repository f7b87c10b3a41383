"""Pure logic: no Dagster, no heavy imports at module load."""
