//! Cluster primitives: how instances of the server share state and coordinate, in the style of
//! NocoBase's cluster mode without its flaws (see `shared/spec/nocobase-cluster.md` §9).
//!
//! Each primitive is a trait with two adapters: in-process (the embedded profile: one process,
//! or several "instances" sharing one in-process backend in tests) and Redis (the cluster
//! profile, `REDIS_URL`). Actors depend on the traits only.
//!
//! - `cache`: namespaced key/value with TTLs, counters and PostHog's list operations.
//! - `pubsub`: fire-and-forget broadcast with `skip_self` (the default), `only_self`, debounce.
//! - `sync`: pub/sub messages published only after the Postgres transaction commits.
//! - `event_queue`: at-least-once work queue with retries, backoff, dead letters, timeouts.
//! - `lock`: leases with owner tokens, renewal while held, expiry when the holder dies.

pub mod cache;
pub mod event_queue;
pub mod lock;
pub mod pubsub;
pub mod redis_pool;
pub mod sync;

use std::fmt;
use std::sync::Arc;

use self::cache::{CacheStore, InProcessCache, InProcessCacheBackend, RedisCache};
use self::event_queue::{EventQueue, InProcessEventQueue, InProcessQueueBackend, RedisEventQueue};
use self::lock::{InProcessLockBackend, InProcessLocks, LockManager, RedisLocks};
use self::pubsub::{InProcessBus, PubSub, RedisTransport};
use self::redis_pool::{RedisPool, RedisPoolConfig};
use self::sync::SyncMessages;

/// Identifies one server process in the cluster: in pub/sub envelopes (`skip_self`), lock
/// tokens and queue consumer names. Stable for the life of the process.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceId(String);

impl InstanceId {
    /// `<host>-<pid>-<random>`: readable in Redis (`CLIENT LIST`, stream consumers) and unique
    /// even when two processes share a host and a pid namespace.
    pub fn generate() -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|host| !host.is_empty())
            .unwrap_or_else(|| "host".to_owned());
        let random = uuid::Uuid::new_v4().simple().to_string();
        Self(format!("{host}-{}-{}", std::process::id(), &random[..8]))
    }

    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Errors of every primitive. `Unavailable` is retryable (the store is down); the others are
/// about the request.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("value is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("value at {key:?} is not {expected}")]
    WrongType { key: String, expected: &'static str },
    #[error("lock {key:?} is held by another owner")]
    LockHeld { key: String },
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("lock {key:?} was lost (expired or taken over)")]
    LockLost { key: String },
    #[error("{0} is closed")]
    Closed(&'static str),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl From<deadpool_redis::PoolError> for ClusterError {
    fn from(error: deadpool_redis::PoolError) -> Self {
        Self::Unavailable(error.to_string())
    }
}

/// What `Cluster::connect` needs, projected from the settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `REDIS_URL` and the pool sizes; `None` selects the in-process adapters.
    pub redis: Option<RedisPoolConfig>,
    /// `CLUSTER_PREFIX`: before every channel and key of this deployment.
    pub prefix: String,
    pub instance: InstanceId,
}

/// Every primitive for one instance, all on Redis or all in-process.
#[derive(Clone)]
pub struct Cluster {
    pub instance: InstanceId,
    /// The root of the key space (`CLUSTER_PREFIX`); users take a `scoped` store. `meta.cache`
    /// scopes `@plugin/<pluginId>/<teamId>/` under it, PostHog's layout.
    pub cache: Arc<dyn CacheStore>,
    pub pubsub: PubSub,
    pub sync: SyncMessages,
    pub locks: Arc<dyn LockManager>,
    pub queue: Arc<dyn EventQueue>,
    /// "redis" or "in-process", for logs and `/_actors`.
    pub backend: &'static str,
}

impl Cluster {
    /// Connects to Redis (failing fast when it does not answer) or builds the in-process
    /// adapters. Must run inside a tokio runtime: pub/sub spawns its dispatcher.
    pub async fn connect(config: ClusterConfig) -> Result<Self, ClusterError> {
        let queue_prefix = format!("{}plugin-server:", config.prefix);
        let Some(redis) = &config.redis else {
            let bus = InProcessBus::new();
            let (transport, inbound) = bus.transport();
            let pubsub = PubSub::new(config.instance.clone(), &config.prefix, transport, inbound);
            return Ok(Self {
                cache: Arc::new(InProcessCache::new(
                    InProcessCacheBackend::new(),
                    config.prefix.clone(),
                )),
                sync: SyncMessages::new(pubsub.clone()),
                pubsub,
                locks: Arc::new(InProcessLocks::new(
                    InProcessLockBackend::new(),
                    config.instance.clone(),
                )),
                queue: Arc::new(InProcessEventQueue::new(InProcessQueueBackend::new())),
                instance: config.instance,
                backend: "in-process",
            });
        };
        let pool = RedisPool::connect(redis).await?;
        let (transport, inbound) = RedisTransport::spawn(pool.clone());
        let pubsub = PubSub::new(config.instance.clone(), &config.prefix, transport, inbound);
        Ok(Self {
            cache: Arc::new(RedisCache::new(pool.clone(), config.prefix.clone())),
            sync: SyncMessages::new(pubsub.clone()),
            pubsub,
            locks: Arc::new(RedisLocks::new(
                pool.clone(),
                config.prefix.clone(),
                config.instance.clone(),
            )),
            queue: Arc::new(RedisEventQueue::new(
                pool,
                queue_prefix,
                config.instance.clone(),
            )),
            instance: config.instance,
            backend: "redis",
        })
    }
}

/// Escapes `*`, `?`, `[`, `]` and `\` so a key prefix can be used in a `SCAN MATCH` pattern
/// literally (a namespace like `@plugin/[x]/` must not match as a glob).
pub fn escape_glob(literal: &str) -> String {
    let mut escaped = String::with_capacity(literal.len());
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_unique() {
        assert_ne!(InstanceId::generate(), InstanceId::generate());
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(
            escape_glob("@plugin/[1]/*?\\"),
            "@plugin/\\[1\\]/\\*\\?\\\\"
        );
    }
}
