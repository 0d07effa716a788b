"""The controller daemon: ingest, learn, allocate, publish and store, in a loop.

Threads and ownership:

- telemetry is received in a child process (:mod:`controller.receiver`)
  and arrives in batches of ``(topic, payload, received_at)``; a thread puts
  each batch on the inbox. Allocations and the fleet summary leave through
  another child (:mod:`controller.publisher`), so that an epoch for the whole
  fleet reaches the broker while the loop goes on. paho's network threads in
  this process (agent presence, and the budget) only queue what they
  receive; nothing but the loop touches the controller's state. The budget
  arrives on a connection of its own with an inbox of its own, read first,
  so that a flood of telemetry can neither delay a budget change nor make
  the broker drop it;
- the loop thread (the caller of :meth:`Controller.run`) owns all state and
  does everything else, one message at a time, so no state needs a lock;
- the store's writer thread commits telemetry and learner states in batches.

A reallocation (a *cycle*) runs when a trigger has been quiet for the
debounce time: a budget or alpha change, an agent joining or leaving, a fit
that moved enough to matter, an acknowledgement that frees pool for agents
still waiting to grow, a grant that lapsed, the periodic tick, or a restart.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

import schemas
from controller.allocate import capped_utility
from controller.broker import BrokerOptions, connect, make_client, publish
from controller.config import ControllerConfig
from controller.errors import FairsynergyError
from controller.explore import Explorer, problem_from_estimates
from controller.ingest import (
    AgentStatus,
    Budget,
    Event,
    Ignored,
    Ingest,
    Rejected,
    Telemetry,
)
from controller.learn import FleetLearner
from controller.logs import excerpt
from controller.metrics import ControllerMetrics
from controller.problem import Problem
from controller.publish import (
    HELD_TOLERANCE,
    Grant,
    GrantLedger,
    Transition,
    plan_transition,
)
from controller.publisher import EpochShares, Outgoing, Publisher
from controller.receiver import Message, Receiver
from controller.store import Store
from schemas import Kind, Topics

# Largest number of messages handled before the loop looks at its deadlines.
BATCH = 500
# The sweeps (lapsed grants, late acknowledgements, agents gone too long) run
# at most this often, not after every batch. Each looks only at what has come
# due (the ledger keeps grants in time order), so its cost does not grow with
# the fleet; dropping a lapsed grant late only keeps the pool accounting
# conservative a little longer.
SWEEP_INTERVAL_S = 0.25
# A cycle that took T seconds is followed by at least CYCLE_SPACING * T seconds
# for telemetry before the next one that is not urgent: at 10,000 agents a
# cycle takes 0.1 to 0.8 s (more on a slower host), and fits that move
# somewhere in the fleet every few seconds would otherwise keep the loop in
# cycles and its inbox growing. A spacing of 1 left the benchmark's budget
# transitions as long (they wait for acknowledgements, not for cycles).
CYCLE_SPACING = 3.0
# Learners rebuilt from their saved state per loop step after a restart:
# about 0.1 s of work, so telemetry keeps flowing meanwhile.
REBUILD_SLICE = 500
# Learner states serialised per loop step once a save is due: at 10,000
# agents all of them take about 0.6 s, a pause a budget change would wait
# behind.
SAVE_SLICE = 1000
# Agents named in one late-acknowledgement warning; the rest are counted.
LATE_AGENTS_LOGGED = 5
# Longest the loop sleeps when nothing is due, so shutdown stays prompt.
IDLE_S = 0.25
# A steady stream of triggers postpones a cycle by at most this many debounce
# periods, so a busy fleet still gets reallocated.
MAX_DEBOUNCE_PERIODS = 5
# Weight floor for agents when weights follow load: an idle agent still counts.
MIN_LOAD_WEIGHT = 0.05
# Smoothing of reported load (exponential moving average per report).
LOAD_SMOOTHING = 0.2
# Batches waiting in the inbox (about 200,000 messages): beyond, the receiver
# stops reading and the broker applies its own queue limit.
INBOX_LIMIT = 400


@dataclass
class AgentInfo:
    """What the loop knows of one agent besides its learner and its grants."""

    model: str | None = None
    load: float | None = None
    expected_accuracy: float | None = None
    local: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """A solved allocation the fleet is moving to, possibly over several epochs.

    Without a ``problem`` it is the last recorded epoch, continued by a
    restart before the learners are rebuilt (see :meth:`Controller.cycle`).
    """

    agents: tuple[str, ...]
    problem: Problem | None
    cloud: np.ndarray
    prices: dict[str, float]
    exploration: float  # share of the exploring allocation in ``cloud``
    solve_seconds: float


@dataclass(frozen=True)
class Holdings:
    """The ledger's view of every agent with a live grant, read once per cycle.

    Rows are the online agents first (``active`` of them, in the cycle's
    order), then the agents away whose last grant has not expired.
    """

    agents: list[str]
    active: int
    held: np.ndarray  # (N, R): the most each may be using
    current: np.ndarray  # (N, R): its latest grant
    latest: list[Grant | None]  # (N,): that grant, None for an agent without

    @property
    def away(self) -> list[str]:
        return self.agents[self.active :]


# Reasons that reallocate at once: an operator's budget or alpha change, and
# the first cycle after a (re)start, which republishes the restored state.
URGENT = frozenset({"budget", "restart"})
# Reasons due one debounce period after they first came, however many follow:
# acknowledgements trickle in while agents report, and each freed share
# should reach the growing agents without waiting for the fleet to fall quiet.
PROMPT = frozenset({"ack"})


@dataclass
class Triggers:
    """Pending reasons to reallocate, debounced.

    A cycle is due once the triggers have been quiet for ``debounce`` seconds
    (a burst of joins makes one reallocation), at the latest
    ``MAX_DEBOUNCE_PERIODS`` debounce periods after the first of them; at
    once for an urgent reason, and one debounce period after a prompt one.
    """

    debounce: float
    reasons: set[str] = field(default_factory=set)
    first_at: float = math.inf
    last_at: float = -math.inf
    # The earliest time an urgent or prompt reason makes the cycle due.
    deadline: float = math.inf
    urgent: bool = False

    def add(self, reason: str, now: float, *, urgent: bool = False) -> None:
        self.reasons.add(reason)
        self.first_at = min(self.first_at, now)
        self.last_at = now
        if urgent or reason in URGENT:
            self.deadline = min(self.deadline, now)
            self.urgent = True
        elif reason in PROMPT:
            self.deadline = min(self.deadline, now + self.debounce)

    def due_at(self) -> float:
        if not self.reasons:
            return math.inf
        quiet = self.last_at + self.debounce
        latest = self.first_at + MAX_DEBOUNCE_PERIODS * self.debounce
        return min(quiet, latest, self.deadline)

    def take(self) -> str:
        reasons = ",".join(sorted(self.reasons))
        self.reasons.clear()
        self.first_at, self.last_at = math.inf, -math.inf
        self.deadline = math.inf
        self.urgent = False
        return reasons


class Controller:
    """One fleet's controller. Build it, then call :meth:`run` until stopped."""

    def __init__(
        self,
        fleet: str,
        store: Store,
        broker: BrokerOptions,
        config: ControllerConfig,
        *,
        logger: Any,
        metrics: ControllerMetrics | None = None,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        self.fleet = fleet
        self.topics = Topics(fleet)
        self.store = store
        self.broker = broker
        self.config = config
        self.log = logger
        self.metrics = metrics or ControllerMetrics()
        self.clock = clock
        self.rng = np.random.default_rng(seed)

        self.ingest = Ingest(
            fleet,
            max_payload_bytes=config.max_payload_bytes,
            rate_limit=config.rate_limit,
            rate_burst=config.rate_burst,
        )
        self.explorer = Explorer(max_cost=config.exploration_cap)
        self.ledger = GrantLedger()
        self.triggers = Triggers(config.debounce)
        self.agents: dict[str, AgentInfo] = {}
        self.resources: tuple[str, ...] = ()
        self.budget: dict[str, float] | None = None
        self.alpha: float | None = None
        # Created with the first budget: the model has one elasticity per resource.
        self._learner: FleetLearner | None = None
        self.epoch = 0
        self.transition_complete = True
        self.target: Target | None = None
        self.last_cycle_at = -math.inf
        self.last_saved_at = -math.inf
        self.last_sweep_at = -math.inf
        # The earliest time for the next cycle that is not urgent.
        self.next_cycle_at = -math.inf
        self.last_fit_check_at = -math.inf
        # Agents whose learner changed since their state was last queued, and
        # those of the save under way, queued a slice per loop step.
        self.dirty: set[str] = set()
        self.saving: list[str] = []
        # Agents that reported since their fit was last compared with the
        # accuracy their allocation was expected to give.
        self.refit: set[str] = set()
        # Agents already warned about for not acknowledging their latest grant.
        self.late: set[str] = set()
        # Agents offline but still in the fleet, and since when: the sweep
        # looks only at these.
        self.offline: dict[str, float] = {}
        # Each agent's exploration draw (standard normals), held between ticks.
        self.draws: dict[str, np.ndarray] = {}
        # During a transition: agents whose acknowledgement growth waits for.
        self.blocking: set[str] = set()
        # A fit moved during a transition; re-solve once it completes.
        self.fit_deferred = False
        self.inbox: queue.Queue[list[Message]] = queue.Queue(INBOX_LIMIT)
        self.control_inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.receiver: Receiver | None = None
        self.publisher: Publisher | None = None
        self.client: paho.Client | None = None
        self.control_client: paho.Client | None = None
        # The prices of the last epoch recorded before a restart.
        self.restored_prices: dict[str, float] = {}
        # Since a restart: the saved learner states are still to be read, and
        # the learners still to be rebuilt from them, a slice per loop step.
        self.states_unread = False
        self.rebuilding = False
        # The received counter of each kind of event, looked up once.
        self._received: dict[type, Any] = {}

    # -- lifecycle ---------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Restore state, connect, and loop until ``stop`` is set.

        The child processes start first: they spend their first second
        importing and connecting, on another core, while this one restores.
        """
        self.receiver = self._start_receiver()
        self.publisher = Publisher(
            self.broker, f"fairsynergy-controller-{self.fleet}-publisher", self.fleet
        )
        try:
            self.restore()
            self.client = self._connect()
            self.control_client = self._connect_control()
            self.receiver.wait_ready()
            self.publisher.wait_ready()
            threading.Thread(
                target=self._pass_batches, name="fairsynergy-batches", daemon=True
            ).start()
            self.log.info("controller_started", fleet=self.fleet, epoch=self.epoch)
            # The restart cycle runs before the telemetry queued meanwhile.
            self.triggers.add("restart", self.clock())
            self.housekeeping(self.clock())
            while not stop.is_set():
                self.step(self._wait_time())
        finally:
            self._shutdown()

    def _connect(self) -> paho.Client:
        client = make_client(self.broker, f"fairsynergy-controller-{self.fleet}")
        status = schemas.encode(
            Kind.CONTROLLER_STATUS, schemas.controller_status(state="offline")
        )
        client.will_set(self.topics.controller_status, status, qos=1, retain=True)
        client.on_message = self._on_message
        client.on_connect = self._on_connect
        connect(client)
        return client

    def _on_connect(
        self, client: paho.Client, _u: object, _f: object, code: ReasonCode, _p: object
    ) -> None:
        """(Re)subscribe and announce ourselves; runs on every (re)connect."""
        if code.is_failure:
            return
        client.subscribe(self.topics.any_agent(Kind.AGENT_STATUS), qos=1)
        # Sessions kept by the broker from older versions also had these.
        client.unsubscribe(self.topics.budget)
        client.unsubscribe(self.topics.any_agent(Kind.TELEMETRY))
        birth = schemas.controller_status(state="online")
        client.publish(
            self.topics.controller_status,
            schemas.encode(Kind.CONTROLLER_STATUS, birth),
            qos=1,
            retain=True,
        )

    def _start_receiver(self) -> Receiver:
        """Telemetry at QoS 0, received in a child process (see its module)."""
        telemetry = self.topics.any_agent(Kind.TELEMETRY)
        client_id = f"fairsynergy-controller-{self.fleet}-telemetry"
        return Receiver(self.broker, client_id, [(telemetry, 0)])

    def _pass_batches(self) -> None:
        """Move the receiver's batches to the inbox until it stops."""
        assert self.receiver is not None
        while True:
            try:
                batch = self.receiver.receive()
            except EOFError:
                self.inbox.put(_RECEIVER_GONE)
                return
            self.inbox.put(batch)

    def _connect_control(self) -> paho.Client:
        """The budget's own session: never queued behind telemetry."""
        client_id = f"fairsynergy-controller-{self.fleet}-control"
        client = make_client(self.broker, client_id)
        client.on_message = self._on_control_message
        client.on_connect = self._on_control_connect
        connect(client)
        return client

    def _on_control_connect(
        self, client: paho.Client, _u: object, _f: object, code: ReasonCode, _p: object
    ) -> None:
        if not code.is_failure:
            client.subscribe(self.topics.budget, qos=1)

    def _on_message(
        self, _c: paho.Client, _u: object, message: paho.MQTTMessage
    ) -> None:
        if message.topic == self.topics.budget:
            return  # a session from before the budget had its own: stale order
        self.inbox.put([(message.topic, bytes(message.payload), self.clock())])

    def _on_control_message(
        self, _c: paho.Client, _u: object, message: paho.MQTTMessage
    ) -> None:
        self.control_inbox.put((message.topic, bytes(message.payload), self.clock()))
        # Wake the loop if it is waiting for telemetry.
        self.inbox.put(_WAKE)

    def _shutdown(self) -> None:
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.close()
        publisher, self.publisher = self.publisher, None
        if publisher is not None:
            publisher.close()
        control, self.control_client = self.control_client, None
        if control is not None:
            control.disconnect()
            control.loop_stop()
        client, self.client = self.client, None
        if client is not None:
            bye = schemas.controller_status(state="offline")
            publish(
                client,
                self.topics.controller_status,
                schemas.encode(Kind.CONTROLLER_STATUS, bye),
                retain=True,
                wait=2.0,
            )
            client.disconnect()
            client.loop_stop()
        self.save_learners()
        self.store.close()
        self.log.info("controller_stopped", fleet=self.fleet, epoch=self.epoch)

    # -- the loop ----------------------------------------------------------

    def _wait_time(self) -> float:
        due = min(
            self.triggers.due_at(),
            self.last_cycle_at + self.config.reallocation_interval,
        )
        if not self.triggers.urgent:
            due = max(due, self.next_cycle_at)
        return min(IDLE_S, max(0.0, due - self.clock()))

    def step(self, wait: float) -> None:
        """Handle what arrived (waiting up to ``wait``), then run what is due.

        Budget messages are read first, before each batch of telemetry.
        """
        try:
            first = (
                self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
            )
        except queue.Empty:
            first = None
        self._receive_control()
        handled = 0 if first is None else self._handle(first)
        while 0 < handled < BATCH:
            try:
                handled += self._handle(self.inbox.get_nowait())
            except queue.Empty:
                break
        self.housekeeping(self.clock())

    def _handle(self, batch: list[Message]) -> int:
        """Receive a batch from the inbox; returns how many messages it held."""
        if batch is _RECEIVER_GONE:
            raise FairsynergyError("the telemetry receiver process stopped")
        for item in batch:
            self.receive(*item)
        return max(len(batch), 1)

    def _receive_control(self) -> None:
        while True:
            try:
                self.receive(*self.control_inbox.get_nowait())
            except queue.Empty:
                return

    def receive(self, topic: str, payload: bytes, now: float) -> None:
        """Ingest one message. Never raises: a failure is logged and counted."""
        try:
            event = self.ingest.handle(topic, payload, now, self._granted)
            self._count_received(event)
            self.apply(event, now)
        except Exception:
            self.metrics.rejected.labels(kind="unknown", reason="internal").inc()
            self.log.exception("message_failed", topic=topic, payload=excerpt(payload))

    def _count_received(self, event: Event) -> None:
        counter = self._received.get(type(event))
        if counter is None:
            counter = self.metrics.received.labels(kind=_kind_label(event))
            self._received[type(event)] = counter
        counter.inc()

    def _granted(self, agent: str) -> dict[str, float]:
        return self.ledger.held_by(agent)

    def apply(self, event: Event, now: float) -> None:
        if isinstance(event, Telemetry):
            self.on_telemetry(event, now)
        elif isinstance(event, AgentStatus):
            self.on_status(event, now)
        elif isinstance(event, Budget):
            self.on_budget(event, now)
        elif isinstance(event, Rejected):
            self.on_rejected(event)
        else:
            assert isinstance(event, Ignored)

    # -- events ------------------------------------------------------------

    def on_telemetry(self, report: Telemetry, now: float) -> None:
        if self.states_unread:
            self._read_learner_states()
        info = self._join(report.agent, report.model, now)
        info.local = dict(report.local)
        if report.load is not None:
            info.load = _smooth(info.load, report.load)
        self.store.record_telemetry(
            report.agent,
            report.seq,
            report.ts,
            report.accuracy,
            report.local,
            report.cloud,
            report.epoch,
            report.load,
            report.model,
        )
        if self._learner is not None:
            self.learner.learn_one(
                report.agent,
                report.local,
                report.cloud,
                report.accuracy,
                seq=report.seq,
                model=report.model,
            )
            self.dirty.add(report.agent)
            self.refit.add(report.agent)
        if report.epoch is not None:
            released = self.ledger.acknowledge(report.agent, report.epoch)
            self.late.discard(report.agent)
            if released and not self.transition_complete:
                if not self.ledger.switching(report.agent):
                    self.blocking.discard(report.agent)
                self.triggers.add("ack", now, urgent=not self.blocking)

    def check_fits(self, now: float) -> None:
        """Trigger a reallocation if a fit moved enough to matter.

        Compares, for each agent that reported since the last check, the
        accuracy its fit now predicts at its current amounts with what the
        last cycle expected. Runs once per debounce period, not per report:
        an agent reporting many times a second is checked once.
        """
        pending, self.refit = self.refit, set()
        if self._learner is None:
            return
        agents, expected, totals = [], [], []
        names = self.resources
        for agent in pending:
            info = self.agents.get(agent)
            latest = self.ledger.latest(agent)
            if info is None or latest is None or info.expected_accuracy is None:
                continue
            if agent not in self._learner:
                continue
            agents.append(agent)
            expected.append(info.expected_accuracy)
            cloud = latest.cloud
            totals.append([info.local.get(r, 0.0) + cloud.get(r, 0.0) for r in names])
        if not agents:
            return
        predicted = self._learner.predict_many(agents, np.array(totals))
        moved = np.abs(predicted - np.array(expected)) > self.config.fit_change
        if moved.any():
            self.triggers.add("fit", now)

    def on_status(self, status: AgentStatus, now: float) -> None:
        if status.state == "online":
            self._join(status.agent, status.model, now)
            return
        if status.agent in self.agents and status.agent not in self.offline:
            self.offline[status.agent] = now
            self.store.set_agent_state(status.agent, "offline")
            self.log.info("agent_offline", agent=status.agent)

    def _join(self, agent: str, model: str | None, now: float) -> AgentInfo:
        info = self.agents.get(agent)
        if info is None:
            info = self.agents[agent] = AgentInfo(model=model)
            self.triggers.add("join", now)
            self.log.info("agent_joined", agent=agent, model=model)
        elif self.offline.pop(agent, None) is not None:
            self.triggers.add("join", now)
            self.log.info("agent_back", agent=agent)
        if model is not None:
            info.model = model
        if self._learner is not None and agent not in self._learner:
            self._learner.add_agent(agent, model=model)
        return info

    def on_budget(self, budget: Budget, now: float) -> None:
        # The store keeps the alpha in force (the default when a budget names
        # none), so compare that: the retained budget is read again on every
        # (re)connect and after a restart, and is no change then.
        alpha = self.config.alpha if budget.alpha is None else budget.alpha
        if budget.resources == self.budget and alpha == self._alpha():
            return
        self._set_budget(budget)
        self.store.record_budget(self.budget or {}, self._alpha())
        self.triggers.add("budget", now)
        self.log.info(
            "budget_changed",
            budget=self.budget,
            alpha=self._alpha(),
        )

    def _set_budget(self, budget: Budget) -> None:
        resources = tuple(sorted(budget.resources))
        if resources != self.resources:
            self._change_resources(resources)
        self.budget = {r: float(budget.resources[r]) for r in resources}
        self.alpha = budget.alpha

    def _change_resources(self, resources: tuple[str, ...]) -> None:
        """A new set of resources is a new model: learning starts again."""
        self.resources = resources
        self.draws.clear()
        self._learner = FleetLearner(resources)
        for agent, info in self.agents.items():
            self._learner.add_agent(agent, model=info.model)

    @property
    def learner(self) -> FleetLearner:
        """The fleet's learner; it exists once a budget names the resources."""
        if self._learner is None:
            raise FairsynergyError("no budget yet, so no resources to learn")
        return self._learner

    def on_rejected(self, rejected: Rejected) -> None:
        self.metrics.rejected.labels(kind=rejected.kind, reason=rejected.reason).inc()
        self.log.warning(
            "message_rejected",
            topic=rejected.topic,
            agent=rejected.agent,
            reason=rejected.reason,
            field=rejected.field,
            detail=rejected.detail[:200],
        )
        if not rejected.notify or self.client is None:
            return
        notice = schemas.rejection(
            topic=rejected.topic,
            reason=rejected.reason,
            field=rejected.field[:256] if rejected.field else None,
            seq=rejected.seq,
            message=rejected.detail[:1024],
        )
        self.client.publish(
            schemas.rejection_topic(rejected.topic),
            schemas.encode(Kind.REJECTION, notice),
            qos=1,
        )

    # -- deadlines ---------------------------------------------------------

    def housekeeping(self, now: float) -> None:
        """Sweep, check fits, save learners, run a due cycle, rebuild some learners."""
        if now >= self.last_sweep_at + SWEEP_INTERVAL_S:
            self.sweep(now)
            self.last_sweep_at = now
        if now >= self.last_fit_check_at + self.config.debounce:
            self.check_fits(now)
            self.last_fit_check_at = now
        if now >= self.last_cycle_at + self.config.reallocation_interval:
            self.triggers.add("tick", now)
        # An agent reporting many times a second costs one state write per
        # interval, not one per report.
        if now >= self.last_saved_at + self.config.learner_save_interval:
            self._start_save()
            self.last_saved_at = now
        if self.saving:
            self._save_slice(SAVE_SLICE)
        spaced = now >= self.next_cycle_at or self.triggers.urgent
        if now >= self.triggers.due_at() and spaced:
            trigger = self.triggers.take()
            started = time.perf_counter()
            try:
                self.cycle(trigger, now)
            except Exception:
                self.log.exception("cycle_failed", trigger=trigger, epoch=self.epoch)
            took = time.perf_counter() - started
            self.next_cycle_at = self.clock() + CYCLE_SPACING * took
        if self.rebuilding:
            self._rebuild_learners(now)

    def _rebuild_learners(self, now: float) -> None:
        """Rebuild a slice of the learners held since the restart.

        Once the last is rebuilt, a ``restored`` cycle solves with all of
        them. States the learner could not rebuild are reported here; those
        agents learn again from their model's prior.
        """
        if self.states_unread:
            self._read_learner_states()
        learner = self.learner
        if learner.restore_held(REBUILD_SLICE) == 0:
            self.rebuilding = False
            self.triggers.add("restored", now)
        if learner.refused:
            refused, learner.refused = learner.refused, {}
            first = sorted(refused)[:LATE_AGENTS_LOGGED]
            self.log.warning(
                "learner_states_refused",
                count=len(refused),
                agents=first,
                reasons=[refused[agent] for agent in first],
            )

    def sweep(self, now: float) -> None:
        """Lapse grants, warn of late acknowledgements, drop agents gone too long.

        Also stops the daemon (for its supervisor to restart) if the
        publisher process has died: a controller that cannot publish must
        not go on granting.
        """
        if self.publisher is not None and not self.publisher.alive():
            raise FairsynergyError("the allocation publisher process stopped")
        if self.ledger.expire(now):
            self.triggers.add("expiry", now)
        late = [
            agent
            for agent in self.ledger.newly_late(now, self.config.ack_timeout)
            if agent not in self.late
        ]
        if late:
            self.late.update(late)
            self.metrics.unacknowledged.inc(len(late))
            self.log.warning(
                "agents_not_acknowledging",
                count=len(late),
                agents=sorted(late)[:LATE_AGENTS_LOGGED],
                epoch=self.epoch,
            )
        for agent, since in list(self.offline.items()):
            if now - since >= self.config.offline_grace:
                self._leave(agent, now)

    def _leave(self, agent: str, now: float) -> None:
        """Stop allocating to ``agent``; its last grant counts until it expires."""
        self.agents.pop(agent, None)
        self.offline.pop(agent, None)
        self.draws.pop(agent, None)
        if self._learner is not None:
            self._learner.remove_agent(agent)
        self.ingest.forget(agent)
        self.triggers.add("leave", now)
        self.log.info("agent_left", agent=agent)
        # Clear the retained allocation, so the agent does not find it again
        # on its return as if it were still granted. It goes the way its
        # grants went, so the broker keeps them in order.
        self._send([(self.topics.for_agent(agent).allocation, b"", True)])

    # -- allocation --------------------------------------------------------

    def cycle(self, trigger: str, now: float) -> None:
        """Solve, explore, plan the transition, record and publish a new epoch.

        A cycle triggered only by acknowledgements or lapsed grants continues
        the transition to the target already solved, so that agents waiting
        to grow get there instead of chasing a new exploring target each time.
        A moved fit waits for the transition under way to complete, then
        re-solves: while the learner is busy, fits move every few seconds, and
        re-solving each time would never let a transition finish.
        """
        self.last_cycle_at = now
        active = [a for a in self.agents if a not in self.offline]
        if self.budget is None or not active or self._learner is None:
            return
        started = time.perf_counter()
        holdings = self._holdings(active)
        budget = self._available_budget(holdings)
        target = self.target
        reasons = set(trigger.split(","))
        if reasons & {"tick", "budget"}:
            self.draws.clear()  # a new exploration draw for everyone
        if "fit" in reasons and target is not None:
            self.fit_deferred = True
            reasons.discard("fit")
        continuing = reasons <= {"ack", "expiry"}
        if self.rebuilding and not reasons & {"budget", "join", "leave"}:
            target = self._recorded_target(active, holdings)
        elif target is None or target.agents != tuple(active) or not continuing:
            target = self._solve(active, budget)
            self.fit_deferred = False

        n = holdings.active
        held = holdings.held[:n]
        due = self._needs_grant(holdings.latest[:n], now)
        if "restart" in reasons:
            due |= self._maybe_unsent(active)
        step = plan_transition(
            budget,
            target.cloud,
            held,
            holdings.current[:n],
            hysteresis=self.config.hysteresis,
            new_agents=due,
        )
        self._follow(step, target, active, held, now)
        if not step.publish.any() and "restart" not in trigger:
            return

        expected = self._expected(target, active, step.cloud)
        self.epoch = self.store.next_epoch()
        shares = self._shares(holdings, step, expected, target.prices, now)
        self._record(trigger, shares)
        self._publish(shares)
        changed = [a for a, p in zip(active, step.publish.tolist(), strict=True) if p]
        self._report(trigger, active, changed, expected, target, started, step)

    def _follow(
        self,
        step: Transition,
        target: Target,
        active: list[str],
        held: np.ndarray,
        now: float,
    ) -> None:
        """Remember how the transition stands after ``step``.

        Until it completes, the agents still holding more than ``step`` gives
        them are what growth waits for: the acknowledgement of the last of
        them runs the next cycle at once.
        """
        self.transition_complete = step.complete
        self.target = None if step.complete else target
        holding = np.flatnonzero((held > step.cloud * (1 + HELD_TOLERANCE)).any(axis=1))
        rows = [] if step.complete else holding.tolist()
        self.blocking = {active[row] for row in rows}
        if step.complete and self.fit_deferred:
            self.fit_deferred = False
            self.triggers.add("fit", now)

    def _recorded_target(self, active: list[str], holdings: Holdings) -> Target:
        """The restored grants, as they stand: what a restart republishes first.

        Solving needs every agent's learner, and rebuilding 10,000 of them
        from the store takes seconds; the grants restored from the last
        epoch are consistent with the budget already. So the first cycle
        after a restart renews them and publishes the summary of a new
        epoch, and the learners are rebuilt in slices between batches of
        telemetry; once they all are, a ``restored`` cycle solves again.
        """
        return Target(
            agents=tuple(active),
            problem=None,
            cloud=holdings.current[: holdings.active],
            prices=dict(self.restored_prices),
            exploration=0.0,
            solve_seconds=0.0,
        )

    def _expected(
        self, target: Target, active: list[str], cloud: np.ndarray
    ) -> np.ndarray:
        """Each agent's expected accuracy at ``cloud``; NaN where unknown."""
        if target.problem is not None:
            return capped_utility(target.problem, cloud)
        recorded = [self.agents[agent].expected_accuracy for agent in active]
        return np.array([math.nan if e is None else e for e in recorded], dtype=float)

    def _solve(self, active: list[str], budget: np.ndarray) -> Target:
        """The allocation to head for: fair at the estimates, plus exploration."""
        if self.states_unread:
            self._read_learner_states()
        estimates = self.learner.estimates(active)
        weight = self._weights(active)
        alpha = self._alpha()
        problem = problem_from_estimates(
            estimates, self.resources, budget, alpha=alpha, weight=weight
        )
        sample = problem_from_estimates(
            self.learner.sample_from(self._draws(active), active),
            self.resources,
            budget,
            alpha=alpha,
            weight=weight,
        )
        started = time.perf_counter()
        exploration = self.explorer.allocate(
            problem, sample, float(np.mean(estimates.uncertainty))
        )
        prices = exploration.mean.prices.tolist()
        return Target(
            agents=tuple(active),
            problem=problem,
            cloud=exploration.cloud,
            prices=self._amounts(prices),
            exploration=exploration.share,
            solve_seconds=time.perf_counter() - started,
        )

    def _draws(self, active: list[str]) -> np.ndarray:
        """The standard normals of each agent's exploration draw, held per agent.

        Held between periodic ticks (and drawn for agents new since), so that
        a cycle for a moved fit or a joining agent re-solves with the same
        exploration draw instead of moving every agent to a new one.
        """
        size = len(self.resources) + 1
        for agent in active:
            if agent not in self.draws:
                self.draws[agent] = self.rng.standard_normal(size)
        return np.array([self.draws[agent] for agent in active]).reshape(-1, size)

    def _needs_grant(self, latest: list[Grant | None], now: float) -> np.ndarray:
        """No live grant, or one past half its lease: publish (renew) it now."""
        renew_by = now + self.config.grant_lease / 2
        return np.array([g is None or g.expires < renew_by for g in latest], bool)

    def _maybe_unsent(self, active: list[str]) -> np.ndarray:
        """After a restart: the agents whose latest grant is not acknowledged.

        The daemon may have died before its publisher sent it (an orphaned
        publisher stops), and an agent that never hears of it keeps using
        its older grant, which holds back the growth of others until that
        lease ends. So the restart's epoch sends them all again; agents that
        got it meanwhile take it as a renewal.
        """
        return np.array([self.ledger.unacknowledged(a) for a in active], bool)

    def _holdings(self, active: list[str]) -> Holdings:
        present = set(active)
        away = sorted(a for a in self.ledger.agents() if a not in present)
        agents = active + away
        view = self.ledger.view(agents, self.resources)
        return Holdings(agents, len(active), view.held, view.current, view.latest)

    def _available_budget(self, holdings: Holdings) -> np.ndarray:
        """The budget minus what agents offline (but within grace) still hold."""
        budget = self.budget or {}
        total = np.array([budget[r] for r in self.resources], dtype=float)
        reserved = holdings.held[holdings.active :].sum(axis=0)
        available: np.ndarray = np.maximum(total - reserved, 0.0)
        return available

    def _weights(self, active: list[str]) -> np.ndarray | None:
        if self.config.weights == "equal":
            return None
        loads = np.array([self.agents[a].load or 0.0 for a in active])
        mean = loads.mean() if loads.any() else 1.0
        return np.asarray(np.maximum(loads / mean, MIN_LOAD_WEIGHT), dtype=float)

    def _alpha(self) -> float:
        return self.config.alpha if self.alpha is None else self.alpha

    def _shares(
        self,
        holdings: Holdings,
        step: Transition,
        expected: np.ndarray,
        prices: dict[str, float],
        now: float,
    ) -> EpochShares:
        """The new epoch: every agent's share, as recorded and summarised.

        It lists every grant still live, also of agents away but not yet
        expired, so that a restarted controller counts all of them.
        """
        agents, n = holdings.agents, holdings.active
        lease = self.config.grant_lease
        away = np.arange(len(agents)) >= n
        publish = np.concatenate([step.publish, np.zeros(len(agents) - n, bool)])
        latest = holdings.latest
        old = [g if g is not None else Grant(self.epoch, {}, now, now) for g in latest]
        new = publish | np.array([g is None for g in latest], dtype=bool)
        cloud = np.vstack([step.cloud, holdings.current[n:]])
        nothing = np.full(len(agents) - n, np.nan)
        return EpochShares(
            epoch=self.epoch,
            ts=now,
            alpha=self._alpha(),
            budget=dict(self.budget or {}),
            prices=prices,
            resources=self.resources,
            agents=agents,
            cloud=cloud,
            held=np.maximum(holdings.held, cloud),
            expected=np.concatenate([np.clip(expected, 0.0, 1.0), nothing]),
            epochs=np.where(new, self.epoch, [g.epoch for g in old]),
            published_at=np.where(new, now, [g.published_at for g in old]),
            expires=np.where(new, now + lease, [g.expires for g in old]),
            publish=publish,
            away=away,
        )

    def _record(self, trigger: str, shares: EpochShares) -> None:
        """Commit the epoch before anything about it is published.

        Written column by column: for 10,000 agents, building and encoding
        one object per agent took a quarter of a second per cycle.
        """
        away = shares.away.tolist()
        known: list[float | None] = []
        for agent, value, gone in zip(
            shares.agents, shares.expected.tolist(), away, strict=True
        ):
            if gone or math.isnan(value):
                known.append(None)
            else:
                known.append(value)
                self.agents[agent].expected_accuracy = value
        columns: dict[str, list[Any] | np.ndarray] = {
            "agent": shares.agents,
            "resources": list(shares.resources),
            "cloud": shares.cloud,
            "epoch": shares.epochs,
            "published_at": shares.published_at,
            "expires": shares.expires,
            "held": shares.held,
            "expected_accuracy": known,
            "away": shares.away,
        }
        self.store.record_allocation(
            self.epoch,
            trigger=trigger,
            alpha=shares.alpha,
            budget=shares.budget,
            prices=shares.prices,
            columns=columns,
            ts=shares.ts,
        )

    def _amounts(self, values: list[float]) -> dict[str, float]:
        """One amount per resource, by name."""
        return dict(zip(self.resources, values, strict=True))

    def _publish(self, shares: EpochShares) -> None:
        """Grant the changed agents their shares and have the epoch published.

        The publisher process builds, checks and sends the messages (see
        :class:`EpochShares`); the grants count from now on.
        """
        rows = np.flatnonzero(shares.publish).tolist()
        cloud, expires = shares.cloud.tolist(), shares.expires.tolist()
        for row in rows:
            amounts = self._amounts(cloud[row])
            grant = Grant(self.epoch, amounts, shares.ts, expires[row])
            self.ledger.grant(shares.agents[row], grant)
        self._send(shares)
        self.metrics.allocations_published.inc(len(rows))

    def _send(self, outgoing: EpochShares | list[Outgoing]) -> None:
        """Hand messages to the publisher process (none without a broker)."""
        if self.publisher is not None:
            self.publisher.send(outgoing)

    def _report(
        self,
        trigger: str,
        active: list[str],
        changed: list[str],
        expected: np.ndarray,
        target: Target,
        started: float,
        step: Transition,
    ) -> None:
        cycle_seconds = time.perf_counter() - started
        # Unknown (NaN) only for agents a restart has no expectation for.
        known = expected[~np.isnan(expected)]
        mean = round(float(known.mean()), 4) if known.size else None
        worst = round(float(known.min()), 4) if known.size else None
        self.metrics.epoch.set(self.epoch)
        self.metrics.solve_seconds.observe(target.solve_seconds)
        self.metrics.cycle_seconds.observe(cycle_seconds)
        if mean is not None and worst is not None:
            self.metrics.expected_accuracy.labels(statistic="mean").set(mean)
            self.metrics.expected_accuracy.labels(statistic="worst").set(worst)
        self.metrics.exploration_share.set(target.exploration)
        self.metrics.agents_online.set(len(active))
        self.log.info(
            "allocation_cycle",
            epoch=self.epoch,
            trigger=trigger,
            agents=len(active),
            changed=len(changed),
            solve_ms=round(target.solve_seconds * 1000, 2),
            cycle_ms=round(cycle_seconds * 1000, 2),
            mean_accuracy=mean,
            worst_accuracy=worst,
            exploration=round(target.exploration, 4),
            complete=step.complete,
            waiting_for=len(self.blocking),
        )
        if step.over_budget.any():
            self.log.warning(
                "budget_below_holdings",
                epoch=self.epoch,
                over=self._amounts(step.over_budget.tolist()),
            )

    # -- state -------------------------------------------------------------

    def save_learners(self) -> None:
        """Queue the state of every learner that changed since its last save."""
        self._start_save()
        self._save_slice(len(self.saving))

    def _start_save(self) -> None:
        """Add the learners changed since the last save to the save under way."""
        self.saving.extend(self.dirty)
        self.dirty = set()

    def _save_slice(self, most: int) -> None:
        """Queue the states of up to ``most`` agents of the save under way."""
        chosen, self.saving = self.saving[:most], self.saving[most:]
        if self._learner is None:
            return
        for agent in chosen:
            if agent in self._learner:
                self.store.save_learner_state(agent, self._learner.agent_state(agent))

    def restore(self) -> None:
        """Rebuild budget, grants, learners and epoch from the store."""
        now = self.clock()
        budget = self.store.latest_budget()
        if budget is not None:
            self._set_budget(Budget(budget["resources"], budget["alpha"]))
        self.epoch = self.store.last_epoch()
        rows = {row["agent"]: row for row in self.store.agents()}
        for agent, row in rows.items():
            if row.get("last_seq") is not None:
                self.ingest.restore_seq(agent, int(row["last_seq"]))

        latest = self.store.latest_allocation() or {}
        for agent, share in latest.get("agents", {}).items():
            row = rows.get(agent, {})
            if not share.get("away"):
                self.agents[agent] = AgentInfo(
                    model=row.get("model"),
                    expected_accuracy=share.get("expected_accuracy"),
                )
            if share["expires"] > now:
                grant = Grant(
                    share["epoch"],
                    share["cloud"],
                    share["published_at"],
                    share["expires"],
                )
                self.ledger.restore(
                    agent,
                    grant,
                    held=share["held"],
                    acknowledged_epoch=row.get("last_epoch_acked"),
                )

        self.restored_prices = latest.get("prices", {})
        # The learners' states are read after the restart cycle (see
        # _recorded_target), or before anything needs them.
        self.rebuilding = self.states_unread = self._learner is not None
        self.log.info("state_restored", epoch=self.epoch, agents=len(self.agents))

    def _read_learner_states(self) -> None:
        """Hand the learner every saved state, to parse as it needs them."""
        self.states_unread = False
        states = self.store.learner_state_texts()
        self.learner.restore_later(states)
        for agent, info in self.agents.items():
            if agent not in self.learner:
                self.learner.add_agent(agent, model=info.model)
        self.log.info("learner_states_read", learners=len(states))


# Put on the inbox to wake a waiting loop, and to say the receiver has gone.
_WAKE: list[Message] = []
_RECEIVER_GONE: list[Message] = []


def _kind_label(event: Event) -> str:
    return type(event).__name__.lower()


def _smooth(previous: float | None, value: float) -> float:
    if previous is None:
        return value
    return (1 - LOAD_SMOOTHING) * previous + LOAD_SMOOTHING * value
