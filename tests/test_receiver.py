"""The telemetry receiver: a child process that forwards what it hears in batches."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from controller.broker import BrokerError, BrokerOptions
from controller.receiver import Receiver

TOPIC = "fairsynergy/lab/agents/+/telemetry"


def publish_all(host: str, port: int, count: int) -> None:
    """Publish ``count`` numbered messages at QoS 1 and wait until all are out."""
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.connect(host, port)
    client.loop_start()
    infos = [
        client.publish(f"fairsynergy/lab/agents/a{i % 7}/telemetry", str(i), qos=1)
        for i in range(count)
    ]
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def test_receiver_forwards_every_message_in_order(broker):
    """Each message arrives once, in the broker's order, with its topic and time."""
    receiver = Receiver(BrokerOptions(broker.url), "test-receiver", [(TOPIC, 0)])
    try:
        receiver.wait_ready()
        started = time.time()
        publish_all(broker.host, broker.port, 2000)

        received: list[tuple[str, bytes, float]] = []
        while len(received) < 2000:
            received.extend(receiver.receive())
    finally:
        receiver.close()

    assert [int(payload) for _, payload, _ in received] == list(range(2000))
    assert received[8][0] == "fairsynergy/lab/agents/a1/telemetry"
    assert all(at >= started - 1.0 for _, _, at in received)


def test_receiver_stops_when_the_daemon_closes_it(broker):
    """Closing the daemon's end ends the child process promptly."""
    receiver = Receiver(BrokerOptions(broker.url), "test-receiver", [(TOPIC, 0)])
    receiver.wait_ready()

    receiver.close()

    assert not receiver.process.is_alive()


def test_receiver_reports_a_broker_it_cannot_reach(broker):
    """A wrong address surfaces as the broker error, not as a silent child."""
    url = f"mqtt://127.0.0.1:{broker.port}"
    broker.stop()
    receiver = Receiver(BrokerOptions(url), "test-receiver", [(TOPIC, 0)])
    try:
        with pytest.raises(BrokerError, match="cannot reach the broker"):
            receiver.wait_ready()
    finally:
        receiver.close()


def test_receiver_closed_under_a_waiting_reader_reads_as_the_end(broker):
    """A thread blocked in receive() gets EOFError when the daemon closes the pipe."""
    receiver = Receiver(BrokerOptions(broker.url), "test-receiver", [(TOPIC, 0)])
    receiver.wait_ready()
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            receiver.receive()
        except BaseException as error:
            outcome.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.2)
    receiver.close()
    reader.join(5)

    assert [type(error) for error in outcome] == [EOFError]
