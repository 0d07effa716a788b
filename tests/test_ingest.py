"""Ingest turns raw messages into events and refuses bad ones with a reason."""

from __future__ import annotations

import json

import pytest

from controller.ingest import (
    CONFIRMATIONS,
    TOPIC_CACHE_SIZE,
    AgentStatus,
    Budget,
    Ignored,
    Ingest,
    Rejected,
    Telemetry,
    parsed_topic,
)

FLEET = "test"
TOPIC = "fairsynergy/test/agents/robot-1/telemetry"


def GRANT(agent: str) -> dict[str, float]:  # noqa: N802 - used like a constant
    """Every agent holds one unit of compute."""
    return {"compute": 1.0}


def make_ingest(rate_limit: float = 100.0, burst: float = 100.0) -> Ingest:
    return Ingest(
        FLEET, max_payload_bytes=65536, rate_limit=rate_limit, rate_burst=burst
    )


def report(seq: int, accuracy: float = 0.8, **extra: object) -> bytes:
    message = {
        "v": 1,
        "seq": seq,
        "ts": 1700000000.0 + seq,
        "accuracy": accuracy,
        "local": {"compute": 1.0},
        "cloud": {"compute": 0.5},
        "epoch": None,
        **extra,
    }
    return json.dumps(message).encode()


def test_ingest_accepts_valid_telemetry_as_event():
    """A valid report becomes a Telemetry event with its fields."""
    event = make_ingest().handle(TOPIC, report(1, model="resnet"), 0.0, GRANT)

    assert isinstance(event, Telemetry)
    assert (event.agent, event.seq, event.accuracy, event.model) == (
        "robot-1",
        1,
        0.8,
        "resnet",
    )


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not_json"),
        (b'{"v": 1, "seq": 1, "ts": 1, "accuracy": NaN}', "not_json"),
        (report(1, accuracy=1.5), "schema"),
        (b"x" * 70000, "too_large"),
    ],
)
def test_ingest_rejects_bad_payload_with_reason(payload, reason):
    """Malformed, invalid and oversized payloads are refused, never raised."""
    event = make_ingest().handle(TOPIC, payload, 0.0, GRANT)

    assert isinstance(event, Rejected)
    assert (event.reason, event.agent, event.notify) == (reason, "robot-1", True)


def test_ingest_rejects_foreign_topics_silently():
    """Topics outside the protocol or of another fleet are refused, not answered."""
    ingest = make_ingest()

    unknown = ingest.handle("elsewhere/x", b"{}", 0.0, GRANT)
    other = ingest.handle("fairsynergy/other/budget", b"{}", 0.0, GRANT)

    assert isinstance(unknown, Rejected)
    assert isinstance(other, Rejected)
    assert (unknown.reason, unknown.notify) == ("topic", False)
    assert (other.reason, other.notify) == ("fleet", False)


def test_ingest_drops_duplicate_and_out_of_order_reports():
    """A seq at or below the last accepted one is a duplicate, without notice."""
    ingest = make_ingest()
    ingest.handle(TOPIC, report(5), 0.0, GRANT)

    again = ingest.handle(TOPIC, report(5), 0.1, GRANT)
    older = ingest.handle(TOPIC, report(3), 0.2, GRANT)
    newer = ingest.handle(TOPIC, report(6), 0.3, GRANT)

    assert [getattr(e, "reason", None) for e in (again, older)] == ["duplicate"] * 2
    assert isinstance(newer, Telemetry)


def test_ingest_rate_limit_drops_excess_per_agent():
    """A chatty agent is limited; another agent is not affected."""
    ingest = make_ingest(rate_limit=1.0, burst=3.0)
    other = "fairsynergy/test/agents/robot-2/telemetry"

    chatty = [ingest.handle(TOPIC, report(i), 0.0, GRANT) for i in range(1, 6)]
    quiet = ingest.handle(other, report(1), 0.0, GRANT)
    later = ingest.handle(TOPIC, report(6), 1.0, GRANT)

    reasons = [getattr(e, "reason", "ok") for e in chatty]
    assert reasons == ["ok", "ok", "ok", "rate_limited", "rate_limited"]
    assert isinstance(quiet, Telemetry)
    assert isinstance(later, Telemetry)


def test_ingest_refuses_cloud_use_above_grant():
    """A report of more cloud than granted is refused, naming the resource."""
    event = make_ingest().handle(TOPIC, report(1), 0.0, lambda agent: {"compute": 0.2})

    assert isinstance(event, Rejected)
    assert (event.reason, event.field) == ("cloud_above_grant", "cloud.compute")


def test_ingest_accuracy_jump_needs_confirmation():
    """An isolated accuracy jump is refused; a sustained new level is accepted."""
    ingest = make_ingest()
    ingest.handle(TOPIC, report(1, accuracy=0.9), 0.0, GRANT)

    events = [
        ingest.handle(TOPIC, report(seq, accuracy=0.2), 0.0, GRANT)
        for seq in range(2, 2 + CONFIRMATIONS)
    ]

    reasons = [getattr(e, "reason", "ok") for e in events]
    assert reasons == ["implausible"] * (CONFIRMATIONS - 1) + ["ok"]
    assert events[0].field == "accuracy"  # type: ignore[union-attr]


def test_ingest_accuracy_jump_with_a_new_grant_is_accepted():
    """A large accuracy change that comes with other cloud amounts is believed."""
    ingest = make_ingest()
    ingest.handle(TOPIC, report(1, accuracy=0.2, cloud={"compute": 0.0}), 0.0, GRANT)

    event = ingest.handle(
        TOPIC, report(2, accuracy=0.9, cloud={"compute": 0.5}), 0.0, GRANT
    )

    assert not isinstance(event, Rejected)


def test_ingest_accuracy_jump_with_new_model_is_accepted():
    """A new model label announces a real change: the jump is not suspect."""
    ingest = make_ingest()
    ingest.handle(TOPIC, report(1, accuracy=0.9, model="a"), 0.0, GRANT)

    event = ingest.handle(TOPIC, report(2, accuracy=0.2, model="b"), 0.0, GRANT)

    assert isinstance(event, Telemetry)


def test_ingest_refuses_impossible_change_of_local_amounts():
    """On-board amounts that change a hundredfold between reports are suspect."""
    ingest = make_ingest()
    ingest.handle(TOPIC, report(1), 0.0, GRANT)

    event = ingest.handle(TOPIC, report(2, local={"compute": 100.0}), 0.0, GRANT)

    assert isinstance(event, Rejected)
    assert (event.reason, event.field) == ("implausible", "local.compute")


def test_ingest_reads_status_and_budget_and_ignores_own_output():
    """Status and budget become events; the controller's own topics are ignored."""
    ingest = make_ingest()
    status = json.dumps({"v": 1, "state": "offline", "ts": 5.0}).encode()
    budget = json.dumps({"v": 1, "resources": {"compute": 4}, "alpha": "inf"}).encode()

    events = [
        ingest.handle("fairsynergy/test/agents/a/status", status, 0.0, GRANT),
        ingest.handle("fairsynergy/test/budget", budget, 0.0, GRANT),
        ingest.handle("fairsynergy/test/allocations", b"{}", 0.0, GRANT),
    ]

    assert events[0] == AgentStatus("a", "offline", 5.0, None)
    assert events[1] == Budget({"compute": 4}, float("inf"))
    assert isinstance(events[2], Ignored)


def test_ingest_remembers_topics_within_a_bound():
    """Parsed topics are reused, the cache stays bounded, bad topics stay bad."""
    ingest = make_ingest()
    topics = [f"fairsynergy/test/agents/robot-{n}/telemetry" for n in range(3)]
    parsed_topic.cache_clear()

    events = [ingest.handle(topic, report(1), 0.0, GRANT) for topic in topics]
    again = ingest.handle(topics[0], report(2), 0.0, GRANT)
    bad = [ingest.handle("fairsynergy/test/nowhere", b"{}", 0.0, GRANT) for _ in "ab"]
    cache = parsed_topic.cache_info()

    agents = [event.agent for event in events]  # type: ignore[union-attr]
    assert agents == ["robot-0", "robot-1", "robot-2"]
    assert isinstance(again, Telemetry)
    assert again.agent == "robot-0"
    assert (cache.hits, cache.currsize, cache.maxsize) == (1, 3, TOPIC_CACHE_SIZE)
    reasons = [event.reason for event in bad]  # type: ignore[union-attr]
    assert reasons == ["topic", "topic"]


def test_ingest_unchanged_local_amounts_are_plausible():
    """Reports with the same on-board amounts pass; a later jump is still caught."""
    ingest = make_ingest()
    ingest.handle(TOPIC, report(1, local={"compute": 1.0, "data": 2.0}), 0.0, GRANT)

    same = ingest.handle(
        TOPIC, report(2, local={"compute": 1.0, "data": 2.0}), 0, GRANT
    )
    jump = ingest.handle(
        TOPIC, report(3, local={"compute": 1.0, "data": 50.0}), 0, GRANT
    )

    assert isinstance(same, Telemetry)
    assert isinstance(jump, Rejected)
    assert (jump.reason, jump.field) == ("implausible", "local.data")
