//! A job queue in process memory, lost on restart: for tests and tools (the embedded profile
//! keeps its queue in SQLite, [`super::SqliteJobStore`]).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use super::{FailOutcome, Job, JobStore, JobStoreError, NewJob, fail_stale};

#[derive(Default)]
pub struct MemoryJobStore {
    queue: Mutex<Queue>,
    queued: Notify,
}

#[derive(Default)]
struct Queue {
    next_id: i64,
    jobs: BTreeMap<i64, Stored>,
    dead_letters: Vec<(Job, String)>,
}

struct Stored {
    job: Job,
    claimed_at: Option<Instant>,
}

impl MemoryJobStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Jobs that used up their attempts, with their last error (for tests and `/_actors`).
    pub fn dead_letters(&self) -> Vec<(Job, String)> {
        self.queue().dead_letters.clone()
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl JobStore for MemoryJobStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn enqueue(&self, job: NewJob) -> Result<i64, JobStoreError> {
        let id = {
            let mut queue = self.queue();
            queue.next_id += 1;
            let id = queue.next_id;
            queue.jobs.insert(
                id,
                Stored {
                    job: Job {
                        id,
                        plugin_config_id: job.plugin_config_id,
                        team_id: job.team_id,
                        job_name: job.job_name,
                        payload: job.payload,
                        run_at: job.run_at,
                        attempts: 0,
                        retry: job.retry.bounded(),
                    },
                    claimed_at: None,
                },
            );
            id
        };
        self.queued.notify_one();
        Ok(id)
    }

    async fn claim(&self, _instance: &str, limit: usize) -> Result<Vec<Job>, JobStoreError> {
        let now = Utc::now();
        let mut queue = self.queue();
        let mut due: Vec<(DateTime<Utc>, i64)> = queue
            .jobs
            .values()
            .filter(|stored| stored.claimed_at.is_none() && stored.job.run_at <= now)
            .map(|stored| (stored.job.run_at, stored.job.id))
            .collect();
        due.sort_unstable();
        let mut claimed = Vec::new();
        for (_, id) in due.into_iter().take(limit) {
            if let Some(stored) = queue.jobs.get_mut(&id) {
                stored.claimed_at = Some(Instant::now());
                stored.job.attempts += 1;
                claimed.push(stored.job.clone());
            }
        }
        Ok(claimed)
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, JobStoreError> {
        Ok(self
            .queue()
            .jobs
            .values()
            .filter(|stored| stored.claimed_at.is_none())
            .map(|stored| stored.job.run_at)
            .min())
    }

    async fn complete(&self, job: &Job) -> Result<(), JobStoreError> {
        self.queue().jobs.remove(&job.id);
        Ok(())
    }

    async fn fail(&self, job: &Job, error: &str) -> Result<FailOutcome, JobStoreError> {
        let mut queue = self.queue();
        let Some(stored) = queue.jobs.get_mut(&job.id) else {
            return Ok(FailOutcome::DeadLettered);
        };
        if stored.job.attempts < stored.job.retry.max_attempts {
            let run_at = Utc::now() + stored.job.retry.delay_after(stored.job.attempts);
            stored.job.run_at = run_at;
            stored.claimed_at = None;
            drop(queue);
            self.queued.notify_one();
            return Ok(FailOutcome::Retried(run_at));
        }
        if let Some(stored) = queue.jobs.remove(&job.id) {
            queue.dead_letters.push((stored.job, error.to_owned()));
        }
        Ok(FailOutcome::DeadLettered)
    }

    async fn dead_letter(&self, job: &Job, error: &str) -> Result<(), JobStoreError> {
        let mut queue = self.queue();
        if let Some(stored) = queue.jobs.remove(&job.id) {
            queue.dead_letters.push((stored.job, error.to_owned()));
        }
        Ok(())
    }

    async fn release_stale(&self, timeout: Duration) -> Result<u64, JobStoreError> {
        let stale: Vec<Job> = self
            .queue()
            .jobs
            .values()
            .filter(|stored| stored.claimed_at.is_some_and(|at| at.elapsed() > timeout))
            .map(|stored| stored.job.clone())
            .collect();
        fail_stale(self, &stale).await
    }

    async fn wait_for_jobs(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.queued.notified()).await;
    }
}
