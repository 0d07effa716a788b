"""Telemetry intake in a process of its own, handed to the daemon in batches.

Why a process: paho's network loop reads one packet per ``select`` and three
small socket reads per packet, and every read gives up the interpreter lock.
In the daemon's process, the loop thread and the store's writer hold that lock
most of the time, so paho waited for it at each read and the controller took
in about half of a 5,000 reports/s stream while using two thirds of a core
(``bench/bench_controller.py``). Here paho has an interpreter to itself; what
it receives crosses a pipe as one pickled list per few milliseconds, which
the daemon unpacks in one go.

The receiver is a child of the daemon (see :mod:`controller._child`). It
subscribes with its own client id (a session of its own next to the
daemon's) and is otherwise stateless: everything it knows arrives with each
message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection

import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from controller._child import PARENT_CHECK_S, Child, parent_gone, report_start
from controller.broker import BrokerOptions, connect, make_client

# A batch is sent when it holds this many messages or is this old.
BATCH_MESSAGES = 500
BATCH_AGE_S = 0.002
# Most messages held in the receiver while the daemon is busy; paho then
# stops reading, and the broker applies its own queue limit.
BACKLOG_LIMIT = 50_000

Message = tuple[str, bytes, float]


class Receiver(Child):
    """The daemon's end: start the child, then read its batches."""

    def __init__(
        self,
        broker: BrokerOptions,
        client_id: str,
        subscriptions: Sequence[tuple[str, int]],
    ) -> None:
        args = (broker, client_id, list(subscriptions))
        super().__init__(receive_main, args, "telemetry receiver")

    def receive(self) -> list[Message]:
        """The next batch; raises EOFError once the child has gone or is closed.

        Closing (:meth:`Child.close`) needs no handshake: the child notices
        the closed pipe at its next batch, or is terminated, and holds
        nothing that needs saving. A thread blocked here while the daemon
        closes the pipe gets EOFError too.
        """
        try:
            batch: list[Message] = self.conn.recv()
        except (OSError, TypeError, ValueError):
            # multiprocessing's reads fail in these ways on a pipe closed
            # under them; anything else on a pipe is an OSError.
            raise EOFError("the telemetry receiver's pipe is closed") from None
        return batch


def receive_main(
    broker: BrokerOptions,
    client_id: str,
    subscriptions: list[tuple[str, int]],
    conn: Connection,
    parent: int,
) -> None:
    """The child's body: receive, batch, send; return when the daemon is gone."""
    pending: list[Message] = []
    ready = threading.Condition()

    def on_message(_c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        with ready:
            while len(pending) >= BACKLOG_LIMIT:
                ready.wait()
            pending.append((message.topic, bytes(message.payload), time.time()))
            if len(pending) in (1, BATCH_MESSAGES):
                ready.notify_all()

    def on_connect(
        client: paho.Client, _u: object, _f: object, code: ReasonCode, _p: object
    ) -> None:
        if not code.is_failure:
            for topic, qos in subscriptions:
                client.subscribe(topic, qos=qos)

    def start() -> paho.Client:
        client = make_client(broker, client_id)
        client.on_message = on_message
        client.on_connect = on_connect
        connect(client)
        return client

    client = report_start(conn, start)
    if client is None:
        return
    try:
        _forward(conn, pending, ready, parent)
    finally:
        client.disconnect()
        client.loop_stop()


def _forward(
    conn: Connection, pending: list[Message], ready: threading.Condition, parent: int
) -> None:
    """Send what paho received, batch by batch, until the daemon goes away."""
    checked_at = time.monotonic()
    while True:
        with ready:
            if not pending:
                ready.wait(PARENT_CHECK_S)  # idle: sleep until the first message
            if 0 < len(pending) < BATCH_MESSAGES:
                ready.wait(BATCH_AGE_S)  # let a batch gather
            batch = pending[:]
            pending.clear()
            ready.notify_all()
        if batch:
            try:
                conn.send(batch)
            except (BrokenPipeError, EOFError, OSError):
                return
        now = time.monotonic()
        if now - checked_at >= PARENT_CHECK_S:
            checked_at = now
            if parent_gone(parent):
                return
