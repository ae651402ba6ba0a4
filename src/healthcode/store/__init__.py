"""The store: the population in an embedded DuckDB file, behind a narrow Arrow-in, Arrow-out interface.

Data flows in as validated Arrow tables (ingest, bulk load) and out as Arrow tables (the population inside the
window, the change log); nothing above this package knows the database is DuckDB.
"""

from healthcode.rules.engine import pack_state
from healthcode.store.connection import check_memory_limit, resolve_path
from healthcode.store.database import Store
from healthcode.store.load import SKIP_REASONS, LoadSummary
from healthcode.store.schema import SCHEMA_VERSION, TABLES
from healthcode.store.validate import INGEST_KINDS, row_error
from healthcode.store.writes import NEW, STORED, UNKNOWN, IngestCounts

__all__ = [
    "INGEST_KINDS",
    "NEW",
    "SCHEMA_VERSION",
    "SKIP_REASONS",
    "STORED",
    "TABLES",
    "UNKNOWN",
    "IngestCounts",
    "LoadSummary",
    "Store",
    "check_memory_limit",
    "pack_state",
    "resolve_path",
    "row_error",
]
