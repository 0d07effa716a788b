"""Simulated agents and a counting subscriber for ``bench_controller.py``.

Each :class:`Generator` runs in a process of its own and speaks for many
agents over a few MQTT connections. Its agents behave as the protocol asks
of a device: they announce themselves (a retained ``online`` status), report
telemetry with a strictly increasing ``seq``, read their allocation and
report the latest epoch and cloud amounts they were granted, so that every
report is one the controller accepts. Accuracy follows a true Cobb-Douglas
curve with a little noise, so the controller's learner sees realistic data.

The first report of each agent is built and checked by :func:`schemas.telemetry`
and :func:`schemas.encode`; the later ones are serialised with the same
``json.dumps`` call without checking them again, to keep the generator's own
cost small on a machine whose cores it shares with the controller.

Generators and the benchmark's probe speak MQTT through :class:`RawClient`, a
minimal MQTT 3.1.1 client over a plain socket: on the benchmark machine paho
spends about 140 microseconds of CPU per QoS 1 publish, this about 4, and a
load generator that used paho would take the CPU it means to measure.

The parent drives a generator with commands on a queue (see
:func:`generator_main`) and reads one reply per command.
:func:`counter_main` is the baseline: a plain paho subscriber that only
counts, as the controller's own paho client would receive.
"""

from __future__ import annotations

import json
import math
import multiprocessing.synchronize
import queue
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import Queue
from typing import Any, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

import schemas
from schemas import Kind, Topics

RESOURCES = ("compute", "data")
MODEL = "bench-model"
# Measurement noise of the reported accuracy (standard deviation).
NOISE = 0.01
# Every report after an agent's first, serialised without json.dumps; the
# first report of each agent goes through schemas.telemetry and encode, and
# the first of this form is decoded once by schemas.decode as a check.
REPORT = (
    '{{"v":1,"seq":{seq},"ts":{ts:.6f},"accuracy":{accuracy:.6f},'
    '"local":{local},{grant},"model":"{model}"}}'
)
# Pacing granularity: messages due are sent in bursts this far apart. System
# calls are slow on the benchmark's virtual machine (about 100 microseconds
# per send), so they are batched: one per connection per tick.
TICK_S = 0.005
# In ack mode every agent still reports this often (10,000 agents: 1,000/s).
HEARTBEAT_S = 10.0
# The socket reader pauses this long after each read, so that PUBACKs arrive
# in batches rather than one system call each; it delays what a generator or
# the probe sees by at most this much.
READ_PAUSE_S = 0.001
# Longest wait for the broker's PUBACKs after a burst, or for a SUBACK.
ACK_WAIT_S = 60.0
KEEPALIVE_S = 60
# Subscriptions that read for many agents over one connection are QoS 0. A
# device has its own connection, and so its own broker queue; at QoS 1 one
# connection reading for 5,000 agents would share a single queue of
# max_queued_messages (1000) and lose most of a 10,000-agent reallocation. The
# broker does not queue (or drop) QoS 0 messages for a connected client.
MULTIPLEXED_QOS = 0
# Packet ids are 16 bits: never have more than this many publishes unanswered.
MAX_UNACKED = 30_000
# MQTT 3.1.1 packet types (first byte, high nibble) and fixed first bytes.
CONNECT, PUBLISH, PUBACK, SUBACK = 0x10, 3, 4, 9
SUBSCRIBE, DISCONNECT = 0x82, b"\xe0\x00"
CLEAN_SESSION = 0x02


def _length(value: int) -> bytes:
    """MQTT's variable-length encoding of a remaining length."""
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | 0x80 if value else digit)
        if not value:
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _packet(buffer: bytearray, offset: int) -> tuple[int, int, int] | None:
    """(first byte, start of body, end) of the packet at ``offset``, if complete."""
    length, shift, position = 0, 0, offset + 1
    while True:
        if position >= len(buffer):
            return None
        byte = buffer[position]
        length |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            break
        shift += 7
    end = position + length
    return (buffer[offset], position, end) if end <= len(buffer) else None


class RawClient:
    """A minimal MQTT 3.1.1 client: just what the benchmark needs.

    It connects with a clean session and no keep-alive, publishes at QoS 1
    (buffered until :meth:`flush`, and counted until the broker's PUBACK),
    subscribes at QoS 1 and acknowledges what it receives. A thread reads the
    socket and hands each message to ``on_message(topic, payload, at)``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        on_message: Callable[[str, bytes, float], None] | None = None,
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=10.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.on_message = on_message
        self.lock = threading.Lock()
        self.pending: list[bytes] = []
        self.packet_id = 0
        self.sent = 0
        self.acked = 0
        self.subscribed = threading.Event()

        body = _string("MQTT") + bytes([4, CLEAN_SESSION, 0, 0]) + _string(client_id)
        self.sock.sendall(bytes([CONNECT]) + _length(len(body)) + body)
        connack = self.sock.recv(4)
        if len(connack) < 4 or connack[3] != 0:
            raise ConnectionError(f"{client_id}: broker refused us ({connack!r})")
        self.sock.settimeout(None)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Queue one QoS 1 publish; :meth:`flush` sends what is queued."""
        if self.sent - self.acked > MAX_UNACKED:
            self.wait_acked()
        self.packet_id = self.packet_id % 0xFFFF + 1
        body = _string(topic) + struct.pack("!H", self.packet_id) + payload
        first = 0x30 | 0x02 | (0x01 if retain else 0x00)
        self.pending.append(bytes([first]) + _length(len(body)) + body)
        self.sent += 1

    def flush(self) -> None:
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            with self.lock:
                self.sock.sendall(data)

    def wait_acked(self, timeout: float = ACK_WAIT_S) -> None:
        """Send what is queued and wait for the broker's PUBACK of all of it."""
        self.flush()
        deadline = time.monotonic() + timeout
        while self.acked < self.sent:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.sent - self.acked} publishes unanswered")
            time.sleep(0.001)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe and wait for the broker's SUBACK."""
        self.subscribed.clear()
        self.packet_id = self.packet_id % 0xFFFF + 1
        body = struct.pack("!H", self.packet_id) + _string(topic) + bytes([qos])
        with self.lock:
            self.sock.sendall(bytes([SUBSCRIBE]) + _length(len(body)) + body)
        if not self.subscribed.wait(ACK_WAIT_S):
            raise TimeoutError(f"no SUBACK for {topic}")

    def close(self) -> None:
        self.flush()
        with self.lock:
            self.sock.sendall(DISCONNECT)
        self.sock.shutdown(socket.SHUT_RDWR)
        self.reader.join(timeout=5)
        self.sock.close()

    def _read(self) -> None:
        buffer = bytearray()
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            acks = self._take(buffer, time.time())
            if acks:
                with self.lock:
                    self.sock.sendall(acks)
            time.sleep(READ_PAUSE_S)

    def _take(self, buffer: bytearray, at: float) -> bytes:
        """Handle every complete packet in ``buffer``; return the PUBACKs owed."""
        acks = []
        offset = 0
        while (found := _packet(buffer, offset)) is not None:
            first, start, end = found
            kind = first >> 4
            if kind == PUBACK:
                self.acked += 1
            elif kind == SUBACK:
                self.subscribed.set()
            elif kind == PUBLISH:
                size = struct.unpack_from("!H", buffer, start)[0]
                topic = buffer[start + 2 : start + 2 + size].decode()
                position = start + 2 + size
                if first & 0x06:
                    acks.append(b"\x40\x02" + buffer[position : position + 2])
                    position += 2
                if self.on_message is not None:
                    self.on_message(topic, bytes(buffer[position:end]), at)
            offset = end
        del buffer[:offset]
        return b"".join(acks)


@dataclass(frozen=True)
class GeneratorSpec:
    """Where to connect and which agents one generator process speaks for."""

    host: str
    port: int
    fleet: str
    agents: tuple[str, ...]
    connections: int
    seed: int
    name: str


class Grant(NamedTuple):
    """An allocation as the agent read it, with what its reports will carry."""

    epoch: int | None
    cloud: dict[str, float]
    expires: float
    level: float  # accuracy on the true curve with this grant in use, no noise
    wire: str  # the reports' "cloud" and "epoch" fields, serialised


@dataclass
class SimulatedAgent:
    """One agent's true curve, its on-board resources and what it was granted."""

    topics: Topics
    scale: float
    elasticity: tuple[float, ...]
    local: dict[str, float]
    client: int
    seq: int = 0
    # The latest grant: one tuple, replaced whole by the reading thread, so a
    # report never pairs one grant's epoch with another grant's amounts.
    grant: Grant | None = None
    checked: bool = False
    # The epoch the agent's last report carried: a newer grant is unanswered.
    reported: int | None = None

    def __post_init__(self) -> None:
        self.telemetry = self.topics.telemetry
        self.local_wire = json.dumps(self.local, separators=(",", ":"))
        self.take(None, {}, math.inf)

    @property
    def granted(self) -> bool:
        """Whether the agent has read an allocation yet."""
        return self.grant is not None and self.grant.epoch is not None

    def take(self, epoch: int | None, cloud: dict[str, float], expires: float) -> None:
        """Use a new grant from now on."""
        level = self.scale
        for resource, gamma in zip(RESOURCES, self.elasticity, strict=True):
            level *= (self.local[resource] + cloud.get(resource, 0.0)) ** gamma
        fields = {"cloud": cloud, "epoch": epoch}
        wire = json.dumps(fields, separators=(",", ":"))[1:-1]
        self.grant = Grant(epoch, cloud, expires, level, wire)


class Generator:
    """Many simulated agents of one fleet, published over a few connections."""

    def __init__(self, spec: GeneratorSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.agents = {name: self._agent(name, i) for i, name in enumerate(spec.agents)}
        self.order = list(self.agents)
        self.next = 0
        self.clients: list[RawClient] = []
        self.acks: deque[str] = deque()
        self.ack_mode = False
        # Heartbeat reports in ack mode: round-robin position, reports owed,
        # and when they were last counted.
        self.beat_next = 0
        self.beats = 0.0
        self.beat_at: float | None = None
        self.sent = 0
        self.grants = 0
        self.template_checked = False

    def _agent(self, name: str, index: int) -> SimulatedAgent:
        rng = self.rng
        return SimulatedAgent(
            topics=Topics(self.spec.fleet, name),
            scale=rng.uniform(0.45, 0.6),
            elasticity=tuple(rng.uniform(0.1, 0.3) for _ in RESOURCES),
            local={r: round(rng.uniform(0.5, 2.0), 3) for r in RESOURCES},
            client=index % self.spec.connections,
        )

    # -- connections -------------------------------------------------------

    def connect(self) -> None:
        """Open the publishing connections; the first also reads allocations."""
        for k in range(self.spec.connections):
            client = RawClient(self.spec.host, self.spec.port, f"{self.spec.name}-{k}")
            self.clients.append(client)
        reader = self.clients[0]
        reader.on_message = self._on_allocation
        topic = Topics(self.spec.fleet).any_agent(Kind.ALLOCATION)
        reader.subscribe(topic, qos=MULTIPLEXED_QOS)

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def _on_allocation(self, topic: str, payload: bytes, _at: float) -> None:
        """Take a grant: later reports use (and so acknowledge) it."""
        name = topic.split("/")[3]
        agent = self.agents.get(name)
        if agent is None or not payload:
            return
        grant = json.loads(payload)
        latest = agent.grant.epoch if agent.grant else None
        if latest is not None and grant["epoch"] <= latest:
            return
        if latest is None:
            self.grants += 1
        agent.take(grant["epoch"], grant["cloud"], grant.get("expires", math.inf))
        if self.ack_mode:
            self.acks.append(name)

    # -- messages ----------------------------------------------------------

    def report(self, agent: SimulatedAgent) -> bytes:
        """The agent's next telemetry payload, with the grant it uses now."""
        agent.seq += 1
        now = time.time()
        grant = agent.grant
        assert grant is not None
        if now >= grant.expires:
            agent.take(grant.epoch, {}, math.inf)
            grant = agent.grant
            assert grant is not None
        agent.reported = grant.epoch
        noise = self.rng.gauss(0.0, NOISE)
        accuracy = min(max(grant.level + noise, 0.01), 0.99)
        if agent.checked:
            payload = REPORT.format(
                seq=agent.seq,
                ts=now,
                accuracy=accuracy,
                local=agent.local_wire,
                grant=grant.wire,
                model=MODEL,
            ).encode()
            if not self.template_checked:
                schemas.decode(Kind.TELEMETRY, payload)
                self.template_checked = True
            return payload

        agent.checked = True
        message = schemas.telemetry(
            seq=agent.seq,
            accuracy=accuracy,
            local=agent.local,
            cloud=grant.cloud,
            epoch=grant.epoch,
            model=MODEL,
            ts=now,
        )
        return schemas.encode(Kind.TELEMETRY, message)

    def send_report(self, name: str) -> None:
        agent = self.agents[name]
        payload = self.report(agent)
        self.clients[agent.client].publish(agent.telemetry, payload)
        self.sent += 1

    def send_status(self, name: str) -> None:
        agent = self.agents[name]
        birth = schemas.agent_status(state="online", model=MODEL)
        payload = schemas.encode(Kind.AGENT_STATUS, birth)
        self.clients[agent.client].publish(agent.topics.status, payload, retain=True)

    def flush(self) -> None:
        for client in self.clients:
            client.flush()

    def set_ack_mode(self, on: bool) -> None:
        """Answer new grants at once from now on (or stop).

        Grants that arrived since an agent's last report are answered too:
        otherwise an agent granted just before the switch would wait for its
        heartbeat, and growth with it.
        """
        self.ack_mode = on
        self.beat_at = None
        if on:
            for name, agent in self.agents.items():
                grant = agent.grant
                if grant is not None and grant.epoch != agent.reported:
                    self.acks.append(name)

    def wait_acked(self) -> None:
        """Block until the broker acknowledged everything published so far."""
        for client in self.clients:
            client.wait_acked()

    # -- paced runs ----------------------------------------------------------

    def paced(self, rate: float, count: int | None, duration: float | None) -> float:
        """Send reports round-robin at ``rate`` per second; return the seconds taken.

        Stops after ``count`` reports or ``duration`` seconds, whichever comes
        first. Acknowledgements due in ack mode are sent first, within the rate.
        """
        start = time.perf_counter()
        done = 0
        while True:
            elapsed = time.perf_counter() - start
            if (count is not None and done >= count) or (
                duration is not None and elapsed >= duration
            ):
                break
            due = int(rate * elapsed) + 1 - done
            if count is not None:
                due = min(due, count - done)
            for _ in range(max(due, 0)):
                if self.acks:
                    self.send_report(self.acks.popleft())
                else:
                    self.send_report(self.order[self.next])
                    self.next = (self.next + 1) % len(self.order)
                done += 1
            self.flush()
            time.sleep(TICK_S)
        seconds = time.perf_counter() - start
        self.wait_acked()
        return seconds

    def register(self, rate: float) -> dict[str, Any]:
        """Every agent announces itself online, then reports once."""
        start = time.perf_counter()
        for index, name in enumerate(self.order):
            self.send_status(name)
            if index % 100 == 99:
                self.flush()
                time.sleep(100 / rate)
        self.wait_acked()
        sent_before = self.sent
        self.next = 0
        self.paced(rate, len(self.order), None)
        return {
            "seconds": time.perf_counter() - start,
            "reports": self.sent - sent_before,
        }

    def remind(self, rate: float) -> dict[str, Any]:
        """Report again for every agent still without a grant, as a device would.

        A report can be lost on the way (the broker drops what the
        controller's queue cannot hold); a real device simply reports again.
        """
        waiting = [name for name, agent in self.agents.items() if not agent.granted]
        for index, name in enumerate(waiting):
            self.send_report(name)
            if index % 100 == 99:
                self.flush()
                time.sleep(100 / rate)
        self.wait_acked()
        return {"reports": len(waiting)}

    def stream(self, rate: float, duration: float) -> dict[str, Any]:
        sent_before = self.sent
        seconds = self.paced(rate, None, duration)
        return {"seconds": seconds, "sent": self.sent - sent_before}

    def answer_acks(self, rate: float, idle: float) -> None:
        """In ack mode: report at once (within ``rate``) for every new grant.

        Every agent also reports every ``HEARTBEAT_S`` seconds, as a device
        does: a report lost on the way (or a grant that arrived while the
        agent was not answering) is then acknowledged by the next one.
        """
        budget = max(1, int(rate * idle))
        while self.acks and budget > 0:
            self.send_report(self.acks.popleft())
            budget -= 1
        now = time.monotonic()
        if self.beat_at is not None:
            self.beats += len(self.order) * (now - self.beat_at) / HEARTBEAT_S
        self.beat_at = now
        while self.beats >= 1.0:
            self.send_report(self.order[self.beat_next])
            self.beat_next = (self.beat_next + 1) % len(self.order)
            self.beats -= 1.0
        self.flush()

    def status(self) -> dict[str, Any]:
        return {
            "agents": len(self.agents),
            "granted": self.grants,
            "sent": self.sent,
            "epochs": sorted(
                {a.grant.epoch or 0 for a in self.agents.values() if a.grant}
            )[-3:],
            "pending_acks": len(self.acks),
        }


def generator_main(
    spec: GeneratorSpec, commands: Queue[Any], replies: Queue[Any]
) -> None:
    """Process body: connect, then run commands until ``("stop", {})``.

    Commands (name, arguments) and their replies (a dict):

    - ``register(rate)``: status and one report per agent;
    - ``stream(rate, duration)``: reports round-robin for ``duration`` seconds;
    - ``remind(rate)``: one more report from every agent without a grant;
    - ``ack_mode(on, rate)``: answer every new grant with a report at once;
    - ``status()``: agents granted so far, messages sent;
    - ``stop()``.
    """
    generator = Generator(spec)
    generator.connect()
    replies.put({"ready": spec.name})
    ack_rate = 0.0
    while True:
        try:
            name, arguments = commands.get(timeout=TICK_S)
        except queue.Empty:
            if generator.ack_mode:
                generator.answer_acks(ack_rate, TICK_S)
            continue
        if name == "stop":
            generator.close()
            replies.put({"stopped": spec.name, "sent": generator.sent})
            return
        if name == "ack_mode":
            generator.set_ack_mode(bool(arguments["on"]))
            ack_rate = float(arguments["rate"])
            replies.put({"ack_mode": generator.ack_mode})
        elif name == "register":
            replies.put(generator.register(**arguments))
        elif name == "stream":
            replies.put(generator.stream(**arguments))
        elif name == "remind":
            replies.put(generator.remind(**arguments))
        elif name == "status":
            replies.put(generator.status())


def counter_main(
    host: str,
    port: int,
    topic: str,
    ready: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
    count: Any,
    last: Any,
) -> None:
    """The baseline: subscribe like the controller (QoS 0, persistent) and count.

    ``count`` and ``last`` are shared values (``multiprocessing.RawValue``):
    messages so far, and when the latest arrived.
    """

    def on_message(_c: paho.Client, _u: object, _m: paho.MQTTMessage) -> None:
        count.value += 1
        last.value = time.time()

    def on_connect(
        client: paho.Client, _u: object, _f: object, _r: object, _p: object
    ) -> None:
        client.subscribe(topic, qos=0)

    def on_subscribe(*_args: object) -> None:
        ready.set()

    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="bench-counter", clean_session=False
    )
    client.on_message = on_message
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.connect(host, port, keepalive=KEEPALIVE_S)
    client.loop_start()
    stop.wait()
    # Leave no persistent subscription behind: the broker would queue (and
    # count as dropped) every later message for this absent client.
    client.unsubscribe(topic)
    time.sleep(0.5)
    client.disconnect()
    client.loop_stop()
