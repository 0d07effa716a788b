"""The edge client's errors: one base, raised instead of paho's or the OS's."""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every error the edge client raises on purpose.

    Errors from paho-mqtt, sockets and TLS are turned into one of these where
    they enter, with the broker address and what to try next in the message.
    Invalid telemetry arguments raise :class:`schemas.MessageError` (a
    ``ValueError``) instead, since they are a programming error at the call.
    """


class BrokerUnreachableError(EdgeError):
    """No connection to the broker was accepted within the time allowed."""


class DeliveryTimeoutError(EdgeError):
    """Reports were not acknowledged by the broker within the time allowed."""


class ClientClosedError(EdgeError):
    """The client was used after :meth:`EdgeClient.close`."""
