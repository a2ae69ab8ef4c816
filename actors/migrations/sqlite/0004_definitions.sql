-- Event and property definitions, as PostHog's posthog_eventdefinition,
-- posthog_propertydefinition and posthog_eventproperty hold them (the embedded profile has no
-- UI reading them, but a user moving to Postgres or querying the file finds them as PostHog
-- would have them).

CREATE TABLE IF NOT EXISTS event_definitions (
    team_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    last_seen_at TEXT NOT NULL,
    PRIMARY KEY (team_id, name)
) WITHOUT ROWID;

-- type: 1 event, 2 person, 3 group (with group_type_index; -1 otherwise).
CREATE TABLE IF NOT EXISTS property_definitions (
    team_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    type INTEGER NOT NULL,
    group_type_index INTEGER NOT NULL,
    property_type TEXT,
    is_numerical INTEGER NOT NULL,
    PRIMARY KEY (team_id, name, type, group_type_index)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS event_properties (
    team_id INTEGER NOT NULL,
    event TEXT NOT NULL,
    property TEXT NOT NULL,
    PRIMARY KEY (team_id, event, property)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS ingested_teams (
    team_id INTEGER PRIMARY KEY
);
