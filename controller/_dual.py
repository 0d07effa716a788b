"""The alpha-fair allocation for finite alpha, by minimising the dual over prices.

With prices ``lambda_r`` on the budgets the problem separates by agent, and
:func:`controller._response.best_response` answers each agent in closed form.
The dual ``D(lambda) = lambda . B + sum_i max_x [w_i U(v_i(x)) - lambda . x]``
is convex; its gradient is budget minus demand. We minimise it over
``eta = log lambda``:

1. *Prepare.* Agents that can never have positive utility (an elasticity on a
   resource they can never get) are set aside at their floors. A resource with
   no room above the floors is fixed there. A resource that cannot run out
   even if every agent takes all it could ever use (up to its cap, or up to
   the amount that lifts it to its ceiling with everything else at the floor)
   is handed out that way at price 0. What remains is the *priced* set.
2. *Search.* Newton's method on ``D(exp(eta))`` with the exact Jacobian of
   demand (one priced resource included), a backtracking line search and
   ``eta`` kept above a floor that stands for price zero; each evaluation
   warm-starts the agents' responses from the previous one. If Newton
   stalls (demand jumps, which happens only for alpha = 0 with elasticities
   summing to 1), nested one-dimensional searches finish the job exactly.
3. *Recover.* The allocation is the demand at the final prices (or the blend
   of demands that clears a jump), trimmed proportionally above the floors if
   rounding left any budget over-committed by a few ulps.
4. *Certify.* ``duality_gap = D(lambda) - objective`` over the optimised
   agents, with ``lambda`` the best evaluated prices.

Fleets with no caps (the usual case) go first to two lean solvers that skip
the general machinery, whose fixed cost dominates small fleets; each hands
over by returning None when a case it does not cover turns up.
:func:`solve_separable` (alpha = 1, no binding ceiling) clears every resource
on its own, exactly, in a few vector steps; :func:`solve_uncapped` (any
finite alpha) runs the same Newton search on a demand that, with only lower
bounds to clip at, settles from any starting piece in a few monotone steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from controller._response import (
    TINY_SLOPE,
    Array,
    Market,
    Response,
    _log_unless_ones,
    _resource_sum,
    best_response,
)
from controller._search import Blend, nested_search

# Stop when every priced resource is cleared to this relative precision.
CLEAR_TOL = 1e-12
# Accept a stalled Newton run when it got at least this close.
STALL_TOL = 1e-9
MAX_NEWTON = 60
# Largest step of one Newton iteration in log price (a factor of e ** 4).
MAX_STEP = 4.0
# Prices more than e ** PRICE_RANGE below the first guess count as zero.
PRICE_RANGE = 100.0
# A first guess leaving this share of a budget unsold triggers the slack
# check at once; a price falling by e ** SLACK_DROP with budget unsold, later.
SLACK_HINT = 0.5
SLACK_DROP = 8.0
# Smallest log-price resolution of the one-dimensional searches.
XTOL = 1e-13
# A budget that runs out is filled to within this relative margin, so that no
# order of summing the amounts can exceed it.
BUDGET_MARGIN = 1e-12
# The separable solver (alpha = 1) clears this far below the budgets.
SEPARABLE_MARGIN = 1.25 * BUDGET_MARGIN


@dataclass(frozen=True)
class Prepared:
    """A market split into set-aside agents, fixed columns and priced columns."""

    market: Market
    live: Array
    priced: Array
    zero_price: Array


@dataclass(frozen=True)
class Solution:
    """Cloud amounts ``(R, N)`` for every agent of the market, prices, certificate.

    ``log_v`` is every agent's capped log utility under ``cloud`` (``-inf``
    for agents set aside with utility 0).
    """

    cloud: Array
    price: Array
    certificate: dict[str, float]
    log_v: Array


def prepare(market: Market) -> Prepared:
    """Set aside hopeless agents and fix resources with no room to share."""
    live = np.asarray(~(market.active & (market.local + market.cap <= 0)).any(axis=0))
    sub = market
    if not live.all():
        floors_aside = np.where(live, 0.0, market.floor).sum(axis=1)
        sub = replace(market.subset(live), budget=market.budget - floors_aside)
    priced = np.asarray((sub.active & (sub.cap > sub.floor)).any(axis=1))
    zero_price = np.zeros(market.n_resources, dtype=bool)
    return Prepared(market=sub, live=live, priced=priced, zero_price=zero_price)


def settle_slack(prepared: Prepared) -> Prepared:
    """Hand out, at price 0, every resource that cannot run short.

    A resource is slack when all agents together cannot use up its budget,
    each taking everything that could still help it. Settling one resource
    lowers what the others need, so repeat until nothing changes.
    """
    sub, priced = prepared.market, prepared.priced.copy()
    zero_price = prepared.zero_price.copy()
    floor, cap = sub.floor, sub.cap
    changed = True
    while changed and priced.any():
        changed = False
        saturation = _saturation(sub.with_box(floor, cap))
        for r in np.flatnonzero(priced):
            if saturation[r].sum() <= sub.budget[r]:
                floor, cap = floor.copy(), cap.copy()
                floor[r] = cap[r] = saturation[r]
                priced[r], zero_price[r], changed = False, True, True
    if not zero_price.any():
        return prepared
    market = sub.with_box(floor, cap)
    return Prepared(market, prepared.live, priced, zero_price)


def _saturation(market: Market) -> Array:
    """Cloud amount of each resource beyond which an agent gains nothing.

    With every other resource at its floor: up to the cap, or up to the amount
    that lifts the agent to its ceiling, whichever is smaller.
    """
    gamma, active = market.gamma, market.active
    zero = active & ~np.isfinite(market.log_lo)
    usable = active & ~zero
    terms = gamma * np.where(usable, market.log_lo, 0.0)
    others = terms.sum(axis=0) - terms
    zero_others = zero.sum(axis=0) - zero
    gap = market.log_ceiling - market.log_scale - others
    with np.errstate(divide="ignore", invalid="ignore"):
        log_need = np.where(zero_others > 0, np.inf, gap / np.where(active, gamma, 1))
    log_z = np.minimum(np.maximum(log_need, market.log_lo), market.log_hi)
    with np.errstate(over="ignore"):
        z = np.exp(log_z)
    amount = np.minimum(np.maximum(z - market.local, market.floor), market.cap)
    return np.where(active, amount, market.floor)


def first_log_price(market: Market) -> Array:
    """A price guess: the marginal values at an even split, summed per resource.

    With multipliers ``M_i = w_i u_i ** (1 - alpha)`` held fixed, agents buy
    ``z_ir = M_i gamma_ir / lambda_r``, so ``lambda_r = sum_i M_i gamma_ir /
    sum_i z_ir``: exact for alpha = 1 when no box or ceiling binds.
    """
    room = np.maximum(market.budget - market.floor.sum(axis=1), 0.0)
    cloud = np.minimum(market.floor + (room / market.n_agents)[:, None], market.cap)
    log_m = market.log_weight
    if market.alpha != 1.0:
        # At alpha = 1 the multipliers are the weights, whatever the bundle.
        log_z = market.log_z_of(cloud)
        log_u = np.minimum(market.log_utility(log_z), market.log_ceiling)
        log_m = market.log_multiplier(log_u)
    shift = float(np.max(log_m[np.isfinite(log_m)], initial=0.0))
    with np.errstate(over="ignore"):
        weight = np.exp(np.nan_to_num(log_m - shift, nan=-np.inf))
    wanted = market.gamma @ weight
    held = (market.local + cloud).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_price = np.log(wanted) + shift - np.log(held)
    return np.asarray(np.clip(np.nan_to_num(log_price, nan=0.0), -300.0, 300.0))


@dataclass(frozen=True)
class _Eval:
    log_price: Array
    response: Response
    excess: Array
    dual: float
    dual_scale: float
    residual: float


class _Dual:
    """Evaluations of the dual of a prepared market, counted; the last one kept."""

    def __init__(self, prepared: Prepared, floor: Array) -> None:
        self.market = prepared.market
        self.priced = prepared.priced
        self.floor = floor
        self.evaluations = 0
        self._last: _Eval | None = None

    def at(self, log_price: Array) -> _Eval:
        """Demand and dual value at prices ``exp(log_price)`` (priced resources)."""
        last = self._last
        if last is not None and np.array_equal(last.log_price, log_price):
            return last
        market, priced = self.market, self.priced
        self.evaluations += 1
        guess = None if last is None else last.response
        response = best_response(market, log_price, guess)
        price = np.where(priced, np.exp(log_price), 0.0)
        # Best responses never exceed the ceiling: log_u is capped already.
        total = float(market.value(response.log_u).sum())
        demand = response.demand
        income, spent = float(price @ market.budget), float(price @ demand)
        dual = income + total - spent
        scale = income + abs(total) + spent
        excess = demand - market.budget
        residual = self._residual(log_price, excess)
        self._last = _Eval(log_price.copy(), response, excess, dual, scale, residual)
        return self._last

    def _residual(self, log_price: Array, excess: Array) -> float:
        # Largest relative excess demand of a priced resource with a price.
        relative = np.abs(excess) / np.maximum(self.market.budget, 1e-300)
        zero = (log_price <= self.floor + 1e-12) & (excess <= 0)
        return float(np.where(self.priced & ~zero, relative, 0.0).max(initial=0.0))

    def everyone_at_most(self, e: _Eval) -> bool:
        """Whether the demand fits and no agent could gain from any more."""
        response, market = e.response, self.market
        if not (e.excess[self.priced] <= 0).all():
            return False
        at_cap = response.log_z >= response.pieces.clip_hi
        capped = (at_cap | ~market.active).all(axis=0)
        return bool((response.at_ceiling | capped).all())


def solve_fair(market: Market, log_price0: Array | None = None) -> Solution:
    """Solve the alpha-fair problem (finite alpha) on a market."""
    prepared = prepare(market)
    sub = prepared.market
    start = first_log_price(sub) if sub.n_agents else np.zeros(market.n_resources)
    if log_price0 is not None:
        start = np.where(np.isfinite(log_price0), log_price0, start)
    start = np.where(prepared.priced, start, 0.0)
    floor, ceiling = start - PRICE_RANGE, start + 2 * PRICE_RANGE
    dual = _Dual(prepared, floor)
    unsold = dual.at(start).excess <= -SLACK_HINT * sub.budget
    if sub.n_agents and unsold[prepared.priced].any():
        # Half a budget unsold at the first guess: that resource may be slack.
        prepared = settle_slack(prepared)
        dual = _Dual(prepared, floor)

    try:
        blend, fallback = _search(dual, start, ceiling)
    except _SlackSuspectedError:
        prepared = settle_slack(prepared)
        dual = _Dual(prepared, floor)
        blend, fallback = _search(dual, start, ceiling, suspect=False)
    cloud_live, log_v_live, price, certificate = _recover(dual, blend)
    certificate["fallback"] = fallback
    cloud, log_v = cloud_live, log_v_live
    if not prepared.live.all():
        cloud, log_v = widen(market, prepared.live, cloud_live, log_v_live)
    price = np.where(prepared.zero_price, 0.0, price)
    fixed = ~prepared.priced & ~prepared.zero_price
    if fixed.any():
        price[fixed] = _support_price(market, cloud)[fixed]
    return Solution(cloud=cloud, price=price, certificate=certificate, log_v=log_v)


def widen(
    market: Market, live: Array, cloud_live: Array, log_v_live: Array
) -> tuple[Array, Array]:
    """Put the agents set aside back: floors, and utility 0."""
    cloud = market.floor.copy()
    cloud[:, live] = cloud_live
    log_v = np.full(market.n_agents, -np.inf)
    log_v[live] = log_v_live
    return cloud, log_v


class _SlackSuspectedError(Exception):
    """Newton is walking a price down towards zero: check for slack first."""


def _search(
    dual: _Dual, start: Array, ceiling: Array, *, suspect: bool = True
) -> tuple[Blend, float]:
    # The float says whether the nested fallback had to replace Newton.
    priced = np.flatnonzero(dual.priced)
    if priced.size == 0 or dual.market.n_agents == 0:
        e = dual.at(start)
        return Blend.single(e.response.demand, start), 0.0
    found = _newton(dual, start, start - SLACK_DROP if suspect else None)
    if found is not None:
        return Blend.single(found.response.demand, found.log_price), 0.0
    return _nested(dual, start, ceiling), 1.0


def _newton(dual: _Dual, start: Array, watch: Array | None) -> _Eval | None:
    """Damped Newton on the dual in log prices; None if it does not converge.

    Raises :class:`_SlackSuspectedError` when a price with unsold budget falls below
    ``watch``: walking it down to zero in bounded steps would be slow, and the
    slack check settles such resources directly.
    """
    e = dual.at(start)
    best, stalls = math.inf, 0
    for _ in range(MAX_NEWTON):
        unsold = dual.priced & (e.excess < 0)
        if watch is not None and (unsold & (e.log_price < watch)).any():
            raise _SlackSuspectedError
        residual = e.residual
        if residual <= CLEAR_TOL or dual.everyone_at_most(e):
            return e
        # Stalling only counts near the end, where rounding limits progress.
        stalls = stalls + 1 if residual > 0.5 * best and residual < 1e-6 else 0
        best = min(best, residual)
        if stalls >= 4:
            return e if residual <= STALL_TOL else None
        step = _newton_step(dual, e)
        moved = None if step is None else _line_search(dual, e, step)
        if moved is None:
            return e if residual <= STALL_TOL else None
        e = moved
    return None


def _newton_step(dual: _Dual, e: _Eval) -> Array | None:
    market = dual.market
    at_floor = (e.log_price <= dual.floor + 1e-12) & (e.excess <= 0)
    move = np.flatnonzero(dual.priced & ~at_floor)
    if move.size == 0:
        return None
    hessian = -e.response.jacobian()
    if move.size < hessian.shape[0]:
        hessian = hessian[np.ix_(move, move)]
    held = e.response.demand[move] + market.budget[move]
    regular = hessian + np.diag(1e-10 * held)
    excess = e.excess[move]
    try:
        direction = _solve_small(regular, excess)
    except np.linalg.LinAlgError:
        direction = excess / np.diag(regular)
    price = np.exp(e.log_price[move])
    if not np.isfinite(direction).all() or price @ (excess * direction) <= 0:
        direction = excess / np.maximum(np.diag(regular), 1e-10 * held)
    largest = np.abs(direction).max()
    if largest > MAX_STEP:
        direction *= MAX_STEP / largest
    step = np.zeros_like(e.log_price)
    step[move] = direction
    return step


def _solve_small(matrix: Array, rhs: Array) -> Array:
    # One priced resource needs no factorisation (a zero pivot gives inf,
    # which the caller treats like a singular matrix).
    if rhs.size == 1:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(rhs / matrix[0])
    return np.asarray(np.linalg.solve(matrix, rhs))


def _line_search(dual: _Dual, e: _Eval, step: Array) -> _Eval | None:
    # Armijo on the dual; where its change drowns in rounding, accept any step
    # that reduces the excess demand instead.
    price = np.where(dual.priced, np.exp(e.log_price), 0.0)
    slope = -float(price @ (e.excess * step))
    residual = e.residual
    size = 1.0
    for _ in range(40):
        trial = dual.at(np.maximum(e.log_price + size * step, dual.floor))
        noise = 1e-13 * max(e.dual_scale, trial.dual_scale)
        if trial.dual <= e.dual + 1e-4 * size * slope:
            return trial
        if abs(trial.dual - e.dual) <= noise and trial.residual < residual:
            return trial
        size *= 0.5
    return None


def _nested(dual: _Dual, start: Array, ceiling: Array) -> Blend:
    market = dual.market
    levels = [int(r) for r in np.flatnonzero(dual.priced)]

    def inner(key: Array) -> tuple[Blend, float]:
        e = dual.at(key)
        q = levels[-1]
        return Blend.single(e.response.demand, key), float(e.response.jacobian()[q, q])

    return nested_search(
        levels,
        start,
        inner,
        market.budget,
        x_min=dual.floor,
        x_max=ceiling,
        xtol=XTOL,
        ftol=1e-12 * market.budget,
    )


def _recover(dual: _Dual, blend: Blend) -> tuple[Array, Array, Array, dict[str, float]]:
    market = dual.market
    if len(blend.parts) == 1:
        e = dual.at(blend.parts[0][1])
        cloud, log_price, best_dual = e.response.exact_cloud(), e.log_price, e.dual
    else:
        cloud = np.zeros((market.n_resources, market.n_agents))
        log_price = np.zeros(market.n_resources)
        best_dual = math.inf
        for weight, key in blend.parts:
            e = dual.at(key)
            cloud = cloud + weight * e.response.exact_cloud()
            log_price = log_price + weight * key
            best_dual = min(best_dual, e.dual)
    excess = blend.demand - market.budget
    zero = (log_price <= dual.floor + 1e-9) & (excess <= 0)
    # Everyone at their maximum with budget to spare: optimal at price zero.
    saturated = len(blend.parts) == 1 and dual.everyone_at_most(e)
    zero |= saturated
    relative = np.abs(excess) / np.maximum(market.budget, 1e-300)
    residual = np.where(dual.priced & ~zero, relative, 0.0).max(initial=0.0)

    trimmed = trim_to_budget(cloud, market.floor, market.cap, market.budget)
    log_v = np.minimum(market.log_utility(market.log_z_of(trimmed)), market.log_ceiling)
    values = market.value(log_v)
    objective = float(values.sum())
    price = np.where(dual.priced & ~zero, np.exp(log_price), 0.0)
    gap = best_dual - objective if dual.priced.any() and not saturated else 0.0
    size = float(np.abs(values).sum())
    certificate = {
        "duality_gap": gap,
        "relative_gap": gap / size if size > 0 else gap,
        "budget_residual": float(residual),
        "iterations": float(dual.evaluations),
    }
    return trimmed, log_v, price, certificate


def trim_to_budget(cloud: Array, floor: Array, cap: Array, budget: Array) -> Array:
    """Clip amounts into their boxes and keep every budget strictly respected.

    Arrays are ``(R, N)``. A budget that is used up is filled to within a
    relative ``BUDGET_MARGIN`` only, so that summing the amounts in any order
    stays within it; the amounts above the floors are scaled down for that.
    Blending two bundles at a floor can also land an ulp below it. Returns
    ``cloud`` itself when nothing needed fixing.
    """
    if (cloud < floor).any() or (cloud > cap).any():
        cloud = np.minimum(np.maximum(cloud, floor), cap)
    limit = budget * (1.0 - BUDGET_MARGIN)
    for _ in range(3):
        over = cloud.sum(axis=1) > limit
        if not over.any():
            return cloud
        above = (cloud - floor).sum(axis=1)
        room = np.maximum(limit - floor.sum(axis=1), 0.0)
        factor = np.where(over, room / np.maximum(above, 1e-300), 1.0)
        factor = np.clip(factor * (1 - 4e-16), 0.0, 1.0)
        cloud = np.minimum(floor + (cloud - floor) * factor[:, None], cap)
    return cloud


def _support_price(market: Market, cloud: Array) -> Array:
    """Per resource, the largest marginal value of one more unit to any agent.

    For a resource with no room above the floors it is the smallest price at
    which no agent would ask for more.
    """
    log_z = market.log_z_of(cloud)
    log_u = market.log_utility(log_z)
    log_m = market.log_multiplier(log_u)
    wants = market.active & (log_u < market.log_ceiling) & (cloud < market.cap_given)
    with np.errstate(invalid="ignore", over="ignore"):
        marginal = np.exp(log_m + market.log_gamma - log_z)
    marginal = np.where(wants & np.isfinite(marginal), marginal, 0.0)
    return np.asarray(marginal.max(axis=1, initial=0.0))


def solve_separable(
    *,
    budget: Array,
    scale: Array,
    gamma: Array,
    local: Array,
    weight: Array,
    floor: Array,
    ceiling: Array,
) -> Solution | None:
    """alpha = 1 with no caps: every price from its own resource, or None.

    At alpha = 1 an agent below its ceiling buys ``z_r = max(w gamma_r mu_r,
    local_r + floor_r)`` with ``mu_r = 1 / lambda_r``, whatever the other
    resources cost, so each resource clears on its own: ``f_r(mu) = sum_i
    max(a_i mu, lo_i)`` (``a = w gamma``) is convex, piecewise linear and
    increasing, and must reach ``budget_r + sum_i local_i``. Newton's method
    on it, started where every agent buys (to the right of the root, since
    ``f`` lies above that line), solves the piece it stands on at each step
    and moves left until the piece holds: the exact root, in a few steps.

    Arrays are ``(R, N)``, as in a Market; the caller has checked that no
    active coordinate has a cap. Returns None, for the general solver to
    take over, where a ceiling would bind (resources couple there), where a
    resource has no room above its floors or no agent that wants it, or if
    rounding keeps the pieces from settling.
    """
    sums = _resource_sum(gamma)
    if sums.max() > 1.0:
        gamma = gamma / np.maximum(sums, 1.0)
    all_active = gamma.min() > 0
    active = gamma > 0
    floors = bool(floor.any())
    lo = local + floor if floors else local
    if (budget <= (floor.sum(axis=1) if floors else 0.0)).any():
        return None
    if not (all_active or active.any(axis=1).all()):
        return None

    a = weight * gamma
    ones = np.ones(a.shape[1])
    # Clear a little below the budget, so that rounding in the sums cannot
    # take the allocation over it (as trim_to_budget would ensure).
    limit = budget * (1.0 - SEPARABLE_MARGIN)
    found = _clearing_mu(a, lo, limit + local @ ones, ones)
    if found is None:
        return None
    mu, steps = found
    cloud = np.maximum(a * mu[:, None], lo) - local
    if floors:
        np.maximum(cloud, floor, out=cloud)
    log_scale = np.log(scale)
    active_or_none = None if all_active else active
    log_u = _log_utility(log_scale, gamma, local + cloud, active_or_none)
    if _above_ceiling(log_u, ceiling):
        return None

    price = 1.0 / mu
    demand = cloud @ ones
    best_dual = float(price @ (budget - demand)) + float(weight @ log_u)
    if (demand > budget * (1.0 - BUDGET_MARGIN)).any():
        cloud = trim_to_budget(cloud, floor, np.full_like(floor, np.inf), budget)
        log_u = _log_utility(log_scale, gamma, local + cloud, active_or_none)
    values = weight * log_u
    objective = float(values @ ones)
    gap = best_dual - objective
    size = float(np.abs(values) @ ones)
    residual = max(abs(d / b - 1.0) for d, b in zip(demand, budget, strict=True))
    certificate = {
        "duality_gap": gap,
        "relative_gap": gap / size if size > 0 else gap,
        "budget_residual": float(residual),
        "iterations": float(steps),
        "fallback": 0.0,
    }
    return Solution(cloud=cloud, price=price, certificate=certificate, log_v=log_u)


def _above_ceiling(log_u: Array, ceiling: Array) -> bool:
    # Whether some agent's utility exceeds its ceiling; the first test is a
    # cheap sufficient one for the usual ceilings of 1 or more.
    if log_u.max() <= 0.0 and ceiling.min() >= 1.0:
        return False
    return bool((log_u > np.log(ceiling)).any())


def _log_utility(
    log_scale: Array, gamma: Array, z: Array, active: Array | None
) -> Array:
    # log u = log A + sum_r gamma_r log z_r, counting 0 * log 0 as 0 (active
    # None: every elasticity is positive).
    with np.errstate(divide="ignore"):
        log_z = np.log(z)
    if active is not None:
        log_z = np.where(active, log_z, 0.0)
    return np.asarray(log_scale + _resource_sum(gamma * log_z))


def _clearing_mu(
    a: Array, lo: Array, target: Array, ones: Array
) -> tuple[Array, int] | None:
    # Newton on the convex f(mu) = sum_i max(a_i mu, lo_i), one resource per
    # row, from the line where every coordinate is free. Each step solves the
    # piece of the current point and moves left, so the set of coordinates at
    # their lower end only grows: the root once its size stays the same. The
    # few per-resource numbers are plain floats: cheaper than small arrays.
    with np.errstate(divide="ignore", invalid="ignore"):
        kink = lo / a  # (r, i) is free once mu_r passes it (never if a = 0)
    goal = target.tolist()
    mu = [g / s for g, s in zip(goal, (a @ ones).tolist(), strict=True)]
    low = kink >= np.array(mu)[:, None]
    count = np.count_nonzero(low)
    for step in range(1, MAX_NEWTON + 1):
        free = np.where(low, 0.0, a) @ ones
        held = np.where(low, lo, 0.0) @ ones
        pieces = zip(goal, held.tolist(), free.tolist(), strict=True)
        mu = [(g - h) / s if s > 0 else math.nan for g, h, s in pieces]
        if not min(mu) > 0 or not math.isfinite(max(mu)):
            return None
        low = kink >= np.array(mu)[:, None]
        count, before = np.count_nonzero(low), count
        if count == before:
            return np.array(mu), step
    return None


@dataclass(frozen=True)
class _Point:
    """The lean demand of every agent at log prices ``eta`` (arrays ``(R, N)``)."""

    eta: Array
    low: Array
    z: Array
    gamma_free: Array
    coupling: Array
    demand: Array
    log_u: Array
    excess: Array
    dual: float
    dual_scale: float
    residual: float

    def jacobian(self, ones: Array) -> Array:
        """``d demand_r / d eta_q``, as :meth:`Response.jacobian`."""
        z_free = np.where(self.low, 0.0, self.z)
        jacobian = (z_free * self.coupling) @ self.gamma_free.T
        jacobian.flat[:: jacobian.shape[0] + 1] -= z_free @ ones
        return np.asarray(jacobian)


@dataclass(frozen=True)
class _Piece:
    """Which coordinates sit at their lower end, and the free elasticities."""

    low: Array
    gamma_free: Array
    s_free: Array

    def arrays(self) -> tuple[Array, Array, Array]:
        """The three arrays, in order."""
        return self.low, self.gamma_free, self.s_free


class _Uncapped:
    """The dual of a market with no caps, for finite alpha, evaluated lean.

    With only lower ends to clip at, each agent's demand equation
    ``m - kappa L(m) = beta`` (see :mod:`controller._response`) is convex
    (alpha > 1), concave (alpha < 1) or linear in ``m``, and increasing: it is
    the maximum (or the minimum) of the lines of its pieces. The root on any
    one piece's line therefore lies on the side of the true root where
    Newton's method moves monotonically, and every agent reaches its root
    piece in at most ``R`` more steps. The first piece tried is the one of
    the previous evaluation (within this solve), else the one with every
    coordinate free. An agent that would pass its ceiling buys the cheapest
    bundle reaching it instead: ``L(m) = log(C / A)``, convex in the same
    way. Arrays are ``(R, N)``.
    """

    def __init__(
        self,
        alpha: float,
        target: Array,
        scale: Array,
        gamma: Array,
        local: Array,
        weight: Array,
        lo: Array,
        ceiling: Array,
    ) -> None:
        self.kappa = 1.0 - alpha
        self.target, self.gamma, self.local = target, gamma, local
        self.weight = weight
        self.ones = np.ones(gamma.shape[1])
        active = gamma > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            # -inf on inactive coordinates: they are never free.
            self.log_gamma = np.log(gamma)
            self.log_lo = np.log(lo)
            self.gamma_log_lo = gamma * self.log_lo
            self.gamma_log_gamma = gamma * self.log_gamma
        if gamma.min() <= 0:
            self.gamma_log_lo = np.where(active, self.gamma_log_lo, 0.0)
            self.gamma_log_gamma = np.where(active, self.gamma_log_gamma, 0.0)
        self.all_free = _Piece(~active, gamma, _resource_sum(gamma))
        self.inactive = not active.all()
        self.log_scale = np.log(scale)
        self.beta = _log_unless_ones(weight) + self.kappa * self.log_scale
        self.log_ceiling = _log_unless_ones(ceiling)
        # Agents at their ceiling on their floors alone buy nothing more.
        log_u_lo = self.log_scale + _resource_sum(self.gamma_log_lo)
        self.sated = log_u_lo >= self.log_ceiling
        self.evaluations = 0
        self._warm = self.all_free
        self._warm_cheap = tuple(a.copy() for a in self.all_free.arrays())

    def utility_value(self, log_u: Array) -> Array:
        """``U_alpha(u)`` from ``log u``."""
        if self.kappa == 0.0:
            return log_u
        with np.errstate(over="ignore"):
            return np.asarray(np.exp(self.kappa * log_u) / self.kappa)

    def _settle(
        self,
        g: Array,
        gamma_g: Array,
        rho: float,
        kappa: float,
        beta: Array,
        agents: Array | None = None,
    ) -> tuple[Array, Array, _Piece, Array] | None:
        # Solve rho m - kappa L(m) = beta for every agent (the demand), or
        # for ``agents`` (their cheapest bundles), each from its last piece.
        gamma, gamma_log_lo, log_lo = self.gamma, self.gamma_log_lo, self.log_lo
        if agents is None:
            return _settle_pieces(
                g, gamma, gamma_g, gamma_log_lo, log_lo, self._warm, rho, kappa, beta
            )
        g, gamma, gamma_g, gamma_log_lo, log_lo = (
            np.take(a, agents, axis=1)
            for a in (g, gamma, gamma_g, gamma_log_lo, log_lo)
        )
        start = _Piece(*(a[..., agents] for a in self._warm_cheap))
        found = _settle_pieces(
            g, gamma, gamma_g, gamma_log_lo, log_lo, start, rho, kappa, beta
        )
        if found is not None:
            for kept, now in zip(self._warm_cheap, found[2].arrays(), strict=True):
                kept[..., agents] = now
        return found

    def at(self, eta: Array) -> _Point | None:
        """Demand and dual value at prices ``exp(eta)``; None if unsettled."""
        self.evaluations += 1
        kappa, column = self.kappa, eta[:, None]
        g = self.log_gamma - column
        gamma_g = self.gamma_log_gamma - self.gamma * column
        # Below the ceiling: m - kappa L(m) = beta.
        found = self._settle(g, gamma_g, 1.0, kappa, self.beta)
        if found is None:
            return None
        m, t, piece, level = found
        self._warm = piece
        low, gamma_free, s_free = piece.low, piece.gamma_free, piece.s_free
        log_u = self.log_scale + m * s_free + level
        coupling = -kappa / (1.0 - kappa * s_free)
        above = log_u > self.log_ceiling
        if above.any():
            low, gamma_free = low.copy(), gamma_free.copy()
            log_u[above] = self.log_ceiling[above]
            sated = above & self.sated
            if sated.any():
                t[:, sated], low[:, sated], gamma_free[:, sated] = -np.inf, True, 0.0
                coupling[sated] = 0.0
                above &= ~self.sated
        if above.any():
            # The cheapest bundle reaching the ceiling: L(m) = log(C / A).
            i = np.flatnonzero(above)
            goal = self.log_ceiling[i] - self.log_scale[i]
            found = self._settle(g, gamma_g, 0.0, -1.0, goal, i)
            if found is None:
                return None
            t[:, i], cheap = found[1], found[2]
            low[:, i], gamma_free[:, i] = cheap.low, cheap.gamma_free
            coupling[i] = 1.0 / cheap.s_free
        # t is this evaluation's own array: clip and exponentiate in place.
        z = np.exp(np.maximum(t, self.log_lo, out=t), out=t)
        demand = (z - self.local) @ self.ones
        price = np.exp(eta)
        total = float(self.weight @ self.utility_value(log_u))
        income, spent = float(price @ self.target), float(price @ demand)
        excess = demand - self.target
        return _Point(
            eta=eta,
            low=low,
            z=z,
            gamma_free=gamma_free,
            coupling=coupling,
            demand=demand,
            log_u=log_u,
            excess=excess,
            dual=income + total - spent,
            dual_scale=income + abs(total) + spent,
            residual=float(np.abs(excess / self.target).max()),
        )


def _settle_pieces(
    g: Array,
    gamma: Array,
    gamma_g: Array,
    gamma_log_lo: Array,
    log_lo: Array,
    start: _Piece,
    rho: float,
    kappa: float,
    beta: Array,
) -> tuple[Array, Array, _Piece, Array] | None:
    """Solve ``rho m - kappa L(m) = beta`` by Newton steps from a piece.

    ``L(m) = sum_r gamma_r max(m + g_r, log_lo_r)``, convex; ``rho - kappa
    L'`` keeps one sign of curvature (see :class:`_Uncapped`). The root on
    ``start``'s line is the first point; from there the clipped set changes
    monotonically, so it is the root once its size stays the same. Returns
    ``m``, ``m + g``, its piece and the constant ``L(m) - m s_free`` of it;
    None if it does not settle (rounding) or an agent's equation is flat.
    """
    piece = start
    level = _resource_sum(np.where(piece.low, gamma_log_lo, gamma_g))
    before = -1
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(g.shape[0] + 2):
            m = (beta + kappa * level) / (rho - kappa * piece.s_free)
            t = m + g
            low = t <= log_lo
            count = int(np.count_nonzero(low))
            if count == before or (before < 0 and np.array_equal(low, piece.low)):
                if not np.isfinite(m).all():
                    return None
                return m, t, piece, level
            before = count
            gamma_free = np.where(low, 0.0, gamma)
            piece = _Piece(low, gamma_free, _resource_sum(gamma_free))
            level = _resource_sum(np.where(low, gamma_log_lo, gamma_g))
    return None


def solve_uncapped(
    *,
    alpha: float,
    budget: Array,
    scale: Array,
    gamma: Array,
    local: Array,
    weight: Array,
    floor: Array,
    ceiling: Array,
) -> Solution | None:
    """Finite alpha with no caps: Newton on the dual, lean, or None.

    The same method as :func:`solve_fair`, on :class:`_Uncapped` instead of
    the general responses; at alpha = 1 it serves where ceilings bind (else
    :func:`solve_separable` is quicker). Arrays are ``(R, N)``. Returns
    None, for the general solver to take over, where demand can jump
    (alpha < 1 with elasticities summing to ``1 / (1 - alpha)``), where a
    resource has no room above its floors or no agent that wants it, where
    a price heads for zero (a budget nobody can use up), or if Newton's
    method does not settle.
    """
    kappa = 1.0 - alpha
    sums = _resource_sum(gamma)
    if sums.max() > 1.0:
        gamma = gamma / np.maximum(sums, 1.0)
        sums = _resource_sum(gamma)
    if (1.0 - kappa * sums).min() <= TINY_SLOPE:
        return None
    floors = bool(floor.any())
    lo = local + floor if floors else local
    if (budget <= (floor.sum(axis=1) if floors else 0.0)).any():
        return None
    if not (gamma.min() > 0 or (gamma > 0).any(axis=1).all()):
        return None

    limit = budget * (1.0 - SEPARABLE_MARGIN)
    dual = _Uncapped(alpha, limit, scale, gamma, local, weight, lo, ceiling)
    start = _even_split_log_price(dual, floor, budget)
    e = _lean_newton(dual, start)
    if e is None:
        return None
    return _lean_recover(dual, e, budget, floor if floors else None)


def _even_split_log_price(dual: _Uncapped, floor: Array, budget: Array) -> Array:
    # As first_log_price: marginal values at an even split, summed.
    room = np.maximum(budget - floor @ dual.ones, 0.0)
    held = dual.local + floor + (room / dual.ones.size)[:, None]
    log_u = dual.log_scale + _resource_sum(dual.gamma * np.log(held))
    log_m = dual.beta - dual.kappa * dual.log_scale + dual.kappa * log_u
    shift = float(log_m.max())
    wanted = dual.gamma @ np.exp(log_m - shift)
    return np.asarray(np.log(wanted) + shift - np.log(held @ dual.ones))


def _lean_newton(dual: _Uncapped, start: Array) -> _Point | None:
    # Damped Newton on the dual in log prices, as _newton, with no price
    # allowed to fall PRICE_RANGE below its start (a slack resource).
    e = dual.at(start)
    floor = start - PRICE_RANGE
    for _ in range(MAX_NEWTON):
        if e is None or (e.eta < floor).any():
            return None
        if e.residual <= CLEAR_TOL:
            return e
        hessian = -e.jacobian(dual.ones)
        regular = hessian + np.diag(1e-10 * (e.demand + dual.target))
        try:
            direction = _solve_small(regular, e.excess)
        except np.linalg.LinAlgError:
            direction = e.excess / np.diag(regular)
        price = np.exp(e.eta)
        if not np.isfinite(direction).all() or price @ (e.excess * direction) <= 0:
            direction = e.excess / np.diag(regular)
        largest = np.abs(direction).max()
        if largest > MAX_STEP:
            direction *= MAX_STEP / largest
        e = _lean_line_search(dual, e, direction, price)
    return None


def _lean_line_search(
    dual: _Uncapped, e: _Point, step: Array, price: Array
) -> _Point | None:
    # Armijo on the dual, or a smaller excess where its change is rounding.
    slope = -float(price @ (e.excess * step))
    size = 1.0
    for _ in range(40):
        trial = dual.at(e.eta + size * step)
        if trial is None:
            return None
        noise = 1e-13 * max(e.dual_scale, trial.dual_scale)
        if trial.dual <= e.dual + 1e-4 * size * slope:
            return trial
        if abs(trial.dual - e.dual) <= noise and trial.residual < e.residual:
            return trial
        size *= 0.5
    return None


def _lean_recover(
    dual: _Uncapped, e: _Point, budget: Array, floor: Array | None
) -> Solution:
    # The allocation at the final prices, inside the budgets, and the
    # certificate: the dual at those prices (with the true budgets) minus
    # the objective of the allocation.
    local, ones = dual.local, dual.ones
    cloud = e.z - local
    floor_or_zero = np.zeros_like(cloud) if floor is None else floor
    cloud = np.where(e.low, floor_or_zero, np.maximum(cloud, floor_or_zero))
    if (cloud @ ones > budget * (1.0 - BUDGET_MARGIN)).any():
        cloud = trim_to_budget(
            cloud, floor_or_zero, np.full_like(cloud, np.inf), budget
        )
    # The utilities of the amounts themselves: an amount too small for a
    # float (a tiny elasticity reaching a ceiling) must count as what it is.
    active = dual.gamma > 0 if dual.inactive else None
    log_u = _log_utility(dual.log_scale, dual.gamma, local + cloud, active)
    log_u = np.minimum(log_u, dual.log_ceiling)
    values = dual.weight * dual.utility_value(log_u)
    objective = float(values @ ones)
    price = np.exp(e.eta)
    best_dual = e.dual + float(price @ (budget - dual.target))
    gap = best_dual - objective
    size = float(np.abs(values) @ ones)
    residual = np.abs(e.demand - budget) / budget
    certificate = {
        "duality_gap": gap,
        "relative_gap": gap / size if size > 0 else gap,
        "budget_residual": float(residual.max()),
        "iterations": float(dual.evaluations),
        "fallback": 0.0,
    }
    return Solution(cloud=cloud, price=price, certificate=certificate, log_v=log_u)
