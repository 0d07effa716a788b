"""The ``fairsynergy`` command: controller-side tools.

Each subcommand is a small function that parses its own arguments and calls
into the library; errors derived from :class:`FairsynergyError` become a
one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

from controller.errors import FairsynergyError

Handler = Callable[[argparse.Namespace], int]
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

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
  fairsynergy simulate --agents 100 --json learn and allocate, simulated fleet
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
    for register in (
        add_controller,
        add_budget,
        add_status,
        add_demo,
        add_allocate,
        add_simulate,
        add_provision,
    ):
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
    import json

    from controller.allocate import allocate
    from controller.problem import load_instance, parse_alpha

    problem = load_instance(args.instance)
    if args.alpha is not None:
        problem = problem.with_alpha(parse_alpha(args.alpha))
    result = allocate(problem, args.policy, seed=args.seed)
    print(json.dumps(result.to_json(), allow_nan=False))
    return 0


def add_broker_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """The flags every command that talks to the broker shares."""
    parser.add_argument(
        "--broker",
        required=required,
        help="broker URL: mqtt://host[:1883] or mqtts://host[:8883]",
    )
    parser.add_argument("--username", help="broker user name")
    parser.add_argument(
        "--password-file", type=Path, help="file holding the broker password"
    )
    parser.add_argument(
        "--ca-file", type=Path, help="CA certificate to trust for mqtts://"
    )


def add_controller(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "controller",
        help="run the controller daemon for one fleet",
        description="Learn every agent's utility from its telemetry and publish "
        "fair allocations of the budget, until SIGTERM or SIGINT. Settings come "
        "from --config (see deploy/controller.toml) and FAIRSYNERGY_* variables.",
    )
    add_broker_flags(parser, required=True)
    parser.add_argument("--fleet", required=True, help="fleet id")
    parser.add_argument(
        "--db", required=True, type=Path, help="SQLite state file (created if new)"
    )
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="lowest level logged (default: info)",
    )
    parser.set_defaults(handler=lazy("controller.operate", "run_controller"))


def add_budget(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "budget",
        help="publish the fleet's budget (and alpha)",
        description="Publish the retained budget the controller shares, e.g. "
        "`fairsynergy budget --broker mqtt://localhost --fleet demo compute=10 "
        "data=4 --alpha 1`.",
    )
    add_broker_flags(parser, required=True)
    parser.add_argument("--fleet", required=True, help="fleet id")
    parser.add_argument(
        "amounts", nargs="+", metavar="RESOURCE=AMOUNT", help="pool per resource"
    )
    parser.add_argument("--alpha", help="fairness: a number >= 0 or 'inf'")
    parser.set_defaults(handler=lazy("controller.operate", "run_budget"))


def add_status(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "status",
        help="show the epoch, budget, prices, allocations and fits",
        description="Read the fleet's state from the controller's database "
        "(--db, includes fitted parameters) or from the broker's retained "
        "fleet summary (--broker and --fleet).",
    )
    parser.add_argument("--db", type=Path, help="the controller's state file")
    parser.add_argument("--fleet", help="fleet id (with --broker)")
    add_broker_flags(parser, required=False)
    parser.add_argument("--json", action="store_true", help="one line of JSON")
    parser.set_defaults(handler=lazy("controller.operate", "run_status"))


def lazy(module: str, function: str) -> Handler:
    """A handler imported only when its command runs, so --help stays fast."""

    def handler(args: argparse.Namespace) -> int:
        run: Handler = getattr(importlib.import_module(module), function)
        return run(args)

    return handler


def add_demo(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "demo",
        help="run a local broker, the controller and a simulated fleet",
        description="Start a private Mosquitto, the controller daemon and a "
        "simulated fleet of devices that report over MQTT; show allocations, "
        "fitted against true elasticities and fleet accuracy against the oracle "
        "live, and end with a summary. Needs no arguments.",
    )
    parser.add_argument("--agents", type=int, default=12, help="devices (default 12)")
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds to run (default 60)"
    )
    parser.add_argument(
        "--alpha", type=float, default=1.0, help="fairness alpha (default 1)"
    )
    parser.add_argument(
        "--noise", type=float, default=0.02, help="measurement noise (default 0.02)"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed (default 7)")
    parser.set_defaults(handler=lazy("controller.demo", "run_demo"))


def add_simulate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "simulate",
        help="run the learning controller against a simulated fleet",
        description="Closed loop without a broker: simulated agents with hidden "
        "true curves report noisy accuracies, the controller learns and "
        "allocates (exploring), and every round is scored with the true "
        "curves next to the oracle that knows them.",
    )
    parser.add_argument("--agents", type=int, default=100, help="fleet size")
    parser.add_argument(
        "--resources", default="compute,data", help="comma-separated, 1 to 3"
    )
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument(
        "--noise", type=float, default=0.02, help="multiplicative accuracy noise sd"
    )
    parser.add_argument("--alpha", default="1", help="fairness: >= 0 or 'inf'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--budget", type=float, default=1.0, help="pool per agent and resource"
    )
    parser.add_argument(
        "--drift",
        action="append",
        default=[],
        metavar="ROUND:FRACTION",
        help="at ROUND, give FRACTION of agents a new true curve (repeatable)",
    )
    parser.add_argument(
        "--churn", type=float, default=0.0, help="per-round chance an agent is replaced"
    )
    parser.add_argument(
        "--policy",
        default="fair",
        choices=["fair", "uniform", "random", "equal-totals", "sequential"],
        help="allocation policy of the controller (default: fair)",
    )
    parser.add_argument(
        "--no-explore", action="store_true", help="allocate at the estimates only"
    )
    parser.add_argument(
        "--max-cost",
        type=float,
        default=0.005,
        help="largest estimated accuracy loss exploration may cost (fraction)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON line per round")
    parser.set_defaults(handler=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    from controller.simulate import run_command

    return run_command(args, sys.stdout)


def add_provision(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = commands.add_parser(
        "provision",
        help="create or rotate a broker account and print what the device needs",
        description="Give an agent (or the controller, or the operator) a new "
        "random password: its hash goes into the Mosquitto password file, the "
        "password into OUT/NAME.password (mode 0600). Then reload Mosquitto.",
    )
    parser.add_argument(
        "name",
        nargs="?",
        help="agent id = username (for --role controller/operator: the role name)",
    )
    parser.add_argument(
        "--password-file",
        type=Path,
        required=True,
        help="Mosquitto password file to update (created if missing)",
    )
    parser.add_argument(
        "--role", choices=["agent", "controller", "operator"], default="agent"
    )
    parser.add_argument("--fleet", help="fleet id, for the printed command line")
    parser.add_argument("--broker", help="broker URL the device uses (mqtts://...)")
    parser.add_argument(
        "--ca-file",
        default="/etc/fairsynergy/ca.crt",
        help="where the device finds the CA certificate (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(),
        help="directory for NAME.password and NAME.env (default: current)",
    )
    parser.add_argument(
        "--rotate",
        action="store_true",
        help="replace the password of an existing account",
    )
    parser.add_argument("--mosquitto-passwd", help="path of mosquitto_passwd")
    parser.set_defaults(handler=run_provision)


def run_provision(args: argparse.Namespace) -> int:
    from controller.provision import Account, instructions, provision, username_for

    account = Account(
        username_for(args.role, args.name),
        role=args.role,
        fleet=args.fleet,
        broker=args.broker,
        ca_file=args.ca_file,
    )
    result = provision(
        account,
        args.password_file,
        args.out,
        rotate=args.rotate,
        mosquitto_passwd=args.mosquitto_passwd,
    )
    print(instructions(result, args.password_file))
    return 0


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
