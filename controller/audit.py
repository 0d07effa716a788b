"""An outside check that the pool is never over-committed.

:class:`PoolAudit` knows nothing of the controller's internals: it reads what
any subscriber can (the budget, every agent's allocation, every agent's
telemetry) and applies the rules of the protocol (docs/protocol.md):

- an allocation is a grant the agent may use until its ``expires``;
- an agent may use any grant it was sent until it reports (in telemetry) an
  epoch at least as new, or until that grant expires.

After every message it sums, per resource, the most each agent may hold and
compares it with the budget. The demo runs it and prints the verdict; the
end-to-end tests run it against a real controller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import schemas
from schemas import ContractError, Kind

# Sums of floating-point amounts may differ from the budget in the last bits.
RELATIVE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Violation:
    """A moment when agents could hold more of a resource than its budget."""

    at: float
    resource: str
    held: float
    budget: float


@dataclass
class _Grant:
    epoch: int
    cloud: dict[str, float]
    expires: float


@dataclass
class PoolAudit:
    """Tracks grants and acknowledgements of one fleet, from its messages."""

    fleet: str
    clock: Callable[[], float] = time.time
    budget: dict[str, float] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    peak_share: float = 0.0  # most of any budget ever held at once (1.0 = full)
    checks: int = 0
    _grants: dict[str, list[_Grant]] = field(default_factory=dict)
    _acked: dict[str, int] = field(default_factory=dict)

    def observe(self, topic: str, payload: bytes) -> None:
        """Take one message from the fleet's topics, then check the pool."""
        try:
            fleet, kind, agent = schemas.parse_topic(topic)
        except ContractError:
            return
        if fleet != self.fleet:
            return
        if kind is Kind.BUDGET:
            self._on_budget(payload)
        elif kind is Kind.ALLOCATION and agent is not None:
            self._on_allocation(agent, payload)
        elif kind is Kind.TELEMETRY and agent is not None:
            self._on_telemetry(agent, payload)
        else:
            return
        self.check()

    def _on_budget(self, payload: bytes) -> None:
        try:
            message = schemas.decode(Kind.BUDGET, payload)
        except ContractError:
            return
        self.budget = {r: float(v) for r, v in message["resources"].items()}

    def _on_allocation(self, agent: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message revokes nothing already sent
        message = schemas.decode(Kind.ALLOCATION, payload)
        expires = float(message.get("expires", float("inf")))
        grant = _Grant(int(message["epoch"]), dict(message["cloud"]), expires)
        self._grants.setdefault(agent, []).append(grant)

    def _on_telemetry(self, agent: str, payload: bytes) -> None:
        try:
            message = schemas.decode(Kind.TELEMETRY, payload)
        except ContractError:
            return
        epoch = message.get("epoch")
        if epoch is not None:
            self._acked[agent] = max(self._acked.get(agent, epoch), epoch)

    def held(self, now: float | None = None) -> dict[str, float]:
        """Per resource, the most the whole fleet may be using now."""
        moment = self.clock() if now is None else now
        totals: dict[str, float] = dict.fromkeys(self.budget, 0.0)
        for agent, grants in self._grants.items():
            acked = self._acked.get(agent, -1)
            live = [g for g in grants if g.expires > moment]
            newest = max((g.epoch for g in live), default=None)
            usable = [g for g in live if g.epoch >= acked or g.epoch == newest]
            for resource in {r for g in usable for r in g.cloud}:
                most = max(g.cloud.get(resource, 0.0) for g in usable)
                totals[resource] = totals.get(resource, 0.0) + most
        return totals

    def check(self) -> None:
        """Record a violation for every resource held above its budget now."""
        now = self.clock()
        self.checks += 1
        for resource, held in self.held(now).items():
            budget = self.budget.get(resource, 0.0)
            if budget > 0:
                self.peak_share = max(self.peak_share, held / budget)
            if held > budget * (1 + RELATIVE_TOLERANCE) + 1e-12:
                self.violations.append(Violation(now, resource, held, budget))
