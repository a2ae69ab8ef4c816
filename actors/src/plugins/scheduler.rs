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

use actix::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::Shutdown;
use crate::cluster::lock::{LockGuard, LockManager, LockOptions};
use crate::plugins::pool::PluginVmPool;
use crate::plugins::runtime::vm::Method;
use crate::system::stats::ActorStats;

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

/// The `Scheduler` actor: takes the schedule lock and ticks while it holds it. A restart (after
/// a panic) drops the loop, which releases the lock, and starts it again.
///
/// Receives: `Shutdown` from the topology (release the lock so another instance takes over at
/// once rather than after the TTL).
pub struct PluginScheduler {
    config: SchedulerConfig,
    locks: Arc<dyn LockManager>,
    pool: PluginVmPool,
    /// Kept across restarts, so `/_actors` counts the instance's ticks.
    state: Arc<Mutex<SchedulerState>>,
    stats: Arc<ActorStats>,
    /// Stops the running loop; replaced on restart.
    stop: CancellationToken,
    /// Cancelled by the loop once it has stopped and released the lock.
    stopped: CancellationToken,
}

impl PluginScheduler {
    pub fn new(
        config: SchedulerConfig,
        locks: Arc<dyn LockManager>,
        pool: PluginVmPool,
        stats: Arc<ActorStats>,
    ) -> Self {
        Self {
            config,
            locks,
            pool,
            state: Arc::default(),
            stats,
            stop: CancellationToken::new(),
            stopped: CancellationToken::new(),
        }
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats(Arc::clone(&self.state))
    }
}

impl Actor for PluginScheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let stop = self.stop.clone();
        let stopped = self.stopped.clone();
        let run = run(
            self.config,
            Arc::clone(&self.locks),
            self.pool.clone(),
            stop,
            Arc::clone(&self.state),
        );
        ctx.spawn(
            async move {
                run.await;
                stopped.cancel();
            }
            .into_actor(self),
        );
    }
}

/// The loop was dropped with the context; dropping its lock guard released the lock.
impl Supervised for PluginScheduler {
    fn restarting(&mut self, _: &mut Context<Self>) {
        lock(&self.state).holds_lock = false;
        self.stop.cancel();
        self.stop = CancellationToken::new();
        self.stopped = CancellationToken::new();
    }
}

impl Handler<Shutdown> for PluginScheduler {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        let _timer = self.stats.message_received();
        self.stop.cancel();
        let stopped = self.stopped.clone();
        Box::pin(async move {
            // Releasing is one round trip; past this the lock simply expires.
            let _ = tokio::time::timeout(Duration::from_secs(5), stopped.cancelled()).await;
        })
    }
}

#[cfg(any(test, feature = "test-util"))]
impl Handler<crate::system::supervisor::Crash> for PluginScheduler {
    type Result = ();

    fn handle(&mut self, crash: crate::system::supervisor::Crash, _: &mut Context<Self>) {
        crash.now();
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

    /// A panic in the scheduler's handler: supervision restarts it (counted), the lock it held
    /// is released with the old loop, and the new loop takes it and ticks again.
    #[actix::test]
    async fn a_panicking_scheduler_is_restarted_and_ticks_again() {
        use crate::cluster::InstanceId;
        use crate::cluster::lock::{InProcessLockBackend, InProcessLocks};
        use crate::plugins::test_pool::{self, Collected, eventually};
        use crate::system::metrics::Metrics;
        use crate::system::stats::ActorRegistry;
        use crate::system::supervisor::{Crash, SpawnOptions, spawn_supervised};

        let registry = ActorRegistry::new(Metrics::new().expect("metrics"));
        let jobs = Arc::new(crate::plugins::jobs::MemoryJobStore::new());
        let pool = test_pool::start(Vec::new(), jobs, Arc::new(Collected::default())).await;
        let locks: Arc<dyn LockManager> = Arc::new(InProcessLocks::new(
            InProcessLockBackend::new(),
            InstanceId::generate(),
        ));
        let config = SchedulerConfig {
            lock_ttl: Duration::from_secs(2),
            minute: Duration::from_millis(50),
            ..SchedulerConfig::default()
        };
        let mut view = None;
        let scheduler = spawn_supervised(&registry, SpawnOptions::new("scheduler"), |stats| {
            let scheduler = PluginScheduler::new(config, locks, pool, stats);
            view = Some(scheduler.stats());
            scheduler
        });
        let view = view.expect("stats");
        let ticks = || view.snapshot()["ticks"].as_u64().unwrap_or(0);
        eventually("a first tick", || ticks() >= 1).await;

        let lost = scheduler.send(Crash).await;
        assert!(matches!(lost, Err(MailboxError::Closed)), "{lost:?}");
        let snapshot = scheduler.stats().snapshot();
        assert_eq!((snapshot.restarts, snapshot.errors), (1, 1));

        let before = ticks();
        eventually("ticks after the restart", || ticks() > before + 1).await;
        assert_eq!(view.snapshot()["holds_lock"], true);
        scheduler.send(Shutdown).await.expect("stopped");
        assert_eq!(view.snapshot()["holds_lock"], false);
    }
}
