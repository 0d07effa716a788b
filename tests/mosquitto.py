"""The test suite's view of a private Mosquitto: failures fail the test."""

from __future__ import annotations

import pytest

from controller.broker import BrokerError
from controller.localbroker import DEFAULT_CONFIG, LocalBroker, free_port
from controller.localbroker import find_mosquitto as locate

__all__ = ["DEFAULT_CONFIG", "MosquittoBroker", "find_mosquitto", "free_port"]


def find_mosquitto() -> str:
    """The mosquitto binary; fails (never skips) the test when it is missing."""
    try:
        return locate()
    except BrokerError as error:
        pytest.fail(str(error), pytrace=False)


class MosquittoBroker(LocalBroker):
    """A :class:`LocalBroker` whose start-up problems fail the test with its log."""

    def start(self) -> None:
        try:
            super().start()
        except BrokerError as error:
            pytest.fail(str(error), pytrace=False)
