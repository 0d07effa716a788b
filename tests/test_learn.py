"""The online utility learner: one agent (UtilityLearner) and the fleet layer."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import base, drift

from controller._posterior import project_elasticities
from controller.errors import FairsynergyError
from controller.learn import FleetLearner, Outcome, Prior, UtilityLearner

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
