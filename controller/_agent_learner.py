"""One agent's accuracy curve, learned one telemetry sample at a time.

See :class:`UtilityLearner`; :mod:`controller.learn` is the public face.
"""

from __future__ import annotations

import enum
import functools
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from operator import gt, mul
from typing import Any, Self

from river import base

from controller import _posterior as linalg
from controller._detector_state import detector_from_state, detector_to_state
from controller._pagehinkley import PageHinkley
from controller.errors import FairsynergyError

STATE_VERSION = 1

# A sample is replayed after a drift only if the old curve missed it by at
# least this many predictive sds in the drift's direction: an old sample that
# leans that way by chance (2 sd happens 1 time in 40) must not be replayed.
_REPLAY_RESIDUAL = 3.0
# Rounding can leave a variance a hair below zero after many updates at
# extreme operating points; spreads are read through this floor.
MIN_VARIANCE = 1e-18

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class Outcome(enum.StrEnum):
    """What a learner did with one sample."""

    FITTED = "fitted"  # measured below the ceiling, used (maybe down-weighted)
    CENSORED = "censored"  # at or above the ceiling: used as "u >= ceiling"
    OUTLIER = "outlier"  # too far from the curve to trust: not fitted
    DRIFT = "drift"  # behaviour changed: posterior restarted from the prior
    SKIPPED = "skipped"  # no usable log: accuracy or a resource amount <= 0
    DUPLICATE = "duplicate"  # same seq as the last sample of that agent
    STALE = "stale"  # seq older than the last sample of that agent


# Iterating an enum class is slow; every learner's counts start from this.
_OUTCOMES = tuple(Outcome)
_OUTCOME_NAMES = tuple(outcome.value for outcome in _OUTCOMES)
_OUTCOMES_BY_NAME = dict(zip(_OUTCOME_NAMES, _OUTCOMES, strict=True))


@dataclass(frozen=True)
class Prior:
    """Independent normal beliefs about ``(log A, gamma_1, ..., gamma_R)``.

    ``mean`` and ``sd`` list the log scale first, then one elasticity per
    resource in the learner's resource order.
    """

    mean: tuple[float, ...]
    sd: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.sd) or len(self.mean) < 2:
            raise FairsynergyError(
                f"prior needs one mean and one sd for log scale and each "
                f"elasticity; got {len(self.mean)} means and {len(self.sd)} sds"
            )
        finite = all(map(math.isfinite, self.mean)) and all(map(math.isfinite, self.sd))
        if not finite or min(self.sd) <= 0:
            raise FairsynergyError(
                f"prior means must be finite and sds finite and > 0; got "
                f"mean={self.mean}, sd={self.sd}"
            )

    @classmethod
    def default(cls, n_resources: int) -> Prior:
        """A vague prior: accuracy about 0.8 at unit amounts, elasticities ~0.1.

        Wide enough to cover the curves in PAPER.md (elasticities from about
        0.01 to 0.3) while keeping a first allocation even-handed.
        """
        return cls(
            mean=(math.log(0.8),) + (0.1,) * n_resources,
            sd=(0.5,) + (0.1,) * n_resources,
        )

    def to_state(self) -> dict[str, list[float]]:
        """Return the prior as plain data."""
        return {"mean": list(self.mean), "sd": list(self.sd)}

    @classmethod
    def from_state(cls, state: Mapping[str, Sequence[float]]) -> Prior:
        """Rebuild a prior saved by :meth:`to_state`."""
        return _saved_prior(tuple(state["mean"]), tuple(state["sd"]))


@functools.lru_cache(maxsize=1024)
def _saved_prior(mean: tuple[float, ...], sd: tuple[float, ...]) -> Prior:
    """A saved prior, validated once: a fleet's agents share a few pooled ones."""
    return Prior(mean=mean, sd=sd)


def default_detector() -> PageHinkley:
    """Page-Hinkley on standardised residuals, tuned for unit variance.

    ``delta = 0.5`` ignores shifts under half a standard deviation;
    ``threshold = 12`` catches a shift of 3 sd in about 6 samples and of 5 sd
    in about 3, with about one false alarm per 100,000 Gaussian samples.
    ``alpha = 1`` turns off river's fading of the sums: with fading, the sums
    lose their downward drift after ~1 / (1 - alpha) samples and false alarms
    become ten times more frequent. The class is our own copy of river's
    test (same parameters, same detections), which spares the controller
    the import of ``river.drift``.
    """
    return PageHinkley(min_instances=5, delta=0.5, threshold=12.0, alpha=1.0)


def _huber_consistency(c: float) -> float:
    """``E[min(Z^2, c^2)]`` for a standard normal ``Z``.

    Dividing Huber-clipped squared residuals by it keeps the noise variance
    estimate unbiased for Gaussian noise.
    """
    tail = 0.5 * math.erfc(c / _SQRT2)  # P(Z > c)
    density = _INV_SQRT_2PI * math.exp(-0.5 * c * c)
    return (1.0 - 2.0 * tail) - 2.0 * c * density + 2.0 * c * c * tail


def _positive_mean(mean: float, sd: float) -> float:
    """``E[X | X >= 0]`` for ``X ~ N(mean, sd^2)``."""
    ratio = mean / sd
    if ratio > 6.0:
        return mean  # the truncation moves it by less than 1e-8 sd
    if ratio < -30.0:
        return sd * sd / -mean  # asymptotic form; the direct one underflows
    tail = 0.5 * math.erfc(-ratio / _SQRT2)
    return mean + sd * _INV_SQRT_2PI * math.exp(-0.5 * ratio * ratio) / tail


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    total: float = sum(map(mul, a, b))
    return total


def _downdate_3(cov: list[float], h: list[float], inflate: float) -> list[float]:
    """``(C - h h^T) * inflate`` for a 3 x 3 ``C``, written out (the usual size).

    The same products in the same order as the general comprehension in
    :meth:`UtilityLearner._observe`, so the results match it bit for bit.
    """
    c0, c1, c2, c3, c4, c5, c6, c7, c8 = cov
    h0, h1, h2 = h
    return [
        (c0 - h0 * h0) * inflate,
        (c1 - h0 * h1) * inflate,
        (c2 - h0 * h2) * inflate,
        (c3 - h1 * h0) * inflate,
        (c4 - h1 * h1) * inflate,
        (c5 - h1 * h2) * inflate,
        (c6 - h2 * h0) * inflate,
        (c7 - h2 * h1) * inflate,
        (c8 - h2 * h2) * inflate,
    ]


# The constructor's arguments, which clone() passes on.
_PARAMETERS = (
    "resources",
    "ceiling",
    "prior",
    "forgetting",
    "noise",
    "noise_weight",
    "huber",
    "gate",
    "elasticity_max",
    "confident_sd",
    "drift_detector",
    "replay",
)

# One remembered sample: features, log accuracy (None if censored), and its
# standardised residual when it arrived.
_Sample = tuple[list[float], float | None, float]


class UtilityLearner(base.Regressor):
    """Bayesian online fit of one agent's capped Cobb-Douglas accuracy curve.

    The curve ``v = min(ceiling, A * prod_r z_r ** gamma_r)`` is linear in logs,
    ``log v = log A + sum_r gamma_r log z_r``, so each sample is one step of
    Bayesian linear regression on ``phi = (1, log z_1, ..., log z_R)``, run as
    a Kalman filter (posterior mean and covariance, O(p^2) per sample, no
    factorisation). On top of the plain conjugate update it handles the
    samples a fleet really sends:

    - **saturated** samples (accuracy at or above ``ceiling``) say only that
      the uncapped curve is at least the ceiling; they enter as a censored
      observation (one assumed-density-filtering step of a Tobit likelihood),
      never as an equality;
    - accuracy ``<= 0`` and resource amounts ``<= 0`` have no logarithm; the
      sample is skipped and counted. A floor such as ``1e-6`` would instead
      create a point of huge leverage (``log 1e-6 = -14``) that would decide
      the slope alone;
    - **outliers**: residuals are standardised by the predictive sd (noise plus
      parameter uncertainty, so a fresh learner gates nothing); beyond
      ``huber`` sds a sample's weight falls as ``huber / |t|``, and beyond
      ``gate`` sds it is not fitted at all;
    - **drift**: the standardised residuals feed a river drift detector; on a
      detection the posterior restarts from the prior and replays the recent
      samples that already followed the new behaviour, instead of averaging
      old and new;
    - slow change: each update forgets (``C <- C / forgetting``), so the
      posterior holds about ``1 / (1 - forgetting)`` samples; each variance is
      capped at its prior variance, so a direction the allocations never
      excite returns to the prior instead of blowing up.

    The noise sd (in log accuracy) is learned too, from Huber-clipped
    residuals.

    river's ``BayesianLinearRegression`` does not serve here: its prior has
    mean zero and one shared variance (we need a pooled, per-parameter prior
    and restarts towards it), its noise precision is fixed, its ``smoothing``
    re-inverts the matrix on every sample and also decays the prior, it has
    no per-sample weight (needed for Huber and censoring), and its numpy
    state costs more per sample than our whole update. river's drift
    detector interface does serve: any of its detectors plugs in, and the
    default is our copy of its Page-Hinkley test (:mod:`controller._pagehinkley`,
    kept out of ``river.drift`` for the controller's start-up time).

    Parameters
    ----------
    resources
        Names of the resources, in the order used by ``prior`` and arrays.
    ceiling
        Accuracy at which the agent saturates (default 1.0).
    prior
        Initial belief and restart point; ``None`` means :meth:`Prior.default`.
    forgetting
        Per-sample forgetting factor in (0, 1]; 1 never forgets.
    noise
        Prior guess of the noise sd of log accuracy.
    noise_weight
        How many samples that guess is worth.
    huber
        Standardised residual beyond which a sample is down-weighted.
    gate
        Standardised residual beyond which a sample is an outlier.
    elasticity_max
        Largest sum of elasticities handed out; below 1 keeps the solver's
        problem strictly concave.
    confident_sd
        An agent is confident when every elasticity's posterior sd is at most
        this.
    drift_detector
        A river drift detector fed with standardised residuals; ``None``
        means :func:`default_detector`, ``drift.NoDrift()`` disables it.
    replay
        How many recent samples are kept for replay after a detected drift.

    Examples
    --------
    >>> learner = UtilityLearner(["compute"], noise=0.01)
    >>> for z in [0.1, 0.3, 1.0, 3.0] * 5:
    ...     learner.learn_one({"compute": z}, 0.7 * z**0.05)
    >>> round(learner.elasticity["compute"], 3)
    0.05
    >>> round(learner.predict_one({"compute": 2.0}), 3)
    0.725
    """

    def __init__(
        self,
        resources: Sequence[str],
        ceiling: float = 1.0,
        prior: Prior | None = None,
        forgetting: float = 0.99,
        noise: float = 0.03,
        noise_weight: float = 20.0,
        huber: float = 2.0,
        gate: float = 6.0,
        elasticity_max: float = 0.98,
        confident_sd: float = 0.02,
        drift_detector: base.DriftDetector | None = None,
        replay: int = 8,
    ) -> None:
        self.resources = resources
        self.ceiling = ceiling
        self.prior = prior
        self.forgetting = forgetting
        self.noise = noise
        self.noise_weight = noise_weight
        self.huber = huber
        self.gate = gate
        self.elasticity_max = elasticity_max
        self.confident_sd = confident_sd
        self.drift_detector = drift_detector
        self.replay = replay
        self._check_params()

        self._resources = tuple(resources)
        self._size = len(self._resources) + 1
        self._prior = prior if prior is not None else Prior.default(len(resources))
        self._detector = (
            drift_detector if drift_detector is not None else default_detector()
        ).clone()
        self._huber_kappa = _huber_consistency(huber)
        self._log_ceiling = math.log(ceiling)

        self._noise_ss = noise_weight * noise * noise
        self._noise_n = noise_weight
        self._buffer: list[_Sample] = []  # the last `replay` samples
        self._suspects: list[_Sample] = []
        self._counts = dict.fromkeys(_OUTCOMES, 0)
        self._last_outcome: Outcome | None = None
        self._drift_detected = False
        self._restart()

    def clone(
        self, new_params: dict[str, Any] | None = None, include_attributes: bool = False
    ) -> Self:
        """A fresh learner with the same parameters (river's ``clone`` contract).

        The plain case skips river's signature inspection and deep copies,
        which cost about ten times the construction itself: a fleet clones
        its template for every agent that joins. The parameters are immutable
        values (a frozen prior, a detector the constructor clones), so
        sharing them is safe.
        """
        if include_attributes:
            return super().clone(new_params, include_attributes)
        params = {name: getattr(self, name) for name in _PARAMETERS}
        params.update(new_params or {})
        return type(self)(**params)

    def _check_params(self) -> None:
        checks = [
            ("resources", 1 <= len(self.resources) <= 3, "1 to 3 names"),
            ("ceiling", 0 < self.ceiling < math.inf, "a finite number > 0"),
            ("forgetting", 0 < self.forgetting <= 1, "a number in (0, 1]"),
            ("noise", 0 < self.noise < math.inf, "a finite number > 0"),
            ("noise_weight", self.noise_weight > 0, "a number > 0"),
            ("huber", 0 < self.huber <= self.gate, "0 < huber <= gate"),
            ("elasticity_max", 0 < self.elasticity_max < 1, "a number in (0, 1)"),
            ("confident_sd", self.confident_sd > 0, "a number > 0"),
            ("replay", self.replay >= 0, "an integer >= 0"),
        ]
        for name, ok, accepted in checks:
            if not ok:
                raise FairsynergyError(
                    f"UtilityLearner {name}={getattr(self, name)!r} is invalid; "
                    f"expected {accepted}"
                )
        if self.prior is not None and len(self.prior.mean) != len(self.resources) + 1:
            raise FairsynergyError(
                f"prior has {len(self.prior.mean)} entries; expected "
                f"{len(self.resources) + 1} (log scale, then one per resource)"
            )

    # ----------------------------------------------------------------- learning

    def learn_one(self, x: Mapping[Any, float], y: float) -> None:
        """Learn from one sample.

        Parameters
        ----------
        x
            Total amount in use of each resource, ``z_r = local_r + cloud_r``.
        y
            Measured accuracy at those amounts.
        """
        self._learn_one(x, y)

    def _learn_one(self, x: Mapping[Any, float], y: float) -> Outcome:
        try:
            amounts = [x[r] for r in self._resources]
        except KeyError:
            amounts = None
        return self._learn_amounts(amounts, y)

    def _learn_amounts(self, amounts: list[float] | None, y: float) -> Outcome:
        """Learn from total amounts in resource order (None: one was missing)."""
        self._drift_detected = False
        if self._suspects:
            self._suspects = []
        features = self._features(amounts)
        if features is None or not 0.0 < y < math.inf:
            outcome = Outcome.SKIPPED
        elif y >= self.ceiling:
            outcome = self._learn_censored(features)
        else:
            outcome = self._learn_measured(features, math.log(y))

        self._counts[outcome] += 1
        self._last_outcome = outcome
        return outcome

    @staticmethod
    def _features(amounts: list[float] | None) -> list[float] | None:
        """``(1, log z_1, ..., log z_R)``, or None when a log is undefined."""
        if amounts is None:
            return None
        try:
            # math.log refuses 0 and negatives; NaN and inf pass and are caught below.
            features = [1.0, *map(math.log, amounts)]
        except (ValueError, TypeError):
            return None
        return features if math.isfinite(sum(features)) else None

    def _learn_measured(self, features: list[float], log_y: float) -> Outcome:
        mean, gain = self._predictive(features)
        spread = _dot(gain, features)
        noise2 = self._noise_ss / self._noise_n
        t = (log_y - mean) / math.sqrt(noise2 + spread)
        # Robustness needs redundancy: until the posterior holds twice as many
        # samples as parameters there is no majority to judge a sample by,
        # and gating could lock in a fit to the first few.
        judged = abs(t) if self._n_samples >= 2 * self._size else 0.0

        if judged > self.gate:
            outcome = Outcome.OUTLIER
        else:
            weight = 1.0 if judged <= self.huber else self.huber / judged
            variance = spread + noise2 / weight
            self._observe(gain, (log_y - mean) / variance, 1.0 / variance)
            self._learn_noise(t, noise2)
            outcome = Outcome.FITTED

        self._remember((features, log_y, t))
        return self._watch(max(-self.gate, min(self.gate, t)), outcome)

    def _learn_censored(self, features: list[float]) -> Outcome:
        """Fold in "log u >= log ceiling" by matching the first two moments.

        The mean moves by the inverse Mills ratio of the truncated predictive
        normal and the variance along ``C phi`` shrinks by ``mills (mills +
        z)``; both vanish when the prediction is already well above the
        ceiling, so such samples teach (correctly) almost nothing.
        """
        mean, gain = self._predictive(features)
        spread = _dot(gain, features)
        noise2 = self._noise_ss / self._noise_n
        z = (mean - self._log_ceiling) / math.sqrt(noise2 + spread)

        # How far the ceiling sits above the prediction, in predictive sds.
        self._remember((features, None, -z))
        if z < -self.gate:
            return self._watch(self.gate, Outcome.OUTLIER)

        self._observe_censored(gain, mean, spread, noise2)
        return Outcome.CENSORED

    def _observe_censored(
        self, gain: list[float], mean: float, spread: float, noise2: float
    ) -> None:
        sd = math.sqrt(max(noise2 + spread, MIN_VARIANCE))
        z = (mean - self._log_ceiling) / sd
        tail = 0.5 * math.erfc(-z / _SQRT2)
        # Far below the ceiling the tail underflows; the ratio tends to -z.
        mills = _INV_SQRT_2PI * math.exp(-0.5 * z * z) / tail if tail > 1e-300 else -z
        self._observe(gain, mills / sd, mills * (mills + z) / (sd * sd))

    def _remember(self, sample: _Sample) -> None:
        self._buffer.append(sample)
        if len(self._buffer) > self.replay:
            del self._buffer[0]

    def _watch(self, residual: float, outcome: Outcome) -> Outcome:
        """Feed the drift detector; restart on a detection."""
        self._detector.update(residual)
        if not self._detector.drift_detected:
            return outcome

        self._suspects = self._recent_run(residual)
        self._buffer.clear()
        self._restart()
        self._drift_detected = True
        return Outcome.DRIFT

    def _recent_run(self, residual: float) -> list[_Sample]:
        """The latest samples that already lean the way the drift does."""
        sign = 1.0 if residual > 0 else -1.0
        run: list[_Sample] = []
        for sample in reversed(self._buffer):
            if sample[2] * sign < _REPLAY_RESIDUAL:
                break
            run.append(sample)
        run.reverse()
        return run

    def reset(self, prior: Prior | None = None, *, replay: bool = True) -> None:
        """Restart the posterior from ``prior`` (or the current one).

        With ``replay``, the samples that triggered a drift detection in the
        latest :meth:`learn_one` are replayed, so a fleet can swap in a
        fresher pooled prior right after :attr:`drift_detected` without losing
        them.
        """
        if not replay:
            self._suspects = []
        if prior is not None:
            if len(prior.mean) != self._size:
                raise FairsynergyError(
                    f"prior has {len(prior.mean)} entries; expected {self._size}"
                )
            self.prior = prior
            self._prior = prior
        self._restart()

    def _restart(self) -> None:
        size = self._size
        self._prior_variance = [sd * sd for sd in self._prior.sd]
        self._mean = list(self._prior.mean)
        self._cov = [0.0] * (size * size)
        self._cov[:: size + 1] = self._prior_variance
        self._n_samples = 0
        self._changed()

        noise2 = self._noise_ss / self._noise_n
        for features, log_y, _ in self._suspects:
            mean, gain = self._predictive(features)
            spread = _dot(gain, features)
            if log_y is None:
                self._observe_censored(gain, mean, spread, noise2)
            else:
                variance = spread + noise2
                self._observe(gain, (log_y - mean) / variance, 1.0 / variance)

    # ------------------------------------------------------------ linear algebra
    # Kalman filter in covariance form: the covariance ``C`` as one flat
    # row-major list and the mean ``m``. p <= 4, so plain floats beat numpy
    # (bench/bench_learn.py); the loops run inside map/product, and zips in the
    # hot path skip the strict length check.

    def _predictive(self, features: list[float]) -> tuple[float, list[float]]:
        """Predicted ``log u`` at ``features`` and ``C phi``."""
        size = self._size
        if size == 3:
            return self._predictive_3(features)
        products = list(map(mul, self._cov, features * size))
        gain = [sum(products[k : k + size]) for k in range(0, size * size, size)]
        return _dot(self._mean, features), gain

    def _predictive_3(self, features: list[float]) -> tuple[float, list[float]]:
        """:meth:`_predictive` written out for two resources (the usual case).

        The sums start from 0 and add left to right, as ``sum`` does, so the
        results are the general path's bit for bit (tested).
        """
        f0, f1, f2 = features
        c0, c1, c2, c3, c4, c5, c6, c7, c8 = self._cov
        m0, m1, m2 = self._mean
        gain = [
            0.0 + c0 * f0 + c1 * f1 + c2 * f2,
            0.0 + c3 * f0 + c4 * f1 + c5 * f2,
            0.0 + c6 * f0 + c7 * f1 + c8 * f2,
        ]
        return 0.0 + m0 * f0 + m1 * f1 + m2 * f2, gain

    def _observe(self, gain: list[float], step: float, shrink: float) -> None:
        """``m += step C phi``; ``C <- (C - shrink (C phi)(C phi)^T) / forgetting``.

        For a measured sample ``step = r / s`` and ``shrink = 1 / s`` with ``s``
        the predictive variance (the usual Kalman update); a censored sample
        passes its moment-matched values. The rank-one term is formed from
        ``h = sqrt(shrink) C phi`` so ``h_i h_j == h_j h_i`` bit for bit and
        ``C`` stays exactly symmetric; then each variance above its prior
        variance is scaled back by a diagonal congruence, which keeps ``C``
        positive definite.
        """
        self._mean = [m + g * step for m, g in zip(self._mean, gain, strict=False)]
        # A censored sample's moment matching can ask for a (tiny) negative
        # shrink at extreme operating points; never let it grow the variance.
        root = math.sqrt(max(shrink, 0.0))
        h = [root * g for g in gain]
        inflate = 1.0 / self.forgetting
        if self._size == 3:
            self._cov = _downdate_3(self._cov, h, inflate)
        else:
            self._cov = [
                (c - hi * hj) * inflate
                for c, (hi, hj) in zip(self._cov, product(h, h), strict=False)
            ]
        if any(map(gt, self._cov[:: self._size + 1], self._prior_variance)):
            self._cap_variances()
        self._n_samples += 1
        self._changed()

    def _cap_variances(self) -> None:
        """Scale rows and columns so that no variance exceeds the prior's."""
        size = self._size
        factors = [
            min(1.0, math.sqrt(limit / variance))
            for variance, limit in zip(
                self._cov[:: size + 1], self._prior_variance, strict=True
            )
        ]
        self._cov = [
            c * fi * fj
            for c, (fi, fj) in zip(self._cov, product(factors, factors), strict=True)
        ]

    def _learn_noise(self, t: float, noise2: float) -> None:
        """Exponentially weighted noise variance from Huber-clipped residuals."""
        clipped = min(t * t, self.huber * self.huber) / self._huber_kappa
        keep = self.forgetting
        self._noise_ss = keep * self._noise_ss + noise2 * clipped
        self._noise_n = keep * self._noise_n + 1.0

    def _changed(self) -> None:
        self._chol: list[list[float]] | None = None
        self._estimate: list[float] | None = None
        self._weights: list[float] | None = None

    def _feasible(self, theta: Sequence[float], *, lift: bool = False) -> list[float]:
        """Move ``theta`` so its elasticities are usable by the solver.

        With ``lift``, each elasticity first becomes its posterior mean given
        that it is non-negative (see :meth:`_theta`). Then the elasticities are
        projected onto ``{g >= 0, sum(g) <= elasticity_max}`` in the posterior
        metric (the most probable feasible point, not the nearest in plain
        distance: a direction the data pin down moves less than one they leave
        loose). The log scale follows its conditional mean given them, so the
        curve still passes near the samples it was fitted to.
        """
        elasticity = list(theta[1:])
        target = self._lifted(elasticity) if lift else elasticity
        feasible = min(target) >= 0.0 and sum(target) <= self.elasticity_max
        if feasible and target == elasticity:
            return list(theta)

        if not feasible:
            target = linalg.project_elasticities(
                target, self._elasticity_block(), self.elasticity_max
            )
        moved = [g - e for g, e in zip(target, elasticity, strict=False)]
        # Conditional mean of log A given the elasticities: C_ag C_gg^-1 (g - m_g).
        return [theta[0] + _dot(self._shift_weights(), moved), *target]

    def _elasticity_block(self) -> list[list[float]]:
        """``C_gg``, the elasticities' covariance, as rows."""
        size, cov = self._size, self._cov
        return [cov[k + 1 : k + size] for k in range(size, size * size, size)]

    def _shift_weights(self) -> list[float]:
        """``C_gg^-1 C_ga``, cached until the posterior changes."""
        if self._weights is None:
            self._weights = linalg.solve_small(
                self._elasticity_block(), self._cov[1 : self._size]
            )
        return self._weights

    def _rows(self) -> list[list[float]]:
        size = self._size
        return [self._cov[k : k + size] for k in range(0, size * size, size)]

    def _lifted(self, elasticity: Sequence[float]) -> list[float]:
        """Each elasticity's posterior mean given that it is non-negative."""
        size = self._size
        return [
            _positive_mean(
                mean, math.sqrt(max(self._cov[(r + 1) * (size + 1)], MIN_VARIANCE))
            )
            for r, mean in enumerate(elasticity)
        ]

    def _theta(self) -> list[float]:
        """The estimate handed to the solver.

        Not the projected mode: an elasticity whose posterior straddles 0
        would be projected to exactly 0, the solver would then give the agent
        none of that resource, its amount would stay at the local one, and no
        later sample could show the learner its mistake. The mean of the
        posterior truncated to ``g >= 0`` stays positive while in doubt and
        falls to the plain mean as the doubt shrinks.
        """
        if self._estimate is None:
            self._estimate = self._feasible(self._mean, lift=True)
        return self._estimate

    def _draw(self, normals: Sequence[float]) -> list[float]:
        """A feasible posterior sample from standard normal draws."""
        if self._chol is None:
            self._chol = linalg.cholesky(self._rows())
        offset = [_dot(row, normals) for row in self._chol]
        return self._feasible([m + o for m, o in zip(self._mean, offset, strict=True)])

    # ---------------------------------------------------------------- reading

    def predict_one(self, x: Mapping[Any, float]) -> float:
        """Predicted accuracy ``min(ceiling, A prod z^gamma)`` at the estimate.

        The estimate is the feasible posterior mode, so this is the curve the
        solver sees (in log space it is the median, not the mean).
        """
        return self._predict(map(x.__getitem__, self._resources))

    def _predict(self, amounts: Iterable[float]) -> float:
        """:meth:`predict_one` at total amounts given in resource order."""
        theta = self._theta()
        log_u = theta[0]
        for gamma, total in zip(theta[1:], amounts, strict=False):
            amount = max(0.0, total)
            if amount == 0.0:
                return 0.0 if gamma > 0.0 else min(self.ceiling, math.exp(log_u))
            log_u += gamma * math.log(amount)
        return min(self.ceiling, math.exp(log_u))

    def sample(self, rng: random.Random) -> tuple[float, dict[str, float]]:
        """Draw ``(scale, elasticity)`` from the posterior, made feasible."""
        theta = self._draw([rng.gauss(0.0, 1.0) for _ in range(self._size)])
        return math.exp(theta[0]), dict(zip(self._resources, theta[1:], strict=True))

    @property
    def scale(self) -> float:
        """Estimated ``A`` (exp of the feasible posterior mode of log A)."""
        return math.exp(self._theta()[0])

    @property
    def elasticity(self) -> dict[str, float]:
        """Estimated elasticity per resource: >= 0, summing to <= elasticity_max."""
        return dict(zip(self._resources, self._theta()[1:], strict=True))

    @property
    def uncertainty(self) -> dict[str, float]:
        """Posterior sd: of log A under ``"scale"``, then of each elasticity."""
        sds = [math.sqrt(v) for v in self._cov[:: self._size + 1]]
        return dict(zip(("scale", *self._resources), sds, strict=True))

    @property
    def confident(self) -> bool:
        """True when every elasticity's posterior sd is at most ``confident_sd``."""
        limit = self.confident_sd**2
        return max(self._cov[self._size + 1 :: self._size + 1]) <= limit

    @property
    def noise_sd(self) -> float:
        """Estimated noise sd of log accuracy."""
        return math.sqrt(self._noise_ss / self._noise_n)

    @property
    def n_samples(self) -> int:
        """Samples held by the current posterior (since the last restart)."""
        return self._n_samples

    @property
    def counts(self) -> dict[str, int]:
        """Lifetime number of samples per :class:`Outcome`."""
        # The counts are always kept in the order of _OUTCOMES.
        return dict(zip(_OUTCOME_NAMES, self._counts.values(), strict=False))

    @property
    def last_outcome(self) -> Outcome | None:
        """What the latest :meth:`learn_one` did with its sample."""
        return self._last_outcome

    @property
    def drift_detected(self) -> bool:
        """True right after a :meth:`learn_one` that detected a drift."""
        return self._drift_detected

    @property
    def current_prior(self) -> Prior:
        """The prior the posterior restarts from and forgets towards."""
        return self._prior

    # ---------------------------------------------------------------- state

    def to_state(self) -> dict[str, Any]:
        """Return everything needed to continue learning, as plain data."""
        return {
            "version": STATE_VERSION,
            "params": {
                "resources": list(self._resources),
                "ceiling": self.ceiling,
                "prior": self._prior.to_state(),
                "forgetting": self.forgetting,
                "noise": self.noise,
                "noise_weight": self.noise_weight,
                "huber": self.huber,
                "gate": self.gate,
                "elasticity_max": self.elasticity_max,
                "confident_sd": self.confident_sd,
                "replay": self.replay,
            },
            "detector": detector_to_state(self._detector),
            "mean": list(self._mean),
            "covariance": self._rows(),
            "noise_ss": self._noise_ss,
            "noise_n": self._noise_n,
            # A sample's features are never changed once built: no copy.
            "buffer": [[f, y, t] for f, y, t in self._buffer],
            "n_samples": self._n_samples,
            "counts": self.counts,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> UtilityLearner:
        """Rebuild a learner saved by :meth:`to_state`."""
        if state.get("version") != STATE_VERSION:
            raise FairsynergyError(
                f"learner state version {state.get('version')!r} is not "
                f"supported; expected {STATE_VERSION}"
            )
        params = dict(state["params"])
        params["prior"] = Prior.from_state(params["prior"])
        detector = detector_from_state(state["detector"])
        learner = cls(**params, drift_detector=detector)
        # The constructor's fresh clone becomes the parameter; the restored
        # detector, with its running sums, the one in use.
        learner.drift_detector, learner._detector = learner._detector, detector

        learner._mean = [float(v) for v in state["mean"]]
        learner._cov = [float(v) for row in state["covariance"] for v in row]
        learner._noise_ss = float(state["noise_ss"])
        learner._noise_n = float(state["noise_n"])
        learner._buffer.extend((list(f), y, t) for f, y, t in state["buffer"])
        learner._n_samples = int(state["n_samples"])
        counts = state["counts"]
        learner._counts = {o: int(counts[n]) for n, o in _OUTCOMES_BY_NAME.items()}
        learner._changed()
        return learner
