"""Whether a challenger adapter may replace the champion: explicit gates, every verdict with its reason.

Two kinds of gate:
- `MetricThreshold`, as MLflow's model validation has it: an absolute `threshold` on the challenger's value,
  and `min_absolute_change` / `min_relative_change` over the champion's value, with `greater_is_better`.
- Memory gates: recall on the cycle's new facts at least a minimum; retention of earlier facts and locality
  down by at most a budget (points, challenger vs champion on the same items); a minimum number of evaluated
  items (too few items decide nothing).
A challenger is accepted only when every gate passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

NEW_FACT_RECALL = "new_fact_recall"
RETENTION = "retention"
LOCALITY = "locality"


@dataclass(frozen=True)
class MetricThreshold:
    """MLflow-style gate on one metric; None disables a part."""

    threshold: float | None = None
    min_absolute_change: float | None = None
    min_relative_change: float | None = None
    greater_is_better: bool = True

    def __post_init__(self) -> None:
        for name in ("min_absolute_change", "min_relative_change"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"MetricThreshold.{name}={value} must be >= 0")

    def check(self, metric: str, challenger: float | None, champion: float | None) -> list[str]:
        """Failure reasons (empty when the gate passes)."""
        if challenger is None:
            return [f"{metric}: the challenger has no value"]
        better, sign = ("higher", 1.0) if self.greater_is_better else ("lower", -1.0)
        failures = []
        if self.threshold is not None and sign * (challenger - self.threshold) < 0:
            op = ">=" if self.greater_is_better else "<="
            failures.append(f"{metric} {challenger:.4g} is not {op} the threshold {self.threshold:.4g}")
        if champion is not None:
            gain = sign * (challenger - champion)
            if self.min_absolute_change is not None and gain < self.min_absolute_change:
                failures.append(f"{metric} {challenger:.4g} vs champion {champion:.4g}: {better} by {gain:.4g}, "
                                f"less than the minimum absolute change {self.min_absolute_change:.4g}")
            if self.min_relative_change is not None and champion != 0 and gain / abs(champion) < self.min_relative_change:
                failures.append(f"{metric} {challenger:.4g} vs champion {champion:.4g}: {better} by "
                                f"{gain / abs(champion):.2%}, less than the minimum relative change "
                                f"{self.min_relative_change:.2%}")
        return failures


@dataclass(frozen=True)
class PromotionPolicy:
    """The gates a challenger must pass (rates in [0, 1]; budgets in rate points, e.g. 0.05 = 5 points)."""

    min_new_fact_recall: float = 0.9
    retention_budget: float = 0.05
    locality_budget: float = 0.05
    min_items: int = 10
    thresholds: Mapping[str, MetricThreshold] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_new_fact_recall <= 1.0:
            raise ValueError(f"PromotionPolicy.min_new_fact_recall={self.min_new_fact_recall} must be in [0, 1]")
        for name in ("retention_budget", "locality_budget"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PromotionPolicy.{name}={getattr(self, name)} must be in [0, 1]")
        if self.min_items < 1:
            raise ValueError(f"PromotionPolicy.min_items={self.min_items} must be >= 1")

    def decide(self, challenger: Mapping[str, float | None], champion: Mapping[str, float | None],
               items: int) -> dict[str, Any]:
        """{accepted, reasons, gates: [{gate, passed, detail}], metrics} for one challenger vs champion."""
        gates: list[dict[str, Any]] = []

        def gate(name: str, failures: list[str], ok: str) -> None:
            gates.append({"gate": name, "passed": not failures, "detail": "; ".join(failures) or ok})

        gate("min_items", [] if items >= self.min_items else
             [f"{items} evaluated items, fewer than the minimum {self.min_items}"], f"{items} evaluated items")
        recall = challenger.get(NEW_FACT_RECALL)
        gate("new_fact_recall",
             MetricThreshold(threshold=self.min_new_fact_recall).check(NEW_FACT_RECALL, recall, None),
             f"{NEW_FACT_RECALL} {_fmt(recall)} >= {self.min_new_fact_recall:.4g}")
        for metric, budget in ((RETENTION, self.retention_budget), (LOCALITY, self.locality_budget)):
            ours, theirs = challenger.get(metric), champion.get(metric)
            if theirs is None:
                gate(f"{metric}_budget", [], f"no champion {metric} to compare with (first adapter)")
                continue
            if ours is None:
                gate(f"{metric}_budget", [f"{metric}: the challenger has no value"], "")
                continue
            drop = theirs - ours
            gate(f"{metric}_budget",
                 [f"{metric} fell {drop:.4g} ({theirs:.4g} -> {ours:.4g}), more than the budget {budget:.4g}"]
                 if drop > budget + 1e-9 else [],
                 f"{metric} {theirs:.4g} -> {ours:.4g} (budget {budget:.4g})")
        for metric, threshold in sorted(self.thresholds.items()):
            gate(f"threshold:{metric}", threshold.check(metric, challenger.get(metric), champion.get(metric)),
                 f"{metric} {_fmt(challenger.get(metric))} meets {threshold}")
        failed = [g for g in gates if not g["passed"]]
        reasons = [f"{g['gate']}: {g['detail']}" for g in failed] or [
            "every gate passed: " + "; ".join(g["detail"] for g in gates)]
        return {"accepted": not failed, "reasons": reasons, "gates": gates, "items": items,
                "metrics": {"challenger": dict(challenger), "champion": dict(champion)}, "policy": self.to_dict()}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["thresholds"] = {k: asdict(v) for k, v in self.thresholds.items()}
        return data


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"
