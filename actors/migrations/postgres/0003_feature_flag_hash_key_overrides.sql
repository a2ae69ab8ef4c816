-- Feature-flag hash-key overrides, which a person merge carries over to the surviving person
-- (spec 1.5 mergePeople) so that the merged user keeps seeing the same flag variants.
-- The same rules as 0001: IF NOT EXISTS, constraints only inside CREATE TABLE, PostHog's
-- index names, deferred foreign keys without ON DELETE actions.

CREATE TABLE IF NOT EXISTS posthog_featureflaghashkeyoverride (
    id bigserial PRIMARY KEY,
    feature_flag_key varchar(400) NOT NULL,
    person_id bigint NOT NULL
        REFERENCES posthog_person (id) DEFERRABLE INITIALLY DEFERRED,
    team_id integer NOT NULL
        REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    hash_key varchar(400) NOT NULL,
    CONSTRAINT "Unique hash_key for a user/team/feature_flag combo"
        UNIQUE (team_id, person_id, feature_flag_key)
);

CREATE INDEX IF NOT EXISTS posthog_featureflaghashkeyoverride_person_id_7e517f7c
    ON posthog_featureflaghashkeyoverride (person_id);
