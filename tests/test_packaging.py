"""The two installs: the device install stays small, the scripts explain themselves."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Packages a device must never have to install: they are large and compiled.
CONTROLLER_ONLY = {"numpy", "scipy", "river", "sqlite-utils", "pandas", "structlog"}


@pytest.fixture(scope="module")
def device_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with only the device install of this checkout."""
    env = tmp_path_factory.mktemp("device-venv")
    venv.create(env, with_pip=True)
    subprocess.run(
        [env / "bin" / "python", "-m", "pip", "install", "--quiet", str(ROOT)],
        check=True,
        capture_output=True,
    )
    return env


def installed_packages(env: Path) -> set[str]:
    listing = subprocess.run(
        [env / "bin" / "python", "-m", "pip", "list", "--format=json"],
        check=True,
        capture_output=True,
        text=True,
    )
    return {entry["name"].lower() for entry in json.loads(listing.stdout)}


@pytest.mark.slow
def test_device_install_leaves_out_controller_dependencies(device_env: Path):
    """`pip install fairsynergy` pulls paho-mqtt and the validator, not numpy & co."""
    packages = installed_packages(device_env)

    assert {"fairsynergy", "paho-mqtt", "fastjsonschema"} <= packages
    assert packages & CONTROLLER_ONLY == set()


@pytest.mark.slow
def test_device_install_runs_edge_client(device_env: Path):
    """The edge client and the schemas import and the edge CLI answers --help."""
    python = device_env / "bin" / "python"

    imported = subprocess.run(
        [python, "-c", "import edge_client, schemas; print('ok')"],
        capture_output=True,
        text=True,
    )
    helped = subprocess.run(
        [device_env / "bin" / "fairsynergy-edge", "--help"],
        capture_output=True,
        text=True,
    )

    assert (imported.returncode, imported.stdout.strip()) == (0, "ok")
    assert helped.returncode == 0
    assert "report" in helped.stdout


@pytest.mark.slow
def test_device_install_explains_missing_controller_install(device_env: Path):
    """A controller command on a device says which install it needs."""
    result = subprocess.run(
        [device_env / "bin" / "fairsynergy", "allocate", "-"],
        input="{}",
        capture_output=True,
        text=True,
    )

    assert result.returncode == 2
    assert "fairsynergy[controller]" in result.stderr


@pytest.mark.parametrize("script", ["fairsynergy", "fairsynergy-edge"])
def test_console_script_help_lists_subcommands(script: str):
    """Each console script's --help names what it can do."""
    expected = {"fairsynergy": "allocate", "fairsynergy-edge": "watch"}[script]

    result = subprocess.run(
        [Path(sys.executable).parent / script, "--help"],
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0
    assert expected in result.stdout
