"""`fairsynergy provision`: broker accounts with random passwords, hashed on the broker.

The tests run the real ``mosquitto_passwd`` and, where it matters, a real
broker on the shipped configuration, which must accept a fresh password and,
after a reload, refuse a rotated one.
"""

from __future__ import annotations

import shlex
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.cli import main
from controller.provision import (
    Account,
    ProvisionError,
    find_mosquitto_passwd,
    provision,
    usernames,
)
from tests.mosquitto import MosquittoBroker
from tests.pki import Pki, make_pki
from tests.secure_broker import TIMEOUT_S, open_session, production_config


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A throwaway CA and broker certificate."""
    return make_pki(tmp_path / "pki")


def make_account(tmp_path: Path, name: str = "robot-1", **options: str) -> Path:
    """Provision ``name`` into tmp_path/passwd; return the secret file."""
    account = Account(name, **options)
    return provision(account, tmp_path / "passwd", tmp_path / "out").secret


def test_provision_stores_only_a_hash_and_a_private_secret(tmp_path: Path) -> None:
    """The password file holds a PBKDF2 hash; the secret file is mode 0600."""
    secret = make_account(tmp_path)

    password = secret.read_text()
    entry = (tmp_path / "passwd").read_text()
    assert len(password) >= 43  # 256 random bits
    assert entry.startswith("robot-1:$7$")  # mosquitto's PBKDF2-SHA512
    assert password not in entry
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "passwd").stat().st_mode) == 0o640


def test_provision_gives_every_account_a_different_password(tmp_path: Path) -> None:
    """Two agents never share a password."""
    first = make_account(tmp_path, "robot-1").read_text()
    second = make_account(tmp_path, "robot-2").read_text()

    assert first != second
    assert usernames(tmp_path / "passwd") == {"robot-1", "robot-2"}


def test_provision_refuses_an_existing_account_unless_rotating(tmp_path: Path) -> None:
    """Provisioning a known agent again fails, and --rotate gives a new password."""
    old = make_account(tmp_path).read_text()

    with pytest.raises(ProvisionError, match=r"already has an account.*--rotate"):
        make_account(tmp_path)
    rotated = provision(
        Account("robot-1"), tmp_path / "passwd", tmp_path / "out", rotate=True
    )

    assert rotated.rotated
    assert rotated.secret.read_text() != old
    assert usernames(tmp_path / "passwd") == {"robot-1"}


def test_provision_refuses_to_replace_a_leftover_secret(tmp_path: Path) -> None:
    """An existing secret file is never overwritten without --rotate."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "robot-1.password").write_text("keep me")

    with pytest.raises(ProvisionError, match="already exists"):
        make_account(tmp_path)

    assert (tmp_path / "out" / "robot-1.password").read_text() == "keep me"
    assert not (tmp_path / "passwd").exists()


@pytest.mark.parametrize(
    ("name", "role", "message"),
    [
        ("robot/1", "agent", "not valid"),
        ("robot+", "agent", "not valid"),
        ("#", "agent", "not valid"),
        ("", "agent", "not valid"),
        ("r" * 65, "agent", "not valid"),
        ("robot:1", "agent", "not valid"),
        ("controller", "agent", "reserved"),
        ("operator", "agent", "reserved"),
        ("ctl", "controller", "must be called 'controller'"),
        ("robot-1", "admin", "role 'admin' is not known"),
    ],
)
def test_provision_rejects_names_the_acl_would_misread(
    name: str, role: str, message: str
) -> None:
    """Ids outside the contract, and role names taken by agents, are refused."""
    with pytest.raises(ProvisionError, match=message):
        Account(name, role=role)


@pytest.mark.parametrize(
    ("option", "value"),
    [("fleet", "bad fleet"), ("broker", "http://broker:8883")],
)
def test_provision_rejects_bad_fleet_and_broker(option: str, value: str) -> None:
    """A fleet id or broker URL the device could not use is refused."""
    with pytest.raises(ProvisionError, match="not valid"):
        Account("robot-1", **{option: value})


def test_provision_never_puts_the_password_in_a_command_line(tmp_path: Path) -> None:
    """mosquitto_passwd gets the password on stdin, invisible in /proc."""
    wrapper, calls = recording_mosquitto_passwd(tmp_path)

    done = provision(
        Account("robot-1"), tmp_path / "passwd", tmp_path, mosquitto_passwd=wrapper
    )

    password = done.secret.read_text()
    assert calls.read_text().split() == [str(tmp_path / "passwd"), "robot-1"]
    assert password not in calls.read_text()


def test_provision_leaves_no_secret_when_mosquitto_passwd_fails(
    tmp_path: Path,
) -> None:
    """A failure of mosquitto_passwd leaves neither a secret nor a temporary file."""
    failing = tmp_path / "bin" / "mosquitto_passwd"
    failing.parent.mkdir()
    failing.write_text("#!/bin/sh\necho 'Error: disk full' >&2\nexit 1\n")
    failing.chmod(0o755)
    out = tmp_path / "out"

    with pytest.raises(ProvisionError, match="disk full"):
        provision(
            Account("robot-1"), tmp_path / "passwd", out, mosquitto_passwd=str(failing)
        )

    assert list(out.iterdir()) == []


def test_provision_names_a_missing_mosquitto_passwd(tmp_path: Path) -> None:
    """Without mosquitto_passwd the error says how to get it."""
    with pytest.raises(ProvisionError, match="apt-get install mosquitto"):
        provision(
            Account("robot-1"),
            tmp_path / "passwd",
            tmp_path,
            mosquitto_passwd=str(tmp_path / "nowhere"),
        )


def recording_mosquitto_passwd(tmp_path: Path) -> tuple[str, Path]:
    """A mosquitto_passwd that logs its arguments, then runs the real one."""
    calls = tmp_path / "calls"
    wrapper = tmp_path / "bin" / "mosquitto_passwd"
    wrapper.parent.mkdir()
    real = shlex.quote(find_mosquitto_passwd(None))
    wrapper.write_text(
        f'#!/bin/sh\necho "$@" >> {shlex.quote(str(calls))}\nexec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper), calls


# --- the command line -----------------------------------------------------------


def test_provision_command_prints_what_the_device_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The output names broker, fleet, files and the device's command line."""
    argv = ["provision", "robot-1", "--password-file", str(tmp_path / "passwd")]
    argv += ["--fleet", "demo", "--broker", "mqtts://broker.example.org:8883"]
    argv += ["--out", str(tmp_path / "out"), "--ca-file", "/etc/fs/ca.crt"]

    status = main(argv)

    printed = capsys.readouterr().out
    password = (tmp_path / "out" / "robot-1.password").read_text()
    assert status == 0
    assert (
        "fairsynergy-edge watch --broker mqtts://broker.example.org:8883 --fleet demo "
        "--agent robot-1 --username robot-1 "
        "--password-file /etc/fairsynergy/edge/robot-1.password "
        "--ca-file /etc/fs/ca.crt"
    ) in printed
    assert "SIGHUP" in printed
    assert "systemctl reload mosquitto" in printed
    assert password not in printed
    assert (tmp_path / "out" / "robot-1.env").read_text().splitlines()[1:] == [
        "FAIRSYNERGY_BROKER=mqtts://broker.example.org:8883",
        "FAIRSYNERGY_FLEET=demo",
        "FAIRSYNERGY_CA_FILE=/etc/fs/ca.crt",
    ]


def test_provision_command_defaults_role_accounts_to_their_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--role controller` without a name provisions the `controller` account."""
    argv = ["provision", "--role", "controller"]
    argv += ["--password-file", str(tmp_path / "passwd"), "--out", str(tmp_path)]

    status = main(argv)

    assert status == 0
    assert usernames(tmp_path / "passwd") == {"controller"}
    assert "fairsynergy controller --broker" in capsys.readouterr().out
    assert not (tmp_path / "controller.env").exists()


def test_provision_command_reports_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused id is one line on stderr and exit status 2."""
    status = main(["provision", "a/b", "--password-file", str(tmp_path / "p")])

    error = capsys.readouterr().err
    assert status == 2
    assert error.count("\n") == 1
    assert error.startswith("fairsynergy provision: error: agent id 'a/b'")


@pytest.mark.parametrize(
    ("role", "program"),
    [
        ("agent", "fairsynergy-edge"),
        ("controller", "fairsynergy"),
        ("operator", "fairsynergy"),
    ],
)
def test_provision_printed_command_is_one_its_cli_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], role: str, program: str
) -> None:
    """The command line printed for each role parses with that program's CLI."""
    if program == "fairsynergy-edge":
        build_parser = pytest.importorskip("edge_client.cli").build_parser
    else:
        from controller.cli import build_parser
    name = {"agent": "robot-1"}.get(role, role)
    argv = ["provision", name, "--role", role, "--password-file", str(tmp_path / "p")]
    main([*argv, "--fleet", "demo", "--out", str(tmp_path)])
    printed = capsys.readouterr().out.splitlines()
    line = next(line for line in printed if line.strip().startswith(program + " "))

    words = shlex.split(line.replace("RESOURCE=AMOUNT ...", "compute=1"))
    args = build_parser().parse_args(words[1:])

    assert args.fleet == "demo"


# --- against the broker ---------------------------------------------------------


def test_provision_rotation_locks_out_the_old_password_after_reload(
    tmp_path: Path, pki: Pki, mosquitto_factory: Callable[..., MosquittoBroker]
) -> None:
    """After --rotate and SIGHUP, the old password is kicked off and refused."""
    password_file = tmp_path / "passwd"
    old = make_account(tmp_path).read_text()
    broker = mosquitto_factory(production_config(pki, password_file))
    connected, code = open_session(broker, pki, "robot-1", old)
    assert not code.is_failure

    provision(Account("robot-1"), password_file, tmp_path / "out", rotate=True)
    new = (tmp_path / "out" / "robot-1.password").read_text()
    assert broker.process is not None
    broker.process.send_signal(signal.SIGHUP)
    wait_until(lambda: bool(connected.disconnects))
    connected.client.loop_stop()
    _, old_code = open_session(broker, pki, "robot-1", old)
    fresh, new_code = open_session(broker, pki, "robot-1", new)
    fresh.close()

    assert str(old_code) == "Not authorized"
    assert not new_code.is_failure


def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds, or fail after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition never held")
        time.sleep(0.02)
