"""The curation assets materialize in process with real resources; bad inputs stop everything downstream."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest

from sleeptrain_assets.defs import curation
from sleeptrain_resources.llm import BaseModel

CURATION = [curation.people_and_templates, curation.conversations_and_evaluation_split, curation.validated_queue]
CHECKS = [
    curation.queue_has_no_duplicates,
    curation.queue_is_balanced_across_people,
    curation.queue_covers_every_fact,
    curation.queue_is_interleaved,
    curation.queue_excludes_evaluation_questions,
    curation.queue_fits_chat_template,
]


def materialize(**kwargs) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [*CURATION, *CHECKS],
        resources={"base_model": BaseModel()},
        instance=dg.DagsterInstance.ephemeral(),
        **kwargs,
    )


def test_curation_assets_materialize_with_checks_and_metadata() -> None:
    result = materialize()
    assert result.success
    queue = result.output_for_node("validated_queue")
    assert len(queue) > 50
    evaluations = result.get_asset_check_evaluations()
    assert {e.check_name for e in evaluations} == {next(iter(c.check_specs)).name for c in CHECKS}
    assert all(e.passed for e in evaluations), [e.description for e in evaluations if not e.passed]
    materializations = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
    meta = materializations["templated_conversations"].materialization.metadata
    assert {"per_person", "per_mode", "fact_turns_per_category", "sample"} <= set(meta)
    assert meta["sample"].value.count("system:") >= 1
    assert "per_kind" in materializations["evaluation_questions"].materialization.metadata


def test_bad_input_fails_naming_the_file_and_runs_nothing_downstream(tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "data"
    shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "templates", data / "templates")
    (data / "people").mkdir(parents=True)
    (data / "people" / "nobody.yaml").write_text("id: nobody\nfacts: {birth: {year: 1900}}\n")
    monkeypatch.setenv("SLEEPTRAIN_DATA_DIR", str(data))
    result = materialize(raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    message = failure.step_failure_data.error.to_string()
    assert "nobody.yaml" in message and "'name'" in message
    assert not result.get_asset_materialization_events()


def test_a_second_data_folder_in_v2_format_works_unchanged(compat_dir: Path, tmp_path: Path, monkeypatch) -> None:
    for sub, name in (("people", "people_data.yaml"), ("templates", "qa_templates.yaml")):
        (tmp_path / sub).mkdir()
        shutil.copy(compat_dir / name, tmp_path / sub / name)
    monkeypatch.setenv("SLEEPTRAIN_DATA_DIR", str(tmp_path))
    result = materialize()
    assert result.success
    assert {c.person_id for c in result.output_for_node("validated_queue")} == {"obama", "musk", "curie"}
