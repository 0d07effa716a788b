"""Shared fixtures: a real Mosquitto broker per test, on a free port.

Every test that talks MQTT gets its own broker process with a throwaway config
and data directory, so no test depends on a fixed port or on anything left
running. Tests that use a broker fixture are marked ``broker`` automatically
(``pytest -m "not broker"`` runs the rest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings

from tests.mosquitto import DEFAULT_CONFIG, MosquittoBroker, find_mosquitto

BROKER_FIXTURES = {"broker", "mosquitto_factory"}

# Property tests draw their examples from a fixed seed, so a run is
# reproducible and CI cannot go red on a draw nobody can replay.
settings.register_profile("fixed-seed", derandomize=True, deadline=None)
settings.load_profile("fixed-seed")


@pytest.fixture
def mosquitto_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., MosquittoBroker]]:
    """Start brokers with custom configs; all are stopped after the test."""
    binary = find_mosquitto()
    started: list[MosquittoBroker] = []

    def start(config: str = DEFAULT_CONFIG, ports: int = 1) -> MosquittoBroker:
        workdir = tmp_path_factory.mktemp("mosquitto")
        broker = MosquittoBroker(binary, workdir, config, ports)
        broker.start()
        started.append(broker)
        return broker

    yield start

    for broker in started:
        broker.stop()


@pytest.fixture
def broker(mosquitto_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """A fresh anonymous broker on a free loopback port."""
    return mosquitto_factory()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a broker fixture with ``broker``."""
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)
