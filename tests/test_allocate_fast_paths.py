"""The allocator's shortcuts agree with its general path.

Best responses can start from the response at nearby prices (a warm start),
and at alpha = 1 the multiplier is solved outright. Both must give what the
cold, general computation gives, also where the clipped coordinates change
and the later tiers take over.
"""

from __future__ import annotations

import numpy as np
import pytest

from controller import _dual
from controller._response import Market, best_response

TOL = 1e-12


def _market(seed: int, alpha: float, n: int = 200, r: int = 3) -> Market:
    # Floors, caps and low ceilings bind for some agents at the test prices.
    rng = np.random.default_rng(seed)
    gamma = rng.dirichlet(np.ones(r + 1), size=n)[:, :r] * rng.uniform(
        0.3, 0.95, (n, 1)
    )
    floor = np.where(rng.random((n, r)) < 0.3, rng.uniform(0.0, 0.05, (n, r)), 0.0)
    cap = np.where(
        rng.random((n, r)) < 0.3, floor + rng.uniform(0.0, 0.5, (n, r)), np.inf
    )
    return Market.build(
        alpha=alpha,
        budget=np.full(r, 0.2 * n),
        scale=rng.uniform(0.5, 1.0, n),
        gamma=gamma,
        local=rng.uniform(0.0, 0.1, (n, r)),
        weight=rng.uniform(0.5, 2.0, n),
        floor=floor,
        cap=cap,
        ceiling=rng.uniform(0.2, 1.0, n),
    )


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("shift", [1e-6, 0.05, 1.5])
def test_allocate_fast_paths_warm_start_matches_cold(
    alpha: float, shift: float
) -> None:
    """Test a response warm-started at nearby or far prices equals the cold one."""
    market = _market(seed=7, alpha=alpha)
    rng = np.random.default_rng(11)
    log_price = rng.normal(0.0, 1.0, market.n_resources)
    before = best_response(market, log_price - shift * rng.normal(size=3))

    warm = best_response(market, log_price, before)
    cold = best_response(market, log_price)

    np.testing.assert_allclose(warm.cloud, cold.cloud, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(warm.log_u, cold.log_u, rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(warm.at_ceiling, cold.at_ceiling)


def test_allocate_fast_paths_warm_start_hands_over_to_later_tiers() -> None:
    """Test a far warm start still gives the exact response (later tiers used)."""
    market = _market(seed=3, alpha=3.0)
    log_price = np.array([0.2, -0.4, 0.1])
    far = best_response(market, log_price + 6.0)

    warm = best_response(market, log_price, far)
    cold = best_response(market, log_price)

    assert far.piece is not None
    assert cold.piece is not None
    assert not np.array_equal(far.piece.low, cold.piece.low)
    np.testing.assert_allclose(warm.cloud, cold.cloud, rtol=TOL, atol=TOL)


def test_allocate_fast_paths_alpha_one_multiplier_is_the_weight() -> None:
    """Test at alpha = 1 the demand multiplier is log w, for every agent."""
    market = _market(seed=5, alpha=1.0)

    response = best_response(market, np.array([0.3, -0.2, 0.5]))

    below = ~response.at_ceiling
    assert below.any()
    np.testing.assert_array_equal(response.log_m[below], market.log_weight[below])
    assert response.piece is None


def test_allocate_fast_paths_no_warm_start_where_demand_can_jump() -> None:
    """Test alpha = 0 with elasticities summing to 1 ignores the warm start."""
    market = Market.build(
        alpha=0.0, budget=np.array([1.0, 1.0]), scale=np.array([0.5, 0.5]),
        gamma=np.array([[0.6, 0.4], [0.5, 0.3]]), local=np.full((2, 2), 0.1),
        weight=np.ones(2), floor=np.zeros((2, 2)), cap=np.full((2, 2), np.inf),
        ceiling=np.ones(2),
    )  # fmt: skip
    log_price = np.array([-1.2, -1.6])
    other = best_response(market, log_price + 0.3)

    warm = best_response(market, log_price, other)
    cold = best_response(market, log_price)

    assert not market.steep
    assert other.piece is None
    np.testing.assert_array_equal(warm.cloud, cold.cloud)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_allocate_fast_paths_one_resource_newton_matches_nested_search(
    alpha: float,
) -> None:
    """Test Newton's method on one priced resource finds the nested search's price."""
    market = _market(seed=13, alpha=alpha, r=1)
    prepared = _dual.prepare(market)
    start = _dual.first_log_price(market)
    dual = _dual._Dual(prepared, start - _dual.PRICE_RANGE)

    blend, fallback = _dual._search(dual, start, start + 2 * _dual.PRICE_RANGE)
    nested = _dual._nested(dual, start, start + 2 * _dual.PRICE_RANGE)

    assert fallback == 0.0
    assert len(blend.parts) == 1
    newton_price = blend.parts[0][1]
    nested_price = sum(weight * key for weight, key in nested.parts)
    np.testing.assert_allclose(newton_price, nested_price, rtol=0, atol=1e-11)
    np.testing.assert_allclose(blend.demand, nested.demand, rtol=1e-11)
