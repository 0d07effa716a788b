"""Exploration: blend the allocation at the estimates with a Thompson allocation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from controller.allocate import allocate, capped_utility
from controller.errors import FairsynergyError
from controller.explore import Explorer, equivalent_accuracy
from controller.problem import Problem

RESOURCES = ("compute", "data")


def fleet_problem(
    elasticity: np.ndarray, *, alpha: float = 1.0, **kwargs: Any
) -> Problem:
    """Six agents with small local amounts and a budget of one unit each."""
    n = len(elasticity)
    return Problem.from_arrays(
        RESOURCES,
        [f"a{i}" for i in range(n)],
        np.full(2, float(n)),
        np.linspace(0.6, 0.8, n),
        elasticity,
        np.full((n, 2), 0.01),
        alpha=alpha,
        **kwargs,
    )


ESTIMATE = np.array(
    [[0.05, 0.02], [0.08, 0.03], [0.02, 0.06], [0.1, 0.1], [0.04, 0.01], [0.07, 0.05]]
)
SAMPLE = np.array(
    [[0.12, 0.01], [0.03, 0.09], [0.05, 0.02], [0.06, 0.15], [0.09, 0.04], [0.02, 0.1]]
)


def test_explore_keeps_budgets_floors_and_caps_exact():
    """The blend spends every budget exactly as both solves do and keeps bounds."""
    floor = np.full((6, 2), 0.1)
    cap = np.full((6, 2), 2.5)
    estimate = fleet_problem(ESTIMATE, floor=floor, cap=cap)
    sample = fleet_problem(SAMPLE, floor=floor, cap=cap)

    chosen = Explorer(max_share=1.0, max_cost=1.0).allocate(estimate, sample, 1.0)

    assert chosen.share == 1.0
    assert chosen.cloud.sum(axis=0) == pytest.approx(chosen.mean.cloud.sum(axis=0))
    assert chosen.cloud.sum(axis=0) == pytest.approx(estimate.budget, rel=1e-6)
    assert np.all(chosen.cloud >= floor - 1e-9)
    assert np.all(chosen.cloud <= cap + 1e-9)


def test_explore_share_shrinks_with_confidence():
    """Less uncertainty gives a smaller share; none gives the plain allocation."""
    estimate, sample = fleet_problem(ESTIMATE), fleet_problem(SAMPLE)
    explorer = Explorer(max_share=0.5, max_cost=1.0)

    unsure = explorer.allocate(estimate, sample, 1.0)
    surer = explorer.allocate(estimate, sample, 0.2)
    certain = explorer.allocate(estimate, sample, 0.0)

    assert unsure.share == 0.5
    assert surer.share == pytest.approx(0.1)
    assert certain.share == 0.0
    assert np.array_equal(certain.cloud, allocate(estimate).cloud)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_explore_estimated_cost_stays_under_cap(alpha):
    """The share is cut until the estimated loss of equivalent accuracy fits the cap."""
    estimate = fleet_problem(ESTIMATE, alpha=alpha)
    sample = fleet_problem(SAMPLE, alpha=alpha)
    free = Explorer(max_share=1.0, max_cost=1.0).allocate(estimate, sample, 1.0)

    capped = Explorer(max_share=1.0, max_cost=free.cost / 10).allocate(
        estimate, sample, 1.0
    )

    assert free.cost > 0
    assert 0 < capped.share < 1
    assert capped.cost <= free.cost / 10
    reference = equivalent_accuracy(
        estimate, capped_utility(estimate, capped.mean.cloud)
    )
    blended = equivalent_accuracy(estimate, capped_utility(estimate, capped.cloud))
    assert capped.cost == pytest.approx(1 - blended / reference)


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        (0.0, (0.5 + 0.8) / 2),
        (1.0, math.sqrt(0.5 * 0.8)),
        (2.0, 2 / (1 / 0.5 + 1 / 0.8)),
        (math.inf, 0.5),
    ],
)
def test_explore_equivalent_accuracy_is_the_power_mean(alpha, expected):
    """Equivalent accuracy is the arithmetic, geometric or harmonic mean, or the min."""
    problem = fleet_problem(ESTIMATE[:2], alpha=alpha)

    value = equivalent_accuracy(problem, np.array([0.5, 0.8]))

    assert value == pytest.approx(expected)


def test_explore_rejects_invalid_share():
    """A share outside [0, 1] is refused, naming the parameter."""
    with pytest.raises(FairsynergyError, match="max_share"):
        Explorer(max_share=1.5)
