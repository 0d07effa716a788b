"""What one learner update costs, and how much memory a learner holds.

Run from the repository root::

    .venv/bin/python bench/bench_learn.py

It measures, for 1, 2 and 3 resources:

1. update: microseconds per ``UtilityLearner.learn_one`` on a stationary
   stream (2% noise, varied amounts), drift detector included, and the false
   drift alarms it raised; a stream where half the samples saturate
   (censored update); the fleet layer's ``FleetLearner.learn_one`` (seq
   check, totals, pooling bookkeeping); and river's
   ``BayesianLinearRegression`` on the same features, for comparison;
2. reading: microseconds per estimate (feasible posterior mode) and per
   Thompson sample for a whole fleet of 1,000 agents (``estimates`` and
   ``sample``), the arrays the solver needs each round, and per
   ``predict_one`` right after an update (the daemon's fit check);
3. memory: bytes per agent held by a ``FleetLearner`` of 1,000 agents
   (tracemalloc), and the size of one agent's saved state as JSON;
4. scale (2 resources, ``--scale`` agents, 10,000 by default): restoring
   every agent's saved state (one by one and with ``restore_agents``),
   saving them (``agent_state``), ``estimates`` (after every posterior
   changed, and again), ``sample``, ``predict_many``, and the time to import
   ``controller.learn`` in a fresh interpreter.

Timings are the best of 15 repeats (the machine is shared); the
numbers are copied into docs/learning.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import timeit
import tracemalloc
from typing import Any

import numpy as np
from river import linear_model

from bench._machine import machine
from controller.learn import FleetLearner, UtilityLearner

SEED = 20250903


def stream(resources: tuple[str, ...], n: int, ceiling: float = 1.0) -> list[Any]:
    """Samples of one agent: amounts log-uniform over two decades, 2% noise."""
    rng = np.random.default_rng(SEED)
    amounts = np.exp(rng.uniform(math.log(0.02), math.log(2.0), (n, len(resources))))
    accuracy = 0.75 * np.prod(amounts**0.05, axis=1)
    accuracy = np.minimum(ceiling, accuracy * np.exp(0.02 * rng.standard_normal(n)))
    return [
        (dict(zip(resources, z.tolist(), strict=True)), float(y))
        for z, y in zip(amounts, accuracy, strict=True)
    ]


def per_call(function: Any, calls: int, repeat: int = 15, *, gc: bool = False) -> float:
    """Best-of-``repeat`` microseconds per call.

    timeit pauses the garbage collector; ``gc=True`` keeps it running, as it
    runs in the daemon, for calls that allocate many objects (a restore).
    """
    setup = "import gc; gc.enable()" if gc else "pass"
    times = timeit.repeat(function, setup=setup, number=calls, repeat=repeat)
    return min(times) / calls * 1e6


def bench_update(resources: tuple[str, ...], calls: int) -> dict[str, float]:
    samples = stream(resources, calls * 16)
    learner = UtilityLearner(resources)
    feed = iter(samples)
    plain = per_call(lambda: learner.learn_one(*next(feed)), calls)

    ceiling = float(np.median([y for _, y in samples]))
    censored_samples = stream(resources, calls * 16, ceiling)
    censoring = UtilityLearner(resources, ceiling=ceiling)
    feed = iter(censored_samples)
    censored = per_call(lambda: censoring.learn_one(*next(feed)), calls)

    fleet = FleetLearner(resources)
    local = dict.fromkeys(resources, 0.01)
    seq = iter(range(10**9))
    feed = itertools.cycle(samples)  # two timings of 15 repeats each
    probe = dict.fromkeys(resources, 0.5)

    def fleet_update(predict: bool = False) -> None:
        x, y = next(feed)
        cloud = {r: v - 0.01 for r, v in x.items()}
        fleet.learn_one("agent-1", local, cloud, y, seq=next(seq))
        if predict:
            fleet["agent-1"].predict_one(probe)

    fleet_learn = per_call(fleet_update, calls)
    with_predict = per_call(lambda: fleet_update(predict=True), calls)
    return {
        "learn_one_us": plain,
        "false_drift_alarms": learner.counts["drift"],
        "stationary_samples": learner.n_samples,
        "learn_one_half_censored_us": censored,
        "fleet_learn_one_us": fleet_learn,
        "predict_one_after_update_us": with_predict - fleet_learn,
        **bench_river(samples, calls),
    }


def bench_river(samples: list[Any], calls: int) -> dict[str, float]:
    """river's BayesianLinearRegression on the same features, for comparison."""
    rows = [
        ({"bias": 1.0, **{r: math.log(v) for r, v in x.items()}}, math.log(y))
        for x, y in samples
    ]
    return {
        "river_blr_us": time_river(None, rows, calls),
        "river_blr_smoothing_us": time_river(0.99, rows, calls),
    }


def time_river(smoothing: float | None, rows: list[Any], calls: int) -> float:
    model: Any = linear_model.BayesianLinearRegression(smoothing=smoothing)
    feed = iter(rows)
    return per_call(lambda: model.learn_one(*next(feed)), calls)


def build_fleet(resources: tuple[str, ...], agents: int, samples: int) -> FleetLearner:
    fleet = FleetLearner(resources)
    data = stream(resources, samples)
    local = dict.fromkeys(resources, 0.01)
    for k in range(agents):
        for seq, (x, y) in enumerate(data):
            cloud = {r: v - 0.01 for r, v in x.items()}
            fleet.learn_one(f"agent-{k:05d}", local, cloud, y, seq=seq, model="m")
    return fleet


def bench_fleet(resources: tuple[str, ...], agents: int) -> dict[str, float]:
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    fleet = build_fleet(resources, agents, 20)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))

    rng = np.random.default_rng(SEED)
    fleet.estimates()  # warm the per-agent caches once, as the first round does
    estimates = per_call(lambda: fleet.estimates(), 1, repeat=5)
    sample = per_call(lambda: fleet.sample(rng), 1, repeat=5)
    state = json.dumps(fleet["agent-00000"].to_state())
    return {
        "bytes_per_agent": held / agents,
        "state_json_bytes_per_agent": len(state),
        "estimates_ms_per_round": estimates / 1e3,
        "sample_ms_per_round": sample / 1e3,
    }


def bench_scale(agents: int) -> dict[str, float]:
    """Restart and per-cycle costs at ``agents`` agents with 2 resources.

    The fleet is restored from the saved states of 300 trained agents, each
    used for many agent ids: the costs depend on the states' shape, not on
    their values.
    """
    resources = ("compute", "data")
    trained = build_fleet(resources, 300, 20)
    text = [json.dumps(trained.agent_state(a)) for a in trained.agents]
    states = {f"agent-{k:05d}": json.loads(text[k % len(text)]) for k in range(agents)}

    def one_by_one() -> FleetLearner:
        fleet = FleetLearner(resources)
        for agent, state in states.items():
            fleet.restore_agent(agent, state)
        return fleet

    def batch() -> FleetLearner:
        fleet = FleetLearner(resources)
        fleet.restore_agents(states)
        return fleet

    fleet = batch()
    names = list(states)
    learners = [fleet[a] for a in names]

    def estimates_after_updates() -> None:
        for learner in learners:
            learner._changed()  # as if every posterior moved since last time
        fleet.estimates(names)

    rng = np.random.default_rng(SEED)
    totals = np.full((agents, 2), 0.5)
    return {
        "agents": agents,
        "restore_agent_s": per_call(one_by_one, 1, repeat=3, gc=True) / 1e6,
        "restore_agents_s": per_call(batch, 1, repeat=3, gc=True) / 1e6,
        "agent_state_us": per_call(lambda: fleet.agent_state(names[7]), 20000),
        "estimates_changed_ms": per_call(estimates_after_updates, 1, 3) / 1e3,
        "estimates_ms": per_call(lambda: fleet.estimates(names), 1, 5) / 1e3,
        "sample_ms": per_call(lambda: fleet.sample(rng, names), 1, 5) / 1e3,
        "predict_many_ms": per_call(lambda: fleet.predict_many(names, totals), 1, 5)
        / 1e3,
        "import_learn_ms": import_time("controller.learn"),
    }


def import_time(module: str, repeat: int = 5) -> float:
    """Best-of milliseconds to import ``module`` in a fresh interpreter."""
    times = []
    for _ in range(repeat):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {module}"],
            capture_output=True,
            text=True,
            check=True,
        )
        last = result.stderr.strip().splitlines()[-1]  # the module itself
        times.append(int(last.split("|")[1]) / 1e3)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--scale", type=int, default=10000)
    args = parser.parse_args()

    report: dict[str, Any] = {"machine": machine()}
    for count in (1, 2, 3):
        resources = ("compute", "data", "energy")[:count]
        report[f"R={count}"] = {
            **bench_update(resources, args.calls),
            **bench_fleet(resources, args.agents),
        }
    report["scale"] = bench_scale(args.scale)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
