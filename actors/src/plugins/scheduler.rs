//! Scheduled plugin tasks (spec 3): `runEveryMinute`, `runEveryHour` and `runEveryDay` on the
//! minute, hour and day boundaries of the wall clock, run by exactly one instance of the
//! deployment.
//!
//! - The runner holds `plugin-server:locks:schedule` through the cluster lock manager (Redis in
//!   the cluster profile), with a lease of SCHEDULE_LOCK_TTL renewed every TTL/2; the others
//!   try to take it every TTL/10. A holder whose lease is lost stops scheduling at once, and
//!   whoever takes the lock next goes on from the next boundary.
//! - A tick is sent to every team with plugins; the team's worker runs the method of each
//!   config that has it (building and setting up the VM on the first tick).
//! - A team whose previous run of the same method is still going is skipped for that tick, and
//!   a boundary that passed while the instance was busy or not holding the lock is skipped, not
//!   made up for later.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::cluster::lock::{LockGuard, LockManager, LockOptions};
use crate::plugins::pool::PluginVmPool;
use crate::plugins::runtime::vm::Method;

/// PostHog's key, under the deployment's cluster prefix.
pub const SCHEDULE_LOCK_KEY: &str = "plugin-server:locks:schedule";

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// SCHEDULE_LOCK_TTL.
    pub lock_ttl: Duration,
    /// The periods of `runEveryMinute`, `runEveryHour` and `runEveryDay`: a minute, an hour and
    /// a day, shorter only in tests.
    pub minute: Duration,
    pub hour: Duration,
    pub day: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            lock_ttl: Duration::from_secs(60),
            minute: Duration::from_secs(60),
            hour: Duration::from_secs(3600),
            day: Duration::from_secs(86_400),
        }
    }
}

/// What `/_actors` shows of the scheduler.
#[derive(Debug, Default)]
struct SchedulerState {
    holds_lock: bool,
    ticks: u64,
    skipped_busy: u64,
}

/// The running scheduler; it stops (and releases the lock) when dropped.
pub struct PluginScheduler {
    stop: CancellationToken,
    state: Arc<Mutex<SchedulerState>>,
}

impl Drop for PluginScheduler {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl PluginScheduler {
    pub fn start(config: SchedulerConfig, locks: Arc<dyn LockManager>, pool: PluginVmPool) -> Self {
        let stop = CancellationToken::new();
        let state = Arc::new(Mutex::new(SchedulerState::default()));
        tokio::spawn(run(config, locks, pool, stop.clone(), Arc::clone(&state)));
        Self { stop, state }
    }

    /// Stops scheduling and releases the lock (in the background), so that another instance
    /// takes over at once rather than after the TTL.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats(Arc::clone(&self.state))
    }
}

/// A live view of the scheduler for `/_actors`.
#[derive(Clone)]
pub struct SchedulerStats(Arc<Mutex<SchedulerState>>);

impl SchedulerStats {
    /// `{holds_lock, ticks, skipped_busy}`.
    pub fn snapshot(&self) -> serde_json::Value {
        let state = lock(&self.0);
        serde_json::json!({
            "holds_lock": state.holds_lock,
            "ticks": state.ticks,
            "skipped_busy": state.skipped_busy,
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn run(
    config: SchedulerConfig,
    locks: Arc<dyn LockManager>,
    pool: PluginVmPool,
    stop: CancellationToken,
    state: Arc<Mutex<SchedulerState>>,
) {
    let options = LockOptions {
        ttl: config.lock_ttl,
        renew_every: config.lock_ttl / 2,
    };
    let retry = (config.lock_ttl / 10).max(Duration::from_millis(10));
    let running: Arc<Mutex<HashSet<(i64, Method)>>> = Arc::default();
    loop {
        let guard = tokio::select! {
            () = stop.cancelled() => return,
            guard = acquire(locks.as_ref(), options, retry) => guard,
        };
        tracing::info!("This instance now runs the plugins' scheduled tasks.");
        lock(&state).holds_lock = true;
        let lost = guard.lost_token();
        tokio::select! {
            () = stop.cancelled() => {
                lock(&state).holds_lock = false;
                if let Err(error) = guard.release().await {
                    tracing::warn!(%error, "The schedule lock could not be released; it expires by itself.");
                }
                return;
            }
            () = lost.cancelled() => {
                tracing::warn!("The schedule lock was lost; scheduled tasks stop on this instance.");
            }
            () = schedule(config, &pool, &running, &state) => {}
        }
        lock(&state).holds_lock = false;
        drop(guard);
    }
}

/// Tries to take the lock every `retry` until it succeeds.
async fn acquire(locks: &dyn LockManager, options: LockOptions, retry: Duration) -> LockGuard {
    loop {
        match locks.try_acquire(SCHEDULE_LOCK_KEY, options).await {
            Ok(Some(guard)) => return guard,
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "Could not try the schedule lock."),
        }
        tokio::time::sleep(retry).await;
    }
}

/// Runs ticks forever (while the caller holds the lock).
async fn schedule(
    config: SchedulerConfig,
    pool: &PluginVmPool,
    running: &Arc<Mutex<HashSet<(i64, Method)>>>,
    state: &Arc<Mutex<SchedulerState>>,
) {
    let periods = [
        (Method::RunEveryMinute, config.minute),
        (Method::RunEveryHour, config.hour),
        (Method::RunEveryDay, config.day),
    ];
    let mut next: Vec<(Method, Duration, u128)> = periods
        .iter()
        .map(|&(method, period)| (method, period, next_boundary(period)))
        .collect();
    loop {
        let Some(&(method, period, due)) = next.iter().min_by_key(|(_, _, due)| *due) else {
            return;
        };
        tokio::time::sleep(Duration::from_millis(
            u64::try_from(due.saturating_sub(unix_ms())).unwrap_or(u64::MAX),
        ))
        .await;
        tick(pool, method, running, state);
        // The next boundary after now: boundaries missed meanwhile are not made up for.
        for entry in &mut next {
            if entry.0 == method {
                entry.2 = next_boundary(period);
            }
        }
    }
}

/// Starts `method` for every team with plugins, except teams still running the last one.
fn tick(
    pool: &PluginVmPool,
    method: Method,
    running: &Arc<Mutex<HashSet<(i64, Method)>>>,
    state: &Arc<Mutex<SchedulerState>>,
) {
    lock(state).ticks += 1;
    for team_id in pool.teams() {
        if !lock(running).insert((team_id, method)) {
            lock(state).skipped_busy += 1;
            tracing::warn!(
                team_id,
                method = method.name(),
                "The previous run is still going; this tick is skipped."
            );
            continue;
        }
        let pool = pool.clone();
        let running = Arc::clone(running);
        tokio::spawn(async move {
            if let Err(error) = pool.run_scheduled(team_id, method).await {
                tracing::error!(team_id, method = method.name(), %error, "A scheduled task did not run.");
            }
            lock(&running).remove(&(team_id, method));
        });
    }
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis())
}

/// The first multiple of `period` (counted from the Unix epoch) strictly after now: the top of
/// the next minute, hour or UTC day.
fn next_boundary(period: Duration) -> u128 {
    let period = period.as_millis().max(1);
    (unix_ms() / period + 1) * period
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_are_aligned_to_the_period() {
        let minute = next_boundary(Duration::from_secs(60));
        assert_eq!(minute % 60_000, 0);
        assert!(minute > unix_ms() && minute <= unix_ms() + 60_000);
        let day = next_boundary(Duration::from_secs(86_400));
        assert_eq!(day % 86_400_000, 0);
    }
}
