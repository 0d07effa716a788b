"""``fairsynergy demo``: the whole product on one machine, in about a minute.

It starts a private Mosquitto, the controller daemon (a real process, as in
production), and a simulated fleet whose devices speak MQTT through the edge
client. Each device hides a true accuracy curve (:mod:`controller.simulate`)
and reports noisy measurements at the allocation it holds; the controller
only sees the reports. Along the way the operator raises the budget, one
device leaves and a new one joins. The live view compares what the
controller learned and allocated with the oracle that knows the true curves,
and an independent auditor checks that the pool is never over-committed.
"""

from __future__ import annotations

import argparse
import math
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

import schemas
from controller.allocate import allocate
from controller.audit import PoolAudit
from controller.broker import BrokerOptions, connect, make_client, publish
from controller.errors import FairsynergyError
from controller.localbroker import LocalBroker, find_mosquitto
from controller.operate import controller_command, fitted_parameters
from controller.simulate import SimulatedFleet
from controller.store import Store
from edge_client import EdgeClient
from schemas import Kind, Topics

FLEET = "demo"
RESOURCES = ("compute", "data")
# Settings that make a minute of demo show a minute of production: agents
# report several times a second, the controller reacts within a second, and
# grants are short leases so a departed device's share comes back quickly.
CONTROLLER_SETTINGS = """\
alpha = 1.0
reallocation_interval = 2.0
debounce = 0.3
hysteresis = 0.02
fit_change = 0.01
exploration_cap = 0.02
grant_lease = 6.0
ack_timeout = 2.0
offline_grace = 3.0
rate_limit = 50.0
rate_burst = 100.0
metrics_port = 0
"""
REPORT_PERIOD_S = 0.25
# Accuracy shown per agent is the mean of its last reports, to read calmly.
ACCURACY_WINDOW = 8


@dataclass
class Device:
    """One simulated device: its edge client and what it measured lately."""

    agent: str
    client: EdgeClient
    accuracy: deque[float] = field(
        default_factory=lambda: deque(maxlen=ACCURACY_WINDOW)
    )

    def cloud(self, now: float) -> dict[str, float]:
        """The cloud it may use now: its grant, unless that has expired."""
        held = self.client.allocation
        if held is None or held.expired(now):
            return dict.fromkeys(RESOURCES, 0.0)
        return {r: held.amount(r) for r in RESOURCES}


@dataclass
class Scene:
    """What the live view shows."""

    started: float
    duration: float
    events: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    fits: dict[str, Any] = field(default_factory=dict)


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns 0 when the pool was never over-committed."""
    find_mosquitto()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="fairsynergy-demo-") as scratch:
        workdir = Path(scratch)
        with running_broker(workdir / "broker") as broker:
            return Demo(args, broker, workdir, console).run()


@contextmanager
def running_broker(directory: Path) -> Iterator[LocalBroker]:
    directory.mkdir()
    broker = LocalBroker(find_mosquitto(), directory)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


class Demo:
    def __init__(
        self,
        args: argparse.Namespace,
        broker: LocalBroker,
        workdir: Path,
        console: Console,
    ) -> None:
        self.args = args
        self.broker = broker
        self.workdir = workdir
        self.console = console
        self.options = BrokerOptions(broker.url)
        self.rng = np.random.default_rng(args.seed)
        self.fleet = SimulatedFleet(
            args.agents, RESOURCES, noise=args.noise, budget=0.5, seed=args.seed
        )
        self.budget = dict(zip(RESOURCES, self.fleet.budget.tolist(), strict=True))
        self.devices: dict[str, Device] = {}
        self.audit = PoolAudit(FLEET)
        self.scene = Scene(started=time.time(), duration=args.duration)
        self.lock = threading.Lock()
        # (elapsed, mean, oracle mean, worst, oracle worst) per report round
        self.history: list[tuple[float, float, float, float, float]] = []
        self.last_status = -math.inf

    def run(self) -> int:
        controller = self.start_controller()
        observer = self.start_observer()
        try:
            self.publish_budget()
            for agent in self.fleet.agents:
                self.add_device(agent)
            self.play()
        finally:
            for device in self.devices.values():
                device.client.close()
            controller.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                controller.wait(timeout=10)
            observer.disconnect()
            observer.loop_stop()
        self.console.print(self.final_report())
        return 0 if not self.audit.violations else 1

    # -- the actors ----------------------------------------------------------

    def start_controller(self) -> subprocess.Popen[bytes]:
        config = self.workdir / "controller.toml"
        config.write_text(CONTROLLER_SETTINGS)
        self.db = self.workdir / "controller.db"
        log = (self.workdir / "controller.log").open("wb")
        command = controller_command(self.broker.url, FLEET, self.db, config)
        process = subprocess.Popen(command, stdout=log, stderr=log)
        self.wait_for_controller(process)
        return process

    def wait_for_controller(self, process: subprocess.Popen[bytes]) -> None:
        online = threading.Event()
        client = make_client(self.options, client_id="")
        client.on_message = lambda _c, _u, m: (
            online.set() if b'"online"' in m.payload else None
        )
        connect(client)
        client.subscribe(Topics(FLEET).controller_status, qos=1)
        deadline = time.monotonic() + 20
        while not online.wait(0.2):
            if process.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "controller.log").read_text()[-2000:]
                raise FairsynergyError(f"the controller did not start:\n{log}")
        client.disconnect()
        client.loop_stop()

    def start_observer(self) -> paho.Client:
        """The auditor, subscribed to everything the fleet says."""
        client = make_client(self.options, client_id="fairsynergy-demo-audit")

        def observe(_c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
            with self.lock:
                self.audit.observe(message.topic, bytes(message.payload))

        client.on_message = observe
        connect(client)
        client.subscribe(f"{Topics(FLEET).prefix}/#", qos=1)
        return client

    def publish_budget(self) -> None:
        client = make_client(self.options, client_id="")
        connect(client)
        message = schemas.budget(resources=self.budget, alpha=self.args.alpha)
        publish(
            client,
            Topics(FLEET).budget,
            schemas.encode(Kind.BUDGET, message),
            retain=True,
            wait=5.0,
        )
        client.disconnect()
        client.loop_stop()

    def add_device(self, agent: str) -> None:
        model = self.fleet[agent].model
        client = EdgeClient(self.broker.url, FLEET, agent, model=model)
        client.connect()
        self.devices[agent] = Device(agent, client)

    # -- the script ----------------------------------------------------------

    def play(self) -> None:
        if not self.console.is_terminal:
            self.console.print(
                f"demo: {len(self.devices)} agents on {self.broker.url}, "
                f"{self.args.duration:.0f} s; a status line every 5 s"
            )
            self.loop(self.print_status)
            return
        with Live(self.view(), console=self.console, refresh_per_second=4) as live:
            self.loop(lambda: live.update(self.view()))

    def loop(self, show: Callable[[], None]) -> None:
        """Play the script, one report round per period, showing each round."""
        duration = self.args.duration
        script = [
            (0.35 * duration, self.raise_budget),
            (0.55 * duration, self.drop_device),
            (0.70 * duration, self.join_device),
        ]
        last_fits = 0.0
        while (elapsed := time.time() - self.scene.started) < duration:
            while script and elapsed >= script[0][0]:
                script.pop(0)[1]()
            self.report_round()
            if elapsed - last_fits >= 1.0:
                self.read_fits()
                last_fits = elapsed
            self.history.append((elapsed, *self.scores()))
            show()
            time.sleep(REPORT_PERIOD_S)

    def print_status(self) -> None:
        elapsed, mean, oracle_mean, worst, oracle_worst = self.history[-1]
        if elapsed - self.last_status >= 5.0:
            self.last_status = elapsed
            self.console.print(
                f"t={elapsed:4.0f}s epoch {self.epoch():>4}  mean accuracy "
                f"{mean:.3f} (oracle {oracle_mean:.3f})  worst {worst:.3f} "
                f"(oracle {oracle_worst:.3f})  pool use {self.audit.peak_share:.0%} "
                f"peak, {len(self.audit.violations)} over-commits"
            )

    def raise_budget(self) -> None:
        self.budget = {r: 1.5 * v for r, v in self.budget.items()}
        self.fleet.budget = np.array([self.budget[r] for r in RESOURCES])
        self.publish_budget()
        self.scene.events.append(f"{self.clock()} operator raised the budget by 50%")

    def drop_device(self) -> None:
        agent = self.fleet.agents[0]
        self.devices.pop(agent).client.close()
        self.fleet.leave(agent)
        self.scene.events.append(f"{self.clock()} {agent} left the fleet")

    def join_device(self) -> None:
        agent = self.fleet.join()
        self.add_device(agent)
        self.scene.events.append(
            f"{self.clock()} {agent} joined ({self.fleet[agent].model}, cold start)"
        )

    def clock(self) -> str:
        return f"t={time.time() - self.scene.started:4.1f}s"

    def report_round(self) -> None:
        now = time.time()
        for agent, device in self.devices.items():
            cloud = device.cloud(now)
            vector = np.array([cloud[r] for r in RESOURCES])
            accuracy = self.fleet.measure(agent, vector, self.rng)
            device.accuracy.append(accuracy)
            truth = self.fleet[agent]
            device.client.report(
                accuracy=accuracy,
                local=dict(zip(RESOURCES, truth.local.tolist(), strict=True)),
                cloud=cloud,
                model=truth.model,
            )

    # -- what it shows -------------------------------------------------------

    def true_accuracy(self) -> dict[str, float]:
        """Each agent's noise-free accuracy at the grant it holds now."""
        now = time.time()
        return {
            agent: self.fleet[agent].utility(
                np.array([device.cloud(now)[r] for r in RESOURCES])
            )
            for agent, device in self.devices.items()
        }

    def oracle(self) -> dict[str, float]:
        """Each agent's accuracy under the allocation computed from the truth."""
        agents = tuple(self.devices)
        best = allocate(self.fleet.true_problem(self.args.alpha, agents))
        return dict(zip(agents, best.utility.tolist(), strict=True))

    def scores(self) -> tuple[float, float, float, float]:
        actual = list(self.true_accuracy().values())
        oracle = list(self.oracle().values())
        return (
            float(np.mean(actual)),
            float(np.mean(oracle)),
            float(np.min(actual)),
            float(np.min(oracle)),
        )

    def epoch(self) -> int:
        held = [d.client.allocation for d in self.devices.values()]
        return max((a.epoch for a in held if a is not None), default=0)

    def read_fits(self) -> None:
        with suppress(FairsynergyError), Store(self.db, read_only=True) as store:
            states = store.learner_states()
        self.scene.fits = {a: fitted_parameters(s) for a, s in states.items()}

    def view(self) -> Group:
        table = Table(
            title=self.headline(),
            box=box.SIMPLE_HEAD,
            padding=0,
            collapse_padding=True,
            show_edge=False,
        )
        table.add_column("agent", no_wrap=True, min_width=11)
        table.add_column("model", no_wrap=True)
        table.add_column("cloud\ncompute data", justify="right", no_wrap=True)
        table.add_column("accuracy\nnow oracle", justify="right", no_wrap=True)
        table.add_column("elasticity\nfitted", justify="right", no_wrap=True)
        table.add_column("elasticity\ntrue", justify="right", no_wrap=True)
        actual, oracle = self.true_accuracy(), self.oracle()
        now = time.time()
        for agent, device in self.devices.items():
            cloud = device.cloud(now)
            truth = self.fleet[agent]
            fit = (self.scene.fits.get(agent) or {}).get("elasticity", {})
            table.add_row(
                agent,
                truth.model,
                " ".join(f"{cloud[r]:.3f}" for r in RESOURCES),
                f"{actual[agent]:.3f} {oracle[agent]:.3f}",
                " ".join(f"{fit.get(r, math.nan):.3f}" for r in RESOURCES),
                " ".join(f"{value:.3f}" for value in truth.elasticity),
            )
        return Group(table, *self.scene.events[-4:])

    def headline(self) -> str:
        if not self.history:
            return "fairsynergy demo: starting"
        elapsed, mean, oracle_mean, worst, oracle_worst = self.history[-1]
        budget = ", ".join(f"{r} {v:.2f}" for r, v in self.budget.items())
        return (
            f"t={elapsed:.0f}/{self.args.duration:.0f}s  epoch {self.epoch()}  "
            f"budget {budget}\nmean accuracy {mean:.3f} (oracle {oracle_mean:.3f})  "
            f"worst {worst:.3f} (oracle {oracle_worst:.3f})  over-commits "
            f"{len(self.audit.violations)}"
        )

    def final_report(self) -> Table:
        """The summary: learning against the oracle, and the auditor's verdict."""
        tail = [row for row in self.history if row[0] >= 0.8 * self.args.duration]
        tail = tail or self.history[-1:]
        mean = np.mean([row[1:] for row in tail], axis=0)
        errors = [
            abs(fit["elasticity"][r] - self.fleet[agent].elasticity[i])
            for agent, fit in self.scene.fits.items()
            if fit and agent in self.devices
            for i, r in enumerate(RESOURCES)
        ]
        table = Table(title="fairsynergy demo: summary (last 20% of the run)")
        table.add_column("measure")
        table.add_column("value", justify="right")
        rows = [
            ("mean accuracy (true curves)", f"{mean[0]:.4f}"),
            ("mean accuracy, oracle", f"{mean[1]:.4f}"),
            ("worst agent", f"{mean[2]:.4f}"),
            ("worst agent, oracle", f"{mean[3]:.4f}"),
            (
                "elasticity error (mean abs)",
                f"{np.mean(errors):.4f}" if errors else "-",
            ),
            ("epochs published", str(self.epoch())),
            ("pool checks by the auditor", str(self.audit.checks)),
            ("peak share of a budget held", f"{self.audit.peak_share:.1%}"),
            ("over-commits seen", str(len(self.audit.violations))),
        ]
        for name, value in rows:
            table.add_row(name, value)
        return table
