"""The Page-Hinkley drift test, small enough to import in a blink.

river's ``drift.PageHinkley`` computes exactly this, but importing
``river.drift`` imports every river drift detector, river's datasets and
``scipy.stats`` with them: about 1.3 s of the controller's start, against a
restart target of 2 s at 10,000 agents. This class does the same arithmetic
in the same order, so it flags drift at the same samples; the tests keep
river's detector as the independent reference. Its saved state has the layout
that :mod:`controller._detector_state` wrote for river's detector, so states
stored before the switch restore unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Self

from river import base

from controller.errors import FairsynergyError

_MODES = ("up", "down", "both")


class PageHinkley(base.DriftDetector):
    """Page-Hinkley test for a shift in the mean of a stream (CUSUM-like).

    It keeps the running mean of the values, and two cumulative sums of each
    value's deviation from it, one less ``delta`` (watching for an increase)
    and one plus ``delta`` (a decrease). A drift is flagged when a sum has
    moved more than ``threshold`` from its extreme, once ``min_instances``
    values have been seen; the next update starts afresh.

    Parameters
    ----------
    min_instances
        Values seen before any drift can be flagged.
    delta
        Deviations smaller than this (either way) count towards no drift.
    threshold
        How far a cumulative sum must move from its extreme (lambda).
    alpha
        Fading factor of the cumulative sums; 1 keeps them whole.
    mode
        ``"up"``, ``"down"`` or ``"both"``: which shifts of the mean count.

    The parameters, their defaults and the arithmetic are river's, so either
    class can stand in for the other.

    References
    ----------
    E. S. Page (1954). Continuous inspection schemes. Biometrika 41, 100-115.
    """

    def __init__(
        self,
        min_instances: int = 30,
        delta: float = 0.005,
        threshold: float = 50.0,
        alpha: float = 1 - 0.0001,
        mode: str = "both",
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise FairsynergyError(
                f"PageHinkley mode={mode!r} is invalid; expected one of {_MODES}"
            )
        self.min_instances = min_instances
        self.delta = delta
        self.threshold = threshold
        self.alpha = alpha
        self.mode = mode
        self._reset()

    def _reset(self) -> None:
        super()._reset()
        self._n = 0.0
        self._mean = 0.0
        self._sum_increase = 0.0
        self._sum_decrease = 0.0
        self._min_increase = math.inf
        self._max_decrease = -1.0

    def update(self, x: float) -> None:
        """Take in one value; :attr:`drift_detected` then says if it shifted."""
        if self._drift_detected:
            self._reset()

        # Same operations, in the same order, as river's, so every rounding
        # matches and detections fall on the same samples.
        self._n += 1.0
        self._mean += (1.0 / self._n) * (x - self._mean)
        dev = x - self._mean
        self._sum_increase = self.alpha * self._sum_increase + dev - self.delta
        self._sum_decrease = self.alpha * self._sum_decrease + dev + self.delta
        if self._sum_increase < self._min_increase:
            self._min_increase = self._sum_increase
        if self._sum_decrease > self._max_decrease:
            self._max_decrease = self._sum_decrease

        if self._n >= self.min_instances:
            up = self._sum_increase - self._min_increase > self.threshold
            down = self._max_decrease - self._sum_decrease > self.threshold
            mode = self.mode
            self._drift_detected = (
                (up or down) if mode == "both" else up if mode == "up" else down
            )

    def clone(
        self, new_params: dict[str, Any] | None = None, include_attributes: bool = False
    ) -> Self:
        """A fresh detector with the same parameters (river's ``clone`` contract).

        The plain case skips river's signature inspection: the learner clones
        its detector for every agent it creates or restores.
        """
        if new_params or include_attributes:
            return super().clone(new_params, include_attributes)
        return type(self)(
            self.min_instances, self.delta, self.threshold, self.alpha, self.mode
        )

    # ---------------------------------------------------------------- state

    def to_state(self) -> dict[str, Any]:
        """Parameters and running sums as plain data.

        The layout is the one saved for river's detector (its attribute
        names, the running mean as a nested object, infinity spelled out),
        so old and new states read alike.
        """
        params = {
            "min_instances": self.min_instances,
            "delta": self.delta,
            "threshold": self.threshold,
            "alpha": self.alpha,
            "mode": self.mode,
        }
        return {
            "name": "PageHinkley",
            "params": params,
            "state": {
                "_drift_detected": self._drift_detected,
                **params,
                "_x_mean": {"__object__": {"n": self._n, "_mean": self._mean}},
                "_sum_increase": self._sum_increase,
                "_sum_decrease": self._sum_decrease,
                "_min_increase": _plain(self._min_increase),
                "_max_decrease": _plain(self._max_decrease),
            },
        }

    @classmethod
    def from_state(cls, saved: Mapping[str, Any]) -> PageHinkley:
        """Rebuild a detector saved by :meth:`to_state` (or for river's)."""
        detector = cls(**saved["params"])
        state = saved["state"]
        running = state["_x_mean"]["__object__"]
        detector._drift_detected = bool(state["_drift_detected"])
        detector._n = float(running["n"])
        detector._mean = float(running["_mean"])
        detector._sum_increase = _number(state["_sum_increase"])
        detector._sum_decrease = _number(state["_sum_decrease"])
        detector._min_increase = _number(state["_min_increase"])
        detector._max_decrease = _number(state["_max_decrease"])
        return detector


def _plain(value: float) -> float | dict[str, str]:
    """Spell out a non-finite float, which strict JSON (and SQLite's) rejects."""
    return value if math.isfinite(value) else {"__float__": repr(value)}


def _number(value: float | dict[str, str]) -> float:
    if isinstance(value, dict):
        return float(value["__float__"])
    return float(value)
