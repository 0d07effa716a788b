"""The store's batched writer: one thread drains a bounded in-memory queue.

Callers on the ingest path (paho's network thread, the daemon's loop) only
append to the queue under a lock; one writer thread owns its own connection
and commits what has accumulated, ``batch_interval`` seconds after the first
item arrived or as soon as ``batch_rows`` items are waiting. Three kinds of
item are queued:

- telemetry rows, in arrival order, in a deque bounded by ``queue_limit``: when
  it is full the oldest row is dropped and counted;
- agent updates (last seen, last seq, model, online/offline, acked epoch),
  merged per agent, so at most one entry per agent waits;
- learner states, the latest per agent, so at most one entry per agent waits.
  They are large and an agent may send many per second, so they are written at
  most every ``learner_interval`` seconds (and on flush and close): each agent's
  state is then encoded once per interval, whatever its message rate.

Only telemetry can be dropped: the other two are bounded by the fleet size.
A batch that SQLite refuses is retried row by row in one transaction, so one
bad row costs only itself; every failure is logged and counted, and the writer
thread never dies of it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from sqlite_utils import Database


class LoggerLike(Protocol):
    """What the store needs from a logger: ``logging.Logger`` or structlog."""

    def warning(self, msg: str, *args: Any) -> None:
        """Log data that was dropped or refused."""

    def error(self, msg: str, *args: Any) -> None:
        """Log a failure an operator must look at."""


TelemetryRow = tuple[Any, ...]
"""A telemetry row's values in the order of :data:`TELEMETRY_COLUMNS`."""

Step = tuple[str, str, Sequence[Any]]
"""One kind of row in a batch: (kind, SQL, parameters of each row)."""


def encode_json(value: Any) -> str:
    """Compact JSON text; NaN and infinities raise ValueError, objects TypeError.

    Any mapping (a ``MappingProxyType`` of a frozen message, say) is written as
    a JSON object, like a dict.
    """
    return _ENCODER.encode(value)


def _mapping_as_dict(value: object) -> dict[Any, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON-compatible")


# Built once: json.dumps with options builds an encoder per call, and the
# store encodes two values per telemetry row. Encoding keeps no state between
# calls, so threads can share it.
_ENCODER = json.JSONEncoder(
    allow_nan=False, separators=(",", ":"), default=_mapping_as_dict
)


@dataclass
class AgentUpdate:
    """What one or more messages said about an agent, merged per field.

    ``None`` means "not said": the database keeps its current value. Later
    messages win, except ``seen`` and ``acked`` which only move forward.
    """

    at: float
    seen: float | None = None
    seq: int | None = None
    model: str | None = None
    state: str | None = None
    acked: int | None = None

    def merge(self, later: AgentUpdate) -> None:
        """Fold a later update for the same agent into this one."""
        self.at = min(self.at, later.at)
        self.seen = _max_known(self.seen, later.seen)
        self.acked = _max_known(self.acked, later.acked)
        if later.seq is not None:
            self.seq = later.seq
        if later.model is not None:
            self.model = later.model
        if later.state is not None:
            self.state = later.state

    def merge_report(
        self, at: float, seq: int, model: str | None, acked: int | None
    ) -> None:
        """Fold in a later telemetry row received at ``at``.

        The same as merging ``AgentUpdate(at, seen=at, seq=seq, model=model,
        state="online", acked=acked)``, without building it: this runs per
        report.
        """
        if at < self.at:
            self.at = at
        if self.seen is None or at > self.seen:
            self.seen = at
        if acked is not None and (self.acked is None or acked > self.acked):
            self.acked = acked
        self.seq = seq
        if model is not None:
            self.model = model
        self.state = "online"


Number = TypeVar("Number", int, float)


def _max_known(a: Number | None, b: Number | None) -> Number | None:
    """The larger of two values, ignoring the ones that are not known."""
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


@dataclass
class Batch:
    """Everything taken from the queue for one transaction."""

    telemetry: list[TelemetryRow] = field(default_factory=list)
    agents: dict[str, AgentUpdate] = field(default_factory=dict)
    learner: dict[str, tuple[Mapping[str, Any], float]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """The number of rows this batch writes, pruning aside."""
        return len(self.telemetry) + len(self.agents) + len(self.learner)


TELEMETRY_COLUMNS = (
    "agent",
    "seq",
    "ts",
    "accuracy",
    "local",
    "cloud",
    "epoch",
    "load",
    "model",
    "received_at",
)
"""The order of a queued telemetry row's values."""

INSERT_TELEMETRY = "INSERT INTO telemetry ({}) VALUES ({})".format(
    ", ".join(TELEMETRY_COLUMNS), ", ".join("?" * len(TELEMETRY_COLUMNS))
)

UPSERT_LEARNER_STATE = """
INSERT INTO learner_state (agent, state, updated_at) VALUES (?, ?, ?)
ON CONFLICT (agent) DO UPDATE SET
    state = excluded.state, updated_at = excluded.updated_at
"""

UPSERT_AGENT = """
INSERT INTO agents (
    agent, model, state, first_seen, last_seen, last_seq, last_epoch_acked
)
VALUES (
    :agent, :model, coalesce(:state, 'online'), :at, coalesce(:seen, :at),
    :seq, :acked
)
ON CONFLICT (agent) DO UPDATE SET
    model = coalesce(:model, agents.model),
    state = coalesce(:state, agents.state),
    last_seen = max(agents.last_seen, coalesce(:seen, agents.last_seen)),
    last_seq = coalesce(:seq, agents.last_seq),
    last_epoch_acked = max(
        coalesce(agents.last_epoch_acked, :acked),
        coalesce(:acked, agents.last_epoch_acked)
    )
"""

# OFFSET :keep finds the newest row that must go; it and everything older of
# that agent are deleted (nothing, when the agent has at most :keep rows).
PRUNE_AGENT_TELEMETRY = """
DELETE FROM telemetry
WHERE agent = :agent AND id <= (
    SELECT id FROM telemetry WHERE agent = :agent
    ORDER BY id DESC LIMIT 1 OFFSET :keep
)
"""

PRUNE_OLD_TELEMETRY = "DELETE FROM telemetry WHERE received_at < ?"


@contextmanager
def write_transaction(db: Database) -> Iterator[Database]:
    """Run a block in ``BEGIN IMMEDIATE`` ... ``COMMIT``; roll back on error.

    IMMEDIATE takes the write lock up front, so two connections never both
    hold a read snapshot and then deadlock upgrading it to a write.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.conn.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class BatchWriter:
    """A bounded queue and the one thread that commits it in batches."""

    def __init__(
        self,
        connect: Callable[[], Database],
        *,
        keep_per_agent: int | None,
        max_age: float | None,
        batch_rows: int,
        batch_interval: float,
        learner_interval: float,
        queue_limit: int,
        logger: LoggerLike,
        clock: Callable[[], float],
    ) -> None:
        self._connect = connect
        self._keep_per_agent = keep_per_agent
        self._max_age = max_age
        self._batch_rows = batch_rows
        self._batch_interval = batch_interval
        self._learner_interval = learner_interval
        self._queue_limit = queue_limit
        self._logger = logger
        self._clock = clock

        self._cond = threading.Condition()
        self._pending = Batch()
        self._telemetry: deque[TelemetryRow] = deque()
        self._enqueued = 0
        self._committed = 0
        self._learner_first: int | None = None
        self._learner_due = 0.0
        self._flush_wanted = 0
        self._stopping = False
        self._idle = False
        self._alive = False
        self._startup_error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="fairsynergy-store-writer", daemon=True
        )

        self.dropped = 0
        self.failed = 0
        self.written = 0
        self._dropped_logged = 0
        self._unpruned: dict[str, int] = {}

    def start(self) -> None:
        """Start the thread; re-raise whatever stopped it opening its connection."""
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    @property
    def queued(self) -> int:
        """Items waiting to be written."""
        with self._cond:
            return self._queued_locked()

    def put_telemetry(self, row: TelemetryRow) -> None:
        """Queue one telemetry row and what it says about its agent.

        The agent is online, was seen when the row was received, has sent
        the row's seq and acknowledges the row's epoch.
        """
        agent, seq, epoch, model, at = row[0], row[1], row[6], row[8], row[9]
        with self._cond:
            if len(self._telemetry) >= self._queue_limit:
                self._telemetry.popleft()
                self.dropped += 1
            self._telemetry.append(row)

            known = self._pending.agents.get(agent)
            if known is None:
                self._pending.agents[agent] = AgentUpdate(
                    at=at, seen=at, seq=seq, model=model, state="online", acked=epoch
                )
            else:
                known.merge_report(at, seq, model, epoch)
            self._enqueued += 1
            self._wake_locked()

    def put_agent(self, agent: str, update: AgentUpdate) -> None:
        """Queue an update of an agent's row (state, ack, ...)."""
        with self._cond:
            self._merge_agent_locked(agent, update)
            self._enqueued += 1
            self._wake_locked()

    def put_learner_state(
        self, agent: str, state: Mapping[str, Any], at: float
    ) -> None:
        """Queue an agent's learner state (by reference), replacing a queued one."""
        with self._cond:
            self._enqueued += 1
            if not self._pending.learner:
                self._learner_first = self._enqueued
            self._pending.learner[agent] = (state, at)
            self._wake_locked()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued before the call is written or refused.

        Returns False if ``timeout`` passed first or the thread has stopped.
        """
        with self._cond:
            target = self._enqueued
            self._flush_wanted = max(self._flush_wanted, target)
            self._cond.notify_all()
            return self._cond.wait_for(
                lambda: self._committed >= target or not self._alive, timeout
            ) and (self._committed >= target)

    def close(self) -> None:
        """Write what is queued, then stop the thread and close its connection."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def _queued_locked(self) -> int:
        return (
            len(self._telemetry)
            + len(self._pending.agents)
            + len(self._pending.learner)
        )

    def _merge_agent_locked(self, agent: str, update: AgentUpdate) -> None:
        known = self._pending.agents.get(agent)
        if known is None:
            self._pending.agents[agent] = update
        else:
            known.merge(update)

    def _rows_locked(self) -> int:
        """Queued telemetry rows and agent updates: what fills a batch."""
        return len(self._telemetry) + len(self._pending.agents)

    def _wake_locked(self) -> None:
        # An idle writer sleeps past any batch deadline, so every item wakes
        # it; a writer collecting a batch is woken only when the batch is full.
        if self._idle or self._rows_locked() >= self._batch_rows:
            self._cond.notify()

    def _run(self) -> None:
        try:
            db = self._connect()
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            return
        self._alive = True
        self._ready.set()
        try:
            self._loop(db)
        finally:
            with self._cond:
                self._alive = False
                self._cond.notify_all()
            db.close()

    def _loop(self, db: Database) -> None:
        while True:
            batch, target, stopping = self._take()
            try:
                self._write(db, batch)
            except Exception as exc:
                # _write handles SQLite's refusals itself; this is a last guard
                # so that a bug costs one batch, never the writer thread.
                self.failed += batch.size
                self._logger.error(
                    "store writer failed on a batch of %d rows: %r", batch.size, exc
                )
            with self._cond:
                self._committed = target
                self._cond.notify_all()
            if stopping:
                return

    def _take(self) -> tuple[Batch, int, bool]:
        """Wait until a batch is due, then take it.

        Returns the batch, the sequence number up to which everything queued
        is in it (what a flush waits for) and whether the writer should stop.
        Telemetry and agent updates are always taken whole; learner states
        only once ``learner_interval`` has passed since they were last written,
        or on flush and close.
        """
        with self._cond:
            self._wait_until_due_locked()
            forced = self._stopping or self._flush_wanted > self._committed
            with_learner = forced or time.monotonic() >= self._learner_due

            batch = Batch(telemetry=list(self._telemetry), agents=self._pending.agents)
            self._telemetry.clear()
            self._pending.agents = {}
            target = self._enqueued
            if with_learner:
                batch.learner = self._pending.learner
                self._pending.learner = {}
                self._learner_first = None
            elif self._learner_first is not None:
                target = self._learner_first - 1
            return batch, target, self._stopping

    def _wait_until_due_locked(self) -> None:
        """Sleep until a batch is due: full, forced, or its interval passed.

        The interval starts with the first urgent item: a telemetry row, an
        agent update, or a learner state that is due. With nothing urgent the
        writer sleeps as ``idle`` (until a learner state falls due, if one
        waits), and any new item wakes it.
        """
        deadline: float | None = None
        while not (
            self._stopping
            or self._flush_wanted > self._committed
            or self._rows_locked() >= self._batch_rows
        ):
            now = time.monotonic()
            learner_due = bool(self._pending.learner) and now >= self._learner_due
            if self._rows_locked() == 0 and not learner_due:
                self._idle = True
                timeout = self._learner_due - now if self._pending.learner else None
                self._cond.wait(timeout)
                self._idle = False
                continue

            if deadline is None:
                deadline = now + self._batch_interval
            if now >= deadline:
                return
            self._cond.wait(deadline - now)

    def _write(self, db: Database, batch: Batch) -> None:
        self._log_drops()
        learner = self._encode_learner_states(batch)
        if batch.learner:
            self._learner_due = time.monotonic() + self._learner_interval
        steps = (
            ("telemetry", INSERT_TELEMETRY, batch.telemetry),
            ("agent", UPSERT_AGENT, _agent_params(batch.agents)),
            ("learner_state", UPSERT_LEARNER_STATE, learner),
        )
        if not any(rows for _, _, rows in steps):
            return

        try:
            with write_transaction(db):
                for _, sql, rows in steps:
                    db.conn.executemany(sql, rows)
                self._prune(db, batch)
        except Exception as exc:
            self._logger.warning(
                "store batch of %d rows refused (%s); retrying row by row",
                batch.size,
                exc,
            )
            self._write_one_by_one(db, batch, steps)
            return
        self.written += len(batch.telemetry)

    def _encode_learner_states(self, batch: Batch) -> list[tuple[str, str, float]]:
        """Learner states as JSON rows; a state that is not JSON is refused here.

        Encoding waits until the writer takes the state, so an agent that
        reports many times per batch is encoded once, off the ingest path.
        """
        rows = []
        for agent, (state, at) in batch.learner.items():
            try:
                rows.append((agent, encode_json(state), at))
            except (TypeError, ValueError) as exc:
                self.failed += 1
                self._logger.warning(
                    "store refused the learner state of agent %s: %s", agent[:64], exc
                )
        return rows

    def _write_one_by_one(
        self, db: Database, batch: Batch, steps: tuple[Step, ...]
    ) -> None:
        """Write each row on its own inside one transaction, skipping bad ones."""
        refused = 0
        written = 0
        try:
            with write_transaction(db):
                for kind, sql, rows in steps:
                    for params in rows:
                        try:
                            db.conn.execute(sql, params)
                        except Exception as exc:
                            refused += 1
                            self._log_refused(kind, params, exc)
                        else:
                            written += 1 if kind == "telemetry" else 0
                self._prune(db, batch)
        except Exception as exc:
            lost = sum(len(rows) for _, _, rows in steps)
            self.failed += lost
            self._logger.error("store lost a batch of %d rows: %s", lost, exc)
            return
        self.failed += refused
        self.written += written

    def _log_refused(self, kind: str, params: Any, exc: Exception) -> None:
        agent = params["agent"] if isinstance(params, dict) else params[0]
        self._logger.warning(
            "store refused a %s row for agent %s: %s", kind, str(agent)[:64], exc
        )

    def _prune(self, db: Database, batch: Batch) -> None:
        keep = self._keep_per_agent
        if keep is not None:
            db.conn.executemany(
                PRUNE_AGENT_TELEMETRY,
                (
                    {"agent": agent, "keep": keep}
                    for agent in self._agents_over_limit(batch, keep)
                ),
            )

        if self._max_age is not None and batch.telemetry:
            db.execute(PRUNE_OLD_TELEMETRY, [self._clock() - self._max_age])

    def _agents_over_limit(self, batch: Batch, keep: int) -> list[str]:
        """Agents that may hold more than ``keep + keep // 10`` rows now.

        Pruning an agent walks ``keep`` index entries, so it waits until the
        agent has written a tenth of its limit since it was last pruned. The
        counts live in memory; after a restart an agent may briefly hold up to
        ``keep // 10`` rows more than the limit.
        """
        unpruned = self._unpruned
        for row in batch.telemetry:
            unpruned[row[0]] = unpruned.get(row[0], 0) + 1

        written = {row[0] for row in batch.telemetry}
        due = [agent for agent in written if unpruned[agent] > keep // 10]
        for agent in due:
            del unpruned[agent]
        return due

    def _log_drops(self) -> None:
        with self._cond:
            dropped = self.dropped
        if dropped > self._dropped_logged:
            self._logger.warning(
                "store queue full: dropped %d oldest telemetry rows (%d in total)",
                dropped - self._dropped_logged,
                dropped,
            )
            self._dropped_logged = dropped


def _agent_params(agents: dict[str, AgentUpdate]) -> list[dict[str, Any]]:
    return [
        {
            "agent": agent,
            "at": update.at,
            "seen": update.seen,
            "seq": update.seq,
            "model": update.model,
            "state": update.state,
            "acked": update.acked,
        }
        for agent, update in agents.items()
    ]
