"""External benchmark suites (TRACE, MemoryBench, BABILong, InfiniteBench) as JSONL, and a runner for them.

Every line is one JSON object with at least ``input`` (the whole prompt) and ``target`` (the answer); other
fields (``id``, ``task``, ...) are kept. Suite files are listed in ``data/benchmarks/paths.yaml``::

    benchmarks:
      TRACE: samples/trace_sample.jsonl      # relative paths resolve against the YAML's folder
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sleeptrain_assets.lib.catalog import CatalogError, read_yaml
from sleeptrain_assets.lib.scoring import contains_phrase, normalise

REQUIRED_FIELDS = ("input", "target")


class BenchmarkDataError(ValueError):
    """A missing suite file or a malformed line; the message names the file and the line number."""

    def __init__(self, path: Path | str, line: int | None, problem: str):
        where = f"{path}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


@dataclass(frozen=True)
class BenchmarkDataset:
    name: str
    path: str
    examples: tuple[dict[str, Any], ...]

    def __len__(self) -> int:
        return len(self.examples)

    def head(self, n: int | None) -> BenchmarkDataset:
        return self if n is None else BenchmarkDataset(self.name, self.path, self.examples[:n])


@dataclass(frozen=True)
class BenchmarkResult:
    benchmark: str
    path: str
    avg_score: float
    count: int
    items: tuple[dict[str, Any], ...] = field(default=())

    def to_dict(self, with_items: bool = True) -> dict[str, Any]:
        data = asdict(self)
        data["items"] = list(self.items) if with_items else []
        return data


class JsonlBenchmarkLoader:
    """Reads one suite's JSONL; subclasses only name the suite."""

    benchmark: ClassVar[str] = "jsonl"

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.benchmark

    def load(self) -> BenchmarkDataset:
        if not self.path.is_file():
            raise BenchmarkDataError(self.path, None, f"{self.name} suite file does not exist")
        examples = []
        with self.path.open("r", encoding="utf-8") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise BenchmarkDataError(self.path, number, f"is not valid JSON ({exc.msg} at column {exc.colno})") from exc
                if not isinstance(record, dict):
                    raise BenchmarkDataError(self.path, number, "must be a JSON object")
                for name in REQUIRED_FIELDS:
                    value = record.get(name)
                    if value is None or (isinstance(value, str) and not value.strip()):
                        raise BenchmarkDataError(self.path, number, f"field {name!r} is missing or empty")
                    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                        raise BenchmarkDataError(self.path, number, f"field {name!r} must be text or a number")
                record.setdefault("id", f"{self.name}:{number}")
                record["line"] = number
                examples.append(record)
        if not examples:
            raise BenchmarkDataError(self.path, None, f"{self.name} suite file holds no examples")
        return BenchmarkDataset(self.name, str(self.path), tuple(examples))


class TRACEBenchLoader(JsonlBenchmarkLoader):
    benchmark = "TRACE"


class MemoryBenchLoader(JsonlBenchmarkLoader):
    benchmark = "MemoryBench"


class BABILongLoader(JsonlBenchmarkLoader):
    benchmark = "BABILong"


class InfiniteBenchLoader(JsonlBenchmarkLoader):
    benchmark = "InfiniteBench"


LOADERS: dict[str, type[JsonlBenchmarkLoader]] = {
    cls.benchmark: cls for cls in (TRACEBenchLoader, MemoryBenchLoader, BABILongLoader, InfiniteBenchLoader)
}


def load_paths(paths_yaml: Path) -> dict[str, Path]:
    """Suite name -> JSONL path from `paths.yaml`; unknown suite names are refused."""
    data = read_yaml(paths_yaml)
    suites = data.get("benchmarks") if isinstance(data, Mapping) else None
    if not isinstance(suites, Mapping) or not suites:
        raise CatalogError(paths_yaml, None, "benchmarks", "must map suite names to JSONL paths")
    out = {}
    for name, value in suites.items():
        if name not in LOADERS:
            raise CatalogError(paths_yaml, str(name), None, f"is not a known suite; choose from {sorted(LOADERS)}")
        if not isinstance(value, str) or not value.strip():
            raise CatalogError(paths_yaml, str(name), "path", "must be a non-empty string")
        path = Path(value.strip()).expanduser()
        out[name] = path if path.is_absolute() else (paths_yaml.parent / path)
    return out


def load_suites(paths_yaml: Path) -> list[BenchmarkDataset]:
    return [LOADERS[name](path).load() for name, path in load_paths(paths_yaml).items()]


# --------------------------------------------------------------------------- metrics

_ARTICLE = re.compile(r"\b(a|an|the)\b")


def _answer_text(prediction: str) -> str:
    return _ARTICLE.sub(" ", normalise(prediction)).strip()


def exact_match(prediction: str, example: Mapping[str, Any]) -> float:
    """1.0 when prediction and target are equal after normalisation (case, punctuation, articles)."""
    return float(" ".join(_answer_text(prediction).split()) == " ".join(_answer_text(str(example["target"])).split()))


def contains_match(prediction: str, example: Mapping[str, Any]) -> float:
    """1.0 when the target occurs as whole words in the prediction's first line (models add chatter after)."""
    first = next((line for line in prediction.strip().splitlines() if line.strip()), "")
    return float(contains_phrase(first, str(example["target"])))


def token_f1(prediction: str, example: Mapping[str, Any]) -> float:
    pred, gold = _answer_text(prediction).split(), _answer_text(str(example["target"])).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum(min(pred.count(t), gold.count(t)) for t in set(gold))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[[str, Mapping[str, Any]], float]] = {
    "exact_match": exact_match,
    "contains": contains_match,
    "f1": token_f1,
}


# --------------------------------------------------------------------------- runner


def run_benchmark(
    model_fn: Callable[[Any], Any],
    dataset: BenchmarkDataset | Sequence[Mapping[str, Any]],
    metric_fn: Callable[[str, Mapping[str, Any]], float],
    *,
    batched: bool = False,
    name: str | None = None,
) -> BenchmarkResult:
    """Score `model_fn` on every example: average score, count and per-item results.

    `model_fn(example) -> prediction`, or with `batched=True`, `model_fn(examples) -> predictions` (one call,
    so a model can batch its generation).
    """
    examples = list(dataset.examples if isinstance(dataset, BenchmarkDataset) else dataset)
    bench = name or (dataset.name if isinstance(dataset, BenchmarkDataset) else "benchmark")
    path = dataset.path if isinstance(dataset, BenchmarkDataset) else ""
    if batched:
        predictions = list(model_fn(examples))
        if len(predictions) != len(examples):
            raise ValueError(f"{bench}: model_fn returned {len(predictions)} predictions for {len(examples)} examples")
    else:
        predictions = [model_fn(example) for example in examples]
    items = []
    for example, prediction in zip(examples, predictions, strict=True):
        score = float(metric_fn(str(prediction), example))
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"{bench}: metric returned {score} for {example.get('id')!r}; scores must lie in [0, 1]")
        items.append({"id": example.get("id"), "target": example["target"], "prediction": str(prediction), "score": score})
    avg = sum(i["score"] for i in items) / len(items) if items else 0.0
    return BenchmarkResult(bench, path, round(avg, 4), len(items), tuple(items))
