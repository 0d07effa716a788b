"""One allocation problem: the fleet, its budgets and the fairness to share with.

:class:`Problem` holds the numbers as arrays (agents along rows, resources along
columns) and refuses anything the solver could not treat exactly: negative or
non-finite amounts, elasticities outside the concave region, floors above caps
or above the budget. :func:`parse_instance` reads the JSON instance format of
``fairsynergy allocate`` into a :class:`Problem`; every message it raises names
the agent, the field and what would be accepted.

>>> problem = parse_instance({
...     "alpha": 1,
...     "budget": {"compute": 10.0},
...     "agents": [
...         {"id": "drone-1", "scale": 0.8, "elasticity": {"compute": 0.3}},
...         {"id": "drone-2", "scale": 0.6, "elasticity": {"compute": 0.5}},
...     ],
... })
>>> problem.agents, problem.resources, problem.budget.tolist()
(('drone-1', 'drone-2'), ('compute',), [10.0])
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from controller.errors import FairsynergyError

# Elasticities of one agent may sum to 1 plus this much (rounding in a learner or
# in a JSON round trip); the solver rescales such rows to sum to exactly 1.
ELASTICITY_SLACK = 1e-12

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

AGENT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
RESOURCE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")

INSTANCE_FIELDS = frozenset({"alpha", "budget", "agents"})
AGENT_FIELDS = frozenset(
    {"id", "scale", "elasticity", "local", "weight", "floor", "cap", "ceiling"}
)
AGENT_REQUIRED = ("id", "scale")


class InstanceError(FairsynergyError, ValueError):
    """An allocation instance the solver refuses, with the reason and the culprit."""


@dataclass(frozen=True)
class Problem:
    """An alpha-fair allocation problem over a fleet and a pool of resources.

    Maximise ``sum_i weight_i * U_alpha(v_i)`` where
    ``v_i = min(ceiling_i, scale_i * prod_r (local_ir + cloud_ir) ** elasticity_ir)``,
    subject to ``sum_i cloud_ir <= budget_r`` and ``floor_ir <= cloud_ir <= cap_ir``.
    ``U_alpha(v) = v ** (1 - alpha) / (1 - alpha)`` (``log v`` at ``alpha == 1``);
    ``alpha == math.inf`` asks for max-min fairness refined to leximin.

    Arrays are copied, converted to float and made read-only; rows follow
    :attr:`agents`, columns follow :attr:`resources`. Use :meth:`from_arrays`
    to get the defaults filled in.
    """

    resources: tuple[str, ...]
    agents: tuple[str, ...]
    budget: FloatArray
    scale: FloatArray
    elasticity: FloatArray
    local: FloatArray
    weight: FloatArray
    floor: FloatArray
    cap: FloatArray
    ceiling: FloatArray
    alpha: float = field(default=1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resources", tuple(self.resources))
        object.__setattr__(self, "agents", tuple(self.agents))
        _check_names(self.resources, self.agents)
        sizes = {"n": len(self.agents), "r": len(self.resources)}
        for name, axes in _AXES.items():
            shape = tuple(sizes[axis] for axis in axes)
            array = _frozen_array(getattr(self, name), name, shape)
            object.__setattr__(self, name, array)
        object.__setattr__(self, "alpha", parse_alpha(self.alpha))
        _check_values(self)

    @property
    def n_agents(self) -> int:
        """Number of agents (rows)."""
        return len(self.agents)

    @property
    def n_resources(self) -> int:
        """Number of resources (columns)."""
        return len(self.resources)

    def with_alpha(self, alpha: float) -> Problem:
        """The same fleet and budgets with another fairness parameter."""
        return replace(self, alpha=alpha)

    @classmethod
    def from_arrays(
        cls,
        resources: Sequence[str],
        agents: Sequence[str],
        budget: Any,
        scale: Any,
        elasticity: Any,
        local: Any,
        *,
        weight: Any = None,
        floor: Any = None,
        cap: Any = None,
        ceiling: Any = None,
        alpha: float = 1.0,
    ) -> Problem:
        """Build a problem, filling in weight 1, floor 0, no cap and ceiling 1."""
        n, r = len(agents), len(resources)
        return cls(
            resources=tuple(resources),
            agents=tuple(agents),
            budget=budget,
            scale=scale,
            elasticity=elasticity,
            local=local,
            weight=np.ones(n) if weight is None else weight,
            floor=np.zeros((n, r)) if floor is None else floor,
            cap=np.full((n, r), math.inf) if cap is None else cap,
            ceiling=np.ones(n) if ceiling is None else ceiling,
            alpha=alpha,
        )


# Array fields and their axes: "n" agents, "r" resources.
_AXES: dict[str, str] = {
    "budget": "r",
    "scale": "n",
    "elasticity": "nr",
    "local": "nr",
    "weight": "n",
    "floor": "nr",
    "cap": "nr",
    "ceiling": "n",
}


def _frozen_array(value: Any, name: str, shape: tuple[int, ...]) -> FloatArray:
    try:
        array = np.array(value, dtype=float)
    except (TypeError, ValueError) as error:
        raise InstanceError(f"{name}: not an array of numbers ({error})") from None
    if array.shape != shape:
        raise InstanceError(f"{name}: shape {array.shape}, expected {shape}")
    array.setflags(write=False)
    return array


def _check_names(resources: tuple[str, ...], agents: tuple[str, ...]) -> None:
    if not agents:
        raise InstanceError("agents: the fleet is empty; give at least one agent")
    if not resources:
        raise InstanceError("budget: names no resource; give at least one")
    for kind, names, pattern in (
        ("agent id", agents, AGENT_ID),
        ("resource", resources, RESOURCE_NAME),
    ):
        seen: set[str] = set()
        for name in names:
            if not isinstance(name, str) or not pattern.fullmatch(name):
                raise InstanceError(f"{kind} {name!r}: must match {pattern.pattern}")
            if name in seen:
                raise InstanceError(f"{kind} {name!r}: appears twice; ids are unique")
            seen.add(name)


def _check_values(problem: Problem) -> None:
    _check_agent_numbers(problem)
    _check_budget(problem)


def _check_agent_numbers(p: Problem) -> None:
    positive, non_negative = "a finite number > 0", "a finite number >= 0"
    rules: tuple[tuple[str, FloatArray, str, Callable[[FloatArray], BoolArray]], ...]
    rules = (
        ("scale", p.scale, positive, _finite_positive),
        ("weight", p.weight, positive, _finite_positive),
        ("ceiling", p.ceiling, positive, _finite_positive),
        ("elasticity", p.elasticity, non_negative, _finite_non_negative),
        ("local", p.local, non_negative, _finite_non_negative),
        ("floor", p.floor, non_negative, _finite_non_negative),
        ("cap", p.cap, "a number >= 0 (omit it for no cap)", _non_negative),
    )
    for name, array, accepted, ok in rules:
        bad = np.argwhere(~ok(array))
        if bad.size:
            raise InstanceError(_where(p, name, bad[0]) + f"must be {accepted}")
    _check_elasticity_sums(p)
    bad = np.argwhere(p.floor > p.cap)
    if bad.size:
        i, r = bad[0]
        raise InstanceError(
            _where(p, "floor", bad[0]) + f"it is above the cap {p.cap[i, r]:g}; "
            "a floor must not exceed the cap"
        )


def _finite_positive(array: FloatArray) -> BoolArray:
    return np.isfinite(array) & (array > 0)


def _finite_non_negative(array: FloatArray) -> BoolArray:
    return np.isfinite(array) & (array >= 0)


def _non_negative(array: FloatArray) -> BoolArray:
    return np.asarray(array >= 0)


def _check_elasticity_sums(p: Problem) -> None:
    sums = p.elasticity.sum(axis=1)
    over = np.flatnonzero(sums > 1 + ELASTICITY_SLACK)
    if over.size:
        i = over[0]
        terms = " + ".join(
            f"{name} {value:g}"
            for name, value in zip(p.resources, p.elasticity[i], strict=True)
            if value > 0
        )
        raise InstanceError(
            f"agent {p.agents[i]!r}: field 'elasticity': sums to {sums[i]:.6g} "
            f"({terms}); the utility is concave only when the elasticities of an "
            "agent sum to at most 1"
        )


def _check_budget(p: Problem) -> None:
    for r, name in enumerate(p.resources):
        amount = p.budget[r]
        if not (math.isfinite(amount) and amount >= 0):
            raise InstanceError(
                f"budget: resource {name!r}: must be a finite number >= 0, "
                f"got {amount!r}"
            )
        floors = math.fsum(p.floor[:, r])
        if floors > amount:
            raise InstanceError(
                f"budget: resource {name!r}: the floors of the agents add up to "
                f"{floors:g}, above the budget {amount:g}; lower the floors or "
                "raise the budget"
            )


def _where(p: Problem, name: str, index: FloatArray) -> str:
    i = int(index[0])
    field_name = name
    if len(index) == 2:
        field_name = f"{name}.{p.resources[int(index[1])]}"
    value = float(getattr(p, name)[tuple(int(k) for k in index)])
    return f"agent {p.agents[i]!r}: field {field_name!r}: got {value!r}; "


# --- the JSON instance format -------------------------------------------------


def load_instance(source: str) -> Problem:
    """Read an instance from a JSON file, or from stdin when ``source`` is ``-``.

    The JSON must be strict: ``NaN`` and ``Infinity`` tokens are refused.
    """
    name = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else _read(source)
        data = json.loads(text, parse_constant=_refuse_constant)
    except OSError as error:
        raise InstanceError(f"{name}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise InstanceError(f"{name}: not UTF-8 text ({error.reason})") from None
    except json.JSONDecodeError as error:
        raise InstanceError(
            f"{name}: not valid JSON: {error.msg} at line {error.lineno} "
            f"column {error.colno}"
        ) from None
    return parse_instance(data)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _refuse_constant(token: str) -> object:
    raise json.JSONDecodeError(f"{token} is not a number in strict JSON", token, 0)


def parse_alpha(value: object) -> float:
    """Read a fairness parameter: a number >= 0, or ``"inf"`` for max-min.

    ``"Infinity"`` and a float infinity are accepted as well.

    >>> parse_alpha(2), parse_alpha("inf")
    (2.0, inf)
    """
    if isinstance(value, str):
        if value.strip().lower() in ("inf", "infinity", "+inf"):
            return math.inf
        try:
            value = float(value)
        except ValueError:
            raise InstanceError(
                f"alpha: got {value!r}; give a number >= 0 or 'inf'"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InstanceError(f"alpha: got {value!r}; give a number >= 0 or 'inf'")
    alpha = float(value)
    if math.isnan(alpha) or alpha < 0:
        raise InstanceError(f"alpha: got {value!r}; give a number >= 0 or 'inf'")
    return alpha


def parse_instance(data: object) -> Problem:
    """Read a JSON-like instance into a :class:`Problem`.

    The instance has ``budget`` (resource name -> amount), ``agents`` (a list of
    objects with ``id``, ``scale`` and optionally ``elasticity``, ``local``,
    ``weight``, ``floor``, ``cap`` and ``ceiling``) and optionally ``alpha``
    (default 1). Missing elasticity and local entries are 0. Raises
    :class:`InstanceError` naming the agent and field of the first problem.
    """
    if not isinstance(data, Mapping):
        raise InstanceError(
            f"instance: expected a JSON object, got {type(data).__name__}"
        )
    _refuse_unknown(data, INSTANCE_FIELDS, "instance")
    if "budget" not in data:
        raise InstanceError("instance: missing field 'budget'")
    if "agents" not in data:
        raise InstanceError("instance: missing field 'agents'")
    budget = _parse_budget(data["budget"])
    resources = tuple(budget)
    agents = data["agents"]
    if not isinstance(agents, list):
        raise InstanceError("agents: expected a list of agent objects")
    if not agents:
        raise InstanceError("agents: the fleet is empty; give at least one agent")
    rows = [_parse_agent(agent, k, resources) for k, agent in enumerate(agents)]
    _refuse_duplicates([row["id"] for row in rows])
    alpha = parse_alpha(data.get("alpha", 1.0))
    return _problem_from_rows(resources, budget, rows, alpha)


def _parse_budget(value: object) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise InstanceError("budget: expected an object of resource -> amount")
    if not value:
        raise InstanceError("budget: names no resource; give at least one")
    budget: dict[str, float] = {}
    for name, amount in value.items():
        if not isinstance(name, str) or not RESOURCE_NAME.fullmatch(name):
            raise InstanceError(
                f"budget: resource {name!r}: names must match {RESOURCE_NAME.pattern}"
            )
        budget[name] = _number(amount, f"budget: resource {name!r}", minimum=0.0)
    return budget


def _parse_agent(
    agent: object, position: int, resources: tuple[str, ...]
) -> dict[str, Any]:
    if not isinstance(agent, Mapping):
        raise InstanceError(f"agents[{position}]: expected an object")
    agent_id = agent.get("id")
    if not isinstance(agent_id, str) or not AGENT_ID.fullmatch(agent_id):
        raise InstanceError(
            f"agents[{position}]: field 'id': got {agent_id!r}; ids must match "
            f"{AGENT_ID.pattern}"
        )
    who = f"agent {agent_id!r}"
    _refuse_unknown(agent, AGENT_FIELDS, who)
    if "scale" not in agent:
        raise InstanceError(f"{who}: missing field 'scale'")
    row: dict[str, Any] = {"id": agent_id}
    row["scale"] = _number(agent["scale"], f"{who}: field 'scale'", positive=True)
    for name in ("weight", "ceiling"):
        if name in agent:
            row[name] = _number(agent[name], f"{who}: field {name!r}", positive=True)
    for name, default in (
        ("elasticity", 0.0),
        ("local", 0.0),
        ("floor", 0.0),
        ("cap", math.inf),
    ):
        row[name] = _per_resource(agent.get(name, {}), who, name, resources, default)
    return row


def _per_resource(
    value: object, who: str, name: str, resources: tuple[str, ...], default: float
) -> list[float]:
    if not isinstance(value, Mapping):
        raise InstanceError(
            f"{who}: field {name!r}: expected an object of resource -> amount"
        )
    for resource in value:
        if resource not in resources:
            raise InstanceError(
                f"{who}: field '{name}.{resource}': resource {resource!r} is not in "
                f"the budget (budget has {', '.join(resources)})"
            )
    return [
        _number(value[r], f"{who}: field '{name}.{r}'", minimum=0.0)
        if r in value
        else default
        for r in resources
    ]


def _number(
    value: object, where: str, *, minimum: float = 0.0, positive: bool = False
) -> float:
    accepted = "a finite number > 0" if positive else f"a finite number >= {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InstanceError(f"{where}: got {value!r}; must be {accepted}")
    number = float(value)
    if not math.isfinite(number) or number < minimum or (positive and number <= 0):
        raise InstanceError(f"{where}: got {value!r}; must be {accepted}")
    return number


def _refuse_unknown(data: Mapping[Any, Any], known: frozenset[str], who: str) -> None:
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise InstanceError(
            f"{who}: unknown field {unknown[0]!r}; known fields are "
            f"{', '.join(sorted(known))}"
        )


def _refuse_duplicates(ids: list[str]) -> None:
    seen: set[str] = set()
    for agent_id in ids:
        if agent_id in seen:
            raise InstanceError(f"agent {agent_id!r}: field 'id': appears twice")
        seen.add(agent_id)


def _problem_from_rows(
    resources: tuple[str, ...],
    budget: dict[str, float],
    rows: list[dict[str, Any]],
    alpha: float,
) -> Problem:
    def column(name: str, default: float) -> FloatArray:
        return np.array([row.get(name, default) for row in rows], dtype=float)

    def matrix(name: str) -> FloatArray:
        return np.array([row[name] for row in rows], dtype=float).reshape(
            len(rows), len(resources)
        )

    return Problem(
        resources=resources,
        agents=tuple(row["id"] for row in rows),
        budget=np.array([budget[r] for r in resources]),
        scale=column("scale", 1.0),
        elasticity=matrix("elasticity"),
        local=matrix("local"),
        weight=column("weight", 1.0),
        floor=matrix("floor"),
        cap=matrix("cap"),
        ceiling=column("ceiling", 1.0),
        alpha=alpha,
    )
