-- PostHog's person_mode column: full (the person step ran), propertyless
-- ($process_person_profile: false, no person created or changed) or force_upgrade (personless,
-- but the distinct id's person is older than a minute and takes the event). ClickHouse 18.16
-- has no ADD COLUMN IF NOT EXISTS; the runner's bookkeeping applies this once.
ALTER TABLE events ADD COLUMN person_mode Enum8('full' = 0, 'propertyless' = 1, 'force_upgrade' = 2) DEFAULT 'full';
