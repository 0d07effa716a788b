"""The online utility learner: one agent (UtilityLearner) and the fleet layer."""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from itertools import product

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import base, drift

from controller._agent_learner import _downdate_3
from controller._detector_state import detector_from_state, detector_to_state
from controller._pagehinkley import PageHinkley
from controller._posterior import (
    _solve_general,
    project_elasticities,
    project_many,
    solve_small,
)
from controller.errors import FairsynergyError
from controller.learn import (
    FleetLearner,
    Outcome,
    Prior,
    UtilityLearner,
    default_detector,
)

RESOURCES = ("compute", "data")
# river's NoDrift has an unannotated constructor; build it once, untyped.
NO_DRIFT: drift.NoDrift = drift.NoDrift()  # type: ignore[no-untyped-call]
TRUE_SCALE = 0.75
TRUE_ELASTICITY = np.array([0.06, 0.03])


def curve(
    amounts: np.ndarray, scale: float = TRUE_SCALE, gamma: np.ndarray = TRUE_ELASTICITY
) -> np.ndarray:
    """Uncapped Cobb-Douglas accuracy at each row of ``amounts``."""
    return np.asarray(scale * np.prod(amounts**gamma, axis=-1))


def operating_points(rng: np.random.Generator, n: int) -> np.ndarray:
    """Varied totals ``z``, log-uniform over two decades per resource."""
    return np.exp(rng.uniform(np.log(0.02), np.log(2.0), size=(n, len(RESOURCES))))


def feed(learner: UtilityLearner, amounts: np.ndarray, accuracy: np.ndarray) -> None:
    for z, y in zip(amounts, accuracy, strict=True):
        learner.learn_one(dict(zip(RESOURCES, z.tolist(), strict=True)), float(y))


def noisy(rng: np.random.Generator, clean: np.ndarray, noise: float) -> np.ndarray:
    return clean * np.exp(noise * rng.standard_normal(clean.shape))


def elasticities(learner: UtilityLearner) -> np.ndarray:
    return np.array([learner.elasticity[r] for r in RESOURCES])


# ----------------------------------------------------------------- accuracy


def test_learn_recovers_true_parameters_from_noisy_samples():
    """With 2% noise at varied amounts the estimate lands within 3 sd of the truth."""
    rng = np.random.default_rng(7)
    amounts = operating_points(rng, 300)
    learner = UtilityLearner(RESOURCES)

    feed(learner, amounts, noisy(rng, curve(amounts), 0.02))

    sd = np.array([learner.uncertainty[r] for r in RESOURCES])
    assert np.all(np.abs(elasticities(learner) - TRUE_ELASTICITY) < 3 * sd)
    assert np.all(sd < 0.005)
    assert learner.scale == pytest.approx(TRUE_SCALE, rel=0.02)
    assert learner.noise_sd == pytest.approx(0.02, rel=0.25)
    assert learner.confident


def test_learn_matches_closed_form_posterior_without_forgetting():
    """With fixed noise and no forgetting the filter is batch Bayesian regression."""
    rng = np.random.default_rng(3)
    amounts = operating_points(rng, 40)
    accuracy = noisy(rng, curve(amounts), 0.02)
    prior = Prior(mean=(math.log(0.8), 0.1, 0.1), sd=(0.5, 0.1, 0.1))
    learner = UtilityLearner(
        RESOURCES, prior=prior, forgetting=1.0, noise=0.02, noise_weight=1e15,
        huber=1e6, gate=1e6, drift_detector=NO_DRIFT,
    )  # fmt: skip

    feed(learner, amounts, accuracy)

    design = np.column_stack([np.ones(len(amounts)), np.log(amounts)])
    precision = np.diag(1 / np.array(prior.sd) ** 2) + design.T @ design / 0.02**2
    shift = np.array(prior.mean) / np.array(prior.sd) ** 2
    shift = shift + design.T @ np.log(accuracy) / 0.02**2
    expected = np.linalg.solve(precision, shift)
    expected_sd = np.sqrt(np.diag(np.linalg.inv(precision)))
    assert elasticities(learner) == pytest.approx(expected[1:], abs=1e-9)
    assert math.log(learner.scale) == pytest.approx(expected[0], abs=1e-9)
    assert list(learner.uncertainty.values()) == pytest.approx(expected_sd, rel=1e-6)


def test_learn_uncertainty_shrinks_with_samples():
    """Posterior sds fall as samples at varied amounts arrive."""
    rng = np.random.default_rng(11)
    amounts = operating_points(rng, 60)
    accuracy = noisy(rng, curve(amounts), 0.02)
    learner = UtilityLearner(RESOURCES)
    before = learner.uncertainty["compute"]

    feed(learner, amounts[:10], accuracy[:10])
    middle = learner.uncertainty["compute"]
    feed(learner, amounts[10:], accuracy[10:])

    assert before > middle > learner.uncertainty["compute"]
    assert learner.n_samples == 60


def test_learn_elasticity_in_doubt_stays_positive():
    """An elasticity whose posterior straddles 0 is estimated above 0, less so later."""
    rng = np.random.default_rng(9)
    amounts = operating_points(rng, 400)
    gamma = np.array([0.0, 0.05])
    accuracy = noisy(rng, curve(amounts, 0.7, gamma), 0.05)
    learner = UtilityLearner(RESOURCES, forgetting=1.0)

    feed(learner, amounts[:15], accuracy[:15])
    early = (learner.elasticity["compute"], learner.uncertainty["compute"])
    feed(learner, amounts[15:], accuracy[15:])

    assert 0 < early[0] < 2 * early[1]
    assert 0 < learner.elasticity["compute"] < early[0] / 2


# ------------------------------------------------------------- hard samples


def test_learn_censored_samples_do_not_bias_elasticity():
    """Saturated reports are censored; taking them as exact would flatten the slope."""
    rng = np.random.default_rng(5)
    amounts = operating_points(rng, 400)
    ceiling = float(np.median(curve(amounts)))  # half the samples saturate
    reported = np.minimum(ceiling, noisy(rng, curve(amounts), 0.02))
    censoring = UtilityLearner(RESOURCES, ceiling=ceiling)
    naive = UtilityLearner(RESOURCES, ceiling=10.0)  # sees the caps as exact

    feed(censoring, amounts, reported)
    feed(naive, amounts, reported)

    error = np.abs(elasticities(censoring) - TRUE_ELASTICITY).max()
    naive_error = np.abs(elasticities(naive) - TRUE_ELASTICITY).max()
    assert censoring.counts["censored"] > 150
    assert error < 0.006
    assert naive_error > 3 * error


def test_learn_gross_outlier_barely_moves_estimate():
    """One absurd report is gated: the estimate and its uncertainty do not move."""
    rng = np.random.default_rng(2)
    amounts = operating_points(rng, 100)
    learner = UtilityLearner(RESOURCES)
    feed(learner, amounts, noisy(rng, curve(amounts), 0.02))
    before = (learner.scale, elasticities(learner))

    learner.learn_one({"compute": 1.0, "data": 1.0}, 0.05)

    assert learner.last_outcome is Outcome.OUTLIER
    assert learner.scale == before[0]
    assert np.array_equal(elasticities(learner), before[1])


def test_learn_moderate_outlier_is_down_weighted():
    """A 4-sd residual moves the estimate about half as much as a plain update would."""
    rng = np.random.default_rng(4)
    amounts = operating_points(rng, 100)
    accuracy = noisy(rng, curve(amounts), 0.02)
    robust = UtilityLearner(RESOURCES)
    plain = UtilityLearner(RESOURCES, huber=1e6, gate=1e6)
    feed(robust, amounts, accuracy)
    feed(plain, amounts, accuracy)
    point = {"compute": 1.5, "data": 0.05}
    bad = robust.predict_one(point) * math.exp(4 * robust.noise_sd)

    moves = []
    for learner in (robust, plain):
        before = learner.predict_one(point)
        learner.learn_one(point, bad)
        moves.append(learner.predict_one(point) - before)

    assert 0 < moves[0] < 0.7 * moves[1]


@pytest.mark.parametrize(
    ("x", "y"),
    [
        ({"compute": 1.0, "data": 1.0}, 0.0),
        ({"compute": 1.0, "data": 1.0}, -0.2),
        ({"compute": 1.0, "data": 1.0}, math.nan),
        ({"compute": 0.0, "data": 1.0}, 0.7),
        ({"compute": -1.0, "data": 1.0}, 0.7),
        ({"compute": math.inf, "data": 1.0}, 0.7),
        ({"compute": 1.0}, 0.7),
    ],
)
def test_learn_sample_without_logarithm_is_skipped(x, y):
    """Zero or invalid accuracy or amounts are skipped, counted and change nothing."""
    learner = UtilityLearner(RESOURCES)
    feed(learner, np.array([[0.5, 0.5], [1.0, 2.0]]), np.array([0.7, 0.74]))
    before = learner.to_state()

    learner.learn_one(x, y)

    assert learner.last_outcome is Outcome.SKIPPED
    assert learner.counts["skipped"] == 1
    after = learner.to_state()
    assert after["mean"] == before["mean"]
    assert after["covariance"] == before["covariance"]


def test_learn_predict_one_handles_zero_amount():
    """Predicting at a zero amount gives 0 accuracy rather than a math error."""
    learner = UtilityLearner(RESOURCES)

    assert learner.predict_one({"compute": 0.0, "data": 1.0}) == 0.0


# -------------------------------------------------------------------- drift


def drift_error(
    detector: base.DriftDetector | None, rng_seed: int, after: int
) -> tuple[float, int]:
    """Elasticity error ``after`` samples past an abrupt change, and detections."""
    rng = np.random.default_rng(rng_seed)
    learner = UtilityLearner(RESOURCES, drift_detector=detector)
    new_gamma = np.array([0.01, 0.12])
    old = operating_points(rng, 200)
    feed(learner, old, noisy(rng, curve(old), 0.02))
    new = operating_points(rng, after)

    feed(learner, new, noisy(rng, curve(new, 0.6, new_gamma), 0.02))

    return float(np.abs(elasticities(learner) - new_gamma).max()), learner.counts[
        "drift"
    ]


def test_learn_drift_detected_and_relearned_faster():
    """After an abrupt change, detection and restart beat plain forgetting."""
    error, detections = drift_error(None, 8, after=15)
    slow_error, _ = drift_error(NO_DRIFT, 8, after=15)

    assert detections == 1
    assert error < 0.02
    assert slow_error > 2 * error


def test_learn_no_false_drift_on_stationary_stream():
    """A long stationary stream with 5% noise raises no drift alarm."""
    rng = np.random.default_rng(13)
    amounts = operating_points(rng, 3000)
    learner = UtilityLearner(RESOURCES)

    feed(learner, amounts, noisy(rng, curve(amounts), 0.05))

    assert learner.counts["drift"] == 0


# ------------------------------------------------------- feasibility (maths)


@st.composite
def posteriors(draw):
    """A mean anywhere near the feasible set and a random PD covariance."""
    size = draw(st.integers(1, 3))
    mean = draw(st.lists(st.floats(-2, 2), min_size=size, max_size=size))
    factor = np.array(
        draw(st.lists(st.floats(-1, 1), min_size=size * size, max_size=size * size))
    ).reshape(size, size)
    covariance = factor @ factor.T + 0.05 * np.eye(size)
    return np.array(mean), covariance


@settings(max_examples=200, deadline=None)
@given(posteriors(), st.floats(0.05, 0.99))
def test_learn_projection_is_feasible_and_optimal(posterior, sum_max):
    """The projection is feasible, and no feasible point is closer in its metric."""
    mean, covariance = posterior
    precision = np.linalg.inv(covariance)

    point = np.array(project_elasticities(mean, covariance.tolist(), sum_max))

    assert point.min() >= 0.0
    assert point.sum() <= sum_max + 1e-12
    rng = np.random.default_rng(0)
    rivals = rng.dirichlet(np.ones(len(mean) + 1), size=300)[:, :-1] * sum_max

    def distance(g: np.ndarray) -> np.ndarray:
        return np.asarray(np.einsum("...i,ij,...j->...", g - mean, precision, g - mean))

    assert distance(point) <= distance(rivals).min() + 1e-9


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(1e-3, 1e3), st.floats(1e-3, 1e3), st.floats(1e-3, 1.5)),
        min_size=1,
        max_size=30,
    )
)
def test_learn_estimates_always_usable_by_solver(samples):
    """Whatever arrives, estimates and samples stay in the concave region, scale > 0."""
    learner = UtilityLearner(RESOURCES)
    rng = np.random.default_rng(0)

    for compute, data, accuracy in samples:
        learner.learn_one({"compute": compute, "data": data}, accuracy)

        drawn = learner._draw(rng.standard_normal(3).tolist())
        for gamma in (elasticities(learner), drawn[1:]):
            assert min(gamma) >= 0.0
            assert sum(gamma) <= learner.elasticity_max + 1e-12
        assert 0.0 < learner.scale < math.inf


# -------------------------------------------------------------------- state


def test_learn_state_round_trip_gives_identical_predictions():
    """Saving through JSON and restoring predicts, and goes on learning, identically."""
    rng = np.random.default_rng(17)
    amounts = operating_points(rng, 80)
    accuracy = noisy(rng, curve(amounts), 0.02)
    learner = UtilityLearner(RESOURCES, ceiling=0.8)
    feed(learner, amounts[:50], accuracy[:50])

    restored = UtilityLearner.from_state(json.loads(json.dumps(learner.to_state())))
    feed(learner, amounts[50:], accuracy[50:])
    feed(restored, amounts[50:], accuracy[50:])

    probes = operating_points(rng, 20)
    for z in probes:
        x = dict(zip(RESOURCES, z.tolist(), strict=True))
        assert restored.predict_one(x) == learner.predict_one(x)  # bit for bit
    assert restored.to_state() == learner.to_state()


def test_learn_state_refuses_unknown_version():
    """A state from another version is refused with a clear message."""
    state = UtilityLearner(RESOURCES).to_state()
    state["version"] = 99

    with pytest.raises(FairsynergyError, match="version 99"):
        UtilityLearner.from_state(state)


def test_learn_state_refuses_unsaveable_detector():
    """A detector whose state cannot be JSON is refused by name when saving."""
    adwin = drift.ADWIN()  # type: ignore[no-untyped-call]
    learner = UtilityLearner(RESOURCES, drift_detector=adwin)

    with pytest.raises(FairsynergyError, match="ADWIN"):
        learner.to_state()


def test_learn_rejects_invalid_parameter():
    """Constructor parameters outside their range are refused, naming them."""
    with pytest.raises(FairsynergyError, match="forgetting"):
        UtilityLearner(RESOURCES, forgetting=1.5)


# -------------------------------------------------------------------- fleet


def report(
    fleet: FleetLearner,
    agent: str,
    z: Sequence[float],
    accuracy: float,
    *,
    seq: int,
    model: str | None = None,
) -> Outcome:
    local = {"compute": 0.01, "data": 0.01}
    cloud = {r: z[i] - 0.01 for i, r in enumerate(RESOURCES)}
    return fleet.learn_one(agent, local, cloud, accuracy, seq=seq, model=model)


def test_learn_fleet_drops_duplicate_and_stale_samples():
    """Repeated or older seqs are dropped and counted; the posterior ignores them."""
    fleet = FleetLearner(RESOURCES)
    report(fleet, "a1", (0.5, 0.5), 0.7, seq=5)
    report(fleet, "a1", (1.0, 0.5), 0.72, seq=6)

    outcomes = [
        report(fleet, "a1", (1.0, 0.5), 0.72, seq=6),
        report(fleet, "a1", (2.0, 0.5), 0.74, seq=3),
    ]

    assert outcomes == [Outcome.DUPLICATE, Outcome.STALE]
    assert (fleet.n_duplicates, fleet.n_stale) == (1, 1)
    assert fleet["a1"].n_samples == 2


def train_group(
    fleet: FleetLearner,
    rng: np.random.Generator,
    model: str,
    gamma: np.ndarray,
    agents: int = 4,
    samples: int = 40,
) -> None:
    for k in range(agents):
        amounts = operating_points(rng, samples)
        accuracy = noisy(rng, curve(amounts, 0.7, gamma), 0.02)
        for seq, (z, y) in enumerate(zip(amounts, accuracy, strict=True)):
            report(fleet, f"{model}-{k}", z.tolist(), float(y), seq=seq, model=model)


def test_learn_fleet_cold_start_uses_pooled_prior_of_same_model():
    """A newcomer starts from its model's pool, or the fleet-wide pool if unknown."""
    rng = np.random.default_rng(21)
    fleet = FleetLearner(RESOURCES)
    train_group(fleet, rng, "flat", np.array([0.01, 0.01]))
    train_group(fleet, rng, "steep", np.array([0.15, 0.05]))
    fleet.refresh_priors()

    steep = fleet.add_agent("new-steep", model="steep")
    unknown = fleet.add_agent("new-other", model="other")

    assert steep.current_prior.mean[1:] == pytest.approx([0.15, 0.05], abs=0.01)
    assert steep.current_prior.sd[1] < 0.05
    assert elasticities(steep) == pytest.approx([0.15, 0.05], abs=0.01)
    assert unknown.current_prior.mean[1:] == pytest.approx([0.08, 0.03], abs=0.01)
    assert unknown.current_prior.sd == Prior.default(2).sd


def test_learn_fleet_model_change_restarts_from_that_pool():
    """An agent that reports a new model label restarts from that model's pool."""
    rng = np.random.default_rng(22)
    fleet = FleetLearner(RESOURCES)
    train_group(fleet, rng, "flat", np.array([0.01, 0.01]))
    train_group(fleet, rng, "steep", np.array([0.15, 0.05]))
    fleet.refresh_priors()

    report(fleet, "flat-0", (1.0, 1.0), 0.7, seq=1000, model="steep")

    assert fleet.model("flat-0") == "steep"
    assert fleet["flat-0"].elasticity["compute"] > 0.1


def test_learn_fleet_arrays_follow_agent_order():
    """Estimates and Thompson samples come as arrays in the order asked for."""
    rng = np.random.default_rng(23)
    fleet = FleetLearner(RESOURCES)
    train_group(fleet, rng, "flat", np.array([0.01, 0.01]), agents=2)
    train_group(fleet, rng, "steep", np.array([0.15, 0.05]), agents=2)

    estimates = fleet.estimates(["steep-1", "flat-0"])
    sample = fleet.sample(np.random.default_rng(0), ["steep-1", "flat-0"])

    assert estimates.agents == ("steep-1", "flat-0")
    assert estimates.elasticity.shape == sample.elasticity.shape == (2, 2)
    assert estimates.elasticity[0, 0] > 0.1 > estimates.elasticity[1, 0]
    assert np.all(sample.elasticity >= 0)
    assert np.all(sample.scale > 0)
    assert estimates.local.tolist() == [[0.01, 0.01], [0.01, 0.01]]
    assert np.all((estimates.uncertainty >= 0) & (estimates.uncertainty <= 1))


def test_learn_fleet_state_round_trip():
    """A whole fleet survives JSON: same estimates, same seq bookkeeping."""
    rng = np.random.default_rng(24)
    fleet = FleetLearner(RESOURCES)
    train_group(fleet, rng, "flat", np.array([0.01, 0.01]), agents=3)

    restored = FleetLearner.from_state(json.loads(json.dumps(fleet.to_state())))

    assert restored.estimates().elasticity.tolist() == (
        fleet.estimates().elasticity.tolist()
    )
    assert report(restored, "flat-0", (1.0, 1.0), 0.7, seq=0) is Outcome.STALE


def test_learn_fleet_drift_restarts_with_wide_spread():
    """After a detected drift the agent restarts from its pool's centre, widely."""
    rng = np.random.default_rng(25)
    fleet = FleetLearner(RESOURCES)
    train_group(fleet, rng, "flat", np.array([0.01, 0.01]))
    fleet.refresh_priors()
    pooled = fleet.prior_for("flat")
    amounts = operating_points(rng, 10)

    outcomes = [
        report(fleet, "flat-0", z.tolist(), float(y), seq=100 + k, model="flat")
        for k, (z, y) in enumerate(zip(amounts, curve(amounts, 0.5), strict=True))
    ]

    assert Outcome.DRIFT in outcomes
    prior = fleet["flat-0"].current_prior
    assert prior.mean == pooled.mean
    assert prior.sd == Prior.default(2).sd
    assert all(p > q for p, q in zip(prior.sd, pooled.sd, strict=True))


# ------------------------------------------------- Page-Hinkley against river


def residual_stream(
    seed: int, shift: float, at: int = 400, n: int = 1200
) -> list[float]:
    """Standard normal residuals whose mean moves by ``shift`` sds at ``at``."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n)
    values[at:] += shift
    return [float(v) for v in values]


def detections(detector: base.DriftDetector, stream: list[float]) -> list[int]:
    flagged = []
    for k, value in enumerate(stream):
        detector.update(value)
        if detector.drift_detected:
            flagged.append(k)
    return flagged


@pytest.mark.parametrize("shift", [0.0, 2.5, -2.5, 6.0, -6.0])
@pytest.mark.parametrize(
    "params",
    [
        {"min_instances": 5, "delta": 0.5, "threshold": 12.0, "alpha": 1.0},
        {"min_instances": 30, "delta": 0.005, "threshold": 5.0, "alpha": 0.999},
        {"min_instances": 5, "delta": 0.1, "threshold": 3.0, "mode": "up"},
        {"min_instances": 5, "delta": 0.1, "threshold": 3.0, "mode": "down"},
    ],
)
def test_learn_pagehinkley_flags_the_same_samples_as_river(shift, params):
    """Our Page-Hinkley flags drift at exactly river's samples, either way."""
    stream = residual_stream(31, shift)

    ours = detections(PageHinkley(**params), stream)
    reference = detections(drift.PageHinkley(**params), stream)

    assert ours == reference
    if shift and params["threshold"] == 12.0:
        assert ours  # the learner's setting does see a shift of 2.5 sds


def test_learn_pagehinkley_default_matches_river_on_many_streams():
    """With the learner's parameters, 40 seeded streams give river's detections."""
    for seed in range(40):
        stream = residual_stream(seed, shift=(seed % 5 - 2) * 1.5, at=100 + seed)

        ours = detections(default_detector(), stream)
        reference = detections(
            drift.PageHinkley(min_instances=5, delta=0.5, threshold=12.0, alpha=1.0),
            stream,
        )

        assert ours == reference, seed


# A detector state saved before our Page-Hinkley existed (river's, walked by
# attribute): fresh, with river's integer -1 and infinity spelled out.
OLD_FRESH_DETECTOR = {
    "name": "PageHinkley",
    "params": {
        "min_instances": 5, "delta": 0.5, "threshold": 12.0, "alpha": 1.0,
        "mode": "both",
    },
    "state": {
        "_drift_detected": False, "min_instances": 5, "delta": 0.5,
        "threshold": 12.0, "alpha": 1.0, "mode": "both",
        "_x_mean": {"__object__": {"n": 0.0, "_mean": 0.0}},
        "_sum_increase": 0.0, "_sum_decrease": 0.0,
        "_min_increase": {"__float__": "inf"}, "_max_decrease": -1,
    },
}  # fmt: skip


def test_learn_old_detector_state_restores_and_keeps_detecting():
    """States saved from river's detector (fresh or mid-stream) restore as ours."""
    stream = residual_stream(5, shift=3.0, at=300, n=900)
    river_detector = drift.PageHinkley(
        min_instances=5, delta=0.5, threshold=12.0, alpha=1.0
    )
    detections(river_detector, stream[:250])
    saved = json.loads(json.dumps(detector_to_state(river_detector)))

    fresh = detector_from_state(json.loads(json.dumps(OLD_FRESH_DETECTOR)))
    midway = detector_from_state(saved)

    assert isinstance(midway, PageHinkley)
    assert detections(fresh, stream) == detections(default_detector(), stream)
    assert detections(midway, stream[250:]) == detections(river_detector, stream[250:])
    assert (
        detector_to_state(midway)["state"] == detector_to_state(river_detector)["state"]
    )


def test_learn_old_learner_state_goes_on_learning_identically():
    """A learner saved with river's detector restores and learns bit for bit alike."""
    rng = np.random.default_rng(41)
    amounts = operating_points(rng, 160)
    accuracy = noisy(rng, curve(amounts), 0.02)
    accuracy[100:] *= 0.8  # an abrupt drop: both must detect it alike
    river_detector = drift.PageHinkley(
        min_instances=5, delta=0.5, threshold=12.0, alpha=1.0
    )
    old = UtilityLearner(RESOURCES, drift_detector=river_detector)
    feed(old, amounts[:60], accuracy[:60])

    restored = UtilityLearner.from_state(json.loads(json.dumps(old.to_state())))
    feed(old, amounts[60:], accuracy[60:])
    feed(restored, amounts[60:], accuracy[60:])

    assert old.counts["drift"] >= 1
    assert restored.counts == old.counts
    assert restored.to_state()["mean"] == old.to_state()["mean"]
    assert restored.predict_one({"compute": 0.5, "data": 0.2}) == old.predict_one(
        {"compute": 0.5, "data": 0.2}
    )


def test_learn_import_leaves_river_drift_out():
    """Importing the learner does not import river.drift (a second of startup)."""
    code = "import sys, controller.learn; print('river.drift' in sys.modules)"

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "False"


# ------------------------------------------------------ fast paths, batches


def trained_fleet(seed: int, agents: int = 30) -> FleetLearner:
    """A fleet of varied agents: some settled, some fresh, elasticities near 0."""
    rng = np.random.default_rng(seed)
    fleet = FleetLearner(RESOURCES)
    for k in range(agents):
        gamma = rng.uniform(-0.01, 0.12, 2)
        amounts = operating_points(rng, int(rng.integers(0, 40)))
        accuracy = noisy(rng, curve(amounts, 0.7, gamma), 0.03)
        fleet.add_agent(f"a{k}", model="m")
        for seq, (z, y) in enumerate(zip(amounts, accuracy, strict=True)):
            report(fleet, f"a{k}", z.tolist(), float(y), seq=seq, model="m")
    return fleet


def test_learn_predict_many_equals_predict_one():
    """The batched prediction gives predict_one's values exactly, zeros included."""
    fleet = trained_fleet(51)
    rng = np.random.default_rng(52)
    agents = list(fleet.agents) * 2
    totals = operating_points(rng, len(agents))
    totals[::7, 0] = 0.0

    predicted = fleet.predict_many(agents, totals)

    expected = [
        fleet[a].predict_one(dict(zip(RESOURCES, z.tolist(), strict=True)))
        for a, z in zip(agents, totals, strict=True)
    ]
    assert predicted.tolist() == expected


def test_learn_sample_from_matches_one_learner_at_a_time():
    """The vectorised Thompson sample equals each learner's own draw, to rounding."""
    fleet = trained_fleet(53, agents=60)
    normals = np.random.default_rng(54).standard_normal((len(fleet), 3)) * 2.0

    sample = fleet.sample_from(normals)

    expected = np.array(
        [
            fleet[a]._draw(row)
            for a, row in zip(fleet.agents, normals.tolist(), strict=True)
        ]
    )
    projected = (expected[:, 1:] == 0.0).any(axis=1)
    assert projected.sum() >= 5  # the projection path is exercised
    assert sample.elasticity == pytest.approx(expected[:, 1:], abs=1e-12)
    assert np.log(sample.scale) == pytest.approx(expected[:, 0], abs=1e-12)
    assert np.all(sample.elasticity >= 0.0)
    assert np.all(sample.elasticity.sum(axis=1) <= 0.98 + 1e-12)


def test_learn_sample_draws_have_the_posterior_moments():
    """Many draws of one agent have its posterior mean and covariance."""
    rng = np.random.default_rng(55)
    fleet = FleetLearner(RESOURCES)
    amounts = operating_points(rng, 60)
    for seq, (z, y) in enumerate(
        zip(amounts, curve(amounts, 0.7, np.array([0.2, 0.3])), strict=True)
    ):
        report(fleet, "a", z.tolist(), float(y), seq=seq)
    learner = fleet["a"]
    draws = 20000

    sample = fleet.sample(np.random.default_rng(56), ["a"] * draws)

    theta = np.column_stack([np.log(sample.scale), sample.elasticity])
    lower = np.linalg.cholesky(np.array(learner._cov).reshape(3, 3))
    # Whitened by the posterior, the draws must be standard normal: mean 0
    # within 4 standard errors, covariance I within 4 of its sampling sds.
    white = np.linalg.solve(lower, (theta - np.array(learner._mean)).T).T
    assert np.all(np.abs(white.mean(axis=0)) < 4 / np.sqrt(draws))
    assert np.abs(np.cov(white.T) - np.eye(3)).max() < 4 * np.sqrt(2 / draws)


def test_learn_sample_from_held_normals_repeats_the_draw():
    """The same normals give the same sample; the rng path draws (N, R + 1) of them."""
    fleet = trained_fleet(57)
    normals = np.random.default_rng(58).standard_normal((len(fleet), 3))

    first = fleet.sample_from(normals)
    again = fleet.sample_from(normals.copy())
    drawn = fleet.sample(np.random.default_rng(58))

    assert first.elasticity.tolist() == again.elasticity.tolist()
    assert drawn.elasticity.tolist() == first.elasticity.tolist()


def test_learn_sample_from_refuses_wrong_shape():
    """Normals that do not give one row of R + 1 per agent are refused."""
    fleet = trained_fleet(59, agents=3)

    with pytest.raises(FairsynergyError, match="expected"):
        fleet.sample_from(np.zeros((3, 2)))


def test_learn_estimates_arrays_match_each_learner():
    """Vectorised estimates equal each learner's properties.

    Exactly, except the scale: numpy's vectorised exp may differ from the C
    library's in the last bit on CPUs where it uses SIMD code, so the scale
    (the exp of the log-scale mode) is held to one ulp.
    """
    fleet = trained_fleet(60)

    estimates = fleet.estimates()

    for i, agent in enumerate(fleet.agents):
        learner = fleet[agent]
        sds = [learner.uncertainty[r] for r in RESOURCES]
        np.testing.assert_array_max_ulp(estimates.scale[i], learner.scale, maxulp=1)
        assert estimates.elasticity[i].tolist() == elasticities(learner).tolist()
        assert estimates.sd_elasticity[i].tolist() == sds
        assert estimates.confident[i] == learner.confident


def test_learn_restore_agents_equals_one_by_one():
    """Restoring a batch gives the same learners and leaves the collector on."""
    fleet = trained_fleet(61)
    states = {a: json.loads(json.dumps(fleet.agent_state(a))) for a in fleet.agents}
    single = FleetLearner(RESOURCES)
    batch = FleetLearner(RESOURCES)
    for agent, state in states.items():
        single.restore_agent(agent, state)

    batch.restore_agents(states)

    assert gc.isenabled()
    assert [batch.agent_state(a) for a in states] == [
        single.agent_state(a) for a in states
    ]
    assert batch.agent_state("a3") == fleet.agent_state("a3")


def test_learn_held_states_rebuild_on_use_and_in_slices():
    """Held states count as agents, rebuild when used, and equal eager restores."""
    fleet = trained_fleet(63)
    texts = {a: json.dumps(fleet.agent_state(a)) for a in fleet.agents}
    lazy = FleetLearner(RESOURCES)

    lazy.restore_later(texts)
    held_at_start = (lazy.held, len(lazy), "a3" in lazy)
    lazy.learn_one("a3", {"compute": 0.1, "data": 0.1}, {}, 0.5, seq=10**6)
    after_use = lazy.held
    remaining = lazy.restore_held(2)

    assert held_at_start == (len(texts), len(texts), True)
    assert after_use == len(texts) - 1
    assert remaining == len(texts) - 3
    assert lazy.restore_held() == 0
    assert lazy.agent_state("a1") == fleet.agent_state("a1")
    assert lazy.estimates(["a2"]).scale[0] == fleet.estimates(["a2"]).scale[0]


def test_learn_unreadable_held_state_is_refused_and_agent_relearns():
    """A corrupt or foreign saved state is reported, and the agent starts afresh."""
    fleet = trained_fleet(64, agents=3)
    texts = {a: json.dumps(fleet.agent_state(a)) for a in fleet.agents}
    texts["a0"] = texts["a0"][:40]
    texts["a1"] = texts["a1"].replace('"version": 1', '"version": 99', 1)
    lazy = FleetLearner(RESOURCES)
    lazy.restore_later(texts)

    lazy.restore_held()

    assert sorted(lazy.refused) == ["a0", "a1"]
    assert "version 99" in lazy.refused["a1"]
    assert lazy["a0"].n_samples == 0
    assert lazy.agent_state("a2") == fleet.agent_state("a2")


def test_learn_clone_matches_river_clone():
    """The fast clone builds the learner river's generic clone would."""
    template = UtilityLearner(RESOURCES, ceiling=0.9, forgetting=0.98, replay=4)

    ours = template.clone({"prior": Prior.default(2), "ceiling": 0.8})
    reference = base.Base.clone(template, {"prior": Prior.default(2), "ceiling": 0.8})

    assert ours.to_state() == reference.to_state()


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_learn_unrolled_linear_algebra_is_bit_identical(size):
    """Written-out small solves and updates round exactly as the general code."""
    rng = np.random.default_rng(62 + size)
    for _ in range(300):
        factor = rng.standard_normal((size, size)) * 10.0 ** rng.uniform(-3, 1)
        matrix = (factor @ factor.T + 1e-6 * np.eye(size)).tolist()
        rhs = rng.standard_normal(size).tolist()
        features = [1.0, *rng.standard_normal(size - 1).tolist()]
        h = rng.standard_normal(size).tolist()
        flat = [v for row in matrix for v in row]

        assert solve_small(matrix, rhs) == _solve_general(matrix, rhs)
        if size == 3:
            learner = UtilityLearner(RESOURCES)
            learner._cov, learner._mean = flat, rhs
            general = [
                sum(v * f for v, f in zip(row, features, strict=True)) for row in matrix
            ]
            assert learner._predictive(features) == (
                sum(m * f for m, f in zip(rhs, features, strict=True)),
                general,
            )
            expected = [
                (c - hi * hj) * 1.01
                for c, (hi, hj) in zip(flat, product(h, h), strict=True)
            ]
            assert _downdate_3(flat, h, 1.01) == expected


@settings(max_examples=100, deadline=None)
@given(posteriors(), st.floats(0.05, 0.99))
def test_learn_batched_projection_matches_single(posterior, sum_max):
    """The batched projection finds the one-by-one projection's point."""
    mean, covariance = posterior

    batched = project_many(mean[None, :], covariance[None], np.array([sum_max]))

    single = project_elasticities(mean, covariance.tolist(), sum_max)
    assert batched[0] == pytest.approx(single, abs=1e-9)
