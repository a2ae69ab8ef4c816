-- posthog.api (spec 3, plugin-compat): plugins call PostHog's API as a bot user of their
-- organization, with a personal API key the server creates. PostHog's own tables; on a real
-- PostHog database Django created them and these statements are no-ops.
-- The same rules as 0001: IF NOT EXISTS, constraints only inside CREATE TABLE, deferred foreign
-- keys without ON DELETE actions; the DEFAULTs are extra, for minimal setups and tests.

-- Only the columns PostHog requires (NOT NULL) and the ones the server reads or writes;
-- everything else in PostHog's model is nullable.
CREATE TABLE IF NOT EXISTS posthog_user (
    id serial PRIMARY KEY,
    password varchar(128) NOT NULL,
    last_login timestamptz,
    first_name varchar(150) NOT NULL,
    last_name varchar(150) NOT NULL DEFAULT '',
    email varchar(254) NOT NULL UNIQUE,
    is_staff boolean NOT NULL DEFAULT false,
    is_active boolean NOT NULL DEFAULT true,
    date_joined timestamptz NOT NULL DEFAULT now(),
    uuid uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    distinct_id varchar(200) UNIQUE,
    current_organization_id uuid
        REFERENCES posthog_organization (id) DEFERRABLE INITIALLY DEFERRED,
    current_team_id integer
        REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    events_column_config jsonb NOT NULL DEFAULT '{"active": "DEFAULT"}'
);

-- level: 1 member, 8 admin, 15 owner.
CREATE TABLE IF NOT EXISTS posthog_organizationmembership (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL
        REFERENCES posthog_organization (id) DEFERRABLE INITIALLY DEFERRED,
    user_id integer NOT NULL
        REFERENCES posthog_user (id) DEFERRABLE INITIALLY DEFERRED,
    level smallint NOT NULL DEFAULT 1 CHECK (level >= 0),
    joined_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT unique_organization_membership UNIQUE (organization_id, user_id)
);

-- secure_value is how PostHog finds a presented key: 'sha256$' || hex(sha256(key)) (or an
-- older PBKDF2 form). The key itself is never stored; mask_value is what the UI shows of it.
CREATE TABLE IF NOT EXISTS posthog_personalapikey (
    id varchar(50) PRIMARY KEY,
    user_id integer NOT NULL
        REFERENCES posthog_user (id) DEFERRABLE INITIALLY DEFERRED,
    label varchar(40) NOT NULL,
    value varchar(50) UNIQUE,
    secure_value varchar(300) UNIQUE,
    mask_value varchar(11),
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    team_id integer
        REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    scopes varchar(100)[],
    scoped_teams integer[],
    scoped_organizations varchar(100)[]
);
