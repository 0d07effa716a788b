"""Broker accounts for agents, the controller and the operator.

``fairsynergy provision`` gives one account a fresh random password, adds its
salted hash to Mosquitto's password file with ``mosquitto_passwd`` and writes
the password, readable by its owner only, to a file that goes to the device (or
the controller host). Nothing stores the password in clear on the broker.

The account's rights come from ``deploy/mosquitto/acl``: an agent's username is
its agent id, and the controller and the operator have the fixed usernames in
:data:`ROLE_USERNAMES`, which is why no agent may take those names.

The password reaches ``mosquitto_passwd`` on its standard input, not in its
arguments (``-b``), where any local user could read it from ``/proc`` while it
runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from controller.errors import FairsynergyError
from schemas import ID_PATTERN

ROLES = ("agent", "controller", "operator")

# Usernames the shipped ACL grants the controller's and the operator's rights
# to; the tests check that deploy/mosquitto/acl names exactly these.
ROLE_USERNAMES = {"controller": "controller", "operator": "operator"}

# Where the secrets go on the machine that uses them: the systemd units in
# deploy/systemd load them from there (LoadCredential=).
DEVICE_SECRET = "/etc/fairsynergy/edge/{username}.password"
CONTROLLER_SECRET = "/etc/fairsynergy/controller.password"
DEFAULT_CA_FILE = "/etc/fairsynergy/ca.crt"

# 32 random bytes (256 bits) as URL-safe text: 43 characters, none of which
# Mosquitto or a shell treats specially.
PASSWORD_BYTES = 32

# What is printed when the operator gave no broker or fleet.
BROKER_PLACEHOLDER = "mqtts://BROKER-HOST:8883"
FLEET_PLACEHOLDER = "FLEET"

# /etc/fairsynergy/edge/<agent>.env for deploy/systemd/fairsynergy-edge@.service.
# fairsynergy-edge reads these variables itself; the unit adds the agent id,
# username and password file on its command line.
EDGE_ENV = """\
# fairsynergy-edge@{username}.service: written by `fairsynergy provision`.
FAIRSYNERGY_BROKER={broker}
FAIRSYNERGY_FLEET={fleet}
FAIRSYNERGY_CA_FILE={ca_file}
"""

_ID = re.compile(ID_PATTERN)


class ProvisionError(FairsynergyError):
    """An account could not be provisioned; the message says what to change."""


@dataclass(frozen=True)
class Account:
    """One broker account to create or rotate, and where its device connects."""

    username: str
    role: str = "agent"
    fleet: str | None = None
    broker: str | None = None
    ca_file: str = DEFAULT_CA_FILE

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ProvisionError(
                f"role {self.role!r} is not known: use one of {', '.join(ROLES)}"
            )
        check_username(self.username, self.role)
        if self.fleet is not None and _ID.fullmatch(self.fleet) is None:
            raise ProvisionError(
                f"fleet {self.fleet!r} is not valid: use 1 to 64 letters, digits, "
                "'_', '.' or '-'"
            )
        if self.broker is not None:
            check_broker_url(self.broker)


@dataclass(frozen=True)
class Provisioned:
    """What :func:`provision` did: the account and the files it wrote."""

    account: Account
    secret: Path
    rotated: bool
    env_file: Path | None = None


def username_for(role: str, name: str | None) -> str:
    """The account's username: ``name``, or the fixed name of a role account."""
    if name is not None:
        return name
    if role not in ROLE_USERNAMES:
        raise ProvisionError("give the agent id to provision (e.g. robot-1)")
    return ROLE_USERNAMES[role]


def check_username(username: str, role: str) -> None:
    """Refuse usernames the ACL would not give the rights of ``role``."""
    if _ID.fullmatch(username) is None:
        raise ProvisionError(
            f"agent id {username!r} is not valid: use 1 to 64 letters, digits, "
            "'_', '.' or '-'"
        )
    if role == "agent" and username in ROLE_USERNAMES.values():
        raise ProvisionError(
            f"agent id {username!r} is reserved for the {username} account: "
            "choose another agent id"
        )
    if role != "agent" and username != ROLE_USERNAMES[role]:
        raise ProvisionError(
            f"the {role} account must be called {ROLE_USERNAMES[role]!r} (the name "
            f"deploy/mosquitto/acl gives the {role}'s rights), not {username!r}"
        )


def check_broker_url(url: str) -> None:
    """Accept ``mqtts://host[:port]`` (or ``mqtt://`` for a test set-up)."""
    if re.fullmatch(r"mqtts?://[^/:\s]+(:\d{1,5})?/?", url) is None:
        raise ProvisionError(
            f"broker URL {url!r} is not valid: use mqtts://HOST:PORT, e.g. "
            "mqtts://broker.example.org:8883"
        )


def usernames(password_file: Path) -> set[str]:
    """The usernames in a Mosquitto password file (empty if it does not exist)."""
    try:
        lines = password_file.read_text().splitlines()
    except FileNotFoundError:
        return set()
    except OSError as error:
        raise ProvisionError(f"cannot read {password_file}: {error}") from error
    return {line.split(":", 1)[0] for line in lines if line.strip()}


def provision(
    account: Account,
    password_file: Path,
    out: Path,
    *,
    rotate: bool = False,
    mosquitto_passwd: str | None = None,
) -> Provisioned:
    """Give ``account`` a new password in ``password_file`` and in a secret file.

    The secret goes to ``out/<username>.password`` with mode 0600. An account
    or secret file that already exists is only replaced when ``rotate`` is true.

    Raises:
        ProvisionError: the account exists (and ``rotate`` is false), the
            secret file exists, or ``mosquitto_passwd`` is missing or failed.
    """
    binary = find_mosquitto_passwd(mosquitto_passwd)
    secret = out / f"{account.username}.password"
    exists = account.username in usernames(password_file)
    if exists and not rotate:
        raise ProvisionError(
            f"{account.username!r} already has an account in {password_file}: "
            "pass --rotate to give it a new password"
        )
    if secret.exists() and not rotate:
        raise ProvisionError(
            f"{secret} already exists: move it away, or pass --rotate to replace it"
        )

    password = secrets.token_urlsafe(PASSWORD_BYTES)
    with staged_secret(secret, password) as staged:
        set_password(binary, password_file, account.username, password)
        staged.replace(secret)

    env_file = write_env_file(account, out) if account.role == "agent" else None
    return Provisioned(account, secret, rotated=exists, env_file=env_file)


def write_env_file(account: Account, out: Path) -> Path:
    """Write the agent's ``fairsynergy-edge@.service`` environment file."""
    path = out / f"{account.username}.env"
    text = EDGE_ENV.format(
        username=account.username,
        broker=account.broker or BROKER_PLACEHOLDER,
        fleet=account.fleet or FLEET_PLACEHOLDER,
        ca_file=account.ca_file,
    )
    try:
        path.write_text(text)
    except OSError as error:
        raise ProvisionError(f"cannot write {path}: {error}") from error
    return path


def find_mosquitto_passwd(given: str | None) -> str:
    """The ``mosquitto_passwd`` to run: ``given``, else the one on PATH."""
    found = shutil.which(given or "mosquitto_passwd")
    if found is None:
        raise ProvisionError(
            f"{given or 'mosquitto_passwd'} was not found: install Mosquitto "
            "(`apt-get install mosquitto`) or pass --mosquitto-passwd PATH"
        )
    return found


@contextlib.contextmanager
def staged_secret(secret: Path, password: str) -> Iterator[Path]:
    """Write ``password`` to a private temporary file next to ``secret``.

    The caller moves it into place once the broker side succeeded; otherwise it
    is removed, so a failure never leaves a password that does not work.
    """
    try:
        secret.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=secret.parent, prefix=".provision-")
    except OSError as error:
        raise ProvisionError(f"cannot write to {secret.parent}: {error}") from error

    staged = Path(name)
    try:
        with os.fdopen(handle, "w") as file:  # mkstemp made it mode 0600
            # No newline: a reader that does not strip one still gets it right.
            file.write(password)
        yield staged
    finally:
        staged.unlink(missing_ok=True)


def set_password(
    binary: str, password_file: Path, username: str, password: str
) -> None:
    """Add or update ``username`` in ``password_file`` (created, mode 0640)."""
    if not password_file.exists():
        # Created here rather than with `mosquitto_passwd -c`, to choose the mode:
        # the broker's group must read it, nobody else. mosquitto_passwd keeps
        # the mode and owner of the file it updates.
        try:
            password_file.parent.mkdir(parents=True, exist_ok=True)
            password_file.touch(mode=0o640)
        except OSError as error:
            raise ProvisionError(f"cannot create {password_file}: {error}") from error

    done = subprocess.run(
        [binary, str(password_file), username],
        input=f"{password}\n{password}\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ProvisionError(
            f"mosquitto_passwd could not set the password of {username!r} in "
            f"{password_file}: {said[0]}"
        )


def instructions(result: Provisioned, password_file: Path) -> str:
    """What the operator must do next, as text for the terminal."""
    account = result.account
    done = "new password for" if result.rotated else "created"
    lines = [
        f"{done} {account.role} account {account.username!r} in {password_file}",
        f"  password     {result.secret} (mode 0600; the only copy)",
        f"  broker       {account.broker or BROKER_PLACEHOLDER}",
        f"  fleet        {account.fleet or FLEET_PLACEHOLDER}",
        f"  username     {account.username}",
        f"  CA file      {account.ca_file}",
        "",
        *next_steps(result),
        "",
        "Then make the broker read the password file again (SIGHUP):",
        "  sudo systemctl reload mosquitto      (Debian/Ubuntu package)",
        "  docker compose kill -s HUP broker    (deploy/compose.yaml)",
    ]
    if account.broker is None or account.fleet is None:
        lines += ["", "Pass --broker and --fleet to have them filled in above."]
    return "\n".join(lines)


def next_steps(result: Provisioned) -> list[str]:
    """The commands for the machine that will use the account."""
    account = result.account
    broker = account.broker or BROKER_PLACEHOLDER
    fleet = account.fleet or FLEET_PLACEHOLDER
    if account.role == "operator":
        return [
            f"Give {result.secret} to the operator (mode 0600), who sets budgets with",
            f"  fairsynergy budget --broker {broker} --fleet {fleet} "
            "--username operator --password-file PATH "
            f"--ca-file {account.ca_file} RESOURCE=AMOUNT ...",
        ]
    if account.role == "controller":
        return [
            f"On the controller host, install {result.secret} as",
            f"{CONTROLLER_SECRET} (root, mode 0600), then run",
            f"  {controller_command(account, broker, fleet)}",
            "or, with deploy/systemd: systemctl enable --now fairsynergy-controller",
        ]
    device_secret = DEVICE_SECRET.format(username=account.username)
    return [
        f"On the device, install {result.secret} as {device_secret}",
        f"(root, mode 0600) and the fleet's CA certificate as {account.ca_file},",
        "then run",
        f"  {edge_command(account, broker, fleet, device_secret)}",
        f"or, with deploy/systemd, install {result.env_file} as "
        f"/etc/fairsynergy/edge/{account.username}.env and run",
        f"  systemctl enable --now fairsynergy-edge@{account.username}",
    ]


def edge_command(account: Account, broker: str, fleet: str, secret: str) -> str:
    """The ``fairsynergy-edge watch`` command line for an agent account.

    ``watch`` holds the agent's presence and allocation; telemetry goes
    through ``fairsynergy-edge report`` or ``pipe`` with the same options.
    """
    return (
        f"fairsynergy-edge watch --broker {broker} --fleet {fleet} "
        f"--agent {account.username} --username {account.username} "
        f"--password-file {secret} --ca-file {account.ca_file}"
    )


def controller_command(account: Account, broker: str, fleet: str) -> str:
    """The ``fairsynergy controller`` command line for the controller account."""
    return (
        f"fairsynergy controller --broker {broker} --fleet {fleet} "
        "--db /var/lib/fairsynergy/controller.db --username controller "
        f"--password-file {CONTROLLER_SECRET} --ca-file {account.ca_file}"
    )
