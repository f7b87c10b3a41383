"""External suite loaders and the runner, on the shipped sample files and on broken ones."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sleeptrain_assets.lib import external_benchmarks as eb
from sleeptrain_assets.lib.catalog import CatalogError

REPO = Path(__file__).resolve().parents[1]
PATHS = REPO / "data" / "benchmarks" / "paths.yaml"


def solve(example: dict) -> str:
    """A rule-based reader for the sample tasks: proves each sample's target follows from its input."""
    text = example["input"]
    task = example["task"]
    if task == "qa1_single_supporting_fact":
        who = re.search(r"Where is (\w+)\?", text).group(1)
        return re.findall(rf"{who} (?:moved|went|journeyed|travelled|went back) to the (\w+)\.", text)[-1]
    if task == "passkey":
        return re.search(r"The pass key is (\d+)\.", text).group(1)
    if task == "numglue_arithmetic":
        numbers = [int(n) for n in re.findall(r"\d+", text)]
        return str(numbers[0] - numbers[1] if "gives away" in text else numbers[0] + numbers[1])
    if task == "cross_session_recall":
        statement = re.findall(r"User: (My dog is called|I grew up in|My sister works as a|I am learning to play the) "
                               r"(\w+)\.", text)
        return statement[-1][1]
    raise AssertionError(f"unknown task {task}")


def test_paths_yaml_lists_every_suite_and_samples_load():
    paths = eb.load_paths(PATHS)
    assert set(paths) == {"TRACE", "MemoryBench", "BABILong", "InfiniteBench"}
    for name, path in paths.items():
        dataset = eb.LOADERS[name](path).load()
        assert dataset.name == name and len(dataset) >= 8
        assert all(e["input"] and e["target"] and e["line"] >= 1 for e in dataset.examples)
        assert len({e["id"] for e in dataset.examples}) == len(dataset)


def test_samples_are_answerable_and_the_runner_averages():
    for dataset in eb.load_suites(PATHS):
        result = eb.run_benchmark(solve, dataset, eb.exact_match)
        assert result.count == len(dataset) and result.avg_score == 1.0, dataset.name
        # A reader that always answers the first target gets exactly the share of examples sharing it.
        first = dataset.examples[0]["target"]
        constant = eb.run_benchmark(lambda e, first=first: first, dataset, eb.exact_match)
        share = sum(str(e["target"]) == str(first) for e in dataset.examples) / len(dataset)
        assert constant.avg_score == pytest.approx(share, abs=1e-4)
        assert [i["score"] for i in constant.items] == [float(str(e["target"]) == str(first)) for e in dataset.examples]


def test_batched_runner_and_metrics():
    data = [{"id": "a", "input": "q", "target": "Kitchen"}, {"id": "b", "input": "q", "target": "blue whale"}]
    result = eb.run_benchmark(lambda batch: ["The kitchen.\nMore text", "a whale"], data, eb.contains_match,
                              batched=True, name="toy")
    assert result.benchmark == "toy" and result.count == 2 and result.avg_score == 0.5
    assert eb.token_f1("the blue whale", data[1]) == 1.0
    assert eb.token_f1("a whale", data[1]) == pytest.approx(2 / 3)
    assert eb.exact_match("The Kitchen!", data[0]) == 1.0
    assert eb.contains_match("second line\nkitchen", data[0]) == 0.0  # only the first line counts
    with pytest.raises(ValueError, match="returned 1 predictions for 2"):
        eb.run_benchmark(lambda batch: ["x"], data, eb.exact_match, batched=True)
    with pytest.raises(ValueError, match=r"scores must lie in \[0, 1\]"):
        eb.run_benchmark(lambda e: "x", data, lambda p, e: 2.0)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(eb.BenchmarkDataError, match=r"nope\.jsonl: TRACE suite file does not exist"):
        eb.TRACEBenchLoader(tmp_path / "nope.jsonl").load()


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"input": "a", "target": "b"}', "{not json"], r"line 2: is not valid JSON"),
        (['{"input": "a", "target": "b"}', "", '["a", "b"]'], r"line 3: must be a JSON object"),
        (['{"input": "a"}'], r"line 1: field 'target' is missing or empty"),
        (['{"input": "  ", "target": "b"}'], r"line 1: field 'input' is missing or empty"),
        (['{"input": "a", "target": {"x": 1}}'], r"line 1: field 'target' must be text or a number"),
        ([""], r"holds no examples"),
    ],
)
def test_malformed_lines_name_the_line(tmp_path, lines, message):
    path = tmp_path / "suite.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(eb.BenchmarkDataError, match=message) as info:
        eb.BABILongLoader(path).load()
    assert str(path) in str(info.value)


def test_paths_yaml_errors(tmp_path):
    bad = tmp_path / "paths.yaml"
    bad.write_text("benchmarks:\n  GLUE: x.jsonl\n")
    with pytest.raises(CatalogError, match="'GLUE'.*not a known suite"):
        eb.load_paths(bad)
    bad.write_text("benchmarks:\n  TRACE: ''\n")
    with pytest.raises(CatalogError, match="field 'path'"):
        eb.load_paths(bad)
    absolute = tmp_path / "abs.jsonl"
    bad.write_text(f"benchmarks:\n  TRACE: {absolute}\n  BABILong: rel/b.jsonl\n")
    assert eb.load_paths(bad) == {"TRACE": absolute, "BABILong": tmp_path / "rel" / "b.jsonl"}


def test_sample_generator_is_deterministic_and_matches_the_shipped_files(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_babi_samples.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(summary) == set(eb.LOADERS)
    for name, path in eb.load_paths(PATHS).items():
        generated = tmp_path / Path(summary[name]["file"]).name
        assert generated.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), name
