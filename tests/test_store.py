"""The controller's state file: round trips, retention, migrations, crashes."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
from sqlite_utils import Database

from controller._migrations import MIGRATIONS, Migration
from controller._writer import AgentUpdate
from controller.store import Retention, Store, StoreError, migrate, schema_version

REPO = Path(__file__).resolve().parents[1]

# A batch interval no test waits for: rows reach the file only on flush().
NEVER = 60.0


class FakeClock:
    """A settable time source."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where each test keeps its state file."""
    return tmp_path / "state.db"


@pytest.fixture
def store(path: Path) -> Iterator[Store]:
    """A store whose rows are written only when a test flushes."""
    with Store(path, fleet="test", batch_interval=NEVER) as opened:
        yield opened


def telemetry(agent: str = "robot-1", seq: int = 0, **fields: Any) -> dict[str, Any]:
    """A valid telemetry message, with fields overridden."""
    message: dict[str, Any] = {
        "agent": agent,
        "seq": seq,
        "ts": 100.0 + seq,
        "accuracy": 0.8,
        "local": {"compute": 1.0, "data": 0.5},
        "cloud": {"compute": 0.25, "data": 0.0},
    }
    return message | fields


def allocation(**fields: Any) -> dict[str, Any]:
    """The keyword arguments of a valid allocation."""
    return {
        "trigger": "budget",
        "alpha": 1.0,
        "budget": {"compute": 4.0},
        "prices": {"compute": 0.125},
        "agents": {"robot-1": {"cloud": {"compute": 4.0}, "expected_accuracy": 0.9}},
    } | fields


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.005)


def raw(path: Path) -> Database:
    """A plain connection to the file, bypassing the store."""
    return Database(sqlite3.connect(path, isolation_level=None))


# -- round trips ---------------------------------------------------------------


def test_store_telemetry_round_trip(store: Store) -> None:
    """Test telemetry comes back with its fields, JSON decoded, oldest first."""
    store.record_telemetry(**telemetry(seq=1))
    frozen = MappingProxyType({"compute": 1.0, "data": 0.5})
    store.record_telemetry(
        **telemetry(seq=2, epoch=7, load=0.5, model="resnet18", local=frozen)
    )
    store.record_telemetry(**telemetry(agent="robot-2", seq=9))

    store.flush()
    rows = store.recent_telemetry("robot-1", limit=10)

    assert [row["seq"] for row in rows] == [1, 2]
    assert rows[1]["local"] == {"compute": 1.0, "data": 0.5}
    assert rows[1]["cloud"] == {"compute": 0.25, "data": 0.0}
    assert (rows[1]["epoch"], rows[1]["load"], rows[1]["model"]) == (7, 0.5, "resnet18")
    assert (rows[0]["epoch"], rows[0]["load"], rows[0]["model"]) == (None, None, None)
    assert [row["seq"] for row in store.recent_telemetry("robot-1", limit=1)] == [2]


def test_store_telemetry_amounts_follow_each_report(store: Store) -> None:
    """Test repeated amounts are stored as sent, and a change is never missed."""
    changed = {"compute": 2.0, "data": 0.5}
    store.record_telemetry(**telemetry(seq=1))
    store.record_telemetry(**telemetry(seq=2))
    store.record_telemetry(**telemetry(seq=3, local=changed, cloud={}))
    store.record_telemetry(**telemetry(seq=4))
    store.record_telemetry(**telemetry(agent="robot-2", seq=1, local=changed))

    store.flush()
    rows = store.recent_telemetry("robot-1", limit=10)

    locals_ = [row["local"] for row in rows]
    assert locals_ == [{"compute": 1.0, "data": 0.5}] * 2 + [changed, locals_[0]]
    assert [row["cloud"] for row in rows][2:] == [{}, {"compute": 0.25, "data": 0.0}]
    assert store.recent_telemetry("robot-2", limit=1)[0]["local"] == changed


def test_store_learner_state_round_trip(store: Store) -> None:
    """Test the latest learner state per agent is restored."""
    state = {"scale": 0.7, "elasticity": [0.2, 0.3], "n": 4}
    store.save_learner_state("robot-1", {"scale": 0.1})
    store.save_learner_state("robot-1", state)
    store.save_learner_state("robot-2", {"scale": 0.5})

    store.flush()

    assert store.learner_states() == {
        "robot-1": {"scale": 0.7, "elasticity": [0.2, 0.3], "n": 4},
        "robot-2": {"scale": 0.5},
    }
    assert store.learner_state("robot-2") == {"scale": 0.5}
    assert store.learner_state("nobody") is None


def test_store_allocation_round_trip(store: Store) -> None:
    """Test allocations come back by epoch and as the latest, alpha inf included."""
    store.record_allocation(1, ts=10.0, **allocation())
    store.record_allocation(2, ts=20.0, **allocation(alpha=math.inf, trigger="drift"))

    latest = store.latest_allocation()

    assert latest == {
        "epoch": 2,
        "ts": 20.0,
        **allocation(alpha=math.inf, trigger="drift"),
    }
    assert store.allocation(1) == {"epoch": 1, "ts": 10.0, **allocation()}
    assert store.allocation(3) is None
    assert store.last_epoch() == 2


def two_columns() -> dict[str, Any]:
    """Two agents' shares, column by column (see ``shares_from_columns``)."""
    return {
        "agent": ["a", "b"],
        "resources": ["compute", "data"],
        "cloud": [[1.0, 0.5], [2.0, 0.0]],
        "epoch": [3, 4],
        "away": [True, False],
        "expected": [None, 0.7],
    }


def epoch_fields() -> dict[str, Any]:
    """What ``record_allocation`` takes besides the shares."""
    fields = allocation()
    del fields["agents"]
    return fields


def test_store_allocation_columns_read_back_by_agent(store: Store) -> None:
    """Test an epoch written column by column reads back as one share per agent."""
    by_agent = {
        "a": {"cloud": {"compute": 1.0, "data": 0.5}, "epoch": 3, "away": True},
        "b": {"cloud": {"compute": 2.0, "data": 0.0}, "epoch": 4, "expected": 0.7},
    }
    store.record_allocation(1, ts=1.0, agents=by_agent, **epoch_fields())
    store.record_allocation(2, ts=2.0, columns=two_columns(), **epoch_fields())

    first, second = store.allocation(1), store.allocation(2)

    assert first is not None
    assert second is not None
    assert second["agents"] == first["agents"] == by_agent


def test_store_allocation_columns_take_numpy_arrays(store: Store) -> None:
    """Test array columns read back like the same columns given as lists."""
    lists = two_columns()
    arrays = dict(lists)
    arrays["cloud"] = np.asfortranarray(lists["cloud"])  # not C-contiguous
    arrays["epoch"] = np.array(lists["epoch"])
    arrays["away"] = np.array(lists["away"])
    store.record_allocation(1, ts=1.0, columns=lists, **epoch_fields())
    store.record_allocation(2, ts=2.0, columns=arrays, **epoch_fields())

    first, second = store.allocation(1), store.allocation(2)

    assert first is not None
    assert second is not None
    assert second["agents"] == first["agents"]
    assert second["agents"]["a"]["cloud"] == {"compute": 1.0, "data": 0.5}


@pytest.mark.parametrize(
    ("column", "values"),
    [
        ("held", np.array([[1.0, np.nan]])),
        ("held", [[1.0, math.inf]]),
        ("expected", [-math.inf]),
        ("expected", [{"deep": math.nan}]),
    ],
)
def test_store_allocation_columns_refuse_nan_and_infinities(
    store: Store, column: str, values: Any
) -> None:
    """Test a non-finite number in any column is refused and nothing is kept."""
    columns = {"agent": ["a"], "resources": ["compute", "data"], column: values}

    with pytest.raises(StoreError, match=f"agents of epoch 1.*{column}|JSON"):
        store.record_allocation(1, ts=1.0, columns=columns, **epoch_fields())

    assert store.last_epoch() == 0


def test_store_allocation_needs_one_layout(store: Store) -> None:
    """Test giving both layouts, or neither, is refused and records nothing."""
    fields = allocation()
    with pytest.raises(StoreError, match="one of agents and columns"):
        store.record_allocation(1, columns={"agent": []}, **fields)
    del fields["agents"]
    with pytest.raises(StoreError, match="one of agents and columns"):
        store.record_allocation(1, **fields)

    assert store.last_epoch() == 0


def test_store_empty_file_reads(store: Store) -> None:
    """Test a new file reads as empty rather than failing."""
    assert store.last_epoch() == 0
    assert store.latest_allocation() is None
    assert store.latest_budget() is None
    assert store.learner_states() == {}
    assert store.agents() == []
    assert store.recent_telemetry("robot-1", 5) == []


def test_store_budget_round_trip(store: Store) -> None:
    """Test the latest budget and its alpha are restored."""
    store.record_budget({"compute": 4.0}, alpha=1.0, ts=1.0)
    store.record_budget({"compute": 6.0, "data": 2.0}, alpha=2.0, ts=2.0)

    latest = store.latest_budget()

    assert latest == {
        "ts": 2.0,
        "resources": {"compute": 6.0, "data": 2.0},
        "alpha": 2.0,
    }


def test_store_agents_track_presence_and_acks(path: Path) -> None:
    """Test agent rows follow telemetry, presence and acks; acks never go back."""
    clock = FakeClock(50.0)
    with Store(path, batch_interval=NEVER, clock=clock) as store:
        store.record_telemetry(**telemetry(seq=3, epoch=2, model="resnet18"))
        clock.now = 60.0
        store.record_telemetry(**telemetry(seq=4))
        store.set_agent_state("robot-2", "offline")
        store.record_ack("robot-1", 5)
        store.record_ack("robot-1", 4)
        store.flush()
        clock.now = 70.0
        store.set_agent_state("robot-1", "offline")
        store.flush()

        agents = store.agents()

    assert agents == [
        {
            "agent": "robot-1",
            "model": "resnet18",
            "state": "offline",
            "first_seen": 50.0,
            "last_seen": 60.0,
            "last_seq": 4,
            "last_epoch_acked": 5,
        },
        {
            "agent": "robot-2",
            "model": None,
            "state": "offline",
            "first_seen": 60.0,
            "last_seen": 60.0,
            "last_seq": None,
            "last_epoch_acked": None,
        },
    ]


def test_store_meta_and_fleet(path: Path) -> None:
    """Test meta values persist and a file refuses to serve another fleet."""
    with Store(path, fleet="warehouse") as store:
        store.set_meta("note", "first")
        store.set_meta("note", "second")

    with Store(path) as store:
        assert (store.fleet, store.meta("note"), store.meta("none")) == (
            "warehouse",
            "second",
            None,
        )
    with pytest.raises(StoreError, match="belongs to fleet 'warehouse', not 'farm'"):
        Store(path, fleet="farm")


def test_store_status_summary(store: Store) -> None:
    """Test the status summary counts committed rows and presence."""
    store.record_telemetry(**telemetry())
    store.set_agent_state("robot-2", "offline")
    store.record_allocation(store.next_epoch(), **allocation())
    store.flush()

    status = store.status()

    assert status["fleet"] == "test"
    assert status["schema_version"] == MIGRATIONS[-1].version
    assert status["last_epoch"] == 1
    assert status["agents"] == {"online": 1, "offline": 1}
    assert status["rows"] == {
        "agents": 2,
        "telemetry": 1,
        "learner_state": 0,
        "allocations": 1,
        "budgets": 0,
    }
    assert (status["queued"], status["dropped"], status["failed"]) == (0, 0, 0)
    assert status["file_bytes"] > 0


def test_store_docs_example_runs(path: Path) -> None:
    """Test the example at the top of docs/state.md runs as written."""
    text = (REPO / "docs" / "state.md").read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]

    exec(compile(example, "docs/state.md", "exec"), {"path": path})

    with Store(path, read_only=True) as store:
        assert store.fleet == "warehouse"


# -- refusals ------------------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [{"scale": math.nan}, {"scale": math.inf}, {"fit": object()}],
    ids=["nan", "inf", "object"],
)
def test_store_refuses_non_json_learner_state(
    path: Path, state: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Test a state that would not read back as JSON is refused, logged, counted."""
    logger = logging.getLogger("test.store.learner")
    with Store(path, logger=logger, batch_interval=NEVER) as store:
        store.save_learner_state("robot-1", state)
        store.save_learner_state("robot-2", {"scale": 0.5})
        store.flush()

        states = store.learner_states()
        failed = store.failed

    assert states == {"robot-2": {"scale": 0.5}}
    assert failed == 1
    assert "refused the learner state of agent robot-1" in caplog.text


def test_store_refuses_calls_after_close(path: Path) -> None:
    """Test a closed store says so instead of failing deep in SQLite."""
    store = Store(path)
    store.close()
    store.close()

    with pytest.raises(StoreError, match="closed"):
        store.record_telemetry(**telemetry())
    with pytest.raises(StoreError, match="closed"):
        store.last_epoch()


def test_store_refuses_a_file_that_is_not_sqlite(path: Path) -> None:
    """Test a file of another kind is refused with a StoreError, untouched."""
    path.write_bytes(b"this is not a database, just forty-odd bytes of text")

    with pytest.raises(StoreError, match="cannot open the state file"):
        Store(path)
    assert path.read_bytes().startswith(b"this is not a database")


def test_store_refuses_a_foreign_database(path: Path) -> None:
    """Test an SQLite file of another application is refused, untouched."""
    with raw(path) as db:
        db.execute("CREATE TABLE notes (body TEXT)")

    with pytest.raises(StoreError, match=r"not a fairsynergy state file.*\(notes\)"):
        Store(path)
    with raw(path) as db:
        assert db.table_names() == ["notes"]
        assert db.journal_mode == "delete"


def test_store_refuses_bad_agent_state(store: Store) -> None:
    """Test presence other than online/offline is refused, naming the agent."""
    with pytest.raises(StoreError, match="agent robot-1 state 'away'"):
        store.set_agent_state("robot-1", "away")


def test_store_read_only_reads_beside_a_writer(path: Path) -> None:
    """Test a read-only store sees committed state and refuses every write."""
    with Store(path, fleet="test") as writer:
        writer.record_telemetry(**telemetry())
        writer.record_allocation(writer.next_epoch(), **allocation())
        writer.flush()

        with Store(path, read_only=True) as reader:
            status = reader.status()
            with pytest.raises(StoreError, match="read-only"):
                reader.record_telemetry(**telemetry())
            with pytest.raises(StoreError, match="read-only"):
                reader.record_allocation(2, **allocation())

    assert (status["fleet"], status["last_epoch"]) == ("test", 1)
    assert status["rows"]["telemetry"] == 1


def test_store_read_only_refuses_other_schemas(path: Path, tmp_path: Path) -> None:
    """Test read-only opening neither upgrades an old file nor creates one."""
    with raw(path) as db:
        migrate(db, MIGRATIONS[:1])

    with pytest.raises(StoreError, match="schema version 1, this fairsynergy reads"):
        Store(path, read_only=True)
    with pytest.raises(StoreError, match="cannot open the state file"):
        Store(tmp_path / "missing.db", read_only=True)
    with raw(path) as db:
        assert schema_version(db) == 1
    assert not (tmp_path / "missing.db").exists()


# -- retention -----------------------------------------------------------------


def test_store_retention_prunes_by_count(path: Path) -> None:
    """Test each agent keeps only its newest rows, other agents untouched."""
    retention = Retention(telemetry_per_agent=5, telemetry_max_age=None)
    with Store(path, retention=retention, batch_interval=NEVER) as store:
        for seq in range(12):
            store.record_telemetry(**telemetry(seq=seq))
        for seq in range(3):
            store.record_telemetry(**telemetry(agent="robot-2", seq=seq))
        store.flush()

        kept = [row["seq"] for row in store.recent_telemetry("robot-1", 100)]
        other = [row["seq"] for row in store.recent_telemetry("robot-2", 100)]

    assert kept == [7, 8, 9, 10, 11]
    assert other == [0, 1, 2]


def test_store_retention_bound_holds_over_many_batches(path: Path) -> None:
    """Test an agent never holds more than its limit plus a tenth, newest kept."""
    retention = Retention(telemetry_per_agent=20, telemetry_max_age=None)
    sizes = []
    with Store(path, retention=retention, batch_interval=NEVER) as store:
        for seq in range(100):
            store.record_telemetry(**telemetry(seq=seq))
            store.flush()
            sizes.append(len(store.recent_telemetry("robot-1", 1000)))

        newest = store.recent_telemetry("robot-1", 1)[0]["seq"]

    assert max(sizes) == 20 + 20 // 10
    assert min(sizes[20:]) == 20
    assert newest == 99


def test_store_retention_prunes_by_age(path: Path) -> None:
    """Test rows received longer ago than the maximum age are deleted."""
    clock = FakeClock(1_000.0)
    retention = Retention(telemetry_per_agent=None, telemetry_max_age=100.0)
    with Store(path, retention=retention, batch_interval=NEVER, clock=clock) as store:
        store.record_telemetry(**telemetry(seq=1))
        store.record_telemetry(**telemetry(agent="robot-2", seq=2))
        store.flush()
        clock.now = 1_080.0
        store.record_telemetry(**telemetry(seq=3))
        store.flush()
        clock.now = 1_150.0
        store.record_telemetry(**telemetry(seq=4))
        store.flush()

        seqs = [row["seq"] for row in store.recent_telemetry("robot-1", 100)]
        others = store.recent_telemetry("robot-2", 100)

    assert seqs == [3, 4]
    assert others == []


def test_store_retention_keeps_newest_allocations(path: Path) -> None:
    """Test old allocations are pruned by count and the last epoch survives."""
    retention = Retention(allocations_kept=2)
    with Store(path, retention=retention) as store:
        for _ in range(5):
            store.record_allocation(store.next_epoch(), **allocation())

        kept = [epoch for epoch in range(1, 6) if store.allocation(epoch)]

    assert kept == [4, 5]
    with Store(path) as store:
        assert store.next_epoch() == 6


def test_store_retention_refuses_nonsense() -> None:
    """Test a retention limit that is not a positive number is refused."""
    with pytest.raises(StoreError, match="telemetry_per_agent is 0"):
        Retention(telemetry_per_agent=0)
    with pytest.raises(StoreError, match="telemetry_max_age is nan"):
        Retention(telemetry_max_age=math.nan)


# -- migrations ----------------------------------------------------------------


def migration_rows(path: Path) -> list[tuple[int, str, float]]:
    """The migrations table of a file."""
    with raw(path) as db:
        sql = "SELECT version, name, applied_at FROM migrations ORDER BY version"
        return [tuple(row) for row in db.execute(sql).fetchall()]


def test_store_migrations_applied_once(path: Path) -> None:
    """Test each migration is applied and recorded once, however often opened."""
    Store(path, clock=FakeClock(1.0)).close()
    first = migration_rows(path)

    Store(path, clock=FakeClock(2.0)).close()
    second = migration_rows(path)

    assert first == [(m.version, m.name, 1.0) for m in MIGRATIONS]
    assert second == first
    with raw(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == MIGRATIONS[-1].version


def test_store_upgrades_a_v1_file(path: Path) -> None:
    """Test a file at schema 1 is upgraded on open and keeps its rows."""
    with raw(path) as db:
        migrate(db, MIGRATIONS[:1], clock=FakeClock(1.0))
        db.table("telemetry").insert(
            telemetry(seq=5, local="{}", cloud="{}", received_at=5.0)
        )
        db.table("allocations").insert({"epoch": 3, "ts": 1.0, **allocation()})
        assert schema_version(db) == 1

    with Store(path, clock=FakeClock(2.0)) as store:
        rows = store.recent_telemetry("robot-1", 10)
        epoch = store.next_epoch()
        upgraded = store.allocation(3)
        plan = store._db().execute(
            "EXPLAIN QUERY PLAN DELETE FROM telemetry WHERE received_at < 1"
        )
        detail = " ".join(row[3] for row in plan)

    assert [(row["seq"], row["local"]) for row in rows] == [(5, {})]
    assert epoch == 4
    assert "telemetry_by_received_at" in detail
    assert migration_rows(path) == [
        (1, "create_tables", 1.0),
        (2, "index_telemetry_received_at", 2.0),
        (3, "allocation_layout", 2.0),
    ]
    assert upgraded == {"epoch": 3, "ts": 1.0, **allocation()}


def test_store_refuses_newer_schema(path: Path) -> None:
    """Test a file written by a newer schema is refused, naming both versions."""
    Store(path).close()
    with raw(path) as db:
        db.execute("INSERT INTO migrations VALUES (99, 'from_the_future', 0.0)")

    latest = MIGRATIONS[-1].version
    with pytest.raises(StoreError, match=f"schema version 99.*up to {latest}"):
        Store(path)


def test_store_refuses_foreign_history(path: Path) -> None:
    """Test a file whose migration names differ from ours is refused."""
    Store(path).close()
    with raw(path) as db:
        db.execute("UPDATE migrations SET name = 'something_else' WHERE version = 2")

    with pytest.raises(StoreError, match="records migration 2 as 'something_else'"):
        Store(path)


def test_store_failed_migration_rolls_back(path: Path) -> None:
    """Test a failing migration leaves no trace and the file at its old version."""
    version = MIGRATIONS[-1].version + 1
    broken = Migration(
        version, "broken", ("CREATE TABLE extra (a)", "CREATE TABLE extra (a)")
    )
    Store(path).close()

    with raw(path) as db:
        with pytest.raises(StoreError, match=rf"migration {version} \(broken\)"):
            migrate(db, (*MIGRATIONS, broken))
        tables = db.table_names()
        version = schema_version(db)

    assert "extra" not in tables
    assert version == MIGRATIONS[-1].version


# -- epochs --------------------------------------------------------------------


def test_store_epochs_increase_across_reopen(path: Path) -> None:
    """Test next_epoch() exceeds every recorded epoch after close and reopen."""
    with Store(path) as store:
        first = store.next_epoch()
        store.record_allocation(first, **allocation())
        unrecorded = store.next_epoch()

    with Store(path) as store:
        again = store.next_epoch()
        store.record_allocation(again, **allocation())
    with Store(path) as store:
        last = store.last_epoch()
        after = store.next_epoch()

    assert (first, unrecorded) == (1, 2)
    assert again == 2
    assert (last, after) == (2, 3)


def test_store_refuses_an_epoch_that_does_not_grow(store: Store) -> None:
    """Test recording an epoch at or below the last one is refused."""
    store.record_allocation(5, **allocation())

    with pytest.raises(StoreError, match=r"epoch 5 is not greater than .* 5"):
        store.record_allocation(5, **allocation())
    with pytest.raises(StoreError, match="epoch 0 is not a positive integer"):
        store.record_allocation(0, **allocation())
    assert store.next_epoch() == 6


def test_store_next_epoch_unique_across_threads(store: Store) -> None:
    """Test concurrent callers of next_epoch() never get the same epoch."""
    taken: list[int] = []

    def take() -> None:
        for _ in range(200):
            taken.append(store.next_epoch())

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(taken) == list(range(1, 801))


CRASHING_DAEMON = """
import sys
from controller.store import Store

store = Store(sys.argv[1], batch_interval=0.01)
round = 0
while True:
    round += 1
    for k in range(50):
        store.record_telemetry(
            f"robot-{k % 5}", seq=round * 50 + k, ts=1.0, accuracy=0.5,
            local={"compute": 1.0}, cloud={"compute": 1.0}, epoch=round,
        )
    if round == 5:
        store.flush()
        print("flushed", flush=True)
    epoch = store.next_epoch()
    store.record_allocation(
        epoch, trigger="timer", alpha=1.0, budget={"compute": 1.0},
        prices={"compute": 1.0}, agents={"robot-0": {"cloud": {"compute": 1.0}}},
    )
    print(epoch, flush=True)
"""


def test_store_crash_keeps_recorded_epochs(path: Path, tmp_path: Path) -> None:
    """Test SIGKILL mid-write loses no recorded epoch nor flushed telemetry."""
    script = tmp_path / "daemon.py"
    script.write_text(textwrap.dedent(CRASHING_DAEMON))
    env = os.environ | {"PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    lines: list[str] = []
    while not lines or lines[-1] != "30":
        line = child.stdout.readline().strip()
        assert line, f"daemon exited early: {child.communicate()[1][-2000:]}"
        lines.append(line)

    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=10)

    with Store(path) as store:
        last = store.last_epoch()
        recorded = store.allocation(30)
        after = store.next_epoch()
        rows = store.counts()["telemetry"]
        check = store._db().execute("PRAGMA integrity_check").fetchone()[0]
    assert child.returncode == -signal.SIGKILL
    assert "flushed" in lines
    assert last >= 30
    assert recorded is not None
    assert after == last + 1
    assert rows >= 5 * 50
    assert check == "ok"


# -- batching ------------------------------------------------------------------


def test_store_rows_wait_for_a_batch(store: Store) -> None:
    """Test queued rows reach the file in a batch, at the latest on flush()."""
    store.record_telemetry(**telemetry())
    store.save_learner_state("robot-1", {"scale": 1.0})

    before = store.counts()
    queued = store.queued
    store.flush()
    after = store.counts()

    assert (before["telemetry"], before["learner_state"], queued) == (0, 0, 3)
    assert (after["telemetry"], after["learner_state"], store.queued) == (1, 1, 0)


def test_store_writer_commits_without_flush(path: Path) -> None:
    """Test the writer commits on its own once the batch interval passes."""
    with Store(path, batch_interval=0.02) as store:
        store.record_telemetry(**telemetry())

        wait_for(lambda: store.counts()["telemetry"] == 1)

        assert store.queued == 0


def test_store_learner_states_wait_for_their_interval(path: Path) -> None:
    """Test learner states are written at most once per interval, or on flush."""
    with Store(path, batch_interval=0.01, learner_interval=NEVER) as store:
        store.save_learner_state("robot-1", {"n": 1})
        store.record_telemetry(**telemetry(seq=1))
        wait_for(lambda: store.counts()["telemetry"] == 1)
        first = store.learner_states()

        store.save_learner_state("robot-1", {"n": 2})
        # Let the writer fall asleep with only a learner state queued: the
        # next telemetry row must still wake it within the batch interval.
        time.sleep(0.05)
        store.record_telemetry(**telemetry(seq=2))
        wait_for(lambda: store.counts()["telemetry"] == 2, timeout=5.0)
        held = store.learner_states()
        store.flush()
        flushed = store.learner_states()

    assert first == {"robot-1": {"n": 1}}
    assert held == first
    assert flushed == {"robot-1": {"n": 2}}


def test_store_batches_writes_from_threads(path: Path) -> None:
    """Test writes from several threads all arrive, in order per agent."""
    per_thread = 500
    with Store(path, batch_rows=64, batch_interval=0.005) as store:

        def produce(agent: str) -> None:
            for seq in range(per_thread):
                store.record_telemetry(**telemetry(agent=agent, seq=seq))
                store.save_learner_state(agent, {"seq": seq})

        agents = [f"robot-{n}" for n in range(4)]
        threads = [threading.Thread(target=produce, args=(a,)) for a in agents]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        store.flush()

        counts = store.counts()
        seqs = {
            a: [r["seq"] for r in store.recent_telemetry(a, 10_000)] for a in agents
        }
        states = store.learner_states()

    assert counts["telemetry"] == 4 * per_thread
    assert all(seq == list(range(per_thread)) for seq in seqs.values())
    assert states == {agent: {"seq": per_thread - 1} for agent in agents}


def test_store_close_writes_what_is_queued(path: Path) -> None:
    """Test close() commits the queue, so a clean shutdown loses nothing."""
    store = Store(path, batch_interval=NEVER)
    store.record_telemetry(**telemetry())
    store.save_learner_state("robot-1", {"scale": 1.0})

    store.close()

    with Store(path) as reopened:
        assert reopened.counts()["telemetry"] == 1
        assert reopened.learner_states() == {"robot-1": {"scale": 1.0}}


@pytest.mark.parametrize(("durable", "level"), [(True, 2), (False, 1)])
def test_store_durable_sets_synchronous(path: Path, durable: bool, level: int) -> None:
    """Test durable=True makes the callers' commits FULL (fsync), else NORMAL."""
    with Store(path, durable=durable) as store:
        found = store._db().execute("PRAGMA synchronous").fetchone()[0]
        mode = store._db().journal_mode

    assert (found, mode) == (level, "wal")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_rows": 0}, "batch_rows is 0"),
        ({"batch_interval": 0.0}, "batch_interval is 0.0"),
        ({"queue_limit": 0}, "queue_limit is 0"),
    ],
)
def test_store_refuses_nonsense_batching(
    path: Path, options: dict[str, Any], message: str
) -> None:
    """Test batching settings that would stall or spin the writer are refused."""
    with pytest.raises(StoreError, match=message):
        Store(path, **options)


def test_store_queue_overflow_drops_oldest_telemetry(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Test a full queue drops the oldest telemetry only, counts and logs it."""
    logger = logging.getLogger("test.store.overflow")
    with Store(
        path, logger=logger, queue_limit=10, batch_rows=10_000, batch_interval=NEVER
    ) as store:
        store.save_learner_state("robot-1", {"scale": 1.0})
        for seq in range(25):
            store.record_telemetry(**telemetry(seq=seq))
        dropped = store.dropped
        store.flush()

        seqs = [row["seq"] for row in store.recent_telemetry("robot-1", 100)]
        states = store.learner_states()

    assert dropped == 15
    assert seqs == list(range(15, 25))
    assert states == {"robot-1": {"scale": 1.0}}
    assert "dropped 15 oldest telemetry rows" in caplog.text


def test_store_bad_row_is_logged_and_writer_continues(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Test a row SQLite refuses costs only itself, is logged and counted."""
    logger = logging.getLogger("test.store.bad_row")
    with Store(path, logger=logger, batch_interval=NEVER) as store:
        store.record_telemetry(**telemetry(seq=0))
        store.record_telemetry(**telemetry(seq=1, accuracy="high"))
        store.record_telemetry(**telemetry(seq=2))
        store.flush()
        store.record_telemetry(**telemetry(seq=3))
        store.flush()

        seqs = [row["seq"] for row in store.recent_telemetry("robot-1", 100)]
        failed = store.failed

    assert seqs == [0, 2, 3]
    assert failed == 1
    assert "refused a telemetry row for agent robot-1" in caplog.text


@pytest.mark.parametrize("local", [{"compute": math.nan}, {"compute": object()}])
def test_store_refuses_telemetry_that_is_not_json(
    store: Store, local: dict[str, Any]
) -> None:
    """Test unserialisable telemetry is refused at the call, naming the agent."""
    with pytest.raises(StoreError, match="telemetry local of agent robot-7 is not"):
        store.record_telemetry(**telemetry(agent="robot-7", local=local))

    store.flush()

    assert store.counts()["telemetry"] == 0


@pytest.mark.parametrize(
    ("seen", "acked", "model"), [(5.0, 3, "b"), (None, None, None), (0.5, 9, None)]
)
def test_store_report_merges_like_an_agent_update(
    seen: float | None, acked: int | None, model: str | None
) -> None:
    """Test the per-report shortcut folds a row in as a full update would."""
    first = AgentUpdate(
        at=2.0, seen=seen, seq=1, model="a", state="offline", acked=acked
    )
    shortcut = dataclasses.replace(first)
    general = dataclasses.replace(first)

    for at, seq, epoch, label in [(1.0, 2, 4, model), (6.0, 3, None, None)]:
        shortcut.merge_report(at, seq, label, epoch)
        general.merge(
            AgentUpdate(
                at=at, seen=at, seq=seq, model=label, state="online", acked=epoch
            )
        )

    assert shortcut == general
