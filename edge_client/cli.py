"""The ``fairsynergy-edge`` command: the edge client for shell scripts and any language.

Three subcommands, each a thin layer over :class:`EdgeClient`:

- ``report`` sends one telemetry message and waits for the broker's PUBACK;
- ``watch`` prints each new allocation as a JSON line, and can run a command
  on every change;
- ``pipe`` reads telemetry as JSON lines on stdin and prints allocations as
  JSON lines on stdout, so a program in any language can be an agent.

Deliberate errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, TypeAlias

import schemas
from edge_client.allocation import Allocation
from edge_client.client import DEFAULT_BUFFER_SIZE, EdgeClient
from edge_client.errors import EdgeError
from schemas import ContractError, MessageError

PROG = "fairsynergy-edge"
ENV = "FAIRSYNERGY_"
DEFAULT_BROKER = "mqtt://localhost"
DEFAULT_TIMEOUT_S = 10.0
# Fields a pipe input line may carry; anything else is refused, so that a
# misspelt field is reported instead of silently left out.
PIPE_FIELDS = {"accuracy", "local", "cloud", "load", "model", "epoch", "ts"}
PIPE_REQUIRED = {"accuracy", "local", "cloud"}

DESCRIPTION = """\
The device side of fairsynergy over MQTT: report how well this agent's model
does with the resources it has, and learn what cloud share the controller
grants it. Settings may also come from FAIRSYNERGY_BROKER, FAIRSYNERGY_FLEET,
FAIRSYNERGY_AGENT, FAIRSYNERGY_USERNAME, FAIRSYNERGY_PASSWORD_FILE and
FAIRSYNERGY_CA_FILE.
"""

EPILOG = """\
examples:
  fairsynergy-edge report --fleet demo --agent robot-1 \\
      --accuracy 0.81 --local compute=1,data=0.5 --cloud compute=0.25
  fairsynergy-edge watch --fleet demo --agent robot-1 \\
      --exec 'echo "compute is now $FAIRSYNERGY_CLOUD_COMPUTE"'
  my-model | fairsynergy-edge pipe --fleet demo --agent robot-1 | my-scaler
"""

REPORT_EPILOG = """\
Sends one telemetry message and exits 0 once the broker acknowledged it; exits
2 with one line on stderr if the broker is unreachable or refuses it within
--timeout. It does not touch the agent's online/offline status, so it can run
next to `watch`. --epoch is the allocation epoch in use when the accuracy was
measured (FAIRSYNERGY_EPOCH under `watch --exec`); without it, null.

examples:
  fairsynergy-edge report --broker mqtts://broker.example:8883 --ca-file ca.crt \\
      --fleet demo --agent robot-1 --accuracy 0.81 \\
      --local compute=1,data=0.5 --cloud compute=0.25 --load 12 --model resnet18
  fairsynergy-edge report --accuracy 0.77 --local compute=1 --cloud compute=0 \\
      --epoch "$FAIRSYNERGY_EPOCH"
"""

WATCH_EPILOG = """\
Prints every new allocation as one JSON line (the allocation message) and
keeps running until interrupted. With --exec, CMD runs through /bin/sh after
each change, with the allocation JSON on stdin and these variables set:
FAIRSYNERGY_EPOCH, FAIRSYNERGY_TS, FAIRSYNERGY_CLOUD_<RESOURCE> (for example
FAIRSYNERGY_CLOUD_COMPUTE), FAIRSYNERGY_PRICE_<RESOURCE>,
FAIRSYNERGY_EXPECTED_ACCURACY and FAIRSYNERGY_EXPIRES when the allocation has
them, plus FAIRSYNERGY_BROKER, _FLEET and _AGENT so CMD can call `report`. If
allocations arrive while CMD runs, it runs once more, with the newest.

examples:
  fairsynergy-edge watch --fleet demo --agent robot-1
  fairsynergy-edge watch --fleet demo --agent robot-1 --count 1   # current, then exit
  fairsynergy-edge watch --fleet demo --agent robot-1 \\
      --exec 'systemctl set-property my-model.service CPUQuota=$(( \\
              ${FAIRSYNERGY_CLOUD_COMPUTE%.*} * 100 ))%'
"""

PIPE_EPILOG = """\
Reads one JSON object per line on stdin:
  {"accuracy": 0.81, "local": {"compute": 1}, "cloud": {"compute": 0.25},
   "load": 12, "model": "resnet18"}
(load, model, epoch and ts optional; epoch defaults to the allocation held).
Prints every new allocation as one JSON line on stdout. A bad input line gets
a JSON error line on stderr ({"error": ..., "reason": ..., "field": ...,
"line": N}) and the pipe goes on; log lines on stderr are JSON too. At end of
input it delivers what it can, says offline and exits: 0 when every report
was delivered, 1 when some were dropped (counted on stderr).

example:
  python my_agent.py | fairsynergy-edge pipe --fleet demo --agent robot-1 \\
      --state-file /var/lib/my-agent/edge-state.json
"""


class UsageError(EdgeError):
    """A command-line value that cannot be used; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: three subcommands sharing the connection options."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = connection_options()
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for register in (add_report, add_watch, add_pipe):
        register(commands, common)
    return parser


def connection_options() -> argparse.ArgumentParser:
    """Options every subcommand takes, with defaults from the environment."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--broker",
        metavar="URL",
        default=os.environ.get(f"{ENV}BROKER", DEFAULT_BROKER),
        help="mqtt://host[:1883] or mqtts://host[:8883] (default: %(default)s)",
    )
    group.add_argument("--fleet", metavar="ID", default=from_env("FLEET"))
    group.add_argument("--agent", metavar="ID", default=from_env("AGENT"))
    group.add_argument(
        "--username", metavar="NAME", default=from_env("USERNAME"), help="broker user"
    )
    group.add_argument(
        "--password-file",
        metavar="PATH",
        default=from_env("PASSWORD_FILE"),
        help="file whose first line is the broker password",
    )
    group.add_argument(
        "--ca-file",
        metavar="PATH",
        default=from_env("CA_FILE"),
        help="CA certificates to verify an mqtts:// broker (default: the system's)",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="how long to wait for the broker (default: %(default)s)",
    )
    group.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (twice: debug)"
    )
    return common


def from_env(name: str) -> str | None:
    return os.environ.get(f"{ENV}{name}") or None


Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_report(commands: Commands, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "report",
        parents=[common],
        help="send one telemetry message and wait for the broker to take it",
        description="Send one telemetry message.",
        epilog=REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--accuracy", metavar="X", type=float, required=True, help="measured, 0..1"
    )
    parser.add_argument(
        "--local",
        metavar="R=A,...",
        type=amounts,
        required=True,
        help="resources on board, e.g. compute=1,data=0.5",
    )
    parser.add_argument(
        "--cloud",
        metavar="R=A,...",
        type=amounts,
        required=True,
        help="cloud resources actually used, e.g. compute=0.25",
    )
    parser.add_argument("--load", metavar="X", type=float, help="work served")
    parser.add_argument("--model", metavar="LABEL", help="model label, e.g. resnet18")
    parser.add_argument("--epoch", metavar="N", type=int, help="allocation in use")
    parser.add_argument("--state-file", metavar="PATH", help="keeps seq increasing")
    parser.set_defaults(handler=run_report)


def add_watch(commands: Commands, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "watch",
        parents=[common],
        help="print each new allocation as a JSON line; optionally run a command",
        description="Print each new allocation of this agent as a JSON line.",
        epilog=WATCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--exec", dest="command_line", metavar="CMD", help="run CMD on every change"
    )
    parser.add_argument("--count", metavar="N", type=int, help="exit after N")
    parser.add_argument("--model", metavar="LABEL", help="model label for the status")
    parser.set_defaults(handler=run_watch)


def add_pipe(commands: Commands, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "pipe",
        parents=[common],
        help="telemetry as JSON lines on stdin, allocations as JSON lines on stdout",
        description="Bridge JSON lines to the fleet: telemetry in, allocations out.",
        epilog=PIPE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", metavar="LABEL", help="default model label")
    parser.add_argument(
        "--buffer-size",
        metavar="N",
        type=int,
        default=DEFAULT_BUFFER_SIZE,
        help="reports held while the broker is away (default: %(default)s)",
    )
    parser.add_argument("--state-file", metavar="PATH", help="keeps seq increasing")
    parser.set_defaults(handler=run_pipe)


def amounts(text: str) -> dict[str, float]:
    """Parse ``compute=1,data=0.5`` (empty text: no resources)."""
    result: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, equals, value = item.partition("=")
        try:
            schemas.check_resource(name.strip())
            result[name.strip()] = float(value)
        except (ContractError, ValueError) as error:
            reason = error if equals else "expected NAME=AMOUNT"
            raise argparse.ArgumentTypeError(f"{item!r}: {reason}") from None
    return result


# -- report -----------------------------------------------------------------


def run_report(args: argparse.Namespace) -> int:
    client = make_client(
        args,
        presence=False,
        session_expiry=0,
        client_id=f"fairsynergy:{args.fleet}:{args.agent}:report:{os.getpid()}",
        state_file=args.state_file,
        model=args.model,
    )
    # Report first: a bad value fails here, before any network wait.
    client.report(
        accuracy=args.accuracy,
        local=args.local,
        cloud=args.cloud,
        load=args.load,
        epoch=args.epoch,
    )
    try:
        client.connect(args.timeout)
        client.flush(args.timeout)
    except EdgeError:
        client.close(timeout=0)
        raise
    client.close(timeout=args.timeout)
    if client.dropped:
        raise EdgeError(
            f"broker {client.address.url} refused the report (-v shows its reason)"
        )
    return 0


# -- watch ------------------------------------------------------------------


def run_watch(args: argparse.Namespace) -> int:
    updates: queue.Queue[Allocation] = queue.Queue()
    client = make_client(args, on_allocation=updates.put, model=args.model)
    stop = stop_on_signals()
    seen = 0

    # Unlike pipe, which buffers until the broker appears, watch has nothing
    # to do without it: fail fast on a wrong address, then ride out outages.
    try:
        client.connect(args.timeout)
    except EdgeError:
        client.close(timeout=0)
        raise
    with client:
        while not stop.is_set() and (args.count is None or seen < args.count):
            batch = list(drain(updates, wait=0.2))
            for allocation in batch:
                print_line(sys.stdout, dict(allocation.message))
            seen += len(batch)
            if batch and args.command_line:
                run_hook(args, batch[-1])
    return 0


def drain(updates: queue.Queue[Allocation], wait: float) -> Iterator[Allocation]:
    """Everything queued now, after waiting up to ``wait`` s for the first."""
    try:
        yield updates.get(timeout=wait)
    except queue.Empty:
        return
    while True:
        try:
            yield updates.get_nowait()
        except queue.Empty:
            return


def run_hook(args: argparse.Namespace, allocation: Allocation) -> None:
    """Run --exec with the allocation on stdin and in the environment."""
    done = subprocess.run(
        ["/bin/sh", "-c", args.command_line],
        input=json.dumps(dict(allocation.message)) + "\n",
        text=True,
        env={**os.environ, **hook_environment(args, allocation)},
        check=False,
    )
    if done.returncode != 0:
        logging.getLogger(PROG).warning(
            "--exec exited with status %d for epoch %d",
            done.returncode,
            allocation.epoch,
        )


def hook_environment(
    args: argparse.Namespace, allocation: Allocation
) -> dict[str, str]:
    """FAIRSYNERGY_* variables describing ``allocation`` and the connection."""
    env = {
        f"{ENV}BROKER": args.broker,
        f"{ENV}FLEET": args.fleet,
        f"{ENV}AGENT": args.agent,
        f"{ENV}EPOCH": str(allocation.epoch),
        f"{ENV}TS": repr(allocation.ts),
    }
    env |= {
        f"{ENV}CLOUD_{name.upper()}": repr(v) for name, v in allocation.cloud.items()
    }
    env |= {
        f"{ENV}PRICE_{name.upper()}": repr(v)
        for name, v in (allocation.prices or {}).items()
    }
    optional = {
        "EXPECTED_ACCURACY": allocation.expected_accuracy,
        "EXPIRES": allocation.expires,
        "USERNAME": args.username,
        "PASSWORD_FILE": args.password_file,
        "CA_FILE": args.ca_file,
    }
    env |= {f"{ENV}{name}": str(v) for name, v in optional.items() if v is not None}
    return env


# -- pipe -------------------------------------------------------------------


def run_pipe(args: argparse.Namespace) -> int:
    output = threading.Lock()

    def show(allocation: Allocation) -> None:
        with output:
            print_line(sys.stdout, dict(allocation.message))

    client = make_client(
        args,
        on_allocation=show,
        model=args.model,
        buffer_size=args.buffer_size,
        state_file=args.state_file,
    )
    # SIGTERM ends the pipe like end of input: deliver, say offline, exit.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    with client:
        for number, line in enumerate(sys.stdin, start=1):
            if line.strip():
                pipe_line(client, line, number, output)
    if client.dropped:
        logging.getLogger(PROG).warning(
            "%d of %d reports were not delivered",
            client.dropped,
            client.stats.reported,
        )
        return 1
    return 0


def pipe_line(
    client: EdgeClient, line: str, number: int, output: threading.Lock
) -> None:
    """Report one input line, or explain on stderr why not."""
    try:
        client.report(**pipe_fields(line))
    except json.JSONDecodeError as error:
        problem: dict[str, Any] = {
            "error": f"telemetry: not JSON ({error})",
            "reason": "not_json",
            "field": None,
        }
    except MessageError as error:
        problem = {"error": str(error), "reason": error.reason, "field": error.field}
    except (TypeError, ValueError) as error:
        # A value report() could not even put into a message.
        problem = {"error": f"telemetry: {error}", "reason": "schema", "field": None}
    else:
        return
    with output:
        print_line(sys.stderr, {**problem, "line": number})


def pipe_fields(line: str) -> dict[str, Any]:
    """The report() arguments in one input line, with the fields checked by name."""
    fields = json.loads(line)
    if not isinstance(fields, dict):
        raise MessageError("telemetry", "schema", "telemetry: a line must be an object")
    missing = sorted(PIPE_REQUIRED - set(fields))
    if missing:
        raise MessageError(
            "telemetry",
            "schema",
            f"telemetry: {missing[0]} is required",
            field=missing[0],
        )
    unknown = sorted(set(fields) - PIPE_FIELDS)
    if unknown:
        allowed = ", ".join(sorted(PIPE_FIELDS))
        raise MessageError(
            "telemetry",
            "schema",
            f"telemetry: {unknown[0]} is not allowed here (allowed: {allowed})",
            field=unknown[0],
        )
    return fields


class JsonLines(logging.Formatter):
    """Log records as JSON lines, so everything ``pipe`` writes can be parsed."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {"level": record.levelname.lower(), "log": record.getMessage()}
        )


# -- shared -----------------------------------------------------------------


def make_client(args: argparse.Namespace, **options: Any) -> EdgeClient:
    """An EdgeClient from the connection options (not started)."""
    if not args.fleet or not args.agent:
        raise UsageError(
            "--fleet and --agent are required (or FAIRSYNERGY_FLEET/_AGENT)"
        )
    return EdgeClient(
        args.broker,
        args.fleet,
        args.agent,
        username=args.username,
        password=read_password(args.password_file),
        ca_file=args.ca_file,
        logger=logging.getLogger(PROG),
        **options,
    )


def read_password(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise UsageError(
            f"cannot read password file {path}: {error.strerror}"
        ) from None
    return lines[0] if lines else ""


def print_line(stream: TextIO, value: dict[str, Any]) -> None:
    stream.write(json.dumps(value, separators=(",", ":")) + "\n")
    stream.flush()


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM, so the command can close cleanly."""
    stop = threading.Event()

    def handle(number: int, frame: FrameType | None) -> None:
        stop.set()

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, handle)
    return stop


def configure_logging(args: argparse.Namespace) -> None:
    """The command's own logging: stderr, WARNING unless -v; JSON for pipe."""
    handler = logging.StreamHandler(sys.stderr)
    if args.command == "pipe":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter(f"{PROG} {args.command}: %(message)s"))
    # One-shot report answers with its exit status and one error line;
    # the long-running commands also warn about outages and dropped data.
    quiet = logging.ERROR if args.command == "report" else logging.WARNING
    levels = {0: quiet, 1: logging.INFO}
    logger = logging.getLogger(PROG)
    logger.handlers = [handler]
    logger.setLevel(levels.get(args.verbose, logging.DEBUG))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (EdgeError, ContractError) as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
