"""One small builder per message kind: keyword arguments in, checked dict out.

Each builder fills ``v`` (and ``ts`` when not given), leaves optional fields
out when they are None, and checks the result as a receiver would (strict
JSON, schema; the size is checked when it is sent), so a bad argument fails
here, next to the code that passed it. What a builder returns is checked: send
it with :func:`~schemas.dump`, which only serialises it and checks the size.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal

from schemas._codec import Message, encode
from schemas._errors import MessageError
from schemas._kinds import Kind

VERSION = 1
"""The protocol major version every message carries as ``v``."""

Amounts = Mapping[str, float]
State = Literal["online", "offline"]
Alpha = float | Literal["inf"]


def telemetry(
    *,
    seq: int,
    accuracy: float,
    local: Amounts,
    cloud: Amounts,
    epoch: int | None,
    load: float | None = None,
    model: str | None = None,
    dropped: int | None = None,
    ts: float | None = None,
) -> Message:
    """A telemetry report: one accuracy measurement and the resources behind it."""
    message = {
        "v": VERSION,
        "seq": seq,
        "ts": _now(ts),
        "accuracy": accuracy,
        "local": _copy(local),
        "cloud": _copy(cloud),
        "epoch": epoch,
    }
    return _checked(Kind.TELEMETRY, message, load=load, model=model, dropped=dropped)


def agent_status(
    *,
    state: State,
    model: str | None = None,
    client: str | None = None,
    ts: float | None = None,
) -> Message:
    """An agent's presence: its birth (online), clean close or last will (offline)."""
    message = {"v": VERSION, "state": state, "ts": _now(ts)}
    return _checked(Kind.AGENT_STATUS, message, model=model, client=client)


def allocation(
    *,
    epoch: int,
    cloud: Amounts,
    expected_accuracy: float | None = None,
    prices: Amounts | None = None,
    expires: float | None = None,
    ts: float | None = None,
) -> Message:
    """The cloud amounts granted to one agent in ``epoch``."""
    message = {"v": VERSION, "epoch": epoch, "cloud": _copy(cloud), "ts": _now(ts)}
    return _checked(
        Kind.ALLOCATION,
        message,
        expected_accuracy=expected_accuracy,
        prices=None if prices is None else _copy(prices),
        expires=expires,
    )


def budget(*, resources: Amounts, alpha: Alpha | None = None) -> Message:
    """The cloud pool to share, and optionally the fairness to share it with."""
    message = {"v": VERSION, "resources": _copy(resources)}
    alpha_field = None if alpha is None else alpha_to_wire(alpha)
    return _checked(Kind.BUDGET, message, alpha=alpha_field)


def fleet_summary(
    *,
    epoch: int,
    alpha: Alpha,
    budget: Amounts,
    prices: Amounts,
    agents: Mapping[str, Mapping[str, Any]],
    ts: float | None = None,
) -> Message:
    """Every agent's share of allocation ``epoch``.

    ``agents`` maps an agent id to ``{"cloud": {...}, "expected_accuracy": x}``
    (``expected_accuracy`` optional).
    """
    message = {
        "v": VERSION,
        "epoch": epoch,
        "alpha": alpha_to_wire(alpha),
        "budget": _copy(budget),
        "prices": _copy(prices),
        "agents": (
            {agent: _copy(share) for agent, share in agents.items()}
            if isinstance(agents, Mapping)
            else agents
        ),
        "ts": _now(ts),
    }
    return _checked(Kind.FLEET_SUMMARY, message)


def controller_status(*, state: State, ts: float | None = None) -> Message:
    """The controller's presence: birth (online), stop or last will (offline)."""
    message = {"v": VERSION, "state": state, "ts": _now(ts)}
    return _checked(Kind.CONTROLLER_STATUS, message)


def rejection(
    *,
    topic: str,
    reason: str,
    field: str | None = None,
    seq: int | None = None,
    message: str | None = None,
    ts: float | None = None,
) -> Message:
    """A notice telling the sender of a message on ``topic`` why it was refused."""
    notice = {"v": VERSION, "ts": _now(ts), "topic": topic, "reason": reason}
    return _checked(Kind.REJECTION, notice, field=field, seq=seq, message=message)


def rejection_from_error(
    error: MessageError, *, topic: str, ts: float | None = None
) -> Message:
    """The rejection notice for a message :func:`decode` refused with ``error``.

    The human message is cut to the schema's 1024 characters.
    """
    return rejection(
        topic=topic,
        reason=error.reason,
        field=error.field[:256] if error.field else None,
        seq=error.seq,
        message=str(error)[:1024],
        ts=ts,
    )


def alpha_to_wire(alpha: Alpha) -> float | str:
    """Fairness as the wire carries it: a number, or ``"inf"`` for max-min."""
    if alpha == "inf" or (isinstance(alpha, float) and math.isinf(alpha)):
        return "inf"
    return alpha


def alpha_from_wire(alpha: float | str) -> float:
    """Fairness as a number: ``"inf"`` becomes ``math.inf``."""
    return math.inf if alpha == "inf" else float(alpha)


def _copy(value: Any) -> Any:
    """A copy of a mapping argument; anything else is left for the schema to refuse."""
    return dict(value) if isinstance(value, Mapping) else value


def _now(ts: float | None) -> float:
    return time.time() if ts is None else ts


def _checked(kind: Kind, message: Message, /, **optional: Any) -> Message:
    """Add the optional fields that are set, check the message, return it.

    The check is :func:`encode`'s, which for the plain dicts built here is a
    serialisation and a schema check of the dict, without parsing it back.
    The size limit is left to :func:`dump` or :func:`encode`, when the
    message goes out: it belongs to the transport, and a sender may agree on
    a larger one.
    """
    message.update(
        {name: value for name, value in optional.items() if value is not None}
    )
    encode(kind, message, max_bytes=sys.maxsize)
    return message
