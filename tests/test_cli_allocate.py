"""``fairsynergy allocate`` run as a real process: input, output and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTANCE = {
    "alpha": 1,
    "budget": {"compute": 2.0, "data": 1.0},
    "agents": [
        {
            "id": "drone-1",
            "scale": 0.6,
            "elasticity": {"compute": 0.3, "data": 0.2},
            "local": {"compute": 0.05},
            "floor": {"compute": 0.1},
            "cap": {"data": 0.8},
        },
        {"id": "drone-2", "scale": 0.5, "elasticity": {"compute": 0.5}},
        {"id": "rover.3", "scale": 0.7, "elasticity": {"data": 0.4}},
    ],
}


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m controller.cli allocate ARGS`` and capture everything."""
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", "allocate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def strict(text: str) -> Any:
    """Parse JSON refusing NaN and Infinity tokens."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def instance_file(tmp_path: Path) -> Path:
    """The instance above, written to a file."""
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(INSTANCE))
    return path


def test_cli_allocate_file_prints_one_json_object(instance_file: Path) -> None:
    """Test a file instance gives exit 0 and the documented fields, keyed by name."""
    done = run(str(instance_file))

    assert done.returncode == 0, done.stderr
    output = strict(done.stdout)
    assert output["policy"] == "fair"
    assert output["alpha"] == 1
    assert set(output["allocations"]) == {"drone-1", "drone-2", "rover.3"}
    assert set(output["allocations"]["drone-2"]) == {"compute", "data"}
    assert set(output["prices"]) == set(output["unused"]) == {"compute", "data"}
    assert isinstance(output["objective"], float)
    assert output["certificate"]["relative_gap"] < 1e-9
    assert output["solve_seconds"] >= 0
    assert done.stdout.count("\n") == 1


def test_cli_allocate_reads_stdin(instance_file: Path) -> None:
    """Test '-' reads the instance from stdin, with the same answer as a file."""
    from_file = strict(run(str(instance_file)).stdout)

    done = run("-", stdin=json.dumps(INSTANCE))

    assert done.returncode == 0, done.stderr
    assert strict(done.stdout)["allocations"] == from_file["allocations"]


def test_cli_allocate_alpha_flag_overrides_the_instance(instance_file: Path) -> None:
    """Test --alpha inf wins over the instance's alpha and prints as "inf"."""
    done = run(str(instance_file), "--alpha", "inf")

    assert done.returncode == 0, done.stderr
    output = strict(done.stdout)
    assert output["alpha"] == "inf"
    assert output["objective"] == min(output["utility"].values())


def test_cli_allocate_baseline_policy_and_seed(instance_file: Path) -> None:
    """Test --policy random --seed N is reproducible and prices print as null."""
    first = run(str(instance_file), "--policy", "random", "--seed", "7")
    again = run(str(instance_file), "--policy", "random", "--seed", "7")

    assert first.returncode == 0, first.stderr
    output = strict(first.stdout)
    assert output["allocations"] == strict(again.stdout)["allocations"]
    assert output["policy"] == "random"
    assert output["prices"] == {"compute": None, "data": None}


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["missing.json"], None, "missing.json: cannot read"),
        (["-"], "{not json", "stdin: not valid JSON"),
        (["-"], '{"budget": {"compute": NaN}, "agents": []}', "NaN is not a number"),
        (["-"], json.dumps({**INSTANCE, "fairness": 2}), "unknown field 'fairness'"),
        (["-"], json.dumps({**INSTANCE, "agents": []}), "the fleet is empty"),
        (["-", "--alpha", "-2"], json.dumps(INSTANCE), "alpha: got -2.0"),
        (["-", "--alpha", "max"], json.dumps(INSTANCE), "alpha: got 'max'"),
    ],
)
def test_cli_allocate_bad_input_exits_non_zero_with_one_line(
    tmp_path: Path, args: list[str], stdin: str | None, message: str
) -> None:
    """Test bad input gives exit 2, nothing on stdout and one line on stderr."""
    path_args = [str(tmp_path / a) if a.endswith(".json") else a for a in args]

    done = run(*path_args, stdin=stdin)

    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("fairsynergy allocate: error: ")
    assert message in lines[0]


def test_cli_allocate_unknown_policy_is_an_argparse_error(instance_file: Path) -> None:
    """Test an unknown --policy is refused by the argument parser."""
    done = run(str(instance_file), "--policy", "greedy")

    assert done.returncode == 2
    assert "invalid choice: 'greedy'" in done.stderr
