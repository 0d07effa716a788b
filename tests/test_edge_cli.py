"""``fairsynergy-edge`` as real processes against a real Mosquitto."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import schemas
from edge_client.allocation import Allocation
from edge_client.cli import amounts, build_parser, hook_environment
from schemas import Kind, Topics
from tests.mosquitto import MosquittoBroker, free_port
from tests.test_edge_client import WAIT_S, Listener, allocation_payload

ROOT = Path(__file__).resolve().parent.parent
FLEET, AGENT = "demo", "robot-7"
TOPICS = Topics(FLEET, AGENT)


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_client.cli", *args]


def clean_environment(**extra: str) -> dict[str, str]:
    """The test's environment without FAIRSYNERGY_* settings, importing the repo."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FAIRSYNERGY_")
    }
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args),
        input=stdin,
        capture_output=True,
        text=True,
        env=clean_environment(),
        timeout=60,
        check=False,
    )


def start(*args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(*args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_environment(**env),
    )


def finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    """Wait for a process (kill it after a while) and return its output."""
    try:
        out, err = process.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"process did not finish:\n{err}")
    return out, err


@pytest.fixture
def connection(broker: MosquittoBroker) -> list[str]:
    return ["--broker", broker.url, "--fleet", FLEET, "--agent", AGENT]


@pytest.fixture
def listener(broker: MosquittoBroker) -> Iterator[Listener]:
    listening = Listener(broker, "fairsynergy/#", name="controller")
    yield listening
    listening.close()


def wait_for(path: Path, timeout: float = WAIT_S) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().endswith("\n"):
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} was not written")
        time.sleep(0.02)
    return path.read_text()


def test_edge_cli_report_sends_one_telemetry_message(
    broker: MosquittoBroker, connection: list[str], listener: Listener
) -> None:
    """Test report sends the flags as telemetry, exits 0 and leaves presence alone."""
    result = run(
        "report", *connection, "--accuracy", "0.8", "--local", "compute=1,data=0.5",
        "--cloud", "compute=0.2", "--load", "3", "--model", "resnet18", "--epoch", "4",
    )  # fmt: skip

    report = listener.collect(TOPICS.telemetry, 1)[0]
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert report["accuracy"] == 0.8
    assert report["local"] == {"compute": 1.0, "data": 0.5}
    assert report["cloud"] == {"compute": 0.2}
    assert (report["load"], report["model"], report["epoch"]) == (3, "resnet18", 4)
    # A one-shot report leaves the agent's presence alone: no retained status.
    with pytest.raises(queue.Empty):
        Listener(broker, TOPICS.status, name="status").next(TOPICS.status, timeout=0.3)


def test_edge_cli_report_fails_in_one_line_when_the_broker_is_away() -> None:
    """Test an unreachable broker gives exit 2 and one line naming it, in time."""
    url = f"mqtt://127.0.0.1:{free_port()}"
    started = time.monotonic()

    result = run(
        "report", "--broker", url, "--fleet", FLEET, "--agent", AGENT, "--timeout", "1",
        "--accuracy", "0.5", "--local", "compute=1", "--cloud", "",
    )  # fmt: skip

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("fairsynergy-edge report: error: broker " + url)
    assert time.monotonic() - started < WAIT_S


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (
            ["--accuracy", "1.5", "--local", "compute=1", "--cloud", ""],
            "accuracy must be",
        ),
        (["--accuracy", "0.5", "--local", "Compute=1", "--cloud", ""], "resource name"),
        (["--accuracy", "0.5", "--local", "compute", "--cloud", ""], "NAME=AMOUNT"),
        (["--accuracy", "0.5", "--cloud", ""], "--local"),
    ],
)
def test_edge_cli_report_refuses_bad_values(flags: list[str], words: str) -> None:
    """Test a bad flag value is refused with exit 2, saying what is wrong."""
    url = f"mqtt://127.0.0.1:{free_port()}"

    result = run("report", "--broker", url, "--fleet", FLEET, "--agent", AGENT, *flags)

    assert result.returncode == 2
    assert words in result.stderr


def test_edge_cli_needs_fleet_and_agent() -> None:
    """Test a missing fleet or agent is one clear line, not a traceback."""
    result = run("watch", "--broker", "mqtt://127.0.0.1:1")

    assert result.returncode == 2
    assert result.stderr.strip() == (
        "fairsynergy-edge watch: error: --fleet and --agent are required "
        "(or FAIRSYNERGY_FLEET/_AGENT)"
    )


def test_edge_cli_watch_prints_allocations_and_runs_exec(
    connection: list[str], listener: Listener, tmp_path: Path
) -> None:
    """Test watch prints each allocation and runs --exec with it on stdin and in env."""
    listener.publish(
        TOPICS.allocation, allocation_payload(1, compute=0.25), retain=True
    )
    hook = (
        'cat > "$OUT/stdin-$FAIRSYNERGY_EPOCH.json"; '
        'echo "$FAIRSYNERGY_CLOUD_COMPUTE $FAIRSYNERGY_AGENT" '
        '> "$OUT/env-$FAIRSYNERGY_EPOCH"'
    )

    process = start(
        "watch", *connection, "--count", "2", "--exec", hook, OUT=str(tmp_path)
    )
    first_env = wait_for(tmp_path / "env-1")
    listener.publish(
        TOPICS.allocation, allocation_payload(2, compute=0.75), retain=True
    )
    out, err = finish(process)

    lines = [json.loads(line) for line in out.splitlines()]
    assert process.returncode == 0, err
    assert [line["epoch"] for line in lines] == [1, 2]
    assert lines[1]["cloud"] == {"compute": 0.75}
    assert first_env == f"0.25 {AGENT}\n"
    assert wait_for(tmp_path / "env-2") == f"0.75 {AGENT}\n"
    assert json.loads((tmp_path / "stdin-2.json").read_text()) == lines[1]


def test_edge_cli_watch_closes_cleanly_on_sigterm(
    connection: list[str], listener: Listener
) -> None:
    """Test SIGTERM makes watch say offline itself and exit 0."""
    process = start("watch", *connection)
    online = schemas.decode(Kind.AGENT_STATUS, listener.next(TOPICS.status).payload)

    process.send_signal(signal.SIGTERM)
    finish(process)
    offline = schemas.decode(Kind.AGENT_STATUS, listener.next(TOPICS.status).payload)

    assert process.returncode == 0
    assert online["state"] == "online"
    assert offline["state"] == "offline"
    assert offline["ts"] >= online["ts"]  # a fresh status, not the last will


def test_edge_cli_pipe_reports_good_lines_and_explains_bad_ones(
    connection: list[str], listener: Listener
) -> None:
    """Test pipe reports good lines, explains bad ones on stderr, and keeps going."""
    listener.publish(TOPICS.allocation, allocation_payload(3), retain=True)
    process = start("pipe", *connection, "--model", "resnet18")
    assert process.stdin is not None
    assert process.stdout is not None
    allocation = json.loads(process.stdout.readline())
    good = {"accuracy": 0.8, "local": {"compute": 1}, "cloud": {"compute": 0.5}}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "accuracy": 2}),
        json.dumps({**good, "acuracy": 0.5}),
        json.dumps({"accuracy": 0.5, "local": {}}),
        json.dumps({**good, "local": [1, 2]}),
        "",
        json.dumps({**good, "load": 4}),
    ]

    process.stdin.write("\n".join(lines) + "\n")
    _, err = finish(process)
    reports = listener.collect(TOPICS.telemetry, 2)

    errors = [json.loads(line) for line in err.splitlines()]
    assert process.returncode == 0, err
    assert allocation["epoch"] == 3
    assert [(e["line"], e["reason"], e.get("field")) for e in errors] == [
        (2, "not_json", None),
        (3, "schema", "accuracy"),
        (4, "schema", "acuracy"),
        (5, "schema", "cloud"),
        (6, "schema", "local"),
    ]
    assert [report["epoch"] for report in reports] == [3, 3]
    assert [report.get("load") for report in reports] == [None, 4]
    assert reports[0]["model"] == "resnet18"


@pytest.mark.parametrize("subcommand", ["report", "watch", "pipe"])
def test_edge_cli_help_explains_each_command_with_examples(subcommand: str) -> None:
    """Test every subcommand's --help stands on its own, with examples."""
    result = run(subcommand, "--help")

    assert result.returncode == 0
    assert "example" in result.stdout
    assert "--broker" in result.stdout
    assert f"fairsynergy-edge {subcommand}" in result.stdout


def test_edge_cli_top_level_help_lists_the_commands() -> None:
    """Test plain --help names the three commands."""
    result = run("--help")

    for name in ("report", "watch", "pipe"):
        assert name in result.stdout


def test_edge_cli_hook_environment_names_every_resource() -> None:
    """Test --exec variables cover cloud, prices and optional fields."""
    args = build_parser().parse_args(
        ["watch", "--broker", "mqtt://b", "--fleet", FLEET, "--agent", AGENT]
    )
    message: dict[str, Any] = schemas.allocation(
        epoch=9,
        cloud={"compute": 0.5, "data_labels": 2},
        prices={"compute": 0.1},
        expected_accuracy=0.9,
        ts=100.0,
    )

    env = hook_environment(args, Allocation.from_message(message))

    assert env == {
        "FAIRSYNERGY_BROKER": "mqtt://b",
        "FAIRSYNERGY_FLEET": FLEET,
        "FAIRSYNERGY_AGENT": AGENT,
        "FAIRSYNERGY_EPOCH": "9",
        "FAIRSYNERGY_TS": "100.0",
        "FAIRSYNERGY_CLOUD_COMPUTE": "0.5",
        "FAIRSYNERGY_CLOUD_DATA_LABELS": "2",
        "FAIRSYNERGY_PRICE_COMPUTE": "0.1",
        "FAIRSYNERGY_EXPECTED_ACCURACY": "0.9",
    }


def test_edge_cli_parses_resource_amounts() -> None:
    """Test --local/--cloud values: pairs, spaces, empty."""
    assert amounts("compute=1, data=0.5") == {"compute": 1.0, "data": 0.5}
    assert amounts("") == {}
    assert amounts("compute=2,") == {"compute": 2.0}
