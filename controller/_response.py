"""Every agent's best response to resource prices, in closed form, fleet-wide.

The solver never loops over agents: for given prices it computes what each
agent would buy, for all agents at once, from two small problems that both
reduce to one piecewise-linear equation per agent.

Work in logs. With price ``lambda_r = exp(eta_r)`` and a scalar multiplier
``m``, every coordinate an agent buys freely satisfies
``log z_r = m + log gamma_r - eta_r``; clipped to its box
``[local + floor, local + cap]`` that reads
``log z_r = clip(m, b_lo_r, b_hi_r) + g_r`` with ``g_r = log gamma_r - eta_r``.
So ``L(m) = sum_r gamma_r log z_r`` is piecewise linear and non-decreasing in
``m`` with at most ``2R`` breakpoints, and each agent's optimality condition is

    rho * m - kappa * L(m) = beta

with a slope ``rho - kappa * s_free >= 0``:

- *demand* (below the ceiling, maximise ``w U_alpha(u) - price . z``):
  ``m = log(w u ** (1 - alpha))``, so ``rho = 1``, ``kappa = 1 - alpha``,
  ``beta = log w + (1 - alpha) log A``;
- *cheapest bundle* reaching a level ``t`` (``min price . z`` subject to
  ``u >= t``): ``rho = 0``, ``kappa = -1``, ``beta = log t - log A``.

:func:`_solve_pieces` solves it exactly: first assuming no coordinate is
clipped (the common case, one vectorised formula), then, for the agents where
that guess leaves the box, by evaluating the equation at the breakpoints and
interpolating inside the bracketing linear piece.

Layout: per-resource arrays are ``(R, N)`` here (resource-major), the
transpose of :class:`controller.problem.Problem`, so that every operation on
one resource is a contiguous vector operation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

# Arrays of the solver: floats mostly, some masks and indices.
Array = npt.NDArray[Any]

# Slopes below this count as zero: the equation is flat there (alpha = 0 with
# elasticities summing to 1, or every coordinate clipped).
TINY_SLOPE = 1e-13
# Amounts beyond exp(LOG_HUGE) ~ 1e304 are treated as unbounded demand.
LOG_HUGE = 700.0


@dataclass(frozen=True)
class Market:
    """The fleet in the solver's working form (no validation, no names).

    Per-resource arrays are ``(R, N)``. ``cap`` is the effective cap: never
    above what the budget leaves once the other agents have their floors, and
    equal to the floor where the agent has no elasticity (``cap_given`` is the
    cap as given). ``gamma`` columns sum to at most 1. ``clip_lo`` and
    ``clip_hi`` are ``log(local + floor)`` and ``log(local + cap)``, with
    ``-inf`` and ``+inf`` where gamma is 0 (such coordinates never clip).
    """

    alpha: float
    budget: Array
    local: Array
    floor: Array
    cap: Array
    cap_given: Array
    gamma: Array
    active: Array
    log_gamma: Array
    gamma_log_gamma: Array
    gamma_sum: Array
    log_lo: Array
    log_hi: Array
    clip_lo: Array
    clip_hi: Array
    log_scale: Array
    log_weight: Array
    log_ceiling: Array
    weight: Array

    @classmethod
    def build(
        cls,
        *,
        alpha: float,
        budget: Array,
        scale: Array,
        gamma: Array,
        local: Array,
        weight: Array,
        floor: Array,
        cap: Array,
        ceiling: Array,
    ) -> Market:
        """Derive the working arrays from ``(N, R)`` arrays as in a Problem."""
        gamma, local, floor, cap = (
            np.ascontiguousarray(np.asarray(a, dtype=float).T)
            for a in (gamma, local, floor, cap)
        )
        sums = gamma.sum(axis=0)
        if (sums > 1.0).any():
            gamma = gamma / np.maximum(sums, 1.0)
        active = gamma > 0
        room = np.maximum(budget - floor.sum(axis=1), 0.0)
        effective = np.minimum(cap, floor + room[:, None])
        if active.all():
            log_gamma = np.log(gamma)
        else:
            effective = np.where(active, effective, floor)
            log_gamma = np.where(active, np.log(np.where(active, gamma, 1.0)), 0.0)
        market = cls(
            alpha=float(alpha),
            budget=np.asarray(budget, dtype=float),
            local=local,
            floor=floor,
            cap=effective,
            cap_given=cap,
            gamma=gamma,
            active=active,
            log_gamma=log_gamma,
            gamma_log_gamma=(gamma * log_gamma).sum(axis=0),
            gamma_sum=gamma.sum(axis=0),
            log_lo=floor,
            log_hi=floor,
            clip_lo=floor,
            clip_hi=floor,
            log_scale=np.log(scale),
            log_weight=_log_unless_ones(weight),
            log_ceiling=_log_unless_ones(ceiling),
            weight=np.asarray(weight, dtype=float),
        )
        return market.with_box(floor, effective)

    @property
    def n_agents(self) -> int:
        """Number of agents."""
        return int(self.local.shape[1])

    @property
    def n_resources(self) -> int:
        """Number of resources."""
        return int(self.local.shape[0])

    def with_box(self, floor: Array, cap: Array) -> Market:
        """The same market with other floors and (effective) caps, ``(R, N)``."""
        with np.errstate(divide="ignore"):
            log_lo = np.log(self.local + floor)
            if np.isfinite(cap).any():
                log_hi = np.log(self.local + cap)
            else:
                log_hi = np.full(cap.shape, np.inf)
        clip_lo, clip_hi = log_lo, log_hi
        if not self.active.all():
            clip_lo = np.where(self.active, log_lo, -np.inf)
            clip_hi = np.where(self.active, log_hi, np.inf)
        return replace(
            self,
            floor=floor,
            cap=cap,
            log_lo=log_lo,
            log_hi=log_hi,
            clip_lo=clip_lo,
            clip_hi=clip_hi,
        )

    def subset(self, agents: Array) -> Market:
        """The market restricted to some agents (a boolean mask or indices)."""
        if agents.dtype == bool and agents.all():
            return self
        per_agent: dict[str, Any] = {}
        for name, value in self.__dict__.items():
            if not isinstance(value, np.ndarray) or name == "budget":
                continue
            per_agent[name] = value[..., agents]
        return replace(self, **per_agent)

    @cached_property
    def all_active(self) -> bool:
        """Whether every agent has a positive elasticity for every resource."""
        return bool(self.active.all())

    @cached_property
    def steep(self) -> bool:
        """Whether every agent's demand equation rises on every piece.

        Only then is its root unique (so a warm start cannot pick another
        point): false for alpha < 1 with elasticities summing to nearly
        ``1 / (1 - alpha)``, which happens at alpha = 0 with sums of 1.
        """
        slope = 1.0 - (1.0 - self.alpha) * self.gamma_sum
        return bool((slope > TINY_SLOPE).all())

    @cached_property
    def log_u_lo(self) -> Array:
        """``log u`` of every agent on its floors (``-inf`` if one is empty)."""
        with np.errstate(invalid="ignore"):
            terms = np.where(self.active, self.gamma * self.log_lo, 0.0)
        return np.asarray(self.log_scale + terms.sum(axis=0))

    @cached_property
    def log_u_hi(self) -> Array:
        """``log u`` of every agent with its whole box (``inf`` if unbounded)."""
        with np.errstate(invalid="ignore"):
            terms = np.where(self.active, self.gamma * self.log_hi, 0.0)
        return np.asarray(self.log_scale + terms.sum(axis=0))

    def log_utility(self, log_z: Array) -> Array:
        """Uncapped ``log u`` of every agent for bundles given as ``log z``."""
        # Callers keep log z finite on inactive coordinates: 0 * finite = 0.
        return self.log_scale + _resource_sum(self.gamma * log_z)

    def log_z_of(self, cloud: Array) -> Array:
        """``log(local + cloud)``, with 0 on inactive coordinates."""
        with np.errstate(divide="ignore"):
            log_z = np.log(self.local + cloud)
        return log_z if self.active.all() else np.where(self.active, log_z, 0.0)

    def log_multiplier(self, log_u: Array) -> Array:
        """``log(w u ** (1 - alpha))``: marginal value of ``log u`` per agent."""
        if self.alpha == 1.0:
            return self.log_weight.copy()
        with np.errstate(invalid="ignore"):
            return self.log_weight + (1.0 - self.alpha) * log_u

    def value(self, log_v: Array) -> Array:
        """``w_i U_alpha(v_i)`` from ``log v_i`` (``-inf`` at ``v = 0``, alpha >= 1)."""
        alpha = self.alpha
        if alpha == 1.0:
            return self.weight * log_v
        with np.errstate(over="ignore"):
            return self.weight * np.exp((1.0 - alpha) * log_v) / (1.0 - alpha)


def _log_unless_ones(x: Array) -> Array:
    # Weights and ceilings are usually all 1 (the defaults): skip the logs.
    x = np.asarray(x, dtype=float)
    return np.zeros_like(x) if (x == 1.0).all() else np.log(x)


@dataclass(frozen=True)
class _Pieces:
    """Per-agent data of the piecewise-linear equation at one price vector.

    ``log z_r = clip(m + g_r, clip_lo_r, clip_hi_r)``; in terms of ``m`` the
    breakpoints are ``b_lo = clip_lo - g`` and ``b_hi = clip_hi - g``.
    ``log_price`` is the price vector itself (``g = log gamma - log_price``).
    """

    g: Array
    clip_lo: Array
    clip_hi: Array
    gamma: Array
    gamma_g: Array
    log_price: Array

    @cached_property
    def b_lo(self) -> Array:
        """Value of ``m`` below which each coordinate sits at its floor."""
        with np.errstate(invalid="ignore"):
            return self.clip_lo - self.g

    @cached_property
    def b_hi(self) -> Array:
        """Value of ``m`` above which each coordinate sits at its cap."""
        with np.errstate(invalid="ignore"):
            return self.clip_hi - self.g

    def agents(self, agents: Array) -> _Pieces:
        if agents.dtype == bool:
            agents = np.flatnonzero(agents)
        return _Pieces(
            np.take(self.g, agents, axis=1),
            np.take(self.clip_lo, agents, axis=1),
            np.take(self.clip_hi, agents, axis=1),
            np.take(self.gamma, agents, axis=1),
            np.take(self.gamma_g, agents),
            self.log_price,
        )

    def clip_in_place(self, t: Array) -> Array:
        """``t`` (one value per coordinate) clipped to ``[clip_lo, clip_hi]``."""
        with np.errstate(invalid="ignore"):
            np.maximum(t, self.clip_lo, out=t)
            np.minimum(t, self.clip_hi, out=t)
        return t


@dataclass(frozen=True)
class DemandPiece:
    """The linear piece of each agent's demand equation at a solved root.

    ``low`` and ``high`` mark the coordinates clipped to their floor or cap
    (``(R, N)``); the others are free. On this piece the equation reads
    ``m (1 - kappa s) = beta + kappa (k - eta . gamma_free)`` with ``s`` the
    free elasticity and ``k`` a constant of the piece, recovered from the
    root ``m`` and the level ``sum_r gamma_r log z_r`` it reached at prices
    ``exp(eta)``: ``k = level - s m + eta . gamma_free``.
    """

    low: Array
    high: Array
    m: Array
    level: Array
    log_price: Array
    gamma: Array

    @cached_property
    def gamma_free(self) -> Array:
        """Elasticities of the free coordinates (0 elsewhere)."""
        return np.where(self.low | self.high, 0.0, self.gamma)

    @cached_property
    def s(self) -> Array:
        """Free elasticity of each agent."""
        return _resource_sum(self.gamma_free)

    @cached_property
    def k(self) -> Array:
        """The constant of each agent's piece (independent of the prices)."""
        spent = self.log_price @ self.gamma_free
        return np.asarray(self.level - self.s * self.m + spent)


@dataclass(frozen=True)
class Response:
    """What every agent buys at one price vector (arrays ``(R, N)``).

    ``log_z`` is meaningful on active coordinates only. :attr:`free` marks
    active coordinates strictly inside their box and :attr:`coupling` is the
    coefficient ``c_i`` of ``d log z_r / d eta_q = c_i gamma_q - [r == q]``
    over free coordinates; both are computed on first use. ``piece`` is the
    linear piece on which each agent's demand equation was solved (before any
    ceiling binds), kept to warm-start nearby prices; None where that is not
    used.
    """

    market: Market
    pieces: _Pieces = field(repr=False)
    cloud: Array
    z: Array
    log_z: Array
    log_u: Array
    log_m: Array
    at_ceiling: Array
    cheapest: Array
    piece: DemandPiece | None

    @cached_property
    def demand(self) -> Array:
        """Total cloud amount asked for, per resource."""
        return np.asarray(self.cloud.sum(axis=1))

    def exact_cloud(self) -> Array:
        """:attr:`cloud` with coordinates clipped to a bound set to it exactly.

        ``exp(log(local + cap)) - local`` can miss ``cap`` by an ulp; the final
        allocation should report an agent at its cap or floor as exactly there.
        """
        pieces, log_z, market = self.pieces, self.log_z, self.market
        cloud = np.where(log_z >= pieces.clip_hi, market.cap, self.cloud)
        cloud = np.where(log_z <= pieces.clip_lo, market.floor, cloud)
        return np.minimum(np.maximum(cloud, market.floor), market.cap)

    @cached_property
    def free(self) -> Array:
        """Active coordinates strictly inside their box."""
        pieces, log_z = self.pieces, self.log_z
        free = pieces.clip_lo < log_z
        free &= log_z < pieces.clip_hi
        if not self.market.all_active:
            free &= self.market.active
        return free

    @cached_property
    def gamma_free(self) -> Array:
        """Elasticities of the free coordinates (0 elsewhere)."""
        return self.market.gamma * self.free

    @cached_property
    def coupling(self) -> Array:
        """``c_i``: ``-(1 - alpha) / (1 - (1 - alpha) s)`` or ``1 / s`` at a level."""
        s_free = _resource_sum(self.gamma_free)
        kappa = 1.0 - self.market.alpha
        if self.cheapest.any():
            slope = np.where(self.cheapest, s_free, 1.0 - kappa * s_free)
            top: Array | float = np.where(self.cheapest, 1.0, -kappa)
        else:
            slope, top = 1.0 - kappa * s_free, -kappa
        coupling = np.zeros_like(slope)
        np.divide(top, slope, out=coupling, where=slope > TINY_SLOPE)
        return coupling

    def jacobian(self) -> Array:
        """``d demand_r / d eta_q`` summed over agents: an R x R matrix."""
        z_free = self.z * self.free
        jacobian = (z_free * self.coupling) @ self.gamma_free.T
        jacobian.flat[:: jacobian.shape[0] + 1] -= z_free.sum(axis=1)
        return jacobian


def _pieces(market: Market, log_price: Array) -> _Pieces:
    return _Pieces(
        g=market.log_gamma - log_price[:, None],
        clip_lo=market.clip_lo,
        clip_hi=market.clip_hi,
        gamma=market.gamma,
        gamma_g=market.gamma_log_gamma - log_price @ market.gamma,
        log_price=log_price,
    )


def best_response(
    market: Market, log_price: Array, guess: Response | None = None
) -> Response:
    """Each agent's utility-maximising purchase at prices ``exp(log_price)``.

    Below its ceiling an agent equates marginal value and price; if that would
    carry it above the ceiling it buys the cheapest bundle that reaches it.
    ``guess``, the response at nearby prices, only saves work: most agents
    keep the same clipped coordinates, so the linear piece they were on
    usually holds the new root, and checking that costs a few operations.
    """
    pieces = _pieces(market, log_price)
    kappa = 1.0 - market.alpha
    beta = market.log_weight + kappa * market.log_scale
    warm = None if guess is None else guess.piece
    m = _solve_pieces(pieces, 1.0, kappa, beta, market.gamma_sum, warm)
    t = m + pieces.g
    sides = None
    if kappa != 0.0 and market.steep:
        # Keep the piece for a warm start at nearby prices. That needs a
        # unique root (steep); at alpha = 1 m is known without solving.
        sides = (t <= pieces.clip_lo, t >= pieces.clip_hi)
    log_z = _log_bundle(market.active, pieces, m, t)
    log_u = market.log_utility(log_z)
    piece = None
    if sides is not None:
        level = log_u - market.log_scale
        piece = DemandPiece(*sides, m, level, log_price, market.gamma)
    at_ceiling = log_u > market.log_ceiling

    if at_ceiling.any():
        agents = np.flatnonzero(at_ceiling)
        part = pieces.agents(agents)
        beta_c = market.log_ceiling[agents] - market.log_scale[agents]
        m_c = _solve_pieces(part, 0.0, -1.0, beta_c, market.gamma_sum[agents])
        m = m.copy()  # the piece keeps the demand root
        m[agents] = m_c
        log_z[:, agents] = _log_bundle(market.active[:, agents], part, m_c)
        log_u[agents] = market.log_ceiling[agents]
    return _assemble(market, pieces, m, piece, log_z, log_u, at_ceiling, at_ceiling)


def cheapest_response(market: Market, log_price: Array, log_target: Array) -> Response:
    """Each agent's cheapest bundle with ``u >= exp(log_target)`` at the prices.

    An agent whose target is out of reach buys its whole box; one already at
    the target on its floors buys its floors.
    """
    pieces = _pieces(market, log_price)
    beta = log_target - market.log_scale
    # Targets met on the floors, or reachable only with the whole box, sit on
    # flat ends of the equation: answer them directly.
    m = np.where(log_target <= market.log_u_lo, -np.inf, np.inf)
    inside = (log_target > market.log_u_lo) & (log_target < market.log_u_hi)
    if inside.all():
        m = _solve_pieces(pieces, 0.0, -1.0, beta, market.gamma_sum)
    elif inside.any():
        agents = np.flatnonzero(inside)
        part = pieces.agents(agents)
        gamma_sum = market.gamma_sum[agents]
        m[agents] = _solve_pieces(part, 0.0, -1.0, beta[agents], gamma_sum)
    log_z = _log_bundle(market.active, pieces, m)
    log_u = market.log_utility(log_z)
    every = np.ones(market.n_agents, dtype=bool)
    return _assemble(market, pieces, m, None, log_z, log_u, every, every)


def _log_bundle(
    active: Array, pieces: _Pieces, m: Array, t: Array | None = None
) -> Array:
    # t = m + g if the caller has it already (it is clipped in place).
    log_z = pieces.clip_in_place(m + pieces.g if t is None else t)
    if not np.isfinite(m).all():
        log_z = np.where(active, log_z, 0.0)
    return np.asarray(log_z)


def _assemble(
    market: Market,
    pieces: _Pieces,
    m: Array,
    piece: DemandPiece | None,
    log_z: Array,
    log_u: Array,
    at_ceiling: Array,
    cheapest: Array,
) -> Response:
    # log z is clipped to the box already, so z - local is inside it up to
    # rounding (exact_cloud snaps the bounds for the final answer). Inactive
    # coordinates were not clipped: they get their floor.
    with np.errstate(over="ignore"):
        z = np.exp(log_z)
    cloud = np.subtract(z, market.local)
    if not market.all_active:
        cloud = np.where(market.active, cloud, market.floor)
    return Response(
        market=market,
        pieces=pieces,
        cloud=cloud,
        z=z,
        log_z=log_z,
        log_u=log_u,
        log_m=m,
        at_ceiling=at_ceiling,
        cheapest=cheapest,
        piece=piece,
    )


def _solve_pieces(
    pieces: _Pieces,
    rho: float,
    kappa: float,
    beta: Array,
    gamma_sum: Array,
    warm: DemandPiece | None = None,
) -> Array:
    """Solve ``rho m - kappa sum_r gamma_r (clip(m, b_lo_r, b_hi_r) + g_r) = beta``.

    The left side is continuous, piecewise linear and non-decreasing in ``m``.
    Returns ``+inf`` (``-inf``) where it stays below (above) ``beta`` for ever;
    on a flat piece that equals ``beta`` any point of it is returned.

    Three tiers, each exact where it applies: the formula with no coordinate
    clipped (or, given a ``warm`` piece of the demand equation, the formula
    on that piece), kept where its root lies on the piece it assumed; a few
    Newton steps, each of which solves the linear piece it starts on and is
    kept when it lands on that same piece; and, for the few agents left,
    evaluation at every breakpoint. With ``kappa = 0`` (alpha = 1) the
    bundle does not enter the equation and ``m = beta / rho`` outright.
    """
    if kappa == 0.0:
        return beta / rho
    offset = beta + kappa * pieces.gamma_g
    if warm is None:
        slope = rho - kappa * gamma_sum
        with np.errstate(divide="ignore", invalid="ignore"):
            m = offset / slope
            t = m + pieces.g
        inside = (pieces.clip_lo <= t) & (t <= pieces.clip_hi)
        inside = inside.all(axis=0) & (slope > TINY_SLOPE)
    else:
        m, inside = _solve_on_piece(pieces, rho, kappa, beta, warm)
    if inside.all():
        return m

    agents = np.flatnonzero(~inside)
    start = m[agents]
    start = np.where(np.isfinite(start), start, 0.0)
    found, m_part = _newton_on_pieces(
        pieces.agents(agents), rho, kappa, offset[agents], start
    )
    m[agents] = m_part
    if not found.all():
        left = agents[~found]
        m[left] = _solve_by_breakpoints(pieces.agents(left), rho, kappa, beta[left])
    return m


def _solve_on_piece(
    pieces: _Pieces, rho: float, kappa: float, beta: Array, piece: DemandPiece
) -> tuple[Array, Array]:
    # The root of the equation restricted to the piece, and whether it lies
    # on that piece (the same coordinates clipped on the same sides).
    top = beta + kappa * (piece.k - pieces.log_price @ piece.gamma_free)
    slope = rho - kappa * piece.s
    with np.errstate(divide="ignore", invalid="ignore"):
        m = top / slope
        t = m + pieces.g
    same = ((t <= pieces.clip_lo) == piece.low) & ((t >= pieces.clip_hi) == piece.high)
    return m, same.all(axis=0) & (slope > TINY_SLOPE) & np.isfinite(m)


def _newton_on_pieces(
    pieces: _Pieces, rho: float, kappa: float, offset: Array, m: Array
) -> tuple[Array, Array]:
    # The equation is h(m) = rho m - kappa sum_r gamma_r clip(m, ...) - offset.
    # A Newton step solves the linear piece it starts on; when it lands on that
    # same piece (no coordinate changes side) it is the exact root.
    found = np.zeros(m.shape, dtype=bool)
    b_lo, b_hi, gamma = pieces.b_lo, pieces.b_hi, pieces.gamma
    for _ in range(3):
        low, high = m <= b_lo, m >= b_hi
        clipped = np.minimum(np.maximum(m, b_lo), b_hi)
        slope = rho - kappa * _resource_sum(gamma * ~(low | high))
        h = rho * m - kappa * _resource_sum(gamma * clipped) - offset
        with np.errstate(divide="ignore", invalid="ignore"):
            step = m - h / slope
        same = ((step <= b_lo) == low) & ((step >= b_hi) == high)
        ok = (slope > TINY_SLOPE) & same.all(axis=0) & ~found
        m = np.where(found | ~np.isfinite(step), m, step)
        found |= ok
        if found.all():
            break
    return found, m


def _resource_sum(x: Array) -> Array:
    """Sum over resources (axis 0) by adding rows: faster than a reduction."""
    total: Array = x[0].copy()
    for row in x[1:]:
        total += row
    return total


def _solve_by_breakpoints(
    pieces: _Pieces, rho: float, kappa: float, beta: Array
) -> Array:
    # Evaluate the equation at every finite breakpoint (infinite ones replaced
    # by 0: an extra evaluation point does no harm). Between the largest point
    # below the root and the smallest point above it there is no breakpoint,
    # so the equation is linear there and interpolation is exact.
    points = np.concatenate([pieces.b_lo, pieces.b_hi], axis=0)
    points = np.where(np.isfinite(points), points, 0.0)
    h = np.stack([_residual(p, pieces, rho, kappa, beta) for p in points], axis=0)
    below = h < 0
    left = np.where(below, points, -np.inf).argmax(axis=0)
    right = np.where(below, np.inf, points).argmin(axis=0)
    agents = np.arange(points.shape[1])
    p_left, h_left = points[left, agents], h[left, agents]
    p_right, h_right = points[right, agents], h[right, agents]
    has_left = np.asarray(below.any(axis=0))
    has_right = np.asarray((~below).any(axis=0))

    m = np.empty(points.shape[1])
    both = has_left & has_right
    m[both] = p_left[both] - h_left[both] * (p_right[both] - p_left[both]) / (
        h_right[both] - h_left[both]
    )
    only_right = ~has_left
    m[only_right] = _extrapolate(
        p_right[only_right] - 1.0,
        p_right[only_right],
        h_right[only_right],
        pieces.agents(only_right),
        rho,
        kappa,
        -np.inf,
    )
    only_left = ~has_right
    m[only_left] = _extrapolate(
        p_left[only_left] + 1.0,
        p_left[only_left],
        h_left[only_left],
        pieces.agents(only_left),
        rho,
        kappa,
        np.inf,
    )
    return m


def _residual(
    point: Array, pieces: _Pieces, rho: float, kappa: float, beta: Array
) -> Array:
    clipped = np.minimum(np.maximum(point, pieces.b_lo), pieces.b_hi)
    with np.errstate(invalid="ignore"):
        level = (pieces.gamma * (clipped + pieces.g)).sum(axis=0)
    return np.asarray(rho * point - kappa * level - beta)


def _extrapolate(
    probe: Array,
    point: Array,
    h: Array,
    pieces: _Pieces,
    rho: float,
    kappa: float,
    flat_answer: float,
) -> Array:
    # Beyond the outermost point no breakpoint is left, so the free set seen at
    # a probe one unit further out holds all the way.
    free = (pieces.b_lo < probe) & (probe < pieces.b_hi)
    slope = rho - kappa * np.where(free, pieces.gamma, 0.0).sum(axis=0)
    flat = slope <= TINY_SLOPE
    with np.errstate(divide="ignore", invalid="ignore"):
        m = point - h / slope
    return np.where(flat, np.where(h == 0, point, flat_answer), m)
