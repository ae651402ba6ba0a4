"""The record of published statuses and of who changed what: change log, status checkpoint, admin log, versions.

``change_log`` holds every published status change in ``seq`` order: **the record of the published statuses**; a
status is stored packed as ``badge | entry << 1 | reasons << 2`` (:func:`pack_state`; ``old_state`` null for a
first publish); ``publishes`` holds each publish's risk-list version and ``as_of`` once, with the range of
sequence numbers it appended.  A publish appends to them and nothing else (one transaction), so its cost is the
number of changes, not the size of the population.  ``statuses`` is a checkpoint of the last published status per
person as of change ``checkpoint.seq``; the current statuses are that checkpoint overridden by the later changes
(:meth:`Journal.published`), and :meth:`Journal.write_checkpoint` rewrites it in the background.  Risk-list and
policy versions are kept with the publish they produced, and ``admin_log`` says who changed what.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import duckdb
import numpy as np
import pyarrow as pa

from healthcode.errors import StoreError
from healthcode.store.connection import Connection, first_line, one

#: The published statuses: the checkpoint overridden by the later changes up to sequence number ``$upto`` (each
#: change's risk-list version and as_of are its publish's).
_PUBLISHED = """
WITH cp AS (SELECT coalesce(max(seq), 0) AS seq FROM checkpoint),
latest AS (
    SELECT seq, person_id, new_state FROM change_log WHERE seq > (SELECT seq FROM cp) AND seq <= $upto
    QUALIFY row_number() OVER (PARTITION BY person_id ORDER BY seq DESC) = 1
),
tail AS (
    SELECT l.person_id, (l.new_state & 1) = 1 AS commuter_badge, (l.new_state & 2) = 2 AS entry_permitted,
           (l.new_state >> 2)::USMALLINT AS reasons, p.risk_list_version, p.as_of
    FROM latest l ASOF JOIN publishes p ON l.seq >= p.first_seq
)
SELECT * FROM (SELECT s.* FROM statuses s ANTI JOIN tail t USING (person_id) UNION ALL SELECT * FROM tail)
"""

#: The change-log rows after ``$after``, at most ``$limit``, each with its publish's version and as_of.
_CHANGES = """
WITH c AS (SELECT * FROM change_log WHERE seq > $after ORDER BY seq LIMIT $limit)
SELECT c.seq, c.person_id, (c.old_state & 1) = 1 AS old_badge, (c.new_state & 1) = 1 AS new_badge,
       (c.old_state & 2) = 2 AS old_entry, (c.new_state & 2) = 2 AS new_entry,
       (c.old_state >> 2)::USMALLINT AS old_reasons, (c.new_state >> 2)::USMALLINT AS new_reasons,
       p.risk_list_version, p.as_of
FROM c ASOF JOIN publishes p ON c.seq >= p.first_seq ORDER BY c.seq
"""


class Journal:
    """The change log, checkpoint, admin log and versions of one store connection (see :class:`Store` for each
    method's contract).  This process is the store's only writer, so the change log's high-water mark is kept in
    memory and the sequence numbers are made here."""

    def __init__(self, db: Connection) -> None:
        self.db = db
        self.checkpoint_lock = threading.Lock()  # one checkpoint at a time; close waits for it
        self._hwm: int | None = None  # the change log's high-water mark, once read

    def published(self) -> pa.Table:
        sql = _PUBLISHED.replace("$upto", str(2**62)) + " ORDER BY person_id"
        with self.db.lock:
            try:
                return self.db.con.sql(sql).to_arrow_table()
            except duckdb.Error as exc:
                raise StoreError(f"{self.db.path}: cannot read the published statuses: {first_line(exc)}") from None

    def checkpoint_seq(self) -> int:
        with self.db.lock:
            return self.db.count("SELECT coalesce(max(seq), 0) FROM checkpoint")

    def write_checkpoint(self) -> int:
        """On its own cursor, so ingest and publishes go on meanwhile (they write other tables)."""
        with self.checkpoint_lock:
            cur = self.db.con.cursor()
            try:
                cur.execute("BEGIN")
                try:
                    row = one(cur.execute("SELECT coalesce(max(seq), 0) FROM change_log"))
                    seq = int(row[0]) if row else 0
                    cur.execute("CREATE TABLE statuses_next AS " + _PUBLISHED.replace("$upto", str(seq)))
                    cur.execute("DROP TABLE statuses")
                    cur.execute("ALTER TABLE statuses_next RENAME TO statuses")
                    cur.execute("INSERT INTO checkpoint VALUES (?, now())", [seq])
                    cur.execute("COMMIT")
                except duckdb.Error as exc:
                    cur.execute("ROLLBACK")
                    raise StoreError(f"{self.db.path}: cannot write the status checkpoint: {first_line(exc)}") from None
            finally:
                cur.close()
            return seq

    def high_water_mark(self) -> int:
        with self.db.lock:
            if self._hwm is None:
                self._hwm = self.db.count("SELECT coalesce(max(seq), 0) FROM change_log")
            return self._hwm

    def publish(
        self,
        changes: pa.Table,
        risk_list_version: int | None,
        as_of: int,
        risk_list: tuple[int, str] | None = None,
        policy: tuple[int, str] | None = None,
        admin: Callable[[int], tuple[str, str, int | None, str]] | None = None,
    ) -> int:
        """One transaction, one commit: the changes (numbered on from the cached high-water mark, read from the
        registered Arrow table by DuckDB: no per-row Python, no scan of the change log), their publish row, the kept
        versions and the admin-log row ``admin(new high-water mark)``."""
        db = self.db

        def work() -> int:
            if self._hwm is None:
                self._hwm = db.count("SELECT coalesce(max(seq), 0) FROM change_log")
            base = self._hwm
            n = changes.num_rows
            if n:
                seq = pa.array(np.arange(base + 1, base + 1 + n, dtype=np.int64))
                view = db.register(changes.add_column(0, "seq", seq))
                try:
                    db.con.execute(f"INSERT INTO change_log SELECT seq, person_id, old_state, new_state FROM {view}")
                finally:
                    db.unregister(view)
                db.con.execute(
                    "INSERT INTO publishes VALUES (?, ?, ?, ?)", [base + 1, base + n, risk_list_version, as_of]
                )
            if risk_list is not None:
                db.con.execute("INSERT OR REPLACE INTO risk_lists VALUES (?, now(), ?)", list(risk_list))
            if policy is not None:
                db.con.execute("INSERT OR REPLACE INTO policies VALUES (?, now(), ?)", list(policy))
            if admin is not None:
                db.con.execute("INSERT INTO admin_log VALUES (now(), ?, ?, ?, ?)", list(admin(base + n)))
            return base + n

        try:
            hwm = db.transaction(work)
        except BaseException:
            self._hwm = None  # re-read after a failed commit
            raise
        self._hwm = hwm
        return hwm  # type: ignore[no-any-return]

    def changes(self, after: int, limit: int) -> pa.Table:
        with self.db.lock:
            return self.db.con.sql(_CHANGES, params={"after": after, "limit": limit}).to_arrow_table()

    def record_admin(self, caller: str, action: str, version: int | None, detail: str) -> None:
        self.db.transaction(
            lambda: self.db.con.execute(
                "INSERT INTO admin_log VALUES (now(), ?, ?, ?, ?)", [caller, action, version, detail]
            )
        )

    def admin_log(self) -> pa.Table:
        with self.db.lock:
            return self.db.con.sql("SELECT * FROM admin_log ORDER BY changed_at").to_arrow_table()

    def record_version(self, table: str, version: int, text: str) -> None:
        """Keep a risk-list or policy version (``table`` ``risk_lists`` or ``policies``)."""
        if table not in _VERSIONED:
            raise ValueError(f"no version table {table!r}")
        self.db.transaction(
            lambda: self.db.con.execute(f"INSERT OR REPLACE INTO {table} VALUES (?, now(), ?)", [version, text])
        )

    def latest_version(self, table: str) -> tuple[int, str] | None:
        """The newest kept risk-list or policy version and its text."""
        column = _VERSIONED[table]
        with self.db.lock:
            rows = self.db.con.execute(
                f"SELECT version, {column} FROM {table} ORDER BY version DESC LIMIT 1"
            ).fetchall()
        return None if not rows else (int(rows[0][0]), str(rows[0][1]))


#: The version tables and the column holding each version's text.
_VERSIONED = {"risk_lists": "csv", "policies": "toml"}
