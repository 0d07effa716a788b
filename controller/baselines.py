"""The policies the fair allocation is compared with, as in the paper.

Every split baseline is one water-filling per resource: agent ``i`` gets
``clip(k * b_i - a_i, floor_i, cap_i)`` with the single ``k`` that spends the
budget (or everything the caps allow). So floors are always granted, caps
always respected, and what a capped agent cannot take flows to the others in
proportion to the rule:

- ``uniform``: ``b = 1, a = 0``, the budget split equally;
- ``random``: ``b`` = flat Dirichlet shares drawn per resource, ``a = 0``;
- ``equal-totals`` (the paper's "standard NUM"): ``b = 1, a = local``, which
  evens out ``local + cloud`` across agents.

``sequential`` is what the paper's code does: allocate one resource at a time,
in resource order and only once, each step solving the alpha-fair problem in
that resource exactly while the others stay where they are (their floors for
resources not yet allocated).
"""

from __future__ import annotations

import numpy as np

from controller._dual import trim_to_budget
from controller._response import Array
from controller.problem import Problem


def split(problem: Problem, policy: str, *, seed: int = 0) -> Array:
    """Cloud amounts ``(N, R)`` of a split baseline (uniform, random, equal-totals)."""
    n, r = problem.n_agents, problem.n_resources
    rng = np.random.default_rng(seed)
    cloud = np.empty((n, r))
    for q in range(r):
        if policy == "random":
            shares = rng.standard_exponential(n)
            rate, offset = shares / shares.sum(), np.zeros(n)
        elif policy == "equal-totals":
            rate, offset = np.ones(n), problem.local[:, q]
        else:
            rate, offset = np.ones(n), np.zeros(n)
        cloud[:, q] = water_fill(
            rate, offset, problem.floor[:, q], problem.cap[:, q], problem.budget[q]
        )
    return cloud


def water_fill(
    rate: Array,
    offset: Array,
    floor: Array,
    cap: Array,
    budget: float,
) -> Array:
    """``clip(k * rate - offset, floor, cap)`` with ``k`` spending ``budget``.

    Exact: the total is piecewise linear in ``k`` with a kink where an agent
    leaves its floor or reaches its cap, so sort the kinks and solve on the
    piece where the total crosses the budget. ``rate`` must be positive.
    """
    if floor.sum() >= budget:
        return floor.copy()
    if cap.sum() <= budget:
        return cap.copy()
    start, stop = (floor + offset) / rate, (cap + offset) / rate
    kinks = np.concatenate([start, stop[np.isfinite(stop)]])
    turns = np.concatenate([rate, -rate[np.isfinite(stop)]])
    order = np.argsort(kinks, kind="stable")
    kinks, slopes = kinks[order], np.cumsum(turns[order])
    totals = floor.sum() + np.concatenate(
        [[0.0], np.cumsum(slopes[:-1] * np.diff(kinks))]
    )
    piece = max(int(np.searchsorted(totals, budget, side="right")) - 1, 0)
    level = kinks[piece] + (budget - totals[piece]) / max(slopes[piece], 1e-300)
    cloud = np.clip(level * rate - offset, floor, cap)
    box = (cloud[None, :], floor[None, :], cap[None, :], np.array([budget]))
    return np.asarray(trim_to_budget(*box)[0])


def sequential(problem: Problem) -> tuple[Array, Array]:
    """The paper's one-resource-at-a-time allocation, and each step's price."""
    from controller.allocate import market_of, solve_market

    market = market_of(problem)
    cloud = market.floor.copy()
    prices = np.zeros(problem.n_resources)
    for r in range(problem.n_resources):
        floor, cap = cloud.copy(), cloud.copy()
        floor[r], cap[r] = market.floor[r], market.cap[r]
        step, price, _, _ = solve_market(market.with_box(floor, cap), problem.alpha)
        cloud[r], prices[r] = step[r], price[r]
    return np.ascontiguousarray(cloud.T), prices
