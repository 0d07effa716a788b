"""The controller's state in one SQLite file: what a restart needs, and history.

A :class:`Store` keeps the fleet's agents, their telemetry, each agent's learner
state, every allocation by epoch, the budget history and a few ``meta`` values
in one file, through sqlite-utils. Two kinds of write go two ways:

- **queued**: telemetry, agent updates and learner states arrive at the rate of
  the fleet. They are appended to an in-memory queue and committed in batches by
  one writer thread (see :mod:`controller._writer`), so ingest never waits for
  the disk. :meth:`Store.flush` waits for what was queued so far.
- **synchronous**: allocations, budgets and meta values are committed before
  the call returns. An allocation is on disk before the daemon publishes its
  epoch, so epochs only grow, also across a crash.

Every thread that calls the store gets its own SQLite connection; the writer
thread has another. Inside its own ``BEGIN IMMEDIATE`` transactions the store
runs plain SQL only: sqlite-utils' write helpers manage transactions of their
own (3.x commits with ``with conn:``). SQLite errors become :class:`StoreError`
here, at the boundary. ``docs/state.md`` describes the schema, the batching,
retention and what survives a crash.

Example::

    with Store(path, fleet="warehouse") as store:
        store.record_telemetry("robot-1", seq=1, ts=1.0, accuracy=0.81,
                               local={"compute": 1.0}, cloud={"compute": 0.5})
        epoch = store.next_epoch()
        store.record_allocation(epoch, trigger="budget", alpha=1.0,
                                budget={"compute": 4.0}, prices={"compute": 0.2},
                                agents={"robot-1": {"cloud": {"compute": 0.5},
                                                    "expected_accuracy": 0.84}})
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from sqlite_utils import Database

from controller._migrations import (
    LATEST_VERSION,
    MIGRATIONS,
    MIGRATIONS_TABLE,
    Migration,
)
from controller._writer import (
    AgentUpdate,
    BatchWriter,
    LoggerLike,
    encode_json,
    write_transaction,
)
from controller.errors import FairsynergyError

AGENT_STATES = ("online", "offline")

TABLES = ("agents", "telemetry", "learner_state", "allocations", "budgets")
"""The tables :meth:`Store.counts` reports on."""

# How long a connection waits for another one's write lock before SQLite
# gives up with "database is locked". The writer's batches hold it for
# milliseconds; seconds of waiting mean something is wrong.
BUSY_TIMEOUT = 5.0

INSERT_ALLOCATION = """
INSERT INTO allocations (epoch, ts, trigger, alpha, budget, prices, agents, layout)
VALUES (:epoch, :ts, :trigger, :alpha, :budget, :prices, :agents, :layout)
"""

PRUNE_ALLOCATIONS = """
DELETE FROM allocations WHERE epoch < (
    SELECT epoch FROM allocations ORDER BY epoch DESC LIMIT 1 OFFSET ?
)
"""


class StoreError(FairsynergyError):
    """The state file cannot be opened, read or written as asked."""


@dataclass(frozen=True)
class Retention:
    """How much history the store keeps; ``None`` switches a limit off.

    Telemetry is pruned by the writer, in the transaction of each batch: to the
    newest ``telemetry_per_agent`` rows of each agent (an agent is pruned once
    it has written a tenth of its limit since the last time, so it holds at
    most 10% more), and to rows received in the last ``telemetry_max_age``
    seconds. Allocations are pruned when one is recorded, to the newest
    ``allocations_kept``; the newest is never pruned, so the last epoch always
    survives. Budgets are all kept.
    """

    telemetry_per_agent: int | None = 1000
    telemetry_max_age: float | None = 7 * 24 * 3600.0
    allocations_kept: int | None = 200

    def __post_init__(self) -> None:
        for name in ("telemetry_per_agent", "telemetry_max_age", "allocations_kept"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise StoreError(
                    f"retention {name} is {value!r}; expected a positive number, "
                    "or None for no limit"
                )


class Store:
    """The controller's state file: open, migrate, write, restore.

    Args:
        path: the SQLite file; created, with its schema, if missing.
        fleet: the fleet this file belongs to. Stored on first use; opening a
            file of another fleet raises :class:`StoreError`.
        retention: how much telemetry and how many allocations to keep.
        batch_rows: the writer commits as soon as this many items are queued.
        batch_interval: ... or this many seconds after the first one was.
        learner_interval: learner states are written at most this often; the
            latest per agent waits in between (see docs/state.md).
        queue_limit: most telemetry rows waiting; beyond it the oldest are
            dropped and counted in :attr:`dropped`.
        durable: commit synchronous writes (allocations, budgets, meta) with
            ``synchronous=FULL``, so they survive a power loss; with False
            (``NORMAL``) they survive a crash of the process but not of the OS.
        read_only: only read (e.g. ``fairsynergy status`` beside a running
            daemon): no migration, no writer thread, every write refused. The
            file must exist and have exactly this code's schema version.
        logger: where refused and dropped rows are reported.
        clock: the time source for ``received_at``, ``updated_at`` and retention.

    Raises:
        StoreError: the file cannot be opened, is not a fairsynergy state file,
            has a newer schema than this code, or belongs to another fleet.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fleet: str | None = None,
        retention: Retention | None = None,
        batch_rows: int = 1000,
        batch_interval: float = 0.1,
        learner_interval: float = 1.0,
        queue_limit: int = 100_000,
        durable: bool = True,
        read_only: bool = False,
        logger: LoggerLike | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if str(path) == ":memory:" or not str(path):
            raise StoreError(
                f"state path {str(path)!r} is not a file; the store needs a file "
                "that several connections can share"
            )
        _check_batching(batch_rows, batch_interval, learner_interval, queue_limit)
        self.path = Path(path)
        self.read_only = read_only
        self.retention = retention or Retention()
        self._synchronous = "FULL" if durable else "NORMAL"
        self._logger = logger or logging.getLogger(__name__)
        self._clock = clock
        self._local = threading.local()
        self._connections: list[Database] = []
        self._connections_lock = threading.Lock()
        self._epoch_lock = threading.Lock()
        self._closed = False
        # Per (agent, "local" or "cloud"): the last amounts written, and their JSON.
        self._amounts_cache: dict[tuple[str, str], tuple[dict[str, float], str]] = {}

        self._writer: BatchWriter | None = None
        try:
            with self._sqlite_errors("open the state file"):
                if read_only:
                    self._open_read_only(fleet)
                else:
                    self._open_for_writing(fleet)
        except BaseException:
            self._close_connections()
            raise
        self._epoch_reserved = self.last_epoch()
        if read_only:
            return

        writer = BatchWriter(
            self._writer_connection,
            keep_per_agent=self.retention.telemetry_per_agent,
            max_age=self.retention.telemetry_max_age,
            batch_rows=batch_rows,
            batch_interval=batch_interval,
            learner_interval=learner_interval,
            queue_limit=queue_limit,
            logger=self._logger,
            clock=clock,
        )
        try:
            with self._sqlite_errors("start the writer"):
                writer.start()
        except BaseException:
            self._close_connections()
            raise
        self._writer = writer

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued before this call is committed.

        Rows SQLite refused (see :attr:`failed`) count as done.

        Raises:
            StoreError: ``timeout`` seconds passed first, or the writer stopped.
        """
        self._check_open()
        if self._writer is not None and not self._writer.flush(timeout):
            raise StoreError(
                f"the store writer did not commit {self._writer.queued} queued "
                f"items of {self.path} within {timeout} s"
            )

    def close(self) -> None:
        """Write everything queued, stop the writer and close every connection.

        Call it once no other thread uses the store. Closing twice is harmless.
        """
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        self._close_connections()

    # -- queued writes -----------------------------------------------------

    def record_telemetry(
        self,
        agent: str,
        seq: int,
        ts: float,
        accuracy: float,
        local: Mapping[str, float],
        cloud: Mapping[str, float],
        epoch: int | None = None,
        load: float | None = None,
        model: str | None = None,
    ) -> None:
        """Queue one telemetry message; the agent is marked online and seen now.

        The arguments are the fields of the wire message, so a validated
        message can be passed as ``record_telemetry(**message)``. A message
        carrying an epoch also acknowledges it (``last_epoch_acked`` only
        grows).
        """
        writer = self._queue()
        row = (
            _agent_id(agent),
            seq,
            ts,
            accuracy,
            self._amounts_text(agent, "local", local),
            self._amounts_text(agent, "cloud", cloud),
            epoch,
            load,
            model,
            self._clock(),
        )
        writer.put_telemetry(row)

    def _amounts_text(self, agent: str, name: str, amounts: Mapping[str, float]) -> str:
        """The JSON of a report's amounts, reusing the agent's previous text.

        On-board amounts are hardware and cloud amounts change with the grant,
        so most reports repeat the previous ones: comparing two small dicts
        costs a fraction of encoding one. Equal amounts are equal numbers, so
        ``1`` may be stored as an earlier report's ``1.0``.
        """
        key = (agent, name)
        cached = self._amounts_cache.get(key)
        if cached is not None and cached[0] == amounts:
            return cached[1]
        text = _encode(amounts, f"telemetry {name}", agent)
        self._amounts_cache[key] = (dict(amounts), text)
        return text

    def set_agent_state(
        self, agent: str, state: str, *, model: str | None = None
    ) -> None:
        """Queue an agent's presence: ``"online"`` (seen now) or ``"offline"``."""
        self._check_writable()
        if state not in AGENT_STATES:
            raise StoreError(
                f"agent {agent} state {state!r} is not one of {AGENT_STATES}"
            )
        now = self._clock()
        seen = now if state == "online" else None
        update = AgentUpdate(at=now, seen=seen, model=model, state=state)
        self._queue().put_agent(_agent_id(agent), update)

    def record_ack(self, agent: str, epoch: int) -> None:
        """Queue that an agent applies the allocation of ``epoch``."""
        self._check_writable()
        update = AgentUpdate(at=self._clock(), acked=epoch)
        self._queue().put_agent(_agent_id(agent), update)

    def save_learner_state(self, agent: str, state: Mapping[str, Any]) -> None:
        """Queue an agent's learner state, replacing any still queued for it.

        States are written at most every ``learner_interval`` seconds, each
        agent's latest one, and encoded by the writer then: they are large
        (about 2 kB) and an agent may send many per second. So the store keeps
        ``state`` by reference until then: pass fresh data (a learner's
        ``to_state()``) and do not mutate it afterwards. A state that is not
        JSON (NaN, objects) is refused there: logged and counted in
        :attr:`failed`.
        """
        self._check_writable()
        self._queue().put_learner_state(_agent_id(agent), state, self._clock())

    # -- synchronous writes ------------------------------------------------

    def next_epoch(self) -> int:
        """An epoch greater than any recorded or handed out before.

        Epochs handed out but never recorded are not remembered across a
        restart; that is safe, since only a recorded epoch may be published.
        """
        with self._epoch_lock:
            epoch = max(self._epoch_reserved, self.last_epoch()) + 1
            self._epoch_reserved = epoch
        return epoch

    def record_allocation(
        self,
        epoch: int,
        *,
        trigger: str,
        alpha: float,
        budget: Mapping[str, float],
        prices: Mapping[str, float],
        agents: Mapping[str, Mapping[str, Any]] | None = None,
        columns: Mapping[str, Sequence[Any] | np.ndarray] | None = None,
        ts: float | None = None,
    ) -> None:
        """Commit an allocation before it is published.

        ``agents`` maps each agent to ``{"cloud": {resource: amount},
        "expected_accuracy": v}`` (any JSON-compatible values are kept).
        Large fleets pass the same as ``columns`` instead, lists or numpy
        arrays (see :func:`shares_from_columns`), which are stored as they
        are and written about twenty times faster for 10,000 agents (orjson
        on arrays); reading gives ``agents`` back either way.
        When this returns, the epoch survives a crash of the process, and
        with ``durable=True`` a power loss too.

        Raises:
            StoreError: ``epoch`` is not greater than the last recorded one, a
                field is not JSON-compatible, or not exactly one of ``agents``
                and ``columns`` is given.
        """
        self._check_writable()
        shares: Mapping[str, Any]
        if agents is not None and columns is None:
            shares, layout = agents, "by_agent"
        elif columns is not None and agents is None:
            shares, layout = columns, "columns"
        else:
            raise StoreError("record_allocation takes one of agents and columns")
        row = {
            "epoch": _epoch(epoch),
            "ts": self._clock() if ts is None else ts,
            "trigger": trigger,
            "alpha": alpha,
            "budget": _encode(budget, f"budget of epoch {epoch}"),
            "prices": _encode(prices, f"prices of epoch {epoch}"),
            "agents": (
                _encode(shares, f"agents of epoch {epoch}")
                if layout == "by_agent"
                else _encode_columns(shares, f"agents of epoch {epoch}")
            ),
            "layout": layout,
        }
        with self._epoch_lock, self._sqlite_errors(f"record epoch {epoch}"):
            db = self._db()
            with write_transaction(db):
                self._check_epoch_grows(db, epoch)
                db.execute(INSERT_ALLOCATION, row)
                self._prune_allocations(db)
            self._epoch_reserved = max(self._epoch_reserved, epoch)

    def record_budget(
        self, resources: Mapping[str, float], alpha: float, ts: float | None = None
    ) -> None:
        """Commit a new budget (amount per resource) and fairness alpha."""
        self._check_writable()
        row = {
            "ts": self._clock() if ts is None else ts,
            "resources": _encode(resources, "budget resources"),
            "alpha": alpha,
        }
        with self._sqlite_errors("record the budget"):
            db = self._db()
            db.table("budgets").insert(row)

    def set_meta(self, key: str, value: str) -> None:
        """Commit one ``meta`` value (e.g. the fleet name)."""
        self._check_writable()
        with self._sqlite_errors(f"set meta {key}"):
            db = self._db()
            db.table("meta").upsert({"key": key, "value": value}, pk="key")

    # -- reads ---------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """One ``meta`` value, or None."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", [key])
        return rows[0]["value"] if rows else None

    @property
    def schema_version(self) -> int:
        """The newest migration applied to the file."""
        rows = self._query("SELECT max(version) AS version FROM migrations")
        return rows[0]["version"] or 0

    @property
    def fleet(self) -> str | None:
        """The fleet this file belongs to, if one was given."""
        return self.meta("fleet")

    def last_epoch(self) -> int:
        """The greatest recorded epoch, 0 when none is."""
        rows = self._query("SELECT max(epoch) AS epoch FROM allocations")
        return rows[0]["epoch"] or 0

    def latest_allocation(self) -> dict[str, Any] | None:
        """The allocation of the last epoch, or None."""
        rows = self._query("SELECT * FROM allocations ORDER BY epoch DESC LIMIT 1")
        return _decode_allocation(rows[0]) if rows else None

    def allocation(self, epoch: int) -> dict[str, Any] | None:
        """The allocation recorded for ``epoch``, or None (never or pruned)."""
        rows = self._query("SELECT * FROM allocations WHERE epoch = ?", [epoch])
        return _decode_allocation(rows[0]) if rows else None

    def latest_budget(self) -> dict[str, Any] | None:
        """The last budget recorded: ``{"ts", "resources", "alpha"}``, or None."""
        rows = self._query(
            "SELECT ts, resources, alpha FROM budgets ORDER BY id DESC LIMIT 1"
        )
        if not rows:
            return None
        row = rows[0]
        row["resources"] = json.loads(row["resources"])
        return row

    def learner_states(self) -> dict[str, dict[str, Any]]:
        """Every agent's committed learner state."""
        return {
            agent: json.loads(state)
            for agent, state in self.learner_state_texts().items()
        }

    def learner_state_texts(self) -> dict[str, str]:
        """Every agent's committed learner state, as the JSON text stored.

        The restart path: parsing is most of the cost, so the daemon leaves
        it to the learner, which parses each state when it needs it.
        """
        self._check_open()
        with self._sqlite_errors("read learner states"):
            cursor = self._db().execute("SELECT agent, state FROM learner_state")
            rows: list[tuple[str, str]] = cursor.fetchall()
        return dict(rows)

    def learner_state(self, agent: str) -> dict[str, Any] | None:
        """One agent's committed learner state, or None."""
        rows = self._query("SELECT state FROM learner_state WHERE agent = ?", [agent])
        return json.loads(rows[0]["state"]) if rows else None

    def agents(self) -> list[dict[str, Any]]:
        """Every known agent's row, ordered by agent id."""
        return self._query("SELECT * FROM agents ORDER BY agent")

    def recent_telemetry(self, agent: str, limit: int = 100) -> list[dict[str, Any]]:
        """An agent's last ``limit`` committed telemetry rows, oldest first."""
        rows = self._query(
            """
            SELECT agent, seq, ts, accuracy, local, cloud, epoch, load, model,
                received_at
            FROM telemetry WHERE agent = ? ORDER BY id DESC LIMIT ?
            """,
            [agent, limit],
        )
        for row in rows:
            row["local"] = json.loads(row["local"])
            row["cloud"] = json.loads(row["cloud"])
        return rows[::-1]

    def counts(self) -> dict[str, int]:
        """Committed rows per table."""
        return {
            table: self._query(f"SELECT count(*) AS n FROM {table}")[0]["n"]
            for table in TABLES
        }

    @property
    def queued(self) -> int:
        """Items waiting for the writer."""
        return 0 if self._writer is None else self._writer.queued

    @property
    def dropped(self) -> int:
        """Telemetry rows dropped because the queue was full, since opening."""
        return 0 if self._writer is None else self._writer.dropped

    @property
    def failed(self) -> int:
        """Queued rows SQLite refused or lost, since opening (see the log)."""
        return 0 if self._writer is None else self._writer.failed

    def status(self) -> dict[str, Any]:
        """A summary for ``fairsynergy status``: plain JSON-compatible values."""
        presence = self._query("SELECT state, count(*) AS n FROM agents GROUP BY state")
        return {
            "path": str(self.path),
            "fleet": self.fleet,
            "schema_version": self.schema_version,
            "last_epoch": self.last_epoch(),
            "agents": dict.fromkeys(AGENT_STATES, 0)
            | {row["state"]: row["n"] for row in presence},
            "rows": self.counts(),
            "queued": self.queued,
            "dropped": self.dropped,
            "failed": self.failed,
            "file_bytes": _file_bytes(self.path),
        }

    # -- internals -------------------------------------------------------------

    def _open_for_writing(self, fleet: str | None) -> None:
        db = self._db()
        migrate(db, clock=self._clock, path=self.path)
        db.enable_wal()
        self._claim_fleet(db, fleet)

    def _open_read_only(self, fleet: str | None) -> None:
        db = self._db()
        if "migrations" not in db.table_names():
            raise StoreError(f"{self.path} is not a fairsynergy state file")
        found = schema_version(db)
        if found != LATEST_VERSION:
            raise StoreError(
                f"state file {self.path} has schema version {found}, this "
                f"fairsynergy reads version {LATEST_VERSION}; open it for writing "
                "once (the daemon does) to upgrade it, or use a matching release"
            )
        self._claim_fleet(db, fleet)

    def _queue(self) -> BatchWriter:
        """The writer, for a queued write; refused when closed or read-only."""
        self._check_open()
        if self._writer is None:
            raise StoreError(f"the store of {self.path} is open read-only")
        return self._writer

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise StoreError(f"the store of {self.path} is open read-only")

    def _db(self) -> Database:
        """This thread's connection, opened on first use."""
        db: Database | None = getattr(self._local, "db", None)
        if db is None:
            # check_same_thread=False only so that close() may close every
            # thread's connection; each is used by its own thread alone.
            db = self._connect(self._synchronous, check_same_thread=False)
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    def _close_connections(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()

    def _writer_connection(self) -> Database:
        """The writer thread's connection: NORMAL, see "What survives a crash"."""
        return self._connect("NORMAL", check_same_thread=True)

    def _connect(self, synchronous: str, *, check_same_thread: bool) -> Database:
        target = self.path.resolve().as_uri() + "?mode=ro" if self.read_only else None
        conn = sqlite3.connect(
            target or self.path,
            timeout=BUSY_TIMEOUT,
            isolation_level=None,
            check_same_thread=check_same_thread,
            uri=target is not None,
        )
        db = Database(conn, execute_plugins=False)
        db.execute(f"PRAGMA synchronous = {synchronous}")
        return db

    @contextmanager
    def _sqlite_errors(self, action: str) -> Iterator[None]:
        """Turn SQLite's errors into StoreError naming the action and the file."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot {action}: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store of {self.path} is closed")

    def _query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        self._check_open()
        with self._sqlite_errors("read"):
            return list(self._db().query(sql, params))

    def _claim_fleet(self, db: Database, fleet: str | None) -> None:
        rows = list(db.query("SELECT value FROM meta WHERE key = 'fleet'"))
        if rows and fleet is not None and rows[0]["value"] != fleet:
            raise StoreError(
                f"state file {self.path} belongs to fleet {rows[0]['value']!r}, "
                f"not {fleet!r}; use that fleet name or another file"
            )
        if not rows and fleet is not None and not self.read_only:
            db.table("meta").insert({"key": "fleet", "value": fleet})

    def _check_epoch_grows(self, db: Database, epoch: int) -> None:
        last = db.execute("SELECT max(epoch) FROM allocations").fetchone()[0] or 0
        if epoch <= last:
            raise StoreError(
                f"epoch {epoch} is not greater than the last recorded epoch {last} "
                f"of {self.path}; take a new one from next_epoch()"
            )

    def _prune_allocations(self, db: Database) -> None:
        kept = self.retention.allocations_kept
        if kept is not None:
            db.execute(PRUNE_ALLOCATIONS, [kept - 1])


def migrate(
    db: Database,
    migrations: tuple[Migration, ...] = MIGRATIONS,
    *,
    clock: Callable[[], float] = time.time,
    path: Path | None = None,
) -> list[Migration]:
    """Apply the pending migrations in order, each once, in its own transaction.

    Returns the migrations applied now. A file whose schema is newer than
    ``migrations``, or whose history names a migration differently, is refused
    before anything is written to it.

    Raises:
        StoreError: the history is refused, or a migration failed (it is rolled
            back, and the ones before it stay applied).
    """
    where = f"state file {path}" if path else "state file"
    tables = db.table_names()
    if tables and "migrations" not in tables:
        raise StoreError(
            f"{where} is not a fairsynergy state file: it has tables "
            f"({', '.join(tables[:5])}) but no migrations table"
        )
    db.execute(MIGRATIONS_TABLE)
    _check_history(db, migrations, where)

    applied = []
    for migration in migrations:
        if _is_applied(db, migration):
            continue
        try:
            if _apply(db, migration, clock()):
                applied.append(migration)
        except sqlite3.Error as exc:
            raise StoreError(
                f"{where}: migration {migration.version} ({migration.name}) failed "
                f"and was rolled back, the file stays at schema version "
                f"{schema_version(db)}: {exc}"
            ) from exc
    return applied


def _apply(db: Database, migration: Migration, now: float) -> bool:
    """Run one migration and record it, in one transaction; False if it was."""
    with write_transaction(db):
        # Another process may have applied it since the caller looked.
        if _is_applied(db, migration):
            return False
        for statement in migration.statements:
            db.execute(statement)
        db.execute(
            "INSERT INTO migrations (version, name, applied_at) VALUES (?, ?, ?)",
            [migration.version, migration.name, now],
        )
        db.execute(f"PRAGMA user_version = {migration.version}")
    return True


def schema_version(db: Database) -> int:
    """The newest migration applied to the file, 0 for a new file."""
    row = db.execute("SELECT max(version) FROM migrations").fetchone()
    return row[0] or 0


def _check_history(db: Database, migrations: tuple[Migration, ...], where: str) -> None:
    known = {migration.version: migration.name for migration in migrations}
    newest = max(known, default=0)
    found = schema_version(db)
    if found > newest:
        raise StoreError(
            f"{where} has schema version {found}, newer than this fairsynergy "
            f"understands (up to {newest}); upgrade fairsynergy to open it"
        )

    for row in db.query("SELECT version, name FROM migrations ORDER BY version"):
        if known.get(row["version"]) != row["name"]:
            raise StoreError(
                f"{where} records migration {row['version']} as {row['name']!r}, "
                f"but this fairsynergy knows it as {known.get(row['version'])!r}; "
                "it was written by an incompatible build"
            )


def _is_applied(db: Database, migration: Migration) -> bool:
    sql = "SELECT 1 FROM migrations WHERE version = ?"
    return db.execute(sql, [migration.version]).fetchone() is not None


def _check_batching(
    batch_rows: int, batch_interval: float, learner_interval: float, queue_limit: int
) -> None:
    if not batch_rows >= 1:
        raise StoreError(f"batch_rows is {batch_rows!r}; expected at least 1")
    if not (batch_interval > 0 and math.isfinite(batch_interval)):
        raise StoreError(
            f"batch_interval is {batch_interval!r}; expected positive seconds"
        )
    if not (learner_interval >= 0 and math.isfinite(learner_interval)):
        raise StoreError(
            f"learner_interval is {learner_interval!r}; expected seconds >= 0"
        )
    if not queue_limit >= 1:
        raise StoreError(f"queue_limit is {queue_limit!r}; expected at least 1")


def _agent_id(agent: str) -> str:
    if not isinstance(agent, str) or not agent:
        raise StoreError(f"agent id {agent!r} is not a non-empty string")
    return agent


def _epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise StoreError(f"epoch {epoch!r} is not a positive integer")
    return epoch


def _encode(value: Mapping[str, Any], what: str, agent: str | None = None) -> str:
    """Compact JSON text; NaN, infinities and foreign objects are refused.

    The error names ``what`` (of ``agent``, when given), put together only on
    failure: telemetry is encoded twice per report.
    """
    try:
        return encode_json(value)
    except (TypeError, ValueError) as exc:
        whose = what if agent is None else f"{what} of agent {agent}"
        raise StoreError(
            f"{whose} is not JSON-compatible ({exc}); expected str keys and finite "
            "numbers, strings, booleans, None, lists and dicts"
        ) from None


def _encode_columns(columns: Mapping[str, Any], what: str) -> str:
    """The column layout as compact JSON; columns may be numpy arrays.

    orjson writes the columns of a large fleet about twenty times faster
    than the standard encoder (4 against 87 ms for 10,000 agents and two
    resources, most of it spent formatting floats), but it writes NaN and
    infinities as null instead of refusing them, so they are refused first.
    """
    for name, values in columns.items():
        if not _all_finite(values):
            raise StoreError(f"{what}: column {name!r} holds NaN or an infinity")
    arrays = {
        name: np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v
        for name, v in columns.items()
    }
    try:
        return orjson.dumps(arrays, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    except orjson.JSONEncodeError as exc:
        raise StoreError(
            f"{what} is not JSON-compatible ({exc}); expected str keys, arrays "
            "and lists of finite numbers, strings, booleans and None"
        ) from None


def _all_finite(values: Any) -> bool:
    """No NaN or infinity anywhere in an array, or in nested lists and objects."""
    if isinstance(values, np.ndarray):
        return values.dtype.kind not in "fc" or bool(np.isfinite(values).all())
    if isinstance(values, float):
        return math.isfinite(values)
    if isinstance(values, Mapping):
        values = list(values.values())
    if isinstance(values, list | tuple):
        return all(_all_finite(v) for v in values if not isinstance(v, str | int))
    return True


def _decode_allocation(row: dict[str, Any]) -> dict[str, Any]:
    for column in ("budget", "prices", "agents"):
        row[column] = json.loads(row[column])
    if row.pop("layout") == "columns":
        row["agents"] = shares_from_columns(row["agents"])
    return row


def shares_from_columns(columns: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Per-agent shares from the column layout of an epoch.

    ``columns["agent"]`` names the agents and ``columns["resources"]`` the
    resources; every other column holds one value per agent, in that order.
    A value that is a list is one amount per resource and becomes a
    ``{resource: amount}`` object; ``None`` and ``False`` are left out (an
    unknown expected accuracy, an agent that is not away).
    """
    resources = columns["resources"]
    fields = [(k, v) for k, v in columns.items() if k not in ("agent", "resources")]
    shares: dict[str, Any] = {}
    for row, agent in enumerate(columns["agent"]):
        share = shares[agent] = {}
        for name, values in fields:
            value = values[row]
            if isinstance(value, list):
                share[name] = dict(zip(resources, value, strict=True))
            elif value is not None and value is not False:
                share[name] = value
    return shares


def _file_bytes(path: Path) -> int:
    """The size of the file with its write-ahead log, as it is on disk now."""
    total = 0
    for suffix in ("", "-wal"):
        with suppress(FileNotFoundError):
            total += os.stat(f"{path}{suffix}").st_size
    return total
