"""Broker URLs: ``mqtt://host[:1883]`` or ``mqtts://host[:8883]``."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from edge_client.errors import EdgeError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the broker listens, and whether to speak TLS to it."""

    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        """The address written back as a URL (for messages and environments)."""
        scheme = "mqtts" if self.tls else "mqtt"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Read a broker URL; credentials go in separate options, never the URL.

    Raises:
        EdgeError: the URL has another scheme, no host, a path, credentials or
            a port outside 1..65535.
    """
    expected = "expected mqtt://host[:port] or mqtts://host[:port]"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise EdgeError(
            f"broker URL {url!r} is not valid ({error}): {expected}"
        ) from None

    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise EdgeError(f"broker URL {url!r} is not valid: {expected}")
    if parts.username is not None or parts.password is not None:
        raise EdgeError(
            f"broker URL {parts.scheme}://...@{parts.hostname} carries credentials: "
            "pass them as username and password (or --password-file) instead"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EdgeError(f"broker URL {url!r} has a path or query: {expected}")

    return BrokerAddress(
        host=parts.hostname,
        port=port if port is not None else DEFAULT_PORTS[parts.scheme],
        tls=parts.scheme == "mqtts",
    )
