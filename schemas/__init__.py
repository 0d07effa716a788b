"""The fairsynergy wire contract: topics, message schemas, and their checks.

Devices and the controller talk only through MQTT, and this package is the
whole of what they agree on. It needs nothing but the standard library and
fastjsonschema, so it fits the device install; where jsonschema_rs is
installed too (the controller install), it checks schemas with that, faster.

- Topics: :class:`Topics` builds every topic of a fleet or agent from ids it
  checks once; :func:`parse_topic` reads one back.
- Messages: one JSON Schema per :class:`Kind` ships next to this file;
  :func:`decode` and :func:`encode` check payloads in the order size, strict
  JSON, schema, raising :class:`MessageError`; :func:`dump` serialises a
  message a builder has checked already, checking only its size.
- Builders: :func:`telemetry`, :func:`allocation`, ... return checked dicts.

>>> from schemas import Kind, Topics, decode, encode, telemetry
>>> topics = Topics("demo", "robot-1")
>>> report = telemetry(seq=1, accuracy=0.8, local={"compute": 1.0},
...                    cloud={"compute": 0.5}, epoch=None, ts=1700000000.0)
>>> decode(Kind.TELEMETRY, encode(Kind.TELEMETRY, report)) == report
True
"""

from schemas._builders import (
    VERSION,
    agent_status,
    allocation,
    alpha_from_wire,
    alpha_to_wire,
    budget,
    controller_status,
    fleet_summary,
    rejection,
    rejection_from_error,
    telemetry,
)
from schemas._codec import (
    BACKEND,
    BACKENDS,
    MAX_PAYLOAD_BYTES,
    Message,
    compiled,
    decode,
    dump,
    encode,
    load_schema,
    schema_names,
    validate,
)
from schemas._errors import ContractError, MessageError, TopicError
from schemas._kinds import QOS, Kind
from schemas._topics import (
    ID_PATTERN,
    PREFIX,
    RESOURCE_PATTERN,
    TopicName,
    Topics,
    check_id,
    check_resource,
    parse_topic,
    rejection_topic,
)

__all__ = [
    "BACKEND",
    "BACKENDS",
    "ID_PATTERN",
    "MAX_PAYLOAD_BYTES",
    "PREFIX",
    "QOS",
    "RESOURCE_PATTERN",
    "VERSION",
    "ContractError",
    "Kind",
    "Message",
    "MessageError",
    "TopicError",
    "TopicName",
    "Topics",
    "agent_status",
    "allocation",
    "alpha_from_wire",
    "alpha_to_wire",
    "budget",
    "check_id",
    "check_resource",
    "compiled",
    "controller_status",
    "decode",
    "dump",
    "encode",
    "fleet_summary",
    "load_schema",
    "parse_topic",
    "rejection",
    "rejection_from_error",
    "rejection_topic",
    "schema_names",
    "telemetry",
    "validate",
]
