-- Actions and their steps (spec 1.11): a stored event matching a step of an action with
-- post_to_slack posts a message to the team's slack_incoming_webhook. The same rules as 0001:
-- IF NOT EXISTS, constraints only inside CREATE TABLE, deferred foreign keys without ON DELETE
-- actions. PostHog's app owns these tables; the columns are those this server reads, plus
-- what its inserts need.

CREATE TABLE IF NOT EXISTS posthog_action (
    id serial PRIMARY KEY,
    name varchar(400),
    team_id integer NOT NULL
        REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    description text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    created_by_id integer,
    deleted boolean NOT NULL DEFAULT false,
    post_to_slack boolean NOT NULL DEFAULT false,
    slack_message_format varchar(600) NOT NULL DEFAULT '',
    is_calculating boolean NOT NULL DEFAULT false,
    last_calculated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS posthog_action_team_id_3a21e3a6 ON posthog_action (team_id);

-- url_matching: contains (the default; SQL LIKE's % and _), regex or exact. properties: a
-- list of property filters ({key, value, operator, type}).
CREATE TABLE IF NOT EXISTS posthog_actionstep (
    id serial PRIMARY KEY,
    action_id integer NOT NULL
        REFERENCES posthog_action (id) DEFERRABLE INITIALLY DEFERRED,
    tag_name varchar(400),
    text varchar(400),
    href varchar(65535),
    selector varchar(65535),
    url varchar(65535),
    name varchar(400),
    event varchar(400),
    url_matching varchar(400) DEFAULT 'contains',
    properties jsonb
);

CREATE INDEX IF NOT EXISTS posthog_actionstep_action_id_f7c7d1a6 ON posthog_actionstep (action_id);
