"""Reports on their way to the broker: a bounded queue and an in-flight window."""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Pending:
    """One encoded report waiting for the broker's acknowledgement."""

    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Tally:
    """What became of the reports added so far."""

    reported: int
    delivered: int
    dropped: int
    pending: int


class Outbox:
    """Holds every report from :meth:`add` until it is delivered or dropped.

    Reports wait in a queue, then move *in flight* (handed to paho, waiting for
    a PUBACK) while fewer than ``window`` are. At most ``capacity`` reports are
    held in all. When a report arrives and the outbox is full, the oldest
    *waiting* report is dropped: fresh measurements matter more to a learner
    tracking drift, and reports in flight belong to paho. If every held report
    is in flight, the new one is dropped instead.

    Every report added ends in exactly one state, so ``reported == delivered +
    dropped + pending`` always holds. Thread-safe.
    """

    def __init__(self, capacity: int, window: int, logger: logging.Logger) -> None:
        if capacity < 1:
            raise ValueError(f"buffer_size must be at least 1, got {capacity}")
        self.capacity = capacity
        self.window = min(window, capacity)
        self._log = logger
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._waiting: deque[Pending] = deque()
        self._inflight: dict[int, Pending] = {}
        self._handing = 0
        self._reported = 0
        self._delivered = 0
        self._dropped = 0

    def tally(self) -> Tally:
        """A consistent snapshot of the counts."""
        with self._lock:
            return Tally(self._reported, self._delivered, self._dropped, self._held())

    def dropped_with_next(self) -> int:
        """The drop count a report added now would carry (it may evict one)."""
        with self._lock:
            return self._dropped + (self._held() >= self.capacity)

    def add(self, report: Pending) -> None:
        """Queue a report, making room by dropping the oldest waiting one."""
        with self._lock:
            self._reported += 1
            if self._held() >= self.capacity and self._waiting:
                oldest = self._waiting.popleft()
                self._drop(oldest.seq, f"the buffer of {self.capacity} is full")
            if self._held() >= self.capacity:
                self._drop(report.seq, "the buffer is full of reports in flight")
            else:
                self._waiting.append(report)

    def take(self) -> Pending | None:
        """The next report to hand to paho, if the window has room for it.

        The report counts as held until :meth:`handed` says where it went.
        """
        with self._lock:
            if not self._waiting or len(self._inflight) >= self.window:
                return None
            self._handing += 1
            return self._waiting.popleft()

    def handed(self, report: Pending, mid: int | None) -> None:
        """Record that paho took ``report`` as message ``mid`` (None: refused)."""
        with self._lock:
            self._handing -= 1
            if mid is None:
                self._drop(report.seq, "paho's queue is full")
            else:
                self._inflight[mid] = report

    def settle(self, mid: int, refusal: str | None) -> None:
        """Record the PUBACK of message ``mid``; ``refusal`` is its failure reason."""
        with self._lock:
            report = self._inflight.pop(mid, None)
            if report is None:
                return  # not a report: a status message
            if refusal is None:
                self._delivered += 1
            else:
                self._drop(report.seq, f"the broker refused it ({refusal})")
            self._settled.notify_all()

    def wait_settled(self, timeout: float) -> bool:
        """Wait until nothing is held; False if ``timeout`` s passed first."""
        with self._lock:
            return self._settled.wait_for(lambda: self._held() == 0, timeout)

    def abandon(self, why: str) -> None:
        """Drop everything still held (the client is closing)."""
        with self._lock:
            leftovers = [*self._inflight.values(), *self._waiting]
            self._inflight.clear()
            self._waiting.clear()
            for report in leftovers:
                self._drop(report.seq, why)

    def _held(self) -> int:
        return len(self._waiting) + len(self._inflight) + self._handing

    def _drop(self, seq: int, why: str) -> None:
        self._dropped += 1
        # A long outage drops one report per report: warn at 1, 2, 4, 8, ...
        # drops so the log stays readable; the count itself is always exact.
        first_of_many = self._dropped & (self._dropped - 1) == 0
        self._log.log(
            logging.WARNING if first_of_many else logging.DEBUG,
            "telemetry seq %d dropped: %s (%d dropped so far)",
            seq,
            why,
            self._dropped,
        )
        self._settled.notify_all()
