"""The fair solver against an independent general-purpose convex solver (cvxpy).

Every instance is random with a fixed seed, with one to three resources and
floors, caps and ceilings switched on and off. cvxpy (Clarabel, exponential
and power cones) solves the same problem from its textbook formulation; our
objective must match within 1e-6 relative, and our allocation must be
feasible exactly. Leximin is checked against progressive filling with cvxpy,
which asks, agent by agent, whether it can still rise.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import cvxpy
import numpy as np
import pytest

from controller.allocate import allocate
from controller.problem import Problem

# cvxpy's type information is partial; the reference only needs it to run.
cp: Any = cvxpy
INF = math.inf
TOLERANCE = 1e-6
SOLVER = {"solver": "CLARABEL", "tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10,
          "tol_feas": 1e-10, "max_iter": 500}  # fmt: skip


def instance(seed: int, n: int, r: int, alpha: float, *, boxes: bool) -> Problem:
    """A random fleet; with ``boxes``, floors, caps and low ceilings appear."""
    rng = np.random.default_rng(seed)
    gamma = rng.dirichlet(np.ones(r + 1), size=n)[:, :r] * rng.uniform(
        0.4, 0.95, (n, 1)
    )
    local = rng.uniform(0.01, 0.3, (n, r))
    floor, cap, ceiling = np.zeros((n, r)), np.full((n, r), INF), np.full(n, 5.0)
    if boxes:
        floor = rng.uniform(0.0, 0.05, (n, r)) * (rng.uniform(size=(n, r)) > 0.5)
        capped = rng.uniform(size=(n, r)) > 0.6
        cap = np.where(capped, floor + rng.uniform(0.05, 1.0, (n, r)), INF)
        ceiling = rng.uniform(0.5, 1.5, n)
    return Problem.from_arrays(
        [f"r{k}" for k in range(r)],
        [f"a{i}" for i in range(n)],
        rng.uniform(0.3, 3.0, r) * n / 4 + floor.sum(axis=0),
        rng.uniform(0.5, 2.0, n),
        gamma,
        local,
        weight=rng.uniform(0.5, 2.0, n),
        floor=floor,
        cap=cap,
        ceiling=ceiling,
        alpha=alpha,
    )


def solve(problem: Any) -> float:
    """Optimal value; Clarabel's "may be inaccurate" at 1e-10 still means ~1e-8."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Solution may be inaccurate")
        problem.solve(**SOLVER)
    assert problem.status in ("optimal", "optimal_inaccurate"), problem.status
    return float(problem.value)


def feasible_set(p: Problem) -> tuple[Any, list[Any]]:
    """The cloud amounts as a cvxpy variable with budgets, floors and caps."""
    x = cp.Variable(p.floor.shape)
    constraints = [cp.sum(x, axis=0) <= p.budget, x >= p.floor]
    capped = np.isfinite(p.cap)
    if capped.any():
        constraints.append(cp.multiply(capped, x) <= np.where(capped, p.cap, 0.0))
    return x, constraints


def log_utility(p: Problem, x: Any, i: int) -> Any:
    """``log min(ceiling, u_i)``: concave (exponential cones)."""
    terms = [
        p.elasticity[i, r] * cp.log(p.local[i, r] + x[i, r])
        for r in range(p.n_resources)
        if p.elasticity[i, r] > 0
    ]
    return cp.minimum(math.log(p.ceiling[i]), math.log(p.scale[i]) + sum(terms))


def power_utility(p: Problem, x: Any, i: int, power: float) -> Any:
    """``min(ceiling, u_i) ** power`` for ``0 < power <= 1`` (power cones).

    Every agent's geometric mean gets the same number of arguments (constant
    1 where an elasticity is 0): cvxpy mishandles mixed lengths.
    """
    gamma = p.elasticity[i] * power
    rest = 1.0 - gamma.sum()
    pad = 0.1 * rest / (p.n_resources + 1)
    args = [p.local[i, r] + x[i, r] if g > 0 else 1.0 for r, g in enumerate(gamma)]
    weights = [g if g > 0 else pad for g in gamma]
    weights.append(1.0 - sum(weights))
    mean = cp.geo_mean(cp.hstack([*args, 1.0]), weights, approx=False)
    return cp.minimum(p.ceiling[i] ** power, p.scale[i] ** power * mean)


def reference_objective(p: Problem) -> float:
    """The alpha-fair optimum by cvxpy (finite alpha)."""
    x, constraints = feasible_set(p)
    terms = []
    for i in range(p.n_agents):
        if p.alpha == 1:
            terms.append(p.weight[i] * log_utility(p, x, i))
        elif p.alpha > 1:
            value = cp.exp((1 - p.alpha) * log_utility(p, x, i))
            terms.append(-p.weight[i] * value / (p.alpha - 1))
        else:
            power = 1 - p.alpha
            terms.append(p.weight[i] * power_utility(p, x, i, power) / power)
    return solve(cp.Problem(cp.Maximize(sum(terms)), constraints))


def reference_level(
    p: Problem, rising: list[int], frozen: dict[int, float], *, lift: int | None = None
) -> float:
    """Highest common log level of ``rising`` (or of ``lift`` alone, the rest held)."""
    x, constraints = feasible_set(p)
    level = cp.Variable()
    for i, held in frozen.items():
        constraints.append(log_utility(p, x, i) >= held)
    for i in rising:
        if i != lift:
            constraints.append(log_utility(p, x, i) >= level)
    if lift is None:
        goal = level
    else:
        constraints.append(level == reference_level(p, rising, frozen))
        goal = log_utility(p, x, lift)
    return solve(cp.Problem(cp.Maximize(goal), constraints))


def reference_leximin(p: Problem) -> np.ndarray:
    """Leximin utilities by progressive filling: freeze whoever cannot rise."""
    frozen: dict[int, float] = {}
    while len(frozen) < p.n_agents:
        rising = [i for i in range(p.n_agents) if i not in frozen]
        level = reference_level(p, rising, frozen)
        blocked = [
            i
            for i in rising
            if reference_level(p, rising, frozen, lift=i) <= level + 1e-7
        ]
        for i in blocked or rising:
            frozen[i] = level
    return np.exp([frozen[i] for i in range(p.n_agents)])


CASES = [
    pytest.param(seed, n, r, alpha, boxes,
                 id=f"a{alpha}-r{r}-n{n}-{'box' if boxes else 'free'}")
    for seed, (alpha, r, n, boxes) in enumerate(
        (alpha, r, n, boxes)
        for alpha in (0.0, 0.5, 1.0, 2.0, 5.0)
        for r in (1, 2, 3)
        for n, boxes in ((3, False), (6, True))
    )
]  # fmt: skip


@pytest.mark.parametrize(("seed", "n", "r", "alpha", "boxes"), CASES)
def test_allocate_reference_fair_objective_matches_cvxpy(
    seed: int, n: int, r: int, alpha: float, boxes: bool
) -> None:
    """Test the alpha-fair optimum equals cvxpy's within 1e-6, feasibly."""
    problem = instance(1000 + seed, n, r, alpha, boxes=boxes)

    result = allocate(problem)
    expected = reference_objective(problem)

    assert result.objective == pytest.approx(expected, rel=TOLERANCE, abs=TOLERANCE)
    assert result.objective >= expected - TOLERANCE * max(1.0, abs(expected))
    assert (result.cloud.sum(axis=0) <= problem.budget).all()
    assert (result.cloud >= problem.floor).all()
    assert (result.cloud <= problem.cap).all()


@pytest.mark.parametrize(
    ("seed", "n", "r", "boxes"),
    [(2000 + k, n, r, boxes) for k, (n, r, boxes) in enumerate(
        [(3, 1, False), (5, 1, True), (3, 2, False), (4, 2, True), (3, 3, False),
         (4, 3, True)])],
)  # fmt: skip
def test_allocate_reference_max_min_level_matches_cvxpy(
    seed: int, n: int, r: int, boxes: bool
) -> None:
    """Test the worst agent's utility at alpha = inf equals cvxpy's max-min."""
    problem = instance(seed, n, r, INF, boxes=boxes)

    result = allocate(problem)
    expected = math.exp(reference_level(problem, list(range(n)), {}))

    assert result.objective == pytest.approx(expected, rel=TOLERANCE)
    assert (result.cloud.sum(axis=0) <= problem.budget).all()
    assert (result.cloud >= problem.floor).all()
    assert (result.cloud <= problem.cap).all()


@pytest.mark.parametrize(
    ("seed", "n", "r"), [(3000, 4, 1), (3001, 4, 2), (3002, 3, 2), (3003, 3, 3)]
)
def test_allocate_reference_leximin_matches_progressive_filling(
    seed: int, n: int, r: int
) -> None:
    """Test every agent's utility at alpha = inf equals the leximin reference."""
    problem = instance(seed, n, r, INF, boxes=True)

    result = allocate(problem)

    assert result.utility == pytest.approx(reference_leximin(problem), rel=TOLERANCE)
