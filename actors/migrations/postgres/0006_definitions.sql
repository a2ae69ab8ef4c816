-- Event and property definitions (spec 1.9): which events and properties a team has sent,
-- with each property's type, for PostHog's UI (event and property pickers, filters).
-- The same rules as 0001: IF NOT EXISTS, constraints only inside CREATE TABLE, PostHog's
-- constraint and index names, deferred foreign keys without ON DELETE actions.

CREATE TABLE IF NOT EXISTS posthog_eventdefinition (
    id uuid PRIMARY KEY,
    name varchar(400) NOT NULL,
    volume_30_day integer,
    query_usage_30_day integer,
    team_id integer NOT NULL
        REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    created_at timestamptz,
    last_seen_at timestamptz,
    CONSTRAINT posthog_eventdefinition_team_id_name_80fa0b87_uniq UNIQUE (team_id, name)
);

-- type: 1 event, 2 person, 3 group (with group_type_index). property_type is String,
-- Numeric, DateTime or Boolean, NULL when the first value seen had no type (an object).
CREATE TABLE IF NOT EXISTS posthog_propertydefinition (
    id uuid PRIMARY KEY,
    name varchar(400) NOT NULL,
    is_numerical boolean NOT NULL DEFAULT false,
    volume_30_day integer,
    query_usage_30_day integer,
    team_id integer NOT NULL
        REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    property_type varchar(50),
    property_type_format varchar(50),
    type smallint NOT NULL DEFAULT 1,
    group_type_index smallint
);

CREATE UNIQUE INDEX IF NOT EXISTS posthog_propertydefinition_uniq
    ON posthog_propertydefinition (team_id, name, type, coalesce(group_type_index, -1));

-- Which properties appear on which event.
CREATE TABLE IF NOT EXISTS posthog_eventproperty (
    id serial PRIMARY KEY,
    event varchar(400) NOT NULL,
    property varchar(400) NOT NULL,
    team_id integer NOT NULL
        REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED
);

CREATE UNIQUE INDEX IF NOT EXISTS posthog_event_property_unique_team_event_property
    ON posthog_eventproperty (team_id, event, property);
