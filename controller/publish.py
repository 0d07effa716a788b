"""Grants and transitions: publish new allocations without over-committing the pool.

Every allocation message is a *grant* with a lease: the agent may use it until
its ``expires`` time, and the controller renews grants before they lapse
while the agent stays in the fleet. An agent that hears nothing more falls
back to its local resources when its grant expires.

When the controller moves the fleet from one allocation to the next, agents
switch at different moments. Until an agent acknowledges the new epoch (its
telemetry reports it) it may still be using an older grant whose lease has
not ended, so what it holds is the largest of those. :class:`GrantLedger`
keeps that conservative view per agent, and :func:`plan_transition` chooses
what to publish now so that the sum of what agents may hold never exceeds a
budget:

- agents that shrink get their new amount at once (what they hold can only fall);
- agents that grow get their whole new amount as soon as the slack that is
  really free covers it, the smallest growth first; what is left is shared
  by the other growers in proportion to their growth, and the rest of their
  growth follows in a later epoch, once the shrinking agents have
  acknowledged or their old grants have expired. Most growers are published
  once per transition rather than once per acknowledgement with a bit more
  each time;
- changes smaller than the hysteresis band are not published at all, so small
  refits and exploration noise do not cause a storm of messages; except a
  shrink that growers are waiting for, which nothing else would free (an
  agent kept a band's width above its target holds pool the target gives to
  others).

One case cannot be made safe by ordering: an operator who cuts a budget below
what agents already hold. Shrinking allocations go out at once and the pool is
over its new budget only until those agents acknowledge; :attr:`Transition.
over_budget` reports it so the daemon can warn.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# Entries a ledger heap may hold beyond twice the live grants before it is
# compacted: keeps small ledgers from compacting at every grant.
COMPACT_SLACK = 1024

# Relative margin kept free when slack is shared out, so that summing the
# grants in a different order can never show a total above the budget.
ROUNDING_MARGIN = 1e-9
# An agent holds more than a grant gives it when some amount exceeds the
# grant's by more than this relative margin (rounding is not holding).
HELD_TOLERANCE = 1e-12


@dataclass
class Grant:
    """One allocation published to one agent: a lease on some cloud amounts."""

    epoch: int
    cloud: dict[str, float]
    published_at: float
    expires: float


@dataclass
class AgentGrants:
    """The grants one agent may still be using, oldest first.

    ``most`` is the largest amount of each resource over those grants, kept
    up to date by :meth:`add` and :meth:`keep`: it is read for every agent
    in every cycle, and grants change far less often.
    """

    grants: list[Grant] = field(default_factory=list)
    acknowledged_epoch: int | None = None
    most: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keep(self.grants)

    @property
    def latest(self) -> Grant | None:
        return self.grants[-1] if self.grants else None

    @property
    def unacknowledged(self) -> bool:
        """Whether the agent has a latest grant it has not reported using yet."""
        latest, acked = self.latest, self.acknowledged_epoch
        return latest is not None and (acked is None or acked < latest.epoch)

    def add(self, grant: Grant) -> None:
        self.grants.append(grant)
        for resource, amount in grant.cloud.items():
            self.most[resource] = max(self.most.get(resource, 0.0), amount)

    def keep(self, grants: list[Grant]) -> None:
        """Hold only ``grants`` from now on."""
        self.grants = grants
        self.most = {}
        for grant in grants:
            for resource, amount in grant.cloud.items():
                self.most[resource] = max(self.most.get(resource, 0.0), amount)


@dataclass(frozen=True)
class LedgerView:
    """Some agents' rows of the ledger, in the order asked for."""

    held: FloatArray  # (N, R): the most each may be using (0 without a grant)
    current: FloatArray  # (N, R): its latest grant (0 without one)
    latest: list[Grant | None]


class GrantLedger:
    """What every agent has been granted, and what it may still be holding.

    The daemon sweeps the ledger several times a second for lapsed leases and
    late acknowledgements, so both are kept as time-ordered heaps with an
    entry per grant: a sweep looks only at the grants whose time has come,
    not at the whole fleet. An entry whose grant has gone otherwise (an
    acknowledgement released it, a newer grant replaced it) stays in its
    heap until its time and is then passed over; :meth:`_compact` drops such
    entries once there are ``compact_slack`` more than twice the live grants.
    """

    def __init__(self, compact_slack: int = COMPACT_SLACK) -> None:
        self._agents: dict[str, AgentGrants] = {}
        self._compact_slack = compact_slack
        self._lapses: list[tuple[float, str]] = []  # (expires, agent)
        self._unacked: list[tuple[float, str, int]] = []  # (published_at, agent, epoch)
        self._live = 0  # grants held, over all agents

    def __contains__(self, agent: str) -> bool:
        return agent in self._agents

    def agents(self) -> list[str]:
        return list(self._agents)

    def latest(self, agent: str) -> Grant | None:
        entry = self._agents.get(agent)
        return entry.latest if entry else None

    def acknowledged_epoch(self, agent: str) -> int | None:
        entry = self._agents.get(agent)
        return entry.acknowledged_epoch if entry else None

    def grant(self, agent: str, grant: Grant) -> None:
        """Record that ``grant`` was published to ``agent``."""
        self._agents.setdefault(agent, AgentGrants()).add(grant)
        self._live += 1
        self._watch(agent, grant)

    def restore(
        self,
        agent: str,
        latest: Grant,
        *,
        held: dict[str, float],
        acknowledged_epoch: int | None,
    ) -> None:
        """Put back an agent's latest grant after a restart.

        ``held`` is the most the agent could hold when the state was saved
        (its latest grant, or more while it was switching); it counts like an
        unacknowledged older grant, until the latest grant's lease ends.
        """
        before = Grant(
            latest.epoch - 1, dict(held), latest.published_at, latest.expires
        )
        replaced = self._agents.get(agent)
        self._live += 2 - (len(replaced.grants) if replaced else 0)
        self._agents[agent] = AgentGrants([before, latest], acknowledged_epoch)
        self._watch(agent, latest)

    def acknowledge(self, agent: str, epoch: int) -> bool:
        """The agent reports using ``epoch``: forget its older grants.

        Returns True when this released a grant (some pool may now be free).
        """
        entry = self._agents.get(agent)
        if entry is None:
            return False
        if entry.acknowledged_epoch is None or epoch > entry.acknowledged_epoch:
            entry.acknowledged_epoch = epoch
        kept = [g for g in entry.grants if g.epoch >= epoch] or entry.grants[-1:]
        released = len(kept) < len(entry.grants)
        if released:
            self._live -= len(entry.grants) - len(kept)
            entry.keep(kept)
        return released

    def switching(self, agent: str) -> bool:
        """True while ``agent`` may hold more of something than its latest grant.

        An acknowledgement of an older epoch releases the grants before it
        but can leave one larger than the latest: the agent is still on its
        way down, and growth that waits for its pool must go on waiting.
        """
        entry = self._agents.get(agent)
        latest = entry.latest if entry else None
        if entry is None or latest is None:
            return False
        granted = latest.cloud
        return any(
            amount > granted.get(resource, 0.0) * (1.0 + HELD_TOLERANCE)
            for resource, amount in entry.most.items()
        )

    def expire(self, now: float) -> bool:
        """Drop every grant whose lease has ended; True if any was dropped."""
        released = False
        lapses = self._lapses
        while lapses and lapses[0][0] <= now:
            _, agent = heapq.heappop(lapses)
            entry = self._agents.get(agent)
            if entry is None:
                continue
            live = [g for g in entry.grants if g.expires > now]
            if len(live) < len(entry.grants):
                released = True
                self._live -= len(entry.grants) - len(live)
                entry.keep(live)
            if not live:
                del self._agents[agent]
        return released

    def newly_late(self, now: float, timeout: float) -> list[str]:
        """Agents whose latest grant became older than ``timeout`` unacknowledged.

        Each grant is reported once, by the first call after its timeout;
        the same ``timeout`` must be passed every time.
        """
        late = []
        pending = self._unacked
        while pending and now - pending[0][0] > timeout:
            _, agent, epoch = heapq.heappop(pending)
            if self._waiting(agent, epoch):
                late.append(agent)
        return late

    def unacknowledged(self, agent: str) -> bool:
        """Whether ``agent``'s latest grant is not acknowledged yet."""
        entry = self._agents.get(agent)
        return entry is not None and entry.unacknowledged

    def _waiting(self, agent: str, epoch: int) -> bool:
        """True while ``epoch`` is ``agent``'s latest grant, not acknowledged."""
        entry = self._agents.get(agent)
        if entry is None or entry.latest is None:
            return False
        return entry.latest.epoch == epoch and entry.unacknowledged

    def _watch(self, agent: str, grant: Grant) -> None:
        """Put a new latest grant on the lapse and acknowledgement heaps."""
        heapq.heappush(self._lapses, (grant.expires, agent))
        heapq.heappush(self._unacked, (grant.published_at, agent, grant.epoch))
        if len(self._lapses) > 2 * self._live + self._compact_slack:
            self._compact()

    def _compact(self) -> None:
        """Drop heap entries whose grant has gone (amortised: O(1) per grant)."""
        lapsing: set[tuple[float, str]] = set()
        waiting: set[tuple[str, int]] = set()
        for agent, entry in self._agents.items():
            lapsing.update((g.expires, agent) for g in entry.grants)
            if entry.unacknowledged and entry.latest is not None:
                waiting.add((agent, entry.latest.epoch))
        self._lapses = [e for e in self._lapses if e in lapsing]
        self._unacked = [e for e in self._unacked if (e[1], e[2]) in waiting]
        heapq.heapify(self._lapses)
        heapq.heapify(self._unacked)

    def held_by(self, agent: str) -> dict[str, float]:
        """The most of each resource ``agent`` may be using (absent means 0)."""
        entry = self._agents.get(agent)
        return dict(entry.most) if entry else {}

    def held(self, agents: Sequence[str], resources: Sequence[str]) -> FloatArray:
        """Per agent and resource, the most it may be using: the max of its grants."""
        return self.view(agents, resources).held

    def current(self, agents: Sequence[str], resources: Sequence[str]) -> FloatArray:
        """Per agent and resource, the latest live grant (0 if none)."""
        return self.view(agents, resources).current

    def view(self, agents: Sequence[str], resources: Sequence[str]) -> LedgerView:
        """What :meth:`held`, :meth:`current` and :meth:`latest` give, in one pass.

        A cycle reads this for every agent of the fleet, so it walks the
        ledger once.
        """
        entries = self._agents
        zeros = [0.0] * len(resources)
        held, current, latest = [], [], []
        for agent in agents:
            entry = entries.get(agent)
            grant = entry.grants[-1] if entry and entry.grants else None
            latest.append(grant)
            if entry is None or grant is None:
                held.append(zeros)
                current.append(zeros)
                continue
            most, cloud = entry.most, grant.cloud
            held.append([max(most.get(r, 0.0), 0.0) for r in resources])
            current.append([cloud.get(r, 0.0) for r in resources])
        width = len(resources)
        return LedgerView(_matrix(held, width), _matrix(current, width), latest)

    def total_held(self, resources: Iterable[str]) -> dict[str, float]:
        names = list(resources)
        held = self.held(self.agents(), names)
        return dict(zip(names, held.sum(axis=0).tolist(), strict=True))


@dataclass(frozen=True)
class Transition:
    """What to publish now, and how far it still is from the target."""

    cloud: FloatArray  # (N, R): the allocation every agent will hold after this step
    publish: npt.NDArray[np.bool_]  # (N,): whose allocation changes now
    complete: bool  # True when every agent got its target (within the band)
    over_budget: FloatArray  # (R,): how far held amounts exceed the budget (>= 0)


def plan_transition(
    budget: FloatArray,
    target: FloatArray,
    held: FloatArray,
    current: FloatArray,
    *,
    hysteresis: float,
    new_agents: npt.NDArray[np.bool_] | None = None,
) -> Transition:
    """Choose the next allocation to publish on the way to ``target``.

    ``held`` is what each agent may be using now (the ledger's view) and
    ``current`` its latest published grant; ``target`` must be feasible.
    Agents in ``new_agents`` have no grant yet and are always published.
    """
    count = max(target.shape[0], 1)
    band = hysteresis * budget / count
    fresh = np.zeros(target.shape[0], bool) if new_agents is None else new_agents

    moves = fresh | np.any(np.abs(target - current) > band, axis=1)
    wanted = np.where(moves[:, None], target, current)
    # Agents left inside the band above their target keep pool the growers
    # need, and no acknowledgement would ever free it: when the amounts
    # wanted add up to more than a budget, those agents move to their target
    # too, so that the transition can complete.
    over = wanted.sum(axis=0) > budget * (1.0 + ROUNDING_MARGIN)
    parked = ~moves & np.any((current > target) & over, axis=1)
    if parked.any():
        moves |= parked
        wanted = np.where(moves[:, None], target, current)

    growth = np.maximum(wanted - held, 0.0)
    slack = np.maximum(budget - held.sum(axis=0), 0.0)
    if np.all(growth.sum(axis=0) <= slack):
        grows = np.ones(len(growth), bool)
    else:
        grows = _whole_growth(growth, slack, budget)
    whole = np.where(grows[:, None], growth, 0.0)
    # What the whole grants leave is shared by the other growers in
    # proportion to their growth: without it a transition whose last
    # growers need a hair more than is free (rounding, or agents kept a
    # band's width above their target) would wait for them forever.
    rest = growth - whole
    left = np.maximum(slack - whole.sum(axis=0), 0.0)
    wanting = rest.sum(axis=0)
    share = np.divide(left, wanting, out=np.ones_like(left), where=wanting > left)
    share = np.where(share < 1.0, share * (1.0 - ROUNDING_MARGIN), 1.0)
    limited = np.where(wanted > held, held + whole + share * rest, wanted)

    # A shrink smaller than the band still goes out when growers are short
    # of that resource: it is pool they wait for.
    short = growth.sum(axis=0) > slack
    frees = moves & np.any((limited < current) & short, axis=1)
    publish = fresh | frees | np.any(np.abs(limited - current) > band, axis=1)
    cloud = np.where(publish[:, None], limited, current)
    complete = not np.any(np.abs(cloud - target) > band)
    after = np.maximum(held, cloud).sum(axis=0)
    return Transition(cloud, publish, complete, np.maximum(after - budget, 0.0))


def _whole_growth(
    growth: FloatArray, slack: FloatArray, budget: FloatArray
) -> npt.NDArray[np.bool_]:
    """Which agents get all of their ``growth`` now, within too little ``slack``.

    The agents with the smallest growth (relative to each budget), as many
    as fit, in that order: the longest prefix whose running total stays
    within the slack in every resource, less a rounding margin.
    """
    scale = np.where(budget > 0, budget, 1.0)
    order = np.argsort((growth / scale).sum(axis=1), kind="stable")
    running = np.cumsum(growth[order], axis=0)
    fits = np.all(running <= slack * (1.0 - ROUNDING_MARGIN), axis=1)
    grows = np.zeros(growth.shape[0], bool)
    grows[order[: int(np.argmin(fits)) if not fits.all() else len(fits)]] = True
    return grows


def _matrix(rows: list[list[float]], columns: int) -> FloatArray:
    """Rows of floats as an ``(len(rows), columns)`` array, also when empty."""
    return np.array(rows, dtype=float).reshape(len(rows), columns)
