"""The broker fixture gives each test a real, isolated Mosquitto."""

from __future__ import annotations

import queue

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.mosquitto import MosquittoBroker

TIMEOUT_S = 5.0


def connected_client(broker: MosquittoBroker, client_id: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def test_broker_delivers_published_message_to_subscriber(broker: MosquittoBroker):
    """A message published at QoS 1 reaches a subscriber on the fixture broker."""
    received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscriber = connected_client(broker, "subscriber")
    subscriber.on_message = lambda _client, _userdata, message: received.put(message)
    subscribed = subscriber.subscribe("fairsynergy/test/#", qos=1)
    publisher = connected_client(broker, "publisher")

    assert subscribed[0] == mqtt.MQTT_ERR_SUCCESS
    wait_until_subscribed(subscriber, broker)
    publisher.publish("fairsynergy/test/hello", b"payload", qos=1).wait_for_publish(
        TIMEOUT_S
    )
    message = received.get(timeout=TIMEOUT_S)

    assert (message.topic, message.payload, message.qos) == (
        "fairsynergy/test/hello",
        b"payload",
        1,
    )
    for client in (subscriber, publisher):
        client.loop_stop()
        client.disconnect()


def test_broker_keeps_retained_message_across_restart(broker: MosquittoBroker):
    """Retained messages survive a broker restart (the fixture uses persistence)."""
    publisher = connected_client(broker, "publisher")
    publisher.publish(
        "fairsynergy/test/kept", b"v1", qos=1, retain=True
    ).wait_for_publish(TIMEOUT_S)
    publisher.loop_stop()
    publisher.disconnect()

    broker.restart()
    received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscriber = connected_client(broker, "late-subscriber")
    subscriber.on_message = lambda _client, _userdata, message: received.put(message)
    subscriber.subscribe("fairsynergy/test/kept", qos=1)
    message = received.get(timeout=TIMEOUT_S)

    assert (message.payload, message.retain) == (b"v1", True)
    subscriber.loop_stop()
    subscriber.disconnect()


def test_broker_fixtures_use_distinct_ports(mosquitto_factory):
    """Two brokers in one test get their own ports, so tests never collide."""
    first = mosquitto_factory()
    second = mosquitto_factory()

    assert first.port != second.port


def wait_until_subscribed(client: mqtt.Client, broker: MosquittoBroker) -> None:
    """Round-trip a probe message so the subscription is known to be active."""
    probe: queue.Queue[bytes] = queue.Queue()
    previous = client.on_message
    client.message_callback_add(
        "fairsynergy/test/probe",
        lambda _c, _u, message: probe.put(bytes(message.payload)),
    )
    client.publish("fairsynergy/test/probe", b"probe", qos=1)
    try:
        probe.get(timeout=TIMEOUT_S)
    except queue.Empty:
        pytest.fail(f"subscription never became active:\n{broker.log()}")
    client.message_callback_remove("fairsynergy/test/probe")
    client.on_message = previous
