"""Share the cloud pool: the exact alpha-fair allocation, baselines and scores.

:func:`allocate` solves a :class:`~controller.problem.Problem` with one policy
and returns an :class:`Allocation`: the cloud amounts, every agent's capped
utility, the objective, the prices of the resources and a certificate of
optimality. ``"fair"`` is the alpha-fair optimum over all resources jointly;
the other policies are the baselines of the paper, scored with the same
capped utility (see :mod:`controller.baselines`).

The fair solver works on prices, never on a generic modelling layer: for given
prices every agent's best purchase has a closed form, and the prices are found
by Newton's method on the convex dual (finite alpha) or by nested searches on
the max-min level (alpha = inf). Fleets without caps take a leaner route to
the same optimum (see :mod:`controller._dual`). ``docs/allocation.md`` has
the maths.

>>> from controller.problem import parse_instance
>>> problem = parse_instance({
...     "alpha": 1,
...     "budget": {"compute": 2.0},
...     "agents": [
...         {"id": "a", "scale": 0.5, "elasticity": {"compute": 0.5}},
...         {"id": "b", "scale": 0.5, "elasticity": {"compute": 0.5}},
...     ],
... })
>>> result = allocate(problem)
>>> result.cloud.round(9).tolist(), result.prices.round(9).tolist()
([[1.0], [1.0]], [0.5])
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from controller._dual import Solution, solve_fair, solve_separable, solve_uncapped
from controller._leximin import solve_leximin
from controller._response import Market
from controller.errors import FairsynergyError
from controller.problem import FloatArray, Problem

POLICIES = ("fair", "uniform", "random", "equal-totals", "sequential")


@dataclass(frozen=True)
class Allocation:
    """One policy's allocation of a problem, and how good it is.

    ``cloud`` is ``(N, R)``; ``utility`` the capped ``v_i``; ``objective`` the
    alpha-fair welfare ``sum_i w_i U_alpha(v_i)`` (``min_i v_i`` at alpha =
    inf). ``prices`` are the budgets' dual prices for ``"fair"`` (at alpha =
    inf: how much one more unit lifts the max-min level) and for
    ``"sequential"`` (the price of each one-resource step); NaN for the other
    baselines, which imply none. ``unused`` is the budget left over.
    """

    problem: Problem
    policy: str
    cloud: FloatArray
    utility: FloatArray
    objective: float
    prices: FloatArray
    unused: FloatArray
    certificate: dict[str, float]

    def summary(self) -> dict[str, float]:
        """Mean and worst utility and Jain's index of the utilities."""
        v = self.utility
        squares = float((v**2).sum())
        jain = float(v.sum()) ** 2 / (v.size * squares) if squares > 0 else 1.0
        return {
            "mean_utility": float(v.mean()),
            "worst_utility": float(v.min()),
            "jain_index": jain,
        }

    def to_json(self) -> dict[str, Any]:
        """The ``fairsynergy allocate`` output: strict JSON, names as keys.

        Infinite numbers become the strings ``"inf"`` / ``"-inf"`` (alpha, an
        objective of ``-inf`` when some agent has utility 0 at alpha >= 1) and
        NaN becomes ``null`` (the prices of baselines that imply none).
        """
        p = self.problem
        return {
            "policy": self.policy,
            "alpha": _number(p.alpha),
            "objective": _number(self.objective),
            "allocations": {
                agent: dict(zip(p.resources, map(float, row), strict=True))
                for agent, row in zip(p.agents, self.cloud, strict=True)
            },
            "utility": dict(zip(p.agents, map(float, self.utility), strict=True)),
            "prices": dict(zip(p.resources, map(_number, self.prices), strict=True)),
            "unused": dict(zip(p.resources, map(float, self.unused), strict=True)),
            "summary": self.summary(),
            "certificate": {k: _number(v) for k, v in self.certificate.items()},
            "solve_seconds": float(self.certificate.get("solve_seconds", 0.0)),
        }


def allocate(
    problem: Problem,
    policy: str = "fair",
    *,
    seed: int | None = None,
    prices: FloatArray | None = None,
) -> Allocation:
    """Allocate the budgets of ``problem`` with ``policy`` (one of :data:`POLICIES`).

    ``seed`` drives the ``"random"`` baseline (default 0). ``prices`` warm-starts
    the fair solver, e.g. with the prices of the previous, slightly different
    problem; it changes the work done, never the answer.
    """
    from controller import baselines

    if policy not in POLICIES:
        raise FairsynergyError(
            f"policy {policy!r}: unknown; choose one of {', '.join(POLICIES)}"
        )
    started = time.perf_counter()
    certificate: dict[str, float] = {}
    utility = None
    if policy == "fair":
        cloud, found, certificate, utility = _solve(problem, prices)
    elif policy == "sequential":
        cloud, found = baselines.sequential(problem)
    else:
        cloud = baselines.split(problem, policy, seed=0 if seed is None else seed)
        found = np.full(problem.n_resources, math.nan)
    certificate["solve_seconds"] = time.perf_counter() - started

    if utility is None:
        utility = capped_utility(problem, cloud)
    # A product with ones sums over agents several times faster than
    # sum(axis=0) does for a few resources.
    used = np.ones(problem.n_agents) @ cloud
    unused = np.maximum(problem.budget - used, 0.0)
    return Allocation(
        problem=problem,
        policy=policy,
        cloud=cloud,
        utility=utility,
        objective=fair_objective(problem, utility),
        prices=found,
        unused=unused,
        certificate=certificate,
    )


def market_of(problem: Problem) -> Market:
    """The solver's working form of a problem."""
    return Market.build(
        alpha=problem.alpha if math.isfinite(problem.alpha) else 1.0,
        budget=problem.budget,
        scale=problem.scale,
        gamma=problem.elasticity,
        local=problem.local,
        weight=problem.weight,
        floor=problem.floor,
        cap=problem.cap,
        ceiling=problem.ceiling,
    )


def solve_market(
    market: Market, alpha: float, log_price: FloatArray | None = None
) -> tuple[FloatArray, FloatArray, dict[str, float], FloatArray]:
    """Fair cloud ``(R, N)``, prices, certificate and log utilities of a market."""
    solution = (
        solve_fair(market, log_price) if math.isfinite(alpha) else solve_leximin(market)
    )
    return solution.cloud, solution.price, solution.certificate, solution.log_v


def _solve(
    problem: Problem, prices: FloatArray | None
) -> tuple[FloatArray, FloatArray, dict[str, float], FloatArray]:
    log_price = None
    if prices is not None:
        given = np.asarray(prices, dtype=float)
        if given.shape != (problem.n_resources,):
            raise FairsynergyError(
                f"prices: shape {given.shape}, expected ({problem.n_resources},)"
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            log_price = np.where(given > 0, np.log(given), np.nan)
    solution = _uncapped(problem)
    if solution is not None:
        cloud, found, certificate, log_v = (
            solution.cloud, solution.price, solution.certificate, solution.log_v
        )  # fmt: skip
    else:
        market = market_of(problem)
        cloud, found, certificate, log_v = solve_market(
            market, problem.alpha, log_price
        )
    return np.ascontiguousarray(cloud.T), found, certificate, np.exp(log_v)


def _uncapped(problem: Problem) -> Solution | None:
    """The lean solvers' answer, for finite alpha with no cap on any agent's
    resources (see :mod:`controller._dual`); None sends the problem to the
    general solver."""
    p = problem
    if math.isinf(p.alpha):
        return None
    if not np.isinf(p.cap).all() and (np.isfinite(p.cap) & (p.elasticity > 0)).any():
        return None
    gamma, local, floor = (
        np.ascontiguousarray(a.T) for a in (p.elasticity, p.local, p.floor)
    )
    if p.alpha == 1.0:
        solution = solve_separable(
            budget=p.budget, scale=p.scale, gamma=gamma, local=local,
            weight=p.weight, floor=floor, ceiling=p.ceiling,
        )  # fmt: skip
        if solution is not None:
            return solution
    return solve_uncapped(
        alpha=p.alpha, budget=p.budget, scale=p.scale, gamma=gamma, local=local,
        weight=p.weight, floor=floor, ceiling=p.ceiling,
    )  # fmt: skip


def capped_utility(problem: Problem, cloud: FloatArray) -> FloatArray:
    """``v_i = min(ceiling_i, scale_i prod_r (local_ir + cloud_ir) ** elasticity_ir)``.

    ``cloud`` is ``(N, R)``; a resource with elasticity 0 contributes a
    factor 1 even when the agent holds none of it.
    """
    gamma = problem.elasticity
    with np.errstate(divide="ignore"):
        log_z = np.log(problem.local + np.asarray(cloud, dtype=float))
    terms = np.where(gamma > 0, gamma * np.where(gamma > 0, log_z, 0.0), 0.0)
    log_u = np.log(problem.scale) + terms.sum(axis=1)
    return np.asarray(np.minimum(problem.ceiling, np.exp(log_u)))


def fair_objective(problem: Problem, utility: FloatArray) -> float:
    """``sum_i w_i U_alpha(v_i)``, or ``min_i v_i`` at alpha = inf.

    ``U_alpha(v) = v ** (1 - alpha) / (1 - alpha)``, ``log v`` at alpha = 1;
    ``-inf`` when some ``v_i = 0`` and alpha >= 1.
    """
    alpha, v, w = problem.alpha, np.asarray(utility, dtype=float), problem.weight
    if math.isinf(alpha):
        return float(v.min())
    with np.errstate(divide="ignore", over="ignore"):
        if alpha == 1.0:
            return float((w * np.log(v)).sum())
        return float((w * v ** (1.0 - alpha) / (1.0 - alpha)).sum())


def _number(value: float) -> float | str | None:
    value = float(value)
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value
