"""The device side of fairsynergy: report telemetry, hold the current allocation.

:class:`EdgeClient` speaks MQTT 5 through paho-mqtt. Three threads meet here:

- the caller's, which calls :meth:`EdgeClient.report` and only ever appends to
  the outbox (a bounded buffer, :mod:`edge_client._outbox`);
- paho's network thread (``loop_start``), which runs every paho callback; the
  callbacks take the client's locks briefly and never call back into paho
  while holding one;
- the client's sender thread, the only one that hands reports to paho. It
  keeps at most ``INFLIGHT_WINDOW`` reports in paho's hands and learns about
  acknowledgements through a queue, so a PUBACK can never overtake the
  bookkeeping of the publish it acknowledges.

Nothing accepted by :meth:`~EdgeClient.report` disappears without a trace:
each report ends up delivered (acknowledged by the broker), dropped (counted,
logged at warning, and announced in the next report's ``dropped`` field) or
still pending. ``stats.reported == stats.delivered + stats.dropped +
stats.pending`` at all times.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

import schemas
from edge_client._broker import parse_broker_url
from edge_client._outbox import Outbox, Pending
from edge_client._sequence import SequenceCounter
from edge_client.allocation import Allocation
from edge_client.errors import (
    BrokerUnreachableError,
    ClientClosedError,
    DeliveryTimeoutError,
    EdgeError,
)
from schemas import Kind, Message, MessageError, Topics

DEFAULT_BUFFER_SIZE = 1000
# Reports handed to paho at once. Small, so that almost everything unsent
# stays in our bounded outbox, where it is counted, rather than in paho's
# unbounded queue (we leave max_queued_messages at 0: paho never refuses);
# below paho's own in-flight limit of 20, which leaves room for the status
# messages; large enough to keep a slow link busy.
INFLIGHT_WINDOW = 10
# How long the broker keeps the session of a client that went away: long
# enough to ride out a broker restart or a flaky uplink, short enough that
# a device that never returns stops costing broker memory after an hour.
DEFAULT_SESSION_EXPIRY_S = 3600
DEFAULT_KEEPALIVE_S = 30
RECONNECT_MIN_S = 1
DEFAULT_RECONNECT_MAX_S = 60
# Each reconnect waits paho's doubling delay plus a random share of it, so a
# fleet that lost its broker at the same moment does not return in lockstep.
JITTER = 0.5
CLOSE_TIMEOUT_S = 5.0
# Reason code 0x04 asks the broker to publish our last will on a clean
# DISCONNECT: used when the offline status could not be confirmed.
DISCONNECT_WITH_WILL = 4

AllocationCallback = Callable[[Allocation], None]
RejectionCallback = Callable[[Message], None]


def _version() -> str:
    try:
        return metadata.version("fairsynergy")
    except metadata.PackageNotFoundError:
        return "0+unknown"


CLIENT_NAME = f"fairsynergy-edge/{_version()}"


@dataclass(frozen=True, slots=True)
class EdgeStats:
    """Counters of one client since it was created.

    ``reported == delivered + dropped + pending`` always holds.
    """

    reported: int
    """Reports accepted by :meth:`EdgeClient.report`."""
    delivered: int
    """Reports the broker acknowledged."""
    dropped: int
    """Reports that will never be delivered: buffer overflow, refused by the
    broker, or still unsent when the client closed."""
    pending: int
    """Reports waiting in the buffer or in flight."""
    ignored_allocations: int
    """Allocations ignored because they were malformed or older than the one held."""
    rejections: int
    """Rejection notices received from the controller."""
    connects: int
    """Connections the broker accepted (the first one and every reconnect)."""


@dataclass(frozen=True, slots=True)
class _Ack:
    mid: int
    reason: ReasonCode


_WAKE = "wake"
_STOP = "stop"
_Event = _Ack | str


class EdgeClient:
    """One agent's connection to the fleet: telemetry out, allocations in.

    Args:
        broker: ``mqtt://host[:1883]`` or ``mqtts://host[:8883]``.
        fleet: fleet id; agent: agent id (both ``[A-Za-z0-9_.-]{1,64}``).
        username, password: broker credentials, if it asks for them.
        ca_file: CA bundle to verify an ``mqtts://`` broker (system CAs if None).
        model: label of the model the agent runs, sent with status and reports.
        buffer_size: reports held while the broker is out of reach (in flight
            included); when full, the oldest waiting report is dropped.
        state_file: where to keep the last ``seq`` across restarts.
        on_allocation: called with each new :class:`Allocation`, on the network
            thread: keep it short.
        on_rejection: called with each rejection notice the controller sends.
        logger: where to log (default ``logging.getLogger("edge_client")``);
            the client never configures logging.
        presence: publish the online/offline status and arm the last will.
            One-shot reporters turn it off so they do not mark a running agent
            offline when they exit.
        session_expiry: seconds the broker keeps the session after a
            disconnection; 0 for a session that ends with the connection.
        client_id: MQTT client id (default ``fairsynergy:<fleet>:<agent>``).
        rng: random source of the reconnect jitter (seed it in tests only:
            devices must not share it).

    Example:
        >>> with EdgeClient("mqtt://localhost", "demo", "robot-1") as client:
        ...     client.report(accuracy=0.8, local={"compute": 1.0},
        ...                   cloud={"compute": 0.5})  # doctest: +SKIP
    """

    def __init__(
        self,
        broker: str,
        fleet: str,
        agent: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | Path | None = None,
        model: str | None = None,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        state_file: str | Path | None = None,
        on_allocation: AllocationCallback | None = None,
        on_rejection: RejectionCallback | None = None,
        logger: logging.Logger | None = None,
        presence: bool = True,
        session_expiry: int = DEFAULT_SESSION_EXPIRY_S,
        keepalive: int = DEFAULT_KEEPALIVE_S,
        reconnect_max: int = DEFAULT_RECONNECT_MAX_S,
        client_id: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.address = parse_broker_url(broker)
        self.topics = Topics(fleet, agent)
        if model is not None:
            schemas.check_id(model, "model label")
        if ca_file is not None and not self.address.tls:
            raise EdgeError(f"a CA file needs an mqtts:// broker, not {broker}")

        self.on_allocation = on_allocation
        self.on_rejection = on_rejection
        self.model = model
        self.presence = presence
        self._log = logger or logging.getLogger("edge_client")
        self._outbox = Outbox(buffer_size, INFLIGHT_WINDOW, self._log)
        self._session_expiry = session_expiry
        self._keepalive = keepalive
        self._reconnect_max = max(reconnect_max, RECONNECT_MIN_S)
        self._rng = rng or random.Random()
        self._seq = SequenceCounter(
            None if state_file is None else Path(state_file), self._log
        )

        # Guards the allocation held, the counters below and the life cycle;
        # report() holds it from choosing a seq to queueing the report.
        self._lock = threading.Lock()
        self._allocation: Allocation | None = None
        self._counts = dict.fromkeys(("ignored", "rejections", "connects"), 0)
        self._started = False
        self._closed = False
        self._last_error: str | None = None
        self._retries = 0
        self._tried = False

        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._connected = threading.Event()
        # Set once the subscriptions of the current connection are in place:
        # from then on no allocation can be missed.
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._sender = threading.Thread(
            target=self._send_loop, name=f"edge-sender-{agent}", daemon=True
        )
        self._mqtt = self._make_mqtt(client_id, username, password, ca_file)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> EdgeClient:
        """Connect in the background and return at once.

        The client keeps reconnecting until :meth:`close`; reports made
        meanwhile wait in the buffer.
        """
        with self._lock:
            if self._closed:
                raise ClientClosedError("this client was closed; create a new one")
            if self._started:
                return self
            self._started = True

        self._sender.start()
        self._first_connect()
        self._mqtt.loop_start()
        return self

    def connect(self, timeout: float = 10.0) -> EdgeClient:
        """Start, and wait until connected and subscribed (see :meth:`wait_connected`).

        Raises:
            BrokerUnreachableError: no accepted connection within ``timeout`` s;
                the client keeps trying in the background until closed.
        """
        self.start()
        self.wait_connected(timeout)
        return self

    def wait_connected(self, timeout: float) -> None:
        """Wait until the broker accepted the connection and the subscriptions.

        After this returns, an allocation published to the agent reaches it.

        Raises:
            BrokerUnreachableError: not so within ``timeout`` seconds.
        """
        if not self._ready.wait(timeout):
            cause = self._last_error or "no answer"
            raise BrokerUnreachableError(
                f"broker {self.address.url} not reachable within {timeout:g} s "
                f"({cause})"
            )

    def flush(self, timeout: float) -> None:
        """Wait until the broker has acknowledged every report made so far.

        Raises:
            DeliveryTimeoutError: reports were still pending after ``timeout`` s.
        """
        if not self._outbox.wait_settled(timeout):
            raise DeliveryTimeoutError(
                f"broker {self.address.url} did not acknowledge {self.pending} "
                f"report(s) within {timeout:g} s"
            )

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Deliver what can be delivered, say offline, and disconnect.

        Waits up to ``timeout`` seconds in all; reports still unsent then are
        counted as dropped and logged. Closing twice is harmless.
        """
        with self._lock:
            already, self._closed = self._closed, True
        if already or not self._started:
            return

        deadline = time.monotonic() + timeout
        self._outbox.wait_settled(timeout)
        confirmed = not self.presence or self._say_offline(deadline)
        self._stopping.set()
        self._disconnect(with_will=not confirmed)
        self._events.put(_STOP)
        self._sender.join()
        self._outbox.abandon("still unsent when the client closed")

    def __enter__(self) -> EdgeClient:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    # -- reporting -----------------------------------------------------------

    def report(
        self,
        *,
        accuracy: float,
        local: Mapping[str, float],
        cloud: Mapping[str, float],
        load: float | None = None,
        model: str | None = None,
        epoch: int | None = None,
        ts: float | None = None,
    ) -> int:
        """Queue one telemetry report and return its ``seq``.

        Never blocks on the network. ``epoch`` defaults to the epoch of the
        allocation currently held (null before the first); ``model`` to the
        client's; ``ts`` to now.

        Raises:
            MessageError: the arguments do not make valid telemetry.
            ClientClosedError: the client was closed.
        """
        with self._lock:
            if self._closed:
                raise ClientClosedError("report() after close(); create a new client")
            seq = self._seq.peek()
            message = schemas.telemetry(
                seq=seq,
                accuracy=accuracy,
                local=local,
                cloud=cloud,
                epoch=epoch if epoch is not None else self._held_epoch(),
                load=load,
                model=model or self.model,
                dropped=self._outbox.dropped_with_next() or None,
                ts=ts,
            )
            payload = schemas.encode(Kind.TELEMETRY, message)

            self._seq.commit(seq)
            self._outbox.add(Pending(seq, payload))
        self._events.put(_WAKE)
        return seq

    # -- state ---------------------------------------------------------------

    @property
    def allocation(self) -> Allocation | None:
        """The allocation currently held, or None before the first arrives."""
        with self._lock:
            return self._allocation

    @property
    def connected(self) -> bool:
        """Whether the broker has accepted the current connection."""
        return self._connected.is_set()

    @property
    def dropped(self) -> int:
        """Reports that will never be delivered (see :class:`EdgeStats`)."""
        return self._outbox.tally().dropped

    @property
    def pending(self) -> int:
        """Reports waiting in the buffer or in flight."""
        return self._outbox.tally().pending

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the last report (or the starting point before any)."""
        with self._lock:
            return self._seq.last

    @property
    def stats(self) -> EdgeStats:
        """A snapshot of every counter."""
        tally = self._outbox.tally()
        with self._lock:
            return EdgeStats(
                reported=tally.reported,
                delivered=tally.delivered,
                dropped=tally.dropped,
                pending=tally.pending,
                ignored_allocations=self._counts["ignored"],
                rejections=self._counts["rejections"],
                connects=self._counts["connects"],
            )

    def _held_epoch(self) -> int | None:
        return None if self._allocation is None else self._allocation.epoch

    # -- sender thread -------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            event = self._events.get()
            if event == _STOP:
                return
            if isinstance(event, _Ack):
                refusal = str(event.reason) if event.reason.is_failure else None
                self._outbox.settle(event.mid, refusal)
            self._pump()

    def _pump(self) -> None:
        """Hand waiting reports to paho while connected and the window allows."""
        while self._connected.is_set():
            report = self._outbox.take()
            if report is None:
                return
            # Never under one of our locks: paho takes its own here, and its
            # thread may be waiting for ours in a callback.
            info = self._mqtt.publish(
                self.topics.telemetry, report.payload, qos=Kind.TELEMETRY.qos
            )
            # Even when not connected (MQTT_ERR_NO_CONN) paho keeps the
            # message and sends it after the next CONNACK.
            refused = info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
            self._outbox.handed(report, None if refused else info.mid)

    # -- paho: set-up and callbacks (network thread) -------------------------

    def _make_mqtt(
        self,
        client_id: str | None,
        username: str | None,
        password: str | None,
        ca_file: str | Path | None,
    ) -> paho.Client:
        fleet, agent = self.topics.fleet, self.topics.agent
        mqtt = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"fairsynergy:{fleet}:{agent}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        # A bug in a callback must not kill the network thread: paho reports
        # it through on_log (at error, see _on_log) and carries on.
        mqtt.suppress_exceptions = True
        mqtt.on_log = self._on_log
        mqtt.reconnect_delay_set(RECONNECT_MIN_S, self._reconnect_max)
        if username is not None:
            mqtt.username_pw_set(username, password)
        if self.address.tls:
            try:
                mqtt.tls_set(ca_certs=None if ca_file is None else str(ca_file))
            except (OSError, ValueError) as error:
                raise EdgeError(f"cannot use CA file {ca_file}: {error}") from None

        mqtt.on_pre_connect = self._on_pre_connect
        mqtt.on_connect = self._on_connect
        mqtt.on_disconnect = self._on_disconnect
        mqtt.on_publish = self._on_publish
        mqtt.on_subscribe = self._on_subscribe
        mqtt.on_message = self._on_message
        return mqtt

    def _first_connect(self) -> None:
        """Try once in the caller's thread, to learn why if it fails."""
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self._session_expiry
        # A new process starts a clean session: the old one can only hold
        # allocations that the retained message supersedes. Reconnects of
        # this process resume the session, so QoS 1 exchanges finish.
        clean = True if self._session_expiry == 0 else paho.MQTT_CLEAN_START_FIRST_ONLY
        host, port = self.address.host, self.address.port
        try:
            self._mqtt.connect(
                host, port, self._keepalive, clean_start=clean, properties=properties
            )
        except OSError as error:
            self._last_error = error.strerror or str(error) or type(error).__name__
            self._log.warning(
                "broker %s unreachable (%s); retrying in the background",
                self.address.url,
                self._last_error,
            )
            self._mqtt.connect_async(
                host, port, self._keepalive, clean_start=clean, properties=properties
            )

    def _on_log(
        self, client: paho.Client, userdata: Any, level: int, text: str
    ) -> None:
        # paho's own errors are mostly the connection state we already log
        # in words; only a failing callback is worth an error of its own.
        failed = level == paho.MQTT_LOG_ERR and text.startswith("Caught exception")
        self._log.log(logging.ERROR if failed else logging.DEBUG, "paho: %s", text)

    def _on_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        if self._tried:
            nominal = min(
                self._reconnect_max, RECONNECT_MIN_S * 2 ** min(self._retries, 16)
            )
            self._stopping.wait(self._rng.uniform(0, JITTER * nominal))
        self._tried = True
        self._retries += 1
        if self.presence:
            # The will is fixed when the connection opens, so its ts is now.
            will = schemas.agent_status(
                state="offline", model=self.model, client=CLIENT_NAME
            )
            client.will_set(
                self.topics.status,
                schemas.encode(Kind.AGENT_STATUS, will),
                qos=Kind.AGENT_STATUS.qos,
                retain=True,
            )

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._last_error = f"refused: {reason}"
            self._log.error(
                "broker %s refused the connection: %s", self.address.url, reason
            )
            return

        with self._lock:
            self._counts["connects"] += 1
        self._retries = 0
        self._log.info(
            "connected to %s (session present: %s)",
            self.address.url,
            flags.session_present,
        )
        if self.presence:
            birth = schemas.agent_status(
                state="online", model=self.model, client=CLIENT_NAME
            )
            client.publish(
                self.topics.status,
                schemas.encode(Kind.AGENT_STATUS, birth),
                qos=Kind.AGENT_STATUS.qos,
                retain=True,
            )
        # Subscribing again on every connection makes the broker resend the
        # retained allocation, even when the session survived.
        options = SubscribeOptions(qos=Kind.ALLOCATION.qos)
        client.subscribe(
            [(self.topics.allocation, options), (self.topics.rejected, options)]
        )
        self._connected.set()
        self._events.put(_WAKE)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._ready.clear()
        if was_connected and not self._stopping.is_set():
            self._last_error = f"connection lost: {reason}"
            self._log.warning(
                "connection to %s lost (%s); reconnecting", self.address.url, reason
            )

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        # paho holds its message lock here: hand over, never wait for ours.
        self._events.put(_Ack(mid, reason))

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._ready.set()
        refused = [str(reason) for reason in reasons if reason.is_failure]
        if refused:
            # Without its subscriptions the agent never hears of allocations:
            # an operator must fix the broker's access rules.
            self._log.error(
                "broker %s refused our subscriptions (%s): no allocations will arrive",
                self.address.url,
                ", ".join(refused),
            )

    def _on_message(
        self, client: paho.Client, userdata: Any, message: paho.MQTTMessage
    ) -> None:
        if message.topic == self.topics.allocation:
            self._receive_allocation(message.payload)
        elif message.topic.startswith(self.topics.rejected.removesuffix("#")):
            self._receive_rejection(message.payload)
        else:
            self._log.debug("message on unexpected topic %s ignored", message.topic)

    def _receive_allocation(self, payload: bytes | bytearray) -> None:
        if not payload:
            self._log.info("allocation cleared on the broker; keeping the one held")
            return
        try:
            allocation = Allocation.from_message(
                schemas.decode(Kind.ALLOCATION, payload)
            )
        except MessageError as error:
            self._ignore_allocation("malformed", str(error))
            return

        with self._lock:
            held = self._held_epoch()
            newer = held is None or allocation.epoch > held
            if newer:
                self._allocation = allocation

        if newer:
            self._log.info("allocation epoch %d received", allocation.epoch)
            self._call(self.on_allocation, allocation)
        elif allocation.epoch == held:
            self._log.debug("allocation epoch %d already held", allocation.epoch)
        else:
            self._ignore_allocation("stale", f"epoch {allocation.epoch} < held {held}")

    def _ignore_allocation(self, why: str, detail: str) -> None:
        with self._lock:
            self._counts["ignored"] += 1
            ignored = self._counts["ignored"]
        self._log.warning(
            "%s allocation ignored: %s (%d ignored so far)", why, detail, ignored
        )

    def _receive_rejection(self, payload: bytes | bytearray) -> None:
        try:
            notice = schemas.decode(Kind.REJECTION, payload)
        except MessageError as error:
            self._log.warning("malformed rejection notice ignored: %s", error)
            return

        with self._lock:
            self._counts["rejections"] += 1
        self._log.warning(
            "controller refused a message on %s: %s (field %s, seq %s)",
            notice["topic"],
            notice["reason"],
            notice.get("field"),
            notice.get("seq"),
        )
        self._call(self.on_rejection, notice)

    def _call(self, callback: Callable[[Any], None] | None, value: Any) -> None:
        """Run a user callback; its exceptions are logged, never raised into paho."""
        if callback is None:
            return
        try:
            callback(value)
        except Exception:
            self._log.exception(
                "callback %s failed", getattr(callback, "__name__", callback)
            )

    # -- closing -------------------------------------------------------------

    def _say_offline(self, deadline: float) -> bool:
        """Publish the offline status and wait for its PUBACK; True if confirmed."""
        if not self._connected.is_set():
            return False
        status = schemas.agent_status(
            state="offline", model=self.model, client=CLIENT_NAME
        )
        info = self._mqtt.publish(
            self.topics.status,
            schemas.encode(Kind.AGENT_STATUS, status),
            qos=Kind.AGENT_STATUS.qos,
            retain=True,
        )
        try:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as error:
            self._log.warning("offline status not sent (%s)", error)
            return False
        return info.is_published()

    def _disconnect(self, *, with_will: bool) -> None:
        reason = None
        if with_will and self.presence:
            # The broker then publishes our last will: offline, as it should.
            reason = ReasonCode(PacketTypes.DISCONNECT, identifier=DISCONNECT_WITH_WILL)
        self._mqtt.disconnect(reasoncode=reason)
        self._mqtt.loop_stop()
        self._connected.clear()
