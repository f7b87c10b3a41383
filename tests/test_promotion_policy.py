"""PromotionPolicy: a challenger passes only when every gate does; each gate seen failing on its own."""

from __future__ import annotations

import pytest

from sleeptrain_assets.lib.promotion import MetricThreshold, PromotionPolicy

CHAMPION = {"new_fact_recall": 0.0, "retention": 0.90, "locality": 0.95}
GOOD = {"new_fact_recall": 0.95, "retention": 0.88, "locality": 0.92}


def test_a_challenger_within_every_budget_is_accepted_with_reasons() -> None:
    decision = PromotionPolicy().decide(GOOD, CHAMPION, items=40)
    assert decision["accepted"] and decision["reasons"][0].startswith("every gate passed")
    assert {g["gate"] for g in decision["gates"]} == {"min_items", "new_fact_recall", "retention_budget",
                                                      "locality_budget"}
    assert decision["metrics"] == {"challenger": GOOD, "champion": CHAMPION}


def test_first_adapter_has_no_champion_to_lose_against() -> None:
    decision = PromotionPolicy().decide(GOOD, {}, items=40)
    assert decision["accepted"]
    assert "first adapter" in next(g for g in decision["gates"] if g["gate"] == "retention_budget")["detail"]


@pytest.mark.parametrize(
    ("challenger", "items", "gate", "words"),
    [
        ({**GOOD, "new_fact_recall": 0.5}, 40, "new_fact_recall", "not >= the threshold 0.9"),
        ({**GOOD, "retention": 0.80}, 40, "retention_budget", "fell 0.1"),
        ({**GOOD, "locality": 0.85}, 40, "locality_budget", "more than the budget 0.05"),
        (GOOD, 9, "min_items", "fewer than the minimum 10"),
        ({**GOOD, "retention": None}, 40, "retention_budget", "has no value"),
    ],
    ids=["recall-too-low", "forgot-earlier-facts", "locality-lost", "too-few-items", "missing-metric"],
)
def test_each_failing_gate_rejects_and_says_why(challenger, items, gate, words) -> None:
    decision = PromotionPolicy().decide(challenger, CHAMPION, items=items)
    assert not decision["accepted"]
    failed = [g for g in decision["gates"] if not g["passed"]]
    assert [g["gate"] for g in failed] == [gate]
    assert words in decision["reasons"][0] and decision["reasons"][0].startswith(gate)


def test_budget_edge_is_inclusive() -> None:
    assert PromotionPolicy().decide({**GOOD, "retention": 0.85}, CHAMPION, items=40)["accepted"]


@pytest.mark.parametrize(
    ("threshold", "challenger", "champion", "passes"),
    [
        (MetricThreshold(threshold=0.8), 0.85, None, True),
        (MetricThreshold(threshold=0.8), 0.75, None, False),
        (MetricThreshold(min_absolute_change=0.05), 0.84, 0.80, False),
        (MetricThreshold(min_absolute_change=0.05), 0.86, 0.80, True),
        (MetricThreshold(min_relative_change=0.10), 0.87, 0.80, False),
        (MetricThreshold(min_relative_change=0.10), 0.89, 0.80, True),
        (MetricThreshold(threshold=0.2, greater_is_better=False), 0.1, None, True),
        (MetricThreshold(min_absolute_change=0.05, greater_is_better=False), 0.78, 0.80, False),
        (MetricThreshold(min_absolute_change=0.05, greater_is_better=False), 0.70, 0.80, True),
    ],
)
def test_metric_threshold_follows_mlflow_semantics(threshold, challenger, champion, passes) -> None:
    assert (threshold.check("m", challenger, champion) == []) is passes
    policy = PromotionPolicy(thresholds={"m": threshold})
    assert policy.decide({**GOOD, "m": challenger}, {**CHAMPION, "m": champion}, 40)["accepted"] is passes


def test_bad_policy_values_are_refused() -> None:
    with pytest.raises(ValueError, match="min_new_fact_recall"):
        PromotionPolicy(min_new_fact_recall=1.5)
    with pytest.raises(ValueError, match="min_absolute_change"):
        MetricThreshold(min_absolute_change=-1)
