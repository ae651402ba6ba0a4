"""The store: the population in an embedded DuckDB file, behind a narrow Arrow-in, Arrow-out interface.

Data flows in as validated Arrow tables (ingest, bulk load) and out as Arrow tables (the population inside the
window, the change log); nothing above this package knows the database is DuckDB.
"""

from healthcode.store.database import (
    INGEST_KINDS,
    SCHEMA_VERSION,
    SKIP_REASONS,
    TABLES,
    IngestCounts,
    LoadSummary,
    Store,
    pack_state,
    resolve_path,
)

__all__ = [
    "INGEST_KINDS",
    "SCHEMA_VERSION",
    "SKIP_REASONS",
    "TABLES",
    "IngestCounts",
    "LoadSummary",
    "Store",
    "pack_state",
    "resolve_path",
]
