//! `EventWriter`: batches rows from the pipeline and stores them through an `EventSink`,
//! acknowledging each `WriteRows` only once every row it carried is stored.
//!
//! A batch is cut when the buffer reaches `max_batch_bytes` (KAFKA_MAX_MESSAGE_BATCH_SIZE) or
//! every `flush_interval` (KAFKA_FLUSH_FREQUENCY_MS), or, with `cut_when_free` (HTTP capture
//! without Kafka, whose requests wait for their write), as soon as a flush slot is free. Up to `max_concurrent_flushes` batches are
//! written at once, so encoding the next batch overlaps the insert of the previous one. A failed
//! write is retried with exponential backoff, indefinitely: the Kafka offsets of its events are
//! not committed until it succeeds, so giving up would lose nothing but would replay everything
//! behind it. While retrying, `/_health` shows the writer as degraded.
//!
//! Receives: `WriteRows` from the ingestion pipeline and HTTP capture; `Shutdown` from the
//! topology (flushes, waits for in-flight writes up to `shutdown_timeout`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::Shutdown;
use crate::ingest::sinks::{EventSink, Rows, SinkError, WriteBatch};
use crate::system::health::ProgressReporter;
use crate::system::metrics::{Metrics, MetricsError};
use crate::system::stats::ActorStats;

// ---------------------------------------------------------------------------------------------
// Messages

/// Store these rows; the reply comes once they are stored (or the writer gave up at shutdown).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), WriteError>")]
pub struct WriteRows(pub WriteBatch);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The rows were not stored: the writer stopped before the sink accepted them.
    #[error("the event writer stopped before the rows were stored")]
    Stopped,
}

// ---------------------------------------------------------------------------------------------
// Config, metrics

#[derive(Debug, Clone)]
pub struct EventWriterConfig {
    pub max_batch_bytes: usize,
    pub flush_interval: Duration,
    pub max_concurrent_flushes: usize,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How long `Shutdown` waits for in-flight writes (which may be retrying) before giving up.
    pub shutdown_timeout: Duration,
    /// Health deadline while there is work: longer than any sane insert, shorter than an outage
    /// that needs a human.
    pub progress_deadline: Duration,
    /// Write as soon as a flush slot is free, batching what arrives while the flushes run
    /// (group commit), instead of waiting for `flush_interval`: for when a caller waits on its
    /// write, as HTTP capture does without Kafka. Under load the batches grow by themselves.
    pub cut_when_free: bool,
}

impl Default for EventWriterConfig {
    fn default() -> Self {
        Self {
            max_batch_bytes: 900_000,
            flush_interval: Duration::from_millis(500),
            max_concurrent_flushes: 2,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            progress_deadline: Duration::from_secs(300),
            cut_when_free: false,
        }
    }
}

#[derive(Clone)]
pub struct WriterMetrics {
    rows_written: IntCounterVec,
    write_failures: IntCounter,
    flush_duration: Histogram,
}

impl WriterMetrics {
    pub fn register(metrics: &Metrics) -> Result<Self, MetricsError> {
        let rows_written = IntCounterVec::new(
            Opts::new(
                "event_writer_rows_written_total",
                "Rows the event writer has stored, by kind (events, dead_letters, warnings, persons, person_distinct_ids, groups, recordings).",
            ),
            &["kind"],
        )?;
        let write_failures = IntCounter::new(
            "event_writer_write_failures_total",
            "Sink writes that failed and were retried.",
        )?;
        let flush_duration = Histogram::with_opts(
            HistogramOpts::new(
                "event_writer_flush_duration_seconds",
                "Time from cutting a batch to having it stored, retries included.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        let registry = metrics.registry();
        registry.register(Box::new(rows_written.clone()))?;
        registry.register(Box::new(write_failures.clone()))?;
        registry.register(Box::new(flush_duration.clone()))?;
        Ok(Self {
            rows_written,
            write_failures,
            flush_duration,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Actor

type Waiter = oneshot::Sender<Result<(), WriteError>>;

struct Pending {
    batch: WriteBatch,
    waiters: Vec<Waiter>,
}

pub struct EventWriter {
    config: EventWriterConfig,
    sink: Arc<dyn EventSink>,
    stats: Arc<ActorStats>,
    metrics: WriterMetrics,
    progress: ProgressReporter,
    buffer: Pending,
    buffer_bytes: usize,
    /// Cut batches waiting for a free flush slot, oldest first.
    queued: VecDeque<Pending>,
    in_flight: usize,
    /// Stops retry loops when shutdown gives up on them.
    cancel: CancellationToken,
    drained: Vec<oneshot::Sender<()>>,
}

impl EventWriter {
    pub fn new(
        config: EventWriterConfig,
        sink: Arc<dyn EventSink>,
        stats: Arc<ActorStats>,
        metrics: WriterMetrics,
        progress: ProgressReporter,
    ) -> Self {
        Self {
            config,
            sink,
            stats,
            metrics,
            progress,
            buffer: Pending {
                batch: WriteBatch::default(),
                waiters: Vec::new(),
            },
            buffer_bytes: 0,
            queued: VecDeque::new(),
            in_flight: 0,
            cancel: CancellationToken::new(),
            drained: Vec::new(),
        }
    }

    fn is_idle(&self) -> bool {
        self.buffer.waiters.is_empty() && self.queued.is_empty() && self.in_flight == 0
    }

    /// Moves the buffer to the flush queue and starts what the concurrency limit allows.
    fn cut(&mut self, ctx: &mut Context<Self>) {
        if !self.buffer.waiters.is_empty() {
            let pending = std::mem::replace(
                &mut self.buffer,
                Pending {
                    batch: WriteBatch::default(),
                    waiters: Vec::new(),
                },
            );
            self.buffer_bytes = 0;
            self.queued.push_back(pending);
        }
        self.start_flushes(ctx);
    }

    fn start_flushes(&mut self, ctx: &mut Context<Self>) {
        while self.in_flight < self.config.max_concurrent_flushes {
            let Some(pending) = self.queued.pop_front() else {
                break;
            };
            self.in_flight += 1;
            let flush = store(
                pending.batch,
                Arc::clone(&self.sink),
                self.config.clone(),
                self.metrics.clone(),
                self.progress.clone(),
                self.cancel.clone(),
            );
            let waiters = pending.waiters;
            ctx.spawn(flush.into_actor(self).map(move |stored, writer, ctx| {
                writer.in_flight -= 1;
                let reply = if stored {
                    writer.stats.record_progress();
                    Ok(())
                } else {
                    Err(WriteError::Stopped)
                };
                for waiter in waiters {
                    // The requester may have gone away (e.g. an HTTP client disconnected).
                    let _ = waiter.send(reply.clone());
                }
                if writer.config.cut_when_free {
                    // What arrived during the flush goes now, as one batch.
                    writer.cut(ctx);
                } else {
                    writer.start_flushes(ctx);
                }
                if writer.is_idle() {
                    writer.progress.report_idle();
                    for drained in writer.drained.drain(..) {
                        let _ = drained.send(());
                    }
                }
            }));
        }
    }
}

/// Writes each non-empty part of the batch, retrying the failed part with backoff until it is
/// stored or `cancel` fires. Returns whether everything was stored.
async fn store(
    batch: WriteBatch,
    sink: Arc<dyn EventSink>,
    config: EventWriterConfig,
    metrics: WriterMetrics,
    progress: ProgressReporter,
    cancel: CancellationToken,
) -> bool {
    let started = std::time::Instant::now();
    let mut delay = config.retry_initial;
    let parts: Vec<Rows<'_>> = batch.parts().collect();
    let mut unstored = parts.as_slice();
    loop {
        let Err(error) = write_in_order(sink.as_ref(), &mut unstored, &metrics).await else {
            metrics
                .flush_duration
                .observe(started.elapsed().as_secs_f64());
            progress.report(config.progress_deadline);
            return true;
        };
        metrics.write_failures.inc();
        tracing::warn!(sink = sink.name(), %error, retry_in_ms = delay.as_millis() as u64, "write failed; retrying");
        progress.report_degraded(error.to_string());
        tokio::select! {
            () = cancel.cancelled() => return false,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(config.retry_max);
    }
}

/// Writes the parts in order (`WriteBatch::parts` says why that order) up to the first
/// failure, taking each off the front of `unstored` once it is stored, so that a retry starts
/// at the part that failed and rewrites none of those before it.
async fn write_in_order(
    sink: &dyn EventSink,
    unstored: &mut &[Rows<'_>],
    metrics: &WriterMetrics,
) -> Result<(), SinkError> {
    while let Some((&rows, rest)) = unstored.split_first() {
        sink.write(rows).await?;
        metrics
            .rows_written
            .with_label_values(&[rows.kind().as_str()])
            .inc_by(rows.len() as u64);
        *unstored = rest;
    }
    Ok(())
}

impl Actor for EventWriter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.config.flush_interval, |writer, ctx| writer.cut(ctx));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Anything not stored now never will be by this instance: say so to the waiters
        // (dropping their senders does) so consumers do not commit those offsets.
        self.cancel.cancel();
    }
}

/// A restart starts with an empty buffer: the requests that were in it got `Stopped` (their
/// senders were dropped) and are replayed from Kafka or retried by the HTTP client.
impl Supervised for EventWriter {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.cancel.cancel();
        self.cancel = CancellationToken::new();
        self.buffer = Pending {
            batch: WriteBatch::default(),
            waiters: Vec::new(),
        };
        self.buffer_bytes = 0;
        self.queued.clear();
        self.in_flight = 0;
    }
}

impl Handler<WriteRows> for EventWriter {
    type Result = ResponseFuture<Result<(), WriteError>>;

    fn handle(&mut self, WriteRows(batch): WriteRows, ctx: &mut Context<Self>) -> Self::Result {
        let _timer = self.stats.message_received();
        let (sender, receiver) = oneshot::channel();
        if batch.is_empty() {
            return Box::pin(async { Ok(()) });
        }
        if self.is_idle() {
            self.progress.report(self.config.progress_deadline);
        }
        self.buffer_bytes += batch.approximate_size();
        self.buffer.batch.append(batch);
        self.buffer.waiters.push(sender);
        let slot_free = self.in_flight < self.config.max_concurrent_flushes;
        if self.buffer_bytes >= self.config.max_batch_bytes
            || (self.config.cut_when_free && slot_free)
        {
            self.cut(ctx);
        }
        Box::pin(async move { receiver.await.unwrap_or(Err(WriteError::Stopped)) })
    }
}

impl Handler<Shutdown> for EventWriter {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        let _timer = self.stats.message_received();
        self.cut(ctx);
        if self.is_idle() {
            return Box::pin(actix::fut::ready(()));
        }
        let (sender, receiver) = oneshot::channel();
        self.drained.push(sender);
        let timeout = self.config.shutdown_timeout;
        Box::pin(
            async move { tokio::time::timeout(timeout, receiver).await.is_ok() }
                .into_actor(self)
                .map(|drained, writer, _| {
                    if !drained {
                        tracing::error!(
                            "shutdown: writes still failing after the timeout; their events stay uncommitted and will be replayed"
                        );
                        writer.cancel.cancel();
                    }
                }),
        )
    }
}

#[cfg(test)]
mod tests;
