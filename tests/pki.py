"""A throwaway certificate authority for TLS tests, made with the openssl CLI.

The broker's certificate names both ``127.0.0.1`` and ``localhost``, so clients
verify the hostname exactly as a device does in production. Keys are EC P-256:
making them takes milliseconds, unlike RSA. Needs OpenSSL 3.0 or newer (``req
-x509 -CA``). Nothing here is fit for production; docs/deployment.md says how to
make the real certificates.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

# Long enough for any test run, short enough that a leaked key is worthless.
NEW_CERTIFICATE = ("req", "-x509", "-noenc", "-days", "2")
NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")

CA_EXTENSIONS = (
    "basicConstraints=critical,CA:TRUE",
    "keyUsage=critical,keyCertSign,cRLSign",
)

SERVER_EXTENSIONS = (
    "basicConstraints=critical,CA:FALSE",
    "keyUsage=critical,digitalSignature",
    "extendedKeyUsage=serverAuth",
    "subjectAltName=IP:127.0.0.1,DNS:localhost",
)


@dataclass(frozen=True)
class Pki:
    """Paths of a CA certificate and of the broker certificate and key it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_pki(directory: Path) -> Pki:
    """Create a CA and a broker certificate for 127.0.0.1 in ``directory``."""
    openssl = find_openssl()
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
    )
    ca_key = directory / "ca.key"

    issue(openssl, "fairsynergy test CA", ca_key, pki.ca_cert, CA_EXTENSIONS)
    issue(
        openssl,
        "localhost",
        pki.server_key,
        pki.server_cert,
        SERVER_EXTENSIONS,
        issuer=(pki.ca_cert, ca_key),
    )

    return pki


def issue(
    openssl: str,
    name: str,
    key: Path,
    certificate: Path,
    extensions: tuple[str, ...],
    issuer: tuple[Path, Path] | None = None,
) -> None:
    """Make a key and a certificate for ``name``, self-signed unless ``issuer``."""
    words = [openssl, *NEW_CERTIFICATE, *NEW_KEY, "-subj", f"/CN={name}"]
    words += ["-keyout", str(key), "-out", str(certificate)]
    if issuer is not None:
        words += ["-CA", str(issuer[0]), "-CAkey", str(issuer[1])]
    words += [word for value in extensions for word in ("-addext", value)]

    done = subprocess.run(words, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(words)} failed:\n{done.stderr}", pytrace=False)


def find_openssl() -> str:
    """Return the path of the openssl binary, or fail the test saying why."""
    found = shutil.which("openssl")
    if found is None:
        pytest.fail(
            "openssl is not installed: run `sudo apt-get install openssl`",
            pytrace=False,
        )
    return found
