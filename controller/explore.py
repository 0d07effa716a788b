"""Explore while allocating, so that the slopes stay identifiable.

An agent that always runs at the same amounts tells the learner its accuracy
there and nothing about the elasticities: every curve through that one point
fits. The allocation must therefore move a little, and move where the
learner is unsure. The policy here:

1. solve the allocation at the posterior estimates: ``x_mean``;
2. solve it again at one Thompson sample from every agent's posterior:
   ``x_sample``;
3. apply ``x = (1 - share) x_mean + share x_sample``.

A convex combination of two feasible allocations is feasible: every budget is
used exactly as much as both use it, and every floor and cap holds. The share
starts at ``max_share`` times the fleet's uncertainty (1 knows nothing beyond
the prior, 0 is certain), so exploration fades as the learner gains
confidence; it is then cut until the *estimated* cost, the loss of
equally-distributed-equivalent accuracy of ``x`` against ``x_mean`` under the
current estimates, is at most ``max_cost``. A sample far from the estimate
moves the allocation far, which is exactly where information is missing;
a confident agent's sample is close to its estimate and barely moves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from controller.allocate import Allocation, allocate, capped_utility
from controller.errors import FairsynergyError
from controller.learn import Estimates
from controller.problem import Problem

__all__ = [
    "Exploration",
    "Explorer",
    "equivalent_accuracy",
    "problem_from_estimates",
]


@dataclass(frozen=True)
class Exploration:
    """One exploring allocation and what it is estimated to cost."""

    cloud: np.ndarray  # (N, R): the allocation to apply
    share: float  # weight of the Thompson allocation, in [0, max_share]
    cost: float  # estimated loss of equivalent accuracy, as a fraction
    mean: Allocation  # the allocation at the estimates


class Explorer:
    """Blend the allocation at the estimates with one at a Thompson sample.

    Parameters
    ----------
    max_share
        Largest weight given to the Thompson allocation, reached when no
        agent is more certain than its prior.
    max_cost
        Largest estimated loss of equivalent accuracy (a fraction: 0.005 is
        half a percent) that exploration may cost in one round.
    policy
        Allocation policy for both solves (see :func:`controller.allocate`).
    """

    def __init__(
        self, max_share: float = 1.0, max_cost: float = 0.005, policy: str = "fair"
    ) -> None:
        self.max_share = max_share
        self.max_cost = max_cost
        self.policy = policy
        if not 0.0 <= max_share <= 1.0:
            raise FairsynergyError(
                f"Explorer max_share={max_share!r} is invalid; expected a number "
                "in [0, 1]"
            )
        if not max_cost >= 0.0:
            raise FairsynergyError(
                f"Explorer max_cost={max_cost!r} is invalid; expected a number >= 0"
            )

    def allocate(
        self, estimate: Problem, sample: Problem, uncertainty: float
    ) -> Exploration:
        """Return the exploring allocation.

        ``estimate`` and ``sample`` are the same fleet and budgets with the
        curves at the estimates and at a Thompson sample; ``uncertainty`` in
        [0, 1] is the fleet's mean doubt (:attr:`Estimates.uncertainty`).
        """
        mean = allocate(estimate, self.policy)
        share = self.max_share * min(1.0, max(0.0, uncertainty))
        if share == 0.0:
            return Exploration(np.array(mean.cloud), 0.0, 0.0, mean)

        # The mean allocation's prices warm-start the second solve.
        warm = mean.prices if self.policy == "fair" else None
        drawn = allocate(sample, self.policy, prices=warm).cloud
        share, cost = self._affordable(estimate, mean, drawn, share)
        if share == 0.0:
            return Exploration(np.array(mean.cloud), 0.0, 0.0, mean)

        cloud = (1.0 - share) * mean.cloud + share * drawn
        return Exploration(cloud, share, max(cost, 0.0), mean)

    def _affordable(
        self, problem: Problem, mean: Allocation, drawn: np.ndarray, share: float
    ) -> tuple[float, float]:
        """Cut ``share`` until the estimated cost fits ``max_cost``; 0 if never."""
        reference = equivalent_accuracy(problem, mean.utility)
        cost = self._cost(problem, mean.cloud, drawn, share, reference)
        if cost > self.max_cost:
            # The loss is about quadratic in the share near the optimum.
            share *= 0.9 * math.sqrt(self.max_cost / cost)
            cost = self._cost(problem, mean.cloud, drawn, share, reference)
        for _ in range(4):
            if cost <= self.max_cost:
                return share, cost
            share /= 2.0
            cost = self._cost(problem, mean.cloud, drawn, share, reference)
        return (share, cost) if cost <= self.max_cost else (0.0, 0.0)

    @staticmethod
    def _cost(
        problem: Problem,
        mean: np.ndarray,
        drawn: np.ndarray,
        share: float,
        reference: float,
    ) -> float:
        blend = (1.0 - share) * mean + share * drawn
        value = equivalent_accuracy(problem, capped_utility(problem, blend))
        return 1.0 - value / reference if reference > 0 else 0.0


def equivalent_accuracy(problem: Problem, utility: np.ndarray) -> float:
    """The accuracy which, given to every agent, scores the same fair objective.

    The weighted power mean of order ``1 - alpha``: the arithmetic mean at
    ``alpha = 0``, the geometric mean at 1, the minimum at infinity. It makes
    the objective comparable across alphas and fleet sizes, in accuracy units.
    """
    weight = problem.weight / problem.weight.sum()
    alpha = problem.alpha
    if math.isinf(alpha):
        return float(utility.min())
    if utility.min() <= 0.0:
        return 0.0 if alpha >= 1.0 else _power_mean(utility, weight, 1.0 - alpha)
    if alpha == 1.0:
        return float(math.exp(float(weight @ np.log(utility))))
    return _power_mean(utility, weight, 1.0 - alpha)


def _power_mean(utility: np.ndarray, weight: np.ndarray, order: float) -> float:
    return float((weight @ utility**order) ** (1.0 / order))


def problem_from_estimates(
    estimates: Estimates,
    resources: Sequence[str],
    budget: Any,
    *,
    alpha: float,
    weight: Any = None,
    floor: Any = None,
    cap: Any = None,
) -> Problem:
    """The allocation problem as the controller sees it through its learner."""
    return Problem.from_arrays(
        resources,
        estimates.agents,
        budget,
        estimates.scale,
        estimates.elasticity,
        estimates.local,
        weight=weight,
        floor=floor,
        cap=cap,
        ceiling=estimates.ceiling,
        alpha=alpha,
    )
