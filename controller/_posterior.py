"""Small dense linear algebra for one agent's posterior, in plain Python.

The parameters are ``theta = (log A, gamma_1, ..., gamma_R)`` with ``R <= 3``,
so every matrix is at most 4 x 4. At that size plain Python floats beat numpy
(no array allocation per call), which is what keeps one learner update in the
tens of microseconds. Matrices are lists of rows. The exception is
:func:`project_many`, which projects a whole fleet's Thompson samples at once
and is worth numpy's overhead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Constraint slack when checking a projected point; far below any estimate's sd.
_TOLERANCE = 1e-12


def cholesky(matrix: Sequence[Sequence[float]]) -> list[list[float]]:
    """Return the lower Cholesky factor ``L`` (as rows) of a PD matrix."""
    size = len(matrix)
    lower = [[0.0] * size for _ in range(size)]
    for i in range(size):
        for j in range(i + 1):
            total = matrix[i][j] - sum(lower[i][k] * lower[j][k] for k in range(j))
            if i == j:
                # Rounding can only push a sum of PD terms to ~0, never below.
                lower[i][i] = math.sqrt(max(total, 1e-300))
            else:
                lower[i][j] = total / lower[j][j]
    return lower


def solve_small(matrix: Sequence[Sequence[float]], rhs: Sequence[float]) -> list[float]:
    """Solve a small dense positive definite system by Gaussian elimination.

    Partial pivoting, then back substitution. One and two unknowns (one or
    two resources: the common case, run after every update) are written out,
    with the same operations in the same order as :func:`_solve_general`, so
    every size rounds alike.
    """
    size = len(rhs)
    if size == 1:
        return [rhs[0] / matrix[0][0]]
    if size != 2:
        return _solve_general(matrix, rhs)

    (a, b), (c, d) = matrix
    e, f = rhs
    if abs(c) > abs(a):  # pivot on the larger first column entry
        a, b, e, c, d, f = c, d, f, a, b, e
    factor = c / a
    d -= factor * b
    f -= factor * e
    second = f / d
    return [(e - (0 + b * second)) / a, second]


def _solve_general(
    matrix: Sequence[Sequence[float]], rhs: Sequence[float]
) -> list[float]:
    size = len(rhs)
    a = [[*row, rhs[i]] for i, row in enumerate(matrix)]
    for col in range(size):
        pivot = max(range(col, size), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for row in range(col + 1, size):
            factor = a[row][col] / a[col][col]
            for k in range(col, size + 1):
                a[row][k] -= factor * a[col][k]

    out = [0.0] * size
    for i in range(size - 1, -1, -1):
        total = a[i][size] - sum(a[i][k] * out[k] for k in range(i + 1, size))
        out[i] = total / a[i][i]
    return out


def project_elasticities(
    mean: Sequence[float], covariance: Sequence[Sequence[float]], sum_max: float
) -> list[float]:
    """Project elasticities onto ``{g >= 0, sum(g) <= sum_max}``, posterior metric.

    Minimises ``(g - m)^T C^{-1} (g - m)`` where ``C`` is the posterior
    covariance of the elasticities: the most probable feasible point, not the
    nearest one in plain distance, so a direction the data pin down moves less
    than one they leave loose. The feasible set has ``R + 1`` faces; the
    optimum is the first active set whose equality-constrained minimiser is
    feasible with non-negative multipliers (KKT, sufficient for a convex
    quadratic), searched from the fewest active constraints up.
    """
    size = len(mean)
    if _feasible(mean, sum_max):
        return list(mean)

    for active in _active_sets(size):
        candidate = _face_minimiser(mean, covariance, sum_max, active)
        if candidate is not None:
            return _clean(candidate, sum_max)

    # Unreachable for a PD covariance (the vertex g = 0 always qualifies);
    # kept so that a numerical accident still yields a feasible point.
    return [0.0] * size


def project_many(
    mean: np.ndarray, covariance: np.ndarray, sum_max: np.ndarray
) -> np.ndarray:
    """:func:`project_elasticities` for a stack of posteriors at once.

    ``mean`` is ``(K, R)``, ``covariance`` ``(K, R, R)`` and ``sum_max``
    ``(K,)``. The same active-set search, one batched solve per active set
    for the rows still open, so a fleet's Thompson samples need no loop in
    Python; the points agree with the one-by-one projection up to rounding.
    """
    size = mean.shape[1]
    inside = (mean.min(axis=1) >= 0.0) & (mean.sum(axis=1) <= sum_max)
    out = np.where(inside[:, None], mean, 0.0)
    open_rows = np.flatnonzero(~inside)
    for active in _active_sets(size):
        if open_rows.size == 0:
            break
        # Each active constraint as a row of E g <= e, as in _face_minimiser.
        unit = -np.eye(size)
        rows = np.array([np.ones(size) if c == size else unit[c] for c in active])
        bounds = np.array([1.0 if c == size else 0.0 for c in active])
        m, cov, limit = mean[open_rows], covariance[open_rows], sum_max[open_rows]

        c_rows = np.einsum("ai,kij->kaj", rows, cov)  # E C, one row per constraint
        gram = np.einsum("kaj,bj->kab", c_rows, rows)
        excess = m @ rows.T - limit[:, None] * bounds
        multipliers = np.linalg.solve(gram, excess[..., None])[..., 0]
        point = m - np.einsum("ka,kaj->kj", multipliers, c_rows)
        done = (
            (multipliers.min(axis=1) >= -_TOLERANCE)
            & (point.min(axis=1) >= -1e-9)
            & (point.sum(axis=1) <= limit + 1e-9)
        )
        out[open_rows[done]] = point[done]
        open_rows = open_rows[~done]

    # Rows no face qualified for (a numerical accident) stay at the vertex 0.
    out = np.maximum(out, 0.0)
    total = out.sum(axis=1)
    over = total > sum_max
    out[over] = out[over] * sum_max[over, None] / total[over, None]
    return out


def _feasible(point: Sequence[float], sum_max: float) -> bool:
    return min(point) >= 0.0 and sum(point) <= sum_max


def _active_sets(size: int) -> list[tuple[int, ...]]:
    """All sets of at most ``size`` constraints; index ``size`` is the sum."""
    sets: list[tuple[int, ...]] = []

    def extend(chosen: tuple[int, ...], start: int, want: int) -> None:
        if len(chosen) == want:
            sets.append(chosen)
            return
        for index in range(start, size + 1):
            extend((*chosen, index), index + 1, want)

    for want in range(1, size + 1):
        extend((), 0, want)
    return sets


def _face_minimiser(
    mean: Sequence[float],
    covariance: Sequence[Sequence[float]],
    sum_max: float,
    active: tuple[int, ...],
) -> list[float] | None:
    """Minimise on the face where ``active`` constraints bind; None if not optimal."""
    size = len(mean)
    # Each active constraint as a row of E g <= e.
    rows = [[1.0] * size if c == size else _unit(size, c, -1.0) for c in active]
    bounds = [sum_max if c == size else 0.0 for c in active]

    c_rows = [[_dot(c_row, row) for c_row in covariance] for row in rows]
    gram = [[_dot(row, cr) for cr in c_rows] for row in rows]
    excess = [_dot(row, mean) - e for row, e in zip(rows, bounds, strict=True)]
    multipliers = solve_small(gram, excess)
    if min(multipliers) < -_TOLERANCE:
        return None

    point = [
        mean[i] - sum(mu * cr[i] for mu, cr in zip(multipliers, c_rows, strict=True))
        for i in range(size)
    ]
    if min(point) < -1e-9 or sum(point) > sum_max + 1e-9:
        return None
    return point


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _unit(size: int, index: int, value: float) -> list[float]:
    row = [0.0] * size
    row[index] = value
    return row


def _clean(point: list[float], sum_max: float) -> list[float]:
    """Remove the rounding residue so the point is feasible exactly."""
    point = [max(0.0, g) for g in point]
    total = sum(point)
    if total > sum_max:
        point = [g * sum_max / total for g in point]
    return point
