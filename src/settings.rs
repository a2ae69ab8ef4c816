//! The one `Settings` struct, loaded once at startup.
//!
//! Layers, each overriding the last: the embedded `config/default.toml`, then an optional
//! profile (`--profile NAME`: `config/NAME.toml`), then an optional `--config FILE`, then the
//! environment. Env var names are PostHog's (`DATABASE_URL`, `KAFKA_HOSTS`, ...); the config
//! crate lowercases them onto the fields below. After deserializing, `validate` checks what the
//! types cannot, so that a bad value stops startup with one line naming the variable.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, ConfigError, Environment, File, FileFormat};
use plugin_server_actors::clickhouse_client::BodyCompression;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use url::Url;

/// Profiles shipped inside the binary, so that it runs from any directory or container.
const EMBEDDED_PROFILES: &[(&str, &str)] = &[
    ("default", include_str!("../config/default.toml")),
    ("cluster", include_str!("../config/cluster.toml")),
    ("test", include_str!("../config/test.toml")),
];

/// Why the settings could not be loaded. Every variant renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid {var}: {reason}")]
    Invalid { var: String, reason: String },
    #[error("cannot load config file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("unknown profile {name:?}: neither built in ({builtin}) nor found at {path}")]
    UnknownProfile {
        name: String,
        builtin: String,
        path: String,
    },
    #[error("invalid settings: {0}")]
    Other(String),
}

impl SettingsError {
    fn invalid(var: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            var: var.to_owned(),
            reason: reason.into(),
        }
    }

    /// Maps the config crate's errors onto the env var they are about.
    fn from_config(error: ConfigError) -> Self {
        match error {
            ConfigError::Type {
                key: Some(key),
                unexpected,
                expected,
                ..
            } => Self::invalid(
                &key.to_uppercase(),
                format!("expected {expected}, got {unexpected}"),
            ),
            ConfigError::At {
                error,
                key: Some(key),
                ..
            } => Self::invalid(&key.to_uppercase(), error.to_string()),
            ConfigError::FileParse { uri, cause } => Self::File {
                path: uri.unwrap_or_else(|| "<embedded>".to_owned()),
                reason: cause.to_string(),
            },
            other => Self::Other(other.to_string()),
        }
    }
}

/// What to load, beyond the embedded defaults. `env: None` reads the process environment;
/// tests pass a map instead, because the process environment is shared between test threads.
#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    pub profile: Option<String>,
    pub config_file: Option<PathBuf>,
    pub env: Option<HashMap<String, String>>,
}

/// Every setting the server reads, under PostHog's names. Defaults live in `config/default.toml`.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub database_url: String,
    pub posthog_db_name: String,
    pub posthog_db_user: String,
    pub posthog_db_password: String,
    pub posthog_postgres_host: String,
    pub posthog_postgres_port: u16,

    pub redis_url: String,
    pub posthog_redis_host: String,
    pub posthog_redis_port: u16,
    pub posthog_redis_password: String,
    pub redis_pool_min_size: usize,
    pub redis_pool_max_size: usize,
    pub cluster_prefix: String,

    pub clickhouse_host: String,
    pub clickhouse_offline_cluster_host: String,
    pub clickhouse_database: String,
    pub clickhouse_user: String,
    pub clickhouse_password: String,
    pub clickhouse_ca: String,
    pub clickhouse_compression: String,
    #[serde(deserialize_with = "deserialize_flag")]
    pub clickhouse_secure: bool,
    pub clickhouse_json_events_kafka_topic: String,

    pub kafka_hosts: String,
    pub kafka_prefix: String,
    pub kafka_security_protocol: String,
    pub kafka_sasl_mechanism: String,
    pub kafka_sasl_user: String,
    pub kafka_sasl_password: String,
    pub kafka_client_cert_b64: String,
    pub kafka_client_cert_key_b64: String,
    pub kafka_trusted_cert_b64: String,
    pub kafka_consumption_topic: String,
    /// Read by the `ingestion-overflow` capability.
    pub kafka_consumption_overflow_topic: String,
    /// The ingestion consumer reroutes each `team_id|token:distinct_id` over its token bucket
    /// (and keyless messages) to KAFKA_CONSUMPTION_OVERFLOW_TOPIC.
    #[serde(deserialize_with = "deserialize_flag")]
    pub ingestion_overflow_enabled: bool,
    /// Events a key may send at once before its messages overflow.
    pub event_overflow_bucket_capacity: u32,
    /// Events per second a key's bucket regains.
    pub event_overflow_bucket_replenish_rate: f64,
    pub kafka_producer_max_queue_size: u64,
    pub kafka_max_message_batch_size: u64,
    pub kafka_flush_frequency_ms: u64,
    pub kafka_partitions_consumed_concurrently: u32,
    /// Not PostHog's: with CLICKHOUSE_HOST set, also produce event rows and ingestion warnings
    /// to PostHog's topics (for ClickHouse Kafka-engine tables next to the direct inserts).
    #[serde(deserialize_with = "deserialize_flag")]
    pub kafka_produce_clickhouse_rows: bool,
    /// Not PostHog's: the consumer group session timeout (librdkafka `session.timeout.ms`).
    /// A group join takes about half of it on some brokers, so tests lower it.
    pub kafka_session_timeout_ms: u64,
    /// The most messages the ingestion consumer hands the pipeline as one batch (PostHog's
    /// newer consumers read this name, with a far smaller default there, for batches processed
    /// event by event). Under a backlog batches fill up to it; at lower rates a batch is cut
    /// 100 ms after its first message. The person step writes each changed person once per
    /// batch, and ClickHouse's cost per row falls with the insert's size, so larger batches
    /// drain a backlog faster, for more memory and a longer wait for a batch's first events.
    pub consumer_batch_size: usize,
    /// Not PostHog's: the most message bytes in one consumer batch, which bounds the memory
    /// batches hold (KAFKA_PARTITIONS_CONSUMED_CONCURRENTLY + 2 of them at once, each several
    /// times its raw size while it is parsed and written).
    pub consumer_batch_max_bytes: usize,

    /// 0 means one worker thread per core.
    pub worker_concurrency: usize,
    /// Not PostHog's: the plugin threads for onEvent, composeWebhook, exportEvents,
    /// scheduled tasks and jobs, apart from processEvent's. 0 means as many as
    /// `worker_concurrency` gives.
    pub async_worker_concurrency: usize,
    pub tasks_per_worker: usize,
    /// Seconds.
    pub task_timeout: u64,
    /// Not PostHog's: megabytes of heap the plugin VMs may hold in all (as each took it to
    /// load); a worker thread that finds the total above it tears down its own least recently
    /// used VMs. 0: no limit.
    pub plugin_vm_memory_budget_mb: u64,
    /// Not PostHog's: a plugin VM unused this many seconds is torn down. 0: never.
    pub plugin_vm_idle_teardown_seconds: u64,
    /// Not PostHog's: where plugin workers run, `process` (one process per worker, which the
    /// server can end: a stopped call gives its memory back) or `thread` (threads of the
    /// server, as PostHog's worker threads).
    pub plugin_worker_isolation: String,

    pub base_dir: PathBuf,
    pub plugins_reload_pubsub_channel: String,
    pub reload_plugin_jitter_max_ms: u64,
    /// Seconds.
    pub schedule_lock_ttl: u64,
    /// Not PostHog's: the periods of runEveryMinute/Hour/Day, in ms (shorter only in tests).
    pub schedule_minute_ms: u64,
    pub schedule_hour_ms: u64,
    pub schedule_day_ms: u64,
    /// Not PostHog's: the longest wait between two looks at the plugin job queue, in ms (jobs
    /// queued elsewhere wake the runner at once through Postgres NOTIFY).
    pub job_queue_poll_interval_ms: u64,
    pub external_request_timeout_ms: u64,
    /// SITE_URL: the PostHog app's address, for the links in action webhook messages.
    pub site_url: String,
    /// Not PostHog's: per-team plugin configs in the embedded profile (no Postgres).
    pub plugins_config_file: PathBuf,
    /// Not PostHog's: in the embedded profile, what a token no `[[team]]` names gets: `create`
    /// (a team, remembered) or `refuse` (PostHog's 401).
    pub embedded_unknown_tokens: String,
    /// Not PostHog's: refuse plugin `fetch` to loopback, private and link-local addresses.
    #[serde(deserialize_with = "deserialize_flag")]
    pub fetch_refuse_private_addresses: bool,
    pub app_metrics_flush_frequency_ms: u64,

    pub distinct_id_lru_size: usize,
    /// Seconds.
    pub person_info_cache_ttl: u64,

    #[serde(deserialize_with = "deserialize_flag")]
    pub disable_mmdb: bool,
    pub internal_mmdb_server_port: u16,
    pub mmdb_file_location: String,
    /// PostHog's Piscina thread-pool settings: read only to say that they do not apply.
    #[serde(default)]
    pub piscina_use_atomics: Option<String>,
    #[serde(default)]
    pub piscina_atomics_timeout: Option<String>,

    pub healthcheck_max_stale_seconds: u64,
    pub http_server_host: String,
    pub http_server_port: u16,
    pub log_level: String,
    pub log_format: String,
    pub sentry_dsn: String,
    pub plugin_server_mode: String,
}

/// `PLUGIN_WORKER_ISOLATION`: where plugin workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginWorkerIsolation {
    Process,
    Thread,
}

/// `PLUGIN_SERVER_MODE`: which capabilities this instance runs (spec 5.3). Unset runs all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginServerMode {
    Ingestion,
    IngestionOverflow,
    AnalyticsIngestion,
    RecordingsIngestion,
    Async,
    Exports,
    Jobs,
    Scheduler,
}

impl PluginServerMode {
    pub const ALL: [Self; 8] = [
        Self::Ingestion,
        Self::IngestionOverflow,
        Self::AnalyticsIngestion,
        Self::RecordingsIngestion,
        Self::Async,
        Self::Exports,
        Self::Jobs,
        Self::Scheduler,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingestion => "ingestion",
            Self::IngestionOverflow => "ingestion-overflow",
            Self::AnalyticsIngestion => "analytics-ingestion",
            Self::RecordingsIngestion => "recordings-ingestion",
            Self::Async => "async",
            Self::Exports => "exports",
            Self::Jobs => "jobs",
            Self::Scheduler => "scheduler",
        }
    }

    fn parse(value: &str) -> Result<Option<Self>, SettingsError> {
        let value = value.trim();
        if value.is_empty() {
            return Ok(None);
        }
        Self::ALL
            .into_iter()
            .find(|mode| mode.as_str() == value)
            .map(Some)
            .ok_or_else(|| {
                let valid: Vec<&str> = Self::ALL.iter().map(|mode| mode.as_str()).collect();
                SettingsError::invalid(
                    "PLUGIN_SERVER_MODE",
                    format!(
                        "unknown mode {value:?}; valid modes: {} (or unset for all)",
                        valid.join(", ")
                    ),
                )
            })
    }
}

/// What an instance runs (PostHog's `src/capabilities.ts`, spec 5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The analytics ingestion consumer on KAFKA_CONSUMPTION_TOPIC.
    pub ingestion: bool,
    /// The consumer of KAFKA_CONSUMPTION_OVERFLOW_TOPIC.
    pub ingestion_overflow: bool,
    /// runEveryMinute/Hour/Day.
    pub plugin_scheduled_tasks: bool,
    /// meta.jobs.
    pub process_plugin_jobs: bool,
    /// onEvent, composeWebhook, exportEvents.
    pub process_async_handlers: bool,
    /// The GeoIP database for meta.geoip.
    pub mmdb: bool,
}

impl Capabilities {
    pub fn of(mode: Option<PluginServerMode>) -> Self {
        use PluginServerMode as M;
        let all = mode.is_none();
        let is = |modes: &[M]| all || mode.is_some_and(|mode| modes.contains(&mode));
        Self {
            ingestion: is(&[M::Ingestion, M::AnalyticsIngestion]),
            ingestion_overflow: is(&[M::IngestionOverflow]),
            plugin_scheduled_tasks: is(&[M::Async, M::Scheduler]),
            process_plugin_jobs: is(&[M::Async, M::Jobs]),
            process_async_handlers: is(&[M::Async, M::Exports]),
            mmdb: mode != Some(M::RecordingsIngestion),
        }
    }

    /// PostHog's names of the capabilities that are on, for `/_actors`.
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.mmdb, "mmdb"),
            (self.ingestion, "ingestion"),
            (self.ingestion_overflow, "ingestionOverflow"),
            (self.plugin_scheduled_tasks, "pluginScheduledTasks"),
            (self.process_plugin_jobs, "processPluginJobs"),
            (self.process_async_handlers, "processAsyncHandlers"),
            (true, "http"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

impl fmt::Display for PluginServerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `tracing` filter directive for PostHog's `LOG_LEVEL` values.
const LOG_LEVELS: &[(&str, &str)] = &[
    ("trace", "trace"),
    ("debug", "debug"),
    ("info", "info"),
    // PostHog's `log` level sits between debug and info; tracing has no such level.
    ("log", "info"),
    ("warn", "warn"),
    ("error", "error"),
    ("none", "off"),
];

const KAFKA_SECURITY_PROTOCOLS: &[&str] = &["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"];
const KAFKA_SASL_MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

impl Settings {
    /// Loads and validates the settings.
    pub fn load(options: &LoadOptions) -> Result<Self, SettingsError> {
        let mut builder = Config::builder().add_source(File::from_str(
            embedded_profile("default").unwrap_or_default(),
            FileFormat::Toml,
        ));
        if let Some(name) = options.profile.as_deref().filter(|name| *name != "default") {
            builder = builder.add_source(profile_source(name)?);
        }
        if let Some(path) = &options.config_file {
            if !path.is_file() {
                return Err(SettingsError::File {
                    path: path.display().to_string(),
                    reason: "no such file".to_owned(),
                });
            }
            builder = builder.add_source(File::from(path.as_path()).format(FileFormat::Toml));
        }
        // Empty env values count as unset, as with PostHog's `process.env.X || default`.
        let environment = Environment::default()
            .ignore_empty(true)
            .source(options.env.clone().map(|env| env.into_iter().collect()));
        let settings: Settings = builder
            .add_source(environment)
            .build()
            .and_then(Config::try_deserialize)
            .map_err(SettingsError::from_config)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what deserialization cannot: ranges, URLs, enumerations.
    pub fn validate(&self) -> Result<(), SettingsError> {
        positive("TASKS_PER_WORKER", self.tasks_per_worker as u64)?;
        positive("TASK_TIMEOUT", self.task_timeout)?;
        positive("SCHEDULE_LOCK_TTL", self.schedule_lock_ttl)?;
        positive("SCHEDULE_MINUTE_MS", self.schedule_minute_ms)?;
        positive("SCHEDULE_HOUR_MS", self.schedule_hour_ms)?;
        positive("SCHEDULE_DAY_MS", self.schedule_day_ms)?;
        positive(
            "JOB_QUEUE_POLL_INTERVAL_MS",
            self.job_queue_poll_interval_ms,
        )?;
        positive("REDIS_POOL_MAX_SIZE", self.redis_pool_max_size as u64)?;
        positive(
            "KAFKA_PARTITIONS_CONSUMED_CONCURRENTLY",
            u64::from(self.kafka_partitions_consumed_concurrently),
        )?;
        positive("KAFKA_FLUSH_FREQUENCY_MS", self.kafka_flush_frequency_ms)?;
        // librdkafka's `batch.num.messages` takes at most a million.
        if self.kafka_producer_max_queue_size > 1_000_000 {
            return Err(SettingsError::invalid(
                "KAFKA_PRODUCER_MAX_QUEUE_SIZE",
                format!(
                    "{} is more than 1000000 messages per produce request",
                    self.kafka_producer_max_queue_size
                ),
            ));
        }
        positive("KAFKA_SESSION_TIMEOUT_MS", self.kafka_session_timeout_ms)?;
        positive("CONSUMER_BATCH_SIZE", self.consumer_batch_size as u64)?;
        self.worker_isolation()?;
        positive(
            "CONSUMER_BATCH_MAX_BYTES",
            self.consumer_batch_max_bytes as u64,
        )?;
        positive(
            "HEALTHCHECK_MAX_STALE_SECONDS",
            self.healthcheck_max_stale_seconds,
        )?;
        if self.redis_pool_min_size > self.redis_pool_max_size {
            return Err(SettingsError::invalid(
                "REDIS_POOL_MIN_SIZE",
                format!(
                    "{} is larger than REDIS_POOL_MAX_SIZE ({})",
                    self.redis_pool_min_size, self.redis_pool_max_size
                ),
            ));
        }
        if let Some(url) = self.database_url() {
            check_url("DATABASE_URL", &url, &["postgres", "postgresql"])?;
        }
        if let Some(url) = self.redis_url() {
            check_url(
                "REDIS_URL",
                &url,
                &["redis", "rediss", "unix", "redis+unix"],
            )?;
        }
        if !self.clickhouse_host.trim().is_empty() {
            clickhouse_url(
                "CLICKHOUSE_HOST",
                &self.clickhouse_host,
                self.clickhouse_secure,
            )?;
        }
        if !self.clickhouse_offline_cluster_host.trim().is_empty() {
            clickhouse_url(
                "CLICKHOUSE_OFFLINE_CLUSTER_HOST",
                &self.clickhouse_offline_cluster_host,
                self.clickhouse_secure,
            )?;
        }
        check_identifier("CLICKHOUSE_DATABASE", &self.clickhouse_database)?;
        if !self.clickhouse_ca.is_empty() && !Path::new(&self.clickhouse_ca).is_file() {
            return Err(SettingsError::invalid(
                "CLICKHOUSE_CA",
                format!("no such file {:?}", self.clickhouse_ca),
            ));
        }
        one_of(
            "CLICKHOUSE_COMPRESSION",
            &self.clickhouse_compression,
            &BodyCompression::NAMES,
        )?;
        self.kafka_brokers()?;
        one_of(
            "EMBEDDED_UNKNOWN_TOKENS",
            &self.embedded_unknown_tokens,
            &["create", "refuse"],
        )?;
        one_of(
            "KAFKA_SECURITY_PROTOCOL",
            &self.kafka_security_protocol,
            KAFKA_SECURITY_PROTOCOLS,
        )?;
        one_of(
            "KAFKA_SASL_MECHANISM",
            &self.kafka_sasl_mechanism,
            KAFKA_SASL_MECHANISMS,
        )?;
        not_blank("KAFKA_CONSUMPTION_TOPIC", &self.kafka_consumption_topic)?;
        not_blank(
            "KAFKA_CONSUMPTION_OVERFLOW_TOPIC",
            &self.kafka_consumption_overflow_topic,
        )?;
        if !(self.event_overflow_bucket_replenish_rate.is_finite()
            && self.event_overflow_bucket_replenish_rate >= 0.0)
        {
            return Err(SettingsError::invalid(
                "EVENT_OVERFLOW_BUCKET_REPLENISH_RATE",
                format!(
                    "expected events per second (0 or more), got {}",
                    self.event_overflow_bucket_replenish_rate
                ),
            ));
        }
        not_blank(
            "PLUGINS_RELOAD_PUBSUB_CHANNEL",
            &self.plugins_reload_pubsub_channel,
        )?;
        if !self.sentry_dsn.is_empty() {
            check_url("SENTRY_DSN", &self.sentry_dsn, &["http", "https"])?;
        }
        self.log_filter()?;
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(SettingsError::invalid(
                "LOG_FORMAT",
                format!("expected text or json, got {:?}", self.log_format),
            ));
        }
        self.http_listen_addr()?;
        self.capabilities()?;
        Ok(())
    }

    /// `DATABASE_URL`, else a URL built from `POSTHOG_DB_NAME` and friends, else `None`
    /// (the embedded store).
    pub fn database_url(&self) -> Option<String> {
        if !self.database_url.trim().is_empty() {
            return Some(self.database_url.trim().to_owned());
        }
        if self.posthog_db_name.trim().is_empty() {
            return None;
        }
        let password = if self.posthog_db_password.is_empty() {
            String::new()
        } else {
            format!(":{}", self.posthog_db_password)
        };
        Some(format!(
            "postgres://{}{}@{}:{}/{}",
            self.posthog_db_user,
            password,
            self.posthog_postgres_host,
            self.posthog_postgres_port,
            self.posthog_db_name
        ))
    }

    /// `REDIS_URL`, else a URL built from `POSTHOG_REDIS_HOST` when set, else `None`
    /// (the in-process adapters).
    pub fn redis_url(&self) -> Option<String> {
        if !self.redis_url.trim().is_empty() {
            return Some(self.redis_url.trim().to_owned());
        }
        if self.posthog_redis_host.trim().is_empty() {
            return None;
        }
        let auth = if self.posthog_redis_password.is_empty() {
            String::new()
        } else {
            format!(":{}@", self.posthog_redis_password)
        };
        Some(format!(
            "redis://{auth}{}:{}",
            self.posthog_redis_host, self.posthog_redis_port
        ))
    }

    /// The ClickHouse HTTP endpoint, or `None` when events go to the embedded JSON-lines sink.
    /// PostHog settings this server takes but cannot apply, with why, when they are set: the
    /// server says so once at start rather than ignoring them silently.
    pub fn inapplicable(&self) -> Vec<(&'static str, &'static str)> {
        let mut ignored = Vec::new();
        if !self.clickhouse_offline_cluster_host.trim().is_empty() {
            ignored.push((
                "CLICKHOUSE_OFFLINE_CLUSTER_HOST",
                "only historical exports read it, and they are not supported",
            ));
        }
        if self.internal_mmdb_server_port != 0 {
            ignored.push((
                "INTERNAL_MMDB_SERVER_PORT",
                "GeoIP lookups run in process; there is no MMDB server to listen",
            ));
        }
        if self.piscina_use_atomics.is_some() || self.piscina_atomics_timeout.is_some() {
            ignored.push((
                "PISCINA_USE_ATOMICS / PISCINA_ATOMICS_TIMEOUT",
                "plugins run on this server's own worker threads (WORKER_CONCURRENCY), not Piscina",
            ));
        }
        ignored
    }

    pub fn clickhouse_url(&self) -> Option<String> {
        if self.clickhouse_host.trim().is_empty() {
            return None;
        }
        clickhouse_url(
            "CLICKHOUSE_HOST",
            &self.clickhouse_host,
            self.clickhouse_secure,
        )
        .ok()
    }

    /// Kafka bootstrap servers, or an empty list when Kafka is not used.
    pub fn kafka_brokers(&self) -> Result<Vec<String>, SettingsError> {
        let mut brokers = Vec::new();
        for entry in self.kafka_hosts.split(',').map(str::trim) {
            if entry.is_empty() {
                continue;
            }
            let (host, port) = entry.rsplit_once(':').unwrap_or((entry, "9092"));
            if host.is_empty() || port.parse::<u16>().map_or(true, |port| port == 0) {
                return Err(SettingsError::invalid(
                    "KAFKA_HOSTS",
                    format!("expected comma-separated host:port entries, got {entry:?}"),
                ));
            }
            brokers.push(format!("{host}:{port}"));
        }
        Ok(brokers)
    }

    /// The `tracing` filter for `LOG_LEVEL`.
    pub fn log_filter(&self) -> Result<&'static str, SettingsError> {
        let level = self.log_level.trim().to_lowercase();
        LOG_LEVELS
            .iter()
            .find(|(name, _)| *name == level)
            .map(|(_, filter)| *filter)
            .ok_or_else(|| {
                let valid: Vec<&str> = LOG_LEVELS.iter().map(|(name, _)| *name).collect();
                SettingsError::invalid(
                    "LOG_LEVEL",
                    format!(
                        "unknown level {level:?}; valid levels: {}",
                        valid.join(", ")
                    ),
                )
            })
    }

    /// `PLUGIN_SERVER_MODE`, `None` when unset (every capability).
    pub fn mode(&self) -> Result<Option<PluginServerMode>, SettingsError> {
        PluginServerMode::parse(&self.plugin_server_mode)
    }

    /// What PLUGIN_SERVER_MODE asks this instance to run. Session recordings are not ingested
    /// by this server, so `recordings-ingestion`, whose only capability they are, is refused.
    pub fn capabilities(&self) -> Result<Capabilities, SettingsError> {
        let mode = self.mode()?;
        if mode == Some(PluginServerMode::RecordingsIngestion) {
            return Err(SettingsError::invalid(
                "PLUGIN_SERVER_MODE",
                "recordings-ingestion: session recording ingestion is not supported yet by \
                 this server; run PostHog's plugin server for it"
                    .to_owned(),
            ));
        }
        Ok(Capabilities::of(mode))
    }

    /// Where the HTTP server listens: `HTTP_SERVER_HOST`:`HTTP_SERVER_PORT` (0 picks a free port).
    /// Without `HTTP_SERVER_HOST`, a fully embedded server listens on loopback only and one with
    /// any external connection on every interface.
    pub fn http_listen_addr(&self) -> Result<SocketAddr, SettingsError> {
        let host = self.http_server_host.trim();
        let ip: IpAddr = if host.is_empty() {
            if self.has_external_connection() {
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
            }
        } else {
            host.parse().map_err(|_| {
                SettingsError::invalid(
                    "HTTP_SERVER_HOST",
                    format!("expected an IP address, got {:?}", self.http_server_host),
                )
            })?
        };
        Ok(SocketAddr::new(ip, self.http_server_port))
    }

    /// Whether any part runs on an external service rather than in process.
    fn has_external_connection(&self) -> bool {
        self.database_url().is_some()
            || self.redis_url().is_some()
            || self.clickhouse_url().is_some()
            || !self.kafka_hosts.trim().is_empty()
    }

    /// Plugin worker threads: `WORKER_CONCURRENCY`, or the number of cores when it is 0.
    pub fn worker_threads(&self) -> usize {
        if self.worker_concurrency > 0 {
            return self.worker_concurrency;
        }
        std::thread::available_parallelism().map_or(1, usize::from)
    }

    pub fn task_timeout(&self) -> Duration {
        Duration::from_secs(self.task_timeout)
    }

    /// Plugin threads for the post-ingestion methods, scheduled tasks and jobs:
    /// `ASYNC_WORKER_CONCURRENCY`, or as many as processEvent's when it is 0.
    pub fn async_worker_threads(&self) -> usize {
        if self.async_worker_concurrency > 0 {
            return self.async_worker_concurrency;
        }
        self.worker_threads()
    }

    /// PLUGIN_VM_MEMORY_BUDGET_MB in bytes, for all plugin threads together (`None`: no
    /// limit).
    pub fn plugin_vm_budget_bytes(&self) -> Option<i64> {
        let total = self.plugin_vm_memory_budget_mb.checked_mul(1024 * 1024)?;
        (total > 0).then(|| i64::try_from(total).unwrap_or(i64::MAX))
    }

    /// PLUGIN_WORKER_ISOLATION.
    pub fn worker_isolation(&self) -> Result<PluginWorkerIsolation, SettingsError> {
        match self.plugin_worker_isolation.trim() {
            "process" => Ok(PluginWorkerIsolation::Process),
            "thread" => Ok(PluginWorkerIsolation::Thread),
            other => Err(SettingsError::invalid(
                "PLUGIN_WORKER_ISOLATION",
                format!("{other:?} is neither process nor thread"),
            )),
        }
    }

    /// PLUGIN_VM_IDLE_TEARDOWN_SECONDS (`None`: never).
    pub fn plugin_vm_idle(&self) -> Option<Duration> {
        (self.plugin_vm_idle_teardown_seconds > 0)
            .then(|| Duration::from_secs(self.plugin_vm_idle_teardown_seconds))
    }

    pub fn healthcheck_max_stale(&self) -> Duration {
        Duration::from_secs(self.healthcheck_max_stale_seconds)
    }
}

fn embedded_profile(name: &str) -> Option<&'static str> {
    EMBEDDED_PROFILES
        .iter()
        .find(|(profile, _)| *profile == name)
        .map(|(_, text)| *text)
}

/// A profile is `config/NAME.toml` in the working directory if present (so operators can edit
/// it), else the copy built into the binary.
fn profile_source(name: &str) -> Result<File<config::FileSourceString, FileFormat>, SettingsError> {
    let path = Path::new("config").join(format!("{name}.toml"));
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(_) => embedded_profile(name).map(str::to_owned).ok_or_else(|| {
            SettingsError::UnknownProfile {
                name: name.to_owned(),
                builtin: EMBEDDED_PROFILES
                    .iter()
                    .map(|(profile, _)| *profile)
                    .collect::<Vec<_>>()
                    .join(", "),
                path: path.display().to_string(),
            }
        })?,
    };
    Ok(File::from_str(&text, FileFormat::Toml))
}

fn positive(var: &str, value: u64) -> Result<(), SettingsError> {
    if value == 0 {
        return Err(SettingsError::invalid(var, "must be greater than 0"));
    }
    Ok(())
}

fn not_blank(var: &str, value: &str) -> Result<(), SettingsError> {
    if value.trim().is_empty() {
        return Err(SettingsError::invalid(var, "must not be empty"));
    }
    Ok(())
}

fn one_of(var: &str, value: &str, valid: &[&str]) -> Result<(), SettingsError> {
    if value.is_empty() || valid.iter().any(|v| v.eq_ignore_ascii_case(value)) {
        return Ok(());
    }
    Err(SettingsError::invalid(
        var,
        format!(
            "unknown value {value:?}; valid values: {}",
            valid.join(", ")
        ),
    ))
}

fn check_url(var: &str, value: &str, schemes: &[&str]) -> Result<Url, SettingsError> {
    let url = Url::parse(value)
        .map_err(|error| SettingsError::invalid(var, format!("not a URL ({error})")))?;
    if !schemes.contains(&url.scheme()) {
        return Err(SettingsError::invalid(
            var,
            format!(
                "unsupported scheme {:?}; expected {}",
                url.scheme(),
                schemes.join(", ")
            ),
        ));
    }
    Ok(url)
}

fn check_identifier(var: &str, value: &str) -> Result<(), SettingsError> {
    let valid = !value.is_empty()
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !value.starts_with(|c: char| c.is_ascii_digit());
    if !valid {
        return Err(SettingsError::invalid(
            var,
            format!("expected a database name of letters, digits and _, got {value:?}"),
        ));
    }
    Ok(())
}

/// PostHog takes a bare host and picks the port from `CLICKHOUSE_SECURE`; we also accept
/// `host:port` and full URLs, which is what people paste.
fn clickhouse_url(var: &str, value: &str, secure: bool) -> Result<String, SettingsError> {
    let value = value.trim();
    let (scheme, default_port) = if secure {
        ("https", 8443)
    } else {
        ("http", 8123)
    };
    let candidate = if value.contains("://") {
        value.to_owned()
    } else {
        format!("{scheme}://{value}")
    };
    let mut url = check_url(var, &candidate, &["http", "https"])?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(SettingsError::invalid(var, format!("no host in {value:?}")));
    }
    if url.port().is_none() && !value.contains("://") {
        // Cannot fail: the URL has a host and an http(s) scheme.
        let _ = url.set_port(Some(default_port));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// PostHog's booleans: y, yes, t, true, on and 1 are true. Unlike PostHog, which reads any
/// other word as false, an unknown word is an error, so that a typo does not flip a switch.
fn deserialize_flag<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    struct FlagVisitor;

    impl Visitor<'_> for FlagVisitor {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a boolean (y, yes, t, true, on, 1 or n, no, f, false, off, 0)")
        }

        fn visit_bool<E: de::Error>(self, value: bool) -> Result<bool, E> {
            Ok(value)
        }

        fn visit_i64<E: de::Error>(self, value: i64) -> Result<bool, E> {
            match value {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(E::invalid_value(de::Unexpected::Signed(value), &self)),
            }
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<bool, E> {
            match value {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(E::invalid_value(de::Unexpected::Unsigned(value), &self)),
            }
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<bool, E> {
            match value.trim().to_lowercase().as_str() {
                "y" | "yes" | "t" | "true" | "on" | "1" => Ok(true),
                "" | "n" | "no" | "f" | "false" | "off" | "0" => Ok(false),
                _ => Err(E::invalid_value(de::Unexpected::Str(value), &self)),
            }
        }
    }

    deserializer.deserialize_any(FlagVisitor)
}

#[cfg(test)]
mod tests;
