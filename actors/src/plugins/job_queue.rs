//! Runs queued plugin jobs (`meta.jobs`) on the plugin VM pool.
//!
//! The runner claims due jobs up to its number of free slots, runs each with
//! `jobs[name](payload, meta)` of its config, and deletes it on success or records the failure
//! (retried per the job's policy, then dead-lettered). Between rounds it sleeps until the next
//! job is due, at most `poll_interval`, and wakes early when a job is queued anywhere in the
//! deployment (Postgres NOTIFY) or one of its own jobs finishes. A job of a config that is
//! disabled or deleted goes straight to the dead-letter table; claims older than
//! `claim_timeout` (their instance died mid-job) are released as failed attempts.
//!
//! Every instance that runs jobs may run this next to the others: the queue hands each job to
//! one of them only.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::Utc;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::Shutdown;

use crate::plugins::jobs::{FailOutcome, Job, JobStore};
use crate::plugins::pool::{JobRunError, PluginVmPool};
use crate::system::stats::ActorStats;

#[derive(Debug, Clone)]
pub struct JobQueueConfig {
    /// Written on each claim, for finding who ran what.
    pub instance: String,
    /// Jobs run at once by this instance.
    pub concurrency: usize,
    /// The longest sleep between two looks at the queue.
    pub poll_interval: Duration,
    /// A claim this old belongs to an instance that died; more than TASK_TIMEOUT, after which
    /// a job has been abandoned anyway.
    pub claim_timeout: Duration,
    /// How long shutdown waits for running jobs.
    pub shutdown_timeout: Duration,
}

/// Counters for `/_actors`.
#[derive(Debug, Default)]
struct Counters {
    claimed: AtomicU64,
    succeeded: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    skipped_inactive: AtomicU64,
    released_stale: AtomicU64,
    store_errors: AtomicU64,
    /// Jobs of this instance running now.
    running: AtomicU64,
}

/// The `JobQueue` actor: claims due jobs and runs them on the VM pool.
///
/// Each running job holds a permit of `slots`, which outlives a restart: after a panic the loop
/// starts again, the jobs already running finish and record their outcome, and the new loop
/// claims only what the free slots allow.
///
/// Receives: `Shutdown` from the topology (stop claiming; wait for running jobs, up to
/// `shutdown_timeout`).
pub struct PluginJobQueue {
    runner: Runner,
    stats: Arc<ActorStats>,
    /// Stops the running loop; replaced on restart.
    stop: CancellationToken,
}

impl PluginJobQueue {
    pub fn new(
        config: JobQueueConfig,
        store: Arc<dyn JobStore>,
        pool: PluginVmPool,
        stats: Arc<ActorStats>,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
        Self {
            runner: Runner {
                config,
                store,
                pool,
                slots,
                finished: Arc::default(),
                counters: Arc::default(),
            },
            stats,
            stop: CancellationToken::new(),
        }
    }

    pub fn stats(&self) -> JobQueueStats {
        JobQueueStats {
            counters: Arc::clone(&self.runner.counters),
            store: self.runner.store.name(),
        }
    }
}

impl Actor for PluginJobQueue {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let runner = self.runner.clone();
        ctx.spawn(runner.run(self.stop.clone()).into_actor(self));
    }
}

impl Supervised for PluginJobQueue {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.stop.cancel();
        self.stop = CancellationToken::new();
    }
}

impl Handler<Shutdown> for PluginJobQueue {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        let _timer = self.stats.message_received();
        self.stop.cancel();
        let slots = Arc::clone(&self.runner.slots);
        let all = u32::try_from(self.runner.config.concurrency.max(1)).unwrap_or(u32::MAX);
        let timeout = self.runner.config.shutdown_timeout;
        Box::pin(async move {
            // Every slot back means every running job has recorded its outcome.
            if tokio::time::timeout(timeout, slots.acquire_many(all))
                .await
                .is_err()
            {
                tracing::warn!("shutdown: jobs still running; their claims expire and they rerun");
            }
        })
    }
}

#[cfg(any(test, feature = "test-util"))]
impl Handler<crate::system::supervisor::Crash> for PluginJobQueue {
    type Result = ();

    fn handle(&mut self, crash: crate::system::supervisor::Crash, _: &mut Context<Self>) {
        crash.now();
    }
}

/// A live view of the job queue for `/_actors`.
#[derive(Clone)]
pub struct JobQueueStats {
    counters: Arc<Counters>,
    store: &'static str,
}

impl JobQueueStats {
    pub fn snapshot(&self) -> serde_json::Value {
        let c = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        serde_json::json!({
            "store": self.store,
            "running": load(&c.running),
            "claimed": load(&c.claimed),
            "succeeded": load(&c.succeeded),
            "retried": load(&c.retried),
            "dead_lettered": load(&c.dead_lettered),
            "skipped_inactive": load(&c.skipped_inactive),
            "released_stale": load(&c.released_stale),
            "store_errors": load(&c.store_errors),
        })
    }
}

/// The claim loop and what it needs; each (re)start runs a clone, sharing the slots and
/// counters.
#[derive(Clone)]
struct Runner {
    config: JobQueueConfig,
    store: Arc<dyn JobStore>,
    pool: PluginVmPool,
    slots: Arc<Semaphore>,
    finished: Arc<Notify>,
    counters: Arc<Counters>,
}

impl Runner {
    async fn run(self, stop: CancellationToken) {
        let concurrency = self.config.concurrency.max(1);
        let mut last_stale_check: Option<Instant> = None;
        while !stop.is_cancelled() {
            if last_stale_check.is_none_or(|at| at.elapsed() >= self.config.claim_timeout / 2) {
                last_stale_check = Some(Instant::now());
                self.release_stale().await;
            }

            let free = self.slots.available_permits();
            let mut claimed_any = false;
            if free > 0 {
                match self.store.claim(&self.config.instance, free).await {
                    Ok(claimed) => {
                        claimed_any = !claimed.is_empty();
                        self.counters
                            .claimed
                            .fetch_add(claimed.len() as u64, Ordering::Relaxed);
                        for job in claimed {
                            self.start(job);
                        }
                    }
                    Err(error) => {
                        self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%error, "could not claim jobs; retrying");
                    }
                }
            }
            let running = concurrency.saturating_sub(self.slots.available_permits());
            self.counters
                .running
                .store(running as u64, Ordering::Relaxed);

            let wait = if running >= concurrency {
                // Full: a finished job wakes the loop below.
                self.config.poll_interval
            } else if claimed_any {
                // Slots are free and more may be due: look again at once.
                Duration::ZERO
            } else {
                until_next_due(self.store.as_ref(), self.config.poll_interval).await
            };
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.store.wait_for_jobs(wait) => {}
                () = self.finished.notified() => {}
            }
        }
    }

    async fn release_stale(&self) {
        match self.store.release_stale(self.config.claim_timeout).await {
            Ok(0) => {}
            Ok(released) => {
                self.counters
                    .released_stale
                    .fetch_add(released, Ordering::Relaxed);
                tracing::warn!(released, "released jobs whose instance stopped answering");
            }
            Err(error) => {
                self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "could not look for abandoned jobs");
            }
        }
    }

    /// Runs `job` on its own task, holding a slot until its outcome is recorded: a restart of
    /// the actor does not cut it short.
    fn start(&self, job: Job) {
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            // Claimed no more than the free slots, and only this loop takes them.
            tracing::error!(
                job_id = job.id,
                "no free slot for a claimed job; its claim expires"
            );
            return;
        };
        let store = Arc::clone(&self.store);
        let pool = self.pool.clone();
        let counters = Arc::clone(&self.counters);
        let finished = Arc::clone(&self.finished);
        tokio::spawn(async move {
            run_job(job, store, pool, counters).await;
            drop(slot);
            finished.notify_one();
        });
    }
}

/// How long to sleep before the next unclaimed job is due, at most `poll_interval`.
async fn until_next_due(store: &dyn JobStore, poll_interval: Duration) -> Duration {
    match store.next_due().await {
        Ok(Some(due)) => {
            let wait = (due - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .min(poll_interval);
            // A due job that another instance is claiming right now: do not spin on it.
            wait.max(Duration::from_millis(10))
        }
        Ok(None) => poll_interval,
        Err(error) => {
            tracing::warn!(%error, "could not read the job queue");
            poll_interval
        }
    }
}

async fn run_job(job: Job, store: Arc<dyn JobStore>, pool: PluginVmPool, counters: Arc<Counters>) {
    let lateness_ms = (Utc::now() - job.run_at).num_milliseconds();
    let result = pool
        .run_job(job.plugin_config_id, &job.job_name, job.payload.clone())
        .await;
    let recorded = match result {
        Ok(()) => {
            counters.succeeded.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(job_id = job.id, job = %job.job_name, lateness_ms, "job done");
            store.complete(&job).await
        }
        Err(JobRunError::ConfigInactive) => {
            counters.skipped_inactive.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                job_id = job.id,
                job = %job.job_name,
                plugin_config_id = job.plugin_config_id,
                "the job's plugin config is disabled or gone; dead-lettered"
            );
            store
                .dead_letter(
                    &job,
                    &format!(
                        "plugin config {} is disabled or deleted",
                        job.plugin_config_id
                    ),
                )
                .await
        }
        Err(error) => match store.fail(&job, &error.to_string()).await {
            Ok(FailOutcome::Retried(at)) => {
                counters.retried.fetch_add(1, Ordering::Relaxed);
                tracing::info!(job_id = job.id, job = %job.job_name, %error, retry_at = %at, "job failed; it will be retried");
                Ok(())
            }
            Ok(FailOutcome::DeadLettered) => {
                counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(job_id = job.id, job = %job.job_name, %error, attempts = job.attempts, "job failed for good; dead-lettered");
                Ok(())
            }
            Err(store_error) => Err(store_error),
        },
    };
    if let Err(error) = recorded {
        // The claim stays; after the claim timeout the job is released and counted as failed.
        counters.store_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(job_id = job.id, %error, "could not record the job's outcome");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::plugins::jobs::{MemoryJobStore, NewJob, RetryPolicy};
    use crate::plugins::test_pool::{self, Collected, eventually};
    use crate::system::metrics::Metrics;
    use crate::system::stats::ActorRegistry;
    use crate::system::supervisor::{Crash, SpawnOptions, spawn_supervised};

    /// A panic in the job queue's handler: supervision restarts it (counted) and the new loop
    /// runs the jobs queued after it.
    #[actix::test]
    async fn a_panicking_job_queue_is_restarted_and_runs_jobs_again() {
        let registry = ActorRegistry::new(Metrics::new().expect("metrics"));
        let store = Arc::new(MemoryJobStore::new());
        let code = "exports.jobs = { noop: async () => {} };";
        let pool = test_pool::start(
            vec![test_pool::config(7, 2, code)],
            Arc::clone(&store) as Arc<dyn JobStore>,
            Arc::new(Collected::default()),
        )
        .await;
        let config = JobQueueConfig {
            instance: "test".into(),
            concurrency: 2,
            poll_interval: Duration::from_millis(50),
            claim_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(5),
        };
        let mut view = None;
        let queue = spawn_supervised(&registry, SpawnOptions::new("job_queue"), |stats| {
            let queue =
                PluginJobQueue::new(config, Arc::clone(&store) as Arc<dyn JobStore>, pool, stats);
            view = Some(queue.stats());
            queue
        });
        let view = view.expect("stats");
        let succeeded = || view.snapshot()["succeeded"].as_u64().unwrap_or(0);
        let enqueue = || async {
            let job = NewJob {
                plugin_config_id: 7,
                team_id: 2,
                job_name: "noop".into(),
                payload: json!({}),
                run_at: Utc::now(),
                retry: RetryPolicy {
                    max_attempts: 1,
                    delay: Duration::from_secs(1),
                },
            };
            store.enqueue(job).await.expect("queued");
        };
        enqueue().await;
        eventually("the first job", || succeeded() == 1).await;

        let lost = queue.send(Crash).await;
        assert!(matches!(lost, Err(MailboxError::Closed)), "{lost:?}");
        let snapshot = queue.stats().snapshot();
        assert_eq!((snapshot.restarts, snapshot.errors), (1, 1));

        enqueue().await;
        eventually("a job after the restart", || succeeded() == 2).await;
        queue.send(Shutdown).await.expect("stopped");
    }
}
