"""The message kinds, and how each one travels."""

from __future__ import annotations

from enum import StrEnum

# Every fairsynergy message travels at QoS 1: at least once, deduplicated by
# the receiver (telemetry carries seq, allocations carry epoch).
QOS = 1


class Kind(StrEnum):
    """A kind of message; the value names its schema file ``<value>.schema.json``."""

    TELEMETRY = "telemetry"
    AGENT_STATUS = "agent-status"
    ALLOCATION = "allocation"
    BUDGET = "budget"
    FLEET_SUMMARY = "fleet-summary"
    CONTROLLER_STATUS = "controller-status"
    REJECTION = "rejection"

    @property
    def retained(self) -> bool:
        """Whether messages of this kind are published with the retain flag."""
        return self not in _NOT_RETAINED

    @property
    def qos(self) -> int:
        """QoS of this kind (1 for all of them)."""
        return QOS

    @property
    def schema_file(self) -> str:
        """File name of the JSON Schema of this kind."""
        return f"{self.value}.schema.json"


# Telemetry and rejections are events; everything else is state that a late
# subscriber must be able to read, hence retained.
_NOT_RETAINED = frozenset({Kind.TELEMETRY, Kind.REJECTION})
