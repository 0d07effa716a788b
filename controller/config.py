"""The controller's settings: defaults, a TOML file, then environment variables.

Every setting has one name, used as the key in the TOML file and, upper-cased
with a ``FAIRSYNERGY_`` prefix, as the environment variable that overrides it
(``ack_timeout`` -> ``FAIRSYNERGY_ACK_TIMEOUT``). ``deploy/controller.toml``
documents them all; a test keeps that file and this module in step.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.errors import FairsynergyError

ENV_PREFIX = "FAIRSYNERGY_"


class ConfigError(FairsynergyError, ValueError):
    """A setting is unknown or has a value the controller cannot use."""


def setting(default: Any, doc: str, *, minimum: float | None = 0.0) -> Any:
    return field(default=default, metadata={"doc": doc, "minimum": minimum})


@dataclass(frozen=True)
class ControllerConfig:
    """Settings of one controller; see ``deploy/controller.toml`` for a guide."""

    alpha: float = setting(
        1.0, "default fairness when the budget message sets none (number or 'inf')"
    )
    reallocation_interval: float = setting(
        30.0, "seconds between periodic reallocations (the tick)"
    )
    debounce: float = setting(
        0.5, "seconds to wait after a trigger so bursts make one reallocation"
    )
    hysteresis: float = setting(
        0.02,
        "an agent's allocation is republished only if some resource moved by more "
        "than this fraction of the agent's equal share of that budget",
    )
    fit_change: float = setting(
        0.02,
        "reallocate when an agent's expected accuracy under its current allocation "
        "moved by more than this (absolute) since the last allocation",
    )
    exploration_cap: float = setting(
        0.02,
        "most that exploration may cost: relative loss of the estimated objective",
    )
    grant_lease: float = setting(
        120.0,
        "seconds an allocation stays valid (its 'expires'); the controller renews "
        "grants before they lapse, and a device that hears nothing more falls "
        "back to its local resources when its grant expires",
        minimum=1.0,
    )
    ack_timeout: float = setting(
        15.0,
        "seconds an agent has to report a new epoch before the controller warns "
        "that it is not acknowledging (its old grant keeps counting until it "
        "expires either way)",
    )
    offline_grace: float = setting(
        60.0,
        "seconds an offline agent stays in the fleet before it stops being "
        "allocated; its last grant still counts until that grant expires",
    )
    learner_save_interval: float = setting(
        10.0,
        "seconds between saves of the learners that changed; a crash loses at most "
        "this much learning",
        minimum=0.1,
    )
    telemetry_retention_rows: int = setting(
        1000, "telemetry rows kept per agent in the database"
    )
    telemetry_retention_days: float = setting(
        7.0, "telemetry older than this many days is deleted"
    )
    weights: str = setting(
        "equal",
        "'equal', or 'load' for weights proportional to each agent's reported load",
        minimum=None,
    )
    rate_limit: float = setting(
        10.0, "telemetry messages per second accepted per agent (sustained)"
    )
    rate_burst: float = setting(
        50.0, "telemetry messages per agent accepted in a burst above the rate"
    )
    max_payload_bytes: int = setting(
        64 * 1024, "messages larger than this are refused before parsing", minimum=1
    )
    metrics_port: int = setting(
        9464, "port of the Prometheus metrics endpoint; 0 turns it off"
    )
    metrics_host: str = setting(
        "127.0.0.1", "address the metrics endpoint listens on", minimum=None
    )

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            minimum = item.metadata["minimum"]
            value = getattr(self, item.name)
            if minimum is not None and not value >= minimum:
                raise ConfigError(f"{item.name} must be >= {minimum:g}, got {value!r}")
        if self.weights not in ("equal", "load"):
            raise ConfigError(
                f"weights must be 'equal' or 'load', got {self.weights!r}"
            )
        if self.grant_lease <= self.reallocation_interval:
            raise ConfigError(
                f"grant_lease ({self.grant_lease:g} s) must be longer than "
                f"reallocation_interval ({self.reallocation_interval:g} s), or grants "
                "lapse before the periodic cycle renews them"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be 0..65535, got {self.metrics_port}")


def describe_settings() -> dict[str, str]:
    """Each setting's name and the sentence that documents it."""
    return {
        item.name: item.metadata["doc"] for item in dataclasses.fields(ControllerConfig)
    }


def load_config(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> ControllerConfig:
    """Build the settings: defaults, then the TOML file, then the environment."""
    values: dict[str, object] = {}
    if path is not None:
        values.update(read_toml(path))
    for name in describe_settings():
        raw = (environ or {}).get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = raw
    settings: dict[str, Any] = {
        name: coerce(name, value) for name, value in values.items()
    }
    return ControllerConfig(**settings)


def read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None

    unknown = sorted(set(data) - set(describe_settings()))
    if unknown:
        known = ", ".join(describe_settings())
        raise ConfigError(
            f"{path}: unknown setting(s) {', '.join(unknown)}; known: {known}"
        )
    return data


def coerce(name: str, value: object) -> object:
    """Turn a TOML or environment value into the setting's type, or say why not."""
    kind = {item.name: item.type for item in dataclasses.fields(ControllerConfig)}[name]
    if name == "alpha":
        return parse_alpha_setting(value)
    try:
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)  # type: ignore[call-overload]
        if kind == "float":
            number = float(value)  # type: ignore[arg-type]
            if not math.isfinite(number):
                raise ValueError
            return number
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a finite {kind}, got {value!r}") from None


def parse_alpha_setting(value: object) -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
        return math.inf
    try:
        alpha = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        alpha = math.nan
    if not alpha >= 0:
        raise ConfigError(f"alpha must be a number >= 0 or 'inf', got {value!r}")
    return alpha
