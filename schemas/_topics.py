"""Topic names as values: built once from validated ids, parsed back exactly."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from schemas._errors import TopicError
from schemas._kinds import Kind

PREFIX = "fairsynergy"
ID_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
RESOURCE_PATTERN = r"[a-z][a-z0-9_]{0,31}"

_ID = re.compile(ID_PATTERN)
_RESOURCE = re.compile(RESOURCE_PATTERN)

# The last part of each topic, below fairsynergy/<fleet>/agents/<agent>/ for
# agent kinds and below fairsynergy/<fleet>/ for fleet kinds.
AGENT_SUFFIXES = {
    Kind.TELEMETRY: "telemetry",
    Kind.AGENT_STATUS: "status",
    Kind.ALLOCATION: "allocation",
}
FLEET_SUFFIXES = {
    Kind.BUDGET: "budget",
    Kind.FLEET_SUMMARY: "allocations",
    Kind.CONTROLLER_STATUS: "controller/status",
}
_AGENT_KINDS = {suffix: kind for kind, suffix in AGENT_SUFFIXES.items()}
_FLEET_KINDS = {suffix: kind for kind, suffix in FLEET_SUFFIXES.items()}
REJECTED = "rejected"


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid fleet or agent id, else raise TopicError."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise TopicError(
            f"{what} {value!r} is not valid: use 1 to 64 letters, digits, "
            "'_', '.' or '-'"
        )
    return value


def check_resource(name: str) -> str:
    """Return ``name`` if it is a valid resource name, else raise TopicError."""
    if not isinstance(name, str) or _RESOURCE.fullmatch(name) is None:
        raise TopicError(
            f"resource name {name!r} is not valid: use a lower-case letter, then "
            "up to 31 lower-case letters, digits or '_'"
        )
    return name


class TopicName(NamedTuple):
    """What a topic names: the fleet, the message kind and the agent (or None)."""

    fleet: str
    kind: Kind
    agent: str | None


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic of one fleet, or of one agent in it.

    The ids are checked once, here; every property is then a plain string.

    >>> Topics("demo", "robot-1").telemetry
    'fairsynergy/demo/agents/robot-1/telemetry'
    >>> Topics("demo").budget
    'fairsynergy/demo/budget'
    """

    fleet: str
    agent: str | None = None

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet id")
        if self.agent is not None:
            check_id(self.agent, "agent id")

    @property
    def prefix(self) -> str:
        """``fairsynergy/<fleet>``: every topic of the fleet starts with it."""
        return f"{PREFIX}/{self.fleet}"

    def for_agent(self, agent: str) -> Topics:
        """The topics of ``agent`` in the same fleet."""
        return Topics(self.fleet, agent)

    def topic(self, kind: Kind) -> str:
        """The topic messages of ``kind`` are published on.

        Rejections have no single topic: see :meth:`rejected` and
        :func:`rejection_topic`.
        """
        if kind in FLEET_SUFFIXES:
            return f"{self.prefix}/{FLEET_SUFFIXES[kind]}"
        if kind not in AGENT_SUFFIXES:
            raise TopicError(
                f"{kind} has one topic per refused topic: use rejection_topic()"
            )
        return f"{self.prefix}/agents/{self._agent(kind)}/{AGENT_SUFFIXES[kind]}"

    def any_agent(self, kind: Kind) -> str:
        """Subscription filter for ``kind`` from every agent of the fleet."""
        if kind not in AGENT_SUFFIXES:
            raise TopicError(f"{kind} is not an agent topic")
        return f"{self.prefix}/agents/+/{AGENT_SUFFIXES[kind]}"

    @property
    def telemetry(self) -> str:
        """``fairsynergy/<fleet>/agents/<agent>/telemetry``."""
        return self.topic(Kind.TELEMETRY)

    @property
    def status(self) -> str:
        """``fairsynergy/<fleet>/agents/<agent>/status`` (agent status)."""
        return self.topic(Kind.AGENT_STATUS)

    @property
    def allocation(self) -> str:
        """``fairsynergy/<fleet>/agents/<agent>/allocation``."""
        return self.topic(Kind.ALLOCATION)

    @property
    def budget(self) -> str:
        """``fairsynergy/<fleet>/budget``."""
        return self.topic(Kind.BUDGET)

    @property
    def allocations(self) -> str:
        """``fairsynergy/<fleet>/allocations`` (fleet summary)."""
        return self.topic(Kind.FLEET_SUMMARY)

    @property
    def controller_status(self) -> str:
        """``fairsynergy/<fleet>/controller/status``."""
        return self.topic(Kind.CONTROLLER_STATUS)

    @property
    def rejected(self) -> str:
        """Subscription filter for the rejection notices this sender should read.

        For an agent, the notices about its own topics; for the fleet alone,
        every notice of the fleet.
        """
        if self.agent is None:
            return f"{self.prefix}/{REJECTED}/#"
        return f"{self.prefix}/{REJECTED}/agents/{self.agent}/#"

    def _agent(self, kind: Kind) -> str:
        if self.agent is None:
            raise TopicError(f"{kind} topics need an agent id: use for_agent()")
        return self.agent


def parse_topic(topic: str) -> TopicName:
    """Split a fairsynergy topic into (fleet, kind, agent).

    A rejection topic parses to kind REJECTION with the agent whose message
    was refused (None for fleet topics such as the budget).

    Raises:
        TopicError: the topic is not one of the protocol's topics.
    """
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != PREFIX:
        raise TopicError(f"topic {topic!r} does not start with {PREFIX}/<fleet>/")
    fleet = check_id(parts[1], "fleet id")

    if parts[2] == REJECTED:
        refused = _parse_rest(topic, parts[3:])
        return TopicName(fleet, Kind.REJECTION, refused[1])
    kind, agent = _parse_rest(topic, parts[2:])
    return TopicName(fleet, kind, agent)


def rejection_topic(refused: str) -> str:
    """The topic a rejection notice about a message on ``refused`` goes to.

    >>> rejection_topic("fairsynergy/demo/agents/robot-1/telemetry")
    'fairsynergy/demo/rejected/agents/robot-1/telemetry'
    """
    fleet, kind, _ = parse_topic(refused)
    if kind is Kind.REJECTION:
        raise TopicError(f"topic {refused!r} is a rejection; they are not refused")
    rest = refused[len(f"{PREFIX}/{fleet}/") :]
    return f"{PREFIX}/{fleet}/{REJECTED}/{rest}"


def _parse_rest(topic: str, rest: list[str]) -> tuple[Kind, str | None]:
    """Parse what follows ``fairsynergy/<fleet>/`` in a non-rejection topic."""
    joined = "/".join(rest)
    if joined in _FLEET_KINDS:
        return _FLEET_KINDS[joined], None
    if len(rest) == 3 and rest[0] == "agents" and rest[2] in _AGENT_KINDS:
        return _AGENT_KINDS[rest[2]], check_id(rest[1], "agent id")
    raise TopicError(f"topic {topic!r} is not a fairsynergy topic")
