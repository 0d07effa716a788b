"""Connections to the broker for the controller side (daemon and operator tools).

Broker URLs are read by the edge client's parser, so devices and controller
accept exactly the same ``mqtt://`` and ``mqtts://`` forms. paho errors are
turned into :class:`BrokerError` here, where they enter.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from controller.errors import FairsynergyError
from edge_client import EdgeError, parse_broker_url

CONNECT_TIMEOUT_S = 10.0


class BrokerError(FairsynergyError):
    """The broker cannot be reached, refused us, or did not acknowledge."""


@dataclass(frozen=True)
class BrokerOptions:
    """Where the broker is and how to log in: the flags every command shares."""

    url: str
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text().strip()
        except OSError as error:
            raise BrokerError(
                f"cannot read password file {self.password_file}: {error.strerror}"
            ) from None


def make_client(options: BrokerOptions, client_id: str = "") -> paho.Client:
    """A paho client (MQTT 3.1.1) set up for ``options``.

    With a ``client_id`` the session is persistent: the broker keeps the
    subscriptions and queues QoS 1 messages while the client is away (the
    daemon). Without one it is a clean, throwaway session (operator tools).
    """
    try:
        address = parse_broker_url(options.url)
    except EdgeError as error:
        raise BrokerError(str(error)) from None
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=not client_id,
    )
    if options.username is not None:
        client.username_pw_set(options.username, options.password())
    if address.tls:
        try:
            client.tls_set(
                ca_certs=str(options.ca_file) if options.ca_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ssl.SSLError) as error:
            raise BrokerError(
                f"cannot set up TLS with {options.ca_file}: {error}"
            ) from None
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.user_data_set(address)
    return client


def connect(client: paho.Client, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Connect, start the network thread and wait for the broker's CONNACK.

    The client's own ``on_connect`` (if any) keeps running on every later
    reconnect, after this function's bookkeeping.
    """
    address = client.user_data_get()
    accepted = threading.Event()
    refused: list[str] = []
    chained: Any = client.on_connect

    def on_connect(
        c: paho.Client, u: object, f: object, code: ReasonCode, p: object
    ) -> None:
        if code.is_failure:
            refused.append(str(code))
        accepted.set()
        if chained is not None:
            chained(c, u, f, code, p)

    client.on_connect = on_connect
    try:
        client.connect(address.host, address.port, keepalive=30)
    except (OSError, ssl.SSLError) as error:
        raise BrokerError(
            f"cannot reach the broker at {address.url}: {error}"
        ) from None
    client.loop_start()
    if not accepted.wait(timeout) or refused:
        client.loop_stop()
        why = f"refused us: {refused[0]}" if refused else f"no answer in {timeout} s"
        raise BrokerError(f"the broker at {address.url} {why}")


def publish(
    client: paho.Client,
    topic: str,
    payload: bytes,
    *,
    retain: bool,
    wait: float | None = None,
) -> None:
    """Publish at QoS 1; with ``wait``, block until the broker acknowledged."""
    info = client.publish(topic, payload, qos=1, retain=retain)
    if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
        raise BrokerError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
    if wait is not None:
        try:
            info.wait_for_publish(wait)
        except (RuntimeError, ValueError) as error:
            raise BrokerError(f"publish to {topic} failed: {error}") from None
        if not info.is_published():
            raise BrokerError(f"the broker did not acknowledge {topic} in {wait} s")
