//! Plugin jobs (`meta.jobs.<name>(payload).runNow()`, `.runIn(n, unit)`, `.runAt(date)`):
//! what a job is, when it is due, and the queue it waits in: `plugin_server_jobs` in Postgres
//! (shared by every instance, claimed with `FOR UPDATE SKIP LOCKED`) or, in the embedded
//! profile, an in-process queue that does not survive a restart.
//!
//! A job runs at most once at a time. It is deleted when it succeeds; a failure is recorded on
//! it and, while it has attempts left, it runs again after its retry delay (doubled for each
//! later attempt); then it moves to `plugin_server_jobs_dead_letter` with its last error. A
//! job claimed by an instance that died is released after the claim timeout, which counts as
//! a failed attempt.

pub mod memory;
pub mod postgres;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

pub use memory::MemoryJobStore;
pub use postgres::PostgresJobStore;
pub use sqlite::SqliteJobStore;

/// A job as queued by a plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub plugin_config_id: i64,
    pub team_id: i64,
    pub job_name: String,
    pub payload: Value,
    pub run_at: DateTime<Utc>,
    pub retry: RetryPolicy,
}

/// How often a failing job is tried, and how long it waits between tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// 1 means no retry, PostHog's behaviour: its plugins re-queue themselves.
    pub max_attempts: u32,
    /// Before the second attempt; doubled for each later one.
    pub delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            delay: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// The longest wait between two attempts, whatever the policy asks.
    pub const MAX_DELAY: Duration = Duration::from_secs(3600);
    /// More attempts than any real plugin needs; a typo such as 1e9 must not keep a job alive
    /// forever.
    pub const MAX_ATTEMPTS: u32 = 100;

    /// The policy within [`Self::MAX_ATTEMPTS`] and [`Self::MAX_DELAY`], at least one attempt.
    pub fn bounded(self) -> Self {
        Self {
            max_attempts: self.max_attempts.clamp(1, Self::MAX_ATTEMPTS),
            delay: self.delay.min(Self::MAX_DELAY),
        }
    }

    /// The wait after the `attempt`-th failed attempt (1-based).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.delay
            .saturating_mul(1 << doublings)
            .min(Self::MAX_DELAY)
    }
}

/// A job claimed by this instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: i64,
    pub plugin_config_id: i64,
    pub team_id: i64,
    pub job_name: String,
    pub payload: Value,
    pub run_at: DateTime<Utc>,
    /// Including this one.
    pub attempts: u32,
    pub retry: RetryPolicy,
}

/// What became of a failed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// It runs again at this time.
    Retried(DateTime<Utc>),
    /// It used up its attempts and moved to the dead-letter table.
    DeadLettered,
}

#[derive(Debug, thiserror::Error)]
pub enum JobStoreError {
    #[error("cannot reach the job queue (check DATABASE_URL): {0}")]
    Unavailable(String),
    #[error("the job queue refused the job: {0}")]
    Rejected(String),
}

/// [`JobStore::release_stale`]'s end, the same for every store: each job claimed by an
/// instance that stopped answering counts as a failed attempt; how many there were.
async fn fail_stale<S: JobStore + ?Sized>(store: &S, stale: &[Job]) -> Result<u64, JobStoreError> {
    for job in stale {
        store
            .fail(job, "the instance running it stopped answering")
            .await?;
    }
    Ok(stale.len() as u64)
}

/// The queue.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// For logs: `postgres` or `memory`.
    fn name(&self) -> &'static str;

    /// Queues a job and wakes every runner that waits for one.
    async fn enqueue(&self, job: NewJob) -> Result<i64, JobStoreError>;

    /// Claims up to `limit` due jobs for `instance`, oldest due first. A job is claimed by one
    /// instance only, however many claim at once.
    async fn claim(&self, instance: &str, limit: usize) -> Result<Vec<Job>, JobStoreError>;

    /// When the next unclaimed job is due, if any.
    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, JobStoreError>;

    /// The job succeeded: it is removed.
    async fn complete(&self, job: &Job) -> Result<(), JobStoreError>;

    /// The job failed with `error`: retried per its policy or dead-lettered.
    async fn fail(&self, job: &Job, error: &str) -> Result<FailOutcome, JobStoreError>;

    /// Moves the job to the dead-letter table at once, e.g. because its config is gone.
    async fn dead_letter(&self, job: &Job, error: &str) -> Result<(), JobStoreError>;

    /// Jobs claimed longer than `timeout` ago, whose instance presumably died: each counts as
    /// a failed attempt. Returns how many were released or dead-lettered.
    async fn release_stale(&self, timeout: Duration) -> Result<u64, JobStoreError>;

    /// Waits until a job may have been queued or become due elsewhere (Postgres NOTIFY), or
    /// until `timeout`. The in-process queue wakes its own runner directly.
    async fn wait_for_jobs(&self, timeout: Duration);
}

/// Why `runIn(amount, unit)` names no duration; the plugin sees it as a thrown RangeError.
#[derive(Debug, thiserror::Error)]
pub enum DurationError {
    #[error(
        "unknown unit {0:?}: use milliseconds, seconds, minutes, hours, days, weeks, \
         months, quarters or years"
    )]
    UnknownUnit(String),
    /// Negative, infinite or NaN.
    #[error("runIn needs a duration of zero or more, got {0}")]
    NotADuration(f64),
    #[error("runIn({amount}, {unit:?}) is out of range: {source}")]
    OutOfRange {
        amount: f64,
        unit: String,
        #[source]
        source: std::time::TryFromFloatSecsError,
    },
}

/// PostHog's `runIn` units, singular or plural, with a month of 30 days (PostHog's own code
/// takes a month as 30 weeks), a quarter of 3 months and a year of 365 days.
pub fn duration_of(amount: f64, unit: &str) -> Result<Duration, DurationError> {
    const SECOND: f64 = 1000.0;
    const DAY: f64 = 86_400.0 * SECOND;
    let unit = unit.trim().to_lowercase();
    let singular = unit.strip_suffix('s').unwrap_or(&unit);
    let milliseconds = match singular {
        "millisecond" => 1.0,
        "second" => SECOND,
        "minute" => 60.0 * SECOND,
        "hour" => 3600.0 * SECOND,
        "day" => DAY,
        "week" => 7.0 * DAY,
        "month" => 30.0 * DAY,
        "quarter" => 90.0 * DAY,
        "year" => 365.0 * DAY,
        _ => return Err(DurationError::UnknownUnit(unit)),
    };
    if !amount.is_finite() || amount < 0.0 {
        return Err(DurationError::NotADuration(amount));
    }
    Duration::try_from_secs_f64(amount * milliseconds / 1000.0).map_err(|source| {
        DurationError::OutOfRange {
            amount,
            unit,
            source,
        }
    })
}

#[cfg(test)]
mod tests;
