"""The allocation publisher: a child process that publishes what the daemon hands it."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import schemas
from controller.broker import BrokerError, BrokerOptions, connect, make_client
from controller.publisher import (
    Batch,
    EpochShares,
    Outbox,
    Publisher,
    PublisherGoneError,
    _Ahead,
    _send_epoch,
)
from schemas import Kind

TOPIC = "fairsynergy/lab/agents/{}/allocation"


class Listener:
    """A subscriber that keeps every message it receives, with its retain flag."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.received: list[tuple[str, bytes, bool]] = []
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(5)

    def _on_message(self, _c: object, _u: object, message: paho.MQTTMessage) -> None:
        self.received.append((message.topic, bytes(message.payload), message.retain))

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_publisher_publishes_every_message_in_order(broker):
    """Each message handed over reaches a subscriber once, in order."""
    listener = Listener(broker.host, broker.port, TOPIC.format("+"))
    publisher = Publisher(BrokerOptions(broker.url), "test-publisher", "lab")
    try:
        publisher.wait_ready()
        for start in range(0, 2000, 500):
            publisher.send(
                [
                    (TOPIC.format(f"a{i % 7}"), str(i).encode(), True)
                    for i in range(start, start + 500)
                ]
            )
        listener.wait_for(2000)
    finally:
        publisher.close()
        listener.close()

    assert [int(payload) for _, payload, _ in listener.received] == list(range(2000))
    assert listener.received[8][0] == TOPIC.format("a1")


def test_publisher_keeps_retained_messages_and_their_clearing(broker):
    """The last retained message per topic stays; an empty payload clears it."""
    publisher = Publisher(BrokerOptions(broker.url), "test-publisher", "lab")
    publisher.wait_ready()
    publisher.send(
        [(TOPIC.format("a1"), b"old", True), (TOPIC.format("a2"), b"two", True)]
    )
    publisher.send(
        [(TOPIC.format("a1"), b"new", True), (TOPIC.format("a2"), b"", True)]
    )

    publisher.close()
    late = Listener(broker.host, broker.port, TOPIC.format("+"))
    late.wait_for(1, timeout=2.0)
    time.sleep(0.2)  # a cleared topic would have arrived with the other
    late.close()

    assert late.received == [(TOPIC.format("a1"), b"new", True)]


def test_publisher_close_waits_for_what_is_queued(broker):
    """Closing right after a large hand-over still gets every message out."""
    listener = Listener(broker.host, broker.port, TOPIC.format("+"))
    publisher = Publisher(BrokerOptions(broker.url), "test-publisher", "lab")
    publisher.wait_ready()

    publisher.send([(TOPIC.format(f"a{i}"), b"x", False) for i in range(3000)])
    publisher.close()
    listener.wait_for(3000)
    listener.close()

    assert len(listener.received) == 3000
    assert not publisher.process.is_alive()


def test_publisher_holds_only_the_newest_per_topic_while_the_broker_is_away(broker):
    """Thirty rounds handed over while the broker is down go out as one each."""
    publisher = Publisher(BrokerOptions(broker.url), "test-publisher", "lab")
    publisher.wait_ready()
    broker.stop()
    time.sleep(0.5)  # paho notices the closed connection
    for round_ in range(1, 31):
        publisher.send(
            [(TOPIC.format(f"a{i}"), str(round_).encode(), True) for i in range(3)]
        )
    time.sleep(0.5)  # the publisher has taken in every round
    broker.start()
    listener = Listener(broker.host, broker.port, TOPIC.format("+"))
    try:
        listener.wait_for(3, timeout=20.0)
        time.sleep(0.5)  # anything more would have followed at once
    finally:
        publisher.close()
        listener.close()

    received = [(topic, payload) for topic, payload, _ in listener.received]
    assert received == [(TOPIC.format(f"a{i}"), b"30") for i in range(3)]


def test_publisher_reports_a_broker_it_cannot_reach(broker):
    """A wrong address surfaces as the broker error, and sending then fails."""
    url = f"mqtt://127.0.0.1:{broker.port}"
    broker.stop()
    publisher = Publisher(BrokerOptions(url), "test-publisher", "lab")
    try:
        with pytest.raises(BrokerError, match="cannot reach the broker"):
            publisher.wait_ready()
        publisher.process.join(5)
        with pytest.raises(PublisherGoneError):
            publisher.send([(TOPIC.format("a1"), b"x", True)])
    finally:
        publisher.close()

    assert not publisher.alive()


ORPHANING_DAEMON = """
import os, signal, sys
from controller.broker import BrokerOptions
from controller.publisher import Publisher

if __name__ == "__main__":
    publisher = Publisher(BrokerOptions(sys.argv[1]), "test-orphan", "lab")
    publisher.wait_ready()
    topic = sys.argv[2]
    # send() returns once the child has read the whole list from the pipe.
    publisher.send([(topic.format(i % 50), b"x" * 100, True) for i in range(20_000)])
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_publisher_stops_publishing_once_its_daemon_is_killed(broker, tmp_path):
    """What a killed daemon left queued is not published after its death."""
    listener = Listener(broker.host, broker.port, TOPIC.format("+"))
    script = tmp_path / "daemon.py"
    script.write_text(ORPHANING_DAEMON)
    try:
        daemon = subprocess.run(
            [sys.executable, str(script), broker.url, TOPIC],
            cwd=Path(__file__).resolve().parent.parent,
            timeout=60,
        )
        count, still = -1, time.monotonic()
        while time.monotonic() - still < 1.0:  # until a second without messages
            if len(listener.received) != count:
                count, still = len(listener.received), time.monotonic()
            time.sleep(0.05)
    finally:
        listener.close()

    assert daemon.returncode == -signal.SIGKILL
    # Left alone, the orphan would publish all 20,000 (about two seconds).
    assert len(listener.received) < 1_000


def epoch_shares() -> EpochShares:
    """Four agents: two granted anew, one keeping an older grant, one away."""
    return EpochShares(
        epoch=5,
        ts=100.0,
        alpha=1.0,
        budget={"compute": 4.0, "data": 2.0},
        prices={"compute": 0.25, "data": 0.5},
        resources=("compute", "data"),
        agents=["a1", "a2", "a3", "gone"],
        cloud=np.array([[1.0, 0.5], [2.0, 0.0], [0.5, 1.0], [0.25, 0.25]]),
        held=np.array([[1.0, 0.5], [2.0, 0.5], [0.5, 1.0], [0.25, 0.25]]),
        expected=np.array([0.7, 0.8, 0.6, np.nan]),
        epochs=np.array([5, 5, 4, 3]),
        published_at=np.array([100.0, 100.0, 90.0, 80.0]),
        expires=np.array([160.0, 160.0, 150.0, 140.0]),
        publish=np.array([True, True, False, False]),
        away=np.array([False, False, False, True]),
    )


def test_publisher_sends_an_epoch_as_allocations_then_summary(broker):
    """An epoch goes out as a checked allocation per changed agent, then the summary."""
    listener = Listener(broker.host, broker.port, "fairsynergy/lab/#")
    publisher = Publisher(BrokerOptions(broker.url), "test-publisher", "lab")
    publisher.wait_ready()

    publisher.send(epoch_shares())
    listener.wait_for(3)
    publisher.close()
    listener.close()

    topics = [topic for topic, _, _ in listener.received]
    assert topics == [
        "fairsynergy/lab/agents/a1/allocation",
        "fairsynergy/lab/agents/a2/allocation",
        "fairsynergy/lab/allocations",
    ]
    first = schemas.decode(Kind.ALLOCATION, listener.received[0][1])
    assert first["cloud"] == {"compute": 1.0, "data": 0.5}
    assert (first["epoch"], first["expires"], first["expected_accuracy"]) == (
        5,
        160.0,
        0.7,
    )
    summary = schemas.decode(Kind.FLEET_SUMMARY, listener.received[2][1])
    assert summary["agents"]["a3"] == {
        "cloud": {"compute": 0.5, "data": 1.0},
        "expected_accuracy": 0.6,
        "epoch": 4,
        "expires": 150.0,
    }
    assert "expected_accuracy" not in summary["agents"]["gone"]


def numbered_epoch(epoch: int, agents: list[str], publish: list[str]) -> EpochShares:
    """An epoch granting agent ``a<i>`` ``epoch + i / 1000`` of compute."""
    n = len(agents)
    cloud = epoch + np.arange(n, dtype=float)[:, None] / 1000 * np.ones((1, 2))
    return EpochShares(
        epoch=epoch,
        ts=100.0 + epoch,
        alpha=1.0,
        budget={"compute": 1e6, "data": 1e6},
        prices={"compute": 0.1, "data": 0.1},
        resources=("compute", "data"),
        agents=agents,
        cloud=cloud,
        held=cloud,
        expected=np.full(n, 0.5),
        epochs=np.full(n, epoch),
        published_at=np.full(n, 100.0 + epoch),
        expires=np.full(n, 200.0 + epoch),
        publish=np.isin(agents, publish),
        away=np.zeros(n, dtype=bool),
    )


def test_publisher_passes_over_what_a_waiting_epoch_supersedes(broker):
    """An epoch already waiting behind another replaces its allocations and summary.

    Epoch 2 is in the pipe before epoch 1 starts going out: the agents it
    publishes again are not sent epoch 1's allocation, and epoch 1's
    summary is not sent; everything else is, and epoch 2 then in full.
    """
    agents = [f"a{i}" for i in range(300)]
    first = numbered_epoch(1, agents, agents)
    second = numbered_epoch(2, agents, agents[::3])
    listener = Listener(broker.host, broker.port, "fairsynergy/lab/#")
    client = make_client(BrokerOptions(broker.url), "test-look-ahead")
    connect(client)
    outbox = Outbox(client)
    waiting: deque[Batch | None] = deque()
    daemon_end, child_end = multiprocessing.Pipe()
    daemon_end.send(second)
    topics, parent = schemas.Topics("lab"), os.getppid()
    try:
        assert _send_epoch(first, topics, outbox, parent, _Ahead(child_end, waiting))
        then = waiting.popleft()
        assert not waiting
        assert isinstance(then, EpochShares)
        assert then.epoch == 2
        assert _send_epoch(then, topics, outbox, parent, _Ahead(child_end, waiting))
        listener.wait_for(200 + 100 + 1)
        time.sleep(0.2)  # anything more would have followed at once
    finally:
        client.disconnect()
        client.loop_stop()
        listener.close()

    epochs: dict[str, list[int]] = {}
    for topic, payload, _ in listener.received:
        kind = Kind.FLEET_SUMMARY if topic.endswith("/allocations") else Kind.ALLOCATION
        epochs.setdefault(topic, []).append(schemas.decode(kind, payload)["epoch"])
    assert epochs.pop("fairsynergy/lab/allocations") == [2]
    expected = {
        topics.for_agent(agent).allocation: [2] if i % 3 == 0 else [1]
        for i, agent in enumerate(agents)
    }
    assert epochs == expected


def test_publisher_ends_on_the_newest_epoch_handed_over_in_a_burst(broker):
    """Epochs handed over faster than they go out leave each agent its newest grant."""
    agents = [f"a{i}" for i in range(500)]
    publisher = Publisher(BrokerOptions(broker.url), "test-publisher", "lab")
    publisher.wait_ready()
    for epoch in range(1, 6):
        publisher.send(numbered_epoch(epoch, agents, agents[epoch % 2 :: 2]))
    publisher.close()
    late = Listener(broker.host, broker.port, "fairsynergy/lab/#")
    late.wait_for(501)
    late.close()

    retained = {topic: payload for topic, payload, _ in late.received}
    summary = retained.pop("fairsynergy/lab/allocations")
    epochs = {
        topic: schemas.decode(Kind.ALLOCATION, payload)["epoch"]
        for topic, payload in retained.items()
    }
    assert schemas.decode(Kind.FLEET_SUMMARY, summary)["epoch"] == 5
    assert epochs == {TOPIC.format(f"a{i}"): 5 if i % 2 else 4 for i in range(500)}
