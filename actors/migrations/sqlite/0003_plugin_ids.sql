-- Stable ids for the plugins and plugin configs of BASE_DIR/plugins and the plugin config file:
-- meta.storage and queued jobs belong to a config id, so an id must not move when folders are
-- added or the file's entries are reordered. A plugin is its folder; a config is its plugin,
-- its team, and its place among that plugin's configs for that team in the file.

CREATE TABLE IF NOT EXISTS plugins (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);

CREATE TABLE IF NOT EXISTS plugin_configs (
    id INTEGER PRIMARY KEY,
    plugin TEXT NOT NULL,
    team_id INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    UNIQUE (plugin, team_id, slot)
);
