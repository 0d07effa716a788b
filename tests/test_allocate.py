"""The fair solver and the baselines: closed forms, edge cases and invariants.

The comparison with a general convex solver lives in
``test_allocate_reference.py``; here every expectation is either a closed form
worked out by hand or a property any optimum must have.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller._search import Point, find_crossing
from controller.allocate import (
    POLICIES,
    Allocation,
    allocate,
    capped_utility,
    fair_objective,
)
from controller.baselines import water_fill
from controller.errors import FairsynergyError
from controller.problem import Problem

INF = math.inf
FINITE_ALPHAS = (0.0, 0.5, 1.0, 2.0, 5.0)
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def fleet(
    seed: int,
    *,
    n: int = 5,
    r: int = 2,
    alpha: float = 1.0,
    boxes: bool = True,
    ceilings: bool = True,
) -> Problem:
    """A random fleet: concave elasticities, some floors, caps and low ceilings."""
    rng = np.random.default_rng(seed)
    gamma = rng.dirichlet(np.ones(r + 1), size=n)[:, :r] * rng.uniform(
        0.3, 0.95, (n, 1)
    )
    local = rng.uniform(0.0, 0.3, (n, r)) * (rng.uniform(size=(n, r)) > 0.2)
    floor = np.zeros((n, r))
    cap = np.full((n, r), INF)
    if boxes:
        floor = rng.uniform(0.0, 0.05, (n, r)) * (rng.uniform(size=(n, r)) > 0.6)
        capped = rng.uniform(size=(n, r)) > 0.7
        cap = np.where(capped, floor + rng.uniform(0.02, 0.8, (n, r)), INF)
    ceiling = rng.uniform(0.5, 1.2, n) if ceilings else np.full(n, 10.0)
    budget = rng.uniform(0.2, 2.0, r) * n / 2 + floor.sum(axis=0)
    return Problem.from_arrays(
        [f"r{k}" for k in range(r)],
        [f"agent-{i}" for i in range(n)],
        budget,
        rng.uniform(0.3, 1.5, n),
        gamma,
        local,
        weight=rng.uniform(0.5, 2.0, n),
        floor=floor,
        cap=cap,
        ceiling=ceiling,
        alpha=alpha,
    )


fleets = st.builds(
    fleet,
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 6),
    r=st.integers(1, 3),
    alpha=st.sampled_from(FINITE_ALPHAS),
    boxes=st.booleans(),
    ceilings=st.booleans(),
)
# Max-min is solved round by round with nested searches: smaller fleets.
max_min_fleets = st.builds(
    fleet,
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 4),
    r=st.integers(1, 2),
    alpha=st.just(INF),
    boxes=st.booleans(),
    ceilings=st.booleans(),
)


def assert_feasible(result: Allocation) -> None:
    """Budgets never exceeded, floors and caps respected, exactly."""
    p = result.problem
    assert (result.cloud.sum(axis=0) <= p.budget).all()
    assert all(
        math.fsum(column) <= b
        for column, b in zip(result.cloud.T, p.budget, strict=True)
    )
    assert (result.cloud >= p.floor).all()
    assert (result.cloud <= p.cap).all()


def objective_at(problem: Problem, cloud: np.ndarray) -> float:
    """The alpha-fair objective of any allocation."""
    return fair_objective(problem, capped_utility(problem, cloud))


# --- closed forms -------------------------------------------------------------


def test_allocate_proportional_fairness_matches_closed_form() -> None:
    """Test alpha = 1 with one resource: z_i = w_i gamma_i / lambda (water-filling)."""
    weight, gamma, local = np.array([1.0, 2.0, 1.5]), np.array([0.3, 0.5, 0.4]), 0.1
    problem = Problem.from_arrays(
        ["compute"], ["a", "b", "c"], [6.0], [0.5, 0.4, 0.3], gamma[:, None],
        np.full((3, 1), local), weight=weight, ceiling=np.full(3, 9.0),
    )  # fmt: skip

    result = allocate(problem)

    price = (weight * gamma).sum() / (6.0 + 3 * local)
    assert result.prices[0] == pytest.approx(price, rel=1e-10)
    assert result.cloud[:, 0] == pytest.approx(
        weight * gamma / price - local, rel=1e-10
    )


def test_allocate_identical_agents_get_identical_bundles() -> None:
    """Test symmetric agents share every resource equally, at any alpha."""
    for alpha in (*FINITE_ALPHAS, INF):
        problem = Problem.from_arrays(
            ["compute", "data"], ["a", "b", "c", "d"], [2.0, 1.0], np.full(4, 0.7),
            np.tile([0.3, 0.4], (4, 1)), np.full((4, 2), 0.05), alpha=alpha,
        )  # fmt: skip

        result = allocate(problem)

        assert result.cloud == pytest.approx(np.tile([0.5, 0.25], (4, 1)), rel=1e-9)


def test_allocate_linear_utilities_at_alpha_zero_fill_the_best_first() -> None:
    """Test alpha = 0, gamma = 1: greedy by scale up to each ceiling, ties split."""
    problem = Problem.from_arrays(
        ["compute"], ["low", "high-1", "high-2", "mid"], [1.5], [0.5, 2.0, 2.0, 1.0],
        np.ones((4, 1)), np.full((4, 1), 0.1), alpha=0.0,
    )  # fmt: skip

    result = allocate(problem)

    # The two scale-2 agents need 0.4 each to reach accuracy 1, "mid" needs
    # 0.9 and gets the remaining 0.7; "low" gets nothing. Price = mid's scale.
    assert result.cloud[:, 0] == pytest.approx([0.0, 0.4, 0.4, 0.7], abs=1e-12)
    assert result.objective == pytest.approx(1.0 * 0.1 * 0.5 + 1 + 1 + 0.8, rel=1e-10)
    assert result.prices[0] == pytest.approx(1.0, rel=1e-9)


def test_allocate_linear_homogeneous_two_resources_is_exact() -> None:
    """Test alpha = 0 with elasticities summing to 1 (demand jumps) stays optimal."""
    problem = Problem.from_arrays(
        ["compute", "data"], ["a", "b", "c"], [1.0, 1.2], [1.0, 1.5, 0.8],
        [[0.5, 0.5], [0.3, 0.7], [0.8, 0.2]], np.full((3, 2), 0.1), alpha=0.0,
    )  # fmt: skip

    result = allocate(problem)

    assert_feasible(result)
    assert result.certificate["relative_gap"] < 1e-9
    assert result.cloud.sum(axis=0) == pytest.approx([1.0, 1.2], rel=1e-10)


# --- degenerate cases ---------------------------------------------------------


def test_allocate_no_local_resources_still_gives_everyone_some() -> None:
    """Test local = 0 at alpha >= 1: every agent gets a positive amount."""
    for alpha in (1.0, 2.0, 5.0):
        problem = Problem.from_arrays(
            ["compute", "data"], ["a", "b", "c"], [1.0, 2.0], np.ones(3),
            [[0.3, 0.3], [0.5, 0.1], [0.2, 0.6]], np.zeros((3, 2)), alpha=alpha,
        )  # fmt: skip

        result = allocate(problem)

        assert (result.cloud > 0).all()
        assert math.isfinite(result.objective)
        assert result.certificate["relative_gap"] < 1e-9


def test_allocate_agent_that_can_never_gain_is_set_aside() -> None:
    """Test an agent needing a resource it can never get keeps its floors.

    Its utility is 0, so at alpha >= 1 the objective is -inf (printed as
    "-inf"), and the others are still shared the pool optimally.
    """
    problem = Problem.from_arrays(
        ["compute", "data"], ["starved", "b", "c"], [1.0, 0.0], np.ones(3),
        [[0.3, 0.3], [0.5, 0.0], [0.2, 0.6]], [[0.0, 0.0], [0.0, 0.0], [0.0, 0.1]],
        floor=[[0.2, 0.0], [0.0, 0.0], [0.0, 0.0]], alpha=1.0,
    )  # fmt: skip

    result = allocate(problem)
    others = allocate(
        Problem.from_arrays(
            ["compute", "data"],
            ["b", "c"],
            [0.8, 0.0],
            np.ones(2),
            [[0.5, 0.0], [0.2, 0.6]],
            [[0.0, 0.0], [0.0, 0.1]],
        )
    )

    assert result.cloud[0].tolist() == [0.2, 0.0]
    assert result.utility[0] == 0.0
    assert result.objective == -math.inf
    assert result.to_json()["objective"] == "-inf"
    assert result.cloud[1:] == pytest.approx(others.cloud, rel=1e-10)


def test_allocate_zero_budget_leaves_everyone_at_floors() -> None:
    """Test a budget of 0 hands out nothing, priced at the top marginal value."""
    problem = Problem.from_arrays(
        ["compute"], ["a", "b"], [0.0], [1.0, 1.0], [[0.5], [0.4]], [[0.1], [0.2]]
    )

    result = allocate(problem)

    assert result.cloud.tolist() == [[0.0], [0.0]]
    assert result.prices[0] == pytest.approx(max(0.5 / 0.1, 0.4 / 0.2))


def test_allocate_floors_that_fill_the_budget_are_granted() -> None:
    """Test floors adding up to the budget are exactly what agents get."""
    floor = [[0.5, 0.2], [0.5, 0.1]]
    problem = Problem.from_arrays(
        ["compute", "data"], ["a", "b"], [1.0, 1.0], [1.0, 1.0],
        np.full((2, 2), 0.4), np.full((2, 2), 0.1), floor=floor,
    )  # fmt: skip

    result = allocate(problem)

    assert result.cloud[:, 0].tolist() == [0.5, 0.5]
    assert result.cloud[:, 1].sum() == pytest.approx(1.0, rel=1e-10)


def test_allocate_everyone_capped_leaves_budget_unused() -> None:
    """Test spare budget is reported, at price 0, when every agent is capped."""
    problem = Problem.from_arrays(
        ["compute"], ["a", "b", "c"], [10.0], np.full(3, 0.5), np.full((3, 1), 0.5),
        np.full((3, 1), 0.1), cap=np.full((3, 1), 1.0),
    )  # fmt: skip

    for alpha in (0.0, 1.0, INF):
        result = allocate(problem.with_alpha(alpha))

        assert result.cloud[:, 0].tolist() == [1.0, 1.0, 1.0]
        assert result.unused[0] == pytest.approx(7.0)
        assert result.prices[0] == 0.0


def test_allocate_everyone_at_ceiling_leaves_budget_unused() -> None:
    """Test all agents reaching their ceiling jointly: prices 0, spare reported."""
    problem = Problem.from_arrays(
        ["compute", "data"], ["a", "b"], [20.0, 20.0], [1.0, 1.0],
        np.full((2, 2), 0.3), np.full((2, 2), 0.01),
    )  # fmt: skip

    for alpha in (0.0, 1.0, 2.0, INF):
        result = allocate(problem.with_alpha(alpha))

        assert result.utility == pytest.approx([1.0, 1.0], rel=1e-10)
        assert result.prices.tolist() == [0.0, 0.0]
        assert (result.unused > 10.0).all()
        assert_feasible(result)


def test_allocate_agent_without_elasticity_keeps_its_floor() -> None:
    """Test an agent that gains nothing from a resource gets only its floor."""
    problem = Problem.from_arrays(
        ["compute", "data"], ["a", "indifferent", "c"], [1.0, 1.0], np.ones(3),
        [[0.3, 0.3], [0.0, 0.4], [0.2, 0.6]], np.full((3, 2), 0.05),
        floor=[[0.0, 0.0], [0.1, 0.0], [0.0, 0.0]], alpha=2.0,
    )  # fmt: skip

    result = allocate(problem)

    assert result.cloud[1, 0] == 0.1
    assert result.cloud[1, 1] > 0


def test_allocate_elasticities_a_rounding_error_above_one_are_accepted() -> None:
    """Test a row summing to 1 + 1e-13 is solved as if it summed to 1."""
    gamma = np.array([[0.6, 0.4 + 1e-13], [0.5, 0.3]])
    problem = Problem.from_arrays(
        ["compute", "data"], ["a", "b"], [1.0, 1.0], [0.5, 0.5], gamma,
        np.full((2, 2), 0.1), alpha=0.0,
    )  # fmt: skip

    result = allocate(problem)

    assert_feasible(result)
    assert result.certificate["relative_gap"] < 1e-9


# --- max-min and leximin ------------------------------------------------------


def test_allocate_max_min_equalises_the_rising_agents() -> None:
    """Test alpha = inf with one resource: everyone at the same utility."""
    problem = Problem.from_arrays(
        ["compute"], ["a", "b", "c"], [3.0], [0.5, 0.7, 0.9], [[0.5], [0.3], [0.4]],
        np.full((3, 1), 0.1), alpha=INF,
    )  # fmt: skip

    result = allocate(problem)

    assert result.utility == pytest.approx(np.full(3, result.objective), rel=1e-10)
    assert result.cloud.sum() == pytest.approx(3.0, rel=1e-10)


def test_allocate_leximin_lifts_the_others_past_a_capped_agent() -> None:
    """Test an agent held back by its cap does not hold back the rest."""
    problem = Problem.from_arrays(
        ["compute"], ["capped", "b", "c"], [3.0], [0.5, 0.5, 0.5],
        np.full((3, 1), 0.5), np.full((3, 1), 0.1), cap=[[0.2], [INF], [INF]],
        alpha=INF,
    )  # fmt: skip

    result = allocate(problem)

    assert result.cloud[0, 0] == pytest.approx(0.2, rel=1e-10)
    assert result.objective == pytest.approx(0.5 * math.sqrt(0.3), rel=1e-10)
    assert result.cloud[1:, 0] == pytest.approx([1.4, 1.4], rel=1e-10)


def test_allocate_leximin_ignores_weights() -> None:
    """Test weights play no part at alpha = inf (the limit of alpha-fairness)."""
    base = fleet(3, r=1, alpha=INF)
    heavy = Problem.from_arrays(
        base.resources, base.agents, base.budget, base.scale, base.elasticity,
        base.local, weight=np.arange(1.0, 6.0), floor=base.floor, cap=base.cap,
        ceiling=base.ceiling, alpha=INF,
    )  # fmt: skip

    assert allocate(heavy).cloud == pytest.approx(allocate(base).cloud, rel=1e-9)


# --- API, JSON and baselines --------------------------------------------------


def test_allocate_json_is_strict_and_names_everything() -> None:
    """Test to_json uses ids and resource names and never emits NaN or Infinity."""
    problem = fleet(1, n=3, alpha=INF)

    for policy in POLICIES:
        document = allocate(problem, policy).to_json()
        text = json.dumps(document, allow_nan=False)

        assert json.loads(text)["alpha"] == "inf"
        assert set(document["allocations"]) == set(problem.agents)
        assert set(document["allocations"]["agent-0"]) == set(problem.resources)
        assert set(document) >= {
            "policy", "alpha", "objective", "allocations", "utility", "prices",
            "unused", "certificate", "solve_seconds", "summary",
        }  # fmt: skip
    assert allocate(problem, "uniform").to_json()["prices"]["r0"] is None


def test_allocate_unknown_policy_is_refused() -> None:
    """Test an unknown policy names the valid ones."""
    with pytest.raises(FairsynergyError, match="equal-totals"):
        allocate(fleet(0), "greedy")


def test_allocate_warm_start_changes_work_not_answer() -> None:
    """Test solving again from the previous prices gives the same allocation."""
    problem = fleet(7, n=6, r=3, alpha=2.0)
    cold = allocate(problem)

    warm = allocate(problem, prices=cold.prices)

    assert warm.cloud == pytest.approx(cold.cloud, rel=1e-9, abs=1e-12)
    assert warm.certificate["iterations"] <= cold.certificate["iterations"]
    with pytest.raises(FairsynergyError, match="prices: shape"):
        allocate(problem, prices=np.ones(2))


def test_allocate_capped_utility_and_objective_formulas() -> None:
    """Test v = min(ceiling, A prod z^gamma) (0^0 = 1) and the alpha-fair sums."""
    problem = Problem.from_arrays(
        ["compute", "data"], ["a", "b"], [1.0, 1.0], [2.0, 1.0],
        [[0.5, 0.0], [0.5, 0.5]], [[0.0, 0.0], [0.0, 0.0]], weight=[1.0, 3.0],
        ceiling=[1.0, 0.4],
    )  # fmt: skip
    cloud = np.array([[0.04, 0.0], [0.25, 1.0]])

    v = capped_utility(problem, cloud)

    assert v.tolist() == pytest.approx([0.4, 0.4])
    assert fair_objective(problem, v) == pytest.approx(4 * math.log(0.4))
    assert fair_objective(problem.with_alpha(0), v) == pytest.approx(1.6)
    assert fair_objective(problem.with_alpha(2), v) == pytest.approx(-4 / 0.4)
    assert fair_objective(problem.with_alpha(INF), v) == pytest.approx(0.4)


def test_allocate_uniform_splits_equally_around_caps() -> None:
    """Test uniform gives B/N, and a capped agent's excess goes to the others."""
    problem = Problem.from_arrays(
        ["compute"], ["a", "b", "c"], [3.0], np.ones(3), np.full((3, 1), 0.5),
        np.zeros((3, 1)), cap=[[0.4], [INF], [INF]],
    )  # fmt: skip

    result = allocate(problem, "uniform")

    assert result.cloud[:, 0] == pytest.approx([0.4, 1.3, 1.3], rel=1e-10)
    assert math.isnan(result.prices[0])


def test_allocate_random_is_seeded_and_spends_the_budget() -> None:
    """Test random shares repeat for a seed, differ across seeds, use all budget."""
    problem = fleet(2, n=6, boxes=False)

    first = allocate(problem, "random", seed=5)
    again = allocate(problem, "random", seed=5)
    other = allocate(problem, "random", seed=6)

    assert np.array_equal(first.cloud, again.cloud)
    assert not np.allclose(first.cloud, other.cloud)
    assert first.cloud.sum(axis=0) == pytest.approx(problem.budget, rel=1e-10)


def test_allocate_equal_totals_evens_out_local_plus_cloud() -> None:
    """Test the "standard NUM" baseline levels local + cloud across agents."""
    problem = Problem.from_arrays(
        ["compute"], ["rich", "b", "c"], [1.0], np.ones(3), np.full((3, 1), 0.5),
        [[1.0], [0.1], [0.2]],
    )  # fmt: skip

    result = allocate(problem, "equal-totals")

    assert result.cloud[:, 0] == pytest.approx([0.0, 0.55, 0.45], rel=1e-10)


def test_allocate_water_fill_meets_floors_caps_and_budget() -> None:
    """Test water-filling is exact with floors, caps and uneven rates."""
    cloud = water_fill(
        rate=np.array([1.0, 2.0, 1.0]),
        offset=np.zeros(3),
        floor=np.array([0.5, 0.0, 0.0]),
        cap=np.array([INF, 0.6, INF]),
        budget=2.0,
    )

    # k = 0.7: a = max(0.5, 0.7), b = min(0.6, 1.4), c = 0.7.
    assert cloud == pytest.approx([0.7, 0.6, 0.7], rel=1e-10)


def test_allocate_sequential_is_fair_when_resources_separate() -> None:
    """Test at alpha = 1 without binding ceilings the per-resource steps are exact."""
    problem = fleet(4, n=5, r=2, alpha=1.0, boxes=False, ceilings=False)

    sequential, fair = allocate(problem, "sequential"), allocate(problem)

    assert sequential.cloud == pytest.approx(fair.cloud, rel=1e-9)
    assert sequential.prices == pytest.approx(fair.prices, rel=1e-9)


def test_allocate_sequential_falls_short_when_resources_interact() -> None:
    """Test one pass, one resource at a time, is not the joint optimum at alpha 2."""
    problem = fleet(4, n=5, r=2, alpha=2.0, boxes=False, ceilings=False)

    sequential, fair = allocate(problem, "sequential"), allocate(problem)

    assert sequential.objective < fair.objective - 1e-6


def test_allocate_crossing_blends_the_two_sides_of_a_jump() -> None:
    """Test the 1-D search returns the exact mix across a jump in f."""
    from controller._search import Blend

    def evaluate(x: float) -> Point:
        f = 1.0 if x < 0.3 else -2.0
        return Point(x, f, math.nan, Blend.single(np.array([f]), np.array([x])))

    blend = find_crossing(evaluate, 0.0, x_min=-5, x_max=5, xtol=1e-12, ftol=0.0)

    assert blend.demand[0] == pytest.approx(0.0, abs=1e-12)
    assert sum(weight for weight, _ in blend.parts) == pytest.approx(1.0)
    assert all(abs(key[0] - 0.3) < 1e-11 for _, key in blend.parts)


def test_allocate_large_fleet_solves_with_a_certificate() -> None:
    """Test 20,000 agents with 3 resources solve to a tight certificate quickly."""
    problem = fleet(9, n=20_000, r=3, alpha=2.0)

    result = allocate(problem)

    assert_feasible(result)
    assert result.certificate["relative_gap"] < 1e-9
    assert result.certificate["budget_residual"] < 1e-9
    assert result.certificate["solve_seconds"] < 10


# --- properties ---------------------------------------------------------------


@PROPERTY
@given(problem=st.one_of(fleets, max_min_fleets))
def test_allocate_every_policy_is_feasible(problem: Problem) -> None:
    """Test no policy exceeds a budget or leaves a floor or cap, at any alpha."""
    for policy in POLICIES:
        assert_feasible(allocate(problem, policy, seed=1))


@PROPERTY
@given(problem=fleets, data=st.data())
def test_allocate_no_small_transfer_improves_the_fair_objective(
    problem: Problem, data: st.DataObject
) -> None:
    """Test moving a little of a resource between agents (or from spare) never helps."""
    result = allocate(problem)
    i = data.draw(st.integers(0, problem.n_agents - 1))
    j = data.draw(st.integers(0, problem.n_agents - 1))
    r = data.draw(st.integers(0, problem.n_resources - 1))
    step = 1e-6 * max(problem.budget[r], 1e-3)
    moved = result.cloud.copy()
    if i != j and moved[i, r] - step >= problem.floor[i, r]:
        moved[i, r] -= step
    elif result.unused[r] < step:
        return
    if moved[j, r] + step > problem.cap[j, r]:
        return
    moved[j, r] += step

    change = objective_at(problem, moved) - result.objective

    assert change <= 1e-9 * (1 + abs(result.objective))


@PROPERTY
@given(problem=fleets)
def test_allocate_more_budget_never_hurts(problem: Problem) -> None:
    """Test the fair objective is monotone in every budget."""
    richer = Problem.from_arrays(
        problem.resources, problem.agents, problem.budget * 1.2, problem.scale,
        problem.elasticity, problem.local, weight=problem.weight,
        floor=problem.floor, cap=problem.cap, ceiling=problem.ceiling,
        alpha=problem.alpha,
    )  # fmt: skip

    before, after = allocate(problem).objective, allocate(richer).objective

    assert after >= before - 1e-9 * (1 + abs(before))


@PROPERTY
@given(problem=fleets)
def test_allocate_prices_are_non_negative_and_zero_on_spare_budget(
    problem: Problem,
) -> None:
    """Test dual prices are >= 0, and 0 wherever budget is left over."""
    result = allocate(problem)

    assert (result.prices >= 0).all()
    spare = result.unused > 1e-9 * np.maximum(problem.budget, 1.0)
    assert (result.prices[spare] == 0).all()


@PROPERTY
@given(problem=fleets, seed=st.integers(0, 1000))
def test_allocate_agent_order_does_not_matter(problem: Problem, seed: int) -> None:
    """Test permuting the agents permutes the fair allocation and keeps the optimum."""
    order = np.random.default_rng(seed).permutation(problem.n_agents)
    shuffled = Problem.from_arrays(
        problem.resources, [problem.agents[k] for k in order], problem.budget,
        problem.scale[order], problem.elasticity[order], problem.local[order],
        weight=problem.weight[order], floor=problem.floor[order],
        cap=problem.cap[order], ceiling=problem.ceiling[order], alpha=problem.alpha,
    )  # fmt: skip

    original, permuted = allocate(problem), allocate(shuffled)

    assert permuted.objective == pytest.approx(original.objective, rel=1e-9, abs=1e-12)
    assert permuted.utility == pytest.approx(original.utility[order], rel=1e-6)


@PROPERTY
@given(problem=max_min_fleets)
def test_allocate_max_min_beats_every_baseline_on_the_worst_agent(
    problem: Problem,
) -> None:
    """Test at alpha = inf the worst agent does at least as well as any baseline's."""
    best = allocate(problem).objective

    for policy in POLICIES[1:]:
        assert best >= allocate(problem, policy, seed=3).utility.min() - 1e-12
