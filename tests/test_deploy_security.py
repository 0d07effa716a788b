"""The shipped broker configuration keeps every account to its own topics.

Each test runs a real Mosquitto on deploy/mosquitto/mosquitto.conf and
deploy/mosquitto/acl as shipped: only the port, the account mosquitto runs as
and the paths of the certificates, password file and persistence directory
are rewritten. Accounts are made by ``controller.provision``, certificates by a
throwaway CA (tests/pki.py), and clients connect over TLS, checking the
broker's certificate and hostname as devices do.

Mosquitto drops a refused PUBLISH silently, so "nothing arrived" would prove
nothing on its own. Every denial here is observed by a client that may read
the topic, and only after a positive control has arrived: a message that the
broker must deliver, sent after the refused one (on the same connection, or
after the refused one's PUBACK), so that a leaked message would have been
delivered first.
"""

from __future__ import annotations

import queue
import socket
import ssl
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.reasoncodes import ReasonCode

import schemas
from controller.provision import Account, provision
from edge_client import EdgeClient
from tests.mosquitto import MosquittoBroker
from tests.pki import Pki, make_pki
from tests.secure_broker import (
    TIMEOUT_S,
    Session,
    drop_connection,
    open_session,
    production_config,
    wait_for_log,
)

FLEET = "f1"
AGENTS = ("a1", "a2")
ACCOUNTS = {
    "a1": "agent",
    "a2": "agent",
    "controller": "controller",
    "operator": "operator",
}
PAYLOAD_LIMIT = 64 * 1024


def topic(suffix: str) -> str:
    """``fairsynergy/<FLEET>/<suffix>``."""
    return f"fairsynergy/{FLEET}/{suffix}"


# Every topic of the wire contract for a fleet of two agents, with rejection
# notices under both spellings the ACL allows (see its comments).
CONTRACT_TOPICS = [
    *(
        topic(f"agents/{agent}/{kind}")
        for agent in AGENTS
        for kind in ("telemetry", "status", "allocation")
    ),
    *(topic(f"rejected/agents/{agent}/telemetry") for agent in AGENTS),
    topic("rejected/budget"),
    topic("budget"),
    topic("allocations"),
    topic("controller/status"),
]


def writer_of(name: str) -> str:
    """The one account that may publish on ``name``: the wire contract's table."""
    rest = name.removeprefix(topic(""))
    if rest.startswith("agents/") and rest.endswith(("/telemetry", "/status")):
        return rest.split("/")[1]
    if rest == "budget":
        return "operator"
    return "controller"  # allocations, rejection notices, its own status


def readable_by(account: str) -> set[str]:
    """The contract topics ``account`` may read."""
    if account in ("controller", "operator"):
        return set(CONTRACT_TOPICS)
    return {
        topic(f"agents/{account}/allocation"),
        topic(f"rejected/agents/{account}/telemetry"),
        topic("allocations"),
    }


def writable_by(account: str) -> set[str]:
    """The contract topics ``account`` may write."""
    return {name for name in CONTRACT_TOPICS if writer_of(name) == account}


def payload(writer: str, name: str) -> bytes:
    """A payload that says who wrote it where."""
    return f"{writer} -> {name}".encode()


def is_retained(name: str) -> bool:
    """Whether the contract publishes ``name`` retained."""
    retained = ("/status", "/allocation", "/budget", "/allocations")
    return "/rejected" not in name and name.endswith(retained)


# --- the broker and its accounts ------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and a broker certificate for 127.0.0.1."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass(frozen=True)
class Accounts:
    """The password file made by ``fairsynergy provision`` and the passwords."""

    password_file: Path
    passwords: dict[str, str]


@pytest.fixture(scope="module")
def accounts(tmp_path_factory: pytest.TempPathFactory) -> Accounts:
    """Two agents, the controller and the operator, provisioned as in production."""
    directory = tmp_path_factory.mktemp("accounts")
    password_file = directory / "passwd"
    passwords = {}
    for username, role in ACCOUNTS.items():
        done = provision(Account(username, role=role), password_file, directory)
        passwords[username] = done.secret.read_text()
    return Accounts(password_file, passwords)


@pytest.fixture
def secure_broker(
    mosquitto_factory: Callable[..., MosquittoBroker], pki: Pki, accounts: Accounts
) -> MosquittoBroker:
    """A Mosquitto running the shipped configuration and ACL."""
    return mosquitto_factory(production_config(pki, accounts.password_file))


@pytest.fixture
def login(
    secure_broker: MosquittoBroker, pki: Pki, accounts: Accounts
) -> Iterator[Callable[..., Session]]:
    """Log accounts in to the secure broker; every session is closed after."""
    sessions: list[Session] = []

    def log_in(username: str, **options: Any) -> Session:
        password = accounts.passwords[username]
        session, code = open_session(secure_broker, pki, username, password, **options)
        assert not code.is_failure, f"{username} could not log in: {code}"
        sessions.append(session)
        return session

    yield log_in

    for session in sessions:
        session.close()


# --- every account, every topic ------------------------------------------------


@pytest.mark.parametrize("writer", list(ACCOUNTS))
def test_security_account_publishes_only_on_its_own_topics(
    login: Callable[..., Session], writer: str
) -> None:
    """An account's publishes arrive on its own topics and nowhere else."""
    observer = login("controller" if writer == "operator" else "operator")
    observer.subscribe("fairsynergy/#")
    session = login(writer)
    allowed = sorted(writable_by(writer))
    refused = [name for name in CONTRACT_TOPICS if name not in allowed]

    # Refused first: the allowed ones, on the same connection, are the control.
    for name in [*refused, *allowed]:
        session.publish(name, payload(writer, name), retain=is_retained(name))
    leaked = [observer.receive_until(name, payload(writer, name)) for name in allowed]

    assert allowed, f"{writer} must be allowed to write something"
    assert leaked == [[] for _ in allowed]
    assert observer.quiet() == []


@pytest.mark.parametrize("reader", list(ACCOUNTS))
def test_security_account_receives_only_what_it_may_read(
    login: Callable[..., Session], reader: str
) -> None:
    """An account subscribed to everything receives exactly its readable topics."""
    sessions = {username: login(username) for username in ACCOUNTS}
    sessions[reader].subscribe("#")
    control = (topic("allocations"), b"control")

    for name in CONTRACT_TOPICS:
        writer = writer_of(name)
        sessions[writer].publish(name, payload(writer, name), retain=is_retained(name))
    sessions["controller"].publish(*control)
    received = sessions[reader].receive_until(*control) + sessions[reader].quiet()

    assert sorted(message.topic for message in received) == sorted(readable_by(reader))


# --- retained messages -----------------------------------------------------------


def test_security_agent_cannot_overwrite_a_retained_allocation(
    login: Callable[..., Session],
) -> None:
    """Agents' attempts to replace allocations leave the controller's values."""
    controller = login("controller")
    allocation, summary = topic("agents/a1/allocation"), topic("allocations")
    controller.publish(allocation, b"by the controller", retain=True)
    controller.publish(summary, b"summary by the controller", retain=True)
    agents = [login("a1"), login("a2")]

    for agent in agents:
        agent.publish(allocation, b"forged", retain=True)
        agent.publish(summary, b"forged", retain=True)
    reader = login("operator")
    reader.subscribe(allocation)
    reader.subscribe(summary)

    assert reader.receive_until(allocation, b"by the controller") == []
    assert reader.receive_until(summary, b"summary by the controller") == []
    assert reader.quiet() == []


def test_security_agent_subscription_to_another_agents_allocation_gets_nothing(
    login: Callable[..., Session],
) -> None:
    """The broker grants the subscription (2.0.11) but delivers nothing through it."""
    controller = login("controller")
    for agent in AGENTS:
        controller.publish(
            topic(f"agents/{agent}/allocation"), b"for " + agent.encode(), retain=True
        )
    a2 = login("a2")

    granted = a2.subscribe(topic("agents/a1/allocation"))
    wildcard = a2.subscribe("fairsynergy/+/agents/+/allocation")
    before = a2.receive_until(topic("agents/a2/allocation"), b"for a2")
    controller.publish(topic("agents/a1/allocation"), b"live for a1")
    controller.publish(topic("agents/a2/allocation"), b"live for a2")
    live = a2.receive_until(topic("agents/a2/allocation"), b"live for a2")

    assert [code.value for code in granted + wildcard] == [1, 1]  # granted QoS 1
    assert before == []
    assert live == []
    assert a2.quiet() == []


def test_security_retained_allocation_survives_a_broker_restart(
    login: Callable[..., Session], secure_broker: MosquittoBroker
) -> None:
    """A retained allocation is persisted and still passes the ACL after a restart."""
    controller = login("controller")
    controller.publish(topic("agents/a1/allocation"), b"kept", retain=True)
    controller.close()

    secure_broker.restart()
    agent = login("a1")
    agent.subscribe(topic("agents/a1/allocation"))

    assert agent.receive_until(topic("agents/a1/allocation"), b"kept") == []


# --- identities ------------------------------------------------------------------


def test_security_forged_last_will_is_dropped(
    login: Callable[..., Session], secure_broker: MosquittoBroker
) -> None:
    """A will on another agent's status is dropped; a will on one's own arrives."""
    controller = login("controller")
    controller.subscribe(topic("agents/+/status"))
    status = topic("agents/a1/status")
    forger = login("a2", client_id="forger", will=(status, b"forged will"))
    owner = login("a1", will=(status, b"own will"))

    drop_connection(forger)
    wait_for_log(secure_broker, "Client forger closed its connection")
    drop_connection(owner)

    assert controller.receive_until(status, b"own will") == []
    assert controller.quiet() == []


def test_security_agent_gets_allocations_queued_while_offline(
    login: Callable[..., Session],
) -> None:
    """A persistent session keeps QoS 1 allocations for an agent that was away."""
    controller = login("controller")
    away = login("a1", client_id="device-a1", persistent=True)
    away.subscribe(topic("agents/a1/allocation"))
    away.close()

    controller.publish(topic("agents/a1/allocation"), b"queued")
    back = login("a1", client_id="device-a1", persistent=True)

    assert back.receive_until(topic("agents/a1/allocation"), b"queued") == []


def test_security_borrowed_client_id_gains_nothing(
    login: Callable[..., Session],
) -> None:
    """Taking over another agent's session yields none of its messages."""
    controller = login("controller")
    away = login("a1", client_id="device-a1", persistent=True)
    away.subscribe(topic("agents/a1/allocation"))
    away.close()
    controller.publish(topic("agents/a1/allocation"), b"queued")

    impostor = login("a2", client_id="device-a1", persistent=True)
    impostor.subscribe(topic("agents/a2/allocation"))
    controller.publish(topic("agents/a1/allocation"), b"live")
    controller.publish(topic("agents/a2/allocation"), b"control")

    assert impostor.receive_until(topic("agents/a2/allocation"), b"control") == []
    assert impostor.quiet() == []


# --- connections -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "password"),
    [
        pytest.param(None, None, id="anonymous"),
        pytest.param("a1", "wrong-password", id="wrong-password"),
        pytest.param("a1", "", id="empty-password"),
        pytest.param("intruder", "anything", id="unknown-user"),
    ],
)
def test_security_broker_refuses_bad_credentials(
    secure_broker: MosquittoBroker,
    pki: Pki,
    accounts: Accounts,
    username: str | None,
    password: str | None,
) -> None:
    """Anonymous, unknown and wrong-password logins get CONNACK 'not authorised'."""
    good, good_code = open_session(secure_broker, pki, "a2", accounts.passwords["a2"])
    good.close()

    _, code = open_session(secure_broker, pki, username, password)

    assert not good_code.is_failure
    assert str(code) == "Not authorized"


def test_security_broker_refuses_other_agents_password(
    secure_broker: MosquittoBroker, pki: Pki, accounts: Accounts
) -> None:
    """One agent's password does not open another agent's account."""
    _, code = open_session(secure_broker, pki, "a1", accounts.passwords["a2"])

    assert str(code) == "Not authorized"


def test_security_broker_has_no_plain_text_mqtt(
    secure_broker: MosquittoBroker, accounts: Accounts
) -> None:
    """A valid CONNECT sent without TLS never gets a CONNACK."""
    packet = connect_packet("a1", accounts.passwords["a1"])

    with socket.create_connection((secure_broker.host, secure_broker.port)) as sock:
        sock.settimeout(TIMEOUT_S)
        sock.sendall(packet)
        try:
            answer = sock.recv(4)
        except ConnectionResetError:
            answer = b""

    assert not answer.startswith(b"\x20"), "the broker answered CONNACK in clear"


def connect_packet(username: str, password: str) -> bytes:
    """An MQTT 3.1.1 CONNECT packet with a username and password."""

    def text(value: str) -> bytes:
        data = value.encode()
        return struct.pack("!H", len(data)) + data

    # Protocol name and level 4, flags: username, password, clean session.
    variable = text("MQTT") + bytes([4, 0b1100_0010]) + struct.pack("!H", 60)
    body = variable + text(username) + text(username) + text(password)
    assert len(body) < 128  # one-byte remaining length
    return bytes([0x10, len(body)]) + body


@pytest.mark.parametrize(
    ("version", "accepted"),
    [("TLSv1_1", False), ("TLSv1_2", True), ("TLSv1_3", True)],
)
def test_security_broker_requires_tls_1_2_or_newer(
    secure_broker: MosquittoBroker, pki: Pki, version: str, accepted: bool
) -> None:
    """The broker completes handshakes at TLS 1.2 and 1.3 only."""
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    with warnings.catch_warnings():
        # Python deprecates the old versions; offering one is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = ssl.TLSVersion[version]
    # OpenSSL 3 refuses to offer TLS 1.1 at its default security level.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")

    with socket.create_connection((secure_broker.host, secure_broker.port)) as sock:
        try:
            with context.wrap_socket(sock, server_hostname=secure_broker.host) as tls:
                outcome = tls.version()
        except ssl.SSLError as error:
            outcome = error.reason

    if accepted:
        assert outcome == version.replace("_", ".")
    else:
        # The broker's alert, not the client giving up before asking.
        assert outcome == "TLSV1_ALERT_PROTOCOL_VERSION"


# --- limits ----------------------------------------------------------------------


def test_security_broker_drops_payloads_over_64_kib(
    login: Callable[..., Session],
) -> None:
    """A payload one byte over 64 KiB is dropped; one of exactly 64 KiB passes."""
    controller = login("controller")
    controller.subscribe(topic("agents/a1/telemetry"))
    agent = login("a1")
    too_big, largest = b"x" * (PAYLOAD_LIMIT + 1), b"y" * PAYLOAD_LIMIT

    agent.publish(topic("agents/a1/telemetry"), too_big)
    agent.publish(topic("agents/a1/telemetry"), largest)

    assert controller.receive_until(topic("agents/a1/telemetry"), largest) == []
    assert controller.quiet() == []
    assert agent.disconnects == []


def test_security_mqtt5_publisher_is_told_its_publish_was_refused(
    login: Callable[..., Session],
) -> None:
    """Over MQTT 5 a refused publish gets PUBACK 0x87 instead of silence."""
    agent = login("a1", mqtt5=True)
    pubacks: queue.Queue[ReasonCode] = queue.Queue()
    agent.client.on_publish = lambda _c, _u, _m, code, _p: pubacks.put(code)

    agent.client.publish(topic("budget"), b"forged", qos=1)
    refused = pubacks.get(timeout=TIMEOUT_S)
    agent.client.publish(topic("agents/a1/telemetry"), b"fine", qos=1)
    accepted = pubacks.get(timeout=TIMEOUT_S)

    assert refused.value == 0x87
    assert not accepted.is_failure  # 0x10 "no matching subscribers" here


# --- the edge client on the production broker ------------------------------------


def test_edge_client_connects_over_tls_and_receives_its_allocation(
    secure_broker: MosquittoBroker,
    pki: Pki,
    accounts: Accounts,
    login: Callable[..., Session],
) -> None:
    """EdgeClient logs in over TLS with its password and gets its allocation."""
    controller = login("controller")
    granted = schemas.allocation(epoch=7, cloud={"compute": 2.5}, ts=1.0)
    allocation = topic("agents/a1/allocation")
    controller.publish(
        allocation, schemas.encode(schemas.Kind.ALLOCATION, granted), retain=True
    )
    received: queue.Queue[Any] = queue.Queue()

    client = EdgeClient(
        f"mqtts://{secure_broker.host}:{secure_broker.port}",
        FLEET,
        "a1",
        username="a1",
        password=accounts.passwords["a1"],
        ca_file=pki.ca_cert,
        on_allocation=received.put,
    )
    with client.connect(timeout=TIMEOUT_S):
        got = received.get(timeout=TIMEOUT_S)

    assert (got.epoch, dict(got.cloud)) == (7, {"compute": 2.5})


def test_controller_allocates_over_tls_on_the_production_broker(
    secure_broker: MosquittoBroker,
    pki: Pki,
    accounts: Accounts,
    tmp_path: Path,
) -> None:
    """Controller, operator and agent, each on its own TLS account, close the loop."""
    url = f"mqtts://{secure_broker.host}:{secure_broker.port}"
    secrets = {}
    for username in ("controller", "operator"):
        secrets[username] = tmp_path / f"{username}.password"
        secrets[username].write_text(accounts.passwords[username])
    (tmp_path / "controller.toml").write_text("metrics_port = 0\ndebounce = 0.1\n")
    tls = ["--ca-file", str(pki.ca_cert), "--broker", url, "--fleet", FLEET]
    controller = subprocess.Popen(
        [
            sys.executable, "-m", "controller.cli", "controller", *tls,
            "--db", str(tmp_path / "state.db"),
            "--config", str(tmp_path / "controller.toml"),
            "--username", "controller", "--password-file", str(secrets["controller"]),
        ],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    received: queue.Queue[Any] = queue.Queue()
    agent = EdgeClient(
        url,
        FLEET,
        "a1",
        username="a1",
        password=accounts.passwords["a1"],
        ca_file=pki.ca_cert,
        on_allocation=received.put,
    )

    try:
        budget = subprocess.run(
            [
                sys.executable, "-m", "controller.cli", "budget", *tls,
                "--username", "operator", "--password-file", str(secrets["operator"]),
                "compute=2",
            ],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        with agent.connect(timeout=TIMEOUT_S):
            deadline = time.monotonic() + 20
            while received.empty() and time.monotonic() < deadline:
                agent.report(accuracy=0.5, local={"compute": 0.1}, cloud={})
                time.sleep(0.2)
            got = received.get(timeout=1)
    finally:
        controller.terminate()
        _, errors = controller.communicate(timeout=15)

    assert budget.returncode == 0, budget.stderr
    assert 0 < got.amount("compute") <= 2.0, errors.decode()[-2000:]
    assert controller.returncode == 0
