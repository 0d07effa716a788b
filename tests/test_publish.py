"""Transitions between allocations never over-commit the pool."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.publish import Grant, GrantLedger, plan_transition

RESOURCES = ("compute", "data")
LEASE = 60.0


def lease(epoch: int, cloud: dict[str, float], now: float = 0.0) -> Grant:
    """A grant published at ``now`` with the usual lease."""
    return Grant(epoch, cloud, published_at=now, expires=now + LEASE)


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


def test_plan_transition_grants_whole_growth_smallest_first():
    """Slack goes whole to the smallest growers that fit, the rest in proportion."""
    budget = np.array([10.5, 10.5])
    current = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [6.0, 6.0]])
    target = np.array([[2.0, 2.0], [4.0, 1.5], [1.5, 3.0], [2.0, 2.0]])

    step = plan_transition(budget, target, current, current, hysteresis=0.0)

    # slack (1.5, 1.5): growths (1, 1), (0.5, 2), (3, 0.5) in that order; the
    # first fits whole, and the (0.5, 0.5) left goes to the other two
    # growers in proportion to (3.5, 2.5)
    rest = np.array([[3.0, 0.5], [0.5, 2.0]]) * (0.5 / np.array([3.5, 2.5]))
    assert step.cloud[[0, 3]].tolist() == [[2.0, 2.0], [2.0, 2.0]]
    np.testing.assert_allclose(step.cloud[[1, 2]], 1.0 + rest, rtol=1e-8)
    assert np.all(step.cloud.sum(axis=0) <= budget)
    assert not step.complete


def test_plan_transition_publishes_each_grower_once_per_transition():
    """As shrinkers acknowledge, each grower is published once, with its target."""
    budget = np.array([10.0])
    current = np.array([[1.0], [2.0], [7.0]])
    target = np.array([[3.0], [5.0], [2.0]])
    published = np.zeros(3, int)
    held = current.copy()

    for _ in range(3):
        step = plan_transition(budget, target, held, current, hysteresis=0.0)
        published += step.publish
        current = step.cloud
        held = step.cloud.copy()  # everyone acknowledges before the next step

    assert step.complete
    assert published.tolist() == [1, 1, 1]
    np.testing.assert_allclose(current, target)


def test_plan_transition_completes_when_growth_exceeds_slack_by_rounding():
    """A target that fills the budget exactly, against holdings summed in
    another order, still completes instead of leaving one grower waiting."""
    budget = np.array([1.0, 2.0])
    held = np.array([[0.1, 0.0], [0.2, 1.0], [0.3, 0.4]])
    target = np.array([[0.1 + 0.2, 0.6], [0.2, 1.0], [0.7 - 0.2, 0.4]])
    target[2, 0] = budget[0] - target[:2, 0].sum() + 1e-16  # rounding over

    step = plan_transition(budget, target, held, held, hysteresis=0.01)

    assert step.complete
    assert np.all(np.maximum(held, step.cloud).sum(axis=0) <= budget)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    agents=st.integers(2, 30),
    hysteresis=st.sampled_from([0.01, 0.05, 0.2]),
)
def test_plan_transition_completes_once_everyone_acknowledges(seed, agents, hysteresis):
    """Stepping to a target that fills the budget ends in a few steps.

    Agents acknowledge every step before the next, so nothing else can free
    pool: a transition that is not complete by then would wait forever.
    """
    rng = np.random.default_rng(seed)
    budget = rng.uniform(0.5, 10.0, size=2)
    current = feasible(rng, agents, budget)
    target = feasible(rng, agents, budget)
    target[-1] = budget - target[:-1].sum(axis=0)  # fills the budget, as solved

    for _ in range(4):
        step = plan_transition(budget, target, current, current, hysteresis=hysteresis)
        assert np.all(np.maximum(current, step.cloud).sum(axis=0) <= budget + 1e-9)
        current = step.cloud
        if step.complete:
            break

    assert step.complete


def test_plan_transition_shrinks_agents_parked_above_target_for_growers():
    """An agent a band's width above its target is shrunk when growth needs it."""
    budget = np.array([10.0])
    current = np.array([[5.04], [4.96]])
    target = np.array([[4.5], [5.5]])

    step = plan_transition(budget, target, current, current, hysteresis=0.1)
    after = plan_transition(budget, target, step.cloud, step.cloud, hysteresis=0.1)

    assert step.publish.tolist() == [True, False]
    assert after.complete


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
        ledger.grant(agent, lease(1, dict(zip(RESOURCES, amounts, strict=True))))
        ledger.acknowledge(agent, 1)
    target = np.array([[1.0, 1.0], [4.0, 0.5], [4.0, 1.5]])

    for epoch in range(2, 6):
        held = ledger.held(agents, RESOURCES)
        current = ledger.current(agents, RESOURCES)
        step = plan_transition(budget, target, held, current, hysteresis=0.0)
        for row in np.flatnonzero(step.publish):
            cloud = dict(zip(RESOURCES, step.cloud[row].tolist(), strict=True))
            ledger.grant(agents[row], lease(epoch, cloud, float(epoch)))
        held_after = ledger.held(agents, RESOURCES).sum(axis=0)
        assert np.all(held_after <= budget + 1e-9)
        for agent in agents:
            ledger.acknowledge(agent, epoch)

    np.testing.assert_allclose(ledger.current(agents, RESOURCES), target)


def test_ledger_counts_old_grant_until_its_lease_ends():
    """An agent that never acknowledges holds its old grant until it expires."""
    ledger = GrantLedger()
    ledger.grant("a", Grant(1, {"compute": 5.0}, published_at=0.0, expires=10.0))
    ledger.grant("a", Grant(2, {"compute": 1.0}, published_at=1.0, expires=70.0))

    before = ledger.held(["a"], ["compute"])[0, 0]
    released = ledger.expire(now=10.5)
    after = ledger.held(["a"], ["compute"])[0, 0]

    assert (before, released, after) == (5.0, True, 1.0)


def test_ledger_forgets_agent_whose_last_grant_expired():
    """A lapsed grant is not renewed: the agent holds nothing."""
    ledger = GrantLedger()
    ledger.grant("a", lease(1, {"compute": 5.0}))

    ledger.expire(now=LEASE + 1)

    assert ("a" in ledger, ledger.total_held(["compute"])) == (False, {"compute": 0.0})


def test_ledger_acknowledgement_releases_older_grants():
    """Acknowledging the newest epoch drops what the agent held before."""
    ledger = GrantLedger()
    ledger.grant("a", lease(1, {"compute": 5.0}))
    ledger.grant("a", lease(2, {"compute": 1.0}))

    released = ledger.acknowledge("a", 2)

    assert (released, ledger.held(["a"], ["compute"])[0, 0]) == (True, 1.0)


def test_ledger_switching_until_nothing_above_the_latest_grant_is_held():
    """Acknowledging a middle epoch can leave the agent above its latest grant."""
    ledger = GrantLedger()
    ledger.grant("a", lease(1, {"compute": 5.0, "data": 1.0}))
    ledger.grant("a", lease(2, {"compute": 3.0, "data": 1.0}))
    ledger.grant("a", lease(3, {"compute": 1.0, "data": 1.0}))
    ledger.grant("b", lease(1, {"compute": 1.0}))
    ledger.grant("b", lease(2, {"compute": 4.0}))

    states = [ledger.switching("a")]
    ledger.acknowledge("a", 2)
    states.append(ledger.switching("a"))
    ledger.acknowledge("a", 3)
    states.append(ledger.switching("a"))

    assert states == [True, True, False]
    assert not ledger.switching("b")  # growing: it holds less than granted
    assert not ledger.switching("unknown")


def test_ledger_lists_agents_slow_to_acknowledge_once_per_grant():
    """Agents that have not reported their latest epoch in time are listed once."""
    ledger = GrantLedger()
    ledger.grant("a", lease(3, {"compute": 1.0}, now=0.0))
    ledger.grant("b", lease(3, {"compute": 1.0}, now=0.0))
    ledger.grant("c", lease(3, {"compute": 1.0}, now=0.0))
    ledger.grant("c", lease(4, {"compute": 1.0}, now=10.0))
    ledger.acknowledge("b", 3)

    first = ledger.newly_late(now=10.0, timeout=15.0)
    late = ledger.newly_late(now=20.0, timeout=15.0)
    again = ledger.newly_late(now=21.0, timeout=15.0)
    replaced = ledger.newly_late(now=26.0, timeout=15.0)

    assert (first, late, again, replaced) == ([], ["a"], [], ["c"])


class ReferenceLedger:
    """Every grant in one list, every question answered by a full scan."""

    def __init__(self) -> None:
        self.grants: dict[str, list[Grant]] = {}
        self.acked: dict[str, int] = {}

    def grant(self, agent: str, grant: Grant) -> None:
        self.grants.setdefault(agent, []).append(grant)

    def acknowledge(self, agent: str, epoch: int) -> None:
        grants = self.grants.get(agent, [])
        if grants:
            self.acked[agent] = max(self.acked.get(agent, epoch), epoch)
            kept = [g for g in grants if g.epoch >= epoch] or grants[-1:]
            self.grants[agent] = kept

    def expire(self, now: float) -> None:
        for agent, grants in list(self.grants.items()):
            self.grants[agent] = [g for g in grants if g.expires > now]
            if not self.grants[agent]:
                del self.grants[agent]
                self.acked.pop(agent, None)

    def late(self, now: float, timeout: float) -> set[str]:
        return {
            agent
            for agent, grants in self.grants.items()
            if self.acked.get(agent, -1) < grants[-1].epoch
            and now - grants[-1].published_at > timeout
        }


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_ledger_sweeps_agree_with_a_full_scan(seed):
    """Lapses and late agents found from the heaps match a scan of every grant.

    With a small ``compact_slack`` the heaps are compacted many times.
    """
    rng = np.random.default_rng(seed)
    ledger, reference = GrantLedger(compact_slack=8), ReferenceLedger()
    agents = [f"a{i}" for i in range(20)]
    reported: set[str] = set()
    for step in range(1, 2500):
        now = step * 0.1
        agent = agents[rng.integers(len(agents))]
        action = rng.integers(4)
        if action <= 1:
            grant = Grant(step, {"compute": float(rng.uniform(0, 2))}, now, now + 5.0)
            ledger.grant(agent, grant)
            reference.grant(agent, grant)
            reported.discard(agent)
        elif action == 2:
            epoch = int(rng.integers(max(1, step - 30), step + 1))
            ledger.acknowledge(agent, epoch)
            reference.acknowledge(agent, epoch)
        ledger.expire(now)
        reference.expire(now)
        newly = set(ledger.newly_late(now, timeout=1.5))
        late = reference.late(now, timeout=1.5)
        reported |= newly

        assert set(ledger.agents()) == set(reference.grants)
        assert newly <= late <= reported
        if step % 25:
            continue
        assert len(ledger._lapses) <= 2 * sum(map(len, reference.grants.values())) + 9
        for name in agents:
            expected = max(
                [0.0, *(g.cloud["compute"] for g in reference.grants.get(name, []))]
            )
            assert ledger.held([name], ["compute"])[0, 0] == expected


def test_ledger_restore_keeps_counting_what_was_held():
    """After a restart the larger amount held before counts until the lease ends."""
    ledger = GrantLedger()

    ledger.restore(
        "a", lease(4, {"compute": 1.0}), held={"compute": 3.0}, acknowledged_epoch=3
    )

    assert ledger.held(["a"], ["compute"])[0, 0] == 3.0
    ledger.acknowledge("a", 4)
    assert ledger.held(["a"], ["compute"])[0, 0] == 1.0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_ledger_held_is_the_largest_live_grant_after_any_history(seed):
    """Test held() equals the max over each agent's kept grants, whatever happened."""
    rng = np.random.default_rng(seed)
    ledger, agents, resources = GrantLedger(), ["a", "b", "c"], ["compute", "data"]
    for epoch in range(1, 30):
        agent = agents[rng.integers(3)]
        action = rng.integers(3)
        if action == 0:
            cloud = {r: float(rng.uniform(0, 2)) for r in resources[: rng.integers(3)]}
            ledger.grant(agent, Grant(epoch, cloud, epoch, epoch + rng.uniform(1, 20)))
        elif action == 1:
            ledger.acknowledge(agent, int(rng.integers(1, epoch + 1)))
        else:
            ledger.expire(float(epoch))

    held = ledger.held(agents, resources)

    for row, agent in enumerate(agents):
        entry = ledger._agents.get(agent)
        grants = entry.grants if entry else []
        expected = [
            max([0.0, *(g.cloud.get(r, 0.0) for g in grants)]) for r in resources
        ]
        assert held[row].tolist() == expected
