"""docs/protocol.md cannot drift: every topic, schema and command is there, and
its examples are checked against the schemas and run against a real broker."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

import schemas
from schemas import Kind, MessageError
from tests.mosquitto import MosquittoBroker

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
TEXT = DOC.read_text(encoding="utf-8")
BLOCKS = re.compile(
    r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```", re.MULTILINE | re.DOTALL
)

# The protocol's topics, exactly as the table writes them.
TOPICS = [
    "fairsynergy/<fleet>/agents/<agent>/telemetry",
    "fairsynergy/<fleet>/agents/<agent>/status",
    "fairsynergy/<fleet>/agents/<agent>/allocation",
    "fairsynergy/<fleet>/budget",
    "fairsynergy/<fleet>/allocations",
    "fairsynergy/<fleet>/controller/status",
    "fairsynergy/<fleet>/rejected/<refused topic>",
]
PLACES = {"FLEET": "demo", "AGENT": "robot-1"}


def blocks(info: str) -> list[str]:
    """Bodies of the fenced blocks whose info string is ``info``."""
    return [m["body"] for m in BLOCKS.finditer(TEXT) if m["info"].strip() == info]


def commands(block: str) -> list[list[str]]:
    """The shell words of each command in a block (continuations joined)."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


def option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def expand(topic: str) -> str:
    return re.sub(r"\$(\w+)", lambda m: PLACES[m[1]], topic)


def test_protocol_docs_list_every_topic() -> None:
    """Test each topic of the protocol appears, and the list covers every kind."""
    covered = set()
    for topic in TOPICS[:-1]:
        concrete = topic.replace("<fleet>", "demo").replace("<agent>", "robot-1")
        covered.add(schemas.parse_topic(concrete).kind)
    covered.add(Kind.REJECTION)

    missing = [topic for topic in TOPICS if f"`{topic}`" not in TEXT]

    assert missing == []
    assert covered == set(Kind)


@pytest.mark.parametrize("kind", list(Kind))
def test_protocol_docs_describe_every_schema(kind: Kind) -> None:
    """Test each message schema is named and has a checked JSON example."""
    assert f"`{kind.schema_file}`" in TEXT
    assert blocks(f"json {kind.value}"), f"no ```json {kind.value} example"


JSON_EXAMPLES = [(kind, body) for kind in Kind for body in blocks(f"json {kind.value}")]


@pytest.mark.parametrize(
    ("kind", "example"),
    JSON_EXAMPLES,
    ids=[f"{kind.value}-{index}" for index, (kind, _) in enumerate(JSON_EXAMPLES)],
)
def test_protocol_docs_json_examples_are_valid(kind: Kind, example: str) -> None:
    """Test every JSON example passes the schema of the message it illustrates."""
    schemas.decode(kind, example.encode())


def test_protocol_docs_shell_examples_send_valid_payloads() -> None:
    """Test every payload the tested shell examples publish passes its schema."""
    checked = 0
    for block in blocks("sh tested"):
        for words in commands(block):
            pairs = [("-t", "-m"), ("--will-topic", "--will-payload")]
            for topic_flag, payload_flag in pairs:
                topic, payload = option(words, topic_flag), option(words, payload_flag)
                if words[0] != "mosquitto_pub" and topic_flag == "-t":
                    continue
                if topic is None or payload is None:
                    continue
                kind = schemas.parse_topic(expand(topic)).kind
                schemas.decode(kind, payload.encode())
                checked += 1

    assert checked >= 6


def test_protocol_docs_shell_examples_run_against_a_broker(
    broker: MosquittoBroker,
) -> None:
    """Test the tested shell examples succeed, in order, against a real Mosquitto."""
    env = {
        **os.environ,
        "BROKER_HOST": broker.host,
        "BROKER_PORT": str(broker.port),
        **PLACES,
    }
    examples = blocks("sh tested")

    for example in examples:
        result = subprocess.run(
            ["bash", "-euc", example],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, f"{example}\n{result.stderr}"
    assert len(examples) >= 7


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"x" * (schemas.MAX_PAYLOAD_BYTES + 1), "too_large"),
        (b"{nope", "not_json"),
        (b'{"v": 2, "state": "online", "ts": 1}', "version"),
        (b'{"v": 1, "state": "asleep", "ts": 1}', "schema"),
    ],
)
def test_protocol_docs_explain_every_decoder_reason(
    payload: bytes, reason: str
) -> None:
    """Test each reason code the decoder produces has a row in the reasons table."""
    with pytest.raises(MessageError) as caught:
        schemas.decode(Kind.AGENT_STATUS, payload)

    assert caught.value.reason == reason
    assert f"| `{reason}` |" in TEXT


@pytest.mark.parametrize("command", ["report", "watch", "pipe"])
def test_protocol_docs_show_every_edge_command(command: str) -> None:
    """Test each fairsynergy-edge subcommand is shown and explained."""
    assert f"fairsynergy-edge {command}" in TEXT
    assert f"`{command}`" in TEXT


def test_protocol_docs_state_the_size_limit_and_throughput() -> None:
    """Test the size limit stated matches the code, and a measurement is given."""
    assert f"{schemas.MAX_PAYLOAD_BYTES:,} bytes" in TEXT
    assert "bench/bench_schemas.py" in TEXT
