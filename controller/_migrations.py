"""The history of the state file's schema, one named migration per change.

Each migration is literal SQL, frozen once released: a file written by any
earlier release replays exactly the statements that built it, whatever the
current code or library defaults look like. :mod:`controller.store` applies
the pending ones in order, each in its own transaction together with its row
in the ``migrations`` table. Never edit or reorder a released migration; append
a new one.

Conventions of the schema: times are Unix seconds (REAL), JSON columns are TEXT
holding compact JSON objects, and every table is STRICT so a value of the wrong
type is refused by SQLite instead of being stored silently.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    """One step of the schema: a version, a stable name and its statements."""

    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at REAL NOT NULL
) STRICT
"""

CREATE_TABLES = Migration(
    version=1,
    name="create_tables",
    statements=(
        """
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) STRICT
        """,
        """
        CREATE TABLE agents (
            agent TEXT PRIMARY KEY,
            model TEXT,
            state TEXT NOT NULL CHECK (state IN ('online', 'offline')),
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            last_seq INTEGER,
            last_epoch_acked INTEGER
        ) STRICT
        """,
        # `id` orders rows by arrival; the index on `agent` also carries the
        # rowid, so "newest rows of one agent" is a backwards index walk.
        """
        CREATE TABLE telemetry (
            id INTEGER PRIMARY KEY,
            agent TEXT NOT NULL,
            seq INTEGER NOT NULL,
            ts REAL NOT NULL,
            accuracy REAL NOT NULL,
            local TEXT NOT NULL,
            cloud TEXT NOT NULL,
            epoch INTEGER,
            load REAL,
            model TEXT,
            received_at REAL NOT NULL
        ) STRICT
        """,
        "CREATE INDEX telemetry_by_agent ON telemetry (agent)",
        """
        CREATE TABLE learner_state (
            agent TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            updated_at REAL NOT NULL
        ) STRICT
        """,
        """
        CREATE TABLE allocations (
            epoch INTEGER PRIMARY KEY CHECK (epoch > 0),
            ts REAL NOT NULL,
            trigger TEXT NOT NULL,
            alpha REAL NOT NULL,
            budget TEXT NOT NULL,
            prices TEXT NOT NULL,
            agents TEXT NOT NULL
        ) STRICT
        """,
        """
        CREATE TABLE budgets (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            resources TEXT NOT NULL,
            alpha REAL NOT NULL
        ) STRICT
        """,
    ),
)

# Age-based retention deletes `WHERE received_at < cutoff` after every batch;
# without this index that is a full scan of the table each time.
INDEX_TELEMETRY_RECEIVED_AT = Migration(
    version=2,
    name="index_telemetry_received_at",
    statements=("CREATE INDEX telemetry_by_received_at ON telemetry (received_at)",),
)

# An epoch's shares may be stored column by column (one list per field, in
# the order of an `agent` list) instead of as one object per agent: for
# 10,000 agents that is half the JSON text and half the time to write it.
# Rows written before keep the layout they were written in.
ALLOCATION_LAYOUT = Migration(
    version=3,
    name="allocation_layout",
    statements=(
        """
        ALTER TABLE allocations ADD COLUMN layout TEXT NOT NULL
            DEFAULT 'by_agent' CHECK (layout IN ('by_agent', 'columns'))
        """,
    ),
)

MIGRATIONS: tuple[Migration, ...] = (
    CREATE_TABLES,
    INDEX_TELEMETRY_RECEIVED_AT,
    ALLOCATION_LAYOUT,
)
"""Every migration, in the order they are applied."""

LATEST_VERSION = MIGRATIONS[-1].version
