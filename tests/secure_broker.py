"""A Mosquitto running the shipped production configuration, and TLS clients.

:func:`production_config` turns deploy/mosquitto/mosquitto.conf into a template
for the ``mosquitto_factory`` fixture, changing only what must differ on a test
machine: the port, the account mosquitto runs as and the paths of the
certificates, password file and persistence directory. The ACL is the shipped
file itself. :class:`Session` is a paho client over TLS that records what the
broker sent it, for tests that prove what an account can and cannot do.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.mosquitto import MosquittoBroker
from tests.pki import Pki

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
ACL = ROOT / "deploy" / "mosquitto" / "acl"

# How long to wait for something that must happen (slow CI included), and how
# long to keep listening, after a control message arrived, for something that
# must not happen.
TIMEOUT_S = 5.0
QUIET_S = 0.3


def production_config(pki: Pki, password_file: Path) -> str:
    """deploy/mosquitto/mosquitto.conf with only its paths, port and user changed.

    The result is a template for ``mosquitto_factory``. Each rewritten directive
    must appear exactly once, so a renamed or duplicated one fails loudly.
    """
    rewrites = {
        "user": "{user}",
        "listener": "{port} 127.0.0.1",
        "certfile": str(pki.server_cert),
        "keyfile": str(pki.server_key),
        "cafile": str(pki.ca_cert),
        "password_file": str(password_file),
        "acl_file": str(ACL),
        "persistence_location": "{dir}/",
    }
    seen = dict.fromkeys(rewrites, 0)
    lines = []
    for line in CONF.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key in rewrites:
            seen[key] += 1
            lines.append(f"{key} {rewrites[key]}")
        else:
            lines.append(line.replace("{", "{{").replace("}", "}}"))

    assert seen == dict.fromkeys(rewrites, 1), f"{CONF} must set each once: {seen}"
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Received:
    """One message as a client received it."""

    topic: str
    payload: bytes
    retain: bool


@dataclass
class Session:
    """One MQTT client over TLS, and what the broker sent it."""

    client: mqtt.Client
    messages: queue.Queue[Received] = field(default_factory=queue.Queue)
    connacks: queue.Queue[ReasonCode] = field(default_factory=queue.Queue)
    subacks: queue.Queue[list[ReasonCode]] = field(default_factory=queue.Queue)
    disconnects: list[ReasonCode] = field(default_factory=list)

    def publish(self, name: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        info = self.client.publish(name, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT_S)
        assert info.is_published(), f"no PUBACK for {name}"

    def subscribe(self, name: str) -> list[ReasonCode]:
        """Subscribe at QoS 1; return the SUBACK's reason codes."""
        self.client.subscribe(name, qos=1)
        return self.subacks.get(timeout=TIMEOUT_S)

    def receive_until(self, name: str, payload: bytes) -> list[Received]:
        """Wait for the control message (name, payload); return what came before."""
        before: list[Received] = []
        deadline = time.monotonic() + TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if (message.topic, message.payload) == (name, payload):
                return before
            before.append(message)
        pytest.fail(f"the control message on {name} never arrived; got {before}")

    def quiet(self) -> list[Received]:
        """Listen for QUIET_S more; return whatever arrived meanwhile."""
        time.sleep(QUIET_S)
        found = []
        while not self.messages.empty():
            found.append(self.messages.get_nowait())
        return found

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def open_session(
    broker: MosquittoBroker,
    pki: Pki,
    username: str | None,
    password: str | None,
    *,
    mqtt5: bool = False,
    client_id: str = "",
    persistent: bool = False,
    will: tuple[str, bytes] | None = None,
) -> tuple[Session, ReasonCode]:
    """Connect over TLS and wait for the CONNACK; return the session and its code.

    ``persistent`` asks for a session that outlives the connection (MQTT 3.1.1
    clean session off; needs a ``client_id``).
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
        clean_session=None if mqtt5 else not persistent,
    )
    client.tls_set(ca_certs=str(pki.ca_cert))
    if username is not None:
        client.username_pw_set(username, password)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    session = Session(client)
    listen(session)

    client.connect(broker.host, broker.port)
    client.loop_start()
    code = session.connacks.get(timeout=TIMEOUT_S)
    if code.is_failure:
        client.loop_stop()  # or paho keeps retrying

    return session, code


def listen(session: Session) -> None:
    """Route the client's callbacks into the session's queues."""

    def on_connect(
        _c: object, _u: object, _f: object, code: ReasonCode, _p: object
    ) -> None:
        session.connacks.put(code)

    def on_subscribe(
        _c: object, _u: object, _m: int, codes: list[ReasonCode], _p: object
    ) -> None:
        session.subacks.put(codes)

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        session.messages.put(
            Received(message.topic, bytes(message.payload), message.retain)
        )

    def on_disconnect(
        _c: object, _u: object, _f: object, code: ReasonCode, _p: object
    ) -> None:
        session.disconnects.append(code)

    session.client.on_connect = on_connect
    session.client.on_subscribe = on_subscribe
    session.client.on_message = on_message
    session.client.on_disconnect = on_disconnect


def drop_connection(session: Session) -> None:
    """Cut the TCP connection without DISCONNECT, as a crashed device would."""
    session.client.loop_stop()
    sock = session.client.socket()
    assert sock is not None
    sock.close()


def wait_for_log(broker: MosquittoBroker, text: str) -> None:
    """Wait until the broker's log mentions ``text``."""
    deadline = time.monotonic() + TIMEOUT_S
    while text not in broker.log():
        if time.monotonic() > deadline:
            pytest.fail(f"broker never logged {text!r}:\n{broker.log()}")
        time.sleep(0.02)
