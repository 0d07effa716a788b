"""What the controller daemon sustains, end to end, against a real broker.

Run from the repository root::

    .venv/bin/python bench/bench_controller.py           # several minutes
    .venv/bin/python bench/bench_controller.py --quick   # under a minute

Everything runs on this machine, over loopback: a private Mosquitto (in a
temporary directory), the daemon as operators start it (``python -m
controller.cli controller``), load generators in processes of their own
(``bench/_loadgen.py``), and a probe in this process that subscribes to the
allocations. For each fleet size (1,000 and 10,000 agents; 1,000 with
``--quick``) it measures:

1. ingest: telemetry at a target of 5,000 messages/s for a fixed time, with
   rate limiting turned off. Lost is what was sent and neither taken in nor
   refused by the controller (its Prometheus counters); the broker's own
   count of dropped messages ($SYS) says where. The same load to a plain
   paho subscriber that only counts, before the controller starts, is the
   baseline;
2. budget change to every allocation published: the budget alternates
   between 80% and 100% of its size; agents acknowledge every new grant at
   once (a report with the new epoch), so growth that waits for shrinking
   agents can complete, and each also reports every 10 s as a device would.
   Latency is from the budget's publication to the arrival, at the probe,
   of the last allocation of the epoch the controller logs as completing
   the transition (and, separately, of the budget's first epoch). Measured
   with the default settings, then again with exploration off
   (``exploration_cap = 0``), whose targets move only with the budget;
3. restart: the controller is killed (SIGKILL) and started again on the same
   state file; time to its ``online`` status and to the first fleet summary
   of a new epoch. The baseline is an empty fleet (no agents stored), which
   publishes no summary: its time to ``online`` is the fixed cost;
4. memory: resident set size after registration, and per agent between the
   two fleet sizes.

The machine's load average is printed before and after: other jobs on a
shared machine take CPU from all of the processes above.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import pstats
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import schemas
from bench import _machine
from bench._loadgen import (
    MULTIPLEXED_QOS,
    GeneratorSpec,
    RawClient,
    counter_main,
    generator_main,
)
from bench._machine import first_field, load_average
from controller.localbroker import LocalBroker, find_mosquitto, free_port
from controller.operate import controller_command
from schemas import Kind, Topics

SEED = 20250903
REPO = Path(__file__).resolve().parent.parent
# Offered telemetry, split evenly over the generator processes.
RATE = 5000.0
PROCESSES = 2
CONNECTIONS = 2
# Budget per agent: every agent's equal share stays the same at every size.
BUDGET_PER_AGENT = {"compute": 1.0, "data": 0.5}
CHANGE_FACTORS = (0.8, 1.0)
# A change has settled when no allocation arrived for this long.
QUIET_S = 1.0
RESTART_TIMEOUT_S = 40.0
REGISTER_TIMEOUT_S = 300.0
# Agents without a grant report again this often while registering: the
# broker drops what the controller's queue cannot hold, as it would for
# real devices, which also report again.
REMIND_S = 15.0
DRAIN_TIMEOUT_S = 180.0
TARGET_LATENCY_S = 2.0
# How often the broker publishes its $SYS counters (see BROKER_CONFIG).
SYS_INTERVAL_S = 1.0

# The production broker's limits (deploy/mosquitto/mosquitto.conf) on a plain
# loopback listener, with the payload limit raised as that file advises for
# large fleets (the fleet summary grows with the fleet) to the controller's
# own summary limit. `log_dest none` because LocalBroker starts mosquitto
# with -v, which logs every PUBLISH: a cost no production broker pays.
BROKER_CONFIG = """\
user {user}
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {dir}/
autosave_interval 60
max_inflight_messages 100
max_queued_messages 1000
message_size_limit 16777216
log_dest none
sys_interval 1
"""

# Rate limiting must not apply: the benchmark offers more per agent than the
# default allows at 1,000 agents.
CONTROLLER_CONFIG = """\
rate_limit = 1000000.0
rate_burst = 1000000.0
metrics_port = {port}
metrics_host = "127.0.0.1"
"""


@dataclass(frozen=True)
class Plan:
    """How much of everything one run does."""

    sizes: tuple[int, ...]
    stream_s: float
    changes: int
    restarts: int
    change_timeout_s: float  # longest wait for one transition to complete
    quiet_timeout_s: float  # longest wait for allocations to stop between phases
    # After the load, the drain is over when the counters stood still this
    # long: more than one cycle, during which the loop takes nothing in.
    drain_still_s: float
    calm: bool  # also measure budget changes with exploration off
    empty_restarts: bool  # also restart a controller with no agents stored


QUICK = Plan(
    sizes=(1000,),
    stream_s=2.0,
    changes=2,
    restarts=1,
    change_timeout_s=6.0,
    quiet_timeout_s=3.0,
    drain_still_s=3.0,
    calm=False,
    empty_restarts=False,
)
FULL = Plan(
    sizes=(1000, 10_000),
    stream_s=20.0,
    changes=10,
    restarts=3,
    change_timeout_s=40.0,
    quiet_timeout_s=20.0,
    drain_still_s=20.0,
    calm=True,
    empty_restarts=True,
)


# -- the machine ----------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    memory = first_field("/proc/meminfo", "MemTotal")
    version = subprocess.run(
        [find_mosquitto(), "-h"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    return _machine.machine(
        ram=f"{int(memory.split()[0]) / 2**20:.1f} GiB",
        **{"paho-mqtt": importlib.metadata.version("paho-mqtt")},
        mosquitto=version,
        platform=platform.platform(),
    )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time so far of a process and its live children."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


# -- what the probe sees --------------------------------------------------


class Seen(NamedTuple):
    """One message at the probe: when it arrived, whose, which epoch."""

    at: float
    agent: str | None
    epoch: int | None


@dataclass
class Probe:
    """A subscriber in this process: allocations, summaries, controller status.

    It also publishes the budget, so that the time of publication is known
    to the same clock as the arrivals. It speaks MQTT through the generators'
    :class:`RawClient`, at QoS 0 (see ``MULTIPLEXED_QOS``): a paho client
    would spend about a second and a half of CPU on the 10,000 allocations of
    one change, and stamp the last ones late.
    """

    host: str
    port: int
    fleet: str
    allocations: list[Seen] = field(default_factory=list)
    summaries: list[Seen] = field(default_factory=list)
    statuses: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.topics = Topics(self.fleet)
        self.client = RawClient(self.host, self.port, f"probe-{self.fleet}")
        self.client.on_message = self._on_message
        for topic in (
            self.topics.any_agent(Kind.ALLOCATION),
            self.topics.allocations,
            self.topics.controller_status,
        ):
            self.client.subscribe(topic, qos=MULTIPLEXED_QOS)

    def _on_message(self, topic: str, payload: bytes, at: float) -> None:
        if not payload:
            return
        body = json.loads(payload)
        if topic == self.topics.controller_status:
            self.statuses.append((at, body["state"]))
        elif topic == self.topics.allocations:
            self.summaries.append(Seen(at, None, body["epoch"]))
        else:
            self.allocations.append(Seen(at, topic.split("/")[3], body["epoch"]))

    def publish_budget(self, amounts: dict[str, float]) -> float:
        """Publish the retained budget; return when it was sent."""
        payload = schemas.encode(Kind.BUDGET, schemas.budget(resources=amounts))
        sent = time.time()
        self.client.publish(self.topics.budget, payload, retain=True)
        self.client.wait_acked(10.0)
        return sent

    def quiet_since(self) -> float:
        """Arrival time of the latest allocation (0 if none)."""
        return self.allocations[-1].at if self.allocations else 0.0

    def close(self) -> None:
        self.client.close()


class BrokerDrops:
    """The broker's count of messages it dropped (``$SYS``, once a second)."""

    TOPIC = "$SYS/broker/publish/messages/dropped"

    def __init__(self, broker: LocalBroker) -> None:
        self.value = -1
        self.updates = 0
        self.client = RawClient(broker.host, broker.port, "bench-sys", self._on)
        self.client.subscribe(self.TOPIC)

    def _on(self, _topic: str, payload: bytes, _at: float) -> None:
        self.value = int(payload)
        self.updates += 1

    def read(self) -> int:
        """The count, once the broker has published it again (or after 3 s).

        Mosquitto publishes the count only when it changed, so a count that
        stands still is not republished: the wait is then the full 3 s.
        """
        seen = self.updates
        deadline = time.monotonic() + 3 * SYS_INTERVAL_S
        while self.updates == seen and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.value

    def close(self) -> None:
        self.client.close()


# -- the daemon -------------------------------------------------------------


@dataclass
class Daemon:
    """The controller as a child process, with its log, metrics and state file."""

    url: str
    fleet: str
    workdir: Path
    profile: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0
    logs: list[Path] = field(default_factory=list)
    # Log events parsed so far, and how far each log file was read.
    _events: list[dict[str, Any]] = field(default_factory=list)
    _read: dict[Path, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.db = self.workdir / "controller.db"
        self.config = self.workdir / "controller.toml"
        self.metrics_port = free_port()
        self.configure()

    def configure(self, **settings: float) -> None:
        """Write the settings file: the benchmark's, plus ``settings``."""
        text = CONTROLLER_CONFIG.format(port=self.metrics_port)
        text += "".join(f"{name} = {value!r}\n" for name, value in settings.items())
        self.config.write_text(text)

    def start(self) -> None:
        log = self.workdir / f"controller-{len(self.logs)}.log"
        self.logs.append(log)
        command = controller_command(self.url, self.fleet, self.db, self.config)
        if self.profile is not None:
            command[1:1] = ["-m", "cProfile", "-o", str(self.profile)]
        with log.open("wb") as handle:
            self.process = subprocess.Popen(
                command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.logs[-1].read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"controller exited ({self.process.returncode}):\n{tail}"
            )

    def metrics(self) -> dict[str, float]:
        """Counters summed over their labels, plus each labelled sample."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            match = re.match(r"^([a-z_]+)(\{[^}]*\})? ([-+0-9.eEinfa]+)$", line)
            if match is None:
                continue
            name, labels, value = match.group(1), match.group(2), float(match.group(3))
            values[name] = values.get(name, 0.0) + value
            if labels:
                values[name + labels] = value
        return values

    def wait_metrics(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError):
                self.metrics()
                return
            time.sleep(0.1)
        raise RuntimeError("the controller's metrics endpoint never answered")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every JSON log event of every run so far (``name`` only, if given).

        Each call reads only what the logs gained since the last one: the
        10,000-agent logs are large, and this process shares the CPU.
        """
        for log in self.logs:
            self._events.extend(self._new_events(log))
        return [e for e in self._events if name is None or e.get("event") == name]

    def _new_events(self, log: Path) -> Iterator[dict[str, Any]]:
        with log.open("rb") as handle:
            handle.seek(self._read.get(log, 0))
            text = handle.read()
        complete = text.rfind(b"\n") + 1
        self._read[log] = self._read.get(log, 0) + complete
        for line in text[:complete].decode(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                event["at"] = _log_time(event.get("timestamp"))
                yield event


def _log_time(stamp: str | None) -> float:
    return datetime.fromisoformat(stamp).timestamp() if stamp else 0.0


# -- the load generators ----------------------------------------------------


class Generators:
    """The generator processes of one fleet, commanded together."""

    def __init__(self, host: str, port: int, fleet: str, agents: int) -> None:
        context = multiprocessing.get_context("spawn")
        names = [f"agent-{n:05d}" for n in range(agents)]
        self.processes = []
        self.commands: list[Any] = []
        self.replies: list[Any] = []
        for k in range(PROCESSES):
            spec = GeneratorSpec(
                host=host,
                port=port,
                fleet=fleet,
                agents=tuple(names[k::PROCESSES]),
                connections=CONNECTIONS,
                seed=SEED + k,
                name=f"loadgen-{fleet}-{k}",
            )
            commands, replies = context.Queue(), context.Queue()
            process = context.Process(
                target=generator_main, args=(spec, commands, replies), daemon=True
            )
            process.start()
            self.processes.append(process)
            self.commands.append(commands)
            self.replies.append(replies)
        for replies in self.replies:
            replies.get(timeout=60)

    def all(self, name: str, timeout: float = 600.0, **arguments: Any) -> list[Any]:
        """Send one command to every generator; return their replies."""
        for commands in self.commands:
            commands.put((name, arguments))
        return [replies.get(timeout=timeout) for replies in self.replies]

    def granted(self) -> int:
        return sum(reply["granted"] for reply in self.all("status"))

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes if process.pid]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.all("stop", timeout=30)
        for process in self.processes:
            process.join(timeout=10)


def stream(generators: Generators, duration: float) -> dict[str, float]:
    """Offer RATE reports/s for ``duration`` s; sent count and achieved rate."""
    replies = generators.all("stream", rate=RATE / PROCESSES, duration=duration)
    sent = sum(reply["sent"] for reply in replies)
    seconds = max(reply["seconds"] for reply in replies)
    return {"sent": sent, "seconds": seconds, "rate": sent / seconds}


# -- measurements -------------------------------------------------------------


def baseline_ingest(
    broker: LocalBroker,
    drops: BrokerDrops,
    fleet: str,
    generators: Generators,
    plan: Plan,
) -> dict[str, float]:
    """The same load to a subscriber that only counts."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    count, last = context.RawValue("q", 0), context.RawValue("d", 0.0)
    topic = Topics(fleet).any_agent(Kind.TELEMETRY)
    process = context.Process(
        target=counter_main,
        args=(broker.host, broker.port, topic, ready, stop, count, last),
        daemon=True,
    )
    process.start()
    ready.wait(30)
    assert process.pid is not None

    dropped = drops.read()
    started, cpu = time.time(), cpu_seconds(process.pid)
    offered = stream(generators, plan.stream_s)
    _wait_still(lambda: float(count.value), offered["sent"], plan.drain_still_s)
    used = cpu_seconds(process.pid) - cpu
    received = int(count.value)
    stop.set()
    process.join(timeout=10)
    return {
        **offered,
        "received": received,
        "lost": offered["sent"] - received,
        "broker_dropped": drops.read() - dropped,
        "processed_rate": received / max(last.value - started, 1e-9),
        "cpu_ms_per_1000": 1e6 * used / max(received, 1),
    }


def _wait_still(read: Any, expected: float, still: float) -> float:
    """Wait until ``read()`` reaches ``expected`` or stops moving.

    Returns the wall-clock time of the last change seen.
    """
    value, moved, changed = read(), time.monotonic(), time.time()
    deadline = moved + DRAIN_TIMEOUT_S
    while value < expected and time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != value:
            value, moved, changed = now, time.monotonic(), time.time()
        elif time.monotonic() - moved > still:
            break
    return changed


def register(daemon: Daemon, generators: Generators, agents: int) -> float:
    """Announce every agent and wait until each holds a grant; return seconds."""
    started = time.monotonic()
    generators.all("register", rate=RATE / PROCESSES)
    deadline = started + REGISTER_TIMEOUT_S
    reminded = time.monotonic()
    while (granted := generators.granted()) < agents:
        daemon.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {granted} of {agents} agents got a grant")
        if time.monotonic() - reminded > REMIND_S:
            generators.all("remind", rate=RATE / PROCESSES)
            reminded = time.monotonic()
        time.sleep(0.5)
    return time.monotonic() - started


def _wait_quiet(probe: Probe, timeout: float, quiet: float = 2 * QUIET_S) -> None:
    """Wait until no allocation arrived for ``quiet`` s, or ``timeout`` passed.

    While exploring, the controller may go on reallocating: hence the timeout.
    """
    deadline = time.monotonic() + timeout
    while time.time() - probe.quiet_since() < quiet:
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)


TAKEN = 'fairsynergy_messages_received_total{kind="telemetry"}'
REFUSED = "fairsynergy_messages_rejected_total"


def controller_ingest(
    daemon: Daemon, drops: BrokerDrops, generators: Generators, plan: Plan
) -> dict[str, float]:
    """Offer the load to the controller; count what it took in and refused.

    Lost is what was sent and neither taken in nor refused.
    """
    before = daemon.metrics()
    dropped, cpu = drops.read(), cpu_seconds(daemon.pid)
    started = time.time()
    offered = stream(generators, plan.stream_s)

    def handled() -> float:
        now = daemon.metrics()
        return now.get(TAKEN, 0.0) + now.get(REFUSED, 0.0)

    base = before.get(TAKEN, 0.0) + before.get(REFUSED, 0.0)
    finished = _wait_still(
        lambda: handled() - base, offered["sent"], plan.drain_still_s
    )
    used = cpu_seconds(daemon.pid) - cpu
    after = daemon.metrics()
    taken = after.get(TAKEN, 0.0) - before.get(TAKEN, 0.0)
    refused = after.get(REFUSED, 0.0) - before.get(REFUSED, 0.0)
    return {
        **offered,
        "received": taken,
        "rejected": refused,
        "lost": offered["sent"] - taken - refused,
        "broker_dropped": drops.read() - dropped,
        "processed_rate": taken / max(finished - started, 1e-9),
        "lag_s": max(finished - started - offered["seconds"], 0.0),
        "cpu_ms_per_1000": 1e6 * used / max(taken, 1),
    }


@dataclass(frozen=True)
class Change:
    """One budget change: seconds from its publication to what followed.

    A change starts a *transition*: the epochs from the first one the budget
    triggered to the one the controller logs as complete (every agent at its
    target, within the hysteresis band); agents whose allocation did not move
    get no message. ``complete``: the last allocation of those epochs
    arrived at the probe (None if none completed within the plan's timeout).
    ``first_wave``: the last allocation of the first epoch arrived.
    """

    factor: float
    complete: float | None
    first_wave: float | None
    agents: int  # agents that received an allocation in the transition
    epochs: int  # epochs of the transition (so far, if it did not complete)
    failed: int  # cycles that failed meanwhile


def budget_changes(
    daemon: Daemon, probe: Probe, agents: int, plan: Plan
) -> list[Change]:
    """Alternate the budget down and up, waiting for each change to settle."""
    changes = []
    for k in range(plan.changes):
        factor = CHANGE_FACTORS[k % len(CHANGE_FACTORS)]
        amounts = {r: agents * v * factor for r, v in BUDGET_PER_AGENT.items()}
        mark = len(probe.allocations)
        sent = probe.publish_budget(amounts)
        changes.append(
            _settle(daemon, probe, factor, sent, mark, plan.change_timeout_s)
        )
    return changes


def _settle(
    daemon: Daemon,
    probe: Probe,
    factor: float,
    sent: float,
    mark: int,
    timeout: float,
) -> Change:
    """Wait for the transition to complete (or time out), then measure it."""
    deadline = time.time() + timeout
    change = Change(factor, None, None, 0, 0, 0)
    while time.time() < deadline:
        time.sleep(0.1)
        daemon.check_alive()
        change = _measure(daemon, probe, factor, sent, mark)
        if (
            change.complete is not None
            and time.time() > sent + change.complete + QUIET_S
        ):
            break
    return change


def _measure(
    daemon: Daemon, probe: Probe, factor: float, sent: float, mark: int
) -> Change:
    chain = _transition(daemon.events("allocation_cycle"), sent)
    failed = len([e for e in daemon.events("cycle_failed") if e["at"] >= sent])
    if not chain:
        return Change(factor, None, None, 0, 0, failed)

    low, high = chain[0]["epoch"], chain[-1]["epoch"]
    seen = [s for s in probe.allocations[mark:] if low <= (s.epoch or 0) <= high]
    wave = [s.at for s in seen if s.epoch == low]
    done = bool(seen) and chain[-1]["complete"]
    return Change(
        factor,
        complete=max(s.at for s in seen) - sent if done else None,
        first_wave=max(wave) - sent if wave else None,
        agents=len({s.agent for s in seen}),
        epochs=len(chain),
        failed=failed,
    )


def _transition(cycles: list[dict[str, Any]], sent: float) -> list[dict[str, Any]]:
    """The cycles from the budget's first one to the one that completed it."""
    after = sorted((c for c in cycles if c["at"] >= sent), key=lambda c: c["epoch"])
    start = next((i for i, c in enumerate(after) if "budget" in c["trigger"]), None)
    if start is None:
        return []
    chain = []
    for cycle in after[start:]:
        chain.append(cycle)
        if cycle["complete"]:
            break
    return chain


@dataclass(frozen=True)
class Restart:
    """Seconds from starting the killed controller again to what it published."""

    online: float | None
    summary: float | None
    allocation: float | None
    cycle: float | None  # its first allocation_cycle (or cycle_failed) log line


def restart(daemon: Daemon, probe: Probe, expect_summary: bool) -> Restart:
    """SIGKILL the controller, start it on the same state file, time it."""
    last = max((e["epoch"] for e in daemon.events("allocation_cycle")), default=0)
    daemon.kill()
    marks = len(probe.allocations), len(probe.summaries), len(probe.statuses)
    started = time.time()
    daemon.start()

    deadline = started + RESTART_TIMEOUT_S
    result = Restart(None, None, None, None)
    while time.time() < deadline:
        time.sleep(0.05)
        daemon.check_alive()
        result = _restart_times(daemon, probe, started, last, marks)
        if result.online is not None and (
            result.summary is not None or not expect_summary
        ):
            break
    return result


def _restart_times(
    daemon: Daemon,
    probe: Probe,
    started: float,
    last: int,
    marks: tuple[int, int, int],
) -> Restart:
    def first(times: Iterator[float]) -> float | None:
        return min(times, default=None)

    online = first(t - started for t, s in probe.statuses[marks[2] :] if s == "online")
    summary = first(
        s.at - started for s in probe.summaries[marks[1] :] if (s.epoch or 0) > last
    )
    allocation = first(
        s.at - started for s in probe.allocations[marks[0] :] if (s.epoch or 0) > last
    )
    cycles = [
        e["at"] - started
        for e in daemon.events()
        if e.get("event") in ("allocation_cycle", "cycle_failed") and e["at"] >= started
    ]
    return Restart(online, summary, allocation, min(cycles, default=None))


# -- one fleet ----------------------------------------------------------------


def budget_for(agents: int) -> dict[str, float]:
    return {r: agents * v for r, v in BUDGET_PER_AGENT.items()}


def run_fleet(
    broker: LocalBroker,
    drops: BrokerDrops,
    workdir: Path,
    agents: int,
    plan: Plan,
    profile: Path | None,
) -> dict[str, Any]:
    """Every measurement for one fleet size, on a fleet of its own."""
    fleet = f"bench{agents}"
    result: dict[str, Any] = {"agents": agents}
    generators = Generators(broker.host, broker.port, fleet, agents)
    probe = Probe(broker.host, broker.port, fleet)
    daemon = Daemon(broker.url, fleet, workdir, profile=profile)
    try:
        say(f"{agents} agents: baseline subscriber")
        result["baseline"] = baseline_ingest(broker, drops, fleet, generators, plan)

        probe.publish_budget(budget_for(agents))
        daemon.start()
        daemon.wait_metrics()
        say(f"{agents} agents: registering")
        result["register_s"] = register(daemon, generators, agents)
        _wait_quiet(probe, plan.quiet_timeout_s)
        result["rss_registered_mib"] = rss_mib(daemon.pid)

        say(f"{agents} agents: ingest")
        mark, started = len(probe.allocations), time.time()
        result["ingest"] = controller_ingest(daemon, drops, generators, plan)
        result["churn"] = churn(probe.allocations[mark:], agents, started)
        result["rss_streamed_mib"] = rss_mib(daemon.pid)
        # From now on agents answer every new grant and report every 10 s,
        # so no grant of the cycles after the stream goes unacknowledged.
        generators.all("ack_mode", on=True, rate=RATE / PROCESSES)
        _wait_quiet(probe, plan.quiet_timeout_s)

        say(f"{agents} agents: budget changes")
        result["changes"] = budget_changes(daemon, probe, agents, plan)

        result["restarts"], result["changes_calm"] = [], []
        if profile is None:
            say(f"{agents} agents: restarts")
            result["restarts"] = [
                restart(daemon, probe, expect_summary=True)
                for _ in range(plan.restarts)
            ]
        if profile is None and plan.calm:
            say(f"{agents} agents: budget changes, exploration off")
            result["changes_calm"] = calm_changes(daemon, probe, agents, plan)
    except (RuntimeError, TimeoutError, OSError, queue.Empty) as error:
        # Keep what was measured: the report says where this size stopped.
        result["error"] = f"{type(error).__name__}: {error}"
        say(f"{agents} agents: stopped: {result['error']}")
    finally:
        result["cycles"] = cycle_times(daemon, agents)
        result["warnings"] = warnings(daemon)
        daemon.stop()
        generators.stop()
        probe.close()
    return result


def churn(seen: list[Seen], agents: int, started: float) -> dict[str, float]:
    """How often allocations changed while agents only reported (no budget change).

    Per agent and minute, over the ingest phase: the allocation messages
    that reached the probe, and the epochs they belonged to. Every one of
    them came from a reallocation for moved fits, a joining agent or an
    acknowledgement, so this is what learning alone costs in messages.
    """
    minutes = max((time.time() - started) / 60.0, 1e-9)
    epochs = {s.epoch for s in seen}
    return {
        "allocations_per_agent_min": len(seen) / agents / minutes,
        "epochs_per_min": len(epochs) / minutes,
    }


def calm_changes(daemon: Daemon, probe: Probe, agents: int, plan: Plan) -> list[Change]:
    """Budget changes again, with exploration off (``exploration_cap = 0``).

    Each cycle draws a new Thompson sample, so while the learners are unsure
    the targets move every epoch and a transition may never complete; without
    exploration the target moves only with the budget and the fits.
    """
    daemon.stop()
    daemon.configure(exploration_cap=0.0)
    daemon.start()
    daemon.wait_metrics()
    _wait_quiet(probe, plan.quiet_timeout_s)
    return budget_changes(daemon, probe, agents, plan)


def empty_restarts(broker: LocalBroker, workdir: Path, count: int) -> list[Restart]:
    """The restart baseline: a fleet with a budget and no agents stored."""
    fleet = "benchempty"
    workdir.mkdir()
    probe = Probe(broker.host, broker.port, fleet)
    daemon = Daemon(broker.url, fleet, workdir)
    try:
        probe.publish_budget(budget_for(1))
        daemon.start()
        daemon.wait_metrics()
        time.sleep(1.0)
        return [restart(daemon, probe, expect_summary=False) for _ in range(count)]
    finally:
        daemon.stop()
        probe.close()


def cycle_times(daemon: Daemon, agents: int) -> dict[str, float]:
    """Solve and cycle times (ms) the controller logged for the whole fleet."""
    events = [e for e in daemon.events("allocation_cycle") if e["agents"] == agents]
    if not events:
        return {}
    solve = [e["solve_ms"] for e in events]
    cycle = [e["cycle_ms"] for e in events]
    return {
        "count": len(events),
        "solve_p50": statistics.median(solve),
        "solve_max": max(solve),
        "cycle_p50": statistics.median(cycle),
        "cycle_max": max(cycle),
    }


def warnings(daemon: Daemon) -> dict[str, int]:
    """Warning and error events by name (what went wrong, if anything)."""
    counts: dict[str, int] = {}
    for event in daemon.events():
        if event.get("level") in ("warning", "error", "critical"):
            counts[event["event"]] = counts.get(event["event"], 0) + 1
    return counts


# -- the report ---------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "none"
    return f"{value:,.{digits}f}"


def latency_cell(changes: list[Change], name: str, factor: float | None = None) -> str:
    """p50 / p99 / max of one latency of the changes (those with ``factor``)."""
    chosen = [c for c in changes if factor is None or c.factor == factor]
    done = [getattr(c, name) for c in chosen if getattr(c, name) is not None]
    missed = len(chosen) - len(done)
    if not done:
        return f"none of {len(chosen)}"
    cell = f"{percentile(done, 50):.2f} / {percentile(done, 99):.2f} / {max(done):.2f}"
    return cell + (f" ({missed} of {len(chosen)} never)" if missed else "")


def restart_cell(restarts: list[Restart], name: str) -> str:
    values = [getattr(r, name) for r in restarts]
    done = [v for v in values if v is not None]
    if not done:
        return "none" if values else "-"
    cell = f"{statistics.median(done):.2f} (max {max(done):.2f})"
    return cell + (
        f", {len(values) - len(done)} never" if len(done) < len(values) else ""
    )


def _ingest_cells(r: dict[str, Any]) -> dict[str, str]:
    base, ingest = r["baseline"], r["ingest"]
    return {
        "baseline subscriber: offered msg/s (sent)": (
            f"{fmt(base['rate'], 0)} ({base['sent']:,.0f})"
        ),
        "baseline: taken in msg/s; lost (dropped by the broker)": (
            f"{fmt(base['processed_rate'], 0)}; {base['lost']:,.0f} "
            f"({base['broker_dropped']:,.0f})"
        ),
        "controller: offered msg/s (sent)": (
            f"{fmt(ingest['rate'], 0)} ({ingest['sent']:,.0f})"
        ),
        "controller: taken in msg/s; lost (dropped by the broker); rejected": (
            f"{fmt(ingest['processed_rate'], 0)}; {ingest['lost']:,.0f} "
            f"({ingest['broker_dropped']:,.0f}); {ingest['rejected']:,.0f}"
        ),
        "controller: backlog left when the load stopped (s)": fmt(ingest["lag_s"]),
        "controller / baseline, messages taken in per s": fmt(
            ingest["processed_rate"] / base["processed_rate"]
        ),
        "CPU ms per 1,000 messages: controller / baseline": (
            f"{fmt(ingest['cpu_ms_per_1000'], 0)} / {fmt(base['cpu_ms_per_1000'], 0)}"
        ),
        **_churn_cells(r),
    }


def _churn_cells(r: dict[str, Any]) -> dict[str, str]:
    churn = r.get("churn")
    if churn is None:
        return {}
    return {
        "while reporting: allocations per agent per minute (epochs per minute)": (
            f"{fmt(churn['allocations_per_agent_min'], 1)} "
            f"({fmt(churn['epochs_per_min'], 1)})"
        ),
    }


def _change_cells(r: dict[str, Any]) -> dict[str, str]:
    cells: dict[str, str] = {}
    for key, series in (("changes", "exploring"), ("changes_calm", "no exploring")):
        changes: list[Change] = r[key]
        if not changes:
            continue
        cells |= {
            f"budget change ({series}) -> transition complete, p50 / p99 / max (s)": (
                latency_cell(changes, "complete")
            ),
            f"  {series}: decreases": latency_cell(changes, "complete", 0.8),
            f"  {series}: increases": latency_cell(changes, "complete", 1.0),
            f"  {series}: first epoch all arrived": latency_cell(changes, "first_wave"),
            f"  {series}: agents allocated (min), epochs (max) per transition": (
                f"{min((c.agents for c in changes), default=0):,}, "
                f"{max((c.epochs for c in changes), default=0)}"
            ),
        }
    cycles = r["cycles"]
    return cells | {
        "solve ms, median (max), from the log": (
            f"{fmt(cycles.get('solve_p50'), 0)} ({fmt(cycles.get('solve_max'), 0)})"
        ),
        "cycle ms, median (max), from the log": (
            f"{fmt(cycles.get('cycle_p50'), 0)} ({fmt(cycles.get('cycle_max'), 0)})"
        ),
    }


def _restart_cells(r: dict[str, Any]) -> dict[str, str]:
    restarts: list[Restart] = r["restarts"]
    return {
        "restart -> controller online (s), median (max)": restart_cell(
            restarts, "online"
        ),
        "restart -> fleet summary of a new epoch (s)": restart_cell(
            restarts, "summary"
        ),
        "restart -> allocation of a new epoch (s)": restart_cell(
            restarts, "allocation"
        ),
        "restart -> first cycle logged (s)": restart_cell(restarts, "cycle"),
        "registration: every agent granted (s)": fmt(r["register_s"]),
        "RSS after registration / after ingest (MiB)": (
            f"{fmt(r['rss_registered_mib'], 1)} / {fmt(r['rss_streamed_mib'], 1)}"
        ),
    }


def _cells(group: Any, result: dict[str, Any]) -> dict[str, str]:
    """One group of a column; empty if that part was not measured."""
    try:
        cells: dict[str, str] = group(result)
    except KeyError:
        return {}
    return cells


def table(results: list[dict[str, Any]], empty: list[Restart]) -> str:
    """The Markdown table of every measurement, one column per fleet size."""
    columns = [_ingest_cells(r) | _change_cells(r) | _restart_cells(r) for r in results]
    head = ["measurement"] + [f"{r['agents']:,} agents" for r in results]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in columns[0]:
        cells = [name] + [column[name] for column in columns]
        lines.append("| " + " | ".join(cells) + " |")

    if empty:
        online = restart_cell(empty, "online")
        lines += ["", f"restart of an empty fleet -> controller online (s): {online}"]
    measured = [r for r in results if "rss_registered_mib" in r]
    if len(measured) >= 2:
        small, large = measured[0], measured[-1]
        grown = large["rss_registered_mib"] - small["rss_registered_mib"]
        per_agent = grown * 1024 / (large["agents"] - small["agents"])
        lines.append(f"memory per agent (RSS after registration): {per_agent:.1f} KiB")
    return "\n".join(lines)


def verdicts(results: list[dict[str, Any]]) -> list[str]:
    """The brief's targets, met or missed, for each fleet size measured."""
    lines = []
    for r in results:
        size = f"{r['agents']:,} agents"
        if "ingest" in r:
            lost = r["ingest"]["lost"] + r["ingest"]["rejected"]
            sent = r["ingest"]["sent"]
            verdict = "met" if lost == 0 else f"missed ({lost:,.0f} of {sent:,.0f})"
            lines.append(f"{size}: 5,000 msg/s with nothing lost: {verdict}")
        for key in ("changes", "changes_calm"):
            done = [c.complete for c in r.get(key, []) if c.complete is not None]
            if r.get(key):
                worst = percentile(done, 99) if done else None
                all_done = len(done) == len(r[key])
                ok = worst is not None and all_done and worst < TARGET_LATENCY_S
                shown = (
                    "no transition completed" if worst is None else f"p99 {worst:.2f} s"
                )
                lines.append(
                    f"{size}: budget change p99 < {TARGET_LATENCY_S:g} s ({key}): "
                    f"{'met' if ok else 'missed'} ({shown}, "
                    f"{len(done)} of {len(r[key])} complete)"
                )
        summaries = [x.summary for x in r.get("restarts", []) if x.summary is not None]
        if r.get("restarts"):
            worst = max(summaries) if summaries else None
            ok = worst is not None and worst < TARGET_LATENCY_S
            shown = "no summary" if worst is None else f"max {worst:.2f} s"
            lines.append(
                f"{size}: restart -> summary < {TARGET_LATENCY_S:g} s: "
                f"{'met' if ok else 'missed'} ({shown})"
            )
    return lines


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1,000 agents, short")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--profile",
        type=Path,
        help="run the controller under cProfile (no restarts), write the stats here",
    )
    parser.add_argument(
        "--agents", type=int, nargs="+", help="fleet sizes instead of the plan's"
    )
    parser.add_argument(
        "--keep", type=Path, help="work here and keep the logs and state files"
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.agents:
        plan = replace(plan, sizes=tuple(args.agents))

    info = machine() | {"load average before": load_average()}
    results = []
    with _workdir(args.keep) as work:
        (work / "broker").mkdir()
        broker = LocalBroker(find_mosquitto(), work / "broker", BROKER_CONFIG, 1)
        broker.start()
        drops = BrokerDrops(broker)
        try:
            for agents in plan.sizes:
                where = work / str(agents)
                where.mkdir()
                results.append(
                    run_fleet(broker, drops, where, agents, plan, args.profile)
                )
            empty = []
            if plan.empty_restarts and not args.profile:
                empty = empty_restarts(broker, work / "empty", plan.restarts)
        finally:
            drops.close()
            broker.stop()
    info["load average after"] = load_average()

    for key, value in info.items():
        print(f"{key:<20} {value}")
    print()
    print(table(results, empty))
    print()
    print("\n".join(verdicts(results)))
    for result in results:
        print(f"\n{result['agents']:,} agents: warnings {result['warnings'] or 'none'}")
        if "error" in result:
            print(f"{result['agents']:,} agents: stopped early: {result['error']}")
    if args.json:
        raw = {"machine": info, "results": results, "empty_restarts": empty}
        args.json.write_text(json.dumps(raw, indent=1, default=_plain))
    if args.profile:
        pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(30)


@contextlib.contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=False)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="bench-controller-") as tmp:
        yield Path(tmp)


def _plain(value: Any) -> Any:
    return value._asdict() if hasattr(value, "_asdict") else value.__dict__


if __name__ == "__main__":
    main()
