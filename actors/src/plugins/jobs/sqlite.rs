//! The embedded profile's job queue: in the embedded SQLite database (see [`crate::sqlite`]),
//! so a job a plugin queued with `runIn` survives a restart or a crash and still runs once it
//! is due. One node claims from it, so a claim is a plain update; a job claimed by a process
//! that died is released by [`JobStore::release_stale`] like Postgres' queue does.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use serde_json::Value;
use tokio::sync::Notify;

use super::{FailOutcome, Job, JobStore, JobStoreError, NewJob, RetryPolicy, fail_stale};
use crate::sqlite::Sqlite;

pub struct SqliteJobStore {
    database: Sqlite,
    queued: Notify,
}

impl SqliteJobStore {
    pub fn new(database: Sqlite) -> Self {
        Self {
            database,
            queued: Notify::new(),
        }
    }
}

fn unavailable(error: rusqlite::Error) -> JobStoreError {
    JobStoreError::Unavailable(format!("the embedded database: {error}"))
}

fn millis(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

fn time(millis: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(millis).unwrap_or_default()
}

const JOB_COLUMNS: &str = "id, plugin_config_id, team_id, job_name, payload, run_at_ms, \
     attempts, max_attempts, retry_delay_ms";

fn read_job(row: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let payload: String = row.get(4)?;
    Ok(Job {
        id: row.get(0)?,
        plugin_config_id: row.get(1)?,
        team_id: row.get(2)?,
        job_name: row.get(3)?,
        payload: serde_json::from_str(&payload).unwrap_or(Value::Null),
        run_at: time(row.get(5)?),
        attempts: row.get(6)?,
        retry: RetryPolicy {
            max_attempts: row.get(7)?,
            delay: Duration::from_millis(u64::try_from(row.get::<_, i64>(8)?).unwrap_or(0)),
        },
    })
}

/// Moves the job to the dead letters.
fn bury(connection: &rusqlite::Connection, job: &Job, error: &str) -> rusqlite::Result<()> {
    connection.execute(
        "INSERT OR REPLACE INTO jobs_dead_letter (id, plugin_config_id, team_id, job_name, \
         payload, attempts, error, failed_at_ms) \
         SELECT id, plugin_config_id, team_id, job_name, payload, attempts, ?2, ?3 \
         FROM jobs WHERE id = ?1",
        params![job.id, error, millis(Utc::now())],
    )?;
    connection.execute("DELETE FROM jobs WHERE id = ?1", [job.id])?;
    Ok(())
}

#[async_trait]
impl JobStore for SqliteJobStore {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn enqueue(&self, job: NewJob) -> Result<i64, JobStoreError> {
        let retry = job.retry.bounded();
        let id = {
            let connection = self.database.lock().await;
            connection
                .execute(
                    "INSERT INTO jobs (plugin_config_id, team_id, job_name, payload, run_at_ms, \
                     max_attempts, retry_delay_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        job.plugin_config_id,
                        job.team_id,
                        job.job_name,
                        job.payload.to_string(),
                        millis(job.run_at),
                        retry.max_attempts,
                        i64::try_from(retry.delay.as_millis()).unwrap_or(i64::MAX),
                    ],
                )
                .map_err(unavailable)?;
            connection.last_insert_rowid()
        };
        self.queued.notify_one();
        Ok(id)
    }

    async fn claim(&self, _instance: &str, limit: usize) -> Result<Vec<Job>, JobStoreError> {
        let now = millis(Utc::now());
        let connection = self.database.lock().await;
        let mut claim = connection
            .prepare_cached(&format!(
                "UPDATE jobs SET claimed_at_ms = ?1, attempts = attempts + 1 WHERE id IN \
                 (SELECT id FROM jobs WHERE claimed_at_ms IS NULL AND run_at_ms <= ?1 \
                  ORDER BY run_at_ms, id LIMIT ?2) RETURNING {JOB_COLUMNS}"
            ))
            .map_err(unavailable)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut jobs = claim
            .query_map(params![now, limit], read_job)
            .map_err(unavailable)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)?;
        // RETURNING gives no order: oldest due first, as claimed.
        jobs.sort_by_key(|job| (job.run_at, job.id));
        Ok(jobs)
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, JobStoreError> {
        let connection = self.database.lock().await;
        let due: Option<i64> = connection
            .query_row(
                "SELECT min(run_at_ms) FROM jobs WHERE claimed_at_ms IS NULL",
                [],
                |row| row.get(0),
            )
            .map_err(unavailable)?;
        Ok(due.map(time))
    }

    async fn complete(&self, job: &Job) -> Result<(), JobStoreError> {
        self.database
            .lock()
            .await
            .execute("DELETE FROM jobs WHERE id = ?1", [job.id])
            .map(drop)
            .map_err(unavailable)
    }

    async fn fail(&self, job: &Job, error: &str) -> Result<FailOutcome, JobStoreError> {
        let connection = self.database.lock().await;
        let stored: Option<(u32, u32)> = connection
            .query_row(
                "SELECT attempts, max_attempts FROM jobs WHERE id = ?1",
                [job.id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(unavailable)?;
        let Some((attempts, max_attempts)) = stored else {
            return Ok(FailOutcome::DeadLettered);
        };
        if attempts < max_attempts {
            let run_at = Utc::now() + job.retry.delay_after(attempts);
            connection
                .execute(
                    "UPDATE jobs SET run_at_ms = ?2, claimed_at_ms = NULL WHERE id = ?1",
                    params![job.id, millis(run_at)],
                )
                .map_err(unavailable)?;
            drop(connection);
            self.queued.notify_one();
            return Ok(FailOutcome::Retried(run_at));
        }
        bury(&connection, job, error).map_err(unavailable)?;
        Ok(FailOutcome::DeadLettered)
    }

    async fn dead_letter(&self, job: &Job, error: &str) -> Result<(), JobStoreError> {
        bury(&*self.database.lock().await, job, error).map_err(unavailable)
    }

    async fn release_stale(&self, timeout: Duration) -> Result<u64, JobStoreError> {
        let cutoff = millis(Utc::now()) - i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        let stale: Vec<Job> = {
            let connection = self.database.lock().await;
            let mut select = connection
                .prepare_cached(&format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE claimed_at_ms < ?1"
                ))
                .map_err(unavailable)?;
            select
                .query_map([cutoff], read_job)
                .map_err(unavailable)?
                .collect::<Result<_, _>>()
                .map_err(unavailable)?
        };
        fail_stale(self, &stale).await
    }

    async fn wait_for_jobs(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.queued.notified()).await;
    }
}
