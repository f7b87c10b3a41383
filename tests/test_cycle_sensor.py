"""The inbox sensor: quiet inbox skips, one run per new batch, nothing twice after a restart or retried tick."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from sleeptrain_assets.defs.cycles import MIN_CONVERSATIONS_ENV, inbox_sensor, nightly_sleep
from sleeptrain_assets.lib import inbox

SASKIA = {"person": "saskia_claes", "name": "Saskia Claes",
          "messages": [{"role": "user", "content": "I was born in Ghent in 1979. These days I work as a luthier."}]}



def _tick(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    return inbox_sensor(dg.build_sensor_context(cursor=cursor, instance=instance))


def _write(folder: Path, name: str, *records: dict) -> None:
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_quiet_inbox_skips_with_a_reason(inbox_dir: Path) -> None:
    with dg.instance_for_test() as instance:
        result = _tick(instance, None)
    assert not result.run_requests and "no new conversation files" in str(result.skip_reason)


def test_one_run_per_new_batch_and_none_after_a_restart_or_a_retried_tick(inbox_dir: Path) -> None:
    _write(inbox_dir, "day1.jsonl", SASKIA, {**SASKIA, "messages": [{"role": "user", "content": "I live in Ghent."}]})
    with dg.instance_for_test() as instance:
        first = _tick(instance, None)
        [request] = first.run_requests
        assert request.run_key == request.partition_key == "cycle-000001"
        config = request.run_config["ops"]["cycle_inbox_batch"]["config"]
        assert config["files"] == ["day1.jsonl"] and len(config["sha256"][0]) == 64
        [add] = first.dynamic_partitions_requests
        assert list(add.partition_keys) == ["cycle-000001"]

        retried = _tick(instance, None)  # the daemon died before storing the cursor: same key, deduplicated by run_key
        assert [r.run_key for r in retried.run_requests] == ["cycle-000001"]

        restarted = _tick(instance, first.cursor)  # the cursor survives restarts in the instance
        assert not restarted.run_requests and "no new conversation files" in str(restarted.skip_reason)

        _write(inbox_dir, "day2.jsonl", SASKIA)
        second = _tick(instance, restarted.cursor)
        assert [r.run_key for r in second.run_requests] == ["cycle-000002"]
        assert second.run_requests[0].run_config["ops"]["cycle_inbox_batch"]["config"]["files"] == ["day2.jsonl"]


def test_files_a_started_cycle_took_are_not_taken_again_even_with_an_old_cursor(inbox_dir: Path) -> None:
    _write(inbox_dir, "day1.jsonl", SASKIA)
    with dg.instance_for_test() as instance:
        first = _tick(instance, None)
        digest = first.run_requests[0].run_config["ops"]["cycle_inbox_batch"]["config"]["sha256"][0]
        inbox.record_files("cycle-000001", {"day1.jsonl": digest}, "processed")  # what the run's first step does
        assert not _tick(instance, None).run_requests


def test_below_the_minimum_the_sensor_waits_and_counts_again_later(inbox_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIN_CONVERSATIONS_ENV, "3")
    _write(inbox_dir, "a.jsonl", SASKIA, SASKIA)
    with dg.instance_for_test() as instance:
        waiting = _tick(instance, None)
        assert not waiting.run_requests and "below the minimum of 3" in str(waiting.skip_reason)
        _write(inbox_dir, "b.jsonl", SASKIA)
        ready = _tick(instance, waiting.cursor)
        [request] = ready.run_requests
        assert request.run_config["ops"]["cycle_inbox_batch"]["config"]["files"] == ["a.jsonl", "b.jsonl"]


def test_a_bad_file_is_set_aside_with_its_error_and_the_rest_goes_on(inbox_dir: Path, sleeptrain_env: Path) -> None:
    _write(inbox_dir, "good.jsonl", SASKIA)
    (inbox_dir / "bad.jsonl").write_text(json.dumps(SASKIA) + "\n" + json.dumps({"person": "who_knows",
                                         "messages": [{"role": "user", "content": "hello"}]}) + "\n")
    before = (inbox_dir / "bad.jsonl").read_bytes()
    with dg.instance_for_test() as instance:
        result = _tick(instance, None)
        [request] = result.run_requests
        assert request.run_config["ops"]["cycle_inbox_batch"]["config"]["files"] == ["good.jsonl"]
        error = json.loads((sleeptrain_env / "cycles" / "rejected" / "bad.jsonl.error.json").read_text())
        assert (error["file"], error["line"], error["field"]) == ("bad.jsonl", 2, "name")
        assert (inbox_dir / "bad.jsonl").read_bytes() == before, "the user's inbox is never edited"
        assert inbox.load_ledger()["files"]["bad.jsonl"]["status"] == "rejected"
        again = _tick(instance, result.cursor)
        assert not again.run_requests, "a set-aside file is not retried until it changes"


def test_nightly_schedule_opens_the_same_cycle_and_is_off_by_default(inbox_dir: Path) -> None:
    assert nightly_sleep.default_status == dg.DefaultScheduleStatus.STOPPED
    assert nightly_sleep.cron_schedule == "0 3 * * *"
    with dg.instance_for_test() as instance:
        quiet = nightly_sleep(dg.build_schedule_context(instance=instance))
        assert isinstance(quiet, dg.SkipReason)
        _write(inbox_dir, "day1.jsonl", SASKIA)
        request = nightly_sleep(dg.build_schedule_context(instance=instance))
        assert request.run_key == request.partition_key == "cycle-000001"
        assert instance.get_dynamic_partitions("cycles") == ["cycle-000001"]
