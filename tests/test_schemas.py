"""The wire contract: schema files, examples, and the decode/encode gates."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import schemas
from schemas import MAX_PAYLOAD_BYTES, Kind, MessageError, _codec

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


# Every validator `schemas` can use; the tests hold each one to the reference.
BACKENDS = [
    pytest.param(
        "jsonschema_rs",
        marks=pytest.mark.skipif(
            schemas.BACKEND != "jsonschema_rs", reason="jsonschema_rs not installed"
        ),
    ),
    "fastjsonschema",
]


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", example_files("valid"), ids=example_id)
def test_schemas_valid_example_passes_every_validator(path: Path, backend: str) -> None:
    """Test a valid example is accepted by each backend and by jsonschema."""
    kind = path.parts[-3]
    payload = path.read_bytes()

    message = schemas.decode(kind, payload)
    checked = schemas.validate(kind, json.loads(payload), backend=backend)

    assert checked == message
    assert list(reference(kind).iter_errors(message)) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", example_files("invalid"), ids=example_id)
def test_schemas_invalid_example_fails_every_validator_once(
    path: Path, backend: str
) -> None:
    """Test an invalid example is refused by each backend and jsonschema, alike."""
    kind = path.parts[-3]
    payload = path.read_bytes()

    with pytest.raises(MessageError) as decoded:
        schemas.decode(kind, payload)
    with pytest.raises(MessageError) as validated:
        schemas.validate(kind, json.loads(payload), backend=backend)
    errors = list(reference(kind).iter_errors(json.loads(payload)))

    assert decoded.value.reason in {"schema", "version"}
    assert str(validated.value) == str(decoded.value)
    assert validated.value.field == decoded.value.field
    assert len(errors) == 1, [error.message for error in errors]


@pytest.mark.parametrize("backend", BACKENDS)
def test_schemas_validators_agree_on_mutated_messages(backend: str) -> None:
    """Test each backend agrees with jsonschema on random edits of valid examples."""
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
        if accepts(kind, mutated, backend) != reference(kind).is_valid(mutated):
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


def accepts(kind: str, message: Any, backend: str | None = None) -> bool:
    try:
        schemas.validate(kind, message, backend=backend)
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
        # Off the common path: strictness holds wherever the problem hides.
        b'{"v": 1, "accuracy": 1e400}',
        b'{"v": 1, "accuracy": -1E+0400}',
        b'{"v": 1, "accuracy": 1' + b"0" * 310 + b".5}",
        b'{"v": 1, "extra": {"deep": [1, 2, 1e999]}}',
        b'{"v": 1, "local": {"compute": 1, "compute": 2}}',
        b'{"v": 1, "extra": [{"a": 1, "a": 1}]}',
        b'{"v": 1, "model": "a:b", "v": 1}',
        b'{"v": 1} {"v": 1}',
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
        "overflow-large-exponent",
        "minus-overflow-long-exponent",
        "overflow-without-exponent",
        "overflow-nested",
        "duplicate-nested",
        "duplicate-in-array",
        "duplicate-beside-colon-in-string",
        "two-values",
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


def imports_of_schemas(block_rust: bool) -> tuple[str, set[str]]:
    """The backend ``schemas`` picks in a fresh interpreter, and what it imports.

    With ``block_rust``, jsonschema_rs cannot be imported, as on a device.
    """
    block = "sys.modules['jsonschema_rs'] = None; " if block_rust else ""
    code = (
        f"import sys; {block}import schemas; schemas.decode('telemetry', "
        "open('schemas/examples/telemetry/valid/typical.json', 'rb').read()); "
        "print(schemas.BACKEND); "
        "print('\\n'.join(sorted(name.split('.')[0] "
        "for name, module in sys.modules.items() if module is not None)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=SCHEMA_DIR.parent,
    )  # fmt: skip
    backend, *modules = result.stdout.split()
    return backend, set(modules)


def test_schemas_package_needs_only_stdlib_and_fastjsonschema() -> None:
    """Test that without jsonschema_rs, schemas works on fastjsonschema alone."""
    backend, loaded = imports_of_schemas(block_rust=True)

    # __main__ is the -c script; _distutils_hack is setuptools' start-up hook.
    expected = {"schemas", "fastjsonschema", "__main__", "_distutils_hack"}
    third_party = loaded - set(sys.stdlib_module_names) - expected

    assert backend == "fastjsonschema"
    assert third_party == set()


def test_schemas_controller_install_validates_with_jsonschema_rs() -> None:
    """Test the controller install brings jsonschema-rs and schemas picks it."""
    project = tomllib.loads((SCHEMA_DIR.parent / "pyproject.toml").read_text())
    controller = project["project"]["optional-dependencies"]["controller"]

    backend, loaded = imports_of_schemas(block_rust=False)

    assert any(need.startswith("jsonschema-rs") for need in controller)
    assert backend == schemas.BACKEND == "jsonschema_rs"
    assert "jsonschema_rs" in loaded


def test_schemas_unknown_backend_is_refused() -> None:
    """Test asking for a validator that does not exist names the usable one."""
    message = json.loads((EXAMPLES / "telemetry/valid/typical.json").read_text())

    with pytest.raises(ValueError, match="is not available"):
        schemas.validate(Kind.TELEMETRY, message, backend="jsonschema")


def build_validator(backend: str, document: dict[str, Any]) -> Any:
    """A validator for ``document`` set up as ``schemas`` sets up ``backend``."""
    if backend == "jsonschema_rs":
        return _codec._rust_validator(document).is_valid
    check = _codec._fast_validator(document)
    return lambda message: _codec._passes(check, message)


@pytest.mark.parametrize("backend", BACKENDS)
def test_schemas_validators_refuse_remote_references(backend: str) -> None:
    """Test neither validator fetches a $ref from the network."""
    document = {"properties": {"a": {"$ref": "https://example.invalid/a.json"}}}

    with pytest.raises(Exception, match=r"refusing to fetch https://example\.invalid"):
        build_validator(backend, document)


@pytest.mark.parametrize("backend", BACKENDS)
def test_schemas_validators_ignore_formats(backend: str) -> None:
    """Test both validators leave "format" unchecked, as the protocol says."""
    document = {"type": "string", "format": "email"}

    is_valid = build_validator(backend, document)

    assert is_valid("not an email")
    assert not is_valid(7)


# -- strict JSON, cheaply ------------------------------------------------------

TYPICAL = (EXAMPLES / "telemetry/valid/typical.json").read_bytes().strip()


@pytest.mark.parametrize(
    "payload",
    [
        TYPICAL,
        b"  " + TYPICAL + b"\n",
        TYPICAL[:-1] + b', "note": "a: b, c: d"}',
        TYPICAL[:-1] + b', "tiny": 1e-400, "long": 1e0005}',
        TYPICAL[:-1] + b', "big": 1.7976931348623157e308}',
    ],
    ids=["typical", "white-space", "colons-in-string", "exponents", "largest-float"],
)
def test_schemas_strict_json_that_is_fine_is_accepted(payload: bytes) -> None:
    """Test the cheap path's doubts end in the strict parse, which accepts."""
    message = schemas.decode(Kind.TELEMETRY, payload)

    assert message["seq"] == 42


def test_schemas_cheap_parse_gives_the_strict_parse_verdict() -> None:
    """Test the cheap parse returns or refuses exactly what the strict one does."""
    rng = random.Random(11)
    pieces = [
        '"a"', '"b"', '"a:b"', '"\\\\u0061"', "1", "-0.5", "1e308", "1e309",
        "1E-999", "2" * 320, "2" * 320 + ".0", "true", "null", "NaN", "[]", "{}",
    ]  # fmt: skip

    def value(depth: int) -> str:
        if depth > 2 or rng.random() < 0.5:
            return rng.choice(pieces)
        if rng.random() < 0.3:
            return (
                "[" + ",".join(value(depth + 1) for _ in range(rng.randint(0, 3))) + "]"
            )
        keys = [
            rng.choice(['"a"', '"b"', '"a:b"', '"c"']) for _ in range(rng.randint(0, 3))
        ]
        return "{" + ",".join(f"{key}:{value(depth + 1)}" for key in keys) + "}"

    differences = []
    for _ in range(2000):
        payload = value(0).encode()
        if outcome(_codec._parse, payload) != outcome(_codec._parse_strictly, payload):
            differences.append(payload)

    assert differences == []


def outcome(parse: Any, payload: bytes) -> tuple[str, Any]:
    """What ``parse`` makes of ``payload``: ("ok", value) or ("error", message)."""
    try:
        return "ok", parse(Kind.TELEMETRY, payload)
    except MessageError as error:
        return "error", str(error)


# -- dump, and what builders promise -------------------------------------------


@pytest.mark.parametrize("path", example_files("valid"), ids=example_id)
def test_schemas_dump_gives_the_bytes_of_encode(path: Path) -> None:
    """Test dump serialises exactly as encode does."""
    kind = path.parts[-3]
    message = json.loads(path.read_bytes())

    assert schemas.dump(kind, message) == schemas.encode(kind, message)


def test_schemas_dump_checks_only_the_size() -> None:
    """Test dump trusts the schema check already done, but not the size."""
    checked = schemas.allocation(epoch=3, cloud={"compute": 0.5}, ts=1.0)
    unchecked = {**checked, "epoch": -1}

    payload = schemas.dump(Kind.ALLOCATION, unchecked)
    with pytest.raises(MessageError) as large:
        schemas.dump(Kind.ALLOCATION, checked, max_bytes=20)
    with pytest.raises(MessageError) as nan:
        schemas.dump(Kind.ALLOCATION, {**checked, "expires": math.nan})

    assert json.loads(payload)["epoch"] == -1
    assert (large.value.reason, nan.value.reason) == ("too_large", "not_json")
    assert "limit is 20" in str(large.value)


def test_schemas_builder_output_always_decodes() -> None:
    """Test what builders return, dumped, is what decode accepts and returns."""
    rng = random.Random(3)
    built = []
    for seq in range(200):
        amounts = {
            name: rng.uniform(0, 10)
            for name in ["compute", "data", "gpu"][: rng.randint(0, 3)]
        }
        built.append((Kind.TELEMETRY, schemas.telemetry(
            seq=seq, accuracy=rng.random(), local=amounts, cloud=amounts,
            epoch=rng.choice([None, seq]), load=rng.choice([None, 2.5]),
            model=rng.choice([None, "resnet18"]), ts=rng.uniform(0, 2e9),
        )))  # fmt: skip
        built.append((Kind.ALLOCATION, schemas.allocation(
            epoch=seq, cloud=amounts, expected_accuracy=rng.random(),
            prices=amounts, expires=1e9, ts=1.0,
        )))  # fmt: skip

    for kind, message in built:
        assert schemas.decode(kind, schemas.dump(kind, message)) == message


def test_schemas_builder_keys_that_are_not_strings_take_the_full_check() -> None:
    """Test a key JSON would rename is judged on the bytes, as receivers see it."""
    clash: dict[Any, Any] = {"cloud": {"compute": 1.0}, 1: "x", "1": "y"}
    renamed: dict[Any, Any] = {"cloud": {}, 2: 0}

    with pytest.raises(MessageError) as caught:
        schemas.fleet_summary(
            epoch=1, alpha=1.0, budget={}, prices={}, agents={"a": clash}, ts=1.0
        )
    summary = schemas.fleet_summary(
        epoch=1, alpha=1.0, budget={}, prices={}, agents={"a": renamed}
    )

    assert caught.value.reason == "not_json"
    assert "appears twice" in str(caught.value)
    assert schemas.decode(Kind.FLEET_SUMMARY, schemas.dump(Kind.FLEET_SUMMARY, summary))


def test_schemas_encode_of_a_dict_judges_as_its_bytes_would() -> None:
    """Test encode, which checks the dict, agrees with decoding its bytes."""
    rng = random.Random(5)
    valid = [
        (path.parts[-3], json.loads(path.read_bytes()))
        for path in example_files("valid")
    ]
    odd_values: list[Any] = [
        None,
        True,
        -1,
        0.5,
        2**60,
        "",
        "x",
        [],
        {},
        (1, 2),
        {"Bad": 1},
    ]
    disagreements = []

    for _ in range(400):
        kind, message = rng.choice(valid)
        mutated = mutate(json.loads(json.dumps(message)), rng, odd_values)
        bytes_ok = accepts_payload(kind, json.dumps(mutated, separators=(",", ":")))
        if encodes(kind, mutated) != bytes_ok:
            disagreements.append((kind, mutated))

    assert disagreements == []


def encodes(kind: str, message: Any) -> bool:
    try:
        schemas.encode(kind, message)
    except MessageError:
        return False
    return True


def accepts_payload(kind: str, text: str) -> bool:
    try:
        schemas.decode(kind, text.encode())
    except MessageError:
        return False
    return True


@pytest.mark.parametrize("backend", BACKENDS)
def test_schemas_key_that_is_not_a_string_is_named(backend: str) -> None:
    """Test a resource key that is not a string is refused, naming it."""
    message = json.loads(TYPICAL)
    message["local"] = {None: 1.0}

    with pytest.raises(MessageError) as caught:
        schemas.validate(Kind.TELEMETRY, message, backend=backend)

    assert (caught.value.reason, caught.value.field) == ("schema", "local.None")
    assert caught.value.seq == 42


@pytest.mark.skipif(schemas.BACKEND != "jsonschema_rs", reason="needs jsonschema_rs")
def test_schemas_infinity_handed_to_validate_gets_a_readable_error() -> None:
    """Test a value only jsonschema_rs refuses (JSON has no infinity) is explained."""
    message = {**json.loads(TYPICAL), "ts": math.inf}

    with pytest.raises(MessageError) as caught:
        schemas.validate(Kind.TELEMETRY, message, backend="jsonschema_rs")

    assert caught.value.reason == "schema"
    assert "values JSON cannot carry" in str(caught.value)
