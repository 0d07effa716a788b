"""alpha = inf: raise the worst agent as far as possible, then the next (leximin).

Max-min by prices. Fix a level ``t`` and prices ``mu`` (a direction: only
ratios matter). Each agent's cheapest bundle reaching ``t`` has a closed form
(:func:`controller._response.cheapest_response`), and ``t`` is affordable at
``mu`` when these bundles cost no more than ``mu . budget``. Write ``T(mu)``
for the highest affordable level: every ``T(mu)`` bounds the max-min level
from above (weak duality), and the max-min level is ``min_mu T(mu)``, reached
where the cheapest bundles use exactly the budgets of the priced resources.
So: an inner search over ``log t`` for ``T(mu)``, and outer searches over the
price ratios driving each resource's excess demand at ``T(mu)`` to zero.

Leximin by freezing. At the max-min level, an agent whose cheapest bundle
costs more as its level rises (positive marginal cost ``M_i / t`` under the
clearing prices) cannot rise without pushing someone below ``t``: any
allocation that lifted it would cost more than ``mu . budget``. Such agents
are frozen at their level, agents that reached their own maximum (ceiling or
caps) are frozen there, and the rest are raised again in the next round with
the frozen levels as constraints. Every round freezes at least one agent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from controller._dual import (
    CLEAR_TOL,
    MAX_NEWTON,
    Solution,
    first_log_price,
    prepare,
    settle_slack,
    trim_to_budget,
    widen,
)
from controller._response import (
    Array,
    Market,
    Response,
    cheapest_response,
)
from controller._search import Blend, Point, find_crossing, nested_search

# Price ratios to the reference resource are searched within e ** +-RATIO_RANGE.
RATIO_RANGE = 200.0
XTOL = 1e-13
# Price ratios need less: T(mu) is minimised over them, so near the optimum
# its error is of second order in theirs (first order only at a kink).
OUTER_XTOL = 1e-11
# The ratio searches stop at this relative excess demand (the level searches
# inside them are only this exact, and the budget is trimmed afterwards).
OUTER_FTOL = 1e-10
# Resolution of the level searches, in log level and in relative cost.
LEVEL_TOL = 1e-12
# Largest Newton step of a max-min round, in log price ratio and log level.
ROUND_STEP = 20.0
# An agent is a bottleneck when its marginal level cost exceeds this share of
# the largest one (tiny costs come from resources whose price is ~0).
BOTTLENECK_SHARE = 1e-9
# log-level slack within which an agent counts as at its own maximum.
AT_MAX = 1e-12


@dataclass
class _Round:
    """Frozen agents and their log levels; the rest rise together."""

    frozen: Array
    level: Array
    log_max: Array

    def targets(self, log_t: float) -> Array:
        """Log level each agent must reach when the rising ones are at ``log_t``."""
        return np.where(self.frozen, self.level, np.minimum(log_t, self.log_max))


class _Levels:
    """Cheapest bundles of a prepared market at given prices and levels, counted."""

    def __init__(self, market: Market, priced: Array) -> None:
        self.market = market
        self.priced = priced
        self.evaluations = 0
        self._last: tuple[Array, Response] | None = None

    def at(self, key: Array, state: _Round) -> Response:
        """Bundles at ``key = (log prices..., log t)``."""
        if self._last is not None and np.array_equal(self._last[0], key):
            return self._last[1]
        self.evaluations += 1
        response = cheapest_response(self.market, key[:-1], state.targets(key[-1]))
        self._last = (key.copy(), response)
        return response


def solve_leximin(market: Market) -> Solution:
    """Leximin allocation of a market (weights play no part at alpha = inf)."""
    prepared = settle_slack(prepare(market))
    sub, priced = prepared.market, prepared.priced
    cloud = market.floor.copy()
    certificate = {"rounds": 0.0, "maxmin_gap": 0.0, "iterations": 0.0}
    price = np.zeros(market.n_resources)
    if sub.n_agents == 0:
        log_v = np.full(market.n_agents, -np.inf)
        return Solution(cloud=cloud, price=price, certificate=certificate, log_v=log_v)

    log_max = np.minimum(sub.log_ceiling, sub.log_utility(_finite(sub.log_hi)))
    state = _Round(
        frozen=np.zeros(sub.n_agents, dtype=bool),
        level=np.full(sub.n_agents, -np.inf),
        log_max=log_max,
    )
    levels = _Levels(sub, priced)
    start = np.where(priced, first_log_price(sub), 0.0)
    if priced.any():
        start -= start[np.flatnonzero(priced)[0]]
    log_floor = sub.log_utility(_finite(sub.log_lo))
    log_t = float(np.clip(log_floor, -700.0, log_max).min())

    live_cloud, log_v = sub.floor, log_floor
    while not state.frozen.all():
        blend = _max_min(levels, state, start, log_t)
        live_cloud, log_v, marginal, key = _settle_round(levels, state, blend)
        if certificate["rounds"] == 0:
            log_level = float(log_v.min())
            price = _level_prices(levels, state, blend, marginal, log_level)
            certificate["maxmin_gap"] = _maxmin_gap(levels, state, key, log_v)
        certificate["rounds"] += 1
        log_t = _freeze(state, log_v, marginal)
        start = key[:-1]

    certificate["iterations"] = float(levels.evaluations)
    cloud, log_v = widen(market, prepared.live, live_cloud, log_v)
    price = np.where(prepared.zero_price, 0.0, price)
    return Solution(cloud=cloud, price=price, certificate=certificate, log_v=log_v)


def _max_min(levels: _Levels, state: _Round, start: Array, log_t: float) -> Blend:
    """Highest common level of the rising agents, and the bundles reaching it.

    Prices are ratios to a reference resource, kept the dearest: the other
    ratios are searched in ``[e ** -RATIO_RANGE, 1]`` (the bottom stands for
    price zero), so that no searched price dwarfs the reference, where its
    excess demand would drown in rounding. If a ratio ends pressed against 1
    while still over-demanded, that resource becomes the reference and the
    search runs again.
    """
    priced = levels.priced
    indices = np.flatnonzero(priced)
    if indices.size == 0:
        return _level_search(levels, state, start, log_t)
    reference = int(indices[np.argmax(start[indices])])
    for _ in range(indices.size):
        start = np.where(priced, start - start[reference], 0.0)
        blend = _max_min_from(levels, state, start, log_t, reference)
        key = _mean_key(blend)[:-1]
        pressed = [
            (_balanced_excess(levels, blend, int(q)), int(q))
            for q in indices
            if q != reference and key[q] >= -XTOL
        ]
        over = [(f, q) for f, q in pressed if f > 1e-12]
        if not over:
            return blend
        reference, start = max(over)[1], key
    return blend


def _max_min_from(
    levels: _Levels, state: _Round, start: Array, log_t: float, reference: int
) -> Blend:
    indices = np.flatnonzero(levels.priced)

    def level_search(log_price: Array) -> tuple[Blend, float]:
        return _level_search(levels, state, log_price, log_t), math.nan

    outer = [int(r) for r in indices if r != reference]
    first = level_search(start)[0]
    if not outer or _everyone_fits(levels, state, first):
        return first
    found = _newton_with_free(levels, state, first.parts[-1][1], reference, log_t)
    if found is not None:
        return found
    return nested_search(
        outer,
        start,
        level_search,
        levels.market.budget,
        x_min=np.full(start.shape, -RATIO_RANGE),
        x_max=np.zeros(start.shape),
        xtol=OUTER_XTOL,
        ftol=np.full(start.shape, OUTER_FTOL),
        measure=lambda blend, q: _balanced_excess(levels, blend, q),
    )


def _balanced_excess(levels: _Levels, blend: Blend, q: int) -> float:
    """Excess demand of ``q``, conditioned for any price ratio.

    The level search makes bundles cost exactly the budget's worth, so
    ``mu . excess = 0`` and ``e_q = -sum_{r != q} mu_r e_r / mu_q``. Where
    ``mu_q`` dwarfs the other prices ``e_q`` is lost in rounding, but the
    other resources' weighted excess still shows it. Returned:
    ``e_q / B_q - sum_{r != q} mu_r e_r / sum_{r != q} mu_r B_r``, which equals
    ``e_q (1 / B_q + mu_q / sum_{r != q} mu_r B_r)``: same sign, same zero.
    """
    budget, priced = levels.market.budget, levels.priced
    key = _mean_key(blend)
    others = priced.copy()
    others[q] = False
    mu = np.where(others, np.exp(key[:-1]), 0.0)
    excess = blend.demand - budget
    worth = float(mu @ budget)
    spill = float(mu @ excess) / worth if worth > 0 else 0.0
    return float(excess[q] / budget[q]) - spill


def _newton_with_free(
    levels: _Levels, state: _Round, key: Array, reference: int, log_t: float
) -> Blend | None:
    """Newton with every resource scarce; on failure free the most plentiful.

    A resource with spare budget at the optimum has price 0, and the equation
    "demand = budget" cannot hold for it. Each retry pins the ratio of the
    resource with the most relative spare at ``-RATIO_RANGE`` (price ~0).
    """
    market, priced = levels.market, np.flatnonzero(levels.priced)
    key = key.copy()
    for _ in range(priced.size):
        found = _newton_round(levels, state, key, reference, log_t)
        if found is not None:
            return found
        response = levels.at(key, state)
        spare = (market.budget - response.demand)[priced] / market.budget[priced]
        spare[key[priced] <= -RATIO_RANGE + 1e-9] = -np.inf
        if spare.max() <= 0 or (spare > -np.inf).sum() <= 1:
            return None
        plentiful = int(priced[np.argmax(spare)])
        if plentiful == reference:
            others = [
                int(q)
                for q in priced
                if q != reference and spare[_index(priced, int(q))] > -np.inf
            ]
            reference = max(others, key=lambda q: key[q])
            key[priced] -= key[reference]
        key[plentiful] = -RATIO_RANGE
    return None


def _index(priced: Array, resource: int) -> int:
    return int(np.flatnonzero(priced == resource)[0])


def _newton_round(
    levels: _Levels,
    state: _Round,
    key: Array,
    reference: int,
    log_t: float,
) -> Blend | None:
    """Clear every priced resource at once by Newton's method, or give up.

    Unknowns: the log price ratios to the reference (the dearest resource;
    when another ratio passes 1 it takes over) and the log level. Equations:
    demand equals budget for each priced resource. Cheapest bundles have the
    closed-form Jacobian of :meth:`Response.jacobian`, plus
    ``d z_r / d log t = z_r / s_free`` for the agents still rising. A ratio
    that sinks to ``-RATIO_RANGE`` with spare budget is a free resource and
    leaves the system. None when the merit ``|excess / budget|`` stops falling.
    """
    market = levels.market
    priced = np.flatnonzero(levels.priced)
    top = float(state.log_max[~state.frozen].max())
    key = key.copy()
    response = levels.at(key, state)
    for _ in range(MAX_NEWTON):
        excess = (response.demand - market.budget)[priced] / market.budget[priced]
        free = (key[priced] <= -RATIO_RANGE + 1e-9) & (excess < 0)
        if np.abs(excess[~free]).max(initial=0.0) <= CLEAR_TOL:
            return Blend.single(response.demand, key)
        unknowns = [int(q) for q, f in zip(priced, free, strict=True)
                    if q != reference and not f]  # fmt: skip
        jacobian = _round_jacobian(response, state, key[-1], unknowns)
        rows = priced[~free]
        system = jacobian[rows] / market.budget[rows, None]
        step = np.linalg.lstsq(system, -excess[~free], rcond=None)[0]
        largest = np.abs(step).max()
        if not np.isfinite(largest):
            return None
        step *= min(1.0, ROUND_STEP / max(largest, 1e-300))
        moved = _merit_search(levels, state, key, unknowns, step, excess, top, log_t)
        if moved is None:
            return None
        key, response = moved
        dearest = int(priced[np.argmax(key[priced])])
        if key[dearest] > 0:
            key[priced] -= key[dearest]
            reference = dearest
            response = levels.at(key, state)
    return None


def _round_jacobian(
    response: Response, state: _Round, log_t: float, unknowns: list[int]
) -> Array:
    """``d demand / d (log prices of unknowns, log t)``: R x (len(unknowns) + 1)."""
    rising = ~state.frozen & (log_t < state.log_max)
    z_free = response.z * response.free
    by_level = (z_free * (response.coupling * rising)).sum(axis=1)
    by_price = response.jacobian()[:, unknowns]
    return np.column_stack([by_price, by_level])


def _merit_search(
    levels: _Levels,
    state: _Round,
    key: Array,
    unknowns: list[int],
    step: Array,
    excess: Array,
    top: float,
    log_t: float,
) -> tuple[Array, Response] | None:
    """Backtrack along a Newton step until ``|excess / budget|`` falls."""
    market = levels.market
    priced = np.flatnonzero(levels.priced)
    merit = float(excess @ excess)
    size = 1.0
    for _ in range(30):
        trial = key.copy()
        trial[unknowns] = np.maximum(key[unknowns] + size * step[:-1], -RATIO_RANGE)
        trial[-1] = min(max(key[-1] + size * step[-1], log_t), top)
        response = levels.at(trial, state)
        moved = (response.demand - market.budget)[priced] / market.budget[priced]
        if float(moved @ moved) < (1 - 1e-4 * size) * merit:
            return trial, response
        size *= 0.5
    return None


def _everyone_fits(levels: _Levels, state: _Round, blend: Blend) -> bool:
    # Every rising agent reached its own maximum within the budgets: nothing
    # is left to balance, and the prices of the first guess are as good as any.
    top = float(state.log_max[~state.frozen].max())
    reached = len(blend.parts) == 1 and float(blend.parts[0][1][-1]) >= top
    return reached and bool((blend.demand <= levels.market.budget).all())


def _level_search(
    levels: _Levels, state: _Round, log_price: Array, log_t: float
) -> Blend:
    """``T(mu)``: the highest level whose cheapest bundles the budget can buy."""
    market, priced = levels.market, levels.priced
    price = np.where(priced, np.exp(log_price), 0.0)
    worth = float(price @ market.budget)
    top = float(state.log_max[~state.frozen].max())

    def evaluate(x: float) -> Point:
        key = np.append(log_price, x)
        response = levels.at(key, state)
        demand = response.demand
        f = worth - float(price @ demand)
        slope = -_level_cost_slope(response, state, x)
        return Point(x, f, slope, Blend.single(demand, key))

    return find_crossing(
        evaluate,
        min(log_t + 1.0, top),
        x_min=log_t,
        x_max=top,
        xtol=LEVEL_TOL,
        ftol=LEVEL_TOL * worth,
    )


def _level_cost_slope(response: Response, state: _Round, log_t: float) -> float:
    """``d cost / d log t``: the sum of the rising agents' multipliers ``M_i``.

    An agent's cheapest bundle costs ``C(t)`` with ``dC/dt = M / t``; agents
    held at their own maximum, frozen, or buying nothing freely add 0.
    """
    rising = ~state.frozen & (log_t < state.log_max) & response.free.any(axis=0)
    with np.errstate(over="ignore"):
        multiplier = np.exp(response.log_m[rising])
    return float(multiplier[np.isfinite(multiplier)].sum())


def _settle_round(
    levels: _Levels, state: _Round, blend: Blend
) -> tuple[Array, Array, Array, Array]:
    """Blend the bundles, trim rounding, and measure levels and marginal costs."""
    market = levels.market
    cloud = np.zeros((market.n_resources, market.n_agents))
    marginal = np.zeros(market.n_agents)
    key = np.zeros_like(blend.parts[0][1])
    for weight, part in blend.parts:
        response = levels.at(part, state)
        cloud = cloud + weight * response.exact_cloud()
        scale = float(np.exp(part[:-1])[levels.priced].sum())
        if scale > 0:
            with np.errstate(over="ignore"):
                cost = np.exp(response.log_m - part[-1]) / scale
            marginal += weight * np.where(np.isfinite(cost), cost, 0.0)
        key = key + weight * part
    cloud = trim_to_budget(cloud, market.floor, market.cap, market.budget)
    log_u = market.log_utility(market.log_z_of(cloud))
    return cloud, np.minimum(log_u, market.log_ceiling), marginal, key


def _freeze(state: _Round, log_v: Array, marginal: Array) -> float:
    """Freeze the agents that cannot rise; return the level the others start at."""
    rising = ~state.frozen
    log_t = float(log_v[rising].min())
    at_max = rising & (state.log_max <= log_t + AT_MAX)
    candidates = rising & ~at_max
    blocked = np.zeros_like(rising)
    if candidates.any():
        largest = marginal[candidates].max()
        blocked = candidates & (marginal > BOTTLENECK_SHARE * largest)
        if largest <= 0 and not at_max.any():
            blocked = candidates
    state.level = np.where(at_max, state.log_max, state.level)
    state.level = np.where(blocked, log_v, state.level)
    state.frozen = state.frozen | at_max | blocked
    return log_t


def _level_prices(
    levels: _Levels, state: _Round, blend: Blend, marginal: Array, log_t: float
) -> Array:
    """Rise of the max-min level per extra unit of each resource.

    With normalised prices ``mu`` and the marginal level costs ``nu_i`` of the
    agents that hold the level down, one more unit of resource ``r`` lifts it
    by ``mu_r / sum_i nu_i``. Zero when no such agent exists (everyone is at
    their own maximum) and for resources with budget left over.
    """
    key = _mean_key(blend)
    mu = np.where(levels.priced, np.exp(key[:-1]), 0.0)
    mu = mu / max(mu.sum(), 1e-300)
    holding = ~state.frozen & (state.log_max > log_t + AT_MAX)
    total = float(marginal[holding].sum())
    spare = blend.demand < levels.market.budget * (1 - 1e-9)
    return np.where(spare | (total <= 0), 0.0, mu / max(total, 1e-300))


def _maxmin_gap(levels: _Levels, state: _Round, key: Array, log_v: Array) -> float:
    """Relative gap between an upper bound on the max-min level and the reached one.

    ``T(mu)`` at the final prices bounds the max-min level from above, and so
    does the lowest maximum any agent can reach on its own.
    """
    reached = float(log_v.min())
    upper = _level_search(levels, state, key[:-1], reached)
    bound = max(float(part[-1]) for _, part in upper.parts)
    bound = min(bound, float(state.log_max.min()))
    return math.expm1(bound - reached) if bound > reached else 0.0


def _mean_key(blend: Blend) -> Array:
    """The weighted mean of a blend's keys (log prices, then log level)."""
    return np.asarray(np.sum([weight * part for weight, part in blend.parts], axis=0))


def _finite(log_x: Array) -> Array:
    # Unbounded boxes (log = +inf) and empty ones (log = -inf) kept finite so
    # that 0 * inf never appears in a log utility.
    return np.clip(log_x, -745.0, 745.0)
