"""The controller's loop, driven in-process: priorities, debouncing, sweeps.

These tests build a :class:`Controller` on a real SQLite file but never
connect it (``client`` stays ``None``, so nothing is published) and feed its
inboxes directly, with a clock the test moves. The end-to-end tests in
``test_controller_e2e.py`` run the same loop as a process against Mosquitto.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

import schemas
from controller.broker import BrokerOptions
from controller.config import ControllerConfig
from controller.daemon import BATCH, Controller, Triggers
from controller.errors import FairsynergyError
from controller.publish import Grant
from controller.publisher import Publisher
from controller.store import Store
from schemas import Kind, Topics

FLEET = "lab"
TOPICS = Topics(FLEET)
BUDGET = {"compute": 4.0, "data": 2.0}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def unconnected(path: Path, clock: Clock) -> Controller:
    """A controller with default settings on the state file ``path``."""
    store = Store(path, fleet=FLEET, clock=clock)
    config = ControllerConfig(rate_limit=1000.0, rate_burst=1000.0)
    return Controller(
        FLEET,
        store,
        BrokerOptions("mqtt://127.0.0.1:1"),
        config,
        logger=structlog.get_logger(),
        clock=clock,
        seed=7,
    )


@pytest.fixture
def controller(tmp_path: Path, clock: Clock) -> Iterator[Controller]:
    """An unconnected controller with default settings and its own state file."""
    built = unconnected(tmp_path / "state.db", clock)
    yield built
    built.store.close()


def budget_payload(resources: dict[str, float]) -> bytes:
    return schemas.encode(Kind.BUDGET, schemas.budget(resources=resources))


def report(agent: str, seq: int, accuracy: float, clock: Clock, **extra) -> bytes:
    """A telemetry payload using no cloud, unless ``extra`` says otherwise."""
    fields: dict[str, Any] = {
        "local": {"compute": 0.1, "data": 0.1},
        "cloud": {},
        "epoch": None,
    }
    fields |= extra
    message = schemas.telemetry(seq=seq, accuracy=accuracy, ts=clock.now, **fields)
    return schemas.encode(Kind.TELEMETRY, message)


def join(controller: Controller, clock: Clock, count: int) -> list[str]:
    """Give ``controller`` a budget and one report from each of ``count`` agents."""
    controller.receive(TOPICS.budget, budget_payload(BUDGET), clock.now)
    agents = [f"a{i}" for i in range(count)]
    for agent in agents:
        topic = TOPICS.for_agent(agent).telemetry
        controller.receive(topic, report(agent, 1, 0.5, clock), clock.now)
    return agents


def test_triggers_wait_for_quiet_but_urgent_reasons_run_at_once():
    """Joins are debounced; a budget change is due the moment it arrives."""
    triggers = Triggers(debounce=0.5)

    triggers.add("join", 10.0)
    triggers.add("join", 10.3)
    debounced = triggers.due_at()
    triggers.add("budget", 10.4)

    assert debounced == pytest.approx(10.8)
    assert triggers.due_at() == 10.4
    assert triggers.take() == "budget,join"
    assert triggers.due_at() == float("inf")


def test_triggers_postpone_at_most_five_debounce_periods():
    """A steady stream of triggers still lets a cycle run."""
    triggers = Triggers(debounce=0.5)

    for step in range(20):
        triggers.add("fit", 10.0 + 0.2 * step)

    assert triggers.due_at() == pytest.approx(12.5)


def test_triggers_run_acknowledgements_one_debounce_after_the_first():
    """Acknowledgements that keep coming do not postpone the growth they free."""
    triggers = Triggers(debounce=0.5)

    for step in range(10):
        triggers.add("ack", 10.0 + 0.1 * step)

    assert triggers.due_at() == pytest.approx(10.5)


def test_controller_reads_budget_before_queued_telemetry(controller, clock):
    """A budget behind a full batch of telemetry is applied in the first step."""
    topic = TOPICS.for_agent("a1").telemetry
    seqs = iter(range(1, 10_000))
    for _ in range(3):
        batch = [(topic, report("a1", next(seqs), 0.5, clock), clock.now)]
        controller.inbox.put(batch * (BATCH // 2 + 50))
    controller.control_inbox.put((TOPICS.budget, budget_payload(BUDGET), clock.now))

    controller.step(0.0)

    assert controller.budget == BUDGET
    assert controller.inbox.qsize() == 1  # the third batch is still waiting


def test_controller_ignores_budget_on_the_telemetry_session(controller, clock):
    """Only the control session carries the budget, so an old copy cannot win."""

    class Message:
        topic = TOPICS.budget
        payload = budget_payload(BUDGET)

    controller._on_message(None, None, Message())

    assert controller.inbox.qsize() == 0


def test_controller_checks_fits_once_per_debounce_period(controller, clock):
    """A moved fit triggers a cycle at the next check, not on the report itself."""
    controller.receive(TOPICS.budget, budget_payload(BUDGET), clock.now)
    for seq in range(1, 6):
        topic = TOPICS.for_agent("a1").telemetry
        controller.receive(topic, report("a1", seq, 0.5, clock), clock.now)
    controller.cycle("join", clock.now)
    controller.triggers.take()
    controller.last_fit_check_at = clock.now
    grant = controller.ledger.latest("a1")
    assert grant is not None
    assert controller.agents["a1"].expected_accuracy is not None

    # Reports far below what the allocation was expected to give.
    for seq in range(6, 30):
        payload = report(
            "a1", seq, 0.05 + 0.001 * seq, clock, cloud=grant.cloud, epoch=grant.epoch
        )
        controller.receive(TOPICS.for_agent("a1").telemetry, payload, clock.now)
    pending = set(controller.triggers.reasons)
    clock.now += controller.config.debounce
    controller.check_fits(clock.now)

    assert "fit" not in pending
    assert "fit" in controller.triggers.reasons
    assert not controller.refit


def test_sweep_warns_once_for_all_late_agents(controller, clock):
    """Agents that do not acknowledge are reported in one line with a count."""
    agents = join(controller, clock, 8)
    controller.cycle("join", clock.now)
    clock.now += controller.config.ack_timeout + 1.0

    with capture_logs() as logs:
        controller.sweep(clock.now)
        controller.sweep(clock.now + 1.0)

    late = [entry for entry in logs if entry["event"] == "agents_not_acknowledging"]
    assert len(late) == 1
    assert late[0]["count"] == len(agents)
    assert len(late[0]["agents"]) <= 5


def test_controller_spaces_cycles_by_their_cost_unless_urgent(controller, clock):
    """After a cycle, a fit waits; a budget change does not."""
    controller.receive(TOPICS.budget, budget_payload(BUDGET), clock.now)
    topic = TOPICS.for_agent("a1").telemetry
    controller.receive(topic, report("a1", 1, 0.5, clock), clock.now)
    controller.housekeeping(clock.now)
    first = controller.epoch
    controller.next_cycle_at = clock.now + 10.0  # as if the cycle took 3.3 s

    controller.triggers.add("fit", clock.now)
    clock.now += 1.0
    controller.housekeeping(clock.now)
    after_fit = controller.epoch
    controller.receive(TOPICS.budget, budget_payload({"compute": 2.0}), clock.now)
    controller.housekeeping(clock.now)

    assert first > 0
    assert after_fit == first
    assert controller.epoch > first
    assert not controller.triggers.reasons  # the budget's cycle took the fit along


def test_acknowledging_an_older_epoch_keeps_a_shrinking_agent_blocking(
    controller, clock
):
    """Growth waits for an agent until it acknowledges its latest shrink."""
    controller.receive(TOPICS.budget, budget_payload(BUDGET), clock.now)
    for agent in ("a1", "a2"):
        topic = TOPICS.for_agent(agent).telemetry
        controller.receive(topic, report(agent, 1, 0.5, clock), clock.now)
    controller.transition_complete = False
    controller.blocking = {"a1", "a2"}
    for epoch, compute in ((1, 3.0), (2, 2.0), (3, 1.0)):
        grant = Grant(epoch, {"compute": compute}, clock.now, clock.now + 60.0)
        controller.ledger.grant("a1", grant)
    topic = TOPICS.for_agent("a1").telemetry
    controller.triggers.take()

    controller.receive(topic, report("a1", 2, 0.5, clock, epoch=2), clock.now)
    after_older = (set(controller.blocking), "ack" in controller.triggers.reasons)
    controller.receive(topic, report("a1", 3, 0.5, clock, epoch=3), clock.now)

    assert after_older == ({"a1", "a2"}, True)  # pool was freed, a1 still shrinks
    assert controller.blocking == {"a2"}
    assert not controller.triggers.urgent  # a2 has not acknowledged yet


def test_sweep_stops_the_daemon_once_the_publisher_has_gone(controller, clock, broker):
    """A controller whose publisher process died refuses to go on granting."""
    url = f"mqtt://127.0.0.1:{broker.port}"
    broker.stop()
    controller.publisher = Publisher(BrokerOptions(url), "test-publisher", "lab")
    controller.publisher.process.join(10)  # it cannot connect, so it exits

    with pytest.raises(FairsynergyError, match="publisher process stopped"):
        controller.sweep(clock.now)
    controller.publisher.close()


def test_learner_states_are_saved_a_slice_per_step(controller, clock, monkeypatch):
    """A due save queues a slice of the changed learners per loop step, not all."""
    monkeypatch.setattr("controller.daemon.SAVE_SLICE", 3)
    join(controller, clock, 8)
    saved = []
    for _ in range(4):
        clock.now += 0.01
        controller.housekeeping(clock.now)
        controller.store.flush()
        saved.append(len(controller.store.learner_states()))

    assert saved == [3, 6, 8, 8]


def test_restart_republishes_the_record_before_rebuilding_learners(
    controller, clock, tmp_path
):
    """A restart's first epoch needs no learner; they are read and rebuilt after."""
    agents = join(controller, clock, 8)
    controller.cycle("join", clock.now)
    controller.save_learners()
    controller.store.close()
    restarted = unconnected(tmp_path / "state.db", clock)
    store = restarted.store
    restarted.restore()
    restarted.receive(TOPICS.budget, budget_payload(BUDGET), clock.now)  # retained
    restarted.triggers.add("fit", clock.now)
    with capture_logs() as logs:
        restarted.cycle(restarted.triggers.take() + ",restart", clock.now)
    learners_at_restart = len(restarted.learner)
    restarted.housekeeping(clock.now)
    store.close()

    cycles = [entry for entry in logs if entry["event"] == "allocation_cycle"]
    assert learners_at_restart == 0
    assert len(restarted.learner) == len(agents)
    assert [(c["trigger"], c["epoch"], c["solve_ms"]) for c in cycles] == [
        ("fit,restart", controller.epoch + 1, 0.0)
    ]
    assert cycles[0]["mean_accuracy"] is not None
    assert "restored" in restarted.triggers.reasons
    assert restarted.learner.held == 0


def test_restart_republishes_grants_not_acknowledged(controller, clock, tmp_path):
    """A grant the agent never acknowledged goes out again in the restart's epoch.

    The daemon may have died before its publisher sent it; an agent that
    acknowledged its grant keeps it until its renewal is due.
    """
    agents = join(controller, clock, 4)
    controller.cycle("join", clock.now)
    granted = controller.epoch
    clock.now += 1.0
    for agent in agents[:2]:
        topic = TOPICS.for_agent(agent).telemetry
        controller.receive(
            topic, report(agent, 2, 0.5, clock, epoch=granted), clock.now
        )
    controller.store.close()
    restarted = unconnected(tmp_path / "state.db", clock)
    restarted.restore()
    restarted.receive(TOPICS.budget, budget_payload(BUDGET), clock.now)  # retained

    restarted.cycle("restart", clock.now)
    latest = [restarted.ledger.latest(agent) for agent in agents]
    restarted.store.close()
    epochs = [grant.epoch if grant else None for grant in latest]

    assert granted < restarted.epoch
    assert epochs == [granted, granted, restarted.epoch, restarted.epoch]
