//! `PluginRegistry`: finds the active plugin configs and their code, transpiles each plugin
//! once, and builds the `PluginSet` the VM pool runs.
//!
//! Two sources: PostHog's Postgres tables (spec 2.1: active-config rules, `source` plugins from
//! `posthog_pluginsourcefile`, `custom`/`repository` plugins from the zip in
//! `posthog_plugin.archive`, `local` plugins from `BASE_DIR`), or, in the embedded profile, a
//! directory of plugins (`BASE_DIR/plugins/<name>/`) with per-team configs from a TOML file.
//! A plugin that cannot be loaded is reported and skipped; the others run.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use deadpool_postgres::Pool;
use serde::Deserialize;
use serde_json::Value;

use super::LoadedConfig;
use super::filters::WebhookFilters;
use super::runtime::transpile::{TranspileError, transpile};
use super::runtime::{Attachment, VmIdentity, VmSource};
use super::worker::{ConfigError, ConfigFailure, SideEffects};
use crate::sqlite::Sqlite;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("reading plugin configs from Postgres failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no Postgres connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("reading {path}: {source}")]
    ReadConfigFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    ParseConfigFile {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("the embedded database's plugin ids: {0}")]
    Embedded(#[from] rusqlite::Error),
}

/// Why a plugin has no code to run; each of its configs records it as its error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginCodeError {
    #[error("the plugin has no main file (plugin.json main, index.js or index.ts)")]
    NoMainFile,
    /// Shared: the error is kept, with the plugin's other results, until the plugin changes.
    #[error("the plugin archive is not a zip: {0}")]
    NotAZip(#[source] Arc<zip::result::ZipError>),
    #[error("plugin of type {0:?} has no archive")]
    NoArchive(String),
    #[error(transparent)]
    Transpile(#[from] TranspileError),
}

/// Errors compare by kind and text: zip's errors have no equality of their own.
impl PartialEq for PluginCodeError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

impl Eq for PluginCodeError {}

/// A config that was skipped, and why; recorded as its error.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadProblem {
    pub identity: VmIdentity,
    pub message: String,
}

impl LoadProblem {
    /// Logs these skipped configs and reports them for their configs' errors. They are not
    /// disabled: PostHog's own server, which may share the database, may load them.
    pub fn report_all(problems: Vec<LoadProblem>) -> SideEffects {
        let mut side = SideEffects::default();
        for problem in problems {
            tracing::error!(plugin_config_id = problem.identity.plugin_config_id, plugin = %problem.identity.plugin_name, error = %problem.message, "A plugin could not be loaded; its config is skipped.");
            side.config_errors.push(ConfigError {
                identity: problem.identity,
                message: problem.message,
                failure: ConfigFailure::Reported,
            });
        }
        side
    }
}

/// Where plugin configs come from.
#[derive(Clone)]
pub enum RegistrySource {
    Postgres {
        pool: Pool,
        base_dir: PathBuf,
    },
    /// `plugins_dir/<name>/` holds each plugin; `configs_file` lists per-team configs.
    /// With `ids`, plugin and config ids are the embedded database's, which never move;
    /// without, they follow the folder names and the file's order.
    Directory {
        plugins_dir: PathBuf,
        configs_file: PathBuf,
        ids: Option<Sqlite>,
    },
}

/// One config as its source describes it, before transpiling.
#[derive(Debug, Clone)]
struct RawConfig {
    identity: VmIdentity,
    config: Value,
    order: i32,
    version: String,
    log_level: u8,
    attachments: Vec<Attachment>,
    /// `posthog_pluginconfig.filters` (JSON null when unset).
    filters: Value,
    /// The config's place among its plugin's configs for its team, in the configs file
    /// (0 for Postgres' configs, which have ids of their own).
    slot: u32,
}

/// A plugin's main file, or why there is none.
type MainFile = Result<(String, String), PluginCodeError>;

/// What a source yields: the configs, and each plugin's (version, main file) by plugin id.
type Sourced = (Vec<RawConfig>, HashMap<i64, (String, MainFile)>);

pub struct PluginRegistry {
    source: RegistrySource,
    /// Transpiled code by (plugin id, plugin version), so a reload transpiles only what changed.
    transpiled: HashMap<(i64, String), Result<Arc<str>, PluginCodeError>>,
}

impl PluginRegistry {
    pub fn new(source: RegistrySource) -> Self {
        Self {
            source,
            transpiled: HashMap::new(),
        }
    }

    /// Reads every active config. Configs whose plugin cannot be loaded come back as problems.
    pub async fn load(&mut self) -> Result<(Vec<LoadedConfig>, Vec<LoadProblem>), RegistryError> {
        let (configs, mains) = match &self.source {
            RegistrySource::Postgres { pool, base_dir } => load_postgres(pool, base_dir).await?,
            RegistrySource::Directory {
                plugins_dir,
                configs_file,
                ids,
            } => {
                let (mut configs, mut mains) = load_directory(plugins_dir, configs_file)?;
                if let Some(database) = ids {
                    stable_ids(database, &mut configs, &mut mains).await?;
                }
                (configs, mains)
            }
        };
        let mut loaded = Vec::with_capacity(configs.len());
        let mut problems = Vec::new();
        let mut used = std::collections::HashSet::new();
        for raw in configs {
            let plugin_id = raw.identity.plugin_id;
            let Some((plugin_version, main)) = mains.get(&plugin_id) else {
                problems.push(LoadProblem {
                    identity: raw.identity,
                    message: "the plugin has no code".into(),
                });
                continue;
            };
            let key = (plugin_id, plugin_version.clone());
            used.insert(key.clone());
            let code = self
                .transpiled
                .entry(key)
                .or_insert_with(|| match main {
                    Ok((file_name, text)) => transpile(text, file_name)
                        .map(Arc::from)
                        .map_err(PluginCodeError::from),
                    Err(error) => Err(error.clone()),
                })
                .clone();
            match code {
                Ok(code) => {
                    let file_name = main
                        .as_ref()
                        .map(|(name, _)| name.clone())
                        .unwrap_or_default();
                    loaded.push(LoadedConfig {
                        identity: raw.identity,
                        source: VmSource { file_name, code },
                        config: raw.config,
                        attachments: raw.attachments,
                        order: raw.order,
                        version: format!("{}/{}", raw.version, plugin_version),
                        log_level: raw.log_level,
                        webhook_filters: WebhookFilters::from_json(&raw.filters),
                    });
                }
                Err(error) => problems.push(LoadProblem {
                    identity: raw.identity,
                    message: error.to_string(),
                }),
            }
        }
        self.transpiled.retain(|key, _| used.contains(key));
        Ok((loaded, problems))
    }
}

// ---------------------------------------------------------------------------------------------
// Postgres

const ACTIVE_CONFIGS: &str = r#"
SELECT pc.id, pc.team_id, pc.plugin_id, pc."order", pc.config,
       pc.updated_at::text AS config_version, COALESCE(p.updated_at, p.created_at)::text AS plugin_version,
       COALESCE(p.name, ''), COALESCE(p.plugin_type, ''), COALESCE(p.url, ''), COALESCE(p.log_level, 0),
       pc.filters
FROM posthog_pluginconfig pc
JOIN posthog_plugin p ON p.id = pc.plugin_id
JOIN posthog_team t ON t.id = pc.team_id
JOIN posthog_organization o ON o.id = t.organization_id
WHERE pc.enabled AND NOT COALESCE(pc.deleted, false) AND o.plugins_access_level > 0
  AND (p.organization_id = t.organization_id OR p.is_global)
"#;

async fn load_postgres(pool: &Pool, base_dir: &Path) -> Result<Sourced, RegistryError> {
    let client = pool.get().await?;
    let rows = client.query(ACTIVE_CONFIGS, &[]).await?;
    let mut configs = Vec::with_capacity(rows.len());
    let mut plugins: HashMap<i64, (String, String, String)> = HashMap::new();
    for row in &rows {
        let plugin_id = i64::from(row.get::<_, i32>(2));
        let identity = VmIdentity {
            plugin_config_id: i64::from(row.get::<_, i32>(0)),
            team_id: i64::from(row.get::<_, i32>(1)),
            plugin_id,
            plugin_name: row.get(7),
        };
        plugins.insert(plugin_id, (row.get(8), row.get(9), row.get(6)));
        configs.push(RawConfig {
            identity,
            config: row.get(4),
            order: row.get(3),
            version: row.get(5),
            log_level: u8::try_from(row.get::<_, i32>(10).clamp(0, 4)).unwrap_or(0),
            attachments: Vec::new(),
            filters: row.get::<_, Option<Value>>(11).unwrap_or(Value::Null),
            slot: 0,
        });
    }

    let config_ids: Vec<i32> = configs
        .iter()
        .filter_map(|c| i32::try_from(c.identity.plugin_config_id).ok())
        .collect();
    let attachment_rows = client
        .query(
            "SELECT plugin_config_id, key, content_type, file_name, contents FROM posthog_pluginattachment \
             WHERE plugin_config_id = ANY($1)",
            &[&config_ids],
        )
        .await?;
    let mut attachments: HashMap<i64, Vec<Attachment>> = HashMap::new();
    for row in attachment_rows {
        attachments
            .entry(i64::from(row.get::<_, i32>(0)))
            .or_default()
            .push(Attachment {
                key: row.get(1),
                content_type: row.get(2),
                file_name: row.get(3),
                contents: row.get(4),
            });
    }
    for config in &mut configs {
        config.attachments = attachments
            .remove(&config.identity.plugin_config_id)
            .unwrap_or_default();
    }

    let plugin_ids: Vec<i32> = plugins
        .keys()
        .filter_map(|id| i32::try_from(*id).ok())
        .collect();
    let mut files: HashMap<i64, HashMap<String, String>> = HashMap::new();
    for row in client
        .query(
            "SELECT plugin_id, filename, source FROM posthog_pluginsourcefile WHERE plugin_id = ANY($1) AND source IS NOT NULL",
            &[&plugin_ids],
        )
        .await?
    {
        files.entry(i64::from(row.get::<_, i32>(0))).or_default().insert(row.get(1), row.get(2));
    }
    let mut archives: HashMap<i64, Vec<u8>> = HashMap::new();
    for row in client
        .query(
            "SELECT id, archive FROM posthog_plugin WHERE id = ANY($1) AND archive IS NOT NULL",
            &[&plugin_ids],
        )
        .await?
    {
        archives.insert(i64::from(row.get::<_, i32>(0)), row.get(1));
    }

    let mut mains = HashMap::new();
    for (plugin_id, (plugin_type, url, version)) in plugins {
        let main = match plugin_type.as_str() {
            "source" => main_from_files(files.remove(&plugin_id).unwrap_or_default()),
            "local" => {
                let folder = base_dir.join(url.trim_start_matches("file:"));
                main_from_directory(&folder)
            }
            _ => match archives.remove(&plugin_id) {
                Some(archive) => main_from_archive(&archive),
                None => Err(PluginCodeError::NoArchive(plugin_type)),
            },
        };
        mains.insert(plugin_id, (version, main));
    }
    Ok((configs, mains))
}

/// The main file named by plugin.json, else index.js, else index.ts.
fn pick_main(plugin_json: Option<&str>, mut read: impl FnMut(&str) -> Option<String>) -> MainFile {
    let declared = plugin_json
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .and_then(|json| {
            json.get("main")
                .and_then(Value::as_str)
                .map(|m| m.trim_start_matches("./").to_string())
        });
    let candidates = declared
        .into_iter()
        .chain(["index.js".to_string(), "index.ts".to_string()]);
    for name in candidates {
        if let Some(text) = read(&name) {
            return Ok((name, text));
        }
    }
    Err(PluginCodeError::NoMainFile)
}

fn main_from_files(mut files: HashMap<String, String>) -> MainFile {
    let plugin_json = files.get("plugin.json").cloned();
    pick_main(plugin_json.as_deref(), |name| files.remove(name))
}

fn main_from_directory(folder: &Path) -> MainFile {
    let plugin_json = std::fs::read_to_string(folder.join("plugin.json")).ok();
    pick_main(plugin_json.as_deref(), |name| {
        std::fs::read_to_string(folder.join(name)).ok()
    })
}

/// PostHog keeps a repository zip whose single top folder holds plugin.json and the code.
fn main_from_archive(archive: &[u8]) -> MainFile {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(archive))
        .map_err(|error| PluginCodeError::NotAZip(Arc::new(error)))?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(Result::ok)
        .map(|name| name.into_owned())
        .collect();
    let prefix = names
        .iter()
        .find_map(|name| name.split_once('/').map(|(top, _)| format!("{top}/")))
        .unwrap_or_default();
    let mut read = |name: &str| -> Option<String> {
        let mut file = zip.by_name(&format!("{prefix}{name}")).ok()?;
        let mut text = String::new();
        file.read_to_string(&mut text).ok()?;
        Some(text)
    };
    let plugin_json = read("plugin.json");
    pick_main(plugin_json.as_deref(), read)
}

// ---------------------------------------------------------------------------------------------
// Directory (embedded profile)

/// The configs file: `[[plugin_config]]` tables.
#[derive(Debug, Deserialize)]
struct ConfigsFile {
    #[serde(default)]
    plugin_config: Vec<ConfigEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigEntry {
    /// The plugin's folder under `BASE_DIR/plugins/`.
    plugin: String,
    team_id: i64,
    #[serde(default)]
    order: i32,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
    #[serde(default)]
    log_level: u8,
    /// `meta.config`.
    #[serde(default)]
    config: serde_json::Map<String, Value>,
    /// Which events reach `composeWebhook`, as PostHog's `pluginConfig.filters`:
    /// `filters = { events = [{ name = "$pageview", properties = [...] }] }`.
    #[serde(default)]
    filters: Option<Value>,
}

fn enabled_by_default() -> bool {
    true
}

fn load_directory(plugins_dir: &Path, configs_file: &Path) -> Result<Sourced, RegistryError> {
    let text = match std::fs::read_to_string(configs_file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(RegistryError::ReadConfigFile {
                path: configs_file.to_path_buf(),
                source,
            });
        }
    };
    let file: ConfigsFile =
        toml::from_str(&text).map_err(|source| RegistryError::ParseConfigFile {
            path: configs_file.to_path_buf(),
            source,
        })?;

    // Plugin ids follow the sorted folder names, so they are stable across restarts.
    let mut names: Vec<String> = file
        .plugin_config
        .iter()
        .map(|c| c.plugin.clone())
        .collect();
    names.sort_unstable();
    names.dedup();
    let ids: HashMap<String, i64> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (name.clone(), i as i64 + 1))
        .collect();

    let mut mains = HashMap::new();
    for name in &names {
        let folder = plugins_dir.join(name);
        let main = main_from_directory(&folder);
        let version = match &main {
            Ok((_, text)) => format!("{:x}", fingerprint(text.as_bytes())),
            Err(_) => String::new(),
        };
        mains.insert(ids[name.as_str()], (version, main));
    }
    let mut configs = Vec::new();
    let mut slots: HashMap<(String, i64), u32> = HashMap::new();
    for (index, entry) in file.plugin_config.into_iter().enumerate() {
        // Counted for disabled entries too, so disabling one moves no other's id.
        let slot = slots
            .entry((entry.plugin.clone(), entry.team_id))
            .and_modify(|slot| *slot += 1)
            .or_insert(0);
        let slot = *slot;
        if !entry.enabled {
            continue;
        }
        let config = Value::Object(entry.config);
        let filters = entry.filters.unwrap_or(Value::Null);
        configs.push(RawConfig {
            identity: VmIdentity {
                plugin_config_id: index as i64 + 1,
                plugin_id: ids[entry.plugin.as_str()],
                team_id: entry.team_id,
                plugin_name: entry.plugin.clone(),
            },
            version: format!("{:x}", fingerprint(format!("{config}{filters}").as_bytes())),
            config,
            order: entry.order,
            log_level: entry.log_level,
            attachments: Vec::new(),
            filters,
            slot,
        });
    }
    Ok((configs, mains))
}

/// Gives the directory's plugins and configs the embedded database's ids: a plugin by its
/// folder, a config by its plugin, team and slot; new ones get the next free id.
async fn stable_ids(
    database: &Sqlite,
    configs: &mut [RawConfig],
    mains: &mut HashMap<i64, (String, MainFile)>,
) -> Result<(), rusqlite::Error> {
    let connection = database.lock().await;
    // One transaction: one fsync for a whole directory of new configs, not two per config.
    let transaction = connection.unchecked_transaction()?;
    let mut plugin_ids: HashMap<i64, i64> = HashMap::new();
    for config in configs.iter_mut() {
        let identity = &mut config.identity;
        let plugin_id = match plugin_ids.get(&identity.plugin_id) {
            Some(id) => *id,
            None => {
                transaction
                    .prepare_cached(
                        "INSERT INTO plugins (name) VALUES (?1) ON CONFLICT (name) DO NOTHING",
                    )?
                    .execute([&identity.plugin_name])?;
                let id: i64 = transaction
                    .prepare_cached("SELECT id FROM plugins WHERE name = ?1")?
                    .query_row([&identity.plugin_name], |row| row.get(0))?;
                plugin_ids.insert(identity.plugin_id, id);
                id
            }
        };
        let key = rusqlite::params![identity.plugin_name, identity.team_id, config.slot];
        transaction
            .prepare_cached(
                "INSERT INTO plugin_configs (plugin, team_id, slot) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (plugin, team_id, slot) DO NOTHING",
            )?
            .execute(key)?;
        identity.plugin_config_id = transaction
            .prepare_cached(
                "SELECT id FROM plugin_configs WHERE plugin = ?1 AND team_id = ?2 AND slot = ?3",
            )?
            .query_row(key, |row| row.get(0))?;
        identity.plugin_id = plugin_id;
    }
    transaction.commit()?;
    *mains = std::mem::take(mains)
        .into_iter()
        .filter_map(|(old, main)| Some((*plugin_ids.get(&old)?, main)))
        .collect();
    Ok(())
}

/// FNV-1a: a stable fingerprint for change detection (not security).
fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn main_file_follows_plugin_json_then_index_js_then_index_ts() {
        let files = HashMap::from([
            (
                "plugin.json".to_string(),
                r#"{"name": "x", "main": "dist/index.js"}"#.to_string(),
            ),
            ("dist/index.js".to_string(), "bundled".to_string()),
            ("index.ts".to_string(), "ts".to_string()),
        ]);
        assert_eq!(
            main_from_files(files),
            Ok(("dist/index.js".into(), "bundled".into()))
        );
        let files = HashMap::from([("index.ts".to_string(), "ts".to_string())]);
        assert_eq!(main_from_files(files), Ok(("index.ts".into(), "ts".into())));
        assert!(main_from_files(HashMap::new()).is_err());
    }

    #[test]
    fn archives_are_read_from_their_top_folder() {
        let mut buffer = std::io::Cursor::new(Vec::new());
        {
            let mut zip = zip::ZipWriter::new(&mut buffer);
            let options = zip::write::SimpleFileOptions::default();
            zip.start_file("repo-main/plugin.json", options)
                .expect("zip");
            zip.write_all(br#"{"main": "src/main.js"}"#).expect("zip");
            zip.start_file("repo-main/src/main.js", options)
                .expect("zip");
            zip.write_all(b"exports.processEvent = (e) => e")
                .expect("zip");
            zip.finish().expect("zip");
        }
        let main = main_from_archive(buffer.get_ref()).expect("main file");
        assert_eq!(main.0, "src/main.js");
        assert!(main.1.contains("processEvent"));
        assert!(main_from_archive(b"not a zip").is_err());
    }

    #[tokio::test]
    async fn directory_source_loads_configs_in_file_order_and_reports_broken_plugins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugins = dir.path().join("plugins");
        std::fs::create_dir_all(plugins.join("suffix")).expect("mkdir");
        std::fs::write(
            plugins.join("suffix/index.ts"),
            "export function processEvent(e: any, { config }: any) { e.event += config.suffix; return e }",
        )
        .expect("write");
        std::fs::create_dir_all(plugins.join("broken")).expect("mkdir");
        std::fs::write(plugins.join("broken/index.js"), "function (").expect("write");
        let configs = dir.path().join("plugins.toml");
        std::fs::write(
            &configs,
            r#"
            [[plugin_config]]
            plugin = "suffix"
            team_id = 2
            order = 1
            config = { suffix = "_a" }
            filters = { events = [{ name = "$pageview", properties = [{ key = "a", value = 1, type = "event" }] }] }

            [[plugin_config]]
            plugin = "broken"
            team_id = 2

            [[plugin_config]]
            plugin = "suffix"
            team_id = 3
            enabled = false
            "#,
        )
        .expect("write");
        let mut registry = PluginRegistry::new(RegistrySource::Directory {
            plugins_dir: plugins,
            configs_file: configs,
            ids: None,
        });
        let (loaded, problems) = registry.load().await.expect("loads");
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].identity.team_id, 2);
        assert_eq!(loaded[0].config["suffix"], "_a");
        let filters = loaded[0].webhook_filters.as_ref().expect("filters");
        let event = serde_json::json!({"event": "$pageview", "properties": {"a": 1}});
        let subject = super::super::filters::FilterSubject {
            event: &event,
            person_properties: None,
        };
        assert_eq!(filters.matches(subject), Ok(true));
        assert!(
            !loaded[0].source.code.contains("export "),
            "{}",
            loaded[0].source.code
        );
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].identity.plugin_name, "broken");
    }

    /// With the embedded database, ids survive a new plugin folder sorting first and the
    /// file's entries being reordered (storage and jobs belong to a config id).
    #[tokio::test]
    async fn embedded_ids_stay_when_plugins_are_added_and_configs_reordered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugins = dir.path().join("plugins");
        for name in ["alpha", "beta", "zeta"] {
            std::fs::create_dir_all(plugins.join(name)).expect("mkdir");
            std::fs::write(
                plugins.join(name).join("index.js"),
                "exports.processEvent = (e) => e",
            )
            .expect("write");
        }
        let configs = dir.path().join("plugins.toml");
        let entry = |plugin: &str, team: i64| {
            format!("[[plugin_config]]\nplugin = \"{plugin}\"\nteam_id = {team}\n")
        };
        let database = Sqlite::in_memory().expect("sqlite");
        let load = |text: String| {
            let (plugins, configs, database) = (plugins.clone(), configs.clone(), database.clone());
            async move {
                std::fs::write(&configs, text).expect("write");
                let mut registry = PluginRegistry::new(RegistrySource::Directory {
                    plugins_dir: plugins,
                    configs_file: configs,
                    ids: Some(database),
                });
                let (loaded, _) = registry.load().await.expect("loads");
                loaded
                    .into_iter()
                    .map(|config| {
                        let identity = config.identity;
                        (
                            (identity.plugin_name, identity.team_id),
                            (identity.plugin_id, identity.plugin_config_id),
                        )
                    })
                    .collect::<HashMap<_, _>>()
            }
        };
        let first = load(entry("zeta", 1) + &entry("beta", 1) + &entry("beta", 2)).await;
        // alpha sorts first and its entry comes first; the others keep their ids.
        let second =
            load(entry("alpha", 1) + &entry("beta", 2) + &entry("beta", 1) + &entry("zeta", 1))
                .await;
        for key in first.keys() {
            assert_eq!(first[key], second[key], "{key:?}");
        }
        let alpha = second[&("alpha".to_owned(), 1)];
        assert!(
            first
                .values()
                .all(|ids| ids.0 != alpha.0 && ids.1 != alpha.1)
        );
    }
}
