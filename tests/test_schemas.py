"""The wire contract: schema files, examples, and the decode/encode gates."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import schemas
from schemas import MAX_PAYLOAD_BYTES, Kind, MessageError

SCHEMA_DIR = Path(schemas.__file__).parent
EXAMPLES = SCHEMA_DIR / "examples"
BASE_ID = "https://fairsynergy.dev/schemas/"

# Keywords whose meaning is the same in draft 7 (what fastjsonschema runs) and
# in 2020-12 (what the files declare), plus annotations.
PORTABLE_KEYWORDS = {
    "$schema", "$id", "$ref", "$defs", "title", "description", "type",
    "properties", "required", "additionalProperties", "patternProperties",
    "propertyNames", "enum", "const", "minimum", "maximum", "exclusiveMinimum",
    "minLength", "maxLength", "minProperties", "maxProperties", "pattern",
    "anyOf", "oneOf",
}  # fmt: skip
ANNOTATIONS = {"description", "title"}
MAP_KEYWORDS = {"properties", "$defs", "patternProperties"}


def example_files(group: str) -> list[Path]:
    return sorted(EXAMPLES.glob(f"*/{group}/*.json"))


def example_id(path: Path) -> str:
    return f"{path.parts[-3]}/{path.stem}"


def reference(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schemas.load_schema(kind))


def subschemas(node: Any) -> list[dict[str, Any]]:
    """Every schema object inside ``node``, including itself."""
    if not isinstance(node, dict):
        return []
    found = [node]
    for keyword, value in node.items():
        if keyword in MAP_KEYWORDS:
            children = list(value.values())
        elif keyword in ("anyOf", "oneOf"):
            children = value
        elif keyword in ("additionalProperties", "propertyNames"):
            children = [value]
        else:
            children = []
        for child in children:
            found.extend(subschemas(child))
    return found


def described_fields(node: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, schema) of every property and definition, at any depth."""
    fields = []
    for sub in subschemas(node):
        for keyword in ("properties", "$defs"):
            fields.extend(sub.get(keyword, {}).items())
    return fields


@pytest.mark.parametrize("kind", list(Kind))
def test_schemas_match_the_2020_12_metaschema(kind: Kind) -> None:
    """Test every message schema is a valid draft 2020-12 document."""
    document = schemas.load_schema(kind)

    jsonschema.Draft202012Validator.check_schema(document)

    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("kind", list(Kind))
def test_schemas_have_id_title_and_field_descriptions(kind: Kind) -> None:
    """Test each schema names itself and describes every field it defines."""
    document = schemas.load_schema(kind)

    undescribed = [
        name for name, field in described_fields(document) if "description" not in field
    ]

    assert document["$id"] == f"{BASE_ID}{kind.value}.schema.json"
    assert document["title"]
    assert document["description"]
    assert undescribed == []


@pytest.mark.parametrize("kind", list(Kind))
def test_schemas_use_only_keywords_fastjsonschema_reads_alike(kind: Kind) -> None:
    """Test the schemas stay inside what draft 7 and 2020-12 read the same way."""
    document = schemas.load_schema(kind)

    keywords = {key for sub in subschemas(document) for key in sub}
    ref_siblings = {
        key for sub in subschemas(document) if "$ref" in sub for key in sub
    } - {"$ref"}

    assert keywords <= PORTABLE_KEYWORDS
    # Draft 7 ignores anything next to $ref, so only annotations may sit there.
    assert ref_siblings <= ANNOTATIONS


def test_schemas_shared_definitions_are_identical() -> None:
    """Test a $defs entry means the same thing in every schema that has it."""
    seen: dict[str, Any] = {}
    conflicts = []

    for kind in Kind:
        for name, definition in schemas.load_schema(kind).get("$defs", {}).items():
            if seen.setdefault(name, definition) != definition:
                conflicts.append(f"{kind}: $defs/{name}")

    assert conflicts == []


def test_schemas_lists_every_schema_file() -> None:
    """Test schema_names lists every shipped schema, message kinds included."""
    on_disk = sorted(
        path.name.removesuffix(".schema.json")
        for path in SCHEMA_DIR.glob("*.schema.json")
    )

    names = schemas.schema_names()

    assert names == on_disk
    assert {kind.value for kind in Kind} <= set(names)


def test_schemas_unknown_schema_name_is_refused() -> None:
    """Test asking for a schema that does not exist names the known ones."""
    with pytest.raises(KeyError, match="telemetry"):
        schemas.load_schema("no-such-message")


@pytest.mark.parametrize("kind", list(Kind))
def test_schemas_every_kind_has_valid_and_invalid_examples(kind: Kind) -> None:
    """Test each message kind is illustrated both ways."""
    folder = EXAMPLES / kind.value

    assert list((folder / "valid").glob("*.json"))
    assert list((folder / "invalid").glob("*.json"))


@pytest.mark.parametrize("path", example_files("valid"), ids=example_id)
def test_schemas_valid_example_passes_both_validators(path: Path) -> None:
    """Test a valid example is accepted by fastjsonschema and by jsonschema."""
    kind = path.parts[-3]
    payload = path.read_bytes()

    message = schemas.decode(kind, payload)

    assert list(reference(kind).iter_errors(message)) == []


@pytest.mark.parametrize("path", example_files("invalid"), ids=example_id)
def test_schemas_invalid_example_fails_both_validators_once(path: Path) -> None:
    """Test an invalid example is refused by both validators, for one reason."""
    kind = path.parts[-3]
    payload = path.read_bytes()

    with pytest.raises(MessageError) as caught:
        schemas.decode(kind, payload)
    errors = list(reference(kind).iter_errors(json.loads(payload)))

    assert caught.value.reason in {"schema", "version"}
    assert len(errors) == 1, [error.message for error in errors]


def test_schemas_validators_agree_on_mutated_messages() -> None:
    """Test fastjsonschema and jsonschema agree on random edits of valid examples."""
    rng = random.Random(7)
    valid = [
        (path.parts[-3], json.loads(path.read_bytes()))
        for path in example_files("valid")
    ]
    odd_values: list[Any] = [
        None,
        True,
        -1,
        0,
        0.5,
        1.5,
        2**60,
        "",
        "x",
        "inf",
        [],
        {},
        {"Bad": 1},
    ]
    disagreements = []

    for _ in range(400):
        kind, message = rng.choice(valid)
        mutated = mutate(json.loads(json.dumps(message)), rng, odd_values)
        fast_ok = accepts(kind, mutated)
        if fast_ok != reference(kind).is_valid(mutated):
            disagreements.append((kind, mutated))

    assert disagreements == []


def mutate(message: dict[str, Any], rng: random.Random, values: list[Any]) -> Any:
    """Delete, replace or add one field, at the top or one level down."""
    target = message
    nested = [key for key, value in message.items() if isinstance(value, dict)]
    if nested and rng.random() < 0.5:
        target = message[rng.choice(nested)]
    action = rng.choice(["delete", "replace", "add"])
    if action == "delete" and target:
        del target[rng.choice(list(target))]
    elif action == "replace" and target:
        target[rng.choice(list(target))] = rng.choice(values)
    else:
        target[rng.choice(["compute", "Extra", "aplha", "robot-9"])] = rng.choice(
            values
        )
    return message


def accepts(kind: str, message: Any) -> bool:
    try:
        schemas.validate(kind, message)
    except MessageError:
        return False
    return True


def test_schemas_oversized_payload_is_refused_before_parsing() -> None:
    """Test a payload over the limit is refused as too large, not as bad JSON."""
    payload = b"{" + b"x" * MAX_PAYLOAD_BYTES

    with pytest.raises(MessageError) as caught:
        schemas.decode(Kind.TELEMETRY, payload)

    assert caught.value.reason == "too_large"
    assert caught.value.field is None
    assert str(MAX_PAYLOAD_BYTES) in str(caught.value)


def test_schemas_payload_at_the_limit_is_accepted() -> None:
    """Test the limit is inclusive: exactly MAX_PAYLOAD_BYTES bytes pass."""
    body = (EXAMPLES / "telemetry/valid/typical.json").read_bytes().strip()
    payload = body + b" " * (MAX_PAYLOAD_BYTES - len(body))

    message = schemas.decode(Kind.TELEMETRY, payload)

    assert len(payload) == MAX_PAYLOAD_BYTES
    assert message["seq"] == 42


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b'{"v": 1, "accuracy": NaN}',
        b'{"v": 1, "accuracy": Infinity}',
        b'{"v": 1, "accuracy": -Infinity}',
        b'{"v": 1, "accuracy": 1e999}',
        b'{"v": 1, "v": 1}',
        b'{"v": 1, "model": "\xff"}',
        b"[" * 20_000 + b"]" * 20_000,
        b"",
    ],
    ids=[
        "text",
        "nan",
        "inf",
        "minus-inf",
        "overflow",
        "duplicate",
        "utf8",
        "deep",
        "empty",
    ],
)
def test_schemas_non_strict_json_is_refused_as_not_json(payload: bytes) -> None:
    """Test anything but strict UTF-8 JSON is refused with reason not_json."""
    with pytest.raises(MessageError) as caught:
        schemas.decode(Kind.TELEMETRY, payload)

    assert caught.value.reason == "not_json"
    assert caught.value.kind == "telemetry"


@pytest.mark.parametrize(
    ("change", "field", "reason", "words"),
    [
        ({"accuracy": 1.5}, "accuracy", "schema", "<= 1"),
        ({"seq": None}, "seq", "schema", "integer"),
        ({"cloud": {"GPU": 1}}, "cloud.GPU", "schema", "names here"),
        ({"cloud": {"compute": -2}}, "cloud.compute", "schema", ">= 0"),
        ({"v": 2}, "v", "version", "must be 1"),
        ({"epoch": "7"}, "epoch", "schema", "or null"),
    ],
)
def test_schemas_error_names_field_reason_and_fix(
    change: dict[str, Any], field: str, reason: str, words: str
) -> None:
    """Test a schema error says which field is wrong and what would be accepted."""
    message = {
        **json.loads((EXAMPLES / "telemetry/valid/typical.json").read_text()),
        **change,
    }

    with pytest.raises(MessageError) as caught:
        schemas.decode(Kind.TELEMETRY, json.dumps(message).encode())

    assert (caught.value.field, caught.value.reason) == (field, reason)
    assert str(caught.value).startswith(f"telemetry: {field} ")
    assert words in str(caught.value)


def test_schemas_missing_field_is_named() -> None:
    """Test a missing required field is the error's field."""
    message = json.loads((EXAMPLES / "telemetry/valid/typical.json").read_text())
    del message["cloud"]

    with pytest.raises(MessageError) as caught:
        schemas.validate(Kind.TELEMETRY, message)

    assert caught.value.field == "cloud"
    assert str(caught.value) == "telemetry: cloud is required"


def test_schemas_error_carries_the_refused_seq() -> None:
    """Test a refused report's seq is kept so its rejection can name it."""
    message = {**json.loads((EXAMPLES / "telemetry/valid/typical.json").read_text())}
    message["accuracy"] = 3

    with pytest.raises(MessageError) as caught:
        schemas.validate(Kind.TELEMETRY, message)

    assert caught.value.seq == 42


@pytest.mark.parametrize("path", example_files("valid"), ids=example_id)
def test_schemas_encode_then_decode_gives_the_message_back(path: Path) -> None:
    """Test encode produces bytes that decode to the same message."""
    kind = path.parts[-3]
    message = json.loads(path.read_bytes())

    payload = schemas.encode(kind, message)

    assert schemas.decode(kind, payload) == message
    assert payload == json.dumps(message, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("value", "words"), [(float("nan"), "Out of range"), (object(), "not JSON")]
)
def test_schemas_encode_refuses_what_json_cannot_carry(value: Any, words: str) -> None:
    """Test encode refuses NaN and non-JSON values instead of sending them."""
    message = schemas.telemetry(
        seq=1, accuracy=0.5, local={}, cloud={}, epoch=None, ts=1.0
    )
    message["accuracy"] = value

    with pytest.raises(MessageError, match=words) as caught:
        schemas.encode(Kind.TELEMETRY, message)

    assert caught.value.reason == "not_json"


def test_schemas_encode_refuses_oversized_messages() -> None:
    """Test a sender cannot produce a payload receivers would refuse."""
    agents = {
        f"robot-{index:05d}": {"cloud": {"compute": 0.5}} for index in range(3000)
    }
    summary = {
        "v": 1,
        "epoch": 1,
        "alpha": 1,
        "budget": {},
        "prices": {},
        "agents": agents,
    }

    with pytest.raises(MessageError) as caught:
        schemas.encode(Kind.FLEET_SUMMARY, summary)

    assert caught.value.reason == "too_large"


def test_schemas_builders_produce_valid_messages() -> None:
    """Test every builder's output passes both validators and fills v and ts."""
    built = {
        Kind.TELEMETRY: schemas.telemetry(
            seq=3,
            accuracy=0.7,
            local={"compute": 1},
            cloud={},
            epoch=2,
            load=1.5,
            model="resnet18",
            dropped=4,
        ),
        Kind.AGENT_STATUS: schemas.agent_status(state="online", client="x/1"),
        Kind.ALLOCATION: schemas.allocation(
            epoch=2,
            cloud={"compute": 0.5},
            expected_accuracy=0.9,
            prices={"compute": 1},
            expires=1e9,
        ),
        Kind.BUDGET: schemas.budget(resources={"compute": 4}, alpha=float("inf")),
        Kind.FLEET_SUMMARY: schemas.fleet_summary(
            epoch=2,
            alpha=0.0,
            budget={"compute": 4},
            prices={"compute": 1},
            agents={"a": {"cloud": {"compute": 0.5}, "expected_accuracy": 0.9}},
        ),
        Kind.CONTROLLER_STATUS: schemas.controller_status(state="offline"),
        Kind.REJECTION: schemas.rejection(
            topic="fairsynergy/demo/budget", reason="schema", field="alpha"
        ),
    }

    for kind, message in built.items():
        assert reference(kind).is_valid(message), kind
        assert message["v"] == 1
    assert built[Kind.BUDGET]["alpha"] == "inf"
    assert "ts" in built[Kind.TELEMETRY]
    assert "load" not in schemas.telemetry(
        seq=1, accuracy=0.5, local={}, cloud={}, epoch=None
    )


def test_schemas_builder_refuses_bad_arguments_at_the_call() -> None:
    """Test a builder raises MessageError naming the bad argument."""
    with pytest.raises(MessageError) as caught:
        schemas.telemetry(seq=1, accuracy=2.0, local={}, cloud={}, epoch=None)

    assert caught.value.field == "accuracy"


def test_schemas_alpha_converts_between_number_and_wire() -> None:
    """Test max-min fairness travels as "inf" and comes back as math.inf."""
    assert schemas.alpha_to_wire(float("inf")) == "inf"
    assert schemas.alpha_to_wire(2.0) == 2.0
    assert schemas.alpha_from_wire("inf") == float("inf")
    assert schemas.alpha_from_wire(1) == 1.0


def test_schemas_rejection_from_error_carries_reason_field_and_seq() -> None:
    """Test a decode error becomes a valid rejection notice for its sender."""
    topic = "fairsynergy/demo/agents/robot-1/telemetry"
    payload = b'{"v":1,"seq":9,"ts":1,"accuracy":7,"local":{},"cloud":{},"epoch":null}'
    with pytest.raises(MessageError) as caught:
        schemas.decode(Kind.TELEMETRY, payload)

    notice = schemas.rejection_from_error(caught.value, topic=topic, ts=5.0)

    assert notice == {
        "v": 1,
        "ts": 5.0,
        "topic": topic,
        "reason": "schema",
        "field": "accuracy",
        "seq": 9,
        "message": str(caught.value),
    }


def test_schemas_kinds_say_how_they_travel() -> None:
    """Test QoS and retention per kind match the protocol table."""
    retained = {kind for kind in Kind if kind.retained}

    assert retained == set(Kind) - {Kind.TELEMETRY, Kind.REJECTION}
    assert {kind.qos for kind in Kind} == {1}


def test_schemas_package_needs_only_stdlib_and_fastjsonschema() -> None:
    """Test importing and using schemas pulls in no other third-party package."""
    code = (
        "import sys, schemas; schemas.compiled('telemetry'); "
        "print('\\n'.join(sorted(name.split('.')[0] for name in sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=SCHEMA_DIR.parent,
    )  # fmt: skip

    loaded = set(result.stdout.split())
    # __main__ is the -c script; _distutils_hack is setuptools' start-up hook.
    expected = {"schemas", "fastjsonschema", "__main__", "_distutils_hack"}
    third_party = loaded - set(sys.stdlib_module_names) - expected

    assert third_party == set()
