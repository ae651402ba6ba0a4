"""One DuckDB connection of the store: opening the file, the lock, transactions and registered Arrow inputs.

Every other store module works through a :class:`Connection`: it serialises calls with one lock (DuckDB allows one
writing process per file and one statement at a time per connection), runs work in a transaction that is rolled
back whole on any failure, and words database failures as :class:`StoreError` / :class:`StoreUnavailable` naming
the file (never a row's content).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from typing import Any

import duckdb
import pyarrow as pa

from healthcode.errors import StoreError, StoreInUse, StoreUnavailable

DEFAULT_PATH = os.path.join("data", "healthcode.duckdb")
#: Environment variable naming the store file when no path is given.
STORE_ENV = "HEALTHCODE_STORE"
#: DuckDB's words when another process has the file open (and that process's id, when it says).
_LOCK_HELD = re.compile(r"Conflicting lock is held(?:.*?\(PID (\d+)\))?")


def resolve_path(path: str | os.PathLike[str] | None) -> str:
    """The store file: ``path``, else ``$HEALTHCODE_STORE``, else ``./data/healthcode.duckdb``."""
    return os.fspath(path) if path is not None else os.environ.get(STORE_ENV) or DEFAULT_PATH


#: DuckDB's memory limit when none is given: the buffer pool of a server holding 22M persons (whose view lives
#: outside DuckDB) and of a bulk load, with room to spare on a 24 GiB machine.  Past it DuckDB spills to disk.
DEFAULT_MEMORY_LIMIT = "2GB"
#: DuckDB folds its write-ahead log into the file once it grows past this; a larger WAL means fewer checkpoints
#: inside commits (each rewrites the touched blocks), at the price of a longer WAL replay after a crash.
CHECKPOINT_THRESHOLD = "256MB"
MEMORY_ENV = "HEALTHCODE_STORE_MEMORY_LIMIT"
THREADS_ENV = "HEALTHCODE_STORE_THREADS"
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)


def check_memory_limit(text: str, where: str) -> str:
    """A DuckDB memory limit such as ``2GB`` or ``512MiB``, or :class:`StoreError` naming ``where``."""
    if not _SIZE.match(text):
        raise StoreError(f"{where}: expected a size such as 2GB or 512MiB, got {text!r}")
    return text.strip()


class Connection:
    """The open store file (``path`` as :func:`resolve_path` gives it; ``":memory:"`` for a throwaway store).

    ``memory_limit`` (e.g. ``"2GB"``; default ``$HEALTHCODE_STORE_MEMORY_LIMIT`` or :data:`DEFAULT_MEMORY_LIMIT`)
    caps DuckDB's buffer pool (larger work spills to a temporary folder beside the file); ``threads`` (default
    ``$HEALTHCODE_STORE_THREADS`` or every core; 0 too) is how many threads a DuckDB query may use."""

    def __init__(self, path: str, memory_limit: str | None = None, threads: int | None = None) -> None:
        self.path = path
        if memory_limit is None:
            memory_limit = (
                check_memory_limit(os.environ[MEMORY_ENV], MEMORY_ENV)
                if os.environ.get(MEMORY_ENV)
                else DEFAULT_MEMORY_LIMIT
            )
        else:
            memory_limit = check_memory_limit(memory_limit, "store memory limit")
        if threads is None and os.environ.get(THREADS_ENV):
            text = os.environ[THREADS_ENV]
            if not text.strip().isdigit():
                raise StoreError(f"{THREADS_ENV}: expected a whole number >= 0, got {text!r}")
            threads = int(text)
        if threads is not None and threads < 0:
            raise StoreError(f"store threads: expected a whole number >= 0, got {threads}")
        self.memory_limit = memory_limit
        self.threads = threads or os.cpu_count() or 1
        self.lock = threading.Lock()
        self._seq = 0
        self._unregister_later: list[str] = []
        if path != ":memory:":
            folder = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{path}: cannot create folder {folder}: {exc.strerror or exc}") from None
            if os.path.isdir(path):
                raise StoreError(f"{path}: is a folder; give a database file path")
            _check_magic(path)
        try:
            config: dict[str, str | bool | int | float | list[str]] = {
                "memory_limit": memory_limit,
                "threads": str(self.threads),
                "checkpoint_threshold": CHECKPOINT_THRESHOLD,
            }
            self.con = duckdb.connect(path, config=config)
        except duckdb.Error as exc:
            holder = _LOCK_HELD.search(str(exc))
            if holder:
                who = f"another process (PID {holder.group(1)})" if holder.group(1) else "another process"
                raise StoreInUse(f"{path}: the store is in use by {who}, e.g. a running server") from None
            raise StoreError(f"{path}: cannot open the store: {first_line(exc)}") from None

    def close(self) -> None:
        self.con.close()

    # -- transactions ------------------------------------------------------------------------------------------

    def transaction(self, work: Callable[[], Any]) -> Any:
        """``work()`` in one transaction under the lock; a database failure rolls back and raises
        :class:`StoreUnavailable`, any other exception rolls back and propagates."""
        with self.lock:
            self.con.execute("BEGIN")
            try:
                result = work()
                self.con.execute("COMMIT")
            except duckdb.Error as exc:
                self._rollback()
                raise StoreUnavailable(f"{self.path}: the store cannot write now: {first_line(exc)}") from None
            except BaseException:
                self._rollback()
                raise
            return result

    def _rollback(self) -> None:
        rollback(self.con)
        while self._unregister_later:
            name = self._unregister_later.pop()
            try:
                self.con.unregister(name)
            except duckdb.Error:
                pass

    # -- registered inputs and small queries ---------------------------------------------------------------------

    def register(self, table: pa.Table) -> str:
        """Make ``table`` readable by SQL under a fresh name (drop it with :meth:`unregister`)."""
        self._seq += 1
        name = f"_in_{self._seq}"
        self.con.register(name, table)
        return name

    def unregister(self, name: str) -> None:
        """Drop a registered input; inside a transaction a failed statement aborted, DuckDB refuses, so it is
        dropped after the rollback (:meth:`transaction`)."""
        try:
            self.con.unregister(name)
        except duckdb.Error:
            self._unregister_later.append(name)

    def count(self, sql: str, params: list[Any] | None = None) -> int:
        """The integer a one-value query gives (0 for no row or null)."""
        row = one(self.con.execute(sql, params or []))
        return int(row[0]) if row and row[0] is not None else 0


def _check_magic(path: str) -> None:
    """Refuse an existing file that is not a DuckDB database (DuckDB would otherwise try to open it anyway)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the store: {exc.strerror or exc}") from None
    if head and head[8:12] != b"DUCK":
        raise StoreError(f"{path}: not a DuckDB database file; give a new path or an existing store")


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back the open transaction; after a fatal I/O error DuckDB may refuse even that (it is then gone)."""
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


def one(result: duckdb.DuckDBPyConnection) -> tuple[Any, ...] | None:
    """The first row of a result, fetching it whole (DuckDB refuses other work while a result is unfinished)."""
    rows = result.fetchall()
    return tuple(rows[0]) if rows else None


def first_line(exc: BaseException) -> str:
    """The first line of a database error's message, for a :class:`StoreError` (never the exception's class)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else "the database gave no detail"
