"""Does fair allocation pay? The paper's experiments, rebuilt and scored honestly.

Every policy is scored with the same capped utility ``min(1, A prod z^gamma)``
on the same fleets, with our own seeds, reporting the mean, the worst agent
and Jain's index, and the gain of the fair allocation (alpha 0, 1, 2, inf)
over each baseline.

- *Scaling, inference*: one resource; agents join one at a time up to 100,
  each adding U(0, 1) to the budget; local U(0, 1) / 10, elasticity U(0, 1).
- *Scaling, learning*: two resources, both budgets growing by U(0, 1) per
  agent; local U(0, 1) / 100; elasticities U(0, 1) each, and where the pair
  sums above 0.95 both are scaled down to sum to 0.95 (concave region).
- *Micro-scale*: 10 agents, one resource, local amounts 0.01 ... 0.10, half
  the agents with elasticity 0.2 (easy tasks), half with 0.6 (hard tasks),
  budget 1.
- *Two agents*: two resources, elasticities 0.7 and 0.2 for both agents,
  budgets and local amounts U(0, 0.5), 200 configurations.

Scale ``A = 1`` throughout (the paper's code has none). Run:

    python bench/bench_allocate_quality.py            # ~2 minutes
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.allocate import Allocation, allocate
from controller.problem import Problem

BASELINES = ("uniform", "random", "equal-totals", "sequential")
FAIR = (0.0, 1.0, 2.0, math.inf)
SEEDS = range(10)
SIZES = (10, 50, 100)


def fleet(
    budget: np.ndarray, gamma: np.ndarray, local: np.ndarray, alpha: float = 0.0
) -> Problem:
    """A fleet with scale 1 and ceiling 1 for every agent."""
    n, r = gamma.shape
    return Problem.from_arrays(
        [f"r{k}" for k in range(r)],
        [f"a{i}" for i in range(n)],
        budget,
        np.ones(n),
        gamma,
        local,
        alpha=alpha,
    )


def scaling(seed: int, n: int, resources: int) -> Problem:
    """The first ``n`` agents of a fleet grown one agent at a time."""
    rng = np.random.default_rng(seed)
    grow = rng.uniform(0, 1, (100, resources))
    gamma = rng.uniform(0, 1, (100, resources))
    local = rng.uniform(0, 1, (100, resources)) / (10 if resources == 1 else 100)
    if resources > 1:
        sums = gamma.sum(axis=1, keepdims=True)
        gamma = gamma * np.minimum(1.0, 0.95 / sums)
    return fleet(grow[:n].sum(axis=0), gamma[:n], local[:n])


def micro() -> Problem:
    """Ten agents, hand-set local amounts, two elasticity groups."""
    gamma = np.repeat([0.2, 0.6], 5)[:, None]
    local = np.linspace(0.01, 0.10, 10)[:, None]
    return fleet(np.array([1.0]), gamma, local)


def two_agents(seed: int) -> Problem:
    """Two agents, two resources, budgets and local amounts in (0, 0.5)."""
    rng = np.random.default_rng(seed)
    gamma = np.tile([0.7, 0.2], (2, 1))
    return fleet(rng.uniform(0, 0.5, 2), gamma, rng.uniform(0, 0.5, (2, 2)))


def policies(problem: Problem) -> Iterator[tuple[str, Allocation]]:
    """Every baseline (alpha 0 where it matters) and fair at each alpha.

    The random baseline is drawn ten times per fleet (the scores average them).
    """
    for name in BASELINES:
        for seed in range(10 if name == "random" else 1):
            yield name, allocate(problem.with_alpha(0.0), name, seed=seed)
    for alpha in FAIR:
        label = "fair, alpha=" + ("inf" if math.isinf(alpha) else f"{alpha:g}")
        yield label, allocate(problem.with_alpha(alpha))


def scores(problems: list[Problem]) -> dict[str, np.ndarray]:
    """Mean, worst and Jain's index per policy, averaged over the problems."""
    table: dict[str, list[list[float]]] = {}
    for problem in problems:
        for name, result in policies(problem):
            summary = result.summary()
            row = [
                summary["mean_utility"],
                summary["worst_utility"],
                summary["jain_index"],
            ]
            table.setdefault(name, []).append(row)
    return {name: np.mean(rows, axis=0) for name, rows in table.items()}


def report(title: str, results: dict[str, np.ndarray]) -> str:
    """A Markdown table: the scores, and fair's gains over each baseline."""
    lines = [f"**{title}**", "", "| policy | mean | worst agent | Jain's index |"]
    lines.append("|---|---:|---:|---:|")
    for name, (mean, worst, jain) in results.items():
        lines.append(f"| {name} | {mean:.4f} | {worst:.4f} | {jain:.4f} |")
    lines += ["", "Gain of fair over each baseline, mean / worst agent:", ""]
    fair = [name for name in results if name.startswith("fair")]
    lines.append("| baseline | " + " | ".join(fair) + " |")
    lines.append("|---|" + "---:|" * len(fair))
    for base in BASELINES:
        cells = [_gain(results[name], results[base]) for name in fair]
        lines.append(f"| {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _gain(fair: np.ndarray, base: np.ndarray) -> str:
    def percent(a: float, b: float) -> str:
        return f"{100 * (a / b - 1):+.1f}%" if b > 0 else "n/a"

    return f"{percent(fair[0], base[0])} / {percent(fair[1], base[1])}"


def experiments() -> Iterator[tuple[str, Callable[[], list[Problem]]]]:
    """Every experiment: a title and the fleets it scores."""
    for resources, kind in ((1, "inference"), (2, "learning")):
        for n in SIZES:
            title = (
                f"Scaling, {kind} ({resources} resource{'s' * (resources > 1)}), "
                f"{n} agents, {len(SEEDS)} fleets"
            )
            yield title, partial(_scaling_fleets, n, resources)
    yield "Micro-scale fleet of 10 (1 resource)", lambda: [micro()]
    yield "Two agents, 2 resources, 200 configurations", _two_agent_fleets


def _scaling_fleets(n: int, resources: int) -> list[Problem]:
    return [scaling(seed, n, resources) for seed in SEEDS]


def _two_agent_fleets() -> list[Problem]:
    return [two_agents(1000 + seed) for seed in range(200)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the experiments whose title has this")
    args = parser.parse_args(argv)
    for title, build in experiments():
        if args.only and args.only not in title:
            continue
        print(report(title, scores(build())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
