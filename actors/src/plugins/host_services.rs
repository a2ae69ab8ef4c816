//! The host services plugin VMs use in the server: `fetch` over reqwest, `meta.cache` on the
//! cluster cache (Redis in the cluster profile, in-process in the embedded one) under PostHog's
//! `@plugin/<pluginId>/<teamId>/` keys, and `meta.storage` on `posthog_pluginstorage` (or an
//! in-process map without Postgres).
//!
//! VM calls block their worker thread (see `PluginHost`), so each request is driven to
//! completion on the server's tokio runtime from that thread.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::Value;
use tokio::runtime::Handle;

use super::api_keys::{ApiKeyError, PluginApiKeys};
use super::runtime::VmIdentity;
use super::runtime::natives::{
    CacheOp, FetchReply, FetchRequest, JobRequest, PluginHost, StorageOp,
};
use crate::cluster::ClusterError;
use crate::cluster::cache::CacheStore;
use crate::geoip::GeoIpHandle;
use crate::plugins::jobs::{JobStore, JobStoreError, NewJob, RetryPolicy};
use crate::sqlite::Sqlite;

/// Why a host service failed. Its text is the message of the Error the plugin's call throws
/// (after `fetch failed: `, `cache: `, `storage: ` or `jobs: `): plugins and their authors
/// read it, so it says what went wrong in their terms.
#[derive(Debug, thiserror::Error)]
pub enum HostServiceError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Cache(#[from] ClusterError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("runAt {0} is not a representable time")]
    UnrepresentableRunAt(i64),
    #[error(transparent)]
    Jobs(#[from] JobStoreError),
    /// A host that does not offer the service at all, such as the VM benchmark's.
    #[error("{0} is not available on this host")]
    NotAvailable(&'static str),
    #[error(transparent)]
    ApiKeys(#[from] ApiKeyError),
    /// A call made in a plugin worker process failed in the server that serves it; the text
    /// is the server's error, as the plugin would have seen it on a worker thread.
    #[error("{0}")]
    InServer(String),
    #[error(
        "this server has no personal API key to give (PostHog's users are in Postgres: set \
         DATABASE_URL), so pass personalApiKey and projectApiKey"
    )]
    ApiKeysNeedPostgres,
}

/// Why a request of `fetch` or of a composed webhook was not answered.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid URL {url:?}: {source}")]
    InvalidUrl {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("only http and https URLs can be fetched, not {0:?}")]
    UnsupportedScheme(String),
    #[error("the URL has no host")]
    NoHost,
    #[error("could not resolve {host}: {source}")]
    Unresolvable {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fetching internal addresses is not allowed ({host} is {ip})")]
    InternalAddress { host: String, ip: IpAddr },
    #[error("invalid method: {0}")]
    InvalidMethod(#[source] InvalidMethod),
    /// No answer: connection, TLS, timeout or redirect failure.
    #[error(transparent)]
    Send(reqwest::Error),
    /// The answer's body could not be read.
    #[error(transparent)]
    ReadBody(reqwest::Error),
}

/// `http`'s method parse error, which reqwest does not re-export by name.
type InvalidMethod = <reqwest::Method as FromStr>::Err;

/// Why a `meta.storage` operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Query(#[from] tokio_postgres::Error),
    #[error("the cursor {0:?} does not hold a number")]
    NotANumber(String),
    #[error("the embedded database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A thread panicked while holding the in-process map.
    #[error("the storage map is poisoned")]
    Poisoned,
}

/// Where `meta.storage` keeps its values.
#[derive(Clone)]
pub enum PluginStorage {
    Postgres(Pool),
    /// The embedded profile: its SQLite database.
    Sqlite(Sqlite),
    /// Kept for the life of the process, for tests and tools.
    InProcess(Arc<Mutex<HashMap<(i64, String), String>>>),
}

#[derive(Debug, Clone)]
pub struct ServerHostConfig {
    /// EXTERNAL_REQUEST_TIMEOUT_MS: the longest a request may take, whatever the plugin asks.
    pub request_timeout: Duration,
    /// Refuse loopback, private and link-local destinations (except SITE_URL's).
    pub refuse_private_addresses: bool,
    /// SITE_URL: the PostHog app `posthog.api` calls; the operator's own, so reachable
    /// whatever its address.
    pub site_url: String,
}

/// Outgoing HTTP for plugins: their `fetch` calls and the webhooks they compose, under one
/// timeout cap and the same address policy. Cheap to clone.
#[derive(Clone)]
pub struct PluginHttp {
    client: reqwest::Client,
    config: ServerHostConfig,
}

pub struct ServerHost {
    runtime: Handle,
    http: PluginHttp,
    cache: Arc<dyn CacheStore>,
    storage: PluginStorage,
    geoip: GeoIpHandle,
    jobs: Arc<dyn JobStore>,
    /// `posthog.api`'s default keys; only with Postgres, where PostHog's users are.
    api_keys: Option<Arc<PluginApiKeys>>,
}

impl ServerHost {
    pub fn new(
        runtime: Handle,
        http: PluginHttp,
        cache: Arc<dyn CacheStore>,
        storage: PluginStorage,
        geoip: GeoIpHandle,
        jobs: Arc<dyn JobStore>,
    ) -> Self {
        Self {
            runtime,
            http,
            cache,
            storage,
            geoip,
            jobs,
            api_keys: None,
        }
    }

    pub fn with_api_keys(mut self, api_keys: Arc<PluginApiKeys>) -> Self {
        self.api_keys = Some(api_keys);
        self
    }

    async fn cache_op(&self, identity: &VmIdentity, op: CacheOp) -> Result<Value, ClusterError> {
        let store = self.cache.scoped(&format!(
            "@plugin/{}/{}/",
            identity.plugin_id, identity.team_id
        ));
        match op {
            CacheOp::Set {
                key,
                value,
                ttl_seconds,
            } => store
                .set(&key, &value, ttl_seconds.map(Duration::from_secs))
                .await
                .map(|()| Value::Null),
            CacheOp::Get { key } => store
                .get(&key)
                .await
                .map(|v| v.map_or(Value::Null, Value::String)),
            CacheOp::Incr { key } => store.incr_by(&key, 1, None).await.map(Value::from),
            CacheOp::Expire { key, ttl_seconds } => store
                .expire(&key, Duration::from_secs(ttl_seconds))
                .await
                .map(Value::from),
            CacheOp::Lpush { key, values } => {
                let values: Vec<&str> = values.iter().map(String::as_str).collect();
                store.lpush(&key, &values).await.map(Value::from)
            }
            CacheOp::Lrange { key, start, stop } => {
                store.lrange(&key, start, stop).await.map(Value::from)
            }
            CacheOp::Llen { key } => store.llen(&key).await.map(Value::from),
            CacheOp::Lrem { key, count, value } => {
                store.lrem(&key, count, &value).await.map(Value::from)
            }
            CacheOp::Lpop { key, count } => store.lpop(&key, count).await.map(Value::from),
        }
    }

    async fn storage_op(
        &self,
        identity: &VmIdentity,
        op: StorageOp,
    ) -> Result<Value, StorageError> {
        let config_id = identity.plugin_config_id;
        match &self.storage {
            PluginStorage::Postgres(pool) => postgres_storage(pool, config_id, op).await,
            PluginStorage::Sqlite(database) => {
                sqlite_storage(&*database.lock().await, config_id, op)
            }
            PluginStorage::InProcess(map) => {
                let mut map = map.lock().map_err(|_| StorageError::Poisoned)?;
                Ok(in_process_storage(&mut map, config_id, op))
            }
        }
    }
}

impl PluginHttp {
    pub fn new(client: reqwest::Client, config: ServerHostConfig) -> Self {
        Self { client, config }
    }

    /// Whether `url` is on SITE_URL's origin.
    fn is_site(&self, url: &reqwest::Url) -> bool {
        reqwest::Url::parse(&self.config.site_url).is_ok_and(|site| site.origin() == url.origin())
    }

    /// Sends the request and reads the whole answer; errors say what went wrong in words a
    /// plugin author can act on.
    pub async fn send(&self, request: FetchRequest) -> Result<FetchReply, FetchError> {
        let url = reqwest::Url::parse(&request.url).map_err(|source| FetchError::InvalidUrl {
            url: request.url.clone(),
            source,
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(FetchError::UnsupportedScheme(url.scheme().to_owned()));
        }
        if self.config.refuse_private_addresses && !self.is_site(&url) {
            refuse_private(&url).await?;
        }
        let method =
            reqwest::Method::from_str(&request.method).map_err(FetchError::InvalidMethod)?;
        let timeout = request.timeout.map_or(self.config.request_timeout, |t| {
            t.min(self.config.request_timeout)
        });
        let mut builder = self.client.request(method, url).timeout(timeout);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        if let Some(body) = request.body {
            builder = builder.body(body);
        }
        let response = builder.send().await.map_err(FetchError::Send)?;
        let status = response.status();
        let headers: BTreeMap<String, String> = response
            .headers()
            .iter()
            .filter_map(|(name, value)| {
                value
                    .to_str()
                    .ok()
                    .map(|v| (name.as_str().to_string(), v.to_string()))
            })
            .collect();
        let body = response.text().await.map_err(FetchError::ReadBody)?;
        Ok(FetchReply {
            status: status.as_u16(),
            status_text: status.canonical_reason().unwrap_or("").to_string(),
            headers,
            body,
        })
    }
}

impl PluginHost for ServerHost {
    fn fetch(&self, request: FetchRequest) -> Result<FetchReply, HostServiceError> {
        Ok(self.runtime.block_on(self.http.send(request))?)
    }

    fn cache(&self, identity: &VmIdentity, op: CacheOp) -> Result<Value, HostServiceError> {
        Ok(self.runtime.block_on(self.cache_op(identity, op))?)
    }

    fn storage(&self, identity: &VmIdentity, op: StorageOp) -> Result<Value, HostServiceError> {
        Ok(self.runtime.block_on(self.storage_op(identity, op))?)
    }

    fn api(&self, identity: &VmIdentity, with_keys: bool) -> Result<Value, HostServiceError> {
        let mut reply = serde_json::json!({
            "siteUrl": self.http.config.site_url,
            "teamId": identity.team_id,
        });
        if with_keys {
            let keys = self
                .api_keys
                .as_ref()
                .ok_or(HostServiceError::ApiKeysNeedPostgres)?;
            let credentials = self.runtime.block_on(keys.credentials(identity.team_id))?;
            reply["projectApiKey"] = Value::String(credentials.project_api_key);
            reply["personalApiKey"] = Value::String(credentials.personal_api_key);
        }
        Ok(reply)
    }

    /// Straight from the shared reader, on this thread: no actor round trip per lookup.
    fn geoip(&self, ip: &str) -> Value {
        self.geoip.locate(ip).unwrap_or(Value::Null)
    }

    fn enqueue_job(
        &self,
        identity: &VmIdentity,
        job: JobRequest,
    ) -> Result<Value, HostServiceError> {
        let run_at = chrono::DateTime::from_timestamp_millis(job.run_at_unix_ms)
            .ok_or(HostServiceError::UnrepresentableRunAt(job.run_at_unix_ms))?;
        let new = NewJob {
            plugin_config_id: identity.plugin_config_id,
            team_id: identity.team_id,
            job_name: job.name,
            payload: job.payload,
            run_at,
            // The queue keeps the policy within its bounds.
            retry: RetryPolicy {
                max_attempts: job.max_attempts,
                delay: Duration::from_millis(job.retry_delay_ms),
            },
        };
        self.runtime.block_on(self.jobs.enqueue(new))?;
        Ok(Value::Null)
    }
}

async fn postgres_storage(
    pool: &Pool,
    config_id: i64,
    op: StorageOp,
) -> Result<Value, StorageError> {
    let client = pool.get().await?;
    let config_id = config_id as i32;
    Ok(match op {
        StorageOp::Get { key } => client
            .query_opt(
                "SELECT value FROM posthog_pluginstorage WHERE plugin_config_id = $1 AND key = $2",
                &[&config_id, &key],
            )
            .await?
            .and_then(|row| row.get::<_, Option<String>>(0))
            .map_or(Value::Null, Value::String),
        StorageOp::Set { key, value } => {
            client
                .execute(
                    "INSERT INTO posthog_pluginstorage (plugin_config_id, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (plugin_config_id, key) DO UPDATE SET value = EXCLUDED.value",
                    &[&config_id, &key, &value],
                )
                .await?;
            Value::Null
        }
        StorageOp::Del { key } => {
            client
                .execute(
                    "DELETE FROM posthog_pluginstorage WHERE plugin_config_id = $1 AND key = $2",
                    &[&config_id, &key],
                )
                .await?;
            Value::Null
        }
        StorageOp::CursorInit { key, initial } => {
            client
                .execute(
                    "INSERT INTO posthog_pluginstorage (plugin_config_id, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (plugin_config_id, key) DO NOTHING",
                    &[&config_id, &key, &initial.to_string()],
                )
                .await?;
            Value::Null
        }
        StorageOp::CursorIncrement { key, by } => {
            // One statement, so concurrent increments from several instances never lose one.
            let row = client
                .query_one(
                    "INSERT INTO posthog_pluginstorage (plugin_config_id, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (plugin_config_id, key) \
                     DO UPDATE SET value = (posthog_pluginstorage.value::bigint + $4)::text RETURNING value",
                    &[&config_id, &key, &by.to_string(), &by],
                )
                .await?;
            let value: String = row.get(0);
            Value::from(
                value
                    .parse::<i64>()
                    .map_err(|_| StorageError::NotANumber(key))?,
            )
        }
    })
}

fn sqlite_storage(
    connection: &rusqlite::Connection,
    config_id: i64,
    op: StorageOp,
) -> Result<Value, StorageError> {
    use rusqlite::{OptionalExtension, params};

    Ok(match op {
        StorageOp::Get { key } => connection
            .prepare_cached(
                "SELECT value FROM plugin_storage WHERE plugin_config_id = ?1 AND key = ?2",
            )?
            .query_row(params![config_id, key], |row| row.get::<_, String>(0))
            .optional()?
            .map_or(Value::Null, Value::String),
        StorageOp::Set { key, value } => {
            connection
                .prepare_cached(
                    "INSERT INTO plugin_storage (plugin_config_id, key, value) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (plugin_config_id, key) DO UPDATE SET value = excluded.value",
                )?
                .execute(params![config_id, key, value])?;
            Value::Null
        }
        StorageOp::Del { key } => {
            connection
                .prepare_cached(
                    "DELETE FROM plugin_storage WHERE plugin_config_id = ?1 AND key = ?2",
                )?
                .execute(params![config_id, key])?;
            Value::Null
        }
        StorageOp::CursorInit { key, initial } => {
            connection
                .prepare_cached(
                    "INSERT INTO plugin_storage (plugin_config_id, key, value) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (plugin_config_id, key) DO NOTHING",
                )?
                .execute(params![config_id, key, initial.to_string()])?;
            Value::Null
        }
        StorageOp::CursorIncrement { key, by } => {
            let value: String = connection
                .prepare_cached(
                    "INSERT INTO plugin_storage (plugin_config_id, key, value) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (plugin_config_id, key) \
                     DO UPDATE SET value = CAST(CAST(value AS INTEGER) + ?4 AS TEXT) RETURNING value",
                )?
                .query_row(params![config_id, key, by.to_string(), by], |row| row.get(0))?;
            Value::from(
                value
                    .parse::<i64>()
                    .map_err(|_| StorageError::NotANumber(key))?,
            )
        }
    })
}

fn in_process_storage(
    map: &mut HashMap<(i64, String), String>,
    config_id: i64,
    op: StorageOp,
) -> Value {
    match op {
        StorageOp::Get { key } => map
            .get(&(config_id, key))
            .cloned()
            .map_or(Value::Null, Value::String),
        StorageOp::Set { key, value } => {
            map.insert((config_id, key), value);
            Value::Null
        }
        StorageOp::Del { key } => {
            map.remove(&(config_id, key));
            Value::Null
        }
        StorageOp::CursorInit { key, initial } => {
            map.entry((config_id, key))
                .or_insert_with(|| initial.to_string());
            Value::Null
        }
        StorageOp::CursorIncrement { key, by } => {
            let entry = map
                .entry((config_id, key))
                .or_insert_with(|| "0".to_string());
            let value = entry.parse::<i64>().unwrap_or(0) + by;
            *entry = value.to_string();
            Value::from(value)
        }
    }
}

/// Resolves the host and refuses it if any address is internal. (A DNS answer that changes
/// between this check and the connection is not caught; this is a guard against plugins
/// probing the internal network by mistake or by config, not a hardened egress proxy.)
async fn refuse_private(url: &reqwest::Url) -> Result<(), FetchError> {
    let host = url.host_str().ok_or(FetchError::NoHost)?;
    let port = url.port_or_known_default().unwrap_or(80);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| FetchError::Unresolvable {
                host: host.to_owned(),
                source,
            })?
            .map(|a| a.ip())
            .collect(),
    };
    match addresses.into_iter().find(is_internal) {
        Some(ip) => Err(FetchError::InternalAddress {
            host: host.to_owned(),
            ip,
        }),
        None => Ok(()),
    }
}

fn is_internal(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_internal(&IpAddr::V4(v4)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.0.1",
            "169.254.169.254",
            "::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal(&ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["8.8.8.8", "2001:4860:4860::8888"] {
            assert!(!is_internal(&ip.parse().expect("ip")), "{ip}");
        }
    }

    #[tokio::test]
    async fn storage_on_sqlite_gets_sets_deletes_and_counts() {
        let database = Sqlite::in_memory().expect("sqlite");
        let connection = database.lock().await;
        let run = |op| sqlite_storage(&connection, 4, op).expect("storage");
        let key = |key: &str| key.to_owned();
        assert_eq!(run(StorageOp::Get { key: key("a") }), Value::Null);
        run(StorageOp::Set {
            key: key("a"),
            value: "\"one\"".to_owned(),
        });
        run(StorageOp::Set {
            key: key("a"),
            value: "\"two\"".to_owned(),
        });
        assert_eq!(
            run(StorageOp::Get { key: key("a") }),
            Value::from("\"two\"")
        );
        // Another config's storage is its own.
        assert_eq!(
            sqlite_storage(&connection, 5, StorageOp::Get { key: key("a") }).expect("other"),
            Value::Null
        );
        run(StorageOp::Del { key: key("a") });
        assert_eq!(run(StorageOp::Get { key: key("a") }), Value::Null);
        run(StorageOp::CursorInit {
            key: key("n"),
            initial: 10,
        });
        run(StorageOp::CursorInit {
            key: key("n"),
            initial: 99,
        });
        assert_eq!(
            run(StorageOp::CursorIncrement {
                key: key("n"),
                by: 5
            }),
            Value::from(15)
        );
        assert_eq!(
            run(StorageOp::CursorIncrement {
                key: key("fresh"),
                by: 2
            }),
            Value::from(2)
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_switch_refuses_loopback_before_connecting_except_site_url() {
        // The server installs ring as the process's TLS provider at start; so does this test.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let host = ServerHost::new(
            Handle::current(),
            PluginHttp::new(
                reqwest::Client::new(),
                ServerHostConfig {
                    request_timeout: Duration::from_secs(1),
                    refuse_private_addresses: true,
                    site_url: "http://localhost:2".to_owned(),
                },
            ),
            Arc::new(crate::cluster::cache::InProcessCache::new(
                crate::cluster::cache::InProcessCacheBackend::new(),
                "",
            )),
            PluginStorage::InProcess(Arc::default()),
            GeoIpHandle::new(),
            Arc::new(crate::plugins::jobs::MemoryJobStore::new()),
        );
        let request = |url: &str| FetchRequest {
            url: url.into(),
            method: "GET".into(),
            headers: BTreeMap::new(),
            body: None,
            timeout: None,
        };
        let (refused, site) = tokio::task::spawn_blocking(move || {
            (
                host.fetch(request("http://localhost:1/x")),
                host.fetch(request("http://localhost:2/api")),
            )
        })
        .await
        .expect("join");
        assert!(
            refused
                .expect_err("refused")
                .to_string()
                .contains("not allowed")
        );
        // Tried (nothing listens there), not refused.
        let site = site.expect_err("nothing listens").to_string();
        assert!(!site.contains("not allowed"), "{site}");
    }
}
