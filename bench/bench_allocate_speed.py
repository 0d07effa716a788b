"""How fast the fair allocation is, against cvxpy on the same instances.

For fleets of 10 to 1,000,000 agents, 1 to 3 resources and alpha 0, 1 and 2,
time :func:`controller.allocate.allocate` (the median of a few runs; wall and
CPU time) and, up to ``--cvxpy-max`` agents, a vectorised cvxpy formulation of
the same problem solved with Clarabel (model building included, as a user
would pay it). Prints a Markdown table; ``--json`` also saves the numbers.

    python bench/bench_allocate_speed.py            # full run, ~15 minutes
    python bench/bench_allocate_speed.py --quick    # up to 10,000 agents
    python bench/bench_allocate_speed.py --agents 1000   # one size, ~30 s

Instances: scale U(0.5, 1), elasticities a Dirichlet draw scaled by
U(0.5, 0.95) (so each agent's sum is below 1), local amounts U(0, 0.1), a
budget of 0.2 per agent and resource, ceilings 1, no floors or caps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _machine
from controller.allocate import allocate
from controller.problem import Problem

SIZES = (10, 100, 1_000, 10_000, 100_000, 1_000_000)
RESOURCES = (1, 2, 3)
ALPHAS = (0.0, 1.0, 2.0)


def fleet(n: int, r: int, alpha: float, seed: int = 0) -> Problem:
    """The benchmark instance (see the module docstring)."""
    rng = np.random.default_rng(seed)
    gamma = rng.dirichlet(np.ones(r + 1), size=n)[:, :r] * rng.uniform(
        0.5, 0.95, (n, 1)
    )
    return Problem.from_arrays(
        [f"r{k}" for k in range(r)],
        [f"a{i}" for i in range(n)],
        np.full(r, 0.2 * n),
        rng.uniform(0.5, 1.0, n),
        gamma,
        rng.uniform(0.0, 0.1, (n, r)),
        alpha=alpha,
    )


def time_ours(problem: Problem, repeats: int) -> dict[str, float]:
    """Median wall and CPU seconds of ``allocate``, and its certificate.

    CPU time is this thread's: on a shared machine it is closer to what an
    idle machine would show than wall time (other processes do not count,
    and neither do the BLAS helper threads of the small matrix products).
    """
    walls, cpus = [], []
    result = allocate(problem)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.thread_time()
        result = allocate(problem)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.thread_time() - cpu)
    return {
        "wall": statistics.median(walls),
        "cpu": statistics.median(cpus),
        "gap": result.certificate["relative_gap"],
        "objective": result.objective,
    }


def time_cvxpy(problem: Problem) -> dict[str, float] | None:
    """Build and solve the problem with cvxpy + Clarabel; None if it fails."""
    import cvxpy

    cp: Any = cvxpy
    p, alpha = problem, problem.alpha
    warnings.filterwarnings("ignore", module="cvxpy")
    started = time.perf_counter()
    x = cp.Variable(p.floor.shape, nonneg=True)
    z = p.local + x
    constraints = [cp.sum(x, axis=0) <= p.budget]
    if alpha >= 1:
        log_u = np.log(p.scale) + cp.sum(cp.multiply(p.elasticity, cp.log(z)), axis=1)
        log_v = cp.minimum(np.log(p.ceiling), log_u)
        if alpha == 1:
            objective = cp.sum(cp.multiply(p.weight, log_v))
        else:
            value = cp.exp((1 - alpha) * log_v)
            objective = -cp.sum(cp.multiply(p.weight, value)) / (alpha - 1)
    else:
        # Power cones have no vectorised form: one geometric mean per agent.
        terms = []
        for i in range(p.n_agents):
            weights = [*p.elasticity[i], 1 - p.elasticity[i].sum()]
            mean = cp.geo_mean(cp.hstack([z[i], 1.0]), weights, approx=False)
            terms.append(p.weight[i] * cp.minimum(p.ceiling[i], p.scale[i] * mean))
        objective = cp.sum(cp.hstack(terms))
    model = cp.Problem(cp.Maximize(objective), constraints)
    built = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.solve(solver="CLARABEL")
    except cp.error.SolverError:
        return None
    done = time.perf_counter()
    if model.status not in ("optimal", "optimal_inaccurate"):
        return None
    return {
        "wall": done - started,
        "build": built - started,
        "objective": float(model.value),
    }


def machine() -> dict[str, Any]:
    """CPU, cores, versions and load, for the record."""
    return _machine.machine(numpy=np.__version__, load=os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="up to 10,000 agents")
    parser.add_argument(
        "--agents", type=int, nargs="+", help="only these fleet sizes, e.g. 1000"
    )
    parser.add_argument("--cvxpy-max", type=int, default=10_000)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    sizes = [n for n in SIZES if n <= 10_000] if args.quick else list(SIZES)
    if args.agents:
        sizes = args.agents
    rows = []
    before = machine()
    for n in sizes:
        for r in RESOURCES:
            for alpha in ALPHAS:
                problem = fleet(n, r, alpha)
                ours = time_ours(problem, 3 if n >= 100_000 else 7)
                theirs = None
                cvxpy_limit = args.cvxpy_max if alpha > 0 else min(args.cvxpy_max, 1000)
                if n <= cvxpy_limit:
                    theirs = time_cvxpy(problem)
                rows.append({"agents": n, "resources": r, "alpha": alpha,
                             "ours": ours, "cvxpy": theirs})  # fmt: skip
                print(_row(rows[-1]), flush=True)
    after = machine()
    print()
    print(_table(rows, before, after))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"machine_before": before, "machine_after": after, "rows": rows}
        args.json.write_text(json.dumps(record, indent=1))
    return 0


def _row(row: dict[str, Any]) -> str:
    ours, theirs = row["ours"], row["cvxpy"]
    cvxpy_text, ratio = "-", "-"
    if theirs is not None:
        cvxpy_text = f"{theirs['wall']:.3g}"
        ratio = f"{theirs['wall'] / ours['wall']:,.0f}x"
        agree = abs(theirs["objective"] - ours["objective"])
        agree /= max(1.0, abs(theirs["objective"]))
        ratio += f" (objectives agree to {agree:.0e})"
    return (
        f"| {row['agents']:>9,} | {row['resources']} | {row['alpha']:g} | "
        f"{_ms(ours['wall'])} | {_ms(ours['cpu'])} | "
        f"{ours['gap']:.0e} | {cvxpy_text} | {ratio} |"
    )


def _ms(seconds: float) -> str:
    # Three significant digits below 100 ms, whole milliseconds above.
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:,.0f}"
    return f"{ms:.3g}" if ms >= 1 else f"{ms:.3f}"


def _table(
    rows: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any]
) -> str:
    load = f"{before['load'][0]:.2f} before, {after['load'][0]:.2f} after"
    lines = [
        f"Machine: {before['cpu']}, {before['cores']} cores; Python "
        f"{before['python']}, numpy {before['numpy']}; 1-minute load {load}.",
        "",
        "| agents | R | alpha | ours, ms (wall) | ours, ms (thread CPU) | duality gap "
        "| cvxpy + Clarabel, s | cvxpy / ours |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines.extend(_row(row) for row in rows)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
