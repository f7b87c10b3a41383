"""The curation assets materialize in process with real resources; bad inputs stop everything downstream."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest

from sleeptrain_assets.defs import curation
from sleeptrain_assets.lib import settings
from sleeptrain_resources.llm import BaseModel

CURATION = [curation.people_profiles, curation.conversation_templates, curation.templated_conversations,
            curation.evaluation_questions, curation.validated_queue]
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
    # The templates are valid on their own; nothing that reads the people materializes.
    assert [m.asset_key.to_user_string() for m in result.get_asset_materialization_events()] == [
        "conversation_templates"]


def test_a_second_data_folder_in_v2_format_works_unchanged(compat_dir: Path, tmp_path: Path, monkeypatch) -> None:
    for sub, name in (("people", "people_data.yaml"), ("templates", "qa_templates.yaml")):
        (tmp_path / sub).mkdir()
        shutil.copy(compat_dir / name, tmp_path / sub / name)
    monkeypatch.setenv("SLEEPTRAIN_DATA_DIR", str(tmp_path))
    result = materialize()
    assert result.success
    assert {c.person_id for c in result.output_for_node("validated_queue")} == {"obama", "musk", "curie"}


@pytest.mark.parametrize("key", ["people_profiles", "conversation_templates"])
def test_each_source_asset_materializes_alone(key: str) -> None:
    result = materialize(selection=[key])
    assert result.success
    assert [m.asset_key.to_user_string() for m in result.get_asset_materialization_events()] == [key]


def test_downstream_assets_materialize_alone_from_stored_upstream(tmp_path: Path) -> None:
    # A persistent instance, as `dagster asset materialize --select X` uses: upstream values come from storage.
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert materialize_on(instance, ["people_profiles", "conversation_templates"]).success
        for key in ("evaluation_questions", "templated_conversations"):
            result = materialize_on(instance, [key])
            assert result.success
            assert [m.asset_key.to_user_string() for m in result.get_asset_materialization_events()] == [key]
        assert len(result.output_for_node("templated_conversations")) > 50


def materialize_on(instance: dg.DagsterInstance, selection: list[str]) -> dg.ExecuteInProcessResult:
    return dg.materialize([*CURATION, *CHECKS], resources={"base_model": BaseModel()}, instance=instance,
                          selection=selection)


def test_a_data_folder_with_only_people_and_templates_falls_back_to_shipped_benchmarks(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    repo = Path(__file__).resolve().parents[1]
    for sub in ("people", "templates"):
        shutil.copytree(repo / "data" / sub, tmp_path / sub)
    monkeypatch.setenv("SLEEPTRAIN_DATA_DIR", str(tmp_path))
    assert settings.missing_inputs() == []
    assert settings.benchmark_path("replay_prompts.yaml") == settings.SHIPPED_BENCHMARKS / "replay_prompts.yaml"
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "replay_prompts.yaml").write_text("prompts: [What is 2 + 2?]\n")
    assert settings.benchmark_path("replay_prompts.yaml") == tmp_path / "benchmarks" / "replay_prompts.yaml"
    assert materialize(selection=["people_profiles"]).success


def test_truly_missing_inputs_fail_the_first_step_before_any_work(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLEEPTRAIN_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(settings, "SHIPPED_BENCHMARKS", tmp_path / "no-defaults")
    result = materialize(raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    message = failure.step_failure_data.error.to_string()
    for part in ("inputs are missing", "people", "templates", "replay_prompts.yaml", "paths.yaml"):
        assert part in message
    assert not result.get_asset_materialization_events()


def test_an_unknown_profile_fails_the_first_step_and_the_definitions_load(monkeypatch) -> None:
    from sleeptrain_assets.definitions import defs

    monkeypatch.setenv("SLEEPTRAIN_PROFILE", "smok")
    with pytest.raises(ValueError, match="SLEEPTRAIN_PROFILE='smok' is not a known profile.*smoke"):
        defs()
    result = materialize(selection=["people_profiles"], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert failure.step_key == "people_profiles"
    assert "SLEEPTRAIN_PROFILE='smok'" in failure.step_failure_data.error.to_string()
