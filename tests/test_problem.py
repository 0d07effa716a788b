"""The instance model: defaults, read-only arrays, and every refusal path."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from controller.errors import FairsynergyError
from controller.problem import (
    InstanceError,
    Problem,
    load_instance,
    parse_alpha,
    parse_instance,
)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "schemas" / "instance.schema.json").read_text())
EXAMPLES = Path(__file__).resolve().parent / "instances"


def instance() -> dict[str, Any]:
    """A small valid instance that each refusal test breaks in one place."""
    return {
        "alpha": 1,
        "budget": {"compute": 10.0, "data": 4.0},
        "agents": [
            {
                "id": "drone-1",
                "scale": 0.8,
                "elasticity": {"compute": 0.3, "data": 0.2},
                "local": {"compute": 0.05, "data": 0.0},
                "weight": 2.0,
                "floor": {"compute": 0.1},
                "cap": {"data": 2.0},
                "ceiling": 0.9,
            },
            {"id": "drone-2", "scale": 0.6, "elasticity": {"compute": 0.5}},
        ],
    }


def test_problem_parse_instance_fills_defaults() -> None:
    """Test missing entries become elasticity 0, local 0, weight 1, no cap."""
    problem = parse_instance(instance())

    assert problem.resources == ("compute", "data")
    assert problem.agents == ("drone-1", "drone-2")
    assert problem.budget.tolist() == [10.0, 4.0]
    assert problem.elasticity.tolist() == [[0.3, 0.2], [0.5, 0.0]]
    assert problem.local.tolist() == [[0.05, 0.0], [0.0, 0.0]]
    assert problem.weight.tolist() == [2.0, 1.0]
    assert problem.floor.tolist() == [[0.1, 0.0], [0.0, 0.0]]
    assert problem.cap.tolist() == [[math.inf, 2.0], [math.inf, math.inf]]
    assert problem.ceiling.tolist() == [0.9, 1.0]
    assert problem.alpha == 1.0


def test_problem_alpha_defaults_to_proportional_fairness() -> None:
    """Test an instance without alpha is solved with alpha = 1."""
    data = instance()
    del data["alpha"]

    assert parse_instance(data).alpha == 1.0


def test_problem_arrays_are_read_only_copies() -> None:
    """Test a Problem cannot be changed through its arrays or its inputs."""
    scale = np.array([1.0, 2.0])
    problem = Problem.from_arrays(
        ["compute"], ["a", "b"], [1.0], scale, [[0.5], [0.5]], [[0.0], [0.0]]
    )
    scale[0] = 9.0

    assert problem.scale.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="read-only"):
        problem.scale[0] = 3.0


def test_problem_from_arrays_fills_defaults() -> None:
    """Test from_arrays gives weight 1, floor 0, no cap, ceiling 1, alpha 1."""
    problem = Problem.from_arrays(["compute"], ["a"], [1.0], [1.0], [[0.5]], [[0.0]])

    assert problem.weight.tolist() == [1.0]
    assert problem.floor.tolist() == [[0.0]]
    assert problem.cap.tolist() == [[math.inf]]
    assert problem.ceiling.tolist() == [1.0]
    assert problem.alpha == 1.0


def test_problem_with_alpha_changes_only_alpha() -> None:
    """Test with_alpha keeps the fleet and budgets."""
    problem = parse_instance(instance())

    other = problem.with_alpha(math.inf)

    assert other.alpha == math.inf
    assert other.agents == problem.agents
    assert np.array_equal(other.elasticity, problem.elasticity)


def test_problem_instance_error_is_a_fairsynergy_value_error() -> None:
    """Test InstanceError is caught by the CLI's handler and by ValueError."""
    assert issubclass(InstanceError, FairsynergyError)
    assert issubclass(InstanceError, ValueError)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0.0), (2, 2.0), (0.5, 0.5), ("inf", math.inf), ("Infinity", math.inf),
     (math.inf, math.inf), ("3", 3.0)],
)  # fmt: skip
def test_problem_parse_alpha_accepts_numbers_and_inf(
    value: object, expected: float
) -> None:
    """Test alpha is a number >= 0 or one of the spellings of infinity."""
    assert parse_alpha(value) == expected


@pytest.mark.parametrize("value", [-1, "fair", None, True, math.nan, [1]])
def test_problem_parse_alpha_refuses_everything_else(value: object) -> None:
    """Test a bad alpha names the field and what would be accepted."""
    with pytest.raises(InstanceError, match=r"alpha: .*number >= 0 or 'inf'"):
        parse_alpha(value)


def _set(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = instance()
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def _drop(path: tuple[Any, ...]) -> dict[str, Any]:
    data = instance()
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return data


REFUSALS = [
    ("unknown top-level field", _set(("fairness",), 1),
     r"instance: unknown field 'fairness'"),
    ("unknown agent field", _set(("agents", 0, "gamma"), {}),
     r"agent 'drone-1': unknown field 'gamma'"),
    ("missing budget", _drop(("budget",)), r"missing field 'budget'"),
    ("missing agents", _drop(("agents",)), r"missing field 'agents'"),
    ("missing scale", _drop(("agents", 1, "scale")),
     r"agent 'drone-2': missing field 'scale'"),
    ("empty fleet", _set(("agents",), []), r"agents: the fleet is empty"),
    ("agents not a list", _set(("agents",), {"a": 1}), r"agents: expected a list"),
    ("agent not an object", _set(("agents", 0), 3),
     r"agents\[0\]: expected an object"),
    ("budget not an object", _set(("budget",), [1.0]), r"budget: expected an object"),
    ("empty budget", _set(("budget",), {}), r"budget: names no resource"),
    ("negative budget", _set(("budget", "data"), -1.0),
     r"budget: resource 'data': got -1.0; must be a finite number >= 0"),
    ("infinite budget", _set(("budget", "data"), math.inf),
     r"budget: resource 'data': got inf"),
    ("bad resource name", _set(("budget", "GPU hours"), 1.0),
     r"budget: resource 'GPU hours': names must match"),
    ("resource not in budget", _set(("agents", 1, "local"), {"energy": 1.0}),
     r"agent 'drone-2': field 'local.energy': resource 'energy' is not in the budget"),
    ("duplicate ids", _set(("agents", 1, "id"), "drone-1"),
     r"agent 'drone-1': field 'id': appears twice"),
    ("bad id", _set(("agents", 1, "id"), "drone 2"),
     r"agents\[1\]: field 'id': got 'drone 2'"),
    ("missing id", _drop(("agents", 1, "id")), r"agents\[1\]: field 'id': got None"),
    ("zero scale", _set(("agents", 0, "scale"), 0),
     r"agent 'drone-1': field 'scale': got 0; must be a finite number > 0"),
    ("nan scale", _set(("agents", 0, "scale"), math.nan),
     r"agent 'drone-1': field 'scale': got nan"),
    ("string scale", _set(("agents", 0, "scale"), "1"),
     r"agent 'drone-1': field 'scale': got '1'"),
    ("boolean weight", _set(("agents", 0, "weight"), True),
     r"agent 'drone-1': field 'weight': got True"),
    ("zero weight", _set(("agents", 0, "weight"), 0.0),
     r"field 'weight': got 0.0; must be a finite number > 0"),
    ("infinite ceiling", _set(("agents", 0, "ceiling"), math.inf),
     r"field 'ceiling': got inf"),
    ("negative elasticity", _set(("agents", 1, "elasticity", "compute"), -0.1),
     r"agent 'drone-2': field 'elasticity.compute': got -0.1"),
    ("negative local", _set(("agents", 0, "local", "data"), -1),
     r"agent 'drone-1': field 'local.data': got -1"),
    ("infinite local", _set(("agents", 0, "local", "data"), math.inf),
     r"field 'local.data': got inf"),
    ("negative floor", _set(("agents", 0, "floor", "compute"), -0.1),
     r"field 'floor.compute': got -0.1"),
    ("negative cap", _set(("agents", 0, "cap", "data"), -2.0),
     r"field 'cap.data': got -2.0"),
    ("elasticity not an object", _set(("agents", 0, "elasticity"), [0.3]),
     r"field 'elasticity': expected an object"),
    ("elasticities above 1",
     _set(("agents", 0, "elasticity"), {"compute": 0.7, "data": 0.5}),
     r"agent 'drone-1': field 'elasticity': sums to 1\.2 "
     r"\(compute 0\.7 \+ data 0\.5\); .* at most 1"),
    ("floor above cap", _set(("agents", 0, "floor"), {"data": 3.0}),
     r"agent 'drone-1': field 'floor.data': got 3\.0; it is above the cap 2"),
    ("floors above budget", _set(("agents", 1, "floor"), {"data": 4.5}),
     r"budget: resource 'data': the floors of the agents add up to 4\.5, "
     r"above the budget 4"),
    ("bad alpha", _set(("alpha",), "max-min"), r"alpha: got 'max-min'"),
    ("instance not an object", None, r"instance: expected a JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "message"),
    [pytest.param(data, message, id=name) for name, data, message in REFUSALS],
)
def test_problem_parse_instance_refuses_with_a_clear_message(
    data: object, message: str
) -> None:
    """Test each invalid instance is refused, naming agent, field and problem."""
    if data is None:
        data = ["not", "an", "object"]

    with pytest.raises(InstanceError, match=message):
        parse_instance(data)


def test_problem_elasticities_may_exceed_one_by_rounding() -> None:
    """Test a sum of 1 + 1e-13 (a JSON round trip) is accepted, 1 + 1e-9 not."""
    ok = _set(("agents", 0, "elasticity"), {"compute": 0.6, "data": 0.4 + 1e-13})
    bad = _set(("agents", 0, "elasticity"), {"compute": 0.6, "data": 0.4 + 1e-9})

    parse_instance(ok)
    with pytest.raises(InstanceError, match="elasticity"):
        parse_instance(bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scale": [1.0, math.nan]}, r"agent 'b': field 'scale': got nan"),
        ({"budget": [math.nan]}, r"budget: resource 'compute'"),
        ({"cap": [[1.0], [math.nan]]}, r"agent 'b': field 'cap.compute': got nan"),
        ({"local": [[1.0]]}, r"local: shape \(1, 1\), expected \(2, 1\)"),
        ({"weight": ["x", 1.0]}, r"weight: not an array of numbers"),
        ({"agents": ("a", "a")}, r"agent id 'a': appears twice"),
        ({"agents": ()}, r"agents: the fleet is empty"),
        ({"resources": ("Compute",)}, r"resource 'Compute': must match"),
        ({"alpha": -0.5}, r"alpha: got -0.5"),
    ],
)
def test_problem_constructor_validates_arrays(
    change: dict[str, Any], message: str
) -> None:
    """Test Problem itself refuses bad arrays, names and alpha."""
    arguments: dict[str, Any] = {
        "resources": ("compute",),
        "agents": ("a", "b"),
        "budget": [1.0],
        "scale": [1.0, 1.0],
        "elasticity": [[0.5], [0.5]],
        "local": [[0.0], [0.0]],
        "alpha": 1.0,
    }
    arguments.update(change)
    if "agents" in change and len(change["agents"]) == 0:
        empty = np.zeros((0, 1))
        arguments.update(scale=[], elasticity=empty, local=empty)

    with pytest.raises(InstanceError, match=message):
        Problem.from_arrays(**arguments)


def test_problem_load_instance_reads_a_file(tmp_path: Path) -> None:
    """Test an instance file is read and parsed."""
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(instance()))

    problem = load_instance(str(path))

    assert problem.agents == ("drone-1", "drone-2")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"budget": {"compute": NaN}, "agents": []}', r"NaN is not a number"),
        ('{"budget": {"compute": Infinity}}', r"Infinity is not a number"),
        ('{"budget": ', r"not valid JSON: Expecting value at line 1"),
    ],
)
def test_problem_load_instance_refuses_non_strict_json(
    tmp_path: Path, text: str, message: str
) -> None:
    """Test NaN / Infinity tokens and broken JSON are refused with the file name."""
    path = tmp_path / "bad.json"
    path.write_text(text)

    with pytest.raises(InstanceError, match=f"bad.json: .*{message}"):
        load_instance(str(path))


def test_problem_load_instance_names_a_missing_file(tmp_path: Path) -> None:
    """Test a missing file is an InstanceError naming the path."""
    with pytest.raises(InstanceError, match=r"missing.json: cannot read"):
        load_instance(str(tmp_path / "missing.json"))


def test_problem_schema_is_draft_2020_12_with_our_id() -> None:
    """Test the instance schema is itself valid and carries the project's $id."""
    jsonschema.Draft202012Validator.check_schema(SCHEMA)

    assert SCHEMA["$id"] == "https://fairsynergy.dev/schemas/instance.schema.json"


@pytest.mark.parametrize(
    "path", sorted(EXAMPLES.glob("valid/*.json")), ids=lambda p: p.stem
)
def test_problem_valid_examples_pass_schema_and_parser(path: Path) -> None:
    """Test every valid example instance is accepted by the schema and the parser."""
    data = json.loads(path.read_text())

    jsonschema.validate(data, SCHEMA, cls=jsonschema.Draft202012Validator)
    parse_instance(data)


@pytest.mark.parametrize(
    "path", sorted(EXAMPLES.glob("invalid/*.json")), ids=lambda p: p.stem
)
def test_problem_invalid_examples_fail_schema_and_parser(path: Path) -> None:
    """Test every invalid example instance is refused by the schema and the parser."""
    data = json.loads(path.read_text())

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, SCHEMA, cls=jsonschema.Draft202012Validator)
    with pytest.raises(InstanceError):
        parse_instance(data)


def test_problem_schema_accepts_the_documented_instance() -> None:
    """Test the instance used throughout the tests is schema-valid too."""
    data = copy.deepcopy(instance())

    jsonschema.validate(data, SCHEMA, cls=jsonschema.Draft202012Validator)
