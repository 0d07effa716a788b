"""The allocation an agent holds, as a value."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from schemas import Message


@dataclass(frozen=True, slots=True)
class Allocation:
    """The cloud amounts granted to this agent in one epoch.

    Attributes:
        epoch: increases with every new allocation of the fleet.
        cloud: resource name -> cloud amount granted (absent means 0).
        ts: when the controller computed it (Unix seconds).
        expected_accuracy: what the controller expects the agent to reach.
        prices: resource name -> value of one more unit to the fleet.
        expires: after this time, fall back to local resources.
        message: the whole message as received, including fields newer
            controllers add.
    """

    epoch: int
    cloud: Mapping[str, float]
    ts: float
    expected_accuracy: float | None = None
    prices: Mapping[str, float] | None = None
    expires: float | None = None
    message: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_message(cls, message: Message) -> Allocation:
        """Build from a message already checked by ``schemas.decode``."""
        prices = message.get("prices")
        return cls(
            epoch=int(message["epoch"]),
            cloud=MappingProxyType(dict(message["cloud"])),
            ts=float(message["ts"]),
            expected_accuracy=message.get("expected_accuracy"),
            prices=None if prices is None else MappingProxyType(dict(prices)),
            expires=message.get("expires"),
            message=MappingProxyType(dict(message)),
        )

    def amount(self, resource: str) -> float:
        """Cloud amount of ``resource`` granted (0 when the allocation omits it)."""
        return float(self.cloud.get(resource, 0.0))

    def expired(self, now: float | None = None) -> bool:
        """Whether ``expires`` has passed (never, when the allocation has none)."""
        if self.expires is None:
            return False
        return (time.time() if now is None else now) >= self.expires
