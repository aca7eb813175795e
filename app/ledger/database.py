"""The SQL archive: engine, migrations, and the few statements the drainer and export need.

Every method here is synchronous (SQLAlchemy Core on a pooled engine) and is called from a
worker thread (``asyncio.to_thread``), never on the event loop of a serving process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url

from app.ledger.schema import (
    MIGRATIONS,
    archive_identity,
    ledger_entries,
    ledger_progress,
    schema_migrations,
)

log = logging.getLogger("falgate.ledger")

#: Stream entry fields that have a column of their own; anything else goes to ``extra``.
COLUMN_FIELDS = frozenset(
    (
        "event", "key_id", "request_id", "upstream_request_id", "model", "operation", "pixels",
        "amount_micro", "released_micro", "hold_micro", "reason", "ts_ms", "process_id", "images",
    )
)  # fmt: skip

_MIGRATION_LOCK = 0x66616C67  # "falg": the PostgreSQL advisory lock of the migrations


def database_url(configured: str | None, data_dir: Path) -> str:
    """The SQLAlchemy URL: ``postgresql://`` is driven by psycopg 3; default SQLite file."""
    if not configured:
        return f"sqlite:///{(Path(data_dir) / 'ledger.sqlite3').resolve()}"
    for prefix in ("postgresql://", "postgres://"):
        if configured.startswith(prefix):
            return "postgresql+psycopg://" + configured[len(prefix) :]
    return configured


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class Progress:
    """How far one key's stream is archived (the last archived stream id)."""

    ms: int
    seq: int

    @property
    def entry_id(self) -> str:
        return f"{self.ms}-{self.seq}"


#: One archived row as the export reads it, in column order of ``ROW_COLUMNS``.
Row = tuple[Any, ...]
ROW_COLUMNS = (
    "id_ms", "key_id", "id_seq", "entry_id", "event", "request_id", "upstream_request_id",
    "model", "operation", "pixels", "amount_micro", "released_micro", "hold_micro", "reason",
    "ts_ms", "process_id", "images",
)  # fmt: skip


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def decoded(fields: Mapping[Any, Any]) -> Mapping[str, str]:
    """Stream entry fields as ``str`` (gateway clients decode replies already)."""
    if not fields or isinstance(next(iter(fields)), str):
        return fields
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in fields.items()
    }


#: The columns an archived entry is inserted with: ``ROW_COLUMNS`` and ``extra``.
INSERT_COLUMNS = (*ROW_COLUMNS, "extra")


def row_from_stream(key_id: str, entry_id: str, fields: Mapping[str, str]) -> Row:
    """A stream entry as a row of ``INSERT_COLUMNS`` (its first ``len(ROW_COLUMNS)`` values
    are the export's row)."""
    ms, _, seq_text = entry_id.partition("-")
    get = fields.get
    extra = None
    if len(fields.keys() - COLUMN_FIELDS):
        extra = json.dumps(
            {k: v for k, v in fields.items() if k not in COLUMN_FIELDS}, sort_keys=True
        )
    return (
        int(ms), key_id, int(seq_text or 0), entry_id, get("event", ""), get("request_id", ""),
        get("upstream_request_id") or None, get("model", ""), get("operation", ""),
        int(get("pixels") or 0), int(get("amount_micro") or 0),
        _int_or_none(get("released_micro")), _int_or_none(get("hold_micro")),
        get("reason", ""), int(get("ts_ms") or ms), get("process_id", ""),
        _int_or_none(get("images")), extra,
    )  # fmt: skip


class LedgerDatabase:
    """The archive database (SQLite file or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._migrated = False
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                _private_file(Path(parsed.database))
            self.engine: Engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}
            )
            _sqlite_transactions(self.engine)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)
        columns = ", ".join(INSERT_COLUMNS)
        if self.dialect == "postgresql":
            marks = ", ".join(["%s"] * len(INSERT_COLUMNS))
            self._insert_entries = (
                f"INSERT INTO ledger_entries ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING"
            )
        else:
            marks = ", ".join(["?"] * len(INSERT_COLUMNS))
            self._insert_entries = (
                f"INSERT OR IGNORE INTO ledger_entries ({columns}) VALUES ({marks})"
            )

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (SQLite: ``BEGIN IMMEDIATE``, so writers queue instead of
        failing when a reader's snapshot goes stale)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(falgate_immediate=True)
            with conn.begin():
                yield conn

    # --- migrations ---------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply every migration not yet applied; returns the versions applied now."""
        applied: list[int] = []
        for migration in MIGRATIONS:
            with self._write() as conn:
                if self.dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
                schema_migrations.create(conn, checkfirst=True)
                done = conn.execute(
                    select(schema_migrations.c.version).where(
                        schema_migrations.c.version == migration.version
                    )
                ).first()
                if done is not None:
                    continue
                migration.apply(conn)
                conn.execute(
                    insert(schema_migrations).values(
                        version=migration.version,
                        name=migration.name,
                        applied_ms=int(time.time() * 1000),
                    )
                )
                applied.append(migration.version)
        if applied:
            log.info("ledger archive migrated", extra={"versions": applied})
        self._migrated = True
        return applied

    def ensure_migrated(self) -> None:
        """Migrate once per process (the gateway starts even while the archive is down; the
        drainer and the reports migrate when it is back)."""
        if not self._migrated:
            self.migrate()

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.max(schema_migrations.c.version))).scalar() or 0)

    def archive_id(self) -> str:
        with self.engine.connect() as conn:
            return str(conn.execute(select(archive_identity.c.archive_id)).scalar_one())

    # --- drainer -------------------------------------------------------------------------

    def progress(self) -> dict[str, Progress]:
        """Every key's archive progress."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    ledger_progress.c.key_id, ledger_progress.c.last_ms, ledger_progress.c.last_seq
                )
            ).all()
        return {key: Progress(int(ms), int(seq)) for key, ms, seq in rows}

    def archive(self, batches: Mapping[str, Sequence[tuple[str, Mapping[str, str]]]]) -> int:
        """Insert stream entries (per key, in stream order) and advance each key's progress,
        in ONE transaction. Entries already archived are ignored (primary key). Returns the
        number of rows offered."""
        rows = [
            row_from_stream(key_id, entry_id, fields)
            for key_id, entries in batches.items()
            for entry_id, fields in entries
        ]
        if not rows:
            return 0
        now_ms = int(time.time() * 1000)
        dialect_insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        progress_rows = []
        for key_id, entries in batches.items():
            if not entries:
                continue
            ms, seq = parse_entry_id(entries[-1][0])
            progress_rows.append(
                {
                    "key_id": key_id,
                    "last_ms": ms,
                    "last_seq": seq,
                    "entries": len(entries),
                    "updated_ms": now_ms,
                }
            )
        progress_stmt = dialect_insert(ledger_progress)
        excluded = progress_stmt.excluded
        progress_stmt = progress_stmt.on_conflict_do_update(
            index_elements=[ledger_progress.c.key_id],
            set_={
                "last_ms": excluded.last_ms,
                "last_seq": excluded.last_seq,
                "entries": ledger_progress.c.entries + excluded.entries,
                "updated_ms": excluded.updated_ms,
            },
            # Progress only moves forward, even if two drainers ever overlapped.
            where=tuple_(ledger_progress.c.last_ms, ledger_progress.c.last_seq)
            < tuple_(excluded.last_ms, excluded.last_seq),
        )
        with self._write() as conn:
            # Tuples through the driver's own executemany: SQLAlchemy's per-value processing
            # of dicts cost more than the database's work.
            conn.exec_driver_sql(self._insert_entries, rows)
            conn.execute(progress_stmt, progress_rows)
        return len(rows)

    # --- reading -------------------------------------------------------------------------

    def page(
        self,
        *,
        after: tuple[int, str, int] | None,
        key_id: str | None,
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
    ) -> list[Row]:
        """Archived entries in export order ``(id_ms, key_id, id_seq)``, strictly after
        ``after``; one keyset page."""
        t = ledger_entries.c
        columns = [getattr(t, name) for name in ROW_COLUMNS]
        query = select(*columns)
        conditions = []
        if key_id is not None:
            conditions.append(t.key_id == key_id)
            if after is not None:
                ms, key, seq = after
                if key < key_id:
                    conditions.append(t.id_ms >= ms)
                elif key == key_id:
                    conditions.append(tuple_(t.id_ms, t.id_seq) > tuple_(ms, seq))
                else:
                    conditions.append(t.id_ms > ms)
            query = query.order_by(t.id_ms, t.id_seq)
        else:
            if after is not None:
                ms, key, seq = after
                # Spelled out rather than a 3-wide row comparison: both databases use the
                # order index for this form.
                conditions.append(
                    or_(
                        t.id_ms > ms,
                        and_(
                            t.id_ms == ms,
                            or_(t.key_id > key, and_(t.key_id == key, t.id_seq > seq)),
                        ),
                    )
                )
                conditions.append(t.id_ms >= ms)
            query = query.order_by(t.id_ms, t.key_id, t.id_seq)
        if start_ms is not None:
            conditions.append(t.id_ms >= start_ms)
        if end_ms is not None:
            conditions.append(t.id_ms < end_ms)
        if conditions:
            query = query.where(and_(*conditions))
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(query.limit(limit))]

    def latest(self, key_id: str, limit: int) -> list[Row]:
        """The key's newest archived entries, newest first."""
        t = ledger_entries.c
        query = (
            select(*[getattr(t, name) for name in ROW_COLUMNS])
            .where(t.key_id == key_id)
            .order_by(t.id_ms.desc(), t.id_seq.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(query)]

    def count(self, key_id: str | None = None) -> int:
        query = select(func.count()).select_from(ledger_entries)
        if key_id is not None:
            query = query.where(ledger_entries.c.key_id == key_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)


def _private_file(path: Path) -> None:
    """The SQLite file, created (or made) readable by this user only: SQLite gives its -wal and
    -shm files the database file's permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


def _sqlite_transactions(engine: Engine) -> None:
    """pysqlite's own transaction handling begins late and cannot ``BEGIN IMMEDIATE``; take it
    over (SQLAlchemy's documented recipe) and use WAL so readers never block the drainer."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("falgate_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
