//! The queue's contract, run against the in-process queue and (with the `integration-tests`
//! feature) against Postgres.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use super::*;

fn job(name: &str, delay: Duration, retry: RetryPolicy) -> NewJob {
    NewJob {
        plugin_config_id: 7,
        team_id: 2,
        job_name: name.to_owned(),
        payload: json!({ "name": name }),
        run_at: Utc::now() + delay,
        retry,
    }
}

#[test]
fn run_in_units_are_posthogs_with_a_real_month() {
    let cases = [
        (1500.0, "milliseconds", 1_500),
        (2.0, "seconds", 2_000),
        (2.0, "second", 2_000),
        (1.0, "Minute", 60_000),
        (1.0, "hours", 3_600_000),
        (1.0, "day", 86_400_000),
        (1.0, "week", 604_800_000),
        (1.0, "month", 2_592_000_000),
        (1.0, "quarters", 7_776_000_000),
        (1.0, "year", 31_536_000_000),
    ];
    for (amount, unit, milliseconds) in cases {
        assert_eq!(
            duration_of(amount, unit).expect(unit).as_millis(),
            milliseconds,
            "{amount} {unit}"
        );
    }
    assert!(duration_of(1.0, "fortnight").is_err());
    assert!(duration_of(-1.0, "seconds").is_err());
    assert!(duration_of(f64::NAN, "seconds").is_err());
}

#[test]
fn retry_delays_double_up_to_an_hour() {
    let policy = RetryPolicy {
        max_attempts: 50,
        delay: Duration::from_millis(500),
    };
    assert_eq!(policy.delay_after(1), Duration::from_millis(500));
    assert_eq!(policy.delay_after(2), Duration::from_secs(1));
    assert_eq!(policy.delay_after(4), Duration::from_secs(4));
    assert_eq!(policy.delay_after(40), RetryPolicy::MAX_DELAY);
}

async fn due_jobs_are_claimed_in_order_once(store: &dyn JobStore) {
    store
        .enqueue(job(
            "later",
            Duration::from_secs(3600),
            RetryPolicy::default(),
        ))
        .await
        .expect("enqueue");
    let second = store
        .enqueue(job("second", Duration::ZERO, RetryPolicy::default()))
        .await
        .expect("enqueue");
    let mut earlier = job("first", Duration::ZERO, RetryPolicy::default());
    earlier.run_at -= chrono::Duration::seconds(5);
    let first = store.enqueue(earlier).await.expect("enqueue");

    let claimed = store.claim("a", 10).await.expect("claim");
    let ids: Vec<i64> = claimed.iter().map(|job| job.id).collect();
    assert_eq!(ids, [first, second], "due jobs only, oldest first");
    assert_eq!(claimed[0].payload, json!({ "name": "first" }));
    assert_eq!(claimed[0].attempts, 1);
    assert!(
        store.claim("b", 10).await.expect("claim").is_empty(),
        "claimed once"
    );

    let next = store
        .next_due()
        .await
        .expect("next due")
        .expect("the later job");
    assert!(next > Utc::now() + chrono::Duration::seconds(3000));
    for job in &claimed {
        store.complete(job).await.expect("complete");
    }
    assert!(store.claim("a", 10).await.expect("claim").is_empty());
}

async fn failures_retry_with_backoff_then_dead_letter(store: &dyn JobStore) {
    let retry = RetryPolicy {
        max_attempts: 2,
        delay: Duration::from_millis(200),
    };
    store
        .enqueue(job("flaky", Duration::ZERO, retry))
        .await
        .expect("enqueue");
    let first = store.claim("a", 1).await.expect("claim").remove(0);
    let outcome = store.fail(&first, "boom 1").await.expect("fail");
    let FailOutcome::Retried(run_at) = outcome else {
        panic!("a second attempt is left: {outcome:?}");
    };
    assert!(run_at > Utc::now(), "not before its delay");
    assert!(store.claim("a", 1).await.expect("claim").is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = store.claim("a", 1).await.expect("claim").remove(0);
    assert_eq!(second.attempts, 2);
    assert_eq!(
        store.fail(&second, "boom 2").await.expect("fail"),
        FailOutcome::DeadLettered
    );
    assert!(
        store.next_due().await.expect("next").is_none(),
        "gone from the queue"
    );
}

async fn a_stale_claim_is_released_as_a_failed_attempt(store: &dyn JobStore) {
    let retry = RetryPolicy {
        max_attempts: 3,
        delay: Duration::ZERO,
    };
    store
        .enqueue(job("orphan", Duration::ZERO, retry))
        .await
        .expect("enqueue");
    let claimed = store.claim("dead-instance", 1).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        store
            .release_stale(Duration::from_secs(60))
            .await
            .expect("release"),
        0
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        store
            .release_stale(Duration::from_secs(1))
            .await
            .expect("release"),
        1
    );
    let again = store.claim("alive", 1).await.expect("claim");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 2);
}

async fn a_queued_job_wakes_a_waiting_runner(store: Arc<dyn JobStore>) {
    // Let the listener (Postgres) settle and drain any wake-up left from earlier scenarios.
    store.wait_for_jobs(Duration::from_millis(300)).await;
    let waiter = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            store.wait_for_jobs(Duration::from_secs(10)).await;
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    store
        .enqueue(job("wake", Duration::ZERO, RetryPolicy::default()))
        .await
        .expect("enqueue");
    let waited = waiter.await.expect("waiter");
    assert!(
        waited < Duration::from_secs(5),
        "woken by the queue, not the timeout: {waited:?}"
    );
}

macro_rules! contract {
    ($store:expr) => {
        due_jobs_are_claimed_in_order_once(&*$store().await).await;
        failures_retry_with_backoff_then_dead_letter(&*$store().await).await;
        a_stale_claim_is_released_as_a_failed_attempt(&*$store().await).await;
        a_queued_job_wakes_a_waiting_runner($store().await).await;
    };
}

async fn memory() -> Arc<dyn JobStore> {
    Arc::new(MemoryJobStore::new())
}

#[tokio::test]
async fn the_in_process_queue_keeps_the_contract() {
    contract!(memory);
}

async fn sqlite() -> Arc<dyn JobStore> {
    Arc::new(super::SqliteJobStore::new(
        crate::sqlite::Sqlite::in_memory().expect("sqlite"),
    ))
}

#[tokio::test]
async fn the_embedded_queue_keeps_the_contract() {
    contract!(sqlite);
}

#[tokio::test]
async fn a_job_whose_attempts_are_used_up_is_kept_with_its_error() {
    let store = MemoryJobStore::new();
    store
        .enqueue(job("once", Duration::ZERO, RetryPolicy::default()))
        .await
        .expect("enqueue");
    let claimed = store.claim("a", 1).await.expect("claim").remove(0);
    store.fail(&claimed, "it threw").await.expect("fail");
    let dead = store.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1, "it threw");
}

#[cfg(feature = "integration-tests")]
mod postgres {
    use std::collections::HashSet;

    use super::*;

    async fn fresh() -> (Pool, String) {
        crate::test_support::fresh_postgres("ps_jobs").await
    }

    use deadpool_postgres::Pool;

    async fn postgres() -> Arc<dyn JobStore> {
        let (pool, url) = fresh().await;
        Arc::new(PostgresJobStore::start(pool, url))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_postgres_queue_keeps_the_contract() {
        contract!(postgres);
    }

    /// 1,000 due jobs, three claimers racing on their own connections: every job is claimed
    /// exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claimers_never_share_a_job() {
        let (pool, url) = fresh().await;
        let store: Arc<dyn JobStore> = Arc::new(PostgresJobStore::start(pool, url));
        let mut queued = HashSet::new();
        for index in 0..1000 {
            let mut new = job("bulk", Duration::ZERO, RetryPolicy::default());
            new.payload = json!({ "index": index });
            queued.insert(store.enqueue(new).await.expect("enqueue"));
        }
        let claimers = (0..3).map(|claimer| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let batch = store
                        .claim(&format!("claimer-{claimer}"), 7)
                        .await
                        .expect("claim");
                    if batch.is_empty() {
                        return mine;
                    }
                    for job in batch {
                        store.complete(&job).await.expect("complete");
                        mine.push(job.id);
                    }
                }
            })
        });
        let mut seen = HashSet::new();
        let mut total = 0;
        for claimer in claimers {
            let ids = claimer.await.expect("claimer");
            total += ids.len();
            seen.extend(ids);
        }
        assert_eq!(total, 1000, "no job was claimed twice");
        assert_eq!(seen, queued);
    }
}
