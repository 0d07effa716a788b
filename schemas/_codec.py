"""Load the schema files, and turn payloads into checked messages and back.

Every way in (:func:`decode`) and out (:func:`encode`) goes through the same
three gates, in order: size, strict JSON, schema. :func:`dump` is the way out
for messages a builder has already checked: it serialises and checks the size.

Two validators can run the schema gate, chosen once, at import:

- ``jsonschema_rs`` (Rust, draft 2020-12), when it is installed: the
  controller install brings it, since it checks a telemetry message about
  seven times faster;
- ``fastjsonschema`` otherwise: pure Python, the device install's validator.

They give the same verdict on every JSON value (the tests hold both, and the
reference jsonschema, to every example). Both refuse remote ``$ref`` and
ignore ``format``. Errors are always explained from fastjsonschema's report,
so a refusal reads the same whichever validator found it; explaining runs only
on refusal. Values JSON cannot carry (NaN, non-string keys) never reach the
validator from :func:`decode` or :func:`encode`; :func:`validate` called
directly with them may judge them differently by backend.

Strict JSON is checked cheaply on the common path: a plain parse, then one
walk that counts the keys and looks for infinities; only a payload that walk
cannot clear (a colon inside a string, say) is parsed again with the exact,
slower hooks, which also write every refusal's message.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections.abc import Callable
from importlib import resources
from typing import Any

import fastjsonschema

from schemas._errors import MessageError
from schemas._kinds import Kind

try:
    import jsonschema_rs
except ImportError:  # the device install: fastjsonschema alone
    BACKEND = "fastjsonschema"
else:
    BACKEND = "jsonschema_rs"

MAX_PAYLOAD_BYTES = 64 * 1024
"""Largest payload accepted, in bytes; bigger ones are refused before parsing."""

Message = dict[str, Any]
"""A decoded message: a JSON object as Python dict."""

SCHEMA_SUFFIX = ".schema.json"

BACKENDS = ("jsonschema_rs", "fastjsonschema")
"""The validators the schema gate can use. ``BACKEND`` names the one in use:
the first of them that imports."""

# How many characters of an offending value an error message quotes.
_QUOTE_CHARS = 40

_TYPE_PHRASES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "object": "an object",
    "array": "an array",
    "boolean": "true or false",
    "null": "null",
}


class _NotStrictJSONError(ValueError):
    """Raised by the parser hooks for JSON the protocol does not allow."""


def schema_names() -> list[str]:
    """Names of every schema shipped in the package, such as ``"telemetry"``.

    The list includes schemas that are not wire messages (the allocator's
    ``instance`` format, when present).
    """
    files = resources.files(__package__ or "schemas")
    return sorted(
        entry.name.removesuffix(SCHEMA_SUFFIX)
        for entry in files.iterdir()
        if entry.name.endswith(SCHEMA_SUFFIX)
    )


def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema document called ``name`` (a :class:`Kind` or file stem).

    Each call returns a fresh copy, which the caller may change.

    Raises:
        KeyError: there is no such schema; the message lists the known ones.
    """
    return copy.deepcopy(_document(name))


@functools.cache
def compiled(name: str) -> Callable[[Any], Any]:
    """The fastjsonschema validator of schema ``name``, compiled on first use.

    It raises ``JsonSchemaValueException`` at the first error it finds; every
    refusal is explained from that report, whichever :data:`BACKEND` judged.
    """
    # fastjsonschema annotates the document it compiles; give it a copy so the
    # shared document stays as the file says.
    return _fast_validator(copy.deepcopy(_document(name)))


def validate(kind: Kind | str, message: Any, *, backend: str | None = None) -> Message:
    """Check a decoded message against the schema of ``kind`` and return it.

    Only the schema is checked; use :func:`encode` to also check that it
    serialises to strict JSON within the size limit. ``backend`` names one of
    :data:`BACKENDS` to judge with instead of :data:`BACKEND`.

    Raises:
        MessageError: with reason ``schema`` (or ``version`` for a ``v`` the
            receiver does not speak).
        ValueError: ``backend`` is unknown or not installed.
    """
    kind = _kind(kind)
    judge = _judge(kind, backend or BACKEND)
    try:
        valid = judge(message)
    except (TypeError, ValueError, OverflowError):
        # jsonschema_rs cannot read the message as JSON (a key that is not a
        # string, say): that is a refusal too.
        valid = False
    if not valid:
        raise _refusal(kind, message)
    checked: Message = message
    return checked


def decode(
    kind: Kind | str, payload: bytes | bytearray, *, max_bytes: int = MAX_PAYLOAD_BYTES
) -> Message:
    """Turn an MQTT payload into a checked message of ``kind``.

    The size is checked before anything is parsed; the JSON must be strict
    UTF-8 without NaN, Infinity or duplicate keys; then the schema applies.

    Raises:
        MessageError: reason ``too_large``, ``not_json``, ``version`` or
            ``schema``, with the offending field when there is one.
    """
    kind = _kind(kind)
    if len(payload) > max_bytes:
        raise _too_large(kind, len(payload), max_bytes)

    message = _parse(kind, bytes(payload))
    return validate(kind, message)


def encode(
    kind: Kind | str, message: Message, *, max_bytes: int = MAX_PAYLOAD_BYTES
) -> bytes:
    """Serialise a message of ``kind`` to the exact bytes to publish.

    The bytes are checked as a receiver would check them, so anything this
    returns passes :func:`decode`.

    Raises:
        MessageError: as :func:`decode`; ``not_json`` also covers values that
            JSON cannot carry (NaN, infinity, objects of other types).
    """
    kind = _kind(kind)
    payload = dump(kind, message, max_bytes=max_bytes)

    if _string_keys(message):
        # The bytes decode to this very dict (see _string_keys), so checking
        # the dict gives their verdict without parsing them back.
        validate(kind, message)
    else:
        decode(kind, payload, max_bytes=max_bytes)
    return payload


def dump(
    kind: Kind | str, message: Message, *, max_bytes: int = MAX_PAYLOAD_BYTES
) -> bytes:
    """Serialise a message already checked against its schema; check the size.

    For what the builders (:func:`~schemas.allocation`, ...) return: they have
    checked it, so this skips the schema and gives the same bytes as
    :func:`encode`, compact JSON. A message from anywhere else goes through
    :func:`encode`.

    Raises:
        MessageError: ``not_json`` for values JSON cannot carry, ``too_large``
            for more than ``max_bytes`` bytes.
    """
    kind = _kind(kind)
    try:
        text = _ENCODER.encode(message)
    except (TypeError, ValueError) as error:
        raise MessageError(
            kind, "not_json", f"{kind}: message cannot be strict JSON: {error}"
        ) from None

    payload = text.encode("utf-8")
    if len(payload) > max_bytes:
        raise _too_large(kind, len(payload), max_bytes)
    return payload


@functools.cache
def _document(name: str) -> dict[str, Any]:
    """The schema document, read once and shared: never hand it out to change."""
    file = resources.files(__package__ or "schemas") / f"{name}{SCHEMA_SUFFIX}"
    if not file.is_file():
        known = ", ".join(schema_names())
        raise KeyError(f"no schema named {name!r}; known: {known}")
    document: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    return document


def _kind(kind: Kind | str) -> Kind:
    """``Kind(kind)``, without the enum machinery when ``kind`` is a known name."""
    known = _KINDS.get(kind) if isinstance(kind, str) else None
    return known if known is not None else Kind(kind)


@functools.cache
def _judge(kind: Kind, backend: str) -> Callable[[Any], bool]:
    """Whether a message of ``kind`` is valid, as ``backend`` sees it."""
    if backend == "fastjsonschema":
        return functools.partial(_passes, compiled(kind))
    if backend != "jsonschema_rs" or BACKEND != "jsonschema_rs":
        raise ValueError(
            f"validator {backend!r} is not available; use {BACKEND!r} "
            f"(known: {', '.join(BACKENDS)})"
        )
    return _rust_validator(_document(kind)).is_valid


def _fast_validator(document: dict[str, Any]) -> Callable[[Any], Any]:
    """fastjsonschema's code for ``document``: no remote $ref, no formats."""
    return fastjsonschema.compile(
        document,
        handlers={"http": _refuse_remote, "https": _refuse_remote},
        use_formats=False,
    )


def _rust_validator(document: dict[str, Any]) -> jsonschema_rs.Validator:
    """jsonschema_rs's validator for ``document``: no remote $ref, no formats."""
    return jsonschema_rs.Draft202012Validator(
        document, validate_formats=False, retriever=_refuse_remote
    )


def _passes(check: Callable[[Any], Any], message: Any) -> bool:
    try:
        check(message)
    except fastjsonschema.JsonSchemaValueException:
        return False
    return True


def _refusal(kind: Kind, message: Any) -> MessageError:
    """The error for a refused message, written from fastjsonschema's report."""
    try:
        compiled(kind)(message)
    except fastjsonschema.JsonSchemaValueException as error:
        return _explain(kind, error, message)
    # Only values JSON cannot carry get here (NaN, a key that is not a
    # string): jsonschema_rs refuses them where fastjsonschema looks past them.
    return MessageError(
        kind,
        "schema",
        f"{kind}: the message holds values JSON cannot carry "
        "(NaN, infinity, or a key that is not a string)",
        seq=_seq(message),
    )


def _too_large(kind: Kind, size: int, max_bytes: int) -> MessageError:
    return MessageError(
        kind,
        "too_large",
        f"{kind}: payload has {size} bytes; the limit is {max_bytes}",
    )


def _string_keys(node: Any) -> bool:
    """Whether every object key in ``node``, at any depth, is a string.

    For what :func:`dump` could serialise, that makes ``node`` the very value
    a receiver decodes from the bytes: floats print exactly, keys are unique,
    nothing is NaN or infinite. Tuples come back as lists and subclasses of
    str, int and float as those types, which no validator tells apart.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                return False
            if isinstance(value, _CONTAINERS) and not _string_keys(value):
                return False
    elif isinstance(node, _CONTAINERS):
        for value in node:
            if isinstance(value, _CONTAINERS) and not _string_keys(value):
                return False
    return True


def _parse(kind: Kind, payload: bytes) -> Any:
    """Parse strict JSON, converting every failure into a ``not_json`` error.

    A plain parse, cleared by :func:`_pairs`, covers nearly every payload;
    anything else (white space around the value included) is parsed again
    with the strict hooks, which decide.
    """
    try:
        text = payload.decode("utf-8")
        message, end = _PLAIN.raw_decode(text)
        if end == len(text) and _pairs(message) == text.count(":"):
            return message
    except (ValueError, RecursionError):  # the strict parse names the problem
        pass
    return _parse_strictly(kind, payload)


def _pairs(node: Any) -> int:
    """How many keys the objects in ``node`` hold; -1 if it holds an infinity.

    A payload has at least as many colons as key-value pairs, and at least as
    many pairs as its parsed objects have keys: equal counts prove that no key
    appeared twice. json.loads makes an infinity only out of a number too large
    for a float (NaN and Infinity are refused by name).
    """
    kind = type(node)
    if kind is float:
        return 0 if node - node == 0.0 else -1
    if kind is dict:
        count = len(node)
        values = node.values()
    elif kind is list:
        count = 0
        values = node
    else:
        return 0

    for value in values:
        kind = type(value)
        if kind is float:
            if value - value != 0.0:  # inf - inf is NaN
                return -1
        elif kind is dict or kind is list:
            inner = _pairs(value)
            if inner < 0:
                return -1
            count += inner
    return count


def _parse_strictly(kind: Kind, payload: bytes) -> Any:
    """Parse with hooks that refuse what strict JSON does not allow, one by one."""
    try:
        return _STRICT.decode(payload.decode("utf-8"))
    except UnicodeDecodeError as error:
        problem = f"is not UTF-8 ({error.reason} at byte {error.start})"
    except json.JSONDecodeError as error:
        problem = (
            f"is not JSON ({error.msg} at line {error.lineno} column {error.colno})"
        )
    except RecursionError:
        problem = "is nested too deeply"
    except ValueError as error:  # _NotStrictJSONError, or an integer too long to read
        problem = f"is not strict JSON ({error})"
    raise MessageError(kind, "not_json", f"{kind}: payload {problem}")


def _refuse_constant(name: str) -> Any:
    raise _NotStrictJSONError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _NotStrictJSONError(f"{text[:_QUOTE_CHARS]} is out of range")
    return number


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which of two equal keys wins, so neither does.
    result = dict(pairs)
    if len(result) < len(pairs):
        keys = [key for key, _ in pairs]
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise _NotStrictJSONError(f"key {duplicate!r} appears twice")
    return result


def _refuse_remote(uri: str) -> Any:
    raise ValueError(f"schemas refer only to themselves; refusing to fetch {uri}")


# Built once: json.loads and json.dumps with options build a new one per call.
_PLAIN = json.JSONDecoder(parse_constant=_refuse_constant)
_STRICT = json.JSONDecoder(
    parse_constant=_refuse_constant,
    parse_float=_finite_float,
    object_pairs_hook=_unique_keys,
)
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))

# Every Kind by its value; a Kind, being a str, finds itself.
_KINDS = {kind.value: kind for kind in Kind}

# What the JSON encoder writes as objects or arrays.
_CONTAINERS = (dict, list, tuple)


def _explain(
    kind: Kind, error: fastjsonschema.JsonSchemaValueException, message: Any
) -> MessageError:
    """Turn a fastjsonschema error into a MessageError naming field and fix."""
    field = (error.name or "data").removeprefix("data").removeprefix(".") or None
    rule, node, value = error.rule, error.definition, error.value
    root = _document(kind)

    if rule == "required":
        missing = next(name for name in error.rule_definition if name not in value)
        field = _join(field, missing)
        problem = "is required"
    elif rule == "additionalProperties":
        known = sorted(node.get("properties", {}))
        field = _join(field, sorted(set(value) - set(known))[0])
        problem = f"is not allowed here (allowed: {', '.join(known)})"
    elif rule == "propertyNames":
        names = _resolve(node["propertyNames"], root)
        bad = next(key for key in value if not _matches(names, key))
        field = _join(field, str(bad))
        problem = f"is not allowed: names here must be {_describe(names, root)}"
    elif rule in ("maxProperties", "minProperties"):
        bound = "at most" if rule == "maxProperties" else "at least"
        count = error.rule_definition
        problem = f"must have {bound} {count} entr{'y' if count == 1 else 'ies'}"
    elif rule in ("maxLength", "minLength"):
        bound = "at most" if rule == "maxLength" else "at least"
        count = error.rule_definition
        problem = f"must have {bound} {count} character{'' if count == 1 else 's'}"
    else:
        problem = f"must be {_describe(node, root)} (got {_quote(value)})"

    reason = "version" if field == "v" else "schema"
    where = field if field is not None else "the message"
    return MessageError(
        kind, reason, f"{kind}: {where} {problem}", field=field, seq=_seq(message)
    )


def _describe(node: dict[str, Any], root: dict[str, Any]) -> str:
    """A short phrase for what ``node`` accepts, such as 'a number >= 0'."""
    node = _resolve(node, root)
    if "const" in node:
        return json.dumps(node["const"])
    if "enum" in node:
        return "one of " + ", ".join(json.dumps(item) for item in node["enum"])
    if "anyOf" in node or "oneOf" in node:
        branches = node.get("anyOf") or node["oneOf"]
        return " or ".join(_describe(branch, root) for branch in branches)

    limits = [
        f"{phrase} {node[keyword]}"
        for keyword, phrase in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("pattern", "matching"),
        )
        if keyword in node
    ]
    noun = _TYPE_PHRASES.get(node.get("type", ""), "a value")
    return " ".join([noun, " and ".join(limits)]).strip()


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Follow local ``#/$defs/...`` references until a node without one."""
    while "$ref" in node:
        target = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _matches(node: dict[str, Any], key: object) -> bool:
    # Our propertyNames rules are all patterns, and names are strings.
    return isinstance(key, str) and re.search(node.get("pattern", ""), key) is not None


def _join(parent: str | None, name: str) -> str:
    return name if parent is None else f"{parent}.{name}"


def _quote(value: Any) -> str:
    text = json.dumps(value, default=repr)
    if len(text) > _QUOTE_CHARS:
        return text[: _QUOTE_CHARS - 3] + "..."
    return text


def _seq(message: Any) -> int | None:
    """The message's seq, if it has a readable one, for the rejection notice."""
    if not isinstance(message, dict):
        return None
    seq = message.get("seq")
    if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
        return seq
    return None
