"""Load the schema files, and turn payloads into checked messages and back.

Each schema is compiled to Python code once, by fastjsonschema, the first time
its kind is used. Every way in (:func:`decode`) and out (:func:`encode`) goes
through the same three gates, in order: size, strict JSON, schema.
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

MAX_PAYLOAD_BYTES = 64 * 1024
"""Largest payload accepted, in bytes; bigger ones are refused before parsing."""

Message = dict[str, Any]
"""A decoded message: a JSON object as Python dict."""

SCHEMA_SUFFIX = ".schema.json"

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
    """The fastjsonschema validator of schema ``name``, compiled on first use."""
    # fastjsonschema annotates the document it compiles; give it a copy so the
    # shared document stays as the file says.
    return fastjsonschema.compile(
        copy.deepcopy(_document(name)),
        handlers={"http": _refuse_remote, "https": _refuse_remote},
        use_formats=False,
    )


def validate(kind: Kind | str, message: Any) -> Message:
    """Check a decoded message against the schema of ``kind`` and return it.

    Only the schema is checked; use :func:`encode` to also check that it
    serialises to strict JSON within the size limit.

    Raises:
        MessageError: with reason ``schema`` (or ``version`` for a ``v`` the
            receiver does not speak).
    """
    kind = Kind(kind)
    try:
        compiled(kind)(message)
    except fastjsonschema.JsonSchemaValueException as error:
        raise _explain(kind, error, message) from None
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
    kind = Kind(kind)
    if len(payload) > max_bytes:
        raise MessageError(
            kind,
            "too_large",
            f"{kind}: payload has {len(payload)} bytes; the limit is {max_bytes}",
        )

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
    kind = Kind(kind)
    try:
        text = json.dumps(message, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        raise MessageError(
            kind, "not_json", f"{kind}: message cannot be strict JSON: {error}"
        ) from None

    payload = text.encode("utf-8")
    decode(kind, payload, max_bytes=max_bytes)
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


def _parse(kind: Kind, payload: bytes) -> Any:
    """Parse strict JSON, converting every failure into a ``not_json`` error."""
    try:
        return json.loads(
            payload.decode("utf-8"),
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
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
        field = _join(field, bad)
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


def _matches(node: dict[str, Any], key: str) -> bool:
    # Our propertyNames rules are all patterns.
    return re.search(node.get("pattern", ""), key) is not None


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
