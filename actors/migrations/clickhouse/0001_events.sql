-- Events and the ingestion dead letter queue, as PostHog's ClickHouse has them, written
-- so the same DDL runs on ClickHouse 18.16 and on current releases:
--   * DateTime (seconds) instead of DateTime64(6, 'UTC'), which 18.16 does not have.
--   * String instead of LowCardinality(String) (experimental in 18.16).
--   * cityHash64(toString(uuid)): 18.16's cityHash64 rejects the UUID type.
--   * ENGINE = X(ver) PARTITION BY ... ORDER BY ..., never the old MergeTree(date, ...)
--     form, which current releases refuse.
-- Tables are unqualified: the runner selects the database. IF NOT EXISTS everywhere so
-- the file can run at every start. Statements end with a semicolon at the end of a line
-- and no other line ends with one (the runner splits on such lines).

-- One row per ingested event (the value of topic clickhouse_events_json).
-- ReplacingMergeTree(_timestamp): the sorting key ends with the event uuid, so an event
-- that is ingested again (Kafka replay, retried batch) has the same key and collapses
-- to the newest copy when parts merge. Readers that must not double count before a
-- merge use FINAL or count(DISTINCT uuid).
-- SAMPLE BY must be part of the sorting key, which it is (its last element).
-- _timestamp and _offset are the Kafka message time and offset in PostHog. When rows
-- are inserted directly, _timestamp defaults to the insert time, which makes the later
-- copy of a replayed event win.
CREATE TABLE IF NOT EXISTS events
(
    uuid UUID,
    event String,
    properties String,
    timestamp DateTime,
    team_id Int64,
    distinct_id String,
    elements_chain String,
    created_at DateTime,
    person_id UUID,
    person_properties String,
    person_created_at DateTime,
    group0_properties String,
    group1_properties String,
    group2_properties String,
    group3_properties String,
    group4_properties String,
    group0_created_at DateTime,
    group1_created_at DateTime,
    group2_created_at DateTime,
    group3_created_at DateTime,
    group4_created_at DateTime,
    _timestamp DateTime DEFAULT now(),
    _offset UInt64
)
ENGINE = ReplacingMergeTree(_timestamp)
PARTITION BY toYYYYMM(timestamp)
ORDER BY (team_id, toDate(timestamp), event, cityHash64(distinct_id), cityHash64(toString(uuid)))
SAMPLE BY cityHash64(toString(uuid));

-- Events whose ingestion failed (spec 1.9): id is a new UUIDT per failure, event_uuid
-- the event's own uuid, error_location 'plugin_server_ingest_event', tags
-- ['plugin_server', 'ingest_event']. Ordered by id first like PostHog's table, so only
-- an exact replay of the same dead letter message collapses.
-- No TTL clause: table TTL needs ClickHouse 19.6 or later.
CREATE TABLE IF NOT EXISTS events_dead_letter_queue
(
    id UUID,
    event_uuid UUID,
    event String,
    properties String,
    distinct_id String,
    team_id Int64,
    elements_chain String,
    created_at DateTime,
    ip String,
    site_url String,
    now DateTime,
    raw_payload String,
    error_timestamp DateTime,
    error_location String,
    error String,
    tags Array(String),
    _timestamp DateTime DEFAULT now(),
    _offset UInt64
)
ENGINE = ReplacingMergeTree(_timestamp)
PARTITION BY toYYYYMM(error_timestamp)
ORDER BY (id, event_uuid, distinct_id, team_id);
