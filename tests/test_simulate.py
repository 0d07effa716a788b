"""The simulated fleet, the closed loop around it, and ``fairsynergy simulate``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from controller.cli import main
from controller.simulate import (
    ARCHETYPES,
    SimulatedFleet,
    SimulationConfig,
    simulate,
)

REQUIRED_FIELDS = {
    "round",
    "objective",
    "oracle_objective",
    "mean_accuracy",
    "oracle_mean_accuracy",
    "worst_accuracy",
    "oracle_worst_accuracy",
    "elasticity_error",
}


def test_simulate_fleet_curves_are_concave_and_realistic():
    """Drawn curves keep elasticity sums below 1 and accuracies in the paper's range."""
    fleet = SimulatedFleet(200, seed=1)

    gamma = fleet.elasticity()
    low = [fleet[a].utility(np.zeros(2)) for a in fleet.agents]
    high = [fleet[a].utility(np.full(2, 2.0)) for a in fleet.agents]

    assert np.all(gamma >= 0)
    assert gamma.sum(axis=1).max() < 0.2
    assert min(low) > 0.4
    assert max(high) <= max(a.ceiling for a in ARCHETYPES)
    assert all(h > lo for h, lo in zip(high, low, strict=True))
    assert fleet.budget.tolist() == [200.0, 200.0]


def test_simulate_fleet_reports_noisy_capped_accuracy():
    """Reports scatter around the true curve, never exceed the ceiling, and count up."""
    fleet = SimulatedFleet(1, noise=0.02, seed=2)
    agent = fleet.agents[0]
    rng = np.random.default_rng(0)
    cloud = np.array([0.5, 0.5])

    reports = [fleet.report(agent, cloud, rng) for _ in range(400)]

    accuracy = np.array([r.accuracy for r in reports])
    truth = fleet[agent].utility(cloud)
    assert [r.seq for r in reports[:3]] == [1, 2, 3]
    assert np.median(accuracy) == pytest.approx(truth, rel=0.005)
    assert np.std(np.log(accuracy)) == pytest.approx(0.02, rel=0.15)
    assert accuracy.max() <= fleet[agent].ceiling


def test_simulate_fleet_drift_changes_curves_not_labels():
    """A drift gives the chosen fraction new curves of another shape, same labels."""
    fleet = SimulatedFleet(50, seed=3)
    before = {a: (fleet[a].model, fleet[a].elasticity.copy()) for a in fleet.agents}

    changed = fleet.drift(0.1)

    assert len(changed) == 5
    for agent in fleet.agents:
        model, gamma = before[agent]
        assert fleet[agent].model == model
        assert np.array_equal(fleet[agent].elasticity, gamma) == (agent not in changed)


def test_simulate_closed_loop_learns_towards_the_oracle():
    """Within a few dozen rounds the learned allocation nears the oracle's."""
    config = SimulationConfig(agents=12, rounds=25, noise=0.02, alpha=1.0, seed=4)

    results = list(simulate(config))

    first, last = results[0], results[-1]
    assert last.elasticity_error < 0.5 * first.elasticity_error
    assert last.mean_accuracy >= 0.98 * last.oracle_mean_accuracy
    assert last.worst_accuracy >= 0.95 * last.oracle_worst_accuracy
    assert all(r.objective <= r.oracle_objective + 1e-9 for r in results)


def test_simulate_churn_and_drift_keep_the_loop_running():
    """Agents joining, leaving and drifting never break an allocation."""
    config = SimulationConfig(agents=8, rounds=12, seed=5, churn=0.1, drift=((6, 0.5),))

    results = list(simulate(config))

    assert sum(r.events["joined"] for r in results) > 0
    assert results[5].events["drifted"] == 4
    assert all(r.agents == 8 for r in results)


def test_simulate_cli_prints_one_json_line_per_round():
    """``fairsynergy simulate --json`` prints the specified fields, one round a line."""
    command = [
        sys.executable, "-m", "controller.cli", "simulate", "--agents", "6",
        "--rounds", "4", "--noise", "0.02", "--alpha", "1", "--seed", "7",
        "--drift", "3:0.5", "--json",
    ]  # fmt: skip

    done = subprocess.run(command, capture_output=True, text=True, check=True)

    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 3, 4]
    assert all(line.keys() >= REQUIRED_FIELDS for line in lines)
    assert lines[2]["events"]["drifted"] == 3


def test_simulate_cli_table_ends_with_summary(capsys):
    """Without --json the command prints a table and a one-paragraph summary."""
    status = main(["simulate", "--agents", "5", "--rounds", "3", "--seed", "8"])

    out = capsys.readouterr().out
    assert status == 0
    assert out.splitlines()[0].startswith("round")
    assert "below the oracle" in out


@pytest.mark.parametrize(
    ("flag", "message"),
    [(["--drift", "soon"], "ROUND:FRACTION"), (["--agents", "0"], "--agents")],
)
def test_simulate_cli_rejects_bad_arguments(capsys, flag, message):
    """Bad arguments exit 2 with a one-line message naming the flag."""
    status = main(["simulate", "--rounds", "1", *flag])

    err = capsys.readouterr().err
    assert status == 2
    assert message in err
