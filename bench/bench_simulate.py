"""The closed-loop benchmark: learned allocation against uniform and the oracle.

Run from the repository root (the table in docs/learning.md is both)::

    .venv/bin/python bench/bench_simulate.py --agents 10 100 --seeds 3
    .venv/bin/python bench/bench_simulate.py --agents 1000 --seeds 1 --no-drift

For every fleet size, noise level and alpha it runs ``simulate`` (the same
code as ``fairsynergy simulate``) on ``--seeds`` fleets, each three ways with
the same curves and the same noise: learning with exploration ("ours"),
learning without exploration, and the uniform split. The oracle (the
allocation with the true curves) comes with every run. It prints, at rounds
30 and 100, how far each is below the oracle in mean and in worst-agent true
accuracy (percent of the oracle), and the learner's mean absolute elasticity
error, averaged over the fleets.

Then the drift scenario: 100 agents, 10% of them get a new true curve at
round 50. It reports the gaps just before and the largest after, and how many
rounds it takes until every drifted agent is back within 2% of its accuracy
under the oracle, and until the worst agent is, for good (the slowest of the
fleets; "None": not by round 100).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from bench._machine import machine
from controller.simulate import RoundResult, SimulationConfig, simulate

CHECKPOINTS = (30, 100)
WAYS: dict[str, dict[str, Any]] = {
    "ours": {"explore": True, "policy": "fair"},
    "no-explore": {"explore": False, "policy": "fair"},
    "uniform": {"explore": False, "policy": "uniform"},
}


def gap(value: float, oracle: float) -> float:
    """Percent below the oracle (negative: above it)."""
    return 100.0 * (1.0 - value / oracle)


def gaps(result: RoundResult) -> tuple[float, float]:
    return (
        gap(result.mean_accuracy, result.oracle_mean_accuracy),
        gap(result.worst_accuracy, result.oracle_worst_accuracy),
    )


def run(config: SimulationConfig) -> tuple[list[RoundResult], float]:
    started = time.perf_counter()
    results = list(simulate(config))
    return results, (time.perf_counter() - started) / config.rounds


def averaged(values: list[tuple[float, ...]]) -> tuple[float, ...]:
    return tuple(sum(column) / len(column) for column in zip(*values, strict=True))


def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for agents in args.agents:
        for noise in args.noise:
            for alpha in args.alpha:
                row: dict[str, Any] = {"agents": agents, "noise": noise, "alpha": alpha}
                for way, fields in WAYS.items():
                    row.update(compare(agents, noise, alpha, way, fields, args.seeds))
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def compare(
    agents: int,
    noise: float,
    alpha: float,
    way: str,
    fields: dict[str, Any],
    seeds: int,
) -> dict[str, Any]:
    """One way of allocating, averaged over ``seeds`` fleets."""
    at: dict[int, list[tuple[float, ...]]] = {c: [] for c in CHECKPOINTS}
    seconds, cost = [], []
    for seed in range(seeds):
        config = SimulationConfig(
            agents=agents, rounds=max(CHECKPOINTS), noise=noise, alpha=alpha,
            seed=seed, **fields,
        )  # fmt: skip
        results, per_round = run(config)
        for checkpoint in CHECKPOINTS:
            result = results[checkpoint - 1]
            at[checkpoint].append((*gaps(result), result.elasticity_error))
        seconds.append(per_round)
        cost.append(sum(r.exploration_cost for r in results) / len(results))
    row: dict[str, Any] = {f"{way}@{c}": averaged(at[c]) for c in CHECKPOINTS}
    row[f"{way}_seconds_per_round"] = sum(seconds) / seeds
    row[f"{way}_exploration_cost"] = sum(cost) / seeds
    return row


def recovery(
    results: list[RoundResult], start: int, gap_of: Callable[[RoundResult], float]
) -> int | None:
    """Rounds after ``start`` until ``gap_of`` stays within 2 percent."""
    for index in range(start - 1, len(results)):
        if all(gap_of(r) <= 2.0 for r in results[index:]):
            return index + 1 - start
    return None


def drifted(result: RoundResult) -> float:
    return math.inf if result.drifted_gap is None else result.drifted_gap


def drift_scenario(args: argparse.Namespace) -> list[dict[str, Any]]:
    """100 agents, 10% drift at round 50; the slowest recovery over the seeds."""
    rows = []
    for alpha in args.alpha:
        for way in ("ours", "no-explore"):
            runs = []
            for seed in range(args.seeds):
                config = SimulationConfig(
                    agents=100, rounds=100, noise=0.02, alpha=alpha, seed=seed,
                    drift=((50, 0.1),), **WAYS[way],
                )  # fmt: skip
                runs.append(run(config)[0])
            row = {
                "alpha": alpha,
                "way": way,
                "before": averaged([gaps(r[48]) for r in runs]),
                "worst_after": averaged(
                    [
                        tuple(map(max, zip(*map(gaps, r[49:]), strict=True)))
                        for r in runs
                    ]
                ),
                "drifted_within_2": max_or_none(recovery(r, 50, drifted) for r in runs),
                "worst_within_2": max_or_none(
                    recovery(r, 50, lambda x: gaps(x)[1]) for r in runs
                ),
                "final": averaged([gaps(r[-1]) for r in runs]),
                "drifts_detected": sum(r[-1].drifts_detected for r in runs) / len(runs),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def max_or_none(values: Iterable[int | None]) -> int | None:
    """The largest value, or None if any run never recovered."""
    listed = list(values)
    return None if None in listed else max(v for v in listed if v is not None)


def markdown(rows: list[dict[str, Any]], drift: list[dict[str, Any]]) -> str:
    lines = [
        "| N | noise | alpha | round | ours: mean / worst gap %, elast. err "
        "| no exploration | uniform | exploration cost (est.) | s/round (ours) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for checkpoint in CHECKPOINTS:
            cells = []
            for way in WAYS:
                mean, worst, error = row[f"{way}@{checkpoint}"]
                cell = f"{mean:.2f} / {worst:.2f}"
                cells.append(cell if way == "uniform" else f"{cell}, {error:.4f}")
            lines.append(
                f"| {row['agents']} | {row['noise']:.0%} | {row['alpha']:g} "
                f"| {checkpoint} | {' | '.join(cells)} "
                f"| {row['ours_exploration_cost']:.2%} "
                f"| {row['ours_seconds_per_round']:.3f} |"
            )
    lines += [
        "",
        "| alpha | learner | gap before (mean / worst %) | largest gap after "
        "| rounds until drifted agents within 2% | rounds until worst agent "
        "within 2% | final gap | drifts detected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in drift:
        lines.append(
            f"| {row['alpha']:g} | {row['way']} "
            f"| {row['before'][0]:.2f} / {row['before'][1]:.2f} "
            f"| {row['worst_after'][0]:.2f} / {row['worst_after'][1]:.2f} "
            f"| {row['drifted_within_2']} | {row['worst_within_2']} "
            f"| {row['final'][0]:.2f} / {row['final'][1]:.2f} "
            f"| {row['drifts_detected']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.02, 0.05])
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--seeds", type=int, default=3, help="fleets per cell")
    parser.add_argument("--no-drift", action="store_true", help="skip the drift runs")
    parser.add_argument("--no-grid", action="store_true", help="only the drift runs")
    args = parser.parse_args()

    print(json.dumps({"machine": machine()}), flush=True)
    rows = [] if args.no_grid else grid(args)
    drift = [] if args.no_drift else drift_scenario(args)
    print(markdown(rows, drift))


if __name__ == "__main__":
    main()
