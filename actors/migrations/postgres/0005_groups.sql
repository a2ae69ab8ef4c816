-- Groups (spec 1.3 prepareEventStep, 1.9): which group types a team uses, each at one of
-- five indexes (the events table has five group columns), and each group's properties.
-- The same rules as 0001: IF NOT EXISTS, constraints only inside CREATE TABLE, PostHog's
-- constraint and index names, deferred foreign keys without ON DELETE actions.

-- group_type -> group_type_index per team. Both unique keys matter: two instances meeting
-- the same new type at once get one index, and two new types never share an index.
CREATE TABLE IF NOT EXISTS posthog_grouptypemapping (
    id serial PRIMARY KEY,
    team_id integer NOT NULL
        REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    group_type varchar(400) NOT NULL,
    group_type_index integer NOT NULL,
    name_singular varchar(400),
    name_plural varchar(400),
    CONSTRAINT unique_group_types UNIQUE (team_id, group_type),
    CONSTRAINT unique_event_column_indexes UNIQUE (team_id, group_type_index),
    CONSTRAINT group_type_index_is_less_than_or_equal_5 CHECK (group_type_index <= 5)
);

-- One row per group. version starts at 1 and is bumped on every change, and sent to
-- ClickHouse so that ReplacingMergeTree(version) keeps the newest row.
CREATE TABLE IF NOT EXISTS posthog_group (
    id serial PRIMARY KEY,
    team_id integer NOT NULL
        REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    group_key varchar(400) NOT NULL,
    group_type_index integer NOT NULL,
    group_properties jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    properties_last_updated_at jsonb NOT NULL DEFAULT '{}',
    properties_last_operation jsonb NOT NULL DEFAULT '{}',
    version bigint NOT NULL,
    CONSTRAINT unique_team_key_position UNIQUE (team_id, group_key, group_type_index)
);

CREATE INDEX IF NOT EXISTS posthog_group_team_id_b3aed896 ON posthog_group (team_id);
