"""The edge client against a real Mosquitto: presence, reports, allocations, outages."""

from __future__ import annotations

import logging
import queue
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import schemas
from edge_client import (
    Allocation,
    BrokerUnreachableError,
    ClientClosedError,
    EdgeClient,
    EdgeError,
    parse_broker_url,
)
from edge_client._outbox import Outbox, Pending, Tally
from schemas import Kind, MessageError, Topics
from tests.mosquitto import MosquittoBroker, free_port
from tests.pki import make_pki

FLEET, AGENT = "demo", "robot-1"
TOPICS = Topics(FLEET, AGENT)
WAIT_S = 10.0
LOCAL = {"compute": 1.0, "data": 0.5}
CLOUD = {"compute": 0.25}


class Listener:
    """A plain paho subscriber standing in for the controller or an operator.

    It connects with a persistent session (clean start off, one hour expiry),
    so messages published while it is away, such as during a broker restart,
    wait for it; and it subscribes again on every connection.
    """

    def __init__(self, broker: MosquittoBroker, *filters: str, name: str) -> None:
        self.broker = broker
        self.filters = filters or ("fairsynergy/#",)
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.subscribed = queue.Queue[int]()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self.subscribed.put(1)
        self.client.on_message = lambda client, userdata, message: self.messages.put(
            message
        )
        self.client.reconnect_delay_set(1, 1)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600
        self.client.connect(
            broker.host, broker.port, clean_start=False, properties=properties
        )
        self.client.loop_start()
        self.subscribed.get(timeout=WAIT_S)

    def _on_connect(self, client: paho.Client, *args: Any) -> None:
        client.subscribe([(topic, 1) for topic in self.filters])

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(
            WAIT_S
        )

    def next(self, topic: str, timeout: float = WAIT_S) -> paho.MQTTMessage:
        """The next message on ``topic`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if message.topic == topic:
                return message

    def collect(self, topic: str, count: int, timeout: float = WAIT_S) -> list[Any]:
        """Decoded messages on ``topic`` until ``count`` distinct seqs were seen."""
        kind = schemas.parse_topic(topic).kind
        found: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(found) < count:
            message = self.next(topic, deadline - time.monotonic())
            decoded = schemas.decode(kind, message.payload)
            found.setdefault(decoded["seq"], decoded)
        return [found[seq] for seq in sorted(found)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def listen(broker: MosquittoBroker) -> Iterator[Callable[..., Listener]]:
    """Start listeners on the test's broker; all are closed after the test."""
    started: list[Listener] = []

    def start(*filters: str, name: str = "listener") -> Listener:
        listener = Listener(broker, *filters, name=name)
        started.append(listener)
        return listener

    yield start

    for listener in started:
        listener.close()


@pytest.fixture
def edge(broker: MosquittoBroker) -> Iterator[Callable[..., EdgeClient]]:
    """Make edge clients for the test's broker; all are closed after the test."""
    made: list[EdgeClient] = []

    def make(**options: Any) -> EdgeClient:
        options.setdefault("model", "resnet18")
        client = EdgeClient(broker.url, FLEET, options.pop("agent", AGENT), **options)
        made.append(client)
        return client

    yield make

    for client in made:
        client.close(timeout=1)


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.02)


def allocation_payload(epoch: int, compute: float = 0.5) -> bytes:
    return schemas.encode(
        Kind.ALLOCATION, schemas.allocation(epoch=epoch, cloud={"compute": compute})
    )


def test_edge_client_publishes_retained_online_status(
    edge: Callable[..., EdgeClient], listen: Callable[..., Listener]
) -> None:
    """Test the birth status is retained, so a late subscriber sees the agent online."""
    edge().connect(WAIT_S)

    listener = listen(TOPICS.status)
    message = listener.next(TOPICS.status)
    status = schemas.decode(Kind.AGENT_STATUS, message.payload)

    assert message.retain
    assert status["state"] == "online"
    assert status["model"] == "resnet18"
    assert status["client"].startswith("fairsynergy-edge/")


def test_edge_client_last_will_marks_a_killed_agent_offline(
    broker: MosquittoBroker, listen: Callable[..., Listener]
) -> None:
    """Test the broker publishes a retained offline status when the process dies."""
    script = textwrap.dedent(
        """
        import sys, time
        from edge_client import EdgeClient
        EdgeClient(sys.argv[1], "demo", "robot-1").connect(10)
        print("connected", flush=True)
        time.sleep(60)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, broker.url], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "connected"
    listener = listen(TOPICS.status)
    birth = schemas.decode(Kind.AGENT_STATUS, listener.next(TOPICS.status).payload)

    process.kill()
    process.wait()
    process.stdout.close()
    will = listener.next(TOPICS.status)
    late = listen(TOPICS.status, name="late").next(TOPICS.status)

    status = schemas.decode(Kind.AGENT_STATUS, will.payload)
    assert birth["state"] == "online"
    assert status["state"] == "offline"
    # The will was fixed when the connection opened, before the birth.
    assert status["ts"] <= birth["ts"]
    assert late.retain
    assert late.payload == will.payload


def test_edge_client_close_publishes_offline(
    edge: Callable[..., EdgeClient], listen: Callable[..., Listener]
) -> None:
    """Test a clean close leaves a retained offline status (not the will)."""
    client = edge().connect(WAIT_S)
    listener = listen(TOPICS.status)
    listener.next(TOPICS.status)

    client.close()
    status = schemas.decode(Kind.AGENT_STATUS, listener.next(TOPICS.status).payload)

    assert status["state"] == "offline"
    assert status["ts"] > time.time() - WAIT_S


def test_edge_client_report_delivers_valid_telemetry(
    edge: Callable[..., EdgeClient], listen: Callable[..., Listener]
) -> None:
    """Test report fills v, seq, ts, epoch and the model, and the broker gets it."""
    listener = listen(TOPICS.telemetry)
    client = edge().connect(WAIT_S)

    first = client.report(accuracy=0.8, local=LOCAL, cloud=CLOUD, load=3)
    second = client.report(accuracy=0.7, local=LOCAL, cloud={}, model="mobilenet")
    client.flush(WAIT_S)
    received = listener.collect(TOPICS.telemetry, 2)

    assert second == first + 1
    assert [report["seq"] for report in received] == [first, second]
    assert received[0]["accuracy"] == 0.8
    assert received[0]["load"] == 3
    assert received[0]["epoch"] is None
    assert received[0]["model"] == "resnet18"
    assert received[1]["model"] == "mobilenet"
    assert "dropped" not in received[0]
    assert client.stats.delivered == 2


def test_edge_client_receives_allocation_by_callback_and_property(
    edge: Callable[..., EdgeClient], listen: Callable[..., Listener]
) -> None:
    """Test the retained allocation arrives on connect, newer ones after, in order."""
    controller = listen(TOPICS.telemetry, name="controller")
    controller.publish(TOPICS.allocation, allocation_payload(4), retain=True)
    seen: queue.Queue[Allocation] = queue.Queue()

    client = edge(on_allocation=seen.put).connect(WAIT_S)
    first = seen.get(timeout=WAIT_S)
    controller.publish(
        TOPICS.allocation, allocation_payload(5, compute=0.75), retain=True
    )
    second = seen.get(timeout=WAIT_S)
    client.report(accuracy=0.8, local=LOCAL, cloud=CLOUD)
    report = controller.collect(TOPICS.telemetry, 1)[0]

    assert (first.epoch, second.epoch) == (4, 5)
    assert second.amount("compute") == 0.75
    assert second.amount("data") == 0.0
    assert client.allocation == second
    assert report["epoch"] == 5


def test_edge_client_ignores_stale_and_malformed_allocations(
    edge: Callable[..., EdgeClient],
    listen: Callable[..., Listener],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Test bad allocations are ignored, counted and logged, and the client goes on."""
    controller = listen(TOPICS.telemetry, name="controller")
    seen: queue.Queue[Allocation] = queue.Queue()
    client = edge(on_allocation=seen.put).connect(WAIT_S)
    controller.publish(TOPICS.allocation, allocation_payload(7))
    seen.get(timeout=WAIT_S)

    with caplog.at_level(logging.WARNING, logger="edge_client"):
        controller.publish(TOPICS.allocation, allocation_payload(3))
        controller.publish(TOPICS.allocation, b"{not json")
        controller.publish(TOPICS.allocation, b'{"v": 1, "epoch": 9}')
        controller.publish(TOPICS.allocation, b"x" * (schemas.MAX_PAYLOAD_BYTES + 1))
        controller.publish(TOPICS.allocation, allocation_payload(7))
        controller.publish(TOPICS.allocation, allocation_payload(8))
        newest = seen.get(timeout=WAIT_S)

    warnings = [record.getMessage() for record in caplog.records]
    assert newest.epoch == 8
    assert seen.empty()
    assert client.stats.ignored_allocations == 4
    assert any(
        "stale allocation ignored: epoch 3 < held 7" in line for line in warnings
    )
    assert any("malformed allocation ignored" in line for line in warnings)
    assert not any("x" * 100 in line for line in warnings)


def test_edge_client_callback_errors_do_not_stop_the_client(
    edge: Callable[..., EdgeClient],
    listen: Callable[..., Listener],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Test an exception in on_allocation is logged and later allocations land."""
    controller = listen(TOPICS.telemetry, name="controller")

    def explode(allocation: Allocation) -> None:
        raise RuntimeError("application bug")

    client = edge(on_allocation=explode).connect(WAIT_S)
    with caplog.at_level(logging.ERROR, logger="edge_client"):
        controller.publish(TOPICS.allocation, allocation_payload(1))
        controller.publish(TOPICS.allocation, allocation_payload(2))
        wait_until(
            lambda: client.allocation is not None and client.allocation.epoch == 2
        )

    assert any("callback" in record.getMessage() for record in caplog.records)


def test_edge_client_counts_and_reports_rejection_notices(
    edge: Callable[..., EdgeClient], listen: Callable[..., Listener]
) -> None:
    """Test a rejection notice about this agent reaches on_rejection and the stats."""
    controller = listen(TOPICS.telemetry, name="controller")
    notices: queue.Queue[dict[str, Any]] = queue.Queue()
    client = edge(on_rejection=notices.put).connect(WAIT_S)
    notice = schemas.rejection(
        topic=TOPICS.telemetry, reason="stale_seq", seq=12, message="seq went back"
    )

    controller.publish(
        schemas.rejection_topic(TOPICS.telemetry),
        schemas.encode(Kind.REJECTION, notice),
    )
    received = notices.get(timeout=WAIT_S)

    assert received == notice
    assert client.stats.rejections == 1


def test_edge_client_survives_a_broker_restart_without_silent_loss(
    broker: MosquittoBroker,
    edge: Callable[..., EdgeClient],
    listen: Callable[..., Listener],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Test reports made while the broker is down arrive after it returns."""
    controller = listen(TOPICS.telemetry, name="controller")
    controller.publish(TOPICS.allocation, allocation_payload(1), retain=True)
    client = edge().connect(WAIT_S)
    wait_until(lambda: client.allocation is not None)
    before = [client.report(accuracy=0.8, local=LOCAL, cloud=CLOUD) for _ in range(3)]
    client.flush(WAIT_S)

    with caplog.at_level(logging.DEBUG, logger="edge_client"):
        broker.stop()
        during = [
            client.report(accuracy=0.6, local=LOCAL, cloud=CLOUD) for _ in range(5)
        ]
        broker.start()
        client.flush(WAIT_S)
        wait_until(lambda: "allocation epoch 1 already held" in caplog.text)
    received = controller.collect(TOPICS.telemetry, 8)

    assert [report["seq"] for report in received] == before + during
    assert client.stats.connects == 2
    assert client.stats.delivered == 8
    assert client.dropped == 0


def test_edge_client_counts_overflow_while_the_broker_is_down(
    broker: MosquittoBroker,
    edge: Callable[..., EdgeClient],
    listen: Callable[..., Listener],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Test a full buffer drops the oldest reports, counts them and says so."""
    controller = listen(TOPICS.telemetry, name="controller")
    client = edge(buffer_size=3).connect(WAIT_S)

    broker.stop()
    wait_until(lambda: not client.connected)
    with caplog.at_level(logging.WARNING, logger="edge_client"):
        seqs = [client.report(accuracy=0.5, local=LOCAL, cloud=CLOUD) for _ in range(6)]
    pending = client.pending
    broker.start()
    client.flush(WAIT_S)
    received = controller.collect(TOPICS.telemetry, 3)

    stats = client.stats
    assert pending == 3
    assert [report["seq"] for report in received] == seqs[3:]
    assert [report["dropped"] for report in received] == [1, 2, 3]
    assert (stats.reported, stats.delivered, stats.dropped) == (6, 3, 3)
    assert f"telemetry seq {seqs[0]} dropped" in caplog.text


def test_edge_client_close_counts_what_it_could_not_send(
    broker: MosquittoBroker,
    edge: Callable[..., EdgeClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Test closing while the broker is away counts unsent reports as dropped."""
    client = edge().connect(WAIT_S)
    broker.stop()
    wait_until(lambda: not client.connected)
    for _ in range(2):
        client.report(accuracy=0.5, local=LOCAL, cloud=CLOUD)

    with caplog.at_level(logging.WARNING, logger="edge_client"):
        client.close(timeout=0.5)

    stats = client.stats
    assert (stats.reported, stats.delivered, stats.dropped, stats.pending) == (
        2,
        0,
        2,
        0,
    )
    assert "still unsent when the client closed" in caplog.text
    with pytest.raises(ClientClosedError):
        client.report(accuracy=0.5, local=LOCAL, cloud=CLOUD)


def test_edge_client_counts_reports_the_broker_refuses(
    mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path
) -> None:
    """Test a report refused by the broker's access rules is counted as dropped."""
    acl = tmp_path / "acl"
    acl.write_text(
        "topic read fairsynergy/#\ntopic write fairsynergy/+/agents/+/status\n"
    )
    broker = mosquitto_factory(
        "user {user}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
        f"acl_file {acl}\n"
    )
    client = EdgeClient(broker.url, FLEET, AGENT).connect(WAIT_S)

    client.report(accuracy=0.5, local=LOCAL, cloud=CLOUD)
    wait_until(lambda: client.pending == 0)
    client.close()

    assert (client.stats.delivered, client.stats.dropped) == (0, 1)


def test_edge_client_connects_over_tls_with_a_ca_file(
    mosquitto_factory: Callable[..., MosquittoBroker],
    tmp_path: Path,
) -> None:
    """Test mqtts:// with a CA file verifies the broker and delivers reports."""
    pki = make_pki(tmp_path / "pki")
    broker = mosquitto_factory(
        "user {user}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
        f"cafile {pki.ca_cert}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
    )
    url = f"mqtts://localhost:{broker.port}"

    with EdgeClient(url, FLEET, AGENT, ca_file=pki.ca_cert) as client:
        client.wait_connected(WAIT_S)
        client.report(accuracy=0.5, local=LOCAL, cloud=CLOUD)
        client.flush(WAIT_S)

    assert client.stats.delivered == 1


def test_edge_client_unreachable_broker_raises_with_the_reason() -> None:
    """Test connect gives up after its timeout with an error naming the cause."""
    url = f"mqtt://127.0.0.1:{free_port()}"
    client = EdgeClient(url, FLEET, AGENT)

    with pytest.raises(
        BrokerUnreachableError, match=r"not reachable within 0\.5 s"
    ) as caught:
        client.connect(timeout=0.5)
    client.close(timeout=0)

    assert "refused" in str(caught.value).lower()
    assert url in str(caught.value)


def test_edge_client_seq_keeps_increasing_across_restarts(tmp_path: Path) -> None:
    """Test a new client continues after the seq saved by the previous one."""
    state = tmp_path / "edge-state.json"
    first = EdgeClient("mqtt://127.0.0.1:1", FLEET, AGENT, state_file=state)
    seqs = [first.report(accuracy=0.5, local={}, cloud={}) for _ in range(3)]
    first.close()

    second = EdgeClient("mqtt://127.0.0.1:1", FLEET, AGENT, state_file=state)
    later = second.report(accuracy=0.5, local={}, cloud={})
    clock_only = EdgeClient("mqtt://127.0.0.1:1", FLEET, AGENT)

    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
    assert later > seqs[-1]
    # Without a state file the count starts from the clock, in milliseconds.
    assert abs(clock_only.last_seq + 1 - time.time() * 1000) < 60_000


def test_edge_client_bad_report_arguments_raise_and_use_no_seq() -> None:
    """Test invalid telemetry fails at the call and leaves the seq untouched."""
    client = EdgeClient("mqtt://127.0.0.1:1", FLEET, AGENT)
    before = client.last_seq

    with pytest.raises(MessageError) as caught:
        client.report(accuracy=1.5, local=LOCAL, cloud=CLOUD)

    assert caught.value.field == "accuracy"
    assert client.last_seq == before
    assert client.stats.reported == 0


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://broker.local", "broker.local", 1883, False),
        ("mqtts://broker.local", "broker.local", 8883, True),
        ("mqtt://10.0.0.2:1884", "10.0.0.2", 1884, False),
        ("mqtts://[::1]:9999/", "::1", 9999, True),
    ],
)
def test_edge_client_reads_broker_urls(
    url: str, host: str, port: int, tls: bool
) -> None:
    """Test mqtt:// and mqtts:// URLs give host, default port and TLS."""
    address = parse_broker_url(url)

    assert (address.host, address.port, address.tls) == (host, port, tls)


@pytest.mark.parametrize(
    "url",
    [
        "http://broker",
        "broker:1883",
        "mqtt://",
        "mqtt://u:p@broker",
        "mqtt://b/x",
        "mqtt://b:0x",
    ],
)
def test_edge_client_refuses_other_broker_urls(url: str) -> None:
    """Test a URL other than mqtt(s)://host[:port] is refused, showing the form."""
    with pytest.raises(EdgeError, match="mqtt"):
        parse_broker_url(url)


def test_edge_client_does_not_configure_logging() -> None:
    """Test creating and using a client adds no handler and sets no level."""
    root, ours = logging.getLogger(), logging.getLogger("edge_client")
    before = (list(root.handlers), root.level, list(ours.handlers), ours.level)

    client = EdgeClient("mqtt://127.0.0.1:1", FLEET, AGENT)
    client.report(accuracy=0.5, local={}, cloud={})
    client.close()

    assert (list(root.handlers), root.level, list(ours.handlers), ours.level) == before


def make_outbox(capacity: int, window: int = 2) -> Outbox:
    return Outbox(capacity, window, logging.getLogger("test.outbox"))


def take(outbox: Outbox) -> Pending:
    """The next report to send; fails the test if there is none."""
    report = outbox.take()
    assert report is not None
    return report


def test_edge_client_outbox_drops_the_oldest_waiting_report() -> None:
    """Test a full outbox evicts the oldest waiting report, never one in flight."""
    outbox = make_outbox(capacity=3, window=1)
    for seq in range(3):
        outbox.add(Pending(seq, b"{}"))
    in_flight = take(outbox)
    outbox.handed(in_flight, mid=11)

    outbox.add(Pending(3, b"{}"))
    blocked = outbox.take()  # the window of 1 is taken by seq 0
    outbox.settle(11, refusal=None)

    assert in_flight.seq == 0
    assert blocked is None
    assert take(outbox) == Pending(2, b"{}")  # seq 1 was evicted
    assert outbox.tally() == Tally(reported=4, delivered=1, dropped=1, pending=2)


def test_edge_client_outbox_drops_the_new_report_when_all_are_in_flight() -> None:
    """Test a report that finds every slot in flight is the one dropped."""
    outbox = make_outbox(capacity=1, window=1)
    outbox.add(Pending(1, b"{}"))
    outbox.handed(take(outbox), mid=5)

    dropped_field = outbox.dropped_with_next()
    outbox.add(Pending(2, b"{}"))

    assert dropped_field == 1
    assert outbox.take() is None
    assert outbox.tally() == Tally(reported=2, delivered=0, dropped=1, pending=1)


def test_edge_client_outbox_accounts_for_every_report() -> None:
    """Test delivered + dropped + pending == reported through every path."""
    outbox = make_outbox(capacity=4, window=2)
    for seq in range(6):
        outbox.add(Pending(seq, b"{}"))
    outbox.handed(take(outbox), mid=1)
    outbox.handed(take(outbox), mid=None)  # paho refused it
    outbox.settle(1, refusal=None)
    outbox.settle(99, refusal=None)  # not a report: ignored
    outbox.handed(take(outbox), mid=2)
    outbox.settle(2, refusal="Not authorized")

    before_close = outbox.tally()
    outbox.abandon("closing")
    after_close = outbox.tally()

    assert before_close == Tally(reported=6, delivered=1, dropped=4, pending=1)
    assert after_close == Tally(reported=6, delivered=1, dropped=5, pending=0)
    assert outbox.wait_settled(0)
