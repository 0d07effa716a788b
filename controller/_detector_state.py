"""Save a drift detector to plain JSON-compatible data, and back.

The learner's default detector is our own :class:`PageHinkley`, which saves
and restores itself directly (the fast path: one per agent at every restart).
Other river detectors keep their running sums as ordinary attributes, so the
one more we support (``NoDrift``) is saved by walking its attributes.
Detectors whose state lives in compiled objects (ADWIN) or in containers are
refused by name, rather than silently restarted.

States saved when the learner used river's PageHinkley have the same layout
as ours and restore as ours. ``river.drift`` is imported only to restore a
``NoDrift``: importing it costs more than a second (see
:mod:`controller._pagehinkley`).
"""

from __future__ import annotations

import math
from typing import Any

from river import base

from controller._pagehinkley import PageHinkley
from controller.errors import FairsynergyError

_SUPPORTED = ("NoDrift", "PageHinkley")


def detector_to_state(detector: base.DriftDetector) -> dict[str, Any]:
    """Return the detector's parameters and running state as plain data."""
    if type(detector) is PageHinkley:
        return detector.to_state()
    name = type(detector).__name__
    if name not in _SUPPORTED:
        raise FairsynergyError(
            f"drift detector {name} cannot be saved as JSON; "
            f"use one of {', '.join(_SUPPORTED)}"
        )
    return {
        "name": name,
        "params": _plain(detector._get_params()),
        "state": _attributes(detector),
    }


def detector_from_state(state: dict[str, Any]) -> base.DriftDetector:
    """Rebuild a detector saved by :func:`detector_to_state`."""
    name = state["name"]
    if name == "PageHinkley":
        return PageHinkley.from_state(state)
    if name != "NoDrift":
        raise FairsynergyError(
            f"unknown drift detector {name!r} in saved state; "
            f"expected one of {', '.join(_SUPPORTED)}"
        )
    from river import drift  # slow to import, and only NoDrift needs it

    params = _restore(state["params"])
    detector = drift.NoDrift(**params)  # type: ignore[no-untyped-call]
    _assign(detector, state["state"])
    return detector


def _attributes(obj: object) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(obj).items():
        if callable(value):
            continue  # bound methods chosen by a constructor (river's PageHinkley)
        if isinstance(value, bool | int | float | str) or value is None:
            out[key] = _plain(value)
        elif type(value).__module__.startswith("river."):
            out[key] = {"__object__": _attributes(value)}
        else:
            raise FairsynergyError(
                f"drift detector attribute {key!r} holds a "
                f"{type(value).__name__}, which cannot be saved as JSON"
            )
    return out


def _assign(obj: object, saved: dict[str, Any]) -> None:
    for key, value in saved.items():
        if isinstance(value, dict) and "__object__" in value:
            _assign(getattr(obj, key), value["__object__"])
        else:
            setattr(obj, key, _restore(value))


def _plain(value: Any) -> Any:
    """Encode non-finite floats, which strict JSON (and SQLite's) rejects."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    return value


def _restore(value: Any) -> Any:
    if isinstance(value, dict):
        if "__float__" in value:
            return float(value["__float__"])
        return {key: _restore(item) for key, item in value.items()}
    return value
