"""The ``fairsynergy`` command: controller-side tools.

Each subcommand is a small function that parses its own arguments and calls
into the library; errors derived from :class:`FairsynergyError` become a
one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from controller.errors import FairsynergyError

Handler = Callable[[argparse.Namespace], int]

DESCRIPTION = """\
Share a finite cloud pool (compute, data, ...) across a fleet of ML devices so
that accuracy is maximised fairly (alpha-fair), learning each device's
accuracy curve online from its telemetry.
"""

EPILOG = """\
examples:
  fairsynergy demo                         local broker, controller and fleet
  fairsynergy allocate fleet.json          solve one allocation problem
  fairsynergy allocate - --alpha inf       read the instance from stdin
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairsynergy",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for register in (add_allocate, add_demo):
        register(commands)
    return parser


def add_allocate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "allocate",
        help="solve one allocation instance and print the result as JSON",
        description="Read an instance (JSON) and print the allocation as one "
        "JSON object on stdout.",
    )
    parser.add_argument("instance", help="instance JSON file, or - for stdin")
    parser.add_argument(
        "--policy",
        default="fair",
        choices=["fair", "uniform", "random", "equal-totals", "sequential"],
        help="allocation policy (default: fair)",
    )
    parser.add_argument(
        "--alpha", help="fairness: a number >= 0 or 'inf' (overrides the instance)"
    )
    parser.add_argument("--seed", type=int, help="seed for the random policy")
    parser.set_defaults(handler=run_allocate)


def run_allocate(args: argparse.Namespace) -> int:
    raise FairsynergyError("allocate is not built yet")


def add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "demo",
        help="run a local broker, the controller and a simulated fleet",
        description="Start a local Mosquitto, the controller and a simulated "
        "fleet, show the allocations live and end with a summary.",
    )
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    raise FairsynergyError("demo is not built yet")


# The controller's dependencies: if one is missing, this is a device install.
CONTROLLER_MODULES = {"numpy", "scipy", "river", "sqlite_utils", "structlog", "rich"}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except FairsynergyError as error:
        return fail(args.command, str(error))
    except ModuleNotFoundError as error:
        if error.name not in CONTROLLER_MODULES:
            raise
        return fail(
            args.command,
            f"this command needs the controller install ({error.name} is missing): "
            "pip install 'fairsynergy[controller]'",
        )


def fail(command: str, message: str) -> int:
    print(f"fairsynergy {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
