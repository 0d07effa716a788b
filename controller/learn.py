"""Learn every agent's accuracy curve online, from the telemetry it sends.

The controller never knows an agent's scale ``A`` or elasticities ``gamma``:
it fits them while it allocates. Two layers:

- :class:`UtilityLearner` fits one agent (river's ``learn_one`` /
  ``predict_one`` contract); it handles saturated, zero, outlying and drifting
  samples itself.
- :class:`FleetLearner` holds one learner per agent, drops duplicated and
  out-of-order samples by sequence number, pools priors across agents that
  run the same model so a newcomer starts sensibly, and hands the solver its
  arrays (:class:`Estimates`), either at the estimate or as a Thompson sample.

docs/learning.md explains the choices and their measured cost.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from controller import _posterior as linalg
from controller._agent_learner import (
    STATE_VERSION,
    Outcome,
    Prior,
    UtilityLearner,
    default_detector,
)
from controller.errors import FairsynergyError

__all__ = [
    "Estimates",
    "FleetLearner",
    "Outcome",
    "Prior",
    "UtilityLearner",
    "default_detector",
]

# Smallest pooled sds (log scale, elasticity): a pool of near-identical agents
# must still let a newcomer that differs move away within a few samples.
_POOL_SD_FLOOR_SCALE = 0.1
_POOL_SD_FLOOR_ELASTICITY = 0.02


@dataclass(frozen=True)
class Estimates:
    """What the solver needs about the agents, row ``i`` for ``agents[i]``.

    ``scale`` is ``(N,)``, ``elasticity``, ``local`` and ``sd_elasticity`` are
    ``(N, R)``; ``uncertainty`` is each agent's largest elasticity sd as a
    share of its prior sd (1 = knows nothing beyond the prior, 0 = certain).
    """

    agents: tuple[str, ...]
    scale: np.ndarray
    elasticity: np.ndarray
    local: np.ndarray
    ceiling: np.ndarray
    sd_elasticity: np.ndarray
    uncertainty: np.ndarray
    confident: np.ndarray


@dataclass
class _Agent:
    learner: UtilityLearner
    model: str | None
    local: tuple[float, ...]
    seq: int | None = None


class FleetLearner:
    """One :class:`UtilityLearner` per agent, with pooled priors.

    Parameters
    ----------
    resources
        Resource names, in array order.
    learner
        Template learner; each agent gets a clone with its own ceiling and the
        pooled prior of its model. ``None`` means ``UtilityLearner(resources)``.
    pool_min_agents
        How many settled agents a model label needs before it gets its own
        pooled prior (else the fleet-wide pool, else the template's prior).
    pool_min_samples
        Samples an agent needs before it counts as settled for pooling.
    """

    def __init__(
        self,
        resources: Sequence[str],
        learner: UtilityLearner | None = None,
        pool_min_agents: int = 3,
        pool_min_samples: int = 10,
    ) -> None:
        self.resources = resources
        self.learner = learner
        self.pool_min_agents = pool_min_agents
        self.pool_min_samples = pool_min_samples

        self._resources = tuple(resources)
        self._size = len(self._resources) + 1
        self._template = learner if learner is not None else UtilityLearner(resources)
        if tuple(self._template.resources) != self._resources:
            raise FairsynergyError(
                f"template learner resources {list(self._template.resources)} "
                f"differ from the fleet's {list(self._resources)}"
            )
        self._agents: dict[str, _Agent] = {}
        # Saved states (JSON text) of agents not rebuilt yet; see restore_later.
        self._held: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        self._pools: dict[str | None, Prior] = {}
        self._updates_since_pool = 0
        self._n_duplicates = 0
        self._n_stale = 0

    # ----------------------------------------------------------------- agents

    def add_agent(
        self, agent: str, *, model: str | None = None, ceiling: float = 1.0
    ) -> UtilityLearner:
        """Start learning ``agent`` from the pooled prior of its ``model``."""
        if agent in self:
            raise FairsynergyError(f"agent {agent!r} is already in the fleet")
        learner = self._template.clone(
            {"ceiling": ceiling, "prior": self.prior_for(model)}
        )
        self._agents[agent] = _Agent(learner, model, (0.0,) * len(self._resources))
        return learner

    def remove_agent(self, agent: str) -> None:
        """Forget ``agent`` entirely."""
        self._agents.pop(agent, None)
        self._held.pop(agent, None)

    def agent_state(self, agent: str) -> dict[str, Any]:
        """One agent's learning state as plain data (the daemon stores it per row)."""
        self._rebuild((agent,))
        entry = self._agents[agent]
        return {
            "version": STATE_VERSION,
            "model": entry.model,
            "seq": entry.seq,
            "local": list(entry.local),
            "learner": entry.learner.to_state(),
        }

    def restore_agent(self, agent: str, state: Mapping[str, Any]) -> None:
        """Put back one agent saved by :meth:`agent_state`, replacing any learner."""
        if state.get("version") != STATE_VERSION:
            raise FairsynergyError(
                f"agent {agent!r}: learner state version {state.get('version')!r} "
                f"is not supported; expected {STATE_VERSION}"
            )
        learner = UtilityLearner.from_state(state["learner"])
        if tuple(learner.resources) != self._resources:
            raise FairsynergyError(
                f"agent {agent!r}: saved learner covers resources "
                f"{list(learner.resources)}, the fleet {list(self._resources)}"
            )
        self._held.pop(agent, None)
        self._agents[agent] = _Agent(
            learner, state["model"], tuple(state["local"]), state["seq"]
        )

    def restore_agents(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """Put back many agents at once (a restart), as :meth:`restore_agent` each.

        Python's cyclic garbage collector is paused meanwhile: restoring
        10,000 agents allocates a few hundred thousand small objects, and the
        collections they trigger would otherwise take about as long as the
        restoring itself. Pausing only defers collection (and learners with
        the default detector make no reference cycles to collect). Stops at
        the first state refused; the agents before it stay restored.
        """
        with _collector_paused():
            for agent, state in states.items():
                self.restore_agent(agent, state)

    def restore_later(self, states: Mapping[str, str]) -> None:
        """Hold saved states (:meth:`agent_state` as JSON text) to rebuild on use.

        A restart needs a handful of agents at once and the rest within
        seconds: parsing and rebuilding 10,000 states takes about two. Each
        held agent counts as in the fleet and is rebuilt the first time it
        is used (a sample, an estimate, its state); :meth:`restore_held`
        rebuilds the rest a slice at a time. A state that cannot be rebuilt
        (corrupt, or of another version) is listed in :attr:`refused` with
        the reason, and the agent starts again from its model's prior.
        """
        for agent in states:
            self._agents.pop(agent, None)
        self._held.update(states)

    @property
    def held(self) -> int:
        """How many agents wait to be rebuilt from their saved state."""
        return len(self._held)

    def restore_held(self, limit: int | None = None) -> int:
        """Rebuild up to ``limit`` held agents (default all); return how many remain."""
        chosen = list(itertools.islice(self._held, limit))
        with _collector_paused():
            self._rebuild(chosen)
        return len(self._held)

    def _rebuild(self, agents: Iterable[str]) -> None:
        """Rebuild whichever of ``agents`` are still held."""
        if not self._held:
            return
        for agent in agents:
            text = self._held.pop(agent, None)
            if text is None:
                continue
            try:
                self.restore_agent(agent, json.loads(text))
            except (FairsynergyError, ValueError, TypeError, KeyError) as error:
                self.refused[agent] = str(error)[:200] or type(error).__name__
                self.add_agent(agent)

    def __contains__(self, agent: object) -> bool:
        return agent in self._agents or agent in self._held

    def __len__(self) -> int:
        return len(self._agents) + len(self._held)

    def __getitem__(self, agent: str) -> UtilityLearner:
        self._rebuild((agent,))
        return self._agents[agent].learner

    @property
    def agents(self) -> tuple[str, ...]:
        """Agent ids, in the order they joined (held ones last)."""
        return (*self._agents, *self._held)

    def model(self, agent: str) -> str | None:
        """The model label ``agent`` last reported."""
        self._rebuild((agent,))
        return self._agents[agent].model

    # --------------------------------------------------------------- learning

    def learn_one(
        self,
        agent: str,
        local: Mapping[str, float],
        cloud: Mapping[str, float],
        accuracy: float,
        *,
        seq: int | None = None,
        model: str | None = None,
    ) -> Outcome:
        """Learn from one telemetry sample of ``agent``.

        ``local`` and ``cloud`` are the amounts in use when ``accuracy`` was
        measured. A sample whose ``seq`` is not above the agent's last one is
        dropped and counted (duplicate or stale). A new agent is added on its
        first sample; a changed ``model`` label restarts it from that model's
        pooled prior, since a new model is a new curve.
        """
        self._rebuild((agent,))
        entry = self._agents.get(agent)
        if entry is not None and seq is not None and entry.seq is not None:
            if seq == entry.seq:
                self._n_duplicates += 1
                return Outcome.DUPLICATE
            if seq < entry.seq:
                self._n_stale += 1
                return Outcome.STALE
        if entry is None:
            self.add_agent(agent, model=model)
            entry = self._agents[agent]
        elif model is not None and model != entry.model:
            entry.model = model
            entry.learner.reset(self.prior_for(model), replay=False)

        if seq is not None:
            entry.seq = seq
        resources = self._resources
        entry.local = mine = tuple([local.get(r, 0.0) for r in resources])
        totals = [m + cloud.get(r, 0.0) for r, m in zip(resources, mine, strict=False)]
        outcome = entry.learner._learn_amounts(totals, accuracy)

        self._updates_since_pool += 1
        if outcome is Outcome.DRIFT:
            entry.learner.reset(self._prior_after_drift(entry.model))
        return outcome

    def _prior_after_drift(self, model: str | None) -> Prior:
        """The model's pooled centre with the template's (wide) spread.

        A drift says the agent no longer behaves as it did, which was like
        the rest of its model: the pool's centre is still the best guess, but
        its narrow spread would hold the new curve back for dozens of samples.
        """
        pooled = self.prior_for(model)
        wide = self._template.current_prior.sd
        sd = tuple(max(a, b) for a, b in zip(pooled.sd, wide, strict=True))
        return Prior(mean=pooled.mean, sd=sd)

    @property
    def n_duplicates(self) -> int:
        """Samples dropped because their seq repeated the agent's last one."""
        return self._n_duplicates

    @property
    def n_stale(self) -> int:
        """Samples dropped because their seq was older than the agent's last one."""
        return self._n_stale

    # ---------------------------------------------------------------- pooling

    def prior_for(self, model: str | None) -> Prior:
        """The prior a new agent running ``model`` starts from.

        The pool of settled agents with the same label when there are enough,
        else the fleet-wide pool, else the template learner's prior. Pools are
        refreshed at most about once per round (once per ``len(fleet)``
        updates), so the cost stays O(1) per sample.
        """
        if self._updates_since_pool >= max(1, len(self)):
            self._pools = self._compute_pools()
            self._updates_since_pool = 0
        if model is not None and model in self._pools:
            return self._pools[model]
        return self._pools.get(None, self._template.current_prior)

    def refresh_priors(self) -> None:
        """Recompute the pooled priors now."""
        self._pools = self._compute_pools()
        self._updates_since_pool = 0

    def _compute_pools(self) -> dict[str | None, Prior]:
        self.restore_held()
        groups: dict[str | None, list[UtilityLearner]] = {None: []}
        for entry in self._agents.values():
            if entry.learner.n_samples < self.pool_min_samples:
                continue
            groups[None].append(entry.learner)
            if entry.model is not None:
                groups.setdefault(entry.model, []).append(entry.learner)

        return {
            label: self._pool(members, same_model=label is not None)
            for label, members in groups.items()
            if len(members) >= self.pool_min_agents
        }

    def _pool(self, members: list[UtilityLearner], *, same_model: bool) -> Prior:
        """Empirical-Bayes prior: the members' mean, and a deliberately wide spread.

        Within a model the spread is twice the sd between agents (plus their
        own doubt), floored, so a newcomer that differs can still move away
        within a few samples. Across models (the fleet-wide pool, used for a
        model nobody else runs) only the centre is pooled: such an agent may
        be anything, so it keeps the template prior's spread.
        """
        thetas = np.array([m._theta() for m in members])
        mean = thetas.mean(axis=0)
        widest = np.array(self._template.current_prior.sd)
        if not same_model:
            return Prior(mean=tuple(mean.tolist()), sd=tuple(widest.tolist()))

        within = np.array([list(m.uncertainty.values()) for m in members]) ** 2
        sd = 2.0 * np.sqrt(thetas.var(axis=0) + within.mean(axis=0))
        floor = np.full_like(sd, _POOL_SD_FLOOR_ELASTICITY)
        floor[0] = _POOL_SD_FLOOR_SCALE
        sd = np.minimum(np.maximum(sd, floor), np.maximum(widest, floor))
        return Prior(mean=tuple(mean.tolist()), sd=tuple(sd.tolist()))

    # ------------------------------------------------------------- estimates

    def estimates(self, agents: Iterable[str] | None = None) -> Estimates:
        """The solver's arrays at each agent's estimate (feasible posterior mode)."""
        chosen, learners = self._choose(agents)
        theta = _stack([learner._theta() for learner in learners], self._size)
        return self._arrays(chosen, learners, theta)

    def sample(
        self, rng: np.random.Generator, agents: Iterable[str] | None = None
    ) -> Estimates:
        """The solver's arrays at one Thompson sample from each agent's posterior.

        Draws one row of ``R + 1`` standard normals per agent from ``rng``
        and hands them to :meth:`sample_from`.
        """
        chosen = self.agents if agents is None else tuple(agents)
        normals = rng.standard_normal((len(chosen), len(self._resources) + 1))
        return self.sample_from(normals, chosen)

    def sample_from(
        self, normals: np.ndarray, agents: Iterable[str] | None = None
    ) -> Estimates:
        """The Thompson sample that given standard normals make, row per agent.

        ``normals`` is ``(N, R + 1)``, row ``i`` for ``agents[i]``: the log
        scale first, then one per resource. The sample is ``m + L z`` with
        ``L`` the Cholesky factor of the agent's posterior covariance, made
        feasible like :meth:`UtilityLearner.sample`. Holding ``normals``
        fixed holds one exploration draw fixed while the posteriors move.
        """
        chosen, learners = self._choose(agents)
        n, size = len(chosen), self._size
        normals = np.asarray(normals, dtype=float)
        if normals.shape != (n, size):
            raise FairsynergyError(
                f"normals have shape {normals.shape}; expected {(n, size)}: one "
                "row per agent, log scale first, then one per resource"
            )

        mean = _stack([learner._mean for learner in learners], size)
        cov = _stack([learner._cov for learner in learners], size * size)
        cov = cov.reshape(n, size, size)
        theta = mean + np.einsum("nij,nj->ni", _cholesky_many(cov), normals)
        limit = np.array([learner.elasticity_max for learner in learners])
        outside = (theta[:, 1:].min(axis=1) < 0.0) | (theta[:, 1:].sum(axis=1) > limit)
        if outside.any():
            theta[outside] = _feasible_many(
                theta[outside], cov[outside], limit[outside], learners, outside
            )
        return self._arrays(chosen, learners, theta, cov)

    def predict_many(self, agents: Sequence[str], totals: np.ndarray) -> np.ndarray:
        """:meth:`UtilityLearner.predict_one` for many agents at once.

        ``totals`` is ``(N, R)``: row ``i`` holds the total amounts (local
        plus cloud) of ``agents[i]`` in resource order. The values are
        exactly those of ``fleet[agent].predict_one``.
        """
        chosen, learners = self._choose(agents)
        totals = np.asarray(totals, dtype=float)
        if totals.shape != (len(chosen), len(self._resources)):
            raise FairsynergyError(
                f"totals have shape {totals.shape}; expected "
                f"{(len(chosen), len(self._resources))}: one row per agent, "
                "one column per resource"
            )
        rows = totals.tolist()
        predicted = [
            learner._predict(row) for learner, row in zip(learners, rows, strict=True)
        ]
        return np.array(predicted, dtype=float)

    def _choose(
        self, agents: Iterable[str] | None
    ) -> tuple[tuple[str, ...], list[UtilityLearner]]:
        chosen = self.agents if agents is None else tuple(agents)
        self._rebuild(chosen)
        entries = self._agents
        try:
            learners = [entries[a].learner for a in chosen]
        except KeyError:
            missing = [a for a in chosen if a not in entries]
            raise FairsynergyError(
                f"no learner for agent(s) {missing[:5]}; known agents send "
                "telemetry first or are added with add_agent"
            ) from None
        return chosen, learners

    def _arrays(
        self,
        agents: tuple[str, ...],
        learners: list[UtilityLearner],
        theta: np.ndarray,
        cov: np.ndarray | None = None,
    ) -> Estimates:
        r, size = len(self._resources), self._size
        if cov is None:
            step = size + 1
            variance = _stack([learner._cov[step::step] for learner in learners], r)
        else:
            variance = np.diagonal(cov, axis1=1, axis2=2)[:, 1:]
        sd = np.sqrt(np.maximum(variance, 0.0))
        prior_sd = _stack([learner._prior.sd for learner in learners], size)[:, 1:]
        confident_sd = np.array([learner.confident_sd for learner in learners])

        return Estimates(
            agents=agents,
            scale=np.exp(theta[:, 0]),
            elasticity=theta[:, 1:],
            local=_stack([self._agents[a].local for a in agents], r),
            ceiling=np.array([learner.ceiling for learner in learners], dtype=float),
            sd_elasticity=sd,
            uncertainty=np.clip((sd / prior_sd).max(axis=1, initial=0.0), 0.0, 1.0),
            confident=variance.max(axis=1) <= confident_sd**2,
        )

    # ------------------------------------------------------------------ state

    def to_state(self) -> dict[str, Any]:
        """Return the whole fleet's learning state as plain JSON-compatible data."""
        return {
            "version": STATE_VERSION,
            "resources": list(self._resources),
            "pool_min_agents": self.pool_min_agents,
            "pool_min_samples": self.pool_min_samples,
            "template": self._template.to_state(),
            "agents": [
                {"agent": agent, **self.agent_state(agent)} for agent in self.agents
            ],
            "pools": [
                {"model": label, "prior": prior.to_state()}
                for label, prior in self._pools.items()
            ],
            "updates_since_pool": self._updates_since_pool,
            "n_duplicates": self._n_duplicates,
            "n_stale": self._n_stale,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> FleetLearner:
        """Rebuild a fleet saved by :meth:`to_state`."""
        if state.get("version") != STATE_VERSION:
            raise FairsynergyError(
                f"fleet learner state version {state.get('version')!r} is not "
                f"supported; expected {STATE_VERSION}"
            )
        fleet = cls(
            state["resources"],
            learner=UtilityLearner.from_state(state["template"]),
            pool_min_agents=state["pool_min_agents"],
            pool_min_samples=state["pool_min_samples"],
        )
        fleet.restore_agents({saved["agent"]: saved for saved in state["agents"]})
        fleet._pools = {
            p["model"]: Prior.from_state(p["prior"]) for p in state["pools"]
        }
        fleet._updates_since_pool = state["updates_since_pool"]
        fleet._n_duplicates = state["n_duplicates"]
        fleet._n_stale = state["n_stale"]
        return fleet


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while many learners are rebuilt."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def _stack(rows: Sequence[Sequence[float]], width: int) -> np.ndarray:
    """Rows of ``width`` floats as an ``(N, width)`` array.

    Faster than ``np.array`` on a list of lists, which inspects every row.
    """
    flat = np.fromiter(
        itertools.chain.from_iterable(rows), dtype=float, count=len(rows) * width
    )
    return flat.reshape(len(rows), width)


def _feasible_many(
    theta: np.ndarray,
    cov: np.ndarray,
    limit: np.ndarray,
    learners: Sequence[UtilityLearner],
    rows: np.ndarray,
) -> np.ndarray:
    """:meth:`UtilityLearner._feasible` (no lift) for a stack of draws.

    The elasticities are projected in each posterior's metric, and the log
    scale moves to its conditional mean given them, ``C_ag C_gg^-1 (g - m_g)``.
    Should a covariance be too close to singular for numpy's batched solve,
    the draws (``rows`` of ``learners``) go through the learners one by one.
    """
    gamma, block = theta[:, 1:], cov[:, 1:, 1:]
    try:
        target = linalg.project_many(gamma, block, limit)
        weights = np.linalg.solve(block, cov[:, 1:, :1])[..., 0]
    except np.linalg.LinAlgError:
        chosen = [learners[i] for i in np.flatnonzero(rows).tolist()]
        moved = [
            learner._feasible(draw)
            for learner, draw in zip(chosen, theta.tolist(), strict=True)
        ]
        return np.array(moved, dtype=float)
    scale = theta[:, 0] + np.einsum("kr,kr->k", weights, target - gamma)
    return np.column_stack([scale, target])


def _cholesky_many(cov: np.ndarray) -> np.ndarray:
    """Lower Cholesky factors of a stack of covariances.

    numpy's factorisation refuses a matrix that rounding has left a hair
    short of positive definite; the learner's own factorisation floors such
    a pivot instead, so those (rare) stacks are factorised one by one.
    """
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        return np.array([linalg.cholesky(matrix) for matrix in cov.tolist()]).reshape(
            cov.shape
        )
