"""Prometheus metrics of one controller, on their own registry.

A private registry (instead of the process-wide default) lets several
controllers run in one process, as the tests do.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

# Solve and cycle times range from well under a millisecond (a few agents) to
# about a second (a million agents); buckets cover that span.
TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ControllerMetrics:
    """Every metric the controller exports, named ``fairsynergy_*``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter(
            "fairsynergy_messages_received",
            "Messages received, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "fairsynergy_messages_rejected",
            "Messages rejected, by kind and reason.",
            ["kind", "reason"],
            registry=self.registry,
        )
        self.agents_online = Gauge(
            "fairsynergy_agents_online",
            "Agents currently online.",
            registry=self.registry,
        )
        self.epoch = Gauge(
            "fairsynergy_epoch",
            "Latest allocation epoch published.",
            registry=self.registry,
        )
        self.solve_seconds = Histogram(
            "fairsynergy_solve_seconds",
            "Time to solve one allocation.",
            buckets=TIME_BUCKETS,
            registry=self.registry,
        )
        self.cycle_seconds = Histogram(
            "fairsynergy_cycle_seconds",
            "Time of one allocation cycle: learn, solve, plan, publish, store.",
            buckets=TIME_BUCKETS,
            registry=self.registry,
        )
        self.expected_accuracy = Gauge(
            "fairsynergy_expected_accuracy",
            "Expected fleet accuracy under the allocation in force.",
            ["statistic"],
            registry=self.registry,
        )
        self.exploration_share = Gauge(
            "fairsynergy_exploration_share",
            "Weight of the exploring allocation in the one published (0 to 1).",
            registry=self.registry,
        )
        self.unacknowledged = Counter(
            "fairsynergy_unacknowledged_grants",
            "Grants an agent did not acknowledge within the acknowledgement timeout.",
            registry=self.registry,
        )
        self.allocations_published = Counter(
            "fairsynergy_allocations_published",
            "Per-agent allocation messages handed to the publisher (a later epoch "
            "may supersede some before they go out).",
            registry=self.registry,
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose the metrics over HTTP on ``host:port`` (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)
