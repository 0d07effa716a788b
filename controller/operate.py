"""What operators run: the daemon itself, budget changes, and status.

These are the bodies of ``fairsynergy controller``, ``fairsynergy budget`` and
``fairsynergy status``; :mod:`controller.cli` only parses their flags.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import queue
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import structlog

import schemas
from controller.broker import (
    BrokerError,
    BrokerOptions,
    connect,
    make_client,
    publish,
)
from controller.config import ControllerConfig, load_config
from controller.daemon import Controller
from controller.errors import FairsynergyError
from controller.logs import configure_logging
from controller.metrics import ControllerMetrics
from controller.publisher import SUMMARY_MAX_BYTES
from controller.store import Retention, Store
from schemas import ContractError, Kind, Topics

# How long `fairsynergy status --broker` waits for the retained messages.
STATUS_WAIT_S = 3.0
SECONDS_PER_DAY = 86400.0


def broker_options(args: argparse.Namespace) -> BrokerOptions:
    return BrokerOptions(
        url=args.broker,
        username=args.username,
        password_file=args.password_file,
        ca_file=args.ca_file,
    )


def open_store(path: Path, fleet: str, config: ControllerConfig) -> Store:
    retention = Retention(
        telemetry_per_agent=config.telemetry_retention_rows,
        telemetry_max_age=config.telemetry_retention_days * SECONDS_PER_DAY,
    )
    return Store(
        path,
        fleet=fleet,
        retention=retention,
        logger=structlog.get_logger("fairsynergy.store"),
    )


SWITCH_INTERVAL_S = 0.0005

# The cyclic garbage collector's thresholds (allocations before a young
# collection; young collections before a middle one; middle before a full
# one). The daemon holds millions of long-lived objects for a large fleet
# (a learner, a ledger entry and an agent record each), and Python's
# defaults (700, 10, 10) scan them so often that at 10,000 agents
# collection took a third of every cycle and a fifth of every report's
# handling. The loop makes little cyclic garbage, so collecting more rarely
# costs a little memory only.
GC_THRESHOLDS = (10_000, 50, 50)


def run_controller(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM or SIGINT."""
    config = load_config(args.config, os.environ)
    configure_logging(args.log_level)
    check_fleet(args.fleet)
    log = structlog.get_logger("fairsynergy.controller").bind(fleet=args.fleet)
    metrics = ControllerMetrics()
    if config.metrics_port:
        try:
            metrics.serve(config.metrics_port, config.metrics_host)
        except OSError as error:
            raise FairsynergyError(
                f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: "
                f"{error.strerror} (set metrics_port = 0 to turn them off)"
            ) from None

    # paho's network thread gives up the interpreter lock at every socket
    # read and then waits for the loop thread to hand it back; the default
    # 5 ms switch interval starves it under load. A shorter one lets it read
    # as fast as the loop handles (bench/bench_controller.py).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.set_threshold(*GC_THRESHOLDS)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    store = open_store(args.db, args.fleet, config)
    controller = Controller(
        args.fleet, store, broker_options(args), config, logger=log, metrics=metrics
    )
    controller.run(stop)
    return 0


def controller_command(broker: str, fleet: str, db: Path, config: Path) -> list[str]:
    """The command line that runs the daemon in a process of its own."""
    return [
        sys.executable,
        "-m",
        "controller.cli",
        "controller",
        "--broker",
        broker,
        "--fleet",
        fleet,
        "--db",
        str(db),
        "--config",
        str(config),
    ]


def parse_amounts(pairs: list[str]) -> dict[str, float]:
    """``["compute=10", "data=4"]`` -> ``{"compute": 10.0, "data": 4.0}``."""
    amounts: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            amount = float(value) if sep else math.nan
        except ValueError:
            amount = math.nan
        if not (math.isfinite(amount) and amount >= 0):
            raise FairsynergyError(
                f"budget entry {pair!r} is not RESOURCE=AMOUNT with a finite "
                "amount >= 0 (for example compute=10)"
            )
        amounts[name] = amount
    return amounts


def run_budget(args: argparse.Namespace) -> int:
    """Publish the retained budget (and alpha) the controller will share."""
    check_fleet(args.fleet)
    alpha = None if args.alpha is None else parse_alpha(args.alpha)
    try:
        message = schemas.budget(resources=parse_amounts(args.amounts), alpha=alpha)
    except ContractError as error:
        raise FairsynergyError(str(error)) from None

    client = make_client(broker_options(args), client_id="")
    connect(client)
    try:
        publish(
            client,
            Topics(args.fleet).budget,
            schemas.encode(Kind.BUDGET, message),
            retain=True,
            wait=10.0,
        )
    finally:
        client.disconnect()
        client.loop_stop()
    print(json.dumps(message))
    return 0


def run_status(args: argparse.Namespace) -> int:
    """Print the fleet's state from the database, or from the broker."""
    if args.db is None and args.broker is None:
        raise FairsynergyError(
            "give --db PATH (state file) or --broker URL --fleet NAME"
        )
    status = status_from_db(args.db) if args.db else status_from_broker(args)
    print(json.dumps(status, indent=None if args.json else 2, sort_keys=True))
    return 0


def status_from_db(path: Path) -> dict[str, Any]:
    """Epoch, budget, allocations and fits as the state file holds them."""
    if not path.exists():
        raise FairsynergyError(f"state file {path} does not exist")
    with Store(path, read_only=True) as store:
        summary = store.status()
        latest = store.latest_allocation() or {}
        budget = store.latest_budget()
        fits = {
            agent: fitted_parameters(state)
            for agent, state in store.learner_states().items()
        }
    agents = {
        agent: share | {"fit": fits.get(agent)}
        for agent, share in latest.get("agents", {}).items()
    }
    return {
        "source": "database",
        "fleet": summary["fleet"],
        "epoch": summary["last_epoch"],
        "budget": budget["resources"] if budget else None,
        "alpha": schemas.alpha_to_wire(budget["alpha"]) if budget else None,
        "prices": latest.get("prices"),
        "trigger": latest.get("trigger"),
        "agents": agents,
        "presence": summary["agents"],
        "rows": summary["rows"],
    }


def fitted_parameters(state: dict[str, Any]) -> dict[str, Any] | None:
    """Scale, elasticities and confidence from one agent's saved learner state."""
    from controller.learn import UtilityLearner

    try:
        learner = UtilityLearner.from_state(state["learner"])
    except (KeyError, TypeError, ValueError, FairsynergyError):
        return None
    return {
        "scale": learner.scale,
        "elasticity": learner.elasticity,
        "uncertainty": learner.uncertainty,
        "confident": learner.confident,
        "samples": learner.n_samples,
    }


def status_from_broker(args: argparse.Namespace) -> dict[str, Any]:
    """The retained fleet summary and controller status, read from the broker."""
    if args.fleet is None:
        raise FairsynergyError("--broker needs --fleet NAME")
    topics = Topics(check_fleet(args.fleet))
    received: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client = make_client(broker_options(args), client_id="")
    client.on_message = lambda _c, _u, m: received.put((m.topic, bytes(m.payload)))
    connect(client)
    wanted = {topics.allocations: Kind.FLEET_SUMMARY}
    wanted[topics.controller_status] = Kind.CONTROLLER_STATUS
    for topic in wanted:
        client.subscribe(topic, qos=1)
    found: dict[str, Any] = {}
    try:
        while len(found) < len(wanted):
            topic, payload = received.get(timeout=STATUS_WAIT_S)
            found[topic] = schemas.decode(
                wanted[topic], payload, max_bytes=SUMMARY_MAX_BYTES
            )
    except queue.Empty:
        pass
    except ContractError as error:
        raise FairsynergyError(f"retained message is invalid: {error}") from None
    finally:
        client.disconnect()
        client.loop_stop()
    summary = found.get(topics.allocations)
    if summary is None:
        raise BrokerError(f"no fleet summary retained on {topics.allocations}")
    controller = found.get(topics.controller_status, {})
    return {"source": "broker", "controller": controller.get("state"), **summary}


def check_fleet(fleet: str) -> str:
    try:
        return schemas.check_id(fleet, "fleet id")
    except ContractError as error:
        raise FairsynergyError(str(error)) from None


def parse_alpha(value: str) -> float:
    from controller.config import ConfigError, parse_alpha_setting

    try:
        return parse_alpha_setting(value)
    except ConfigError as error:
        raise FairsynergyError(f"--alpha: {error}") from None
