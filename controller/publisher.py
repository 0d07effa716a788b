"""Allocations go out through a process of their own.

Why a process: paho spends about 110 µs of interpreter time per QoS 1
message (building the packet, then reading the broker's PUBACK back), so an
epoch for 10,000 agents is about a second of paho work. In the daemon's
process that work waited on the loop thread for the interpreter lock at every
socket operation, and a new epoch took 10 s or more to reach the whole fleet
while telemetry was coming in (``bench/bench_controller.py``). Here paho has
an interpreter to itself and publishes while the loop goes on.

The loop hands over each epoch as :class:`EpochShares`, a few arrays that
cross the pipe in one cheap pickle; the child builds, checks and serialises
the changed agents' allocation messages and the fleet summary from them and
publishes them at QoS 1 (retained), in the order received. Anything else
(the empty payload that clears a departed agent's allocation) is handed over
as ready ``(topic, payload, retain)`` tuples. Everything for one agent's
allocation topic goes through this one session, so the broker keeps it in
order.

The publisher is a child of the daemon (see :mod:`controller._child`), with a
session of its own (its own client id). While the broker is away it keeps
only the newest message of each topic (:class:`Outbox`) and sends them when
the session is back: an epoch per reallocation would otherwise pile up in
paho's queue, each superseding the one before. The grants it holds are
already counted by the daemon's ledger, so a late one can never over-commit
the pool.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as paho

import schemas
from controller._child import PARENT_CHECK_S, Child, parent_gone, report_start
from controller.broker import BrokerOptions, connect, make_client
from controller.errors import FairsynergyError
from schemas import Kind, Topics

# How long closing waits for the broker to acknowledge what is still queued.
DRAIN_TIMEOUT_S = 2.0
# How often, while messages are held for a broker that is away, the
# publisher looks whether it is back.
HELD_CHECK_S = 0.1
# Messages published between checks that the daemon still exists (a check
# costs about a microsecond, a message about a hundred).
ORPHAN_CHECK_EVERY = 100

# The fleet summary lists every agent (about 100 bytes each), so it may exceed
# the 64 KiB limit of device messages; see deploy/mosquitto/mosquitto.conf.
SUMMARY_MAX_BYTES = 16 * 1024 * 1024

Outgoing = tuple[str, bytes, bool]
"""One message to publish: topic, payload, and whether the broker retains it."""

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class EpochShares:
    """One epoch, every agent's share of it, as the record and the summary list.

    Row ``i`` of each array is ``agents[i]``. ``away`` marks agents offline
    whose grant has not expired yet; an expected accuracy is NaN where it is
    unknown (always for agents away). ``publish`` marks the agents whose
    allocation goes out in this epoch; the others keep the grant of
    ``epochs[i]``.
    """

    epoch: int
    ts: float
    alpha: float
    budget: dict[str, float]
    prices: dict[str, float]
    resources: tuple[str, ...]
    agents: list[str]
    cloud: FloatArray  # (N, R)
    held: FloatArray  # (N, R): the most each agent may be using
    expected: FloatArray  # (N,)
    epochs: npt.NDArray[np.int64]  # (N,)
    published_at: FloatArray  # (N,)
    expires: FloatArray  # (N,)
    publish: npt.NDArray[np.bool_]  # (N,)
    away: npt.NDArray[np.bool_]  # (N,)

    def amounts(self, row: int, values: FloatArray | None = None) -> dict[str, float]:
        """Row ``row`` of ``values`` (``cloud`` by default), by resource."""
        source = self.cloud if values is None else values
        return dict(zip(self.resources, source[row].tolist(), strict=True))

    def allocations(
        self, topics: Topics, skip: Container[str] = ()
    ) -> Iterator[Outgoing]:
        """The allocation message of every agent marked to publish, one by one.

        Agents in ``skip`` are passed over; it is looked up as the messages
        are built, so it may grow meanwhile.
        """
        prices = self.prices
        for row in np.flatnonzero(self.publish).tolist():
            if self.agents[row] in skip:
                continue
            expected = float(self.expected[row])
            message = schemas.allocation(
                epoch=self.epoch,
                cloud=self.amounts(row),
                expected_accuracy=None if math.isnan(expected) else expected,
                prices=prices,
                expires=float(self.expires[row]),
                ts=self.ts,
            )
            topic = topics.for_agent(self.agents[row]).allocation
            yield (topic, schemas.dump(Kind.ALLOCATION, message), True)

    def published(self) -> list[str]:
        """The agents whose allocation goes out in this epoch."""
        return [self.agents[row] for row in np.flatnonzero(self.publish).tolist()]

    def summary(self, topics: Topics) -> Outgoing:
        """The fleet summary: every agent's cloud, expected accuracy and lease."""
        columns = (
            self.cloud.tolist(),
            self.expected.tolist(),
            self.epochs.tolist(),
            self.expires.tolist(),
        )
        agents: dict[str, dict[str, Any]] = {}
        for agent, cloud, expected, epoch, expires in zip(
            self.agents, *columns, strict=True
        ):
            share = {
                "cloud": dict(zip(self.resources, cloud, strict=True)),
                "epoch": epoch,
                "expires": expires,
            }
            if not math.isnan(expected):
                share["expected_accuracy"] = expected
            agents[agent] = share
        message = schemas.fleet_summary(
            epoch=self.epoch,
            alpha=self.alpha,
            budget=self.budget,
            prices=self.prices,
            agents=agents,
            ts=self.ts,
        )
        payload = schemas.dump(Kind.FLEET_SUMMARY, message, max_bytes=SUMMARY_MAX_BYTES)
        return (topics.allocations, payload, True)


Batch = EpochShares | list[Outgoing]
"""What the daemon hands over at a time; None in the pipe means stop."""


class PublisherGoneError(FairsynergyError):
    """The publisher process has stopped; the daemon cannot publish any more."""


class Publisher(Child):
    """The daemon's end: hand over epochs and messages, in order, to be published."""

    def __init__(self, broker: BrokerOptions, client_id: str, fleet: str) -> None:
        args = (broker, client_id, fleet)
        super().__init__(publish_main, args, "allocation publisher")

    def send(self, messages: Batch) -> None:
        """Queue an epoch's messages, or ready ones, for publishing; returns at once.

        Raises:
            PublisherGoneError: the child process has stopped.
        """
        try:
            self.conn.send(messages)
        except (BrokenPipeError, EOFError, OSError):
            raise PublisherGoneError(
                "the allocation publisher process stopped"
            ) from None

    def alive(self) -> bool:
        return self.process.is_alive()

    def close(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Publish what is queued (waiting at most ``timeout`` s), then stop."""
        with contextlib.suppress(BrokenPipeError, EOFError, OSError):
            self.conn.send(None)  # fails only if the child has gone already
        super().close(timeout + 0.5)


def publish_main(
    broker: BrokerOptions, client_id: str, fleet: str, conn: Connection, parent: int
) -> None:
    """The child's body: publish what arrives until told to stop or orphaned."""
    topics = Topics(fleet)

    def start() -> paho.Client:
        client = make_client(broker, client_id)
        connect(client)
        return client

    client = report_start(conn, start)
    if client is None:
        return
    outbox = Outbox(client)
    waiting: deque[Batch | None] = deque()
    try:
        while True:
            batch = waiting.popleft() if waiting else _next(conn, parent, outbox)
            if batch is None:
                break
            if isinstance(batch, EpochShares):
                sent = _send_epoch(batch, topics, outbox, parent, _Ahead(conn, waiting))
            else:
                sent = _send_all(batch, outbox, parent)
            if not sent:
                return
        outbox.flush()
        _drain(outbox.last)
    finally:
        client.disconnect()
        client.loop_stop()


class Outbox:
    """Publish at QoS 1; while the broker is away, hold the newest per topic.

    Messages for a topic supersede each other (retained allocations, the
    fleet summary, the empty payload that clears an allocation), so holding
    the newest of each bounds what waits to one message per agent. Held
    messages go out in the order their topics were last written, once the
    session is back, after anything paho itself still had queued; so each
    topic keeps its order.
    """

    def __init__(self, client: paho.Client) -> None:
        self.client = client
        self.held: dict[str, Outgoing] = {}
        self.last: paho.MQTTMessageInfo | None = None

    def send(self, topic: str, payload: bytes, retain: bool) -> None:
        if self.held or not self.client.is_connected():
            self.held.pop(topic, None)  # the newest goes to the end
            self.held[topic] = (topic, payload, retain)
            return
        self.last = self.client.publish(topic, payload, qos=1, retain=retain)

    def flush(self) -> None:
        """Publish what is held, if the broker is back."""
        if not self.held or not self.client.is_connected():
            return
        held, self.held = self.held, {}
        for topic, payload, retain in held.values():
            self.last = self.client.publish(topic, payload, qos=1, retain=retain)


def _send_all(
    messages: Iterable[Outgoing],
    outbox: Outbox,
    parent: int,
    on_check: Callable[[], None] | None = None,
) -> bool:
    """Publish ``messages``; False, with the rest unsent, once the daemon is gone.

    A daemon killed in the middle of an epoch leaves this process with the
    rest of it, and maybe more epochs in the pipe: publishing them would
    take CPU from the daemon starting up again, and could overwrite its
    newer retained allocations with older ones. The record already counts
    every one of those grants, and the new daemon republishes them.
    ``on_check`` runs at each of these checks (every ``ORPHAN_CHECK_EVERY``
    messages).
    """
    for count, message in enumerate(messages):
        if count % ORPHAN_CHECK_EVERY == 0:
            if parent_gone(parent):
                return False
            if on_check is not None:
                on_check()
        outbox.send(*message)
    return True


class _Ahead:
    """What waits in the pipe behind the epoch being sent, read without blocking.

    ``superseded`` holds the agents that a later epoch already waiting
    publishes again: their allocation in the current epoch would be
    replaced at once, so it need not go out (the ledger counts the grant
    either way, which keeps the pool safe).
    """

    def __init__(self, conn: Connection, waiting: deque[Batch | None]) -> None:
        self.conn, self.waiting = conn, waiting
        self.superseded: set[str] = set()
        for batch in waiting:
            self._note(batch)

    def read(self) -> None:
        """Take in whatever the daemon has handed over since the last look."""
        while self.conn.poll(0):
            try:
                batch: Batch | None = self.conn.recv()
            except (EOFError, OSError):
                batch = None
            self.waiting.append(batch)
            if batch is None:
                return
            self._note(batch)

    def epoch_waiting(self) -> bool:
        """Whether a later epoch (and so a newer fleet summary) is waiting."""
        return any(isinstance(batch, EpochShares) for batch in self.waiting)

    def _note(self, batch: Batch | None) -> None:
        if isinstance(batch, EpochShares):
            self.superseded.update(batch.published())


def _send_epoch(
    epoch: EpochShares, topics: Topics, outbox: Outbox, parent: int, ahead: _Ahead
) -> bool:
    """Publish an epoch's allocations, then its summary, as :func:`_send_all`.

    Every ``ORPHAN_CHECK_EVERY`` messages it looks whether newer epochs
    have arrived, and passes over what they supersede: an agent's allocation
    that a later epoch publishes again, and the summary. When the daemon
    reallocates faster than the broker takes the messages, the publisher
    thus spends no time on grants already replaced.
    """
    ahead.read()
    messages = epoch.allocations(topics, skip=ahead.superseded)
    if not _send_all(messages, outbox, parent, on_check=ahead.read):
        return False
    if ahead.epoch_waiting():
        return True
    return _send_all([epoch.summary(topics)], outbox, parent)


def _next(conn: Connection, parent: int, outbox: Outbox) -> Batch | None:
    """The next list to publish; None to stop (asked, or the daemon is gone).

    While waiting, sends what the outbox held once the broker is back.
    """
    outbox.flush()
    while not conn.poll(HELD_CHECK_S if outbox.held else PARENT_CHECK_S):
        outbox.flush()
        if parent_gone(parent):
            return None
    if parent_gone(parent):
        return None  # what is queued is a dead daemon's: see _send_all
    try:
        batch: Batch | None = conn.recv()
    except (EOFError, OSError):
        return None
    return batch


def _drain(last: paho.MQTTMessageInfo | None) -> None:
    """Wait until the broker acknowledged the last message (QoS 1 keeps order)."""
    if last is None:
        return
    # Not connected (paho raises): what it still holds is lost with this
    # process. The ledger counted those grants, so the pool stays safe; the
    # next daemon renews each grant before its lease runs out.
    with contextlib.suppress(RuntimeError, ValueError):
        last.wait_for_publish(DRAIN_TIMEOUT_S)
