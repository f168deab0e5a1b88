"""The rollout controller's state, in one SQLite file (the standard library's sqlite3; nothing to run).

What survives a kill -9 is what was committed: the rollouts and their specs, every target device with
its wave, its order (the exact signed bytes, so that publishing it again is the same order, idempotent
by its id) and its outcome with the `ts` of the report that gave it (one row: a kill -9 cannot keep one
without the other), the holds, the fleet events, and the leases. The controller writes a wave's
orders here *before* it publishes them (write-ahead), so a restart finds the wave it was starting and
publishes the same orders again, never a new wave twice. WAL mode: `fleet rollout status` reads while
the controller writes; every write is one short `BEGIN IMMEDIATE` transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.cloud.fleet.plan import RolloutSpec

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, request TEXT,
    wave INTEGER NOT NULL DEFAULT -1, wave_started REAL, wave_settled REAL, aborted_at REAL,
    group_order BLOB, created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS targets (
    rollout TEXT NOT NULL, device TEXT NOT NULL, pos INTEGER NOT NULL, wave INTEGER NOT NULL,
    kind TEXT NOT NULL, previous TEXT, state TEXT NOT NULL, reason TEXT, order_id TEXT, payload BLOB,
    rb_order TEXT, rb_payload BLOB, rb_state TEXT, updated REAL, report_ts TEXT,
    PRIMARY KEY (rollout, device)
);
CREATE TABLE IF NOT EXISTS holds (
    model TEXT NOT NULL, version TEXT NOT NULL, reason TEXT NOT NULL, rollout TEXT, since REAL NOT NULL,
    PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, rollout TEXT, device TEXT, type TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);
"""

# A rollout's states: pending (not planned yet), running, paused, aborting (rollback orders out),
# aborted, completing (the group order written ahead), completed.
ACTIVE_STATES = ("pending", "running", "paused", "aborting", "completing")
TARGET_COLUMNS = (
    *("device", "pos", "wave", "kind", "previous", "state", "reason", "order_id", "payload"),
    *("rb_order", "rb_payload", "rb_state", "report_ts"),
)


@dataclass
class Rollout:
    id: str
    spec: RolloutSpec
    state: str
    reason: str | None
    request: str | None  # pause | resume | abort, asked by `fleet rollout` and not yet acted on
    wave: int  # the wave last started (-1: none yet)
    wave_started: float | None
    wave_settled: float | None  # when every device of the current wave had an outcome
    aborted_at: float | None
    group_order: bytes | None
    created: float


@dataclass
class Target:
    """One device of a rollout: its place in the plan, its order, its outcome, and its rollback."""

    device: str
    pos: int
    wave: int
    kind: str
    previous: str | None  # the version it ran when planned: where a rollback takes it
    state: str  # planned | ordered | passed | failed | timed-out
    reason: str | None
    order_id: str | None
    payload: bytes | None
    rb_order: str | None = None
    rb_payload: bytes | None = None
    rb_state: str | None = None  # ordered | done | withdrawn
    report_ts: str | None = None  # the `ts` of the last report counted on its order: an older one is a replay


class StateDB:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # a process killed loses nothing committed (WAL)
        self.db.executescript(SCHEMA)
        with self.tx() as db:  # a state file from before `report_ts` gets the column (its value: none yet)
            if "report_ts" not in {row[1] for row in db.execute("PRAGMA table_info(targets)")}:
                db.execute("ALTER TABLE targets ADD COLUMN report_ts TEXT")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---- rollouts --------------------------------------------------------------------------------

    def add_rollout(self, rollout_id: str, spec: RolloutSpec) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute(
                "INSERT INTO rollouts (id, spec, state, created, updated) VALUES (?, ?, 'pending', ?, ?)",
                (rollout_id, json.dumps(spec.to_json()), now, now),
            )

    def rollouts(self, states: Iterable[str] | None = None) -> list[Rollout]:
        rows = self.db.execute(
            "SELECT id, spec, state, reason, request, wave, wave_started, wave_settled, aborted_at, group_order, "
            "created FROM rollouts ORDER BY created"
        ).fetchall()
        wanted = set(states) if states is not None else None
        return [
            Rollout(r[0], RolloutSpec.from_json(json.loads(r[1])), *r[2:])
            for r in rows
            if wanted is None or r[2] in wanted
        ]

    def rollout(self, rollout_id: str) -> Rollout | None:
        return next((r for r in self.rollouts() if r.id == rollout_id), None)

    def update_rollout(self, db: sqlite3.Connection, rollout_id: str, **fields: object) -> None:
        """Within a transaction: set these columns."""
        names = ", ".join(f"{k} = ?" for k in fields)
        db.execute(
            f"UPDATE rollouts SET {names}, updated = ? WHERE id = ?", (*fields.values(), time.time(), rollout_id)
        )

    def request(self, rollout_id: str, action: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE rollouts SET request = ?, updated = ? WHERE id = ?", (action, time.time(), rollout_id))

    # ---- targets ----------------------------------------------------------------------------------

    def add_targets(self, db: sqlite3.Connection, rollout_id: str, targets: Iterable[Target]) -> None:
        db.executemany(
            f"INSERT INTO targets (rollout, {', '.join(TARGET_COLUMNS)}) VALUES (?{', ?' * len(TARGET_COLUMNS)})",
            [(rollout_id, *(getattr(t, c) for c in TARGET_COLUMNS)) for t in targets],
        )

    def targets(self, rollout_id: str) -> list[Target]:
        rows = self.db.execute(
            f"SELECT {', '.join(TARGET_COLUMNS)} FROM targets WHERE rollout = ? ORDER BY pos", (rollout_id,)
        ).fetchall()
        return [Target(*r) for r in rows]

    def save_targets(self, db: sqlite3.Connection, rollout_id: str, targets: Iterable[Target]) -> None:
        """Within a transaction: write back what changes (state, reason, the report's ts, orders, rollback)."""
        now = time.time()
        db.executemany(
            "UPDATE targets SET state = ?, reason = ?, order_id = ?, payload = ?, rb_order = ?, rb_payload = ?, "
            "rb_state = ?, report_ts = ?, updated = ? WHERE rollout = ? AND device = ?",
            [
                (
                    t.state,
                    t.reason,
                    t.order_id,
                    t.payload,
                    t.rb_order,
                    t.rb_payload,
                    t.rb_state,
                    t.report_ts,
                    now,
                    rollout_id,
                    t.device,
                )
                for t in targets
            ],
        )

    # ---- holds and events -------------------------------------------------------------------------

    def hold(self, db: sqlite3.Connection, model: str, version: str, reason: str, rollout_id: str | None) -> None:
        db.execute(
            "INSERT OR REPLACE INTO holds (model, version, reason, rollout, since) VALUES (?, ?, ?, ?, ?)",
            (model, version, reason, rollout_id, time.time()),
        )

    def held(self, model: str, version: str) -> str | None:
        row = self.db.execute("SELECT reason FROM holds WHERE model = ? AND version = ?", (model, version)).fetchone()
        return row[0] if row else None

    def holds(self) -> list[tuple[str, str, str, str | None, float]]:
        return self.db.execute("SELECT model, version, reason, rollout, since FROM holds ORDER BY since").fetchall()

    def release(self, model: str, version: str) -> bool:
        with self.tx() as db:
            return db.execute("DELETE FROM holds WHERE model = ? AND version = ?", (model, version)).rowcount > 0

    def event(
        self, rollout_id: str | None, device: str | None, type_: str, reason: str, replaces: int | None = None
    ) -> int:
        """Record a fleet event; returns its id. `replaces`: an event of before that this one supersedes, in the
        same transaction (a count that goes on growing stays one row, listed as the latest)."""
        with self.tx() as db:
            if replaces is not None:
                db.execute("DELETE FROM events WHERE id = ?", (replaces,))
            row = db.execute(
                "INSERT INTO events (ts, rollout, device, type, reason) VALUES (?, ?, ?, ?, ?)",
                (time.time(), rollout_id, device, type_, reason),
            ).lastrowid
        assert row is not None  # an INSERT sets it
        return row

    def events(self, rollout_id: str | None = None, limit: int = 50) -> list[tuple[float, str | None, str, str]]:
        """The latest fleet events (of one rollout, or every one), oldest first: (ts, device, type, reason)."""
        where, args = ("WHERE rollout = ?", (rollout_id,)) if rollout_id else ("", ())
        rows = self.db.execute(
            f"SELECT ts, device, type, reason FROM events {where} ORDER BY id DESC LIMIT ?", (*args, limit)
        ).fetchall()
        return list(reversed(rows))

    # ---- the same-host lease -------------------------------------------------------------------------

    def take_lease(self, name: str, owner: str, ttl: float, dead: Callable[[str], bool]) -> str | None:
        """Take or renew the lease; None when this owner holds it now, else the owner that does (one whose
        process `dead` says is gone loses it at once)."""
        now = time.time()
        with self.tx() as db:
            row = db.execute("SELECT owner, expires FROM leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != owner and row[1] > now and not dead(str(row[0])):
                return str(row[0])
            db.execute(
                "INSERT OR REPLACE INTO leases (name, owner, expires) VALUES (?, ?, ?)", (name, owner, now + ttl)
            )
        return None

    def drop_lease(self, name: str, owner: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))
