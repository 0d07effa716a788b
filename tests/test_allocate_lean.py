"""The lean solvers for fleets without caps agree with the general solver.

At alpha = 1 with no caps every resource clears on its own, and for other
finite alpha the demand of an uncapped fleet settles in a few monotone
Newton steps; :func:`controller.allocate.allocate` uses these paths first.
They must give the general solver's optimum (itself checked against cvxpy
in ``test_allocate_reference.py``), and hand over to it where they do not
apply. Instances are random with fixed seeds and include floors, agents
without an elasticity for a resource, zero local amounts, weights and
ceilings that bind.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller import _dual
from controller import allocate as allocate_module
from controller.allocate import allocate, capped_utility, market_of, solve_market
from controller.problem import Problem


def uncapped(
    seed: int, n: int, r: int, alpha: float, *, ceiling: float = 5.0
) -> Problem:
    """A random fleet with no caps and ceilings from ``ceiling / 2`` to ``ceiling``."""
    rng = np.random.default_rng(seed)
    gamma = rng.dirichlet(np.ones(r + 1), size=n)[:, :r] * rng.uniform(0.3, 0.9, (n, 1))
    gamma[rng.uniform(size=(n, r)) < 0.15] = 0.0
    gamma[gamma.sum(axis=1) == 0, 0] = 0.5
    local = rng.uniform(0.0, 0.3, (n, r)) * (rng.uniform(size=(n, r)) > 0.2)
    floor = rng.uniform(0.0, 0.05, (n, r)) * (rng.uniform(size=(n, r)) > 0.6)
    return Problem.from_arrays(
        [f"r{k}" for k in range(r)],
        [f"a{i}" for i in range(n)],
        rng.uniform(0.1, 0.5, r) * n + floor.sum(axis=0),
        rng.uniform(0.5, 2.0, n),
        gamma,
        local,
        weight=rng.uniform(0.5, 2.0, n),
        floor=floor,
        ceiling=rng.uniform(0.5, 1.0, n) * ceiling,
        alpha=alpha,
    )


def lean(problem: Problem) -> _dual.Solution | None:
    """The lean solver's answer for ``problem``, or None if it hands over."""
    arrays = {
        "budget": problem.budget,
        "scale": problem.scale,
        "gamma": np.ascontiguousarray(problem.elasticity.T),
        "local": np.ascontiguousarray(problem.local.T),
        "weight": problem.weight,
        "floor": np.ascontiguousarray(problem.floor.T),
        "ceiling": problem.ceiling,
    }
    if problem.alpha == 1.0 and (solution := _dual.solve_separable(**arrays)):
        return solution
    return _dual.solve_uncapped(alpha=problem.alpha, **arrays)


def general_objective(problem: Problem) -> tuple[float, np.ndarray, np.ndarray]:
    """Objective, utilities and prices of the general solver."""
    _, price, _, log_v = solve_market(market_of(problem), problem.alpha)
    v, w, alpha = np.exp(log_v), problem.weight, problem.alpha
    if alpha == 1.0:
        objective = float((w * log_v).sum())
    else:
        objective = float((w * v ** (1 - alpha) / (1 - alpha)).sum())
    return objective, v, price


CASES = [
    pytest.param(seed, r, alpha, ceiling, id=f"a{alpha}-r{r}-c{ceiling}")
    for seed, (alpha, r, ceiling) in enumerate(
        (alpha, r, ceiling)
        for alpha in (0.0, 0.5, 1.0, 2.0, 5.0)
        for r in (1, 2, 3)
        for ceiling in (5.0, 1.5)
    )
]  # fmt: skip


@pytest.mark.parametrize(("seed", "r", "alpha", "ceiling"), CASES)
def test_allocate_lean_matches_the_general_solver(
    seed: int, r: int, alpha: float, ceiling: float
) -> None:
    """Test the lean solvers find the general solver's optimum and prices."""
    problem = uncapped(seed, 300, r, alpha, ceiling=ceiling)

    solution = lean(problem)
    result = allocate(problem)
    expected, v, price = general_objective(problem)

    assert solution is not None
    assert result.objective == pytest.approx(expected, rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(result.utility, v, rtol=1e-7)
    np.testing.assert_allclose(result.prices, price, rtol=1e-6)
    assert result.certificate["relative_gap"] < 1e-9
    assert (result.cloud.sum(axis=0) <= problem.budget).all()
    assert (result.cloud >= problem.floor).all()
    np.testing.assert_allclose(
        result.utility, capped_utility(problem, result.cloud), rtol=1e-12
    )


def test_allocate_lean_binding_ceilings_are_used() -> None:
    """Test the low-ceiling instances really have agents held at the ceiling."""
    problem = uncapped(3, 300, 2, 1.0, ceiling=1.5)

    result = allocate(problem)

    at_ceiling = np.isclose(result.utility, problem.ceiling, rtol=1e-12)
    assert at_ceiling.sum() >= 10
    assert lean(problem) is not None


def test_allocate_lean_alpha_one_matches_the_closed_form() -> None:
    """Test alpha = 1, one resource, everyone buying: lambda = sum w g / (B + sum l)."""
    rng = np.random.default_rng(21)
    n = 50
    weight, gamma = rng.uniform(0.5, 2.0, n), rng.uniform(0.2, 0.8, (n, 1))
    local = rng.uniform(0.0, 0.01, (n, 1))
    problem = Problem.from_arrays(
        ["cpu"], [f"a{i}" for i in range(n)], np.array([10.0 * n]),
        np.full(n, 0.01), gamma, local, weight=weight, alpha=1.0,
    )  # fmt: skip

    result = allocate(problem)

    price = float((weight * gamma[:, 0]).sum() / (10.0 * n + local.sum()))
    cloud = weight * gamma[:, 0] / price - local[:, 0]
    assert result.prices[0] == pytest.approx(price, rel=1e-11)
    np.testing.assert_allclose(result.cloud[:, 0], cloud, rtol=1e-10)


@pytest.mark.parametrize(
    ("alpha", "change"),
    [
        (0.0, "elasticities sum to 1"),
        (0.5, "budget at the floors"),
        (1.0, "cap"),
        (2.0, "cap"),
    ],
)
def test_allocate_lean_hands_over_where_it_does_not_apply(
    alpha: float, change: str
) -> None:
    """Test the lean path declines what it cannot solve, and allocate still does."""
    problem = uncapped(5, 40, 2, alpha)
    gamma, budget = problem.elasticity.copy(), problem.budget.copy()
    ceiling, cap = problem.ceiling.copy(), problem.cap.copy()
    if change == "elasticities sum to 1":
        gamma[0] = [0.5, 0.5]
    elif change == "budget at the floors":
        budget[0] = problem.floor[:, 0].sum()
    else:
        cap[:, 0] = 0.2
    changed = Problem.from_arrays(
        problem.resources, problem.agents, budget, problem.scale, gamma,
        problem.local, weight=problem.weight, floor=problem.floor, cap=cap,
        ceiling=ceiling, alpha=alpha,
    )  # fmt: skip

    declined = allocate_module._uncapped(changed) is None
    result = allocate(changed)
    expected, _, _ = general_objective(changed)

    assert declined
    assert result.objective == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_allocate_lean_never_exceeds_a_budget() -> None:
    """Test a lean solution uses its budgets up but never exceeds one."""
    problem = uncapped(8, 2000, 3, 2.0)

    result = allocate(problem)

    used = result.cloud.sum(axis=0)
    assert (used <= problem.budget).all()
    assert math.isclose(used.sum(), problem.budget.sum(), rel_tol=1e-10)


def test_allocate_lean_utility_is_that_of_the_amounts() -> None:
    """Test an amount too small for a float counts as zero, not as the ceiling."""
    # Agent 0 reaches its ceiling with its local cpu and about exp(-45000)
    # units of net, of which it holds none: that amount is 0 as a float.
    problem = Problem.from_arrays(
        ["cpu", "net"], ["a0", "a1", "a2"], np.array([0.3, 0.3]),
        np.array([2.0, 1.0, 1.0]), np.array([[0.5, 1e-5], [0.4, 0.4], [0.3, 0.5]]),
        np.array([[0.9, 0.0], [0.1, 0.1], [0.1, 0.1]]), ceiling=np.full(3, 1.2),
        alpha=0.5,
    )  # fmt: skip

    result = allocate(problem)
    expected, _, _ = general_objective(problem)

    assert lean(problem) is not None
    assert result.cloud[0, 1] == 0.0
    assert result.utility[0] == 0.0
    assert result.objective == pytest.approx(expected, rel=1e-9)
