"""How fast the controller's state file takes telemetry and restores a fleet.

Run from the repository root::

    .venv/bin/python bench/bench_store.py            # about a minute
    .venv/bin/python bench/bench_store.py --agents 1000 --rows 50000   # quick

It measures, in a temporary directory on the local disk:

1. ingest: telemetry messages per second committed by the batched writer, sent
   from two threads: telemetry alone, then with a learner state saved per
   message as a daemon that learns from every message would (with retention
   idle, then with every agent at the default limit so new rows prune old ones);
2. paced ingest: a steady 5,000 messages/s for a few seconds, with the default
   queue bound: rows dropped and the deepest queue seen;
3. restart: opening the file and reading every agent, learner state and the
   last allocation of a large fleet;
4. allocation latency: record_allocation with durable=True (fsync) and False;
5. size: bytes per telemetry row and per agent on disk.

The numbers are copied into docs/state.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import random
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench import _machine
from controller.store import Retention, Store

SEED = 20250903
RESOURCES = ("compute", "data")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return _machine.machine(
        sqlite=sqlite3.sqlite_version,
        **{"sqlite-utils": importlib.metadata.version("sqlite-utils")},
        platform=platform.platform(),
        **{"load average": _machine.load_average()},
    )


def learner_state(rng: random.Random) -> dict[str, Any]:
    """A learner state shaped and sized like the real one (about 1.9 kB).

    Settings, a prior, a drift detector, the posterior mean and covariance of
    (log scale, elasticities) and a replay buffer of eight samples, with the
    full-precision floats that make JSON decoding the cost of a restart.
    """

    def floats(n: int) -> list[float]:
        return [rng.gauss(0.0, 1.0) for _ in range(n)]

    return {
        "version": 1,
        "params": {
            "resources": list(RESOURCES),
            "ceiling": 1.0,
            "prior": {"mean": floats(3), "sd": [0.5, 0.1, 0.1]},
            "forgetting": 0.99,
            "noise": 0.03,
            "noise_weight": 20.0,
            "huber": 2.0,
            "gate": 6.0,
            "elasticity_max": 0.98,
            "confident_sd": 0.02,
            "replay": 8,
        },
        "detector": {
            "name": "PageHinkley",
            "params": {"min_instances": 5, "delta": 0.5, "threshold": 12.0},
            "state": dict(
                zip(("mean", "up", "down", "low", "high"), floats(5), strict=True)
            ),
        },
        "mean": floats(3),
        "covariance": [floats(3) for _ in range(3)],
        "noise_ss": rng.random(),
        "noise_n": rng.random() * 100,
        "buffer": [[floats(3), rng.random(), rng.random()] for _ in range(8)],
        "n_samples": 300,
        "counts": {"fitted": 300, "censored": 0, "outlier": 0, "drift": 0},
    }


def message(rng: random.Random, agent: str, seq: int) -> dict[str, Any]:
    """One telemetry message of a two-resource agent."""
    return {
        "agent": agent,
        "seq": seq,
        "ts": 1.7e9 + seq,
        "accuracy": rng.uniform(0.5, 0.95),
        "local": {name: rng.random() for name in RESOURCES},
        "cloud": {name: rng.random() for name in RESOURCES},
        "epoch": seq // 100 + 1,
        "load": rng.random(),
        "model": "resnet18",
    }


def ingest(
    path: Path,
    agents: int,
    rows: int,
    retention: Retention,
    *,
    prefill: bool = False,
    learner: bool = True,
) -> dict[str, float]:
    """Push ``rows`` messages from two threads; time until all are committed.

    With ``learner`` every message also saves its agent's learner state, as a
    daemon that learns from every message would.
    """
    rng = random.Random(SEED)
    names = [f"agent-{n:05d}" for n in range(agents)]
    messages = [message(rng, names[n % agents], n) for n in range(rows)]
    state = learner_state(rng)

    store = Store(path, retention=retention, queue_limit=rows + 1)
    if prefill:
        for row in messages:
            store.record_telemetry(**row)
        store.flush()
    caller_seconds: list[float] = []

    def produce(part: list[dict[str, Any]]) -> None:
        start = time.perf_counter()
        for row in part:
            store.record_telemetry(**row)
            if learner:
                store.save_learner_state(row["agent"], state)
        caller_seconds.append(time.perf_counter() - start)

    start = time.perf_counter()
    threads = [
        threading.Thread(target=produce, args=(messages[k::2],)) for k in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.flush()
    elapsed = time.perf_counter() - start
    dropped, failed = store.dropped, store.failed
    store.close()

    return {
        "messages_per_s": rows / elapsed,
        "caller_us_per_message": 1e6 * max(caller_seconds) / (rows / 2),
        "dropped": dropped,
        "failed": failed,
    }


def writer_alone(path: Path, agents: int, rows: int, learner: bool) -> dict[str, float]:
    """Queue ``rows`` messages with the writer held back, then time one flush.

    This is the writer's own cost per row, without producers competing for the
    interpreter: everything is committed in one batch.
    """
    rng = random.Random(SEED)
    names = [f"agent-{n:05d}" for n in range(agents)]
    messages = [message(rng, names[n % agents], n) for n in range(rows)]
    state = learner_state(rng)
    idle = Retention(telemetry_per_agent=None, telemetry_max_age=None)

    with Store(
        path,
        retention=idle,
        batch_rows=10 * rows,
        batch_interval=3600.0,
        queue_limit=rows + 1,
    ) as store:
        called = time.perf_counter()
        for row in messages:
            store.record_telemetry(**row)
            if learner:
                store.save_learner_state(row["agent"], state)
        start = time.perf_counter()
        store.flush()
        elapsed = time.perf_counter() - start

    return {
        "rows_per_s": rows / elapsed,
        "caller_us_per_message": 1e6 * (start - called) / rows,
    }


def paced(path: Path, agents: int, rate: float, seconds: float) -> dict[str, float]:
    """Offer a steady rate with the default queue bound; count what is lost."""
    rng = random.Random(SEED)
    names = [f"agent-{n:05d}" for n in range(agents)]
    total = int(rate * seconds)
    messages = [message(rng, names[n % agents], n) for n in range(total)]
    state = learner_state(rng)
    deepest = 0
    in_calls = 0.0

    with Store(path) as store:
        start = time.perf_counter()
        sent = 0
        while sent < total:
            due = min(total, int((time.perf_counter() - start) * rate))
            called = time.perf_counter()
            for row in messages[sent:due]:
                store.record_telemetry(**row)
                store.save_learner_state(row["agent"], state)
            in_calls += time.perf_counter() - called
            sent = max(sent, due)
            deepest = max(deepest, store.queued)
            time.sleep(0.001)
        store.flush()
        dropped = store.dropped

    return {
        "offered": sent,
        "dropped": dropped,
        "deepest_queue": deepest,
        "caller_us_per_message": 1e6 * in_calls / sent,
    }


def restart(path: Path, agents: int) -> dict[str, float]:
    """Write a fleet's state, then time a fresh open and the restore reads."""
    rng = random.Random(SEED)
    names = [f"agent-{n:05d}" for n in range(agents)]
    with Store(path) as store:
        for name in names:
            store.record_telemetry(**message(rng, name, 0))
            store.save_learner_state(name, learner_state(rng))
        grants = {
            name: {
                "cloud": {r: rng.random() for r in RESOURCES},
                "expected_accuracy": rng.random(),
            }
            for name in names
        }
        store.record_allocation(
            store.next_epoch(),
            trigger="bench",
            alpha=1.0,
            budget={r: float(agents) for r in RESOURCES},
            prices=dict.fromkeys(RESOURCES, 0.5),
            agents=grants,
        )

    cpu = time.process_time()
    start = time.perf_counter()
    store = Store(path)
    opened = time.perf_counter()
    states = store.learner_states()
    restored = time.perf_counter()
    last = store.latest_allocation()
    allocated = time.perf_counter()
    known = store.agents()
    done = time.perf_counter()
    cpu = time.process_time() - cpu
    store.close()
    assert len(states) == len(known) == agents
    assert last is not None

    return {
        "open_s": opened - start,
        "learner_states_s": restored - opened,
        "latest_allocation_s": allocated - restored,
        "agents_s": done - allocated,
        "total_s": done - start,
        "total_cpu_s": cpu,
        "state_bytes": len(json.dumps(learner_state(rng), separators=(",", ":"))),
        "grant_bytes": len(json.dumps(grants, separators=(",", ":"))) / agents,
        "file_bytes_per_agent": path.stat().st_size / agents,
    }


def allocation_latency(path: Path, durable: bool, agents: int) -> dict[str, float]:
    """Median and worst time of record_allocation for a fleet of ``agents``."""
    grants = {f"agent-{n:05d}": {"cloud": {"compute": 1.0}} for n in range(agents)}
    times = []
    with Store(path, durable=durable) as store:
        for _ in range(50):
            start = time.perf_counter()
            store.record_allocation(
                store.next_epoch(),
                trigger="bench",
                alpha=1.0,
                budget={"compute": 1.0},
                prices={"compute": 1.0},
                agents=grants,
            )
            times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(times), "max_ms": 1e3 * max(times)}


def row_bytes(path: Path, rows: int) -> float:
    """Bytes per telemetry row, indexes included, from a file of ``rows`` rows."""
    rng = random.Random(SEED)
    retention = Retention(telemetry_per_agent=None, telemetry_max_age=None)
    with Store(path, retention=retention, queue_limit=rows + 1) as store:
        for n in range(rows):
            store.record_telemetry(**message(rng, f"agent-{n % 100:05d}", n))
    empty = path.with_suffix(".empty")
    Store(empty).close()
    return (path.stat().st_size - empty.stat().st_size) / rows


def timed(label: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement and print its result on one line."""
    result = run()
    shown = ", ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in result.items()
    )
    print(f"{label:<40} {shown}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dir", type=Path, default=None, help="where files go")
    args = parser.parse_args()

    for key, value in machine().items():
        print(f"{key:<14} {value}")
    print(f"{'agents':<14} {args.agents}  rows {args.rows}\n")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        ingest_agents = min(args.agents, 1000)
        idle = Retention(telemetry_per_agent=None, telemetry_max_age=None)
        timed(
            f"telemetry only, {ingest_agents} agents",
            lambda: ingest(
                work / "a0.db", ingest_agents, args.rows, idle, learner=False
            ),
        )
        timed(
            f"with learner state, {ingest_agents} agents",
            lambda: ingest(work / "a.db", ingest_agents, args.rows, idle),
        )
        for learner in (False, True):
            timed(
                f"writer alone, learner state={learner}",
                partial(
                    writer_alone,
                    work / f"w{learner}.db",
                    ingest_agents,
                    args.rows,
                    learner,
                ),
            )
        # Every agent starts at the default limit, so each new row prunes one.
        limit = Retention().telemetry_per_agent or 1
        full = max(1, args.rows // limit)
        timed(
            f"with learner state, {full} agents at the limit",
            lambda: ingest(work / "b.db", full, args.rows, Retention(), prefill=True),
        )
        timed(
            "paced 5000 msg/s for 4 s, default queue",
            lambda: paced(work / "c.db", ingest_agents, 5000.0, 4.0),
        )
        timed(
            f"restart, {args.agents} agents",
            lambda: restart(work / "d.db", args.agents),
        )
        for fleet in sorted({100, args.agents}):
            for durable in (True, False):
                timed(
                    f"record_allocation {fleet} agents, durable={durable}",
                    partial(
                        allocation_latency,
                        work / f"e{fleet}{durable}.db",
                        durable,
                        fleet,
                    ),
                )
        timed(
            "telemetry row on disk",
            lambda: {"bytes_per_row": row_bytes(work / "f.db", 50_000)},
        )


if __name__ == "__main__":
    main()
