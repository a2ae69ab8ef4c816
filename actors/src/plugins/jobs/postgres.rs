//! The job queue in `plugin_server_jobs` (created by `--migrate`), shared by every instance.
//!
//! Claiming is one statement: due, unclaimed rows are locked with `FOR UPDATE SKIP LOCKED`, so
//! instances claiming at once take disjoint sets without waiting for each other, and stamped
//! with the claimer, the time and one more attempt. Queuing a job sends
//! `NOTIFY plugin_server_jobs` in the same statement; every instance keeps one connection
//! listening on that channel, so a job queued anywhere wakes every runner at once instead of
//! at its next poll.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_postgres::types::Json;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::{FailOutcome, Job, JobStore, JobStoreError, NewJob, RetryPolicy, fail_stale};

/// The NOTIFY channel.
pub const JOBS_CHANNEL: &str = "plugin_server_jobs";

const JOB_COLUMNS: &str = "id, plugin_config_id, team_id, job_name, payload, run_at, attempts, \
     max_attempts, retry_delay_ms";

const ENQUEUE: &str = "WITH job AS ( \
     INSERT INTO plugin_server_jobs \
     (plugin_config_id, team_id, job_name, payload, run_at, max_attempts, retry_delay_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id) \
     SELECT id, pg_notify('plugin_server_jobs', id::text) FROM job";

/// Locks due, unclaimed rows (skipping rows another instance is claiming) and stamps them
/// with the claimer, the time and one more attempt.
const CLAIM: &str = "WITH due AS ( \
     SELECT id FROM plugin_server_jobs \
     WHERE locked_at IS NULL AND run_at <= now() \
     ORDER BY run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
     UPDATE plugin_server_jobs AS job \
     SET locked_by = $1, locked_at = now(), attempts = job.attempts + 1 \
     FROM due WHERE job.id = due.id \
     RETURNING job.id, job.plugin_config_id, job.team_id, job.job_name, job.payload, \
     job.run_at, job.attempts, job.max_attempts, job.retry_delay_ms";

const NEXT_DUE: &str = "SELECT min(run_at) FROM plugin_server_jobs WHERE locked_at IS NULL";

const COMPLETE: &str = "DELETE FROM plugin_server_jobs WHERE id = $1";

const RETRY: &str = "UPDATE plugin_server_jobs \
     SET locked_by = NULL, locked_at = NULL, last_error = $2, run_at = $3 \
     WHERE id = $1 AND attempts < max_attempts RETURNING run_at";

const DEAD_LETTER: &str = "WITH job AS (DELETE FROM plugin_server_jobs WHERE id = $1 RETURNING *) \
     INSERT INTO plugin_server_jobs_dead_letter \
     (id, plugin_config_id, team_id, job_name, payload, run_at, attempts, max_attempts, \
      last_error, locked_by, locked_at, created_at, retry_delay_ms, failed_at, error) \
     SELECT id, plugin_config_id, team_id, job_name, payload, run_at, attempts, max_attempts, \
      $2, locked_by, locked_at, created_at, retry_delay_ms, now(), $2 FROM job";

pub struct PostgresJobStore {
    pool: Pool,
    woken: Arc<Notify>,
    /// Stops the listener when the store goes.
    stop: CancellationToken,
}

impl PostgresJobStore {
    /// Uses `pool` for the queue and opens one more connection, to `database_url`, that
    /// listens for queued jobs for as long as the store lives (reconnecting after errors).
    pub fn start(pool: Pool, database_url: String) -> Self {
        let woken = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        tokio::spawn(listen(database_url, Arc::clone(&woken), stop.clone()));
        Self { pool, woken, stop }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, JobStoreError> {
        self.pool.get().await.map_err(unavailable)
    }
}

impl Drop for PostgresJobStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn unavailable(error: impl std::fmt::Display) -> JobStoreError {
    JobStoreError::Unavailable(error.to_string())
}

/// Database errors of class 22 (a value the columns cannot hold) concern the job only.
fn classify(error: tokio_postgres::Error) -> JobStoreError {
    match error.code() {
        Some(code) if code.code().starts_with("22") => JobStoreError::Rejected(
            error
                .as_db_error()
                .map_or_else(|| error.to_string(), |db| db.message().to_owned()),
        ),
        _ => unavailable(error),
    }
}

fn column<T: tokio_postgres::types::FromSqlOwned>(
    row: &tokio_postgres::Row,
    name: &str,
) -> Result<T, JobStoreError> {
    row.try_get(name).map_err(unavailable)
}

fn job_from_row(row: &tokio_postgres::Row) -> Result<Job, JobStoreError> {
    let Json(payload): Json<Value> = column(row, "payload")?;
    let attempts: i32 = column(row, "attempts")?;
    let max_attempts: i32 = column(row, "max_attempts")?;
    let retry_delay_ms: i32 = column(row, "retry_delay_ms")?;
    Ok(Job {
        id: column(row, "id")?,
        plugin_config_id: i64::from(column::<i32>(row, "plugin_config_id")?),
        team_id: i64::from(column::<i32>(row, "team_id")?),
        job_name: column(row, "job_name")?,
        payload,
        run_at: column(row, "run_at")?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        retry: RetryPolicy {
            max_attempts: u32::try_from(max_attempts).unwrap_or(1),
            delay: Duration::from_millis(u64::try_from(retry_delay_ms).unwrap_or(0)),
        },
    })
}

fn int_column(value: i64, name: &str) -> Result<i32, JobStoreError> {
    i32::try_from(value)
        .map_err(|_| JobStoreError::Rejected(format!("{name} {value} is out of range")))
}

#[async_trait]
impl JobStore for PostgresJobStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn enqueue(&self, job: NewJob) -> Result<i64, JobStoreError> {
        let max_attempts = job.retry.max_attempts.clamp(1, RetryPolicy::MAX_ATTEMPTS);
        let delay_ms = job.retry.delay.min(RetryPolicy::MAX_DELAY).as_millis();
        let params = (
            int_column(job.plugin_config_id, "plugin config id")?,
            int_column(job.team_id, "team id")?,
            i32::try_from(max_attempts).unwrap_or(1),
            i32::try_from(delay_ms).unwrap_or(i32::MAX),
        );
        let client = self.client().await?;
        let statement = client.prepare_cached(ENQUEUE).await.map_err(classify)?;
        let row = client
            .query_one(
                &statement,
                &[
                    &params.0,
                    &params.1,
                    &job.job_name,
                    &Json(&job.payload),
                    &job.run_at,
                    &params.2,
                    &params.3,
                ],
            )
            .await
            .map_err(classify)?;
        column(&row, "id")
    }

    async fn claim(&self, instance: &str, limit: usize) -> Result<Vec<Job>, JobStoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let statement = client.prepare_cached(CLAIM).await.map_err(classify)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(&statement, &[&instance, &limit])
            .await
            .map_err(classify)?;
        let mut jobs = rows
            .iter()
            .map(job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        jobs.sort_by_key(|job| (job.run_at, job.id));
        Ok(jobs)
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, JobStoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(NEXT_DUE).await.map_err(classify)?;
        let row = client.query_one(&statement, &[]).await.map_err(classify)?;
        row.try_get(0).map_err(unavailable)
    }

    async fn complete(&self, job: &Job) -> Result<(), JobStoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(COMPLETE).await.map_err(classify)?;
        client
            .execute(&statement, &[&job.id])
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn fail(&self, job: &Job, error: &str) -> Result<FailOutcome, JobStoreError> {
        let run_at = Utc::now() + job.retry.delay_after(job.attempts);
        let client = self.client().await?;
        let statement = client.prepare_cached(RETRY).await.map_err(classify)?;
        let retried = client
            .query_opt(&statement, &[&job.id, &error, &run_at])
            .await
            .map_err(classify)?;
        if retried.is_some() {
            return Ok(FailOutcome::Retried(run_at));
        }
        let statement = client.prepare_cached(DEAD_LETTER).await.map_err(classify)?;
        client
            .execute(&statement, &[&job.id, &error])
            .await
            .map_err(classify)?;
        Ok(FailOutcome::DeadLettered)
    }

    async fn dead_letter(&self, job: &Job, error: &str) -> Result<(), JobStoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(DEAD_LETTER).await.map_err(classify)?;
        client
            .execute(&statement, &[&job.id, &error])
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn release_stale(&self, timeout: Duration) -> Result<u64, JobStoreError> {
        let cutoff =
            Utc::now() - chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
        let stale = {
            let client = self.client().await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {JOB_COLUMNS} FROM plugin_server_jobs \
                         WHERE locked_at IS NOT NULL AND locked_at < $1"
                    ),
                    &[&cutoff],
                )
                .await
                .map_err(classify)?;
            rows.iter()
                .map(job_from_row)
                .collect::<Result<Vec<_>, _>>()?
        };
        fail_stale(self, &stale).await
    }

    async fn wait_for_jobs(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.woken.notified()).await;
    }
}

/// Keeps a connection listening on [`JOBS_CHANNEL`] and turns each notification into a wake-up
/// of the runner; reconnects a second after the connection fails.
async fn listen(database_url: String, woken: Arc<Notify>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        match tokio_postgres::connect(&database_url, NoTls).await {
            Ok((client, mut connection)) => {
                let (failed_sender, mut failed) = tokio::sync::oneshot::channel::<String>();
                let forward = {
                    let woken = Arc::clone(&woken);
                    async move {
                        let mut messages =
                            futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                        while let Some(message) = messages.next().await {
                            match message {
                                Ok(AsyncMessage::Notification(_)) => woken.notify_one(),
                                Ok(_) => {}
                                Err(error) => {
                                    let _ = failed_sender.send(error.to_string());
                                    return;
                                }
                            }
                        }
                    }
                };
                let driver = tokio::spawn(forward);
                match client
                    .batch_execute(&format!("LISTEN {JOBS_CHANNEL}"))
                    .await
                {
                    Ok(()) => {
                        // Jobs queued while no connection listened are found by the runner's
                        // next look at the queue; wake it so that this happens now.
                        woken.notify_one();
                        tokio::select! {
                            () = stop.cancelled() => {}
                            error = &mut failed => {
                                tracing::warn!(error = ?error.ok(), "job queue listener lost its connection; reconnecting");
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "job queue listener cannot LISTEN; retrying");
                    }
                }
                driver.abort();
            }
            Err(error) => {
                tracing::warn!(%error, "job queue listener cannot connect; retrying");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
