"""Topic names: ids checked once, every topic formatted and parsed back exactly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    ID_PATTERN,
    Kind,
    TopicError,
    TopicName,
    Topics,
    check_resource,
    parse_topic,
    rejection_topic,
)

ids = st.from_regex(f"\\A{ID_PATTERN}\\Z", fullmatch=True)
AGENT_KINDS = [Kind.TELEMETRY, Kind.AGENT_STATUS, Kind.ALLOCATION]
FLEET_KINDS = [Kind.BUDGET, Kind.FLEET_SUMMARY, Kind.CONTROLLER_STATUS]


def test_topics_gives_every_topic_of_the_protocol() -> None:
    """Test the topic strings are exactly those of the protocol table."""
    topics = Topics("demo", "robot-1")

    assert topics.telemetry == "fairsynergy/demo/agents/robot-1/telemetry"
    assert topics.status == "fairsynergy/demo/agents/robot-1/status"
    assert topics.allocation == "fairsynergy/demo/agents/robot-1/allocation"
    assert topics.budget == "fairsynergy/demo/budget"
    assert topics.allocations == "fairsynergy/demo/allocations"
    assert topics.controller_status == "fairsynergy/demo/controller/status"
    assert topics.rejected == "fairsynergy/demo/rejected/agents/robot-1/#"


def test_topics_fleet_filters_cover_every_agent() -> None:
    """Test the controller's subscription filters for the whole fleet."""
    topics = Topics("demo")

    assert topics.any_agent(Kind.TELEMETRY) == "fairsynergy/demo/agents/+/telemetry"
    assert topics.any_agent(Kind.AGENT_STATUS) == "fairsynergy/demo/agents/+/status"
    assert topics.rejected == "fairsynergy/demo/rejected/#"
    assert topics.for_agent("a").agent == "a"


@pytest.mark.parametrize(
    "bad", ["", "a/b", "+", "#", "x" * 65, "caf\u00e9", "a b", "robot$1"]
)
def test_topics_refuses_invalid_ids(bad: str) -> None:
    """Test fleet and agent ids outside [A-Za-z0-9_.-]{1,64} are refused at once."""
    with pytest.raises(TopicError, match="1 to 64"):
        Topics(bad)
    with pytest.raises(TopicError, match="agent id"):
        Topics("demo", bad)


def test_topics_are_frozen_values() -> None:
    """Test a Topics value cannot be changed after its ids were checked."""
    topics = Topics("demo", "robot-1")

    with pytest.raises(AttributeError):
        topics.agent = "robot/2"  # type: ignore[misc]

    assert topics == Topics("demo", "robot-1")


def test_topics_agent_topics_need_an_agent() -> None:
    """Test asking a fleet-only Topics for an agent topic says what is missing."""
    with pytest.raises(TopicError, match="need an agent id"):
        _ = Topics("demo").telemetry
    with pytest.raises(TopicError, match="rejection_topic"):
        Topics("demo", "a").topic(Kind.REJECTION)
    with pytest.raises(TopicError, match="not an agent topic"):
        Topics("demo").any_agent(Kind.BUDGET)


@settings(derandomize=True, max_examples=60)
@given(fleet=ids, agent=ids, kind=st.sampled_from(AGENT_KINDS))
def test_topics_agent_topic_round_trips(fleet: str, agent: str, kind: Kind) -> None:
    """Test formatting an agent topic and parsing it gives the same parts."""
    topic = Topics(fleet, agent).topic(kind)

    assert parse_topic(topic) == TopicName(fleet, kind, agent)


@settings(derandomize=True, max_examples=30)
@given(fleet=ids, kind=st.sampled_from(FLEET_KINDS))
def test_topics_fleet_topic_round_trips(fleet: str, kind: Kind) -> None:
    """Test formatting a fleet topic and parsing it gives the same parts."""
    topic = Topics(fleet).topic(kind)

    assert parse_topic(topic) == (fleet, kind, None)


@pytest.mark.parametrize(
    "topic",
    [
        "fairsynergy/demo",
        "fairsynergy/demo/agents/robot-1",
        "fairsynergy/demo/agents/robot-1/telemetry/extra",
        "fairsynergy/demo/agents/+/telemetry",
        "fairsynergy/demo/agents/robot-1/rejected",
        "fairsynergy/demo/controller",
        "fairsynergy/de mo/budget",
        "other/demo/budget",
        "fairsynergy/demo/rejected/rejected/budget",
        "/fairsynergy/demo/budget",
    ],
)
def test_topics_parse_refuses_foreign_topics(topic: str) -> None:
    """Test topics outside the protocol raise TopicError instead of guessing."""
    with pytest.raises(TopicError):
        parse_topic(topic)


@pytest.mark.parametrize(
    ("refused", "agent"),
    [
        ("fairsynergy/demo/agents/robot-1/telemetry", "robot-1"),
        ("fairsynergy/demo/agents/robot-1/status", "robot-1"),
        ("fairsynergy/demo/budget", None),
    ],
)
def test_topics_rejection_topic_mirrors_the_refused_topic(
    refused: str, agent: str | None
) -> None:
    """Test a rejection goes below rejected/ and parses to its sender."""
    topic = rejection_topic(refused)

    assert topic == refused.replace("fairsynergy/demo/", "fairsynergy/demo/rejected/")
    assert parse_topic(topic) == TopicName("demo", Kind.REJECTION, agent)


def test_topics_agent_reads_its_own_rejections() -> None:
    """Test an agent's rejection filter matches rejections of its topics only."""
    mine = rejection_topic(Topics("demo", "robot-1").telemetry)
    other = rejection_topic(Topics("demo", "robot-10").telemetry)
    prefix = Topics("demo", "robot-1").rejected.removesuffix("#")

    assert mine.startswith(prefix)
    assert not other.startswith(prefix)


def test_topics_rejections_are_not_refused_themselves() -> None:
    """Test there is no rejection of a rejection (no notice loops)."""
    with pytest.raises(TopicError, match="rejection"):
        rejection_topic("fairsynergy/demo/rejected/budget")


@pytest.mark.parametrize("name", ["compute", "data", "gpu_hours", "r2", "a" * 32])
def test_topics_resource_names_accepted(name: str) -> None:
    """Test resource names of the documented pattern are accepted."""
    assert check_resource(name) == name


@pytest.mark.parametrize("name", ["", "Compute", "2gpu", "gpu-hours", "a" * 33, "_x"])
def test_topics_resource_names_refused(name: str) -> None:
    """Test resource names outside [a-z][a-z0-9_]{0,31} are refused."""
    with pytest.raises(TopicError, match="resource name"):
        check_resource(name)
