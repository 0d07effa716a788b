"""Controller settings: file, environment, validation and documentation."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path

import pytest

from controller.config import (
    ConfigError,
    ControllerConfig,
    describe_settings,
    load_config,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "controller.toml"


def test_config_example_documents_every_setting_with_its_default():
    """deploy/controller.toml lists every setting, at its default value."""
    example = tomllib.loads(EXAMPLE.read_text())

    assert set(example) == set(describe_settings())
    assert load_config(EXAMPLE) == ControllerConfig()


def test_config_environment_overrides_file(tmp_path: Path):
    """FAIRSYNERGY_<KEY> wins over the file, which wins over the default."""
    path = tmp_path / "c.toml"
    path.write_text('ack_timeout = 20\nweights = "load"\nalpha = "inf"\n')

    config = load_config(path, {"FAIRSYNERGY_ACK_TIMEOUT": "30.5"})

    assert (config.ack_timeout, config.weights, config.alpha) == (
        30.5,
        "load",
        math.inf,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("debounce = -1", "debounce must be >= 0"),
        ("weights = 'heaviest'", "weights must be 'equal' or 'load'"),
        ("alpha = 'fair'", "alpha must be a number >= 0 or 'inf'"),
        ("metrics_port = 70000", "metrics_port must be 0..65535"),
        ("telemetry_retention_rows = 1.5", "telemetry_retention_rows must be"),
        ("ack_timout = 3", "unknown setting(s) ack_timout"),
        ("ack_timeout = [", "not valid TOML"),
    ],
)
def test_config_rejects_bad_values_naming_the_setting(tmp_path, text, message):
    """A bad setting is refused with its name and what is accepted."""
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


def test_config_rejects_non_numeric_environment_value():
    """An environment override that is not a number says which variable's key."""
    with pytest.raises(ConfigError, match="rate_limit must be a finite float"):
        load_config(None, {"FAIRSYNERGY_RATE_LIMIT": "fast"})


def test_config_missing_file_is_a_clear_error(tmp_path: Path):
    """A config path that does not exist names the path."""
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.toml"):
        load_config(tmp_path / "nope.toml")
