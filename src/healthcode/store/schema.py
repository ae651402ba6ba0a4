"""The store's tables: their DDL, the schema version, and the migration of older stores in place.

Layout (created on open when missing; ``schema_version`` records it):

* ``persons`` one row per person, the SPEC §3 scalars and ``updated_at``.
* ``nat_results`` append-only NAT history ``(person_id, sample_time, report_time)``; ``sample_time`` may be null.
* ``entries`` checkpoint scans ``(person_id, t)``; ``visits`` county-days ``(person_id, region, day)``.
* ``risk_lists``, ``policies`` every loaded version's text; ``admin_log`` who changed what (risk list, policy,
  re-evaluation) and when.
* ``change_log`` every published status change in ``seq`` order, the record of the published statuses;
  ``publishes`` the risk-list version and ``as_of`` of each publish (the range of ``seq`` it appended); ``statuses``
  / ``checkpoint`` a checkpoint of them (see :mod:`healthcode.store.journal`).

**Instants are stored as BIGINT epoch seconds** (SPEC §2: sub-second input floored), never as TIMESTAMPTZ, so the
store's arithmetic is the SPEC's integer arithmetic; ``visits.day`` is a DATE (the local date, as Arrow date32).

**No population table has an index** (schema 3).  A person is one row and an event (all its columns) is stored
once, as before, but the writers make sure of it rather than a unique index per table, which cost most of the
store's size and load time (an ART index over every event): events belong to one person, so only the events of
persons already stored can be replays, and those are checked against the in-memory view (the server) or with an
anti-join against the table (:mod:`healthcode.store.writes`, :mod:`healthcode.store.load`; docs/store.md says
what this promises).
"""

from __future__ import annotations

import duckdb

from healthcode.errors import StoreError
from healthcode.store.connection import Connection, first_line, one

SCHEMA_VERSION = 4

_DDL = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS persons (
    person_id UBIGINT NOT NULL,
    home_region INTEGER NOT NULL,
    registered_commuter BOOLEAN NOT NULL,
    base_color TINYINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS nat_results (
    person_id UBIGINT NOT NULL,
    sample_time BIGINT,
    report_time BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    person_id UBIGINT NOT NULL,
    t BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS visits (
    person_id UBIGINT NOT NULL,
    region INTEGER NOT NULL,
    day DATE NOT NULL
);
CREATE TABLE IF NOT EXISTS risk_lists (
    version BIGINT PRIMARY KEY,
    loaded_at TIMESTAMPTZ NOT NULL,
    csv VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS policies (
    version BIGINT PRIMARY KEY,
    loaded_at TIMESTAMPTZ NOT NULL,
    toml VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS statuses (
    person_id UBIGINT NOT NULL,
    commuter_badge BOOLEAN NOT NULL,
    entry_permitted BOOLEAN NOT NULL,
    reasons USMALLINT NOT NULL,
    risk_list_version BIGINT,
    as_of BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS change_log (
    seq BIGINT USING COMPRESSION uncompressed NOT NULL,
    person_id UBIGINT USING COMPRESSION uncompressed NOT NULL,
    old_state INTEGER USING COMPRESSION uncompressed,
    new_state INTEGER USING COMPRESSION uncompressed NOT NULL
);
CREATE TABLE IF NOT EXISTS publishes (
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    risk_list_version BIGINT,
    as_of BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoint (
    seq BIGINT NOT NULL,
    written_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS admin_log (
    changed_at TIMESTAMPTZ NOT NULL,
    caller VARCHAR NOT NULL,
    action VARCHAR NOT NULL,
    version BIGINT,
    detail VARCHAR
);
"""
#: Schema 1 kept every published status in ``statuses`` (keyed) and numbered the change log by a key; schema 2
#: makes the change log the record and ``statuses`` a checkpoint (both unkeyed: appends cost no index upkeep), and
#: packs a status into one integer in the change log (:func:`pack_state`: a third of the bytes to write).
_MIGRATE_1_TO_2 = """
CREATE TABLE statuses_v2 AS
    SELECT person_id, commuter_badge, entry_permitted, reasons, risk_list_version, as_of FROM statuses;
DROP TABLE statuses;
ALTER TABLE statuses_v2 RENAME TO statuses;
CREATE TABLE change_log_v2 AS
    SELECT seq, person_id,
           CASE WHEN old_badge IS NULL THEN NULL
                ELSE old_badge::INTEGER | (old_entry::INTEGER << 1) | (old_reasons::INTEGER << 2) END AS old_state,
           new_badge::INTEGER | (new_entry::INTEGER << 1) | (new_reasons::INTEGER << 2) AS new_state,
           risk_list_version, as_of
    FROM change_log ORDER BY seq;
DROP TABLE change_log;
ALTER TABLE change_log_v2 RENAME TO change_log;
INSERT INTO checkpoint SELECT coalesce(max(seq), 0), now() FROM change_log;
INSERT INTO schema_version (version) VALUES (2);
"""
#: Schema 2 had a unique index on every population table (persons' primary key, events unique on all columns);
#: schema 3 has none (the writers de-duplicate).  DuckDB cannot drop a constraint, so each table is copied.
_MIGRATE_2_TO_3 = (
    "".join(
        f"""
CREATE TABLE {t}_v3 AS SELECT * FROM {t};
DROP TABLE {t};
ALTER TABLE {t}_v3 RENAME TO {t};"""
        for t in ("persons", "nat_results", "entries", "visits")
    )
    + """
ALTER TABLE persons ALTER COLUMN person_id SET NOT NULL;
ALTER TABLE nat_results ALTER COLUMN person_id SET NOT NULL;
ALTER TABLE nat_results ALTER COLUMN report_time SET NOT NULL;
ALTER TABLE entries ALTER COLUMN person_id SET NOT NULL;
ALTER TABLE entries ALTER COLUMN t SET NOT NULL;
ALTER TABLE visits ALTER COLUMN person_id SET NOT NULL;
ALTER TABLE visits ALTER COLUMN region SET NOT NULL;
ALTER TABLE visits ALTER COLUMN day SET NOT NULL;
INSERT INTO schema_version (version) VALUES (3);
"""
)
#: Schema 3 kept each change's risk-list version and as_of in its change-log row, compressed; schema 4 keeps them
#: once per publish (``publishes``: the range of sequence numbers it appended) and stores the change log
#: uncompressed.  A publish of 1.9M changes wrote 6 columns through DuckDB's compression analysis (~180 ms on this
#: machine); 4 uncompressed columns take about half (measured in docs/benchmarks.md), for ~25 bytes per change on
#: disk instead of ~10.  The islands of equal (version, as_of) in seq order are the publishes.
_MIGRATE_3_TO_4 = """
INSERT INTO publishes
    SELECT min(seq), max(seq), risk_list_version, as_of FROM (
        SELECT seq, risk_list_version, as_of,
               seq - row_number() OVER (PARTITION BY risk_list_version, as_of ORDER BY seq) AS island
        FROM change_log)
    GROUP BY risk_list_version, as_of, island;
CREATE TABLE change_log_v4 (
    seq BIGINT USING COMPRESSION uncompressed NOT NULL,
    person_id UBIGINT USING COMPRESSION uncompressed NOT NULL,
    old_state INTEGER USING COMPRESSION uncompressed,
    new_state INTEGER USING COMPRESSION uncompressed NOT NULL
);
INSERT INTO change_log_v4 SELECT seq, person_id, old_state, new_state FROM change_log ORDER BY seq;
DROP TABLE change_log;
ALTER TABLE change_log_v4 RENAME TO change_log;
INSERT INTO schema_version (version) VALUES (4);
"""
TABLES = (
    "persons", "nat_results", "entries", "visits", "risk_lists", "policies", "statuses", "change_log", "publishes",
    "checkpoint", "admin_log",
)  # fmt: skip


def create_or_migrate(db: Connection) -> None:
    """Create the missing tables, or migrate an older store in place, in one transaction; refuse a newer one."""
    con = db.con
    try:
        con.execute("BEGIN")
        con.execute(_DDL)
        row = one(con.execute("SELECT max(version) FROM schema_version"))
        found = row[0] if row else None
        if found is None:
            con.execute("INSERT INTO schema_version (version) VALUES (?)", [SCHEMA_VERSION])
        elif found < SCHEMA_VERSION:
            if found == 1:
                con.execute(_MIGRATE_1_TO_2)
            if found <= 2:
                con.execute(_MIGRATE_2_TO_3)
            con.execute(_MIGRATE_3_TO_4)
        con.execute("COMMIT")
    except duckdb.Error as exc:
        con.execute("ROLLBACK")
        raise StoreError(f"{db.path}: cannot set up the store tables: {first_line(exc)}") from None
    if found is not None and found > SCHEMA_VERSION:
        raise StoreError(
            f"{db.path}: store schema version {found} is newer than this healthcode supports ({SCHEMA_VERSION})"
        )
