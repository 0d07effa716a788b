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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from controller._response import Array, Market, Response, best_response
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
    with np.errstate(divide="ignore"):
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
