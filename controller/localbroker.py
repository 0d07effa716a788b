"""A private Mosquitto broker on free loopback ports, for the demo and the tests.

Production uses a broker of its own (see ``deploy/mosquitto``); this one lives
in a scratch directory and goes away with it.
"""

from __future__ import annotations

import contextlib
import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

from controller.broker import BrokerError

INSTALL_HINT = (
    "mosquitto is not installed: run `sudo apt-get install mosquitto "
    "mosquitto-clients` (Debian/Ubuntu), or `./dev test` / `./dev demo`, which "
    "install it when run as root"
)

# Plain anonymous listener on loopback: what most tests need. `{port}`, `{dir}`
# and `{user}` are filled in per broker. `user` keeps mosquitto from dropping
# root privileges to an account that cannot read the test's directories; it is
# ignored when the tests do not run as root.
DEFAULT_CONFIG = """\
user {user}
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {dir}/
autosave_interval 1
"""

# How long a broker may take to accept connections before the test fails.
# Mosquitto is usually ready in well under 100 ms; CI machines can be slow.
READY_TIMEOUT_S = 10.0


def find_mosquitto() -> str:
    """Return the path of the mosquitto binary, or say how to install it."""
    found = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path="/usr/sbin:/usr/local/sbin:/sbin"
    )
    if found is None:
        raise BrokerError(INSTALL_HINT)
    return found


def free_port() -> int:
    """Ask the kernel for a free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalBroker:
    """One mosquitto process with its own config file and data directory.

    The demo runs one, and every MQTT test runs its own (``tests/conftest.py``).

    ``config`` is a mosquitto.conf template; ``{port}`` (the first port),
    ``{port0}``, ``{port1}``, ... , ``{dir}`` (the broker's directory) and
    ``{user}`` (the account running the tests) are filled in. The ports stay
    the same across :meth:`restart`, so clients can reconnect to the same
    address.
    """

    def __init__(
        self, binary: str, workdir: Path, config: str = DEFAULT_CONFIG, ports: int = 1
    ) -> None:
        self.binary = binary
        self.dir = workdir
        self.template = config
        self.ports = [free_port() for _ in range(ports)]
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "mosquitto.log"

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def config_text(self) -> str:
        named = {f"port{i}": port for i, port in enumerate(self.ports)}
        return self.template.format(
            port=self.port, dir=self.dir, user=getpass.getuser(), **named
        )

    def start(self) -> None:
        """Start the broker and wait until every listener accepts connections."""
        config_path = self.dir / "mosquitto.conf"
        config_path.write_text(self.config_text())
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [self.binary, "-c", str(config_path), "-v"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        log.close()

        deadline = time.monotonic() + READY_TIMEOUT_S
        for port in self.ports:
            self._wait_ready(port, deadline)

    def _wait_ready(self, port: int, deadline: float) -> None:
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"mosquitto exited early:\n{self.log()}")
            with contextlib.suppress(OSError):
                socket.create_connection((self.host, port), timeout=0.2).close()
                return
            time.sleep(0.02)
        raise BrokerError(f"mosquitto not ready on port {port}:\n{self.log()}")

    def stop(self) -> None:
        """Stop the broker gracefully (it saves its persistence file)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Kill the broker without letting it save anything."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-4000:]
