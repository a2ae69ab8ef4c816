-- The compose deployment's first-run sample: one organization, team 1 with the API token
-- `phc_compose`, and the repository's hello-world plugin (a `local` plugin: the image carries
-- it in BASE_DIR/plugins, /app/data/plugins/hello-world, named relative to BASE_DIR) enabled
-- for it. Safe to run on every start: existing rows are left alone.
INSERT INTO posthog_organization (id, name)
VALUES ('00000000-0000-0000-0000-000000000001', 'Sample organization')
ON CONFLICT DO NOTHING;

INSERT INTO posthog_team (id, organization_id, api_token, name)
VALUES (1, '00000000-0000-0000-0000-000000000001', 'phc_compose', 'Sample team')
ON CONFLICT DO NOTHING;

INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, url, updated_at)
VALUES (1, '00000000-0000-0000-0000-000000000001', 'local', 'Hello World',
        'file:plugins/hello-world', now())
ON CONFLICT DO NOTHING;

INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, "order", config)
VALUES (1, 1, 1, true, 1, '{"greeting": "hello from plugin-server"}')
ON CONFLICT DO NOTHING;

-- The ids above were given explicitly; move the sequences past them for rows PostHog adds.
SELECT setval(pg_get_serial_sequence('posthog_team', 'id'), GREATEST(1, (SELECT max(id) FROM posthog_team)));
SELECT setval(pg_get_serial_sequence('posthog_plugin', 'id'), GREATEST(1, (SELECT max(id) FROM posthog_plugin)));
SELECT setval(pg_get_serial_sequence('posthog_pluginconfig', 'id'), GREATEST(1, (SELECT max(id) FROM posthog_pluginconfig)));
