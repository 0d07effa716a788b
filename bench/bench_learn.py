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
   ``sample``), the arrays the solver needs each round;
3. memory: bytes per agent held by a ``FleetLearner`` of 1,000 agents
   (tracemalloc), and the size of one agent's saved state as JSON.

Timings are the best of 15 repeats (the machine is shared); the
numbers are copied into docs/learning.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import math
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


def per_call(function: Any, calls: int, repeat: int = 15) -> float:
    """Best-of-``repeat`` microseconds per call."""
    return min(timeit.repeat(function, number=calls, repeat=repeat)) / calls * 1e6


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
    feed = iter(samples)

    def fleet_update() -> None:
        x, y = next(feed)
        cloud = {r: v - 0.01 for r, v in x.items()}
        fleet.learn_one("agent-1", local, cloud, y, seq=next(seq))

    return {
        "learn_one_us": plain,
        "false_drift_alarms": learner.counts["drift"],
        "stationary_samples": learner.n_samples,
        "learn_one_half_censored_us": censored,
        "fleet_learn_one_us": per_call(fleet_update, calls),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--agents", type=int, default=1000)
    args = parser.parse_args()

    report: dict[str, Any] = {"machine": machine()}
    for count in (1, 2, 3):
        resources = ("compute", "data", "energy")[:count]
        report[f"R={count}"] = {
            **bench_update(resources, args.calls),
            **bench_fleet(resources, args.agents),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
