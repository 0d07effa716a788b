"""Robust one-dimensional price searches, nested for several resources.

Both solvers end up looking for the point where a monotone quantity (excess
demand of a resource, or the value of a bundle) crosses zero. Demand is only
piecewise smooth and can even jump (alpha = 0 with elasticities summing to 1:
an agent flips from buying nothing to buying up to its ceiling at one price).
:func:`find_crossing` copes with both: it brackets the crossing, narrows the
bracket with Newton or Illinois steps (falling back to bisection), and at a
jump returns the convex combination of the two sides that clears exactly.

A :class:`Blend` is such a combination of evaluated points. Every agent's
allocation in the blend is the same combination of its allocations at those
points, so blending keeps floors, caps and (by concavity) utility levels, and
clears the budget exactly where the points straddle it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from controller._response import Array

# An evaluated point: the full log-price vector, plus the log level for max-min.
Key = Array


@dataclass(frozen=True)
class Blend:
    """A convex combination of evaluated points and its aggregate demand."""

    demand: Array
    parts: tuple[tuple[float, Key], ...]

    @classmethod
    def single(cls, demand: Array, key: Key) -> Blend:
        """One evaluated point with weight 1."""
        return cls(demand=demand, parts=((1.0, key),))

    def mix(self, other: Blend, theta: float) -> Blend:
        """``theta * self + (1 - theta) * other``."""
        parts = tuple((theta * w, k) for w, k in self.parts if theta * w > 0)
        parts += tuple(
            ((1 - theta) * w, k) for w, k in other.parts if (1 - theta) * w > 0
        )
        demand = theta * self.demand + (1 - theta) * other.demand
        return Blend(demand=demand, parts=parts)


@dataclass(frozen=True)
class Point:
    """The searched function at ``x``: value ``f``, slope if known, and blend."""

    x: float
    f: float
    slope: float
    blend: Blend


def find_crossing(
    evaluate: Callable[[float], Point],
    x0: float,
    *,
    x_min: float,
    x_max: float,
    xtol: float,
    ftol: float,
    max_evals: int = 200,
) -> Blend:
    """Where a non-increasing ``f(x)`` crosses zero on ``[x_min, x_max]``.

    Returns the blend of a point with ``|f| <= ftol``, or of the two ends of a
    bracket narrower than ``xtol`` mixed so that ``f`` is zero, or the end of
    the interval when ``f`` keeps one sign on all of it (``x_min`` if ``f <= 0``
    there, ``x_max`` if ``f >= 0`` there).
    """
    first = evaluate(min(max(x0, x_min), x_max))
    if abs(first.f) <= ftol or _newton_done(first, xtol):
        return first.blend
    bracket = _bracket(evaluate, first, x_min, x_max)
    if isinstance(bracket, Blend):
        return bracket
    high, low = bracket
    return _narrow(evaluate, high, low, xtol, ftol, max_evals)


def _bracket(
    evaluate: Callable[[float], Point], first: Point, x_min: float, x_max: float
) -> tuple[Point, Point] | Blend:
    # Walk away from the first point in doubling steps until f changes sign.
    direction = 1.0 if first.f > 0 else -1.0
    limit = x_max if direction > 0 else x_min
    step, previous = 1.0, first
    while True:
        x = previous.x + direction * step
        x = min(x, limit) if direction > 0 else max(x, limit)
        point = evaluate(x)
        if (point.f <= 0) if direction > 0 else (point.f >= 0):
            return (previous, point) if direction > 0 else (point, previous)
        if x == limit:
            return point.blend
        previous, step = point, step * 2.0


def _narrow(
    evaluate: Callable[[float], Point],
    high: Point,
    low: Point,
    xtol: float,
    ftol: float,
    max_evals: int,
) -> Blend:
    # high.f > 0 > low.f and high.x < low.x. Newton while it keeps halving |f|
    # (with the slope of the point, or else the secant through the last two
    # points on the same side, which is exact where f is linear on that side
    # even if it has a kink at the root); otherwise Illinois false position,
    # and a bisection whenever the bracket failed to halve over three steps.
    f_high, f_low = high.f, low.f
    latest = high if abs(high.f) < abs(low.f) else low
    sides: dict[bool, Point] = {}
    trust_newton, gaps = True, [low.x - high.x]
    for _ in range(max_evals):
        if low.x - high.x <= xtol:
            break
        x = None
        if trust_newton:
            x = _newton_guess(
                _with_slope(latest, sides.get(latest.f > 0)), high.x, low.x
            )
        if x is None:
            x = (high.x * f_low - low.x * f_high) / (f_low - f_high)
            stalled = len(gaps) >= 4 and gaps[-1] > 0.5 * gaps[-4]
            if stalled or not high.x < x < low.x:
                x = 0.5 * (high.x + low.x)
        previous, latest = latest, evaluate(x)
        if abs(latest.f) <= ftol or _newton_done(latest, xtol):
            return latest.blend
        trust_newton = abs(latest.f) <= 0.5 * abs(previous.f)
        if latest.f > 0:
            sides[True], high, f_high, f_low = high, latest, latest.f, 0.5 * f_low
        else:
            sides[False], low, f_low, f_high = low, latest, latest.f, 0.5 * f_high
        gaps.append(low.x - high.x)
    theta = -low.f / (high.f - low.f)
    return high.blend.mix(low.blend, theta)


def _with_slope(point: Point, before: Point | None) -> Point:
    # A point without a known slope borrows the secant slope to the previous
    # point on its side of the root.
    if math.isfinite(point.slope) or before is None or before.x == point.x:
        return point
    slope = (point.f - before.f) / (point.x - before.x)
    return Point(point.x, point.f, slope, point.blend)


def _newton_done(point: Point, xtol: float) -> bool:
    # The root is within xtol of a point whose slope is known and reliable.
    slope = point.slope
    return math.isfinite(slope) and slope < 0 and abs(point.f / slope) <= xtol


def _newton_guess(point: Point, lo: float, hi: float) -> float | None:
    if not (math.isfinite(point.slope) and point.slope < 0):
        return None
    x = point.x - point.f / point.slope
    return x if lo < x < hi else None


def nested_search(
    levels: Sequence[int],
    start: Array,
    inner: Callable[[Array], tuple[Blend, float]],
    target: Array,
    *,
    x_min: Array,
    x_max: Array,
    xtol: float,
    ftol: Array,
    measure: Callable[[Blend, int], float] | None = None,
) -> Blend:
    """Clear several resources by nesting one-dimensional searches.

    ``levels`` lists the coordinates of ``start`` to search, outermost first;
    for each value of an outer coordinate the inner ones are cleared again.
    ``inner(key)`` evaluates one point and returns its blend and the slope of
    the innermost coordinate's excess demand (``nan`` if unknown). Each search
    drives ``blend.demand[level] - target[level]`` to zero, or
    ``measure(blend, level)`` when given (a function with the same sign and
    zero, better conditioned). Exact but costly
    (``O(evaluations ** len(levels))``): the fallback when Newton's method
    cannot be trusted.
    """
    current = start.copy()

    def solve(depth: int) -> Blend:
        q = levels[depth]

        def evaluate(x: float) -> Point:
            current[q] = x
            if depth + 1 < len(levels):
                blend, slope = solve(depth + 1), math.nan
            else:
                blend, slope = inner(current.copy())
            f = blend.demand[q] - target[q] if measure is None else measure(blend, q)
            return Point(x, float(f), slope, blend)

        return find_crossing(
            evaluate,
            float(current[q]),
            x_min=float(x_min[q]),
            x_max=float(x_max[q]),
            xtol=xtol,
            ftol=float(ftol[q]),
        )

    return solve(0)
