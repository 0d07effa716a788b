"""The contract's errors: one base, one kind for messages, one for topics."""

from __future__ import annotations


class ContractError(ValueError):
    """Base of every error raised by :mod:`schemas`: the input breaks the contract."""


class MessageError(ContractError):
    """A payload or message that is not a valid message of its kind.

    Attributes:
        kind: the message kind that was expected, such as ``"telemetry"``.
        reason: a short, stable machine code: ``too_large``, ``not_json``,
            ``version`` or ``schema``. Rejection notices carry the same code.
        field: dotted path of the offending field (``"cloud.compute"``), or
            None when the problem is not one field.
        seq: the message's ``seq`` when it could be read, else None, so a
            rejection notice can name the refused report.
    """

    def __init__(
        self,
        kind: str,
        reason: str,
        message: str,
        *,
        field: str | None = None,
        seq: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason
        self.field = field
        self.seq = seq


class TopicError(ContractError):
    """A topic, fleet id, agent id or resource name that breaks the naming rules."""
