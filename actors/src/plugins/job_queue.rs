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

use chrono::Utc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::plugins::jobs::{FailOutcome, Job, JobStore};
use crate::plugins::pool::{JobRunError, PluginVmPool};

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

/// The running job queue; it stops when dropped (jobs in flight finish in the background).
pub struct PluginJobQueue {
    stop: CancellationToken,
    counters: Arc<Counters>,
    store_name: &'static str,
}

impl Drop for PluginJobQueue {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl PluginJobQueue {
    pub fn start(config: JobQueueConfig, store: Arc<dyn JobStore>, pool: PluginVmPool) -> Self {
        let stop = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let store_name = store.name();
        tokio::spawn(run(
            config,
            store,
            pool,
            stop.clone(),
            Arc::clone(&counters),
        ));
        Self {
            stop,
            counters,
            store_name,
        }
    }

    /// Stops claiming jobs; those running finish.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn stats(&self) -> JobQueueStats {
        JobQueueStats {
            counters: Arc::clone(&self.counters),
            store: self.store_name,
        }
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

async fn run(
    config: JobQueueConfig,
    store: Arc<dyn JobStore>,
    pool: PluginVmPool,
    stop: CancellationToken,
    counters: Arc<Counters>,
) {
    let concurrency = config.concurrency.max(1);
    let mut jobs: JoinSet<()> = JoinSet::new();
    let mut last_stale_check: Option<Instant> = None;
    while !stop.is_cancelled() {
        while jobs.try_join_next().is_some() {}

        if last_stale_check.is_none_or(|at| at.elapsed() >= config.claim_timeout / 2) {
            last_stale_check = Some(Instant::now());
            match store.release_stale(config.claim_timeout).await {
                Ok(0) => {}
                Ok(released) => {
                    counters
                        .released_stale
                        .fetch_add(released, Ordering::Relaxed);
                    tracing::warn!(released, "released jobs whose instance stopped answering");
                }
                Err(error) => {
                    counters.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "could not look for abandoned jobs");
                }
            }
        }

        let free = concurrency.saturating_sub(jobs.len());
        let mut claimed_any = false;
        if free > 0 {
            match store.claim(&config.instance, free).await {
                Ok(claimed) => {
                    claimed_any = !claimed.is_empty();
                    counters
                        .claimed
                        .fetch_add(claimed.len() as u64, Ordering::Relaxed);
                    for job in claimed {
                        jobs.spawn(run_job(
                            job,
                            Arc::clone(&store),
                            pool.clone(),
                            Arc::clone(&counters),
                        ));
                    }
                }
                Err(error) => {
                    counters.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "could not claim jobs; retrying");
                }
            }
        }
        counters.running.store(jobs.len() as u64, Ordering::Relaxed);

        let wait = if jobs.len() >= concurrency {
            // Full: a finished job wakes the loop below.
            config.poll_interval
        } else if claimed_any {
            // Slots are free and more may be due: look again at once.
            Duration::ZERO
        } else {
            until_next_due(store.as_ref(), config.poll_interval).await
        };
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = store.wait_for_jobs(wait) => {}
            Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
        }
    }
    // Jobs already running finish; their results are still recorded.
    while jobs.join_next().await.is_some() {}
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
