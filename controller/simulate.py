"""A simulated fleet with hidden true curves, and the closed loop around it.

:class:`SimulatedFleet` plays the devices: each agent has a true capped
Cobb-Douglas curve drawn from one of the shapes in PAPER.md (ResNet on BDD,
early exits on CIFAR-10, BERT early exits on GLUE, ResNet depth on CIFAR-10),
small on-board amounts, and reports a noisy accuracy for the amounts it runs
at. Agents can drift (new true curve, same model label) and join or leave.
The demo reuses it behind MQTT.

:func:`simulate` runs the controller's loop against it, one round at a time:
every agent reports the accuracy measured at the allocation in force, the
learner updates, the solver allocates (exploring), and the agents run at the
new allocation. Each round is scored with the *true* curves, next to the
oracle that allocates with them.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TextIO

import numpy as np

from controller.allocate import allocate, capped_utility, fair_objective
from controller.errors import FairsynergyError
from controller.explore import Explorer, problem_from_estimates
from controller.learn import FleetLearner, Outcome, UtilityLearner
from controller.problem import Problem, parse_alpha

__all__ = [
    "ARCHETYPES",
    "Archetype",
    "Report",
    "RoundResult",
    "SimulatedAgent",
    "SimulatedFleet",
    "SimulationConfig",
    "simulate",
]


@dataclass(frozen=True)
class Archetype:
    """A model family's accuracy curve, by its two ends.

    Accuracy rises from ``low`` with every resource at ``amount_low`` to
    ``high`` with every resource at ``amount_high``, and never exceeds
    ``ceiling``.
    """

    model: str
    low: float
    high: float
    ceiling: float
    amount_low: float = 0.01
    amount_high: float = 2.0

    @property
    def elasticity_sum(self) -> float:
        """The elasticity sum that joins the two ends of the curve."""
        return math.log(self.high / self.low) / math.log(
            self.amount_high / self.amount_low
        )


# The shapes reported in the paper's figures (see PAPER.md).
ARCHETYPES = (
    Archetype("resnet-bdd", low=0.639, high=0.715, ceiling=0.74),
    Archetype("early-exit-cifar10", low=0.66, high=0.95, ceiling=0.97),
    Archetype("bert-glue", low=0.59, high=0.93, ceiling=0.95),
    Archetype("resnet-cifar10", low=0.806, high=0.833, ceiling=0.85),
)


@dataclass
class SimulatedAgent:
    """One device's hidden truth."""

    agent: str
    model: str
    scale: float
    elasticity: np.ndarray  # (R,)
    local: np.ndarray  # (R,)
    ceiling: float
    seq: int = 0

    def utility(self, cloud: np.ndarray) -> float:
        """True capped accuracy at ``cloud``."""
        return min(self.ceiling, self._uncapped(cloud))

    def _uncapped(self, cloud: np.ndarray) -> float:
        total = np.maximum(self.local + np.asarray(cloud, dtype=float), 0.0)
        return float(self.scale * np.prod(total**self.elasticity))


@dataclass(frozen=True)
class Report:
    """One telemetry sample, as a device would send it."""

    agent: str
    seq: int
    model: str
    accuracy: float
    local: dict[str, float]
    cloud: dict[str, float]


class SimulatedFleet:
    """Agents with hidden true curves that report noisy accuracies.

    Parameters
    ----------
    n_agents
        Initial number of agents.
    resources
        Resource names (1 to 3).
    noise
        Multiplicative noise: a report is ``min(ceiling, u * exp(noise * e))``
        with ``u`` the uncapped curve and ``e`` standard normal; a saturated
        device reports its ceiling.
    budget
        Pool per agent and resource; the pool is fixed at the initial size.
    seed
        Seed of the fleet's own generator (curves, drift, joins).
    archetypes
        Curve shapes to draw agents from, in equal proportions.
    """

    def __init__(
        self,
        n_agents: int,
        resources: Sequence[str] = ("compute", "data"),
        *,
        noise: float = 0.02,
        budget: float = 1.0,
        seed: int = 0,
        archetypes: Sequence[Archetype] = ARCHETYPES,
    ) -> None:
        if n_agents < 1 or not 1 <= len(resources) <= 3:
            raise FairsynergyError(
                f"a simulated fleet needs at least 1 agent and 1 to 3 resources; "
                f"got {n_agents} agents and {len(resources)} resources"
            )
        if not (noise >= 0.0 and budget > 0.0):
            raise FairsynergyError(
                f"noise must be >= 0 and budget > 0; got noise={noise}, budget={budget}"
            )
        self.resources = tuple(resources)
        self.noise = noise
        self.archetypes = tuple(archetypes)
        self._rng = np.random.default_rng(seed)
        self._agents: dict[str, SimulatedAgent] = {}
        self._next_id = 0
        for _ in range(n_agents):
            self.join()
        self.budget = np.full(len(self.resources), budget * n_agents)

    @property
    def agents(self) -> tuple[str, ...]:
        """Current agent ids, in joining order."""
        return tuple(self._agents)

    def __getitem__(self, agent: str) -> SimulatedAgent:
        return self._agents[agent]

    def __len__(self) -> int:
        return len(self._agents)

    # ------------------------------------------------------------ membership

    def join(self, model: str | None = None) -> str:
        """Add an agent with a fresh true curve; return its id."""
        agent = f"agent-{self._next_id:05d}"
        self._next_id += 1
        self._agents[agent] = self._draw(agent, model)
        return agent

    def leave(self, agent: str) -> None:
        """Remove ``agent``."""
        self._agents.pop(agent, None)

    def drift(self, fraction: float) -> list[str]:
        """Give a ``fraction`` of agents a new true curve; return their ids.

        A new task or a degraded sensor: the elasticities are redrawn around
        another shape and the accuracy at the generous end drops by 0 to 15%,
        while the model label and ceiling stay, so the controller has to
        notice the change from the accuracies alone.
        """
        count = round(fraction * len(self._agents))
        chosen = self._rng.choice(list(self._agents), size=count, replace=False)
        for agent in chosen.tolist():
            truth = self._agents[agent]
            own = self._shape(truth.model)
            others = [a for a in self.archetypes if a.model != truth.model] or [own]
            elasticity = self._elasticity(others[self._rng.integers(len(others))])
            high = own.high * self._rng.uniform(0.85, 1.0)
            truth.scale = high / own.amount_high ** elasticity.sum()
            truth.elasticity = elasticity
        return sorted(chosen.tolist())

    def _draw(self, agent: str, model: str | None) -> SimulatedAgent:
        """A true curve near an archetype, with small local amounts."""
        rng = self._rng
        if model is None:
            shape = self.archetypes[rng.integers(len(self.archetypes))]
        else:
            shape = self._shape(model)
        elasticity = self._elasticity(shape)
        scale = shape.high / shape.amount_high ** elasticity.sum()
        scale *= rng.uniform(0.97, 1.03)
        local = rng.uniform(0.002, 0.02, size=len(self.resources))
        return SimulatedAgent(
            agent, shape.model, scale, elasticity, local, shape.ceiling
        )

    def _shape(self, model: str) -> Archetype:
        return next(a for a in self.archetypes if a.model == model)

    def _elasticity(self, shape: Archetype) -> np.ndarray:
        """The shape's elasticity sum +-30%, split unevenly across resources."""
        total = shape.elasticity_sum * self._rng.uniform(0.7, 1.3)
        split = self._rng.dirichlet(np.full(len(self.resources), 2.0))
        return np.asarray(total * split)

    # ------------------------------------------------------------- reporting

    def measure(self, agent: str, cloud: np.ndarray, rng: np.random.Generator) -> float:
        """Noisy accuracy of ``agent`` running with ``cloud`` on top of its local."""
        truth = self._agents[agent]
        noisy = truth._uncapped(cloud) * math.exp(self.noise * rng.standard_normal())
        return min(truth.ceiling, noisy)

    def report(self, agent: str, cloud: np.ndarray, rng: np.random.Generator) -> Report:
        """One telemetry sample of ``agent`` (its seq increases by one)."""
        truth = self._agents[agent]
        truth.seq += 1
        return Report(
            agent=agent,
            seq=truth.seq,
            model=truth.model,
            accuracy=self.measure(agent, cloud, rng),
            local=dict(zip(self.resources, truth.local.tolist(), strict=True)),
            cloud=dict(zip(self.resources, np.asarray(cloud).tolist(), strict=True)),
        )

    def true_problem(
        self, alpha: float, agents: Sequence[str] | None = None
    ) -> Problem:
        """The allocation problem with the true curves (what the oracle solves)."""
        chosen = self.agents if agents is None else tuple(agents)
        truths = [self._agents[a] for a in chosen]
        return Problem.from_arrays(
            self.resources,
            chosen,
            self.budget,
            np.array([t.scale for t in truths]),
            np.array([t.elasticity for t in truths]),
            np.array([t.local for t in truths]),
            ceiling=np.array([t.ceiling for t in truths]),
            alpha=alpha,
        )

    def elasticity(self, agents: Sequence[str] | None = None) -> np.ndarray:
        """True elasticities, ``(N, R)``."""
        chosen = self.agents if agents is None else agents
        return np.array([self._agents[a].elasticity for a in chosen])


@dataclass(frozen=True)
class SimulationConfig:
    """One closed-loop run; the fields mirror ``fairsynergy simulate``."""

    agents: int = 100
    resources: tuple[str, ...] = ("compute", "data")
    rounds: int = 100
    noise: float = 0.02
    alpha: float = 1.0
    seed: int = 0
    budget: float = 1.0
    drift: tuple[tuple[int, float], ...] = ()
    churn: float = 0.0
    explore: bool = True
    policy: str = "fair"
    max_share: float = 1.0
    max_cost: float = 0.005


@dataclass(frozen=True)
class RoundResult:
    """How the allocation in force during one round did, scored with the truth."""

    round: int
    agents: int
    objective: float
    oracle_objective: float
    mean_accuracy: float
    oracle_mean_accuracy: float
    worst_accuracy: float
    oracle_worst_accuracy: float
    elasticity_error: float
    exploration_share: float
    exploration_cost: float
    drifts_detected: int
    events: dict[str, int] = field(default_factory=dict)
    drifted_gap: float | None = None  # mean |gap| (%) of the last drifted agents

    def as_dict(self) -> dict[str, object]:
        """Plain data for one strict JSON line (a non-finite number becomes null).

        An objective is ``-inf`` when some agent's accuracy is 0 at alpha >= 1.
        """
        return {
            key: None
            if isinstance(value, float) and not math.isfinite(value)
            else value
            for key, value in asdict(self).items()
        }


def simulate(config: SimulationConfig) -> Iterator[RoundResult]:
    """Run the closed loop and yield one result per round.

    Round ``t`` scores the allocation the controller computed after ``t``
    reports per agent: round 1 is the cold start, allocated from the priors
    and one report of each agent running on its local resources alone.
    Drift events ``(round, fraction)`` change the true curves at the start of
    that round.
    """
    fleet = SimulatedFleet(
        config.agents,
        config.resources,
        noise=config.noise,
        budget=config.budget,
        seed=config.seed,
    )
    loop = _Loop(fleet, config)
    drift_at = dict(config.drift)

    for round_ in range(1, config.rounds + 1):
        events = loop.membership(round_, drift_at.get(round_, 0.0))
        yield loop.score(round_, events)
        loop.learn()
        loop.allocate()


class _Loop:
    """The controller side of the simulation, plus the bookkeeping to score it."""

    def __init__(self, fleet: SimulatedFleet, config: SimulationConfig) -> None:
        self.fleet = fleet
        self.config = config
        # Separate streams, so that runs with and without exploration see the
        # same noise and churn (common random numbers for the ablation).
        self.noise_rng = np.random.default_rng([config.seed, 1])
        self.rng = np.random.default_rng([config.seed, 2])
        self.churn_rng = np.random.default_rng([config.seed, 3])
        self.learner = FleetLearner(config.resources, UtilityLearner(config.resources))
        self.explorer = Explorer(config.max_share, config.max_cost, config.policy)
        for agent in fleet.agents:
            self.learner.add_agent(
                agent, model=fleet[agent].model, ceiling=fleet[agent].ceiling
            )
        self.share = 0.0
        self.cost = 0.0
        self.error = 0.0
        self.drifts = 0
        self._oracle: tuple[tuple[str, ...], int, np.ndarray] | None = None
        self._version = 0
        self.drifted: list[str] = []
        # Before any grant a device runs on its own resources and reports
        # that: the controller's first allocation knows the local amounts.
        zero = np.zeros(len(config.resources))
        self.cloud: dict[str, np.ndarray] = dict.fromkeys(fleet.agents, zero)
        self.learn()
        self.allocate()

    def membership(self, round_: int, drift: float) -> dict[str, int]:
        """Apply this round's drift and churn; count what happened."""
        events = {"drifted": 0, "joined": 0, "left": 0}
        if drift > 0.0:
            self.drifted = self.fleet.drift(drift)
            events["drifted"] = len(self.drifted)
            self._version += 1
        newcomers = []
        if self.config.churn > 0.0 and round_ > 1:
            for agent in self.fleet.agents:
                if self.churn_rng.random() < self.config.churn and len(self.fleet) > 1:
                    self.fleet.leave(agent)
                    self.learner.remove_agent(agent)
                    self.cloud.pop(agent, None)
                    newcomers.append(self._join())
            events["left"] = events["joined"] = len(newcomers)
        if newcomers:
            # A newcomer reports its local-only accuracy, then starts at the
            # allocation its pooled prior suggests.
            self._version += 1
            self.learn(newcomers)
            self.allocate()
        return events

    def _join(self) -> str:
        agent = self.fleet.join()
        self.learner.add_agent(
            agent, model=self.fleet[agent].model, ceiling=self.fleet[agent].ceiling
        )
        self.cloud[agent] = np.zeros(len(self.config.resources))
        return agent

    def score(self, round_: int, events: dict[str, int]) -> RoundResult:
        """The allocation in force, and the oracle's, under the true curves."""
        agents = self.fleet.agents
        truth = self.fleet.true_problem(self.config.alpha)
        cloud = np.array([self.cloud[a] for a in agents])
        utility = capped_utility(truth, cloud)
        oracle = self._oracle_utility(truth)
        rows = [agents.index(a) for a in self.drifted if a in self.fleet.agents]
        drifted_gap = (
            float(100.0 * np.abs(1.0 - utility[rows] / oracle[rows]).mean())
            if rows
            else None
        )

        return RoundResult(
            round=round_,
            agents=len(agents),
            objective=fair_objective(truth, utility),
            oracle_objective=fair_objective(truth, oracle),
            mean_accuracy=float(utility.mean()),
            oracle_mean_accuracy=float(oracle.mean()),
            worst_accuracy=float(utility.min()),
            oracle_worst_accuracy=float(oracle.min()),
            elasticity_error=self.error,
            exploration_share=self.share,
            exploration_cost=self.cost,
            drifts_detected=self.drifts,
            events=events,
            drifted_gap=drifted_gap,
        )

    def _oracle_utility(self, truth: Problem) -> np.ndarray:
        key = (truth.agents, self._version)
        if self._oracle is None or self._oracle[:2] != key:
            oracle = allocate(truth, "fair")
            self._oracle = (*key, capped_utility(truth, oracle.cloud))
        return self._oracle[2]

    def learn(self, agents: Sequence[str] | None = None) -> None:
        """Every agent (or ``agents``) reports at the allocation in force."""
        for agent in self.fleet.agents if agents is None else agents:
            report = self.fleet.report(agent, self.cloud[agent], self.noise_rng)
            outcome = self.learner.learn_one(
                agent,
                report.local,
                report.cloud,
                report.accuracy,
                seq=report.seq,
                model=report.model,
            )
            self.drifts += outcome is Outcome.DRIFT

    def allocate(self) -> None:
        """Solve at the estimates, explore, and put the result in force."""
        agents = self.fleet.agents
        estimates = self.learner.estimates(agents)
        problem = problem_from_estimates(
            estimates, self.config.resources, self.fleet.budget, alpha=self.config.alpha
        )
        if self.config.explore and self.config.policy == "fair":
            sample = self.learner.sample(self.rng, agents)
            drawn = problem_from_estimates(
                sample,
                self.config.resources,
                self.fleet.budget,
                alpha=self.config.alpha,
            )
            chosen = self.explorer.allocate(
                problem, drawn, float(estimates.uncertainty.mean())
            )
            cloud, self.share, self.cost = chosen.cloud, chosen.share, chosen.cost
        else:
            cloud = allocate(problem, self.config.policy, seed=self.config.seed).cloud
            self.share = self.cost = 0.0

        self.cloud = dict(zip(agents, np.asarray(cloud), strict=True))
        truth = self.fleet.elasticity(agents)
        self.error = float(np.abs(estimates.elasticity - truth).mean())


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    """Check the ``simulate`` command's arguments and build the config."""
    drift: list[tuple[int, float]] = []
    for text in args.drift:
        round_, _, fraction = text.partition(":")
        try:
            event = (int(round_), float(fraction))
        except ValueError:
            raise FairsynergyError(
                f"--drift {text!r}: expected ROUND:FRACTION, e.g. 50:0.1"
            ) from None
        if not (event[0] >= 1 and 0.0 <= event[1] <= 1.0):
            raise FairsynergyError(
                f"--drift {text!r}: ROUND must be >= 1 and FRACTION in [0, 1]"
            )
        drift.append(event)
    checks = [
        ("--agents", args.agents >= 1, "an integer >= 1"),
        ("--rounds", args.rounds >= 1, "an integer >= 1"),
        ("--noise", 0.0 <= args.noise < 1.0, "a number in [0, 1)"),
        ("--churn", 0.0 <= args.churn <= 1.0, "a number in [0, 1]"),
        ("--max-cost", 0.0 <= args.max_cost < 1.0, "a number in [0, 1)"),
    ]
    for flag, ok, accepted in checks:
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise FairsynergyError(f"{flag} {value!r}: expected {accepted}")

    return SimulationConfig(
        agents=args.agents,
        resources=tuple(r.strip() for r in args.resources.split(",") if r.strip()),
        rounds=args.rounds,
        noise=args.noise,
        alpha=parse_alpha(args.alpha),
        seed=args.seed,
        budget=args.budget,
        drift=tuple(drift),
        churn=args.churn,
        explore=not args.no_explore,
        policy=args.policy,
        max_cost=args.max_cost,
    )


def run_command(args: argparse.Namespace, out: TextIO) -> int:
    """``fairsynergy simulate``: JSON lines, or a table and a summary."""
    config = config_from_args(args)
    results: list[RoundResult] = []
    if not args.json:
        print(_TABLE_HEAD, file=out)
    for result in simulate(config):
        results.append(result)
        if args.json:
            print(json.dumps(result.as_dict()), file=out, flush=True)
        elif _worth_a_line(result.round, config):
            print(_table_row(result), file=out, flush=True)
    if not args.json:
        print(_summary(results, config), file=out)
    return 0


_TABLE_HEAD = (
    "round agents  mean acc  oracle   gap%   worst acc  oracle   gap%"
    "   elast err  explore"
)


def _worth_a_line(round_: int, config: SimulationConfig) -> bool:
    drift_rounds = {r for r, _ in config.drift}
    near_drift = any(
        0 <= round_ - r <= 20 and (round_ - r) % 5 == 0 for r in drift_rounds
    )
    return (
        round_ in {1, 2, 3, 5, 10, 20, 30, 50}
        or round_ % 50 == 0
        or round_ == config.rounds
        or near_drift
    )


def _gap(value: float, oracle: float) -> float:
    return 100.0 * (1.0 - value / oracle) if oracle > 0 else 0.0


def _table_row(r: RoundResult) -> str:
    mean_gap = _gap(r.mean_accuracy, r.oracle_mean_accuracy)
    worst_gap = _gap(r.worst_accuracy, r.oracle_worst_accuracy)
    return (
        f"{r.round:5d} {r.agents:6d}  {r.mean_accuracy:8.4f}  "
        f"{r.oracle_mean_accuracy:6.4f} {mean_gap:6.2f}"
        f"   {r.worst_accuracy:8.4f}  {r.oracle_worst_accuracy:6.4f} "
        f"{worst_gap:6.2f}   {r.elasticity_error:9.4f}  {r.exploration_share:7.3f}"
    )


def _summary(results: Sequence[RoundResult], config: SimulationConfig) -> str:
    last = results[-1]
    mean_gap = _gap(last.mean_accuracy, last.oracle_mean_accuracy)
    worst_gap = _gap(last.worst_accuracy, last.oracle_worst_accuracy)
    return (
        f"\n{config.agents} agents, {len(config.resources)} resources, noise "
        f"{config.noise:g}, alpha {config.alpha:g}, policy {config.policy}"
        f"{'' if config.explore else ' (no exploration)'}: after {last.round} "
        f"rounds mean accuracy {last.mean_accuracy:.4f} ({mean_gap:.2f}% below "
        f"the oracle), worst agent {last.worst_accuracy:.4f} ({worst_gap:.2f}% "
        f"below), elasticity error {last.elasticity_error:.4f}, "
        f"{last.drifts_detected} drift(s) detected"
    )
