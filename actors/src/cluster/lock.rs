//! LockManager: leases on named keys, so that one instance at a time does a piece of work.
//!
//! Used by the scheduler's single-runner lock (`plugin-server:locks:schedule`: one instance of
//! the cluster runs `runEveryMinute` and friends) and by plugin `meta` locks (namespaced per
//! plugin config). See `shared/spec/nocobase-cluster.md` §6, §9.3 point 4 and §10.2.
//!
//! A lock is a lease: an owner token stored under the key with a TTL. Unlike NocoBase's:
//! - the TTL never forcibly releases a live holder: while a [`LockGuard`] lives, a background
//!   task renews the lease every `renew_every`, token-checked, so exclusion holds for as long as
//!   the holder runs;
//! - a holder that dies (or stalls past its TTL) loses the lease when it expires, and others may
//!   take it; the late holder's renewal and release do nothing because its token no longer
//!   matches, and its `lost()` fires so it can stop what it was doing;
//! - `try_acquire` is one atomic claim (`SET NX PX`), never check-then-act;
//! - locks are not reentrant: a second acquire of a held key from the same manager waits or
//!   fails like anyone else's.
//!
//! Two adapters implement [`LockManager`]: [`InProcessLocks`] for the embedded profile (managers
//! sharing one [`InProcessLockBackend`] see each other's locks, like instances sharing a Redis)
//! and [`RedisLocks`] for the cluster profile.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, trace, warn};

use super::redis_pool::RedisPool;
use super::{ClusterError, InstanceId};

/// First delay between two claims of a held Redis lock by `acquire`; it doubles up to
/// `RETRY_MAX`. Each delay is jittered so contenders do not retry in lockstep.
const RETRY_INITIAL: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_millis(500);
/// Far beyond any sane lease; keeps `Instant + ttl` from overflowing and fits Redis `PX`.
const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// The in-process backend sweeps expired leases once it holds this many keys, so keys locked
/// once and never again do not pile up.
const SWEEP_THRESHOLD: usize = 1024;

/// Deletes the lease only if it still carries the caller's token: a holder whose lease expired
/// and was taken over must not delete the new owner's.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Extends the lease only if it still carries the caller's token; never recreates it.
const EXTEND_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// How long a lease lasts and how often a live holder renews it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockOptions {
    /// Lifetime of the lease without renewal: how long others wait after the holder dies.
    /// Whole milliseconds (Redis `PX`); at least 1 ms.
    pub ttl: Duration,
    /// How often the holder renews. Must be below `ttl`; `Duration::ZERO` turns renewal off,
    /// so the lease simply expires after `ttl` (a per-tick lock that should not outlive its
    /// tick), and `lost()` fires then.
    pub renew_every: Duration,
}

impl LockOptions {
    /// Renews every `ttl / 3`: two renewals can fail before the lease runs out.
    pub fn with_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            renew_every: ttl / 3,
        }
    }

    /// A lease that is never renewed and expires `ttl` after it was taken.
    pub fn without_renewal(ttl: Duration) -> Self {
        Self {
            ttl,
            renew_every: Duration::ZERO,
        }
    }

    /// The TTL in whole milliseconds, as Redis stores it, after checking the options. Both
    /// adapters use the truncated value, so a guard never believes in a longer lease than the
    /// store holds.
    fn lease_ttl(&self) -> Result<Duration, ClusterError> {
        let ttl = Duration::from_millis(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX));
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(ClusterError::InvalidArgument(format!(
                "a lock TTL must be between 1 ms and {MAX_TTL:?}, got {:?}",
                self.ttl
            )));
        }
        if self.renew_every >= ttl {
            return Err(ClusterError::InvalidArgument(format!(
                "a lock must be renewed more often than its TTL ({:?}), got every {:?}",
                ttl, self.renew_every
            )));
        }
        Ok(ttl)
    }
}

/// Takes and waits for leases. Not reentrant.
#[async_trait]
pub trait LockManager: Send + Sync {
    /// Takes the lock if it is free (or its lease expired); `Ok(None)` when another owner holds
    /// it. One atomic claim, so two callers can never both win.
    async fn try_acquire(
        &self,
        key: &str,
        options: LockOptions,
    ) -> Result<Option<LockGuard>, ClusterError>;

    /// Waits up to `timeout` for the lock, then fails with `ClusterError::Timeout`. Tries at
    /// least once, so a zero timeout is `try_acquire` with an error instead of `None`. Waiters
    /// are not queued: whoever claims first after a release wins.
    async fn acquire(
        &self,
        key: &str,
        options: LockOptions,
        timeout: Duration,
    ) -> Result<LockGuard, ClusterError>;
}

/// Acquires `key` (waiting up to `timeout`), runs `work` and releases. If the lease is lost while
/// `work` runs, `work` is dropped at its next await point and `ClusterError::LockLost` returned,
/// so it cannot go on as if it were alone. A failed release after `work` finished is only
/// logged: the result is there, and the lease expires by itself.
pub async fn run_exclusive<T, F>(
    locks: &dyn LockManager,
    key: &str,
    options: LockOptions,
    timeout: Duration,
    work: F,
) -> Result<T, ClusterError>
where
    F: Future<Output = T>,
{
    let guard = locks.acquire(key, options, timeout).await?;
    let lost = guard.lost();
    tokio::select! {
        // Checked first: once the lease is gone, a result produced in the same poll is no
        // longer known to be exclusive.
        biased;
        () = lost => {
            warn!(key, "lock lost while running exclusive work, cancelling the work");
            Err(ClusterError::LockLost { key: key.to_owned() })
        }
        value = work => {
            if let Err(error) = guard.release().await {
                warn!(key, %error, "could not release lock after exclusive work, it will expire");
            }
            Ok(value)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The guard and its renewal

/// What an adapter stores; the guard and its renewal task only need these three operations.
#[async_trait]
trait LeaseStore: Send + Sync {
    /// Stores `token` under `key` for `ttl` unless a live lease is there; true if it did.
    async fn claim(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, ClusterError>;
    /// Restarts the lease's TTL if it still carries `token`; false if it is gone or not ours.
    async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, ClusterError>;
    /// Deletes the lease if it still carries `token`; false if it was gone or not ours.
    async fn release(&self, key: &str, token: &str) -> Result<bool, ClusterError>;
    /// Releases without awaiting, where the store can: a guard dropped outside a runtime still
    /// frees its lock at once. `None` when the store needs `release`.
    fn release_now(&self, _key: &str, _token: &str) -> Option<bool> {
        None
    }
}

/// State shared by a guard and its renewal task.
struct LeaseState {
    /// Fired by the renewal task when the lease is gone, taken over, or no longer known to be
    /// ours (renewals failed until the TTL ran out).
    lost: CancellationToken,
    /// Until when the lease is certainly ours: the start of the last successful claim or renewal
    /// plus the TTL. Measured before the request was sent, so never later than the store's
    /// expiry, whatever the clocks of other hosts say.
    valid_until: Mutex<Instant>,
}

impl LeaseState {
    fn valid_until(&self) -> Instant {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn set_valid_until(&self, instant: Instant) {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = instant;
    }
}

/// A held lease. A background task renews it every `renew_every` while the guard lives; if a
/// renewal finds the lease gone or owned by someone else, or renewals keep failing until the TTL
/// runs out, `lost()` fires and `is_held()` turns false. Dropping the guard stops the renewal and
/// releases the lease in the background (token-checked); `release` does it and reports errors.
pub struct LockGuard {
    key: String,
    token: String,
    store: Arc<dyn LeaseStore>,
    lease: Arc<LeaseState>,
    /// Stops the renewal task: on release, on drop, and when a test abandons the guard.
    stop_renewal: CancellationToken,
    /// Set once the lease was released (or abandoned), so `Drop` does not release it again.
    released: bool,
}

impl LockGuard {
    /// Wraps a lease just claimed at `claimed_at` and starts its renewal task.
    fn start(
        store: Arc<dyn LeaseStore>,
        key: &str,
        token: String,
        ttl: Duration,
        renew_every: Duration,
        claimed_at: Instant,
    ) -> Self {
        let lease = Arc::new(LeaseState {
            lost: CancellationToken::new(),
            valid_until: Mutex::new(claimed_at + ttl),
        });
        let stop_renewal = CancellationToken::new();
        tokio::spawn(keep_alive(
            Arc::clone(&store),
            key.to_owned(),
            token.clone(),
            ttl,
            renew_every,
            Arc::clone(&lease),
            stop_renewal.clone(),
        ));
        Self {
            key: key.to_owned(),
            token,
            store,
            lease,
            stop_renewal,
            released: false,
        }
    }

    /// The key as given to the manager (without the adapter's prefix).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The owner token stored in the lease: `<instance id>:<uuid v4>`.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Whether the lease is still known to be ours. Conservative: false as soon as the last
    /// confirmed TTL ran out, even before the renewal task notices.
    pub fn is_held(&self) -> bool {
        !self.lease.lost.is_cancelled() && Instant::now() < self.lease.valid_until()
    }

    /// Completes when the lease is lost; never if it is released or the guard dropped first.
    pub fn lost(&self) -> WaitForCancellationFutureOwned {
        self.lease.lost.clone().cancelled_owned()
    }

    /// A token cancelled when the lease is lost. A child token: cancelling it does not make the
    /// guard believe it lost the lease.
    pub fn lost_token(&self) -> CancellationToken {
        self.lease.lost.child_token()
    }

    /// Stops renewing and deletes the lease if it is still ours. Releasing a lease that was
    /// already lost is not an error (there is nothing left to delete); only store errors are.
    pub async fn release(mut self) -> Result<(), ClusterError> {
        self.stop_renewal.cancel();
        let outcome = self.store.release(&self.key, &self.token).await;
        // After the store answered, success or not: dropping then must not try again. If this
        // future is dropped mid-release, `released` stays false and `Drop` retries.
        self.released = true;
        match outcome? {
            true => debug!(key = %self.key, "lock released"),
            false => debug!(key = %self.key, "lock was already lost when released"),
        }
        Ok(())
    }

    /// Stops renewing without releasing, as if the holder had died: the lease stays until its
    /// TTL runs out.
    #[cfg(test)]
    pub(crate) fn abandon(mut self) {
        self.stop_renewal.cancel();
        self.released = true;
    }
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.key)
            .field("token", &self.token)
            .field("is_held", &self.is_held())
            .finish()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.stop_renewal.cancel();
        if self.released {
            return;
        }
        match self.store.release_now(&self.key, &self.token) {
            Some(true) => {
                debug!(key = %self.key, "lock released on drop");
                return;
            }
            Some(false) => {
                debug!(key = %self.key, "dropped lock was already lost");
                return;
            }
            None => {}
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            debug!(key = %self.key, "lock dropped outside a runtime, it will expire after its ttl");
            return;
        };
        let store = Arc::clone(&self.store);
        let key = self.key.clone();
        let token = self.token.clone();
        // Fire and forget: the release is token-checked, so even a late one is harmless.
        runtime.spawn(async move {
            match store.release(&key, &token).await {
                Ok(true) => debug!(key, "lock released on drop"),
                Ok(false) => debug!(key, "dropped lock was already lost"),
                Err(error) => {
                    warn!(key, %error, "could not release dropped lock, it will expire");
                }
            }
        });
    }
}

/// The renewal task of one guard: renews until stopped, and fires `lost` when the lease is gone
/// or can no longer be confirmed before it expires.
async fn keep_alive(
    store: Arc<dyn LeaseStore>,
    key: String,
    token: String,
    ttl: Duration,
    renew_every: Duration,
    lease: Arc<LeaseState>,
    stop: CancellationToken,
) {
    let renewing = !renew_every.is_zero();
    let mut valid_until = lease.valid_until();
    let mut next_renewal = valid_until - ttl + renew_every;
    loop {
        let wake_at = if renewing {
            next_renewal.min(valid_until)
        } else {
            valid_until
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = sleep_until(wake_at) => {}
        }
        if Instant::now() >= valid_until {
            if renewing {
                warn!(
                    key,
                    "lock lost: its lease ran out before a renewal succeeded"
                );
            } else {
                debug!(key, "lock lease expired without renewal");
            }
            lease.lost.cancel();
            return;
        }
        let started = Instant::now();
        // Bounded by the lease: a store that hangs past it cannot confirm the lease any more.
        let renewal = tokio::select! {
            () = stop.cancelled() => return,
            renewal = timeout_at(valid_until, store.extend(&key, &token, ttl)) => renewal,
        };
        match renewal {
            Ok(Ok(true)) => {
                valid_until = started + ttl;
                lease.set_valid_until(valid_until);
                next_renewal = started + renew_every;
                trace!(key, "lock lease renewed");
            }
            Ok(Ok(false)) => {
                warn!(key, "lock lost: its lease expired or another owner took it");
                lease.lost.cancel();
                return;
            }
            Ok(Err(error)) => {
                // Retry sooner than usual: the lease still runs, but not for long.
                let now = Instant::now();
                next_renewal = now + renew_every.min((valid_until - now) / 2);
                warn!(key, %error, "could not renew lock lease, retrying");
            }
            Err(_elapsed) => {
                warn!(
                    key,
                    "lock lost: renewal did not answer before the lease ran out"
                );
                lease.lost.cancel();
                return;
            }
        }
    }
}

/// Claims `key` for a fresh token of `owner` and, on success, returns the renewing guard.
async fn claim_guard(
    store: Arc<dyn LeaseStore>,
    owner: &InstanceId,
    key: &str,
    options: LockOptions,
) -> Result<Option<LockGuard>, ClusterError> {
    let ttl = options.lease_ttl()?;
    let token = format!("{owner}:{}", uuid::Uuid::new_v4());
    // Taken before the claim is sent: the store's lease starts later, never earlier.
    let claimed_at = Instant::now();
    if !store.claim(key, &token, ttl).await? {
        trace!(key, "lock held by another owner");
        return Ok(None);
    }
    debug!(key, token, ttl_ms = ttl.as_millis(), "lock acquired");
    Ok(Some(LockGuard::start(
        store,
        key,
        token,
        ttl,
        options.renew_every,
        claimed_at,
    )))
}

/// `now + timeout`, or a far future for a timeout too large to add.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + MAX_TTL * 10)
}

// ---------------------------------------------------------------------------------------------
// In-process adapter

/// One lease in the in-process store.
struct Lease {
    token: String,
    expires_at: Instant,
}

impl Lease {
    fn is_live(&self, now: Instant) -> bool {
        now < self.expires_at
    }
}

/// The lock store shared by in-process managers: what Redis is to `RedisLocks`. Expiry uses
/// tokio's clock, so TTLs follow a paused clock in tests.
pub struct InProcessLockBackend {
    leases: Mutex<HashMap<String, Lease>>,
    /// Woken on every release, so waiting `acquire`s retry at once instead of polling. One for
    /// all keys: a waiter woken for another key retries and waits again.
    released: Notify,
}

impl InProcessLockBackend {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            leases: Mutex::new(HashMap::new()),
            released: Notify::new(),
        })
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        // A panic cannot leave the map half-updated (single inserts and removes).
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn claim_now(&self, key: &str, token: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut leases = self.leases();
        if leases.get(key).is_some_and(|lease| lease.is_live(now)) {
            return false;
        }
        if leases.len() >= SWEEP_THRESHOLD {
            leases.retain(|_, lease| lease.is_live(now));
        }
        leases.insert(
            key.to_owned(),
            Lease {
                token: token.to_owned(),
                expires_at: now + ttl,
            },
        );
        true
    }

    fn extend_now(&self, key: &str, token: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        match self.leases().get_mut(key) {
            Some(lease) if lease.token == token && lease.is_live(now) => {
                lease.expires_at = now + ttl;
                true
            }
            _ => false,
        }
    }

    fn release_token(&self, key: &str, token: &str) -> bool {
        let now = Instant::now();
        let released = {
            let mut leases = self.leases();
            match leases.get(key) {
                // An expired lease is no longer ours even if nobody took it yet.
                Some(lease) if lease.token == token => {
                    let live = lease.is_live(now);
                    leases.remove(key);
                    live
                }
                _ => false,
            }
        };
        if released {
            self.released.notify_waiters();
        }
        released
    }

    /// When the live lease on `key` expires; `None` if the key is free.
    fn expiry_of(&self, key: &str) -> Option<Instant> {
        let now = Instant::now();
        self.leases()
            .get(key)
            .filter(|lease| lease.is_live(now))
            .map(|lease| lease.expires_at)
    }

    /// The token of the live lease on `key`.
    #[cfg(test)]
    pub(crate) fn holder(&self, key: &str) -> Option<String> {
        let now = Instant::now();
        self.leases()
            .get(key)
            .filter(|lease| lease.is_live(now))
            .map(|lease| lease.token.clone())
    }

    /// Overwrites the lease on `key`, as an operator or a split brain would.
    #[cfg(test)]
    pub(crate) fn steal(&self, key: &str, token: &str, ttl: Duration) {
        self.leases().insert(
            key.to_owned(),
            Lease {
                token: token.to_owned(),
                expires_at: Instant::now() + ttl,
            },
        );
    }
}

#[async_trait]
impl LeaseStore for InProcessLockBackend {
    async fn claim(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, ClusterError> {
        Ok(self.claim_now(key, token, ttl))
    }

    async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, ClusterError> {
        Ok(self.extend_now(key, token, ttl))
    }

    async fn release(&self, key: &str, token: &str) -> Result<bool, ClusterError> {
        Ok(self.release_token(key, token))
    }

    fn release_now(&self, key: &str, token: &str) -> Option<bool> {
        Some(self.release_token(key, token))
    }
}

/// The embedded profile's lock manager: one instance's view of an `InProcessLockBackend`.
pub struct InProcessLocks {
    backend: Arc<InProcessLockBackend>,
    owner: InstanceId,
}

impl InProcessLocks {
    pub fn new(backend: Arc<InProcessLockBackend>, owner: InstanceId) -> Self {
        Self { backend, owner }
    }
}

#[async_trait]
impl LockManager for InProcessLocks {
    async fn try_acquire(
        &self,
        key: &str,
        options: LockOptions,
    ) -> Result<Option<LockGuard>, ClusterError> {
        let store: Arc<dyn LeaseStore> = Arc::clone(&self.backend) as Arc<dyn LeaseStore>;
        claim_guard(store, &self.owner, key, options).await
    }

    async fn acquire(
        &self,
        key: &str,
        options: LockOptions,
        timeout: Duration,
    ) -> Result<LockGuard, ClusterError> {
        let deadline = deadline_after(timeout);
        loop {
            // Registered before the attempt, so a release between a failed attempt and the wait
            // below still wakes us.
            let released = self.backend.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(guard) = self.try_acquire(key, options).await? {
                return Ok(guard);
            }
            if Instant::now() >= deadline {
                debug!(
                    key,
                    timeout_ms = timeout.as_millis(),
                    "timed out waiting for lock"
                );
                return Err(ClusterError::Timeout(timeout));
            }
            // A holder that dies never releases: wake when its lease runs out too.
            let holder_expiry = self.backend.expiry_of(key).unwrap_or_else(Instant::now);
            tokio::select! {
                () = released => {}
                () = sleep_until(holder_expiry.min(deadline)) => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Redis adapter

/// Leases as Redis keys `<prefix><key>` holding the owner token, with `PX` expiry. No extra
/// segment is added, so the scheduler's `plugin-server:locks:schedule` is the very key PostHog's
/// Node server locks with `SET NX PX`: old and new servers side by side still run each task once.
struct RedisLeaseStore {
    pool: RedisPool,
    prefix: String,
    release_script: redis::Script,
    extend_script: redis::Script,
}

impl RedisLeaseStore {
    fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// Whole milliseconds for `PX`/`PEXPIRE`; `LockOptions::lease_ttl` already bounded it.
fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait]
impl LeaseStore for RedisLeaseStore {
    async fn claim(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, ClusterError> {
        let mut connection = self.pool.get().await?;
        let reply: Option<String> = redis::cmd("SET")
            .arg(self.redis_key(key))
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_millis(ttl))
            .query_async(&mut connection)
            .await?;
        Ok(reply.is_some())
    }

    async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, ClusterError> {
        let mut connection = self.pool.get().await?;
        let extended: i64 = self
            .extend_script
            .key(self.redis_key(key))
            .arg(token)
            .arg(ttl_millis(ttl))
            .invoke_async(&mut connection)
            .await?;
        Ok(extended == 1)
    }

    async fn release(&self, key: &str, token: &str) -> Result<bool, ClusterError> {
        let mut connection = self.pool.get().await?;
        let deleted: i64 = self
            .release_script
            .key(self.redis_key(key))
            .arg(token)
            .invoke_async(&mut connection)
            .await?;
        Ok(deleted == 1)
    }
}

/// The cluster profile's lock manager, on the shared Redis pool.
pub struct RedisLocks {
    store: Arc<RedisLeaseStore>,
    owner: InstanceId,
}

impl RedisLocks {
    /// `prefix` is the deployment's key prefix (`CLUSTER_PREFIX`); leases live at `<prefix><key>`.
    pub fn new(pool: RedisPool, prefix: impl Into<String>, owner: InstanceId) -> Self {
        Self {
            store: Arc::new(RedisLeaseStore {
                pool,
                prefix: prefix.into(),
                release_script: redis::Script::new(RELEASE_SCRIPT),
                extend_script: redis::Script::new(EXTEND_SCRIPT),
            }),
            owner,
        }
    }
}

/// A random delay in `[delay / 2, delay]`, so contenders spread out.
fn jittered(delay: Duration) -> Duration {
    delay / 2 + delay.mul_f64(rand::random::<f64>() / 2.0)
}

#[async_trait]
impl LockManager for RedisLocks {
    async fn try_acquire(
        &self,
        key: &str,
        options: LockOptions,
    ) -> Result<Option<LockGuard>, ClusterError> {
        let store: Arc<dyn LeaseStore> = Arc::clone(&self.store) as Arc<dyn LeaseStore>;
        claim_guard(store, &self.owner, key, options).await
    }

    async fn acquire(
        &self,
        key: &str,
        options: LockOptions,
        timeout: Duration,
    ) -> Result<LockGuard, ClusterError> {
        let deadline = deadline_after(timeout);
        let mut delay = RETRY_INITIAL;
        loop {
            // Redis errors are returned, not retried: contention is what this loop waits out.
            if let Some(guard) = self.try_acquire(key, options).await? {
                return Ok(guard);
            }
            let now = Instant::now();
            if now >= deadline {
                debug!(
                    key,
                    timeout_ms = timeout.as_millis(),
                    "timed out waiting for lock"
                );
                return Err(ClusterError::Timeout(timeout));
            }
            tokio::time::sleep(jittered(delay).min(deadline - now)).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    const KEY: &str = "plugin-server:locks:schedule";
    const TTL: Duration = Duration::from_secs(3);

    fn pair() -> (Arc<InProcessLockBackend>, InProcessLocks, InProcessLocks) {
        let backend = InProcessLockBackend::new();
        let a = InProcessLocks::new(Arc::clone(&backend), InstanceId::new("a"));
        let b = InProcessLocks::new(Arc::clone(&backend), InstanceId::new("b"));
        (backend, a, b)
    }

    fn options() -> LockOptions {
        LockOptions::with_ttl(TTL)
    }

    #[tokio::test]
    async fn try_acquire_excludes_other_owners_and_is_not_reentrant() {
        let (backend, a, b) = pair();
        let guard = a.try_acquire(KEY, options()).await.unwrap().expect("free");
        assert!(guard.is_held());
        assert_eq!(guard.key(), KEY);
        assert!(guard.token().starts_with("a:"), "{}", guard.token());
        assert_eq!(backend.holder(KEY).as_deref(), Some(guard.token()));
        assert!(b.try_acquire(KEY, options()).await.unwrap().is_none());
        assert!(
            a.try_acquire(KEY, options()).await.unwrap().is_none(),
            "not reentrant"
        );
        assert!(b.try_acquire("other", options()).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn release_frees_the_lock() {
        let (backend, a, b) = pair();
        let guard = a.try_acquire(KEY, options()).await.unwrap().expect("free");
        guard.release().await.unwrap();
        assert_eq!(backend.holder(KEY), None);
        assert!(b.try_acquire(KEY, options()).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn drop_releases_the_lock() {
        let (_backend, a, b) = pair();
        let guard = a.try_acquire(KEY, options()).await.unwrap().expect("free");
        drop(guard);
        assert!(b.try_acquire(KEY, options()).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn invalid_options_are_refused() {
        let (_backend, a, _b) = pair();
        for options in [
            LockOptions::with_ttl(Duration::ZERO),
            LockOptions::with_ttl(Duration::from_micros(900)),
            LockOptions {
                ttl: TTL,
                renew_every: TTL,
            },
        ] {
            let refused = a.try_acquire(KEY, options).await;
            assert!(
                matches!(refused, Err(ClusterError::InvalidArgument(_))),
                "{options:?}: {refused:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_holder_loses_the_lock_after_its_ttl() {
        let (_backend, a, b) = pair();
        let guard = a.try_acquire(KEY, options()).await.unwrap().expect("free");
        guard.abandon();
        tokio::time::sleep(TTL - Duration::from_millis(1)).await;
        assert!(
            b.try_acquire(KEY, options()).await.unwrap().is_none(),
            "not yet"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(
            b.try_acquire(KEY, options()).await.unwrap().is_some(),
            "expired"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewing_holder_keeps_the_lock_past_many_ttls() {
        let (_backend, a, b) = pair();
        let guard = a.try_acquire(KEY, options()).await.unwrap().expect("free");
        let started = Instant::now();
        while started.elapsed() < TTL * 10 {
            tokio::time::sleep(TTL / 4).await;
            assert!(b.try_acquire(KEY, options()).await.unwrap().is_none());
            assert!(guard.is_held());
        }
        assert!(!guard.lost_token().is_cancelled());
        guard.release().await.unwrap();
        assert!(b.try_acquire(KEY, options()).await.unwrap().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_is_woken_by_release() {
        let (_backend, a, b) = pair();
        let guard = a.try_acquire(KEY, options()).await.unwrap().expect("free");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            guard.release().await.unwrap();
        });
        let started = Instant::now();
        let acquired = b.acquire(KEY, options(), Duration::from_secs(10)).await;
        assert!(acquired.unwrap().is_held());
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(2),
            "woken at the release"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_is_woken_by_expiry_of_a_dead_holder() {
        let (_backend, a, b) = pair();
        a.try_acquire(KEY, options())
            .await
            .unwrap()
            .expect("free")
            .abandon();
        let started = Instant::now();
        let acquired = b.acquire(KEY, options(), Duration::from_secs(10)).await;
        assert!(acquired.unwrap().is_held());
        assert_eq!(started.elapsed(), TTL, "woken at the expiry");
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_times_out() {
        let (_backend, a, b) = pair();
        let _guard = a.try_acquire(KEY, options()).await.unwrap().expect("free");
        let started = Instant::now();
        let timeout = Duration::from_secs(5);
        let outcome = b.acquire(KEY, options(), timeout).await;
        assert!(
            matches!(outcome, Err(ClusterError::Timeout(t)) if t == timeout),
            "{outcome:?}"
        );
        assert_eq!(started.elapsed(), timeout);
        let zero = b.acquire(KEY, options(), Duration::ZERO).await;
        assert!(matches!(zero, Err(ClusterError::Timeout(_))), "{zero:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn run_exclusive_returns_the_value_and_releases() {
        let (backend, a, _b) = pair();
        let value = run_exclusive(&a, KEY, options(), Duration::from_secs(1), async {
            assert!(backend.holder(KEY).is_some(), "held while the work runs");
            tokio::time::sleep(TTL * 5).await;
            42
        })
        .await;
        assert_eq!(value.unwrap(), 42);
        assert_eq!(backend.holder(KEY), None, "released after");
    }

    #[tokio::test(start_paused = true)]
    async fn run_exclusive_cancels_the_work_when_the_lease_is_stolen() {
        let (backend, a, _b) = pair();
        let finished = AtomicBool::new(false);
        let thief = {
            let backend = Arc::clone(&backend);
            tokio::spawn(async move {
                // Between two renewals (every ttl/3 = 1 s), so which runs first is not a race.
                tokio::time::sleep(Duration::from_millis(2500)).await;
                backend.steal(KEY, "thief", Duration::from_secs(60));
            })
        };
        let started = Instant::now();
        let outcome = run_exclusive(&a, KEY, options(), Duration::from_secs(1), async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            finished.store(true, Ordering::SeqCst);
        })
        .await;
        thief.await.unwrap();
        assert!(
            matches!(outcome, Err(ClusterError::LockLost { .. })),
            "{outcome:?}"
        );
        assert!(!finished.load(Ordering::SeqCst), "the work was cancelled");
        // Noticed at the first renewal after the theft.
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert_eq!(backend.holder(KEY).as_deref(), Some("thief"), "not deleted");
    }

    #[tokio::test(start_paused = true)]
    async fn run_exclusive_cancels_the_work_when_the_lease_expires() {
        let (backend, a, _b) = pair();
        let finished = AtomicBool::new(false);
        let started = Instant::now();
        let outcome = run_exclusive(
            &a,
            KEY,
            LockOptions::without_renewal(TTL),
            Duration::from_secs(1),
            async {
                tokio::time::sleep(TTL * 2).await;
                finished.store(true, Ordering::SeqCst);
            },
        )
        .await;
        assert!(
            matches!(outcome, Err(ClusterError::LockLost { .. })),
            "{outcome:?}"
        );
        assert!(!finished.load(Ordering::SeqCst));
        assert_eq!(started.elapsed(), TTL);
        assert_eq!(backend.holder(KEY), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_late_release_of_an_expired_holder_keeps_the_new_owners_lease() {
        let (backend, a, b) = pair();
        let old = a
            .try_acquire(KEY, LockOptions::without_renewal(TTL))
            .await
            .unwrap()
            .expect("free");
        let old_lost = old.lost();
        tokio::time::sleep(TTL).await;
        old_lost.await;
        assert!(!old.is_held());
        let new = b
            .try_acquire(KEY, options())
            .await
            .unwrap()
            .expect("expired");
        old.release().await.unwrap();
        assert_eq!(backend.holder(KEY).as_deref(), Some(new.token()));
        assert!(a.try_acquire(KEY, options()).await.unwrap().is_none());
        tokio::time::sleep(TTL * 3).await;
        assert!(new.is_held(), "its renewals still work");
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_of_a_stolen_lease_fires_lost_and_keeps_the_thiefs_lease() {
        let (backend, a, _b) = pair();
        let guard = a.try_acquire(KEY, options()).await.unwrap().expect("free");
        let lost_token = guard.lost_token();
        backend.steal(KEY, "thief", Duration::from_secs(60));
        tokio::time::timeout(TTL, guard.lost())
            .await
            .expect("lost within a renewal period");
        assert!(lost_token.is_cancelled());
        assert!(!guard.is_held());
        drop(guard);
        assert_eq!(backend.holder(KEY).as_deref(), Some("thief"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_without_renewal_is_not_held_past_its_ttl() {
        let (_backend, a, _b) = pair();
        let guard = a
            .try_acquire(KEY, LockOptions::without_renewal(TTL))
            .await
            .unwrap()
            .expect("free");
        tokio::time::sleep(TTL - Duration::from_millis(1)).await;
        assert!(guard.is_held());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!guard.is_held(), "conservative even before the task runs");
    }
}
