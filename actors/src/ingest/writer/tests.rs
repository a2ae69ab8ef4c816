use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::*;
use crate::event::{DeadLetter, DropReason, EventRow};
use crate::system::health::{GetHealth, Health, HealthConfig};
use crate::system::stats::{ActorRegistry, ObservedAddr};
use crate::system::supervisor::{SpawnOptions, spawn_supervised};

/// A sink that records what it stored, fails its first `failures` writes, and can be held
/// closed so that tests see the writer waiting.
#[derive(Default)]
struct ScriptedSink {
    events: Mutex<Vec<Uuid>>,
    dead_letters: AtomicUsize,
    warnings: AtomicUsize,
    /// Person and distinct-id rows together.
    persons: AtomicUsize,
    writes: AtomicUsize,
    failures: AtomicUsize,
    gate: Option<Semaphore>,
}

impl ScriptedSink {
    fn failing(failures: usize) -> Self {
        Self {
            failures: AtomicUsize::new(failures),
            ..Self::default()
        }
    }

    fn gated() -> Self {
        Self {
            gate: Some(Semaphore::new(0)),
            ..Self::default()
        }
    }

    fn open_gate(&self, writes: usize) {
        if let Some(gate) = &self.gate {
            gate.add_permits(writes);
        }
    }

    async fn attempt(&self) -> Result<(), SinkError> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        let failed = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if failed {
            return Err(SinkError::Join("scripted failure".to_owned()));
        }
        Ok(())
    }

    fn stored_events(&self) -> Vec<Uuid> {
        self.events.lock().expect("events").clone()
    }
}

#[async_trait]
impl EventSink for ScriptedSink {
    fn name(&self) -> &'static str {
        "scripted"
    }

    async fn write(&self, rows: Rows<'_>) -> Result<(), SinkError> {
        self.attempt().await?;
        match rows {
            Rows::Events(events) => self
                .events
                .lock()
                .expect("events")
                .extend(events.iter().map(|row| row.uuid)),
            Rows::DeadLetters(letters) => {
                self.dead_letters.fetch_add(letters.len(), Ordering::SeqCst);
            }
            Rows::Warnings(warnings) => {
                self.warnings.fetch_add(warnings.len(), Ordering::SeqCst);
            }
            Rows::Persons(_)
            | Rows::PersonDistinctIds(_)
            | Rows::Groups(_)
            | Rows::Recordings(_) => {
                self.persons.fetch_add(rows.len(), Ordering::SeqCst);
            }
        }
        Ok(())
    }
}

fn row() -> EventRow {
    EventRow::for_test(r#"{"$current_url":"https://example.com"}"#)
}

/// Sends go through `addr()` because `Addr::send` queues at once, while `ObservedAddr::send`
/// is lazy; the tests depend on the order in which messages reach the writer.
fn events(count: usize) -> WriteBatch {
    WriteBatch {
        events: (0..count).map(|_| row()).collect(),
        ..WriteBatch::default()
    }
}

struct Harness {
    writer: ObservedAddr<EventWriter>,
    health: ObservedAddr<Health>,
    sink: Arc<ScriptedSink>,
}

fn start(config: EventWriterConfig, sink: ScriptedSink) -> Harness {
    let metrics = Metrics::new().expect("metrics");
    let registry = ActorRegistry::new(metrics.clone());
    let health = spawn_supervised(&registry, SpawnOptions::new("health"), |stats| {
        Health::new(
            HealthConfig {
                max_stale: Duration::from_secs(7200),
            },
            stats,
        )
    });
    let writer_metrics = WriterMetrics::register(&metrics).expect("writer metrics");
    let sink = Arc::new(sink);
    let dyn_sink: Arc<dyn EventSink> = sink.clone();
    let health_addr = health.addr().clone();
    let writer = spawn_supervised(&registry, SpawnOptions::new("event_writer"), move |stats| {
        let progress = ProgressReporter::new("event_writer", &health_addr, Arc::clone(&stats));
        EventWriter::new(
            config.clone(),
            Arc::clone(&dyn_sink),
            stats,
            writer_metrics.clone(),
            progress,
        )
    });
    Harness {
        writer,
        health,
        sink,
    }
}

fn config() -> EventWriterConfig {
    EventWriterConfig {
        max_batch_bytes: 1_000_000,
        flush_interval: Duration::from_millis(50),
        retry_initial: Duration::from_millis(10),
        retry_max: Duration::from_millis(40),
        shutdown_timeout: Duration::from_millis(300),
        ..EventWriterConfig::default()
    }
}

#[actix::test]
async fn the_reply_comes_only_after_the_rows_are_stored() {
    let harness = start(config(), ScriptedSink::gated());
    let batch = events(3);
    let ids: Vec<Uuid> = batch.events.iter().map(|row| row.uuid).collect();
    let reply = harness.writer.addr().send(WriteRows(batch));
    tokio::pin!(reply);
    let early = tokio::time::timeout(Duration::from_millis(200), &mut reply).await;
    assert!(
        early.is_err(),
        "acknowledged before the sink stored anything"
    );
    assert!(harness.sink.stored_events().is_empty());

    harness.sink.open_gate(1);
    let result = tokio::time::timeout(Duration::from_secs(5), reply)
        .await
        .expect("acknowledged after the sink stored");
    assert_eq!(result.expect("delivered"), Ok(()));
    assert_eq!(harness.sink.stored_events(), ids);
}

#[actix::test]
async fn a_full_buffer_is_written_without_waiting_for_the_interval() {
    let mut config = config();
    config.flush_interval = Duration::from_secs(3600);
    config.max_batch_bytes = events(10).approximate_size();
    let harness = start(config, ScriptedSink::default());
    let small = harness.writer.addr().send(WriteRows(events(1)));
    tokio::pin!(small);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut small)
            .await
            .is_err(),
        "a small batch waits for the interval or for more rows"
    );
    let big = harness.writer.addr().send(WriteRows(events(10)));
    let (small, big) =
        tokio::time::timeout(Duration::from_secs(5), futures::future::join(small, big))
            .await
            .expect("the full buffer was written at once");
    assert_eq!(small.expect("delivered"), Ok(()));
    assert_eq!(big.expect("delivered"), Ok(()));
    assert_eq!(harness.sink.stored_events().len(), 11);
    assert_eq!(
        harness.sink.writes.load(Ordering::SeqCst),
        1,
        "one batch, one insert"
    );
}

/// Group commit: a write starts at once when a flush slot is free, and what arrives while it
/// runs goes together as soon as it is done; the interval (an hour here) plays no part.
#[actix::test]
async fn with_cut_when_free_writes_start_at_once_and_batch_behind_a_running_flush() {
    let mut config = config();
    config.flush_interval = Duration::from_secs(3600);
    config.max_concurrent_flushes = 1;
    config.cut_when_free = true;
    let harness = start(config, ScriptedSink::gated());
    let first = harness.writer.addr().send(WriteRows(events(1)));
    tokio::pin!(first);
    // Started: the flush is waiting at the sink's gate, not for the interval.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut first)
            .await
            .is_err()
    );
    let behind: Vec<_> = (0..2)
        .map(|_| harness.writer.addr().send(WriteRows(events(2))))
        .collect();
    harness.sink.open_gate(1);
    let first = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("the first write needs no interval");
    assert_eq!(first.expect("delivered"), Ok(()));
    harness.sink.open_gate(1);
    let behind = tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(behind))
        .await
        .expect("the writes behind it follow at once");
    for reply in behind {
        assert_eq!(reply.expect("delivered"), Ok(()));
    }
    assert_eq!(harness.sink.stored_events().len(), 5);
    assert_eq!(
        harness.sink.writes.load(Ordering::SeqCst),
        2,
        "the two writes that waited went as one batch"
    );
}

#[actix::test]
async fn requests_within_an_interval_share_one_write() {
    let harness = start(config(), ScriptedSink::default());
    let replies: Vec<_> = (0..5)
        .map(|_| harness.writer.addr().send(WriteRows(events(2))))
        .collect();
    for reply in futures::future::join_all(replies).await {
        assert_eq!(reply.expect("delivered"), Ok(()));
    }
    assert_eq!(harness.sink.stored_events().len(), 10);
    assert_eq!(harness.sink.writes.load(Ordering::SeqCst), 1);
}

#[actix::test]
async fn failures_are_retried_until_stored_and_health_shows_degraded() {
    let harness = start(config(), ScriptedSink::failing(3));
    let gate_free = harness.writer.addr().send(WriteRows(WriteBatch {
        dead_letters: vec![DeadLetter::unparsed(b"{", DropReason::InvalidJson, "eof")],
        ..events(4)
    }));
    let result = tokio::time::timeout(Duration::from_secs(5), gate_free)
        .await
        .expect("stored after the retries");
    assert_eq!(result.expect("delivered"), Ok(()));
    assert_eq!(harness.sink.stored_events().len(), 4);
    assert_eq!(harness.sink.dead_letters.load(Ordering::SeqCst), 1);
    // 3 failures, then dead letters and events each stored once.
    assert_eq!(harness.sink.writes.load(Ordering::SeqCst), 5);

    // After success the writer is idle and deregistered: nothing degraded remains.
    let report = harness.health.send(GetHealth).await.expect("health");
    assert_eq!(report.status(), "ok", "{report:?}");
}

#[actix::test]
async fn health_is_degraded_while_writes_fail() {
    let harness = start(config(), ScriptedSink::failing(usize::MAX));
    let reply = harness.writer.addr().send(WriteRows(events(1)));
    tokio::pin!(reply);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut reply)
            .await
            .is_err()
    );
    let report = harness.health.send(GetHealth).await.expect("health");
    assert_eq!(report.status(), "degraded", "{report:?}");
    assert!(
        report.is_healthy(),
        "a failing dependency is not a dead process"
    );
    assert!(
        report.checks["event_writer"]
            .to_string()
            .starts_with("degraded: ")
    );
}

#[actix::test]
async fn shutdown_flushes_the_buffer() {
    let mut config = config();
    config.flush_interval = Duration::from_secs(3600);
    let harness = start(config, ScriptedSink::default());
    let reply = harness.writer.addr().send(WriteRows(events(2)));
    harness.writer.send(Shutdown).await.expect("drained");
    assert_eq!(reply.await.expect("delivered"), Ok(()));
    assert_eq!(harness.sink.stored_events().len(), 2);
}

#[actix::test]
async fn shutdown_gives_up_on_a_dead_sink_and_says_the_rows_were_not_stored() {
    let harness = start(config(), ScriptedSink::failing(usize::MAX));
    let reply = harness.writer.addr().send(WriteRows(events(2)));
    let started = std::time::Instant::now();
    harness
        .writer
        .send(Shutdown)
        .await
        .expect("shutdown answered");
    assert!(started.elapsed() < Duration::from_secs(3));
    let result = tokio::time::timeout(Duration::from_secs(2), reply)
        .await
        .expect("answered");
    assert_eq!(result.expect("delivered"), Err(WriteError::Stopped));
    assert!(harness.sink.stored_events().is_empty());
}
