-- Groups as PostHog's ClickHouse has them (topic clickhouse_groups), in DDL that runs on
-- ClickHouse 18.16 and on current releases (DateTime, no LowCardinality, new-style ENGINE).
-- One row per group version: Postgres bumps posthog_group.version on every change, so
-- ReplacingMergeTree(version) keeps each group's latest state after merges, whichever
-- instance wrote it last. Readers use FINAL or argMax(..., version).
CREATE TABLE IF NOT EXISTS groups
(
    group_type_index UInt8,
    group_key String,
    created_at DateTime,
    team_id Int64,
    group_properties String,
    version Int64,
    _timestamp DateTime DEFAULT now(),
    _offset UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (team_id, group_type_index, group_key);
