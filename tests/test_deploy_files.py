"""The deployment files agree with each other, with the code and with their tools.

Nothing here starts a service: systemd, Docker and Compose are not available
on every test machine. What can be checked without them is: the Mosquitto
configuration's security settings, that the ACL names the accounts that
``fairsynergy provision`` makes, that the units pass ``systemd-analyze verify``
(where it exists) and run command lines the CLIs accept, that every file the
units, the Dockerfile and compose.yaml refer to is where they look, and that
the controller's dependencies run under MemoryDenyWriteExecute.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import schemas
from controller import provision

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MOSQUITTO_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
ACL = DEPLOY / "mosquitto" / "acl"
SYSTEMD = DEPLOY / "systemd"
CONTROLLER_UNIT = SYSTEMD / "fairsynergy-controller.service"
EDGE_UNIT = SYSTEMD / "fairsynergy-edge@.service"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"


# --- mosquitto.conf and the ACL --------------------------------------------------


def directives(path: Path) -> list[tuple[str, str]]:
    """(name, value) of each directive of a Mosquitto file, comments left out."""
    found = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.strip().partition(" ")
            found.append((name, value.strip()))
    return found


def test_deploy_broker_listens_only_with_tls() -> None:
    """The one listener is TLS on 8883 with a key, a certificate and TLS >= 1.2."""
    settings = directives(MOSQUITTO_CONF)
    listeners = [value for name, value in settings if name == "listener"]
    after_listener = dict(settings[[n for n, _ in settings].index("listener") :])

    assert listeners == ["8883"]
    assert {"certfile", "keyfile", "cafile"} <= after_listener.keys()
    assert after_listener["tls_version"] in {"tlsv1.2", "tlsv1.3"}
    assert "port" not in dict(settings)  # the deprecated default listener


def test_deploy_broker_requires_accounts_and_limits_messages() -> None:
    """Logins, the ACL, the contract's payload limit and persistence are on."""
    settings = dict(directives(MOSQUITTO_CONF))

    assert settings["allow_anonymous"] == "false"
    assert {"password_file", "acl_file"} <= settings.keys()
    assert int(settings["message_size_limit"]) == schemas.MAX_PAYLOAD_BYTES
    assert settings["persistence"] == "true"
    assert int(settings["max_queued_messages"]) > 0
    assert int(settings["max_inflight_messages"]) > 0
    assert re.fullmatch(r"\d+[hdwmy]", settings["persistent_client_expiration"])
    assert settings.get("per_listener_settings", "false") == "false"


def test_deploy_acl_names_the_accounts_provision_makes() -> None:
    """The ACL's user blocks are exactly the role accounts of `provision`."""
    users = {value for name, value in directives(ACL) if name == "user"}

    assert users == set(provision.ROLE_USERNAMES.values())


def test_deploy_acl_lines_are_well_formed_and_grant_nothing_anonymous() -> None:
    """Every ACL line is a user, topic or pattern line on fairsynergy/ topics."""
    seen_user = False
    for name, value in directives(ACL):
        if name == "user":
            seen_user = True
            continue
        access, _, topic = value.partition(" ")

        assert name in {"topic", "pattern"}, f"unknown ACL line: {name} {value}"
        assert access in {"read", "write", "readwrite"}, value
        assert topic.startswith("fairsynergy/"), value
        # A `topic` line before any `user` line would apply to anonymous clients.
        assert name == "pattern" or seen_user, f"anonymous grant: {value}"


def test_deploy_broker_paths_are_mounted_by_compose() -> None:
    """Every file mosquitto.conf names is a volume target of the compose broker."""
    settings = dict(directives(MOSQUITTO_CONF))
    wanted = {"password_file", "acl_file", "certfile", "keyfile", "cafile"}
    targets = {
        volume.split(":")[1] for volume in compose()["services"]["broker"]["volumes"]
    }

    for name in wanted:
        assert settings[name] in targets, f"{name} {settings[name]} is not mounted"
    assert settings["persistence_location"].rstrip("/") in targets


# --- systemd -----------------------------------------------------------------------


def unit(path: Path) -> dict[str, list[str]]:
    """A unit file as {"Section.Key": [values]}, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    parsed: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        parsed.setdefault(f"{section}.{key}", []).append(value)
    return parsed


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter": "@system-service",
    "MemoryDenyWriteExecute": "yes",
    "LockPersonality": "yes",
    "Restart": "on-failure",
    "User": "fairsynergy",
}


@pytest.mark.parametrize("path", [CONTROLLER_UNIT, EDGE_UNIT], ids=lambda p: p.name)
def test_deploy_units_are_hardened(path: Path) -> None:
    """Both units run unprivileged, sandboxed, and restart after a failure."""
    service = {
        key.removeprefix("Service."): values for key, values in unit(path).items()
    }

    for key, value in HARDENING.items():
        assert service.get(key) == [value], f"{path.name}: {key}"
    assert service["StateDirectory"][0].startswith("fairsynergy")
    assert service["ReadWritePaths"][0].startswith("/var/lib/fairsynergy")
    assert "RestartSec" in service


def test_deploy_sysusers_creates_the_units_account() -> None:
    """deploy/systemd/fairsynergy.sysusers creates the account the units run as."""
    lines = [
        line.split()
        for line in (SYSTEMD / "fairsynergy.sysusers").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    assert [line[:2] for line in lines] == [["u", "fairsynergy"]]


def test_deploy_units_read_the_files_provision_writes() -> None:
    """Units load the secrets and environment where `provision` says to put them."""
    edge, controller = unit(EDGE_UNIT), unit(CONTROLLER_UNIT)
    device_secret = provision.DEVICE_SECRET.format(username="%i")

    assert edge["Service.EnvironmentFile"] == ["/etc/fairsynergy/edge/%i.env"]
    assert edge["Service.LoadCredential"] == [f"password:{device_secret}"]
    assert controller["Service.LoadCredential"] == [
        f"password:{provision.CONTROLLER_SECRET}"
    ]


def env_keys(text: str) -> set[str]:
    """The variable names an environment file sets (commented ones included)."""
    return set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))


def test_deploy_env_examples_match_what_uses_them() -> None:
    """The example env files set what the units and the edge CLI read."""
    controller_needs = set(
        re.findall(r"\$\{(\w+)\}", unit(CONTROLLER_UNIT)["Service.ExecStart"][0])
    )
    edge_example = env_keys((SYSTEMD / "edge.env.example").read_text())
    written = env_keys(provision.EDGE_ENV)

    assert controller_needs <= env_keys(
        (SYSTEMD / "controller.env.example").read_text()
    )
    assert written <= edge_example
    assert "WATCH_ARGS" in edge_example
    assert "$WATCH_ARGS" in unit(EDGE_UNIT)["Service.ExecStart"][0]


def exec_argv(path: Path, instance: str = "robot-1") -> list[str]:
    """The unit's ExecStart as arguments, specifiers and ${VARS} filled in."""
    line = unit(path)["Service.ExecStart"][0]
    line = line.replace("%i", instance).replace("%d", "/run/credentials/x")
    line = re.sub(r"\$\{(\w+)\}", lambda m: f"value-of-{m.group(1)}", line)
    line = line.replace("$WATCH_ARGS", "")
    return shlex.split(line)


def test_deploy_edge_unit_runs_a_command_the_edge_cli_accepts() -> None:
    """fairsynergy-edge parses the edge unit's command line."""
    cli = pytest.importorskip("edge_client.cli")
    argv = exec_argv(EDGE_UNIT)

    args = cli.build_parser().parse_args(argv[1:])

    assert Path(argv[0]).name == "fairsynergy-edge"
    assert (args.command, args.agent, args.username) == ("watch", "robot-1", "robot-1")


def test_deploy_controller_unit_runs_a_command_the_cli_accepts() -> None:
    """`fairsynergy` parses the controller unit's command line."""
    from controller.cli import build_parser

    parser = build_parser()
    if "controller" not in subcommands(parser):
        pytest.skip("`fairsynergy controller` is not registered in controller.cli yet")
    argv = exec_argv(CONTROLLER_UNIT)

    args = parser.parse_args(argv[1:])

    assert Path(argv[0]).name == "fairsynergy"
    assert args.command == "controller"


def subcommands(parser: Any) -> set[str]:
    """Names of an argparse parser's subcommands."""
    return {
        name for action in parser._subparsers._group_actions for name in action.choices
    }


def test_deploy_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd itself loads both units without a warning."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the units are parsed above)")
    # verify insists that ExecStart= exists: point it at stand-ins.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("fairsynergy", "fairsynergy-edge"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    units = {
        "fairsynergy-controller.service": CONTROLLER_UNIT,
        "fairsynergy-edge@robot-1.service": EDGE_UNIT,
    }
    for name, source in units.items():
        text = source.read_text().replace("/opt/fairsynergy/bin/", f"{bin_dir}/")
        (tmp_path / name).write_text(text)

    done = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / name) for name in units)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""


# The compiled libraries the controller runs on; MemoryDenyWriteExecute kills the
# service if one of them needs memory that is writable and executable at once.
# The controller's own modules are pure Python and cannot.
MDWE_PROBE = """
import ctypes, mmap, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("MDWE is not in force: a writable, executable mapping was allowed")
except OSError:
    pass

import numpy, scipy.optimize, river.linear_model, sqlite_utils, structlog
import prometheus_client, rich, sqlite3, paho.mqtt.client

found = scipy.optimize.minimize(lambda x: ((x - 3) ** 2).sum(), numpy.zeros(3))
model = river.linear_model.LinearRegression()
model.learn_one({"x": 1.0}, 2.0)
sqlite3.connect(":memory:").execute("select 1").fetchone()
callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)
assert callback(1) == 2 and abs(found.x - 3).max() < 1e-4
print("ok")
"""


def test_deploy_controller_stack_runs_without_writable_executable_memory() -> None:
    """numpy, scipy, river and sqlite work with W^X memory enforced (MDWE)."""
    done = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )

    if done.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 or newer needed)")
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


# --- container and compose ---------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each Dockerfile instruction."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [
        (line.split(" ", 1)[0], line.split(" ", 1)[1])
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_deploy_image_is_slim_non_root_and_runs_the_controller() -> None:
    """python:3.12-slim, a non-root USER, `fairsynergy controller` as entrypoint."""
    steps = dockerfile()
    instructions = dict(steps)

    assert steps[0] == ("FROM", "python:3.12-slim")
    assert instructions["USER"] not in {"root", "0"}
    assert json.loads(instructions["ENTRYPOINT"]) == ["fairsynergy", "controller"]
    assert any("'.[controller]'" in args for step, args in steps if step == "RUN")


def test_deploy_image_copies_only_what_exists_and_is_not_ignored() -> None:
    """Every COPY source exists and passes the Dockerfile's .dockerignore."""
    allowed = {
        line.removeprefix("!").rstrip("/")
        for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
        if line.startswith("!")
    }
    sources = [
        source
        for step, arguments in dockerfile()
        if step == "COPY"
        for source in arguments.split()[:-1]
    ]

    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in allowed, f"{source} is excluded from the context"
    assert {"controller", "edge_client", "schemas"} <= set(sources)


def compose() -> dict[str, Any]:
    """deploy/compose.yaml, read by PyYAML if installed, else by :func:`mini_yaml`."""
    text = COMPOSE.read_text()
    parsed = mini_yaml(text)
    try:
        yaml = importlib.import_module("yaml")
    except ImportError:
        return dict(parsed)
    assert yaml.safe_load(text) == parsed, "mini_yaml misread compose.yaml"
    return dict(parsed)


def mini_yaml(text: str) -> Any:
    """Read the YAML subset compose.yaml is written in: block mappings and lists.

    Scalars are strings (quotes removed); flow collections, anchors and
    multi-line scalars are refused, so compose.yaml must keep to the subset.
    """
    lines = [
        (len(line) - len(line.lstrip(" ")), line.strip())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for _, content in lines:
        assert "\t" not in content, content
        assert not content.startswith(("{", "[", "&", "*")), content
        assert not content.endswith(("|", ">")), content
    value, end = _block(lines, 0, lines[0][0])
    assert end == len(lines), f"unparsed YAML from line {end}"
    return value


def _block(lines: list[tuple[int, str]], start: int, indent: int) -> tuple[Any, int]:
    """Parse the block at ``indent`` from ``start``; return it and where it ended."""
    is_list = lines[start][1].startswith("- ")
    items: Any = [] if is_list else {}
    index = start
    while index < len(lines) and lines[index][0] == indent:
        content = lines[index][1]
        if is_list:
            assert content.startswith("- "), content
            assert ": " not in content, content
            items.append(_scalar(content[2:]))
            index += 1
            continue
        key, _, rest = content.partition(":")
        if rest.strip():
            items[key] = _scalar(rest.strip())
            index += 1
        elif index + 1 < len(lines) and lines[index + 1][0] > indent:
            items[key], index = _block(lines, index + 1, lines[index + 1][0])
        else:
            items[key] = None
            index += 1
    assert index == len(lines) or lines[index][0] < indent, lines[index]
    return items, index


def _scalar(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def test_deploy_compose_runs_the_shipped_broker_config_and_the_image() -> None:
    """The broker gets the shipped files, the controller the Dockerfile's image."""
    services = compose()["services"]
    broker, controller = services["broker"], services["controller"]
    sources = {volume.split(":")[0] for volume in broker["volumes"]}
    build = controller["build"]

    assert broker["image"] == "eclipse-mosquitto:2"
    assert broker["ports"] == ["8883:8883"]
    assert "mosquitto -c /etc/mosquitto/mosquitto.conf" in broker["entrypoint"][-1]
    assert {"./mosquitto/mosquitto.conf", "./mosquitto/acl"} <= sources
    dockerfile_path = COMPOSE.parent / build["context"] / build["dockerfile"]
    assert dockerfile_path.resolve() == DOCKERFILE
    assert controller["read_only"] == "true"
    assert controller["cap_drop"] == ["ALL"]


def test_deploy_compose_files_exist_or_are_explained() -> None:
    """Shipped mounts exist; the ones the operator makes are named in the header."""
    services = compose()["services"]
    volumes = [v for service in services.values() for v in service["volumes"]]
    sources = [v.split(":")[0] for v in volumes if v.startswith("./")]
    sources += [s["file"] for s in compose()["secrets"].values()]
    header = COMPOSE.read_text().split("\n\n", 1)[0]

    for source in sources:
        exists = (COMPOSE.parent / source).exists()
        assert exists or source.removeprefix("./") in header, source


def test_deploy_compose_controller_command_is_one_the_cli_accepts() -> None:
    """`fairsynergy controller` parses the compose controller's command."""
    from controller.cli import build_parser

    parser = build_parser()
    if "controller" not in subcommands(parser):
        pytest.skip("`fairsynergy controller` is not registered in controller.cli yet")
    command = [
        re.sub(r"\$\{(\w+)[^}]*\}", r"value-of-\1", word)
        for word in compose()["services"]["controller"]["command"]
    ]

    args = parser.parse_args(["controller", *command])

    assert args.command == "controller"


# --- docs/deployment.md ----------------------------------------------------------


def test_deploy_docs_certificate_commands_make_a_valid_chain(tmp_path: Path) -> None:
    """The CA and broker certificate commands in the docs produce a verified pair."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    docs = (ROOT / "docs" / "deployment.md").read_text()
    after_marker = docs.split("<!-- tested by tests/test_deploy_files.py", 1)[1]
    script = after_marker.split("```sh\n", 1)[1].split("```", 1)[0]

    subprocess.run(["bash", "-euc", script], cwd=tmp_path, check=True)
    verified = subprocess.run(
        [openssl, "verify", "-x509_strict", "-CAfile", "ca.crt", "server.crt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    names = subprocess.run(
        [openssl, "x509", "-in", "server.crt", "-noout", "-ext", "subjectAltName"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )

    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "DNS:broker.example.org" in names.stdout
