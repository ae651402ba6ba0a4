-- The store tables of healthcode 0.2.0 (schema 2), verbatim: the migration test builds an old store from it.

CREATE TABLE schema_version (
    version INTEGER NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
CREATE TABLE persons (
    person_id UBIGINT PRIMARY KEY,
    home_region INTEGER NOT NULL,
    registered_commuter BOOLEAN NOT NULL,
    base_color TINYINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE nat_results (
    person_id UBIGINT NOT NULL,
    sample_time BIGINT,
    report_time BIGINT NOT NULL,
    UNIQUE (person_id, sample_time, report_time)
);
CREATE TABLE entries (
    person_id UBIGINT NOT NULL,
    t BIGINT NOT NULL,
    UNIQUE (person_id, t)
);
CREATE TABLE visits (
    person_id UBIGINT NOT NULL,
    region INTEGER NOT NULL,
    day DATE NOT NULL,
    UNIQUE (person_id, region, day)
);
CREATE TABLE risk_lists (
    version BIGINT PRIMARY KEY,
    loaded_at TIMESTAMPTZ NOT NULL,
    csv VARCHAR NOT NULL
);
CREATE TABLE policies (
    version BIGINT PRIMARY KEY,
    loaded_at TIMESTAMPTZ NOT NULL,
    toml VARCHAR NOT NULL
);
CREATE TABLE statuses (
    person_id UBIGINT NOT NULL,
    commuter_badge BOOLEAN NOT NULL,
    entry_permitted BOOLEAN NOT NULL,
    reasons USMALLINT NOT NULL,
    risk_list_version BIGINT,
    as_of BIGINT NOT NULL
);
CREATE TABLE change_log (
    seq BIGINT NOT NULL,
    person_id UBIGINT NOT NULL,
    old_state INTEGER,
    new_state INTEGER NOT NULL,
    risk_list_version BIGINT,
    as_of BIGINT NOT NULL
);
CREATE TABLE checkpoint (
    seq BIGINT NOT NULL,
    written_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE admin_log (
    changed_at TIMESTAMPTZ NOT NULL,
    caller VARCHAR NOT NULL,
    action VARCHAR NOT NULL,
    version BIGINT,
    detail VARCHAR
);
