"""Transitions between allocations never over-commit the pool."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.publish import GrantLedger, plan_transition

RESOURCES = ("compute", "data")


def feasible(rng: np.random.Generator, agents: int, budget: np.ndarray) -> np.ndarray:
    """A random allocation that uses at most the budget."""
    shares = rng.dirichlet(np.ones(agents + 1), size=len(budget)).T[:agents]
    return np.asarray(shares * budget, dtype=float)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    agents=st.integers(1, 12),
    hysteresis=st.sampled_from([0.0, 0.01, 0.1]),
)
def test_plan_transition_never_exceeds_budget(seed, agents, hysteresis):
    """Whatever the old and new allocations, held amounts stay within budget."""
    rng = np.random.default_rng(seed)
    budget = rng.uniform(0.5, 10.0, size=2)
    current = feasible(rng, agents, budget)
    held = current + feasible(rng, agents, budget - current.sum(axis=0))
    target = feasible(rng, agents, budget)

    step = plan_transition(budget, target, held, current, hysteresis=hysteresis)

    after = np.maximum(held, step.cloud).sum(axis=0)
    assert np.all(after <= budget)
    assert np.all(step.over_budget == 0.0)


def test_plan_transition_shrinks_first_then_grows():
    """With no slack, growers wait while shrinkers get their new amount at once."""
    budget = np.array([10.0])
    current = np.array([[6.0], [4.0]])
    target = np.array([[2.0], [8.0]])

    step = plan_transition(budget, target, current, current, hysteresis=0.0)

    assert step.cloud.tolist() == [[2.0], [4.0]]
    assert step.publish.tolist() == [True, False]
    assert not step.complete


def test_plan_transition_shares_partial_slack_by_growth():
    """Free slack is split among growers in proportion to how much they grow."""
    budget = np.array([10.0])
    current = np.array([[1.0], [1.0], [6.0]])
    target = np.array([[4.0], [2.0], [4.0]])

    step = plan_transition(budget, target, current, current, hysteresis=0.0)

    # slack 2 for a demand of 3 + 1: growers get 2/4 of their growth
    np.testing.assert_allclose(step.cloud[:, 0], [2.5, 1.5, 4.0])


def test_plan_transition_skips_moves_inside_hysteresis_band():
    """Tiny changes are not published; large ones are."""
    budget = np.array([10.0, 10.0])
    current = np.array([[5.0, 5.0], [5.0, 5.0]])
    target = np.array([[5.05, 5.0], [3.0, 5.0]])

    step = plan_transition(budget, target, current, current, hysteresis=0.05)

    assert step.publish.tolist() == [False, True]


def test_plan_transition_reports_budget_cut_below_holdings():
    """A budget cut below what agents hold is reported, and shrinks go out at once."""
    budget = np.array([5.0])
    current = np.array([[5.0], [5.0]])
    target = np.array([[2.5], [2.5]])

    step = plan_transition(budget, target, current, current, hysteresis=0.0)

    assert step.publish.tolist() == [True, True]
    np.testing.assert_allclose(step.over_budget, [5.0])


def test_ledger_converges_after_acknowledgements():
    """Publishing, acknowledging and re-planning reaches the target within budget."""
    ledger = GrantLedger()
    agents = ["a", "b", "c"]
    budget = np.array([9.0, 3.0])
    for agent, amounts in zip(agents, [(6, 1), (2, 1), (1, 1)], strict=True):
        ledger.grant(agent, 1, dict(zip(RESOURCES, amounts, strict=True)), 0.0, 5.0)
        ledger.acknowledge(agent, 1)
    target = np.array([[1.0, 1.0], [4.0, 0.5], [4.0, 1.5]])

    for epoch in range(2, 6):
        held = ledger.held(agents, RESOURCES)
        current = ledger.current(agents, RESOURCES)
        step = plan_transition(budget, target, held, current, hysteresis=0.0)
        for row in np.flatnonzero(step.publish):
            cloud = dict(zip(RESOURCES, step.cloud[row].tolist(), strict=True))
            ledger.grant(agents[row], epoch, cloud, float(epoch), 5.0)
        held_after = ledger.held(agents, RESOURCES).sum(axis=0)
        assert np.all(held_after <= budget + 1e-9)
        for agent in agents:
            ledger.acknowledge(agent, epoch)

    np.testing.assert_allclose(ledger.current(agents, RESOURCES), target)


def test_ledger_drops_old_grant_when_deadline_passes():
    """An agent that never acknowledges is counted at its new grant after expiry."""
    ledger = GrantLedger()
    ledger.grant("a", 1, {"compute": 5.0}, now=0.0, ack_timeout=10.0)
    ledger.grant("a", 2, {"compute": 1.0}, now=1.0, ack_timeout=10.0)

    before = ledger.held(["a"], ["compute"])[0, 0]
    released = ledger.expire(now=11.5)
    after = ledger.held(["a"], ["compute"])[0, 0]

    assert (before, released, after) == (5.0, True, 1.0)


def test_ledger_release_frees_everything():
    """A departed agent holds nothing."""
    ledger = GrantLedger()
    ledger.grant("a", 1, {"compute": 5.0}, now=0.0, ack_timeout=10.0)

    ledger.release("a")

    assert ledger.total_held(["compute"]) == {"compute": 0.0}
