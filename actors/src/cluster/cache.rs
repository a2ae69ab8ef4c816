//! Cache: namespaced key/value with TTLs, atomic counters and PostHog's list operations.
//!
//! Used for `meta.cache` (PostHog's key layout `@plugin/<pluginId>/<teamId>/<key>`, so existing
//! plugins find their keys where PostHog put them), and for team and plugin lookups.
//!
//! A `CacheStore` is bound to one namespace: every key it touches starts with that prefix, and
//! `reset` deletes only keys under it (SCAN + UNLINK on Redis, never FLUSHDB, unlike NocoBase).
//! Values are strings, as PostHog stores them; `Cache` adds JSON, `wrap` and
//! `wrap_with_condition` on top, where cached falsy values (0, "", false) are hits, not misses.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::redis_pool::RedisPool;
use super::{ClusterError, escape_glob};

/// The operations every cache adapter provides. Keys are relative to the store's namespace.
#[async_trait]
pub trait CacheStore: Send + Sync {
    /// The namespace prefix every key of this store is put under.
    fn namespace(&self) -> &str;
    /// A store for a sub-namespace (`<namespace><suffix>`), sharing the same backend.
    fn scoped(&self, suffix: &str) -> Arc<dyn CacheStore>;

    async fn get(&self, key: &str) -> Result<Option<String>, ClusterError>;
    /// `ttl: None` keeps the value until deleted.
    async fn set(&self, key: &str, value: &str, ttl: Option<Duration>) -> Result<(), ClusterError>;
    /// Whether the key existed.
    async fn del(&self, key: &str) -> Result<bool, ClusterError>;
    async fn mget(&self, keys: &[&str]) -> Result<Vec<Option<String>>, ClusterError>;
    async fn mset(
        &self,
        entries: &[(&str, &str)],
        ttl: Option<Duration>,
    ) -> Result<(), ClusterError>;
    /// How many of the keys existed.
    async fn mdel(&self, keys: &[&str]) -> Result<u64, ClusterError>;
    /// Remaining lifetime: `None` for a missing key or one without TTL.
    async fn ttl(&self, key: &str) -> Result<Option<Duration>, ClusterError>;
    /// Sets a TTL on an existing key; false if the key does not exist.
    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool, ClusterError>;
    /// Atomically adds `by` (a missing key counts as 0). A `ttl` is applied only when this call
    /// created the key: a fixed window, as rate limits want.
    async fn incr_by(&self, key: &str, by: i64, ttl: Option<Duration>)
    -> Result<i64, ClusterError>;
    /// Prepends values; returns the new length.
    async fn lpush(&self, key: &str, values: &[&str]) -> Result<u64, ClusterError>;
    /// Elements `start..=stop`, negative indexes counting from the end, as Redis LRANGE.
    async fn lrange(&self, key: &str, start: i64, stop: i64) -> Result<Vec<String>, ClusterError>;
    async fn llen(&self, key: &str) -> Result<u64, ClusterError>;
    /// Removes `count` occurrences of `value` (all when 0, from the tail when negative).
    async fn lrem(&self, key: &str, count: i64, value: &str) -> Result<u64, ClusterError>;
    /// Pops up to `count` elements from the head.
    async fn lpop(&self, key: &str, count: u64) -> Result<Vec<String>, ClusterError>;
    /// Deletes every key of this namespace, and nothing else. Returns how many.
    async fn reset(&self) -> Result<u64, ClusterError>;
}

// ---------------------------------------------------------------------------------------------
// Typed helpers

/// A `CacheStore` with JSON values and the read-through helpers.
#[derive(Clone)]
pub struct Cache {
    store: Arc<dyn CacheStore>,
}

impl Cache {
    pub fn new(store: Arc<dyn CacheStore>) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &Arc<dyn CacheStore> {
        &self.store
    }

    pub async fn get_json<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, ClusterError> {
        match self.store.get(key).await? {
            Some(text) => Ok(Some(serde_json::from_str(&text)?)),
            None => Ok(None),
        }
    }

    pub async fn set_json<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<(), ClusterError> {
        self.store
            .set(key, &serde_json::to_string(value)?, ttl)
            .await
    }

    /// Returns the cached value, or computes, stores and returns it. Any stored value is a hit,
    /// falsy ones included.
    pub async fn wrap<T, E, F, Fut>(
        &self,
        key: &str,
        ttl: Option<Duration>,
        compute: F,
    ) -> Result<T, WrapError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.wrap_with_condition(key, WrapOptions::new(ttl), |_| true, compute)
            .await
    }

    /// `wrap` with control: `use_cache: false` bypasses the cache (neither read nor written),
    /// and only results for which `is_cacheable` holds are stored.
    pub async fn wrap_with_condition<T, E, F, Fut, P>(
        &self,
        key: &str,
        options: WrapOptions,
        is_cacheable: P,
        compute: F,
    ) -> Result<T, WrapError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        P: FnOnce(&T) -> bool,
    {
        if !options.use_cache {
            return compute().await.map_err(WrapError::Compute);
        }
        if let Some(hit) = self.get_json(key).await.map_err(WrapError::Cache)? {
            return Ok(hit);
        }
        let value = compute().await.map_err(WrapError::Compute)?;
        if is_cacheable(&value) {
            self.set_json(key, &value, options.ttl)
                .await
                .map_err(WrapError::Cache)?;
        }
        Ok(value)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct WrapOptions {
    pub use_cache: bool,
    pub ttl: Option<Duration>,
}

impl WrapOptions {
    pub fn new(ttl: Option<Duration>) -> Self {
        Self {
            use_cache: true,
            ttl,
        }
    }
}

/// Either the cache failed, or the computation did.
#[derive(Debug, thiserror::Error)]
pub enum WrapError<E> {
    #[error(transparent)]
    Cache(ClusterError),
    #[error("computing the value failed: {0}")]
    Compute(E),
}

// ---------------------------------------------------------------------------------------------
// In-process adapter

enum Value {
    Text(String),
    List(VecDeque<String>),
}

struct Entry {
    value: Value,
    expires_at: Option<Instant>,
}

/// The shared state of in-process caches. Several `InProcessCache`s made from one backend see
/// the same keys, like several instances on one Redis.
#[derive(Default)]
pub struct InProcessCacheBackend {
    /// Ordered, so `reset` of a namespace is a range scan.
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl InProcessCacheBackend {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

/// The embedded profile's cache. Expired entries are dropped lazily when touched, and by
/// `reset`; an idle process keeps them in memory until then.
pub struct InProcessCache {
    backend: Arc<InProcessCacheBackend>,
    namespace: String,
}

impl InProcessCache {
    pub fn new(backend: Arc<InProcessCacheBackend>, namespace: impl Into<String>) -> Self {
        Self {
            backend,
            namespace: namespace.into(),
        }
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }

    /// Runs `f` on the live (unexpired) entries, under the lock.
    fn with_entries<R>(&self, f: impl FnOnce(&mut BTreeMap<String, Entry>, Instant) -> R) -> R {
        let mut entries = self
            .backend
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut entries, Instant::now())
    }
}

fn live<'a>(
    entries: &'a mut BTreeMap<String, Entry>,
    key: &str,
    now: Instant,
) -> Option<&'a mut Entry> {
    let expired = entries
        .get(key)
        .and_then(|entry| entry.expires_at)
        .is_some_and(|at| at <= now);
    if expired {
        entries.remove(key);
        return None;
    }
    entries.get_mut(key)
}

fn wrong_type(key: &str, expected: &'static str) -> ClusterError {
    ClusterError::WrongType {
        key: key.to_owned(),
        expected,
    }
}

/// Redis LRANGE index rules: negative counts from the end; the range is clamped.
fn list_range(len: usize, start: i64, stop: i64) -> Option<(usize, usize)> {
    let len = len as i64;
    let start = if start < 0 {
        (len + start).max(0)
    } else {
        start
    };
    let stop = if stop < 0 {
        len + stop
    } else {
        stop.min(len - 1)
    };
    if start > stop || start >= len {
        return None;
    }
    Some((start as usize, stop as usize))
}

#[async_trait]
impl CacheStore for InProcessCache {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn scoped(&self, suffix: &str) -> Arc<dyn CacheStore> {
        Arc::new(Self::new(
            Arc::clone(&self.backend),
            format!("{}{suffix}", self.namespace),
        ))
    }

    async fn get(&self, key: &str) -> Result<Option<String>, ClusterError> {
        let full = self.full_key(key);
        self.with_entries(|entries, now| match live(entries, &full, now) {
            None => Ok(None),
            Some(Entry {
                value: Value::Text(text),
                ..
            }) => Ok(Some(text.clone())),
            Some(_) => Err(wrong_type(key, "a string")),
        })
    }

    async fn set(&self, key: &str, value: &str, ttl: Option<Duration>) -> Result<(), ClusterError> {
        let full = self.full_key(key);
        self.with_entries(|entries, now| {
            entries.insert(
                full,
                Entry {
                    value: Value::Text(value.to_owned()),
                    expires_at: ttl.map(|ttl| now + ttl),
                },
            );
        });
        Ok(())
    }

    async fn del(&self, key: &str) -> Result<bool, ClusterError> {
        let full = self.full_key(key);
        Ok(self.with_entries(|entries, now| {
            let existed = live(entries, &full, now).is_some();
            entries.remove(&full);
            existed
        }))
    }

    async fn mget(&self, keys: &[&str]) -> Result<Vec<Option<String>>, ClusterError> {
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            // A list under one of the keys reads as missing, as Redis MGET does.
            values.push(self.get(key).await.ok().flatten());
        }
        Ok(values)
    }

    async fn mset(
        &self,
        entries: &[(&str, &str)],
        ttl: Option<Duration>,
    ) -> Result<(), ClusterError> {
        for (key, value) in entries {
            self.set(key, value, ttl).await?;
        }
        Ok(())
    }

    async fn mdel(&self, keys: &[&str]) -> Result<u64, ClusterError> {
        let mut deleted = 0;
        for key in keys {
            deleted += u64::from(self.del(key).await?);
        }
        Ok(deleted)
    }

    async fn ttl(&self, key: &str) -> Result<Option<Duration>, ClusterError> {
        let full = self.full_key(key);
        Ok(self.with_entries(|entries, now| {
            live(entries, &full, now)
                .and_then(|entry| entry.expires_at)
                .map(|at| at.saturating_duration_since(now))
        }))
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool, ClusterError> {
        let full = self.full_key(key);
        Ok(
            self.with_entries(|entries, now| match live(entries, &full, now) {
                Some(entry) => {
                    entry.expires_at = Some(now + ttl);
                    true
                }
                None => false,
            }),
        )
    }

    async fn incr_by(
        &self,
        key: &str,
        by: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, ClusterError> {
        let full = self.full_key(key);
        self.with_entries(|entries, now| {
            let Some(entry) = live(entries, &full, now) else {
                entries.insert(
                    full,
                    Entry {
                        value: Value::Text(by.to_string()),
                        expires_at: ttl.map(|ttl| now + ttl),
                    },
                );
                return Ok(by);
            };
            let Value::Text(text) = &mut entry.value else {
                return Err(wrong_type(key, "an integer"));
            };
            let current: i64 = text.parse().map_err(|_| wrong_type(key, "an integer"))?;
            let next = current
                .checked_add(by)
                .ok_or_else(|| ClusterError::InvalidArgument("increment overflows".to_owned()))?;
            *text = next.to_string();
            Ok(next)
        })
    }

    async fn lpush(&self, key: &str, values: &[&str]) -> Result<u64, ClusterError> {
        let full = self.full_key(key);
        self.with_entries(|entries, now| {
            if live(entries, &full, now).is_none() {
                entries.insert(
                    full.clone(),
                    Entry {
                        value: Value::List(VecDeque::new()),
                        expires_at: None,
                    },
                );
            }
            match entries.get_mut(&full).map(|entry| &mut entry.value) {
                Some(Value::List(list)) => {
                    for value in values {
                        list.push_front((*value).to_owned());
                    }
                    Ok(list.len() as u64)
                }
                _ => Err(wrong_type(key, "a list")),
            }
        })
    }

    async fn lrange(&self, key: &str, start: i64, stop: i64) -> Result<Vec<String>, ClusterError> {
        let full = self.full_key(key);
        self.with_entries(|entries, now| match live(entries, &full, now) {
            None => Ok(Vec::new()),
            Some(Entry {
                value: Value::List(list),
                ..
            }) => Ok(list_range(list.len(), start, stop)
                .map(|(from, to)| list.range(from..=to).cloned().collect())
                .unwrap_or_default()),
            Some(_) => Err(wrong_type(key, "a list")),
        })
    }

    async fn llen(&self, key: &str) -> Result<u64, ClusterError> {
        let full = self.full_key(key);
        self.with_entries(|entries, now| match live(entries, &full, now) {
            None => Ok(0),
            Some(Entry {
                value: Value::List(list),
                ..
            }) => Ok(list.len() as u64),
            Some(_) => Err(wrong_type(key, "a list")),
        })
    }

    async fn lrem(&self, key: &str, count: i64, value: &str) -> Result<u64, ClusterError> {
        let full = self.full_key(key);
        self.with_entries(|entries, now| {
            let Some(entry) = live(entries, &full, now) else {
                return Ok(0);
            };
            let Value::List(list) = &mut entry.value else {
                return Err(wrong_type(key, "a list"));
            };
            let limit = if count == 0 {
                usize::MAX
            } else {
                count.unsigned_abs() as usize
            };
            let mut positions: Vec<usize> = list
                .iter()
                .enumerate()
                .filter(|(_, item)| item.as_str() == value)
                .map(|(index, _)| index)
                .collect();
            if count < 0 {
                positions.reverse();
            }
            positions.truncate(limit);
            positions.sort_unstable_by(|a, b| b.cmp(a));
            for index in &positions {
                list.remove(*index);
            }
            let removed = positions.len() as u64;
            if list.is_empty() {
                entries.remove(&full);
            }
            Ok(removed)
        })
    }

    async fn lpop(&self, key: &str, count: u64) -> Result<Vec<String>, ClusterError> {
        let full = self.full_key(key);
        self.with_entries(|entries, now| {
            let Some(entry) = live(entries, &full, now) else {
                return Ok(Vec::new());
            };
            let Value::List(list) = &mut entry.value else {
                return Err(wrong_type(key, "a list"));
            };
            let take = (count as usize).min(list.len());
            let popped: Vec<String> = list.drain(..take).collect();
            if list.is_empty() {
                entries.remove(&full);
            }
            Ok(popped)
        })
    }

    async fn reset(&self) -> Result<u64, ClusterError> {
        let namespace = self.namespace.clone();
        Ok(self.with_entries(|entries, _| {
            let doomed: Vec<String> = entries
                .range(namespace.clone()..)
                .take_while(|(key, _)| key.starts_with(&namespace))
                .map(|(key, _)| key.clone())
                .collect();
            for key in &doomed {
                entries.remove(key);
            }
            doomed.len() as u64
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Redis adapter

/// Keys per SCAN/UNLINK round of `reset`: bounded work per round trip.
const RESET_BATCH: usize = 500;

/// INCRBY, plus a PEXPIRE only when this call created the key (the fixed window).
const INCR_WITH_TTL: &str = r"
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 and value == tonumber(ARGV[1]) and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
";

/// The cluster profile's cache, on the shared Redis pool.
pub struct RedisCache {
    pool: RedisPool,
    namespace: String,
    incr_script: Arc<redis::Script>,
}

impl RedisCache {
    pub fn new(pool: RedisPool, namespace: impl Into<String>) -> Self {
        Self {
            pool,
            namespace: namespace.into(),
            incr_script: Arc::new(redis::Script::new(INCR_WITH_TTL)),
        }
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }
}

fn ttl_millis(ttl: Duration) -> Result<u64, ClusterError> {
    let millis = ttl.as_millis();
    if millis == 0 {
        return Err(ClusterError::InvalidArgument(
            "a TTL must be at least 1 ms".to_owned(),
        ));
    }
    Ok(u64::try_from(millis).unwrap_or(u64::MAX))
}

fn redis_error(key: &str, error: redis::RedisError) -> ClusterError {
    if error.code() == Some("WRONGTYPE") {
        return wrong_type(key, "of the type this operation needs");
    }
    ClusterError::Redis(error)
}

#[async_trait]
impl CacheStore for RedisCache {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn scoped(&self, suffix: &str) -> Arc<dyn CacheStore> {
        Arc::new(Self {
            pool: self.pool.clone(),
            namespace: format!("{}{suffix}", self.namespace),
            incr_script: Arc::clone(&self.incr_script),
        })
    }

    async fn get(&self, key: &str) -> Result<Option<String>, ClusterError> {
        let mut connection = self.pool.get().await?;
        redis::cmd("GET")
            .arg(self.full_key(key))
            .query_async(&mut connection)
            .await
            .map_err(|error| redis_error(key, error))
    }

    async fn set(&self, key: &str, value: &str, ttl: Option<Duration>) -> Result<(), ClusterError> {
        let mut command = redis::cmd("SET");
        command.arg(self.full_key(key)).arg(value);
        if let Some(ttl) = ttl {
            command.arg("PX").arg(ttl_millis(ttl)?);
        }
        let mut connection = self.pool.get().await?;
        command.query_async::<()>(&mut connection).await?;
        Ok(())
    }

    async fn del(&self, key: &str) -> Result<bool, ClusterError> {
        Ok(self.mdel(&[key]).await? > 0)
    }

    async fn mget(&self, keys: &[&str]) -> Result<Vec<Option<String>>, ClusterError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let full: Vec<String> = keys.iter().map(|key| self.full_key(key)).collect();
        let mut connection = self.pool.get().await?;
        Ok(redis::cmd("MGET")
            .arg(&full)
            .query_async(&mut connection)
            .await?)
    }

    async fn mset(
        &self,
        entries: &[(&str, &str)],
        ttl: Option<Duration>,
    ) -> Result<(), ClusterError> {
        if entries.is_empty() {
            return Ok(());
        }
        let ttl = ttl.map(ttl_millis).transpose()?;
        // One MULTI/EXEC: all keys get their values (and TTLs) together.
        let mut pipeline = redis::pipe();
        pipeline.atomic();
        for (key, value) in entries {
            let command = pipeline.cmd("SET").arg(self.full_key(key)).arg(*value);
            if let Some(millis) = ttl {
                command.arg("PX").arg(millis);
            }
            command.ignore();
        }
        let mut connection = self.pool.get().await?;
        pipeline.query_async::<()>(&mut connection).await?;
        Ok(())
    }

    async fn mdel(&self, keys: &[&str]) -> Result<u64, ClusterError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let full: Vec<String> = keys.iter().map(|key| self.full_key(key)).collect();
        let mut connection = self.pool.get().await?;
        Ok(redis::cmd("DEL")
            .arg(&full)
            .query_async(&mut connection)
            .await?)
    }

    async fn ttl(&self, key: &str) -> Result<Option<Duration>, ClusterError> {
        let mut connection = self.pool.get().await?;
        let millis: i64 = redis::cmd("PTTL")
            .arg(self.full_key(key))
            .query_async(&mut connection)
            .await?;
        // -2: no such key; -1: no TTL.
        Ok((millis >= 0).then(|| Duration::from_millis(millis as u64)))
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool, ClusterError> {
        let mut connection = self.pool.get().await?;
        let set: i64 = redis::cmd("PEXPIRE")
            .arg(self.full_key(key))
            .arg(ttl_millis(ttl)?)
            .query_async(&mut connection)
            .await?;
        Ok(set == 1)
    }

    async fn incr_by(
        &self,
        key: &str,
        by: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, ClusterError> {
        let ttl = ttl.map(ttl_millis).transpose()?.unwrap_or(0);
        let mut connection = self.pool.get().await?;
        self.incr_script
            .key(self.full_key(key))
            .arg(by)
            .arg(ttl)
            .invoke_async(&mut connection)
            .await
            .map_err(|error| redis_error(key, error))
    }

    async fn lpush(&self, key: &str, values: &[&str]) -> Result<u64, ClusterError> {
        let full = self.full_key(key);
        let mut connection = self.pool.get().await?;
        if values.is_empty() {
            return Ok(redis::cmd("LLEN")
                .arg(full)
                .query_async(&mut connection)
                .await?);
        }
        redis::cmd("LPUSH")
            .arg(full)
            .arg(values)
            .query_async(&mut connection)
            .await
            .map_err(|error| redis_error(key, error))
    }

    async fn lrange(&self, key: &str, start: i64, stop: i64) -> Result<Vec<String>, ClusterError> {
        let mut connection = self.pool.get().await?;
        redis::cmd("LRANGE")
            .arg(self.full_key(key))
            .arg(start)
            .arg(stop)
            .query_async(&mut connection)
            .await
            .map_err(|error| redis_error(key, error))
    }

    async fn llen(&self, key: &str) -> Result<u64, ClusterError> {
        let mut connection = self.pool.get().await?;
        redis::cmd("LLEN")
            .arg(self.full_key(key))
            .query_async(&mut connection)
            .await
            .map_err(|error| redis_error(key, error))
    }

    async fn lrem(&self, key: &str, count: i64, value: &str) -> Result<u64, ClusterError> {
        let mut connection = self.pool.get().await?;
        redis::cmd("LREM")
            .arg(self.full_key(key))
            .arg(count)
            .arg(value)
            .query_async(&mut connection)
            .await
            .map_err(|error| redis_error(key, error))
    }

    async fn lpop(&self, key: &str, count: u64) -> Result<Vec<String>, ClusterError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut connection = self.pool.get().await?;
        let popped: Option<Vec<String>> = redis::cmd("LPOP")
            .arg(self.full_key(key))
            .arg(count)
            .query_async(&mut connection)
            .await
            .map_err(|error| redis_error(key, error))?;
        Ok(popped.unwrap_or_default())
    }

    async fn reset(&self) -> Result<u64, ClusterError> {
        if self.namespace.is_empty() {
            // An empty namespace would mean the whole database: exactly what reset must not do.
            return Err(ClusterError::InvalidArgument(
                "refusing to reset a cache without a namespace".to_owned(),
            ));
        }
        let pattern = format!("{}*", escape_glob(&self.namespace));
        let mut connection = self.pool.get().await?;
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(RESET_BATCH)
                .query_async(&mut connection)
                .await?;
            if !keys.is_empty() {
                let removed: u64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut connection)
                    .await?;
                deleted += removed;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_ranges_follow_redis() {
        assert_eq!(list_range(5, 0, -1), Some((0, 4)));
        assert_eq!(list_range(5, 1, 2), Some((1, 2)));
        assert_eq!(list_range(5, -2, -1), Some((3, 4)));
        assert_eq!(list_range(5, 3, 100), Some((3, 4)));
        assert_eq!(list_range(5, 4, 1), None);
        assert_eq!(list_range(5, 7, 9), None);
        assert_eq!(list_range(0, 0, -1), None);
        assert_eq!(list_range(3, -10, 0), Some((0, 0)));
    }

    #[tokio::test(start_paused = true)]
    async fn in_process_entries_expire_with_the_clock() {
        let cache = InProcessCache::new(InProcessCacheBackend::new(), "ns:");
        cache
            .set("k", "v", Some(Duration::from_secs(10)))
            .await
            .expect("set");
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(cache.get("k").await.expect("get").as_deref(), Some("v"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(cache.get("k").await.expect("get"), None);
    }
}
