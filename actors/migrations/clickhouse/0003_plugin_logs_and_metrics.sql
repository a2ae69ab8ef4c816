-- Plugin logs, app metrics and ingestion warnings, as PostHog's ClickHouse has them, in
-- DDL that runs on ClickHouse 18.16 and on current releases (DateTime instead of
-- DateTime64, String instead of LowCardinality(String), new-style ENGINE clause).
-- Tables are unqualified: the runner selects the database. IF NOT EXISTS everywhere so
-- the file can run at every start. Statements end with a semicolon at the end of a line
-- and no other line ends with one (the runner splits on such lines).
-- No TTL clauses (PostHog keeps logs one week): table TTL needs ClickHouse 19.6 or later.

-- Plugin log entries (spec 2.6): source SYSTEM | PLUGIN | CONSOLE, type DEBUG | LOG |
-- INFO | WARN | ERROR. PostHog orders by (team_id, plugin_id, plugin_config_id,
-- timestamp) and relies on microsecond timestamps to keep entries apart. With
-- second-precision DateTime, entries written in the same second would collapse, so the
-- entry id is added as the last key column: only a replay of the same entry collapses.
-- 18.16 accepts a UUID column in the sorting key, so no toString(id) is needed.
-- Daily partitions, so that a retention job can drop whole days (ALTER TABLE ... DROP
-- PARTITION yyyymmdd) in place of PostHog's one-week TTL.
CREATE TABLE IF NOT EXISTS plugin_log_entries
(
    id UUID,
    team_id Int64,
    plugin_id Int64,
    plugin_config_id Int64,
    timestamp DateTime,
    source String,
    type String,
    message String,
    instance_id UUID,
    _timestamp DateTime DEFAULT now(),
    _offset UInt64
)
ENGINE = ReplacingMergeTree(_timestamp)
PARTITION BY toYYYYMMDD(timestamp)
ORDER BY (team_id, plugin_id, plugin_config_id, timestamp, id);

-- App metrics (spec 2.6): counters per config, category (processEvent | onEvent |
-- exportEvents | scheduledTask), job and hour. PostHog uses AggregatingMergeTree with
-- SimpleAggregateFunction(sum, Int64) columns, a type 18.16 does not have. The same
-- effect on both versions: SummingMergeTree that sums exactly the three counters, over
-- rows with the same key (same hour, error type and error uuid). The column list is
-- explicit so that _offset is not summed. Other columns (timestamp, error_details,
-- _timestamp) keep one arbitrary row's value, as in PostHog. Rows that are not merged
-- yet are separate, so readers always sum(...) GROUP BY.
CREATE TABLE IF NOT EXISTS app_metrics
(
    timestamp DateTime,
    team_id Int64,
    plugin_config_id Int64,
    job_id String,
    category String,
    successes Int64,
    successes_on_retry Int64,
    failures Int64,
    error_uuid UUID,
    error_type String,
    error_details String,
    _timestamp DateTime DEFAULT now(),
    _offset UInt64
)
ENGINE = SummingMergeTree((successes, successes_on_retry, failures))
PARTITION BY toYYYYMM(timestamp)
ORDER BY (team_id, plugin_config_id, category, toStartOfHour(timestamp), job_id, error_type, error_uuid);

-- Ingestion warnings (spec 1.9): {team_id, type, source 'plugin-server', details (JSON
-- string), timestamp}. Plain MergeTree: every warning is kept, nothing collapses.
-- Monthly partitions (PostHog uses daily ones with a TTL, which 18.16 lacks).
CREATE TABLE IF NOT EXISTS ingestion_warnings
(
    team_id Int64,
    source String,
    type String,
    details String,
    timestamp DateTime,
    _timestamp DateTime DEFAULT now(),
    _offset UInt64
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(timestamp)
ORDER BY (team_id, toHour(timestamp), type, source, timestamp);
