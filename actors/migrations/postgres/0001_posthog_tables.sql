-- PostHog-owned tables that the plugin server reads and writes.
--
-- Why IF NOT EXISTS: on a real PostHog database, Django already created these tables
-- (and owns their evolution), so each CREATE is a no-op there. It only takes effect on a
-- standalone or test database, where it yields a schema compatible with PostHog's models.
-- Nothing in this file ALTERs or DROPs anything.
--
-- Rules for keeping it safe against a real PostHog database:
--   * Unique keys, primary keys and foreign keys are written inside CREATE TABLE, so they
--     exist only when this file created the table (never added to PostHog's tables).
--   * Every separate CREATE INDEX uses the exact index name PostHog's own schema uses
--     (taken from PostHog's persons schema), so on a PostHog database it is a no-op
--     instead of an unplanned index build on a large live table.
--   * Foreign keys are DEFERRABLE INITIALLY DEFERRED without ON DELETE actions, as Django
--     creates them (Django cascades in Python, so deletes must remove children first).
--   * Django sets most defaults in Python, not in the database. The DEFAULTs below are
--     extra: they let a test or a minimal setup insert rows without naming every column.
--
-- Convention: every statement ends with a semicolon at the end of a line, and no other
-- line (comments included) ends with one, so a runner may split on such lines.

-- Organization. plugins_access_level 9 = ROOT (the self-hosted default): plugins allowed.
-- available_features is the 2023 feature list (varchar array) the v2023 server reads.
-- available_product_features replaced it later (jsonb array of {key, name, ...}).
CREATE TABLE IF NOT EXISTS posthog_organization (
    id uuid PRIMARY KEY,
    name varchar(64) NOT NULL,
    slug varchar(48) UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    plugins_access_level smallint NOT NULL DEFAULT 9 CHECK (plugins_access_level >= 0),
    available_features varchar(64)[] NOT NULL DEFAULT '{}',
    available_product_features jsonb[] DEFAULT '{}',
    for_internal_metrics boolean NOT NULL DEFAULT false,
    is_member_join_email_enabled boolean NOT NULL DEFAULT true,
    members_can_use_personal_api_keys boolean NOT NULL DEFAULT true,
    setup_section_2_completed boolean NOT NULL DEFAULT true,
    personalization jsonb NOT NULL DEFAULT '{}',
    domain_whitelist varchar(256)[] NOT NULL DEFAULT '{}',
    customer_id varchar(200),
    usage jsonb,
    never_drop_data boolean DEFAULT false
);

-- Team (= project / environment). api_token is how events without team_id find their team.
-- project_id has no foreign key because posthog_project is not created here.
CREATE TABLE IF NOT EXISTS posthog_team (
    id serial PRIMARY KEY,
    uuid uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL
        REFERENCES posthog_organization (id) DEFERRABLE INITIALLY DEFERRED,
    project_id bigint,
    api_token varchar(200) NOT NULL UNIQUE,
    name varchar(200) NOT NULL DEFAULT 'Default Project',
    app_urls varchar(200)[] NOT NULL DEFAULT '{}',
    slack_incoming_webhook varchar(500),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    anonymize_ips boolean NOT NULL DEFAULT false,
    completed_snippet_onboarding boolean NOT NULL DEFAULT false,
    ingested_event boolean NOT NULL DEFAULT false,
    session_recording_opt_in boolean NOT NULL DEFAULT false,
    plugins_opt_in boolean NOT NULL DEFAULT false,
    opt_out_capture boolean NOT NULL DEFAULT false,
    is_demo boolean NOT NULL DEFAULT false,
    access_control boolean NOT NULL DEFAULT false,
    timezone varchar(240) NOT NULL DEFAULT 'UTC',
    test_account_filters jsonb NOT NULL DEFAULT '[]',
    data_attributes jsonb NOT NULL DEFAULT '["data-attr"]',
    person_display_name_properties varchar(400)[],
    event_names jsonb NOT NULL DEFAULT '[]',
    event_names_with_usage jsonb NOT NULL DEFAULT '[]',
    event_properties jsonb NOT NULL DEFAULT '[]',
    event_properties_with_usage jsonb NOT NULL DEFAULT '[]',
    event_properties_numerical jsonb NOT NULL DEFAULT '[]',
    -- Read by later plugin-server versions (kept so the same queries work here).
    person_processing_opt_out boolean DEFAULT false,
    heatmaps_opt_in boolean,
    cookieless_server_hash_mode smallint,
    drop_events_older_than interval
);

-- Plugin (app). plugin_type: local | custom | repository | source (later also inline).
-- archive holds the zip of custom/repository plugins. capabilities is written by the
-- server: {methods[], scheduled_tasks[], jobs[]}.
CREATE TABLE IF NOT EXISTS posthog_plugin (
    id serial PRIMARY KEY,
    organization_id uuid
        REFERENCES posthog_organization (id) DEFERRABLE INITIALLY DEFERRED,
    plugin_type varchar(200),
    is_global boolean NOT NULL DEFAULT false,
    is_preinstalled boolean NOT NULL DEFAULT false,
    is_stateless boolean DEFAULT false,
    name varchar(200),
    description text,
    url varchar(800),
    icon varchar(800),
    config_schema jsonb NOT NULL DEFAULT '{}',
    tag varchar(200),
    archive bytea,
    latest_tag varchar(800),
    latest_tag_checked_at timestamptz,
    capabilities jsonb NOT NULL DEFAULT '{}',
    metrics jsonb DEFAULT '{}',
    public_jobs jsonb DEFAULT '{}',
    error jsonb,
    from_json boolean NOT NULL DEFAULT false,
    from_web boolean NOT NULL DEFAULT false,
    source text,
    log_level integer,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz
);

-- One plugin enabled for one team. "order" is quoted because ORDER is a keyword.
-- error is {message, time, name, stack, event} after a processEvent throw.
CREATE TABLE IF NOT EXISTS posthog_pluginconfig (
    id serial PRIMARY KEY,
    team_id integer
        REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    plugin_id integer NOT NULL
        REFERENCES posthog_plugin (id) DEFERRABLE INITIALLY DEFERRED,
    enabled boolean NOT NULL DEFAULT false,
    "order" integer NOT NULL DEFAULT 0,
    config jsonb NOT NULL DEFAULT '{}',
    error jsonb,
    web_token varchar(64),
    name varchar(400),
    description varchar(1000),
    deleted boolean DEFAULT false,
    filters jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Source of "source" plugins, one row per file (plugin.json, index.ts, frontend.tsx,
-- site.ts). status: LOCKED | TRANSPILED | ERROR while transpiling frontend/site code.
CREATE TABLE IF NOT EXISTS posthog_pluginsourcefile (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    plugin_id integer NOT NULL
        REFERENCES posthog_plugin (id) DEFERRABLE INITIALLY DEFERRED,
    filename varchar(200) NOT NULL,
    source text,
    status varchar(20),
    transpiled text,
    error text,
    updated_at timestamptz,
    CONSTRAINT unique_filename_for_plugin UNIQUE (plugin_id, filename)
);

-- Attachments become meta.attachments[key]. The MMDB is stored here too, with
-- key '@posthog/mmdb' and both plugin_config_id and team_id NULL.
CREATE TABLE IF NOT EXISTS posthog_pluginattachment (
    id serial PRIMARY KEY,
    team_id integer
        REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    plugin_config_id integer
        REFERENCES posthog_pluginconfig (id) DEFERRABLE INITIALLY DEFERRED,
    key varchar(200) NOT NULL,
    content_type varchar(200) NOT NULL,
    file_name varchar(200) NOT NULL,
    file_size integer NOT NULL,
    contents bytea NOT NULL
);

-- meta.storage and meta.utils.cursor. value is a JSON string in a text column.
-- The unique key is what the storage upsert (ON CONFLICT) targets.
CREATE TABLE IF NOT EXISTS posthog_pluginstorage (
    id serial PRIMARY KEY,
    plugin_config_id integer NOT NULL
        REFERENCES posthog_pluginconfig (id) DEFERRABLE INITIALLY DEFERRED,
    key varchar(200) NOT NULL,
    value text,
    CONSTRAINT posthog_unique_plugin_storage_key UNIQUE (plugin_config_id, key)
);

-- Person. version is bumped on every update and sent to ClickHouse so that
-- ReplacingMergeTree(version) keeps the newest row.
-- fillfactor: a person is rewritten on almost every batch that sees them, and no indexed
-- column changes, so with room left on its page the new version stays there (a HOT update)
-- instead of adding an entry to each of the four indexes, which was most of Postgres' work
-- on person-changing traffic (bench/results/core-path.md). Only where this file creates the
-- table; on PostHog's own table it is an operator's choice (README, Performance). is_user_id is a plain integer here
-- because posthog_user is not created.
CREATE TABLE IF NOT EXISTS posthog_person (
    id bigserial PRIMARY KEY,
    uuid uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    team_id integer NOT NULL
        REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    properties jsonb NOT NULL DEFAULT '{}',
    properties_last_updated_at jsonb DEFAULT '{}',
    properties_last_operation jsonb,
    is_user_id integer,
    is_identified boolean NOT NULL DEFAULT false,
    version bigint
) WITH (fillfactor = 75);

-- Same names as in PostHog, so these are no-ops on a PostHog database.
-- Lookups by (team_id, uuid) and the per-team listing.
CREATE INDEX IF NOT EXISTS posthog_person_uuid_82b4a3ed ON posthog_person (uuid);
CREATE INDEX IF NOT EXISTS posthog_person_team_id_325c1b73 ON posthog_person (team_id);
CREATE INDEX IF NOT EXISTS posthog_per_team_id_bec4e5_idx ON posthog_person (team_id, id DESC);

-- distinct_id -> person. The (team_id, distinct_id) key makes concurrent creation of the
-- same distinct id fail with a unique violation, which the person code treats as a race.
CREATE TABLE IF NOT EXISTS posthog_persondistinctid (
    id bigserial PRIMARY KEY,
    distinct_id varchar(400) NOT NULL,
    person_id bigint NOT NULL
        REFERENCES posthog_person (id) DEFERRABLE INITIALLY DEFERRED,
    team_id integer NOT NULL
        REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    version bigint,
    CONSTRAINT "unique distinct_id for team" UNIQUE (team_id, distinct_id)
);

-- Merges move all distinct ids WHERE person_id = ..., and the foreign key check on
-- person delete needs it too.
CREATE INDEX IF NOT EXISTS posthog_persondistinctid_person_id_5d655bba
    ON posthog_persondistinctid (person_id);

-- Cohort membership, repointed to the surviving person on merge. cohort_id has no
-- foreign key because posthog_cohort is not created here.
CREATE TABLE IF NOT EXISTS posthog_cohortpeople (
    id bigserial PRIMARY KEY,
    cohort_id integer NOT NULL,
    person_id bigint NOT NULL
        REFERENCES posthog_person (id) DEFERRABLE INITIALLY DEFERRED,
    version integer
);

CREATE INDEX IF NOT EXISTS posthog_cohortpeople_person_id_33da7d3f
    ON posthog_cohortpeople (person_id);
CREATE INDEX IF NOT EXISTS posthog_coh_cohort__89c25f_idx
    ON posthog_cohortpeople (cohort_id, person_id);
