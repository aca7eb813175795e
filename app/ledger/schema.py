"""The archive's tables and the migrations that create them.

Migrations are a short ordered list of functions and a ``falgate_schema_migrations`` table
recording which ran, not Alembic: the schema is three tables, it is migrated by the gateway at
startup and by ``falgate ledger migrate`` with no configuration file, and every step must run
on SQLite and PostgreSQL alike. Each step runs in its own transaction under a lock (a
PostgreSQL advisory lock, SQLite's ``BEGIN IMMEDIATE``), so processes starting together apply
it once.

``ledger_entries`` - one row per ledger entry, exactly once (primary key: key id + stream id).
Columns, for an analyst:

=======================  ================================================================
column                   meaning
=======================  ================================================================
``key_id``               the gateway key (``falgate keys list`` names it)
``entry_id``             the Redis stream id (``<ms>-<seq>``) the entry had; unique per key
``id_ms``, ``id_seq``    the two halves of ``entry_id`` as numbers (server time of the
                         append in ms since the epoch, and a sequence within that ms)
``event``                ``hold`` | ``settle`` | ``release`` (and any later hold state)
``request_id``           the gateway's request id (``X-Request-Id``)
``upstream_request_id``  fal's request id, when known
``model``                catalog model id (``fal-ai/flux/dev``, ``topaz`` ...)
``operation``            ``generate`` | ``transform`` | ``upscale``
``pixels``               output pixels (held estimate for ``hold``; produced for ``settle``)
``amount_micro``         micro-dollars: held (hold), charged (settle), released (release)
``released_micro``       settle only: the part of the hold given back
``hold_micro``           settle/release: the amount that was held
``reason``               why a hold was resolved (``completed``, ``upstream_error`` ...)
``ts_ms``                when, ms since the epoch (Redis server time)
``process_id``           the gateway process that wrote it
``images``               settle only: how many images were produced
``extra``                any other fields of the entry, as a JSON object (or NULL)
=======================  ================================================================

Spend per key and UTC day, for example::

    SELECT key_id, date(ts_ms / 1000, 'unixepoch') AS day, sum(amount_micro) / 1e6 AS usd
    FROM ledger_entries WHERE event = 'settle' GROUP BY key_id, day;             -- SQLite
    SELECT key_id, to_timestamp(ts_ms / 1000)::date AS day, sum(amount_micro) / 1e6 AS usd
    FROM ledger_entries WHERE event = 'settle' GROUP BY key_id, day;             -- PostgreSQL

``falgate_archive`` - this archive's random identity (the drainer refuses to drain one Redis
into two archives).

``ledger_progress`` - per key, the last stream id archived (``last_ms``/``last_seq``) and the
number of entries offered to it; written in the same transaction as the entries, so a
crash mid-batch leaves both as they were.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()


def _key_type() -> String:
    # Byte order on every database (PostgreSQL's default collation is the locale's), so SQL's
    # ORDER BY key_id agrees with Python's and the export can merge the archive with Redis.
    return String(64).with_variant(String(64, collation="C"), "postgresql")


ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("key_id", _key_type(), primary_key=True),
    Column("entry_id", String(48), primary_key=True),
    Column("id_ms", BigInteger, nullable=False),
    Column("id_seq", BigInteger, nullable=False),
    Column("event", String(32), nullable=False),
    Column("request_id", String(160), nullable=False),
    Column("upstream_request_id", String(200)),
    Column("model", String(200), nullable=False),
    Column("operation", String(32), nullable=False),
    Column("pixels", BigInteger, nullable=False),
    Column("amount_micro", BigInteger, nullable=False),
    Column("released_micro", BigInteger),
    Column("hold_micro", BigInteger),
    Column("reason", String(200), nullable=False),
    Column("ts_ms", BigInteger, nullable=False),
    Column("process_id", String(64), nullable=False),
    Column("images", BigInteger),
    Column("extra", Text),
)
Index("ix_ledger_entries_order", ledger_entries.c.id_ms, ledger_entries.c.key_id,
      ledger_entries.c.id_seq)  # fmt: skip
Index("ix_ledger_entries_key_order", ledger_entries.c.key_id, ledger_entries.c.id_ms,
      ledger_entries.c.id_seq)  # fmt: skip

ledger_progress = Table(
    "ledger_progress",
    metadata,
    Column("key_id", _key_type(), primary_key=True),
    Column("last_ms", BigInteger, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("entries", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

#: One row: this archive's identity (a random id), recorded in Redis by the drainer.
archive_identity = Table(
    "falgate_archive",
    metadata,
    Column("archive_id", String(64), primary_key=True),
    Column("created_ms", BigInteger, nullable=False),
)

schema_migrations = Table(
    "falgate_schema_migrations",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("name", String(200), nullable=False),
    Column("applied_ms", BigInteger, nullable=False),
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Connection], None]


def _v1_ledger_tables(conn: Connection) -> None:
    for table in (ledger_entries, ledger_progress, archive_identity):
        table.create(conn, checkfirst=True)
    conn.execute(
        archive_identity.insert().values(
            archive_id=uuid.uuid4().hex, created_ms=int(time.time() * 1000)
        )
    )


#: Append only; never edit a released step (add a new one).
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "ledger_entries and ledger_progress", _v1_ledger_tables),
)
