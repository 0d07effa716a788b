"""The fairsynergy edge client: what runs on each device of the fleet.

It reports telemetry (accuracy and the resources behind it) and receives the
cloud allocation the controller grants, over MQTT. It needs only the standard
library, paho-mqtt and :mod:`schemas`, so it fits small devices; programs in
other languages can use the ``fairsynergy-edge`` command instead
(``fairsynergy-edge pipe`` speaks JSON lines on stdin and stdout).

>>> from edge_client import EdgeClient
>>> client = EdgeClient("mqtt://localhost", "demo", "robot-1")  # doctest: +SKIP
>>> with client:  # doctest: +SKIP
...     client.report(accuracy=0.8, local={"compute": 1.0}, cloud={"compute": 0.5})
"""

from edge_client._broker import BrokerAddress, parse_broker_url
from edge_client.allocation import Allocation
from edge_client.client import CLIENT_NAME, DEFAULT_BUFFER_SIZE, EdgeClient, EdgeStats
from edge_client.errors import (
    BrokerUnreachableError,
    ClientClosedError,
    DeliveryTimeoutError,
    EdgeError,
)

__all__ = [
    "CLIENT_NAME",
    "DEFAULT_BUFFER_SIZE",
    "Allocation",
    "BrokerAddress",
    "BrokerUnreachableError",
    "ClientClosedError",
    "DeliveryTimeoutError",
    "EdgeClient",
    "EdgeError",
    "EdgeStats",
    "parse_broker_url",
]
