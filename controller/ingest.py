"""Ingest: turn raw MQTT messages into checked events, or say why not.

Every message the controller receives passes here first, in this order:

1. the topic must be one of the fleet's (:func:`schemas.parse_topic`);
2. size, strict JSON and schema (:func:`schemas.decode`);
3. for telemetry, the defences that keep one device from hurting the rest:
   a per-agent rate limit (token bucket), duplicate and out-of-order
   sequence numbers, and plausibility (accuracy or on-board amounts that jump
   further than a device can, cloud use above what was granted).

What passes becomes a small frozen event. What fails becomes a
:class:`Rejected` with a stable reason code; the daemon counts it, logs it at
warning and, where the sender can act on it, publishes a rejection notice on
the sender's ``rejected`` topic. Nothing here raises on bad input.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas import (
    Kind,
    MessageError,
    TopicError,
    TopicName,
    alpha_from_wire,
    decode,
    parse_topic,
)

Amounts = Mapping[str, float]

# A report whose accuracy differs from the agent's last accepted one by more
# than this is held as suspect; it is accepted only once CONFIRMATIONS reports
# in a row agree that the level has changed (a real change of task or sensor
# does that; a corrupted or hostile report does not).
MAX_ACCURACY_JUMP = 0.5
# On-board amounts are hardware: a change by more than this factor between two
# reports (up or down) is suspect in the same way.
MAX_LOCAL_FACTOR = 10.0
CONFIRMATIONS = 3
# Cloud use may exceed the grant by this relative margin (rounding, metering).
CLOUD_TOLERANCE = 0.01
# Parsed topics kept, so that each agent's topic is parsed once, not per
# message: a few per agent of the largest fleets. Anyone may publish under
# the fleet's prefix, so the least recently used are forgotten beyond this.
TOPIC_CACHE_SIZE = 65_536

# Kinds the controller publishes itself and receives back as echoes.
_OWN_KINDS = frozenset({Kind.ALLOCATION, Kind.FLEET_SUMMARY, Kind.CONTROLLER_STATUS})


@dataclass(frozen=True)
class Telemetry:
    agent: str
    seq: int
    ts: float
    accuracy: float
    local: Amounts
    cloud: Amounts
    epoch: int | None
    load: float | None
    model: str | None


@dataclass(frozen=True)
class AgentStatus:
    agent: str
    state: str
    ts: float
    model: str | None


@dataclass(frozen=True)
class Budget:
    resources: Amounts
    alpha: float | None


@dataclass(frozen=True)
class Ignored:
    """A message the controller does not act on (its own output, echoed back)."""

    topic: str


@dataclass(frozen=True)
class Rejected:
    """Why a message was refused; ``notify`` says whether to tell the sender."""

    topic: str
    kind: str
    reason: str
    detail: str
    agent: str | None = None
    field: str | None = None
    seq: int | None = None
    notify: bool = True


Event = Telemetry | AgentStatus | Budget | Ignored | Rejected


class RateLimiter:
    """A token bucket per agent: ``rate`` messages per second, ``burst`` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, agent: str, now: float) -> bool:
        tokens, last = self._buckets.get(agent, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[agent] = (tokens - 1.0 if allowed else tokens, now)
        return allowed

    def forget(self, agent: str) -> None:
        self._buckets.pop(agent, None)


@dataclass
class AgentHistory:
    """What ingest remembers of one agent to judge its next report."""

    seq: int = -1
    accuracy: float | None = None
    local: dict[str, float] = field(default_factory=dict)
    cloud: dict[str, float] = field(default_factory=dict)
    model: str | None = None
    suspect: int = 0


class Ingest:
    """Checks every incoming message of one fleet; keeps per-agent history."""

    def __init__(
        self,
        fleet: str,
        *,
        max_payload_bytes: int,
        rate_limit: float,
        rate_burst: float,
    ) -> None:
        self.fleet = fleet
        self.max_payload_bytes = max_payload_bytes
        self.limiter = RateLimiter(rate_limit, rate_burst)
        self._history: dict[str, AgentHistory] = {}

    def restore_seq(self, agent: str, seq: int) -> None:
        """After a restart: duplicates of reports already stored stay duplicates."""
        self._history.setdefault(agent, AgentHistory()).seq = seq

    def forget(self, agent: str) -> None:
        self._history.pop(agent, None)
        self.limiter.forget(agent)

    def handle(
        self,
        topic: str,
        payload: bytes,
        now: float,
        granted: Callable[[str], Mapping[str, float]],
    ) -> Event:
        """Check one message.

        ``granted(agent)`` is the most cloud of each resource that agent may
        hold now: reports of using more are refused.
        """
        try:
            name = parsed_topic(topic)
        except TopicError as error:
            return Rejected(topic, "unknown", "topic", str(error), notify=False)
        if name.fleet != self.fleet:
            return Rejected(topic, name.kind, "fleet", "another fleet", notify=False)
        if name.kind in _OWN_KINDS:
            return Ignored(topic)
        limited = name.kind is Kind.TELEMETRY and name.agent is not None
        if limited and not self.limiter.allow(str(name.agent), now):
            return Rejected(
                topic, name.kind, "rate_limited", "too many reports", name.agent
            )

        try:
            message = decode(name.kind, payload, max_bytes=self.max_payload_bytes)
        except MessageError as error:
            return Rejected(
                topic,
                name.kind,
                error.reason,
                str(error),
                name.agent,
                error.field,
                error.seq,
            )
        return self._event(topic, name.kind, name.agent, message, granted)

    def _event(
        self,
        topic: str,
        kind: Kind,
        agent: str | None,
        message: Mapping[str, object],
        granted: Callable[[str], Mapping[str, float]],
    ) -> Event:
        if kind is Kind.BUDGET:
            alpha: Any = message.get("alpha")
            resources: Any = message["resources"]
            wire_alpha = None if alpha is None else alpha_from_wire(alpha)
            return Budget(resources=dict(resources), alpha=wire_alpha)
        assert agent is not None
        if kind is Kind.AGENT_STATUS:
            return AgentStatus(
                agent,
                str(message["state"]),
                float(message["ts"]),  # type: ignore[arg-type]
                message.get("model"),  # type: ignore[arg-type]
            )
        if kind is Kind.REJECTION:
            return Ignored(topic)
        report = telemetry_event(agent, message)
        return self._check_telemetry(topic, report, granted(agent))

    def _check_telemetry(
        self, topic: str, report: Telemetry, granted: Mapping[str, float]
    ) -> Event:
        history = self._history.setdefault(report.agent, AgentHistory())
        if report.seq <= history.seq:
            return Rejected(
                topic,
                Kind.TELEMETRY,
                "duplicate",
                f"seq {report.seq} is not after {history.seq}",
                report.agent,
                "seq",
                report.seq,
                notify=False,  # QoS 1 redelivery: normal, nothing to tell
            )

        excess = cloud_above_grant(report.cloud, granted)
        if excess is not None:
            return Rejected(
                topic,
                Kind.TELEMETRY,
                "cloud_above_grant",
                f"reports using {report.cloud[excess]:g} of {excess}, "
                f"granted {granted.get(excess, 0.0):g}",
                report.agent,
                f"cloud.{excess}",
                report.seq,
            )
        problem = implausible_change(history, report)
        if problem is not None:
            history.suspect += 1
            if history.suspect < CONFIRMATIONS:
                return Rejected(
                    topic,
                    Kind.TELEMETRY,
                    "implausible",
                    problem[1],
                    report.agent,
                    problem[0],
                    report.seq,
                )
        # Only an accepted report moves the sequence on: a refused one must not
        # make the agent's next genuine reports look like duplicates.
        history.seq = report.seq
        history.suspect = 0
        history.accuracy = report.accuracy
        history.local = dict(report.local)
        history.cloud = dict(report.cloud)
        history.model = report.model
        return report


@functools.lru_cache(maxsize=TOPIC_CACHE_SIZE)
def parsed_topic(topic: str) -> TopicName:
    """:func:`schemas.parse_topic`, remembered (refused topics are not)."""
    return parse_topic(topic)


def telemetry_event(agent: str, message: Mapping[str, Any]) -> Telemetry:
    """A validated telemetry message as an event.

    The event takes ``local`` and ``cloud`` over from the message instead of
    copying them: a message fresh from :func:`schemas.decode` has no other
    owner. Copy them first to keep changing the message.
    """
    load = message.get("load")
    epoch = message.get("epoch")
    return Telemetry(
        agent,
        int(message["seq"]),
        float(message["ts"]),
        float(message["accuracy"]),
        message["local"],
        message["cloud"],
        None if epoch is None else int(epoch),
        None if load is None else float(load),
        message.get("model"),
    )


def cloud_above_grant(cloud: Amounts, granted: Mapping[str, float]) -> str | None:
    """The first resource whose reported use exceeds the grant, if any."""
    for resource, used in cloud.items():
        allowed = granted.get(resource, 0.0)
        if used > allowed * (1.0 + CLOUD_TOLERANCE) + 1e-9:
            return resource
    return None


def implausible_change(
    history: AgentHistory, report: Telemetry
) -> tuple[str, str] | None:
    """(field, reason) if the report moved further than a device can, else None.

    A new ``model`` label announces a real change, so nothing is suspect then;
    nor is a large accuracy change that comes with a change of the cloud
    amounts in use (a new grant can move accuracy a long way).
    """
    if history.accuracy is None or report.model != history.model:
        return None
    jump = abs(report.accuracy - history.accuracy)
    if jump > MAX_ACCURACY_JUMP and report.cloud == history.cloud:
        return "accuracy", f"accuracy jumped by {jump:.2f} since the last report"
    if report.local == history.local:  # the usual case: the same hardware
        return None
    for resource, amount in report.local.items():
        before = history.local.get(resource)
        if before is None or before <= 0 or amount <= 0:
            continue
        factor = max(amount / before, before / amount)
        if factor > MAX_LOCAL_FACTOR or not math.isfinite(factor):
            return (
                f"local.{resource}",
                f"on-board {resource} changed {factor:.0f}-fold since the last report",
            )
    return None
