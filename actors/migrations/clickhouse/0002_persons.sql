-- Persons and distinct ids as PostHog's ClickHouse has them (topics clickhouse_person and
-- clickhouse_person_distinct_id), in DDL that runs on ClickHouse 18.16 and on current
-- releases (DateTime instead of DateTime64, no LowCardinality, new-style ENGINE clause).
-- Tables are unqualified: the runner selects the database. IF NOT EXISTS everywhere so
-- the file can run at every start. Statements end with a semicolon at the end of a line
-- and no other line ends with one (the runner splits on such lines).

-- One row per person version. Postgres bumps posthog_person.version on every change, so
-- ReplacingMergeTree(version) keeps the latest state of each (team_id, id) after merges.
-- A delete is written as the deleted row with version + 100 and is_deleted = 1, so it
-- outranks any update still in flight. Readers use FINAL or argMax(..., version).
-- No partitioning: persons are not time-ordered and must collapse across all time.
CREATE TABLE IF NOT EXISTS person
(
    id UUID,
    created_at DateTime,
    team_id Int64,
    properties String,
    is_identified Int8,
    is_deleted Int8 DEFAULT 0,
    version UInt64,
    _timestamp DateTime DEFAULT now(),
    _offset UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (team_id, id);

-- distinct_id -> person, keyed like PostHog's person_distinct_id2 (the newer of its two
-- tables). Keying by (team_id, distinct_id) with ReplacingMergeTree(version) means a
-- distinct id moved to another person by a merge (version + 1) replaces its old mapping
-- instead of adding a second one. version is Int64 as in PostHog (18.16 accepts a signed
-- version column).
CREATE TABLE IF NOT EXISTS person_distinct_id
(
    team_id Int64,
    distinct_id String,
    person_id UUID,
    is_deleted Int8 DEFAULT 0,
    version Int64 DEFAULT 1,
    _timestamp DateTime DEFAULT now(),
    _offset UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (team_id, distinct_id);
