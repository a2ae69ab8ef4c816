//! `KafkaConsumer`: reads `KAFKA_CONSUMPTION_TOPIC` in a consumer group and feeds batches to
//! the `IngestionPipeline`, committing offsets only for messages whose rows are stored.
//!
//! Batches are cut by count, bytes or time. Up to `max_in_flight_batches` are processed at once
//! (reading the next batch overlaps writing the previous one). Each partition's offsets are
//! stored strictly in order: a batch acknowledged early waits for the batches before it, so a
//! commit never skips an unstored message. librdkafka commits the stored offsets every second
//! and on rebalance. A batch the pipeline cannot take (a dependency is down) is retried with
//! backoff until it succeeds; nothing behind it is committed meanwhile.
//!
//! Batches in flight overlap, but one distinct id's events still reach the person step in the
//! order they were read: each batch takes a turn of the consumer's
//! [`KeyOrder`](crate::ingest::order) when it is read, and holds its distinct ids from its
//! person step until its person changes are applied; a retry of the batch reuses those
//! answers rather than applying them again.
//!
//! On rebalance, the revoke callback (which librdkafka runs on this actor's thread, inside
//! `recv`) blocks until the in-flight batches are acknowledged, up to `rebalance_drain_timeout`,
//! and commits, so the partition's next owner starts after them. The batches run on a separate
//! arbiter precisely so that they can finish while this thread waits.
//!
//! Receives: `Shutdown` from the topology (stop reading, finish in-flight batches, commit).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix::prelude::*;
use prometheus::{IntCounter, IntGaugeVec, Opts};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{ClientContext, Statistics};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::Shutdown;
use crate::ingest::order::{BatchTurn, KeyOrder};
use crate::ingest::payloads::{PayloadBuffers, Payloads};
use crate::ingest::pipeline::{IngestBatch, IngestionPipeline, PipelineError};
use crate::kafka::{KafkaConnection, KafkaSetupError};
use crate::system::health::ProgressReporter;
use crate::system::metrics::{Metrics, MetricsError};
use crate::system::stats::{ActorStats, ObservedAddr};
use broker_watch::BrokerWatch;
use overflow::{KeyedMessage, OverflowRouter};

#[derive(Debug, Clone)]
pub struct KafkaConsumerConfig {
    pub connection: KafkaConnection,
    /// With KAFKA_PREFIX applied.
    pub topic: String,
    /// `<KAFKA_PREFIX>clickhouse-ingestion`, PostHog's group, so that this server can take over
    /// from PostHog's consumers at their committed offsets.
    pub group_id: String,
    /// The `groupId` label of `latest_processed_timestamp_ms`: PostHog's `ingestion` or
    /// `ingestion-overflow`.
    pub metrics_group: &'static str,
    /// The topic is the overflow topic: its events get the `ingestion_capacity_overflow`
    /// warning.
    pub reads_overflow: bool,
    pub max_batch_messages: usize,
    pub max_batch_bytes: usize,
    pub max_batch_wait: Duration,
    pub max_in_flight_batches: usize,
    pub session_timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub rebalance_drain_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Health: the read loop reports at least every second; silent this long means stuck.
    pub progress_deadline: Duration,
    /// Health: Kafka unreachable this long shows the consumer degraded (see `broker_watch`).
    pub unreachable_grace: Duration,
}

impl KafkaConsumerConfig {
    pub fn new(connection: KafkaConnection, topic: String, group_id: String) -> Self {
        Self {
            connection,
            topic,
            group_id,
            metrics_group: "ingestion",
            reads_overflow: false,
            // CONSUMER_BATCH_SIZE and CONSUMER_BATCH_MAX_BYTES's defaults.
            max_batch_messages: 25_000,
            max_batch_bytes: 16 * 1024 * 1024,
            max_batch_wait: Duration::from_millis(100),
            max_in_flight_batches: 2,
            session_timeout: Duration::from_secs(30),
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
            rebalance_drain_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            progress_deadline: Duration::from_secs(60),
            unreachable_grace: Duration::from_secs(15),
        }
    }
}

#[derive(Clone)]
pub struct ConsumerMetrics {
    batches: IntCounter,
    messages: IntCounter,
    errors: IntCounter,
    latest_processed_timestamp_ms: IntGaugeVec,
    lag: IntGaugeVec,
}

impl ConsumerMetrics {
    pub fn register(metrics: &Metrics) -> Result<Self, MetricsError> {
        let batches = IntCounter::new(
            "kafka_consumer_batches_total",
            "Batches the Kafka consumer handed to the pipeline and saw stored.",
        )?;
        let messages = IntCounter::new(
            "kafka_consumer_messages_total",
            "Messages read from Kafka and stored (or dead-lettered).",
        )?;
        let errors = IntCounter::new(
            "kafka_consumer_errors_total",
            "Errors reading from Kafka or processing a batch (each retried).",
        )?;
        let latest_processed_timestamp_ms = IntGaugeVec::new(
            Opts::new(
                "latest_processed_timestamp_ms",
                "Kafka timestamp of the last message stored, per partition (PostHog's gauge).",
            ),
            &["topic", "partition", "groupId"],
        )?;
        let lag = IntGaugeVec::new(
            Opts::new(
                "kafka_consumer_lag",
                "Messages behind the partition's high watermark, from librdkafka statistics.",
            ),
            &["topic", "partition"],
        )?;
        let registry = metrics.registry();
        registry.register(Box::new(batches.clone()))?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(latest_processed_timestamp_ms.clone()))?;
        registry.register(Box::new(lag.clone()))?;
        Ok(Self {
            batches,
            messages,
            errors,
            latest_processed_timestamp_ms,
            lag,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Offsets

/// Which batches are in flight and, per partition, the offsets they cover, in read order.
#[derive(Default)]
struct Tracker {
    next_batch: u64,
    in_flight: usize,
    partitions: HashMap<i32, VecDeque<Span>>,
}

struct Span {
    batch: u64,
    last_offset: i64,
    last_timestamp_ms: Option<i64>,
    done: bool,
}

impl Tracker {
    fn register(&mut self, spans: &[(i32, i64, Option<i64>)]) -> u64 {
        let batch = self.next_batch;
        self.next_batch += 1;
        self.in_flight += 1;
        for &(partition, last_offset, last_timestamp_ms) in spans {
            self.partitions
                .entry(partition)
                .or_default()
                .push_back(Span {
                    batch,
                    last_offset,
                    last_timestamp_ms,
                    done: false,
                });
        }
        batch
    }

    /// Marks the batch stored; returns, per partition, the last offset now safe to commit.
    fn complete(&mut self, batch: u64) -> Vec<(i32, i64, Option<i64>)> {
        self.in_flight = self.in_flight.saturating_sub(1);
        let mut ready = Vec::new();
        for (&partition, spans) in &mut self.partitions {
            for span in spans.iter_mut().filter(|span| span.batch == batch) {
                span.done = true;
            }
            let mut last = None;
            while spans.front().is_some_and(|span| span.done) {
                last = spans
                    .pop_front()
                    .map(|span| (span.last_offset, span.last_timestamp_ms));
            }
            if let Some((offset, timestamp)) = last {
                ready.push((partition, offset, timestamp));
            }
        }
        ready
    }

    /// Forgets revoked partitions: their next owner re-reads what was not committed.
    fn forget(&mut self, partitions: &[i32]) {
        for partition in partitions {
            self.partitions.remove(partition);
        }
    }
}

struct Shared {
    tracker: Mutex<Tracker>,
    idle: Condvar,
    /// Whether Kafka answers, from the librdkafka callbacks and the reads.
    brokers: BrokerWatch,
}

// ---------------------------------------------------------------------------------------------
// librdkafka context

/// The consumer's librdkafka context: Kafka statistics into metrics and, with client errors,
/// into the broker watch; the revoke callback that drains in-flight batches before a partition
/// moves.
struct RebalanceContext {
    shared: Arc<Shared>,
    drain_timeout: Duration,
    metrics: ConsumerMetrics,
    /// Tells readiness that the consumer has joined its group.
    progress: ProgressReporter,
}

impl ClientContext for RebalanceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.metrics.errors.inc();
        tracing::warn!(%error, reason, "Kafka client error");
        self.shared
            .brokers
            .error(format!("{error}: {reason}"), Instant::now());
    }

    fn stats(&self, statistics: Statistics) {
        self.shared.brokers.statistics(&statistics, Instant::now());
        for (topic, topic_stats) in &statistics.topics {
            for (partition, partition_stats) in &topic_stats.partitions {
                if *partition < 0 || partition_stats.consumer_lag < 0 {
                    continue;
                }
                self.metrics
                    .lag
                    .with_label_values(&[topic.as_str(), &partition.to_string()])
                    .set(partition_stats.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let started = Instant::now();
        let tracker = self
            .shared
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (mut tracker, timeout) = self
            .shared
            .idle
            .wait_timeout_while(tracker, self.drain_timeout, |tracker| tracker.in_flight > 0)
            .unwrap_or_else(PoisonError::into_inner);
        if timeout.timed_out() {
            tracing::warn!(
                in_flight = tracker.in_flight,
                "rebalance: in-flight batches not stored in time; the next owner re-reads them"
            );
        }
        let partitions: Vec<i32> = revoked.elements().iter().map(|e| e.partition()).collect();
        tracker.forget(&partitions);
        drop(tracker);
        if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit is the usual reason; not an error.
            tracing::debug!(%error, "rebalance commit");
        }
        tracing::info!(
            ?partitions,
            waited_ms = started.elapsed().as_millis() as u64,
            "partitions revoked after draining"
        );
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            let partitions: Vec<i32> = assigned.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?partitions, "partitions assigned");
            // Joined, even with no partitions (more instances than partitions).
            self.progress.report_joined();
        }
    }
}

type Client = StreamConsumer<RebalanceContext>;

// ---------------------------------------------------------------------------------------------
// Actor

pub struct KafkaConsumer {
    config: KafkaConsumerConfig,
    /// Created in `started`, so a failure stops the actor and the supervisor retries.
    consumer: Option<Arc<Client>>,
    shared: Arc<Shared>,
    pipeline: ObservedAddr<IngestionPipeline>,
    stats: Arc<ActorStats>,
    metrics: ConsumerMetrics,
    progress: ProgressReporter,
    /// Runs the batches, so they can finish while the rebalance callback blocks this thread.
    workers: ArbiterHandle,
    permits: Arc<Semaphore>,
    /// Stops reading; batches already read still finish.
    stop_reading: CancellationToken,
    /// Stops retrying batches (shutdown gave up on them).
    abandon: CancellationToken,
    /// Reroutes hot keys to the overflow topic (INGESTION_OVERFLOW_ENABLED).
    overflow: Option<Arc<OverflowRouter>>,
    /// Keeps one distinct id's events in read order across the batches in flight; kept across
    /// restarts, since batches read before one may still be in flight after it.
    order: Arc<KeyOrder>,
    /// Payload buffers of finished batches, for the next ones.
    buffers: PayloadBuffers,
}

impl KafkaConsumer {
    pub fn new(
        config: KafkaConsumerConfig,
        pipeline: ObservedAddr<IngestionPipeline>,
        workers: ArbiterHandle,
        stats: Arc<ActorStats>,
        metrics: ConsumerMetrics,
        progress: ProgressReporter,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_in_flight_batches.max(1)));
        // The batches in flight and the one being read.
        let buffers = PayloadBuffers::new(config.max_in_flight_batches.max(1) + 1);
        let brokers = BrokerWatch::new(config.unreachable_grace);
        Self {
            config,
            consumer: None,
            shared: Arc::new(Shared {
                tracker: Mutex::new(Tracker::default()),
                idle: Condvar::new(),
                brokers,
            }),
            pipeline,
            stats,
            metrics,
            progress,
            workers,
            permits,
            stop_reading: CancellationToken::new(),
            abandon: CancellationToken::new(),
            overflow: None,
            order: KeyOrder::new(),
            buffers,
        }
    }

    /// Sends what is over its key's budget to the overflow topic instead of the pipeline.
    pub fn with_overflow(mut self, router: Arc<OverflowRouter>) -> Self {
        self.overflow = Some(router);
        self
    }

    /// Creates the client and subscribes. Brokers that are down are not an error here:
    /// librdkafka keeps retrying, and health shows the consumer making no progress.
    fn connect(&self) -> Result<Client, KafkaSetupError> {
        let context = RebalanceContext {
            shared: Arc::clone(&self.shared),
            drain_timeout: self.config.rebalance_drain_timeout,
            metrics: self.metrics.clone(),
            progress: self.progress.clone(),
        };
        let config = &self.config;
        let consumer: Client = config
            .connection
            .client_config()?
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            // Offsets are stored by hand, only for stored messages.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // A topic first created by the first event produced to it (a new deployment,
            // the broker's auto-create), or given more partitions, is noticed within 10 s
            // instead of librdkafka's default 5 minutes, during which its events would wait.
            .set("topic.metadata.refresh.interval.ms", "10000")
            .set(
                "session.timeout.ms",
                config.session_timeout.as_millis().to_string(),
            )
            // librdkafka refuses a heartbeat interval not below the session timeout.
            .set(
                "heartbeat.interval.ms",
                (config.session_timeout.as_millis() / 10)
                    .max(100)
                    .to_string(),
            )
            .set("statistics.interval.ms", "10000")
            // librdkafka waits up to 500 ms for a fetch to fill by default, which dominated the
            // produce-to-stored latency in bench/results/ingestion.md.
            .set("fetch.wait.max.ms", "100")
            // The prefetch is left at librdkafka's default: bounding it to 16 MB halved the
            // throughput in bench/results/ingestion.md (the consumer starved between fetches).
            .create_with_context(context)
            .map_err(KafkaSetupError::Client)?;
        consumer
            .subscribe(&[config.topic.as_str()])
            .map_err(KafkaSetupError::Client)?;
        Ok(consumer)
    }

    fn batch_runner(&self, consumer: &Arc<Client>) -> BatchRunner {
        BatchRunner {
            config: self.config.clone(),
            consumer: Arc::clone(consumer),
            shared: Arc::clone(&self.shared),
            pipeline: self.pipeline.clone(),
            metrics: self.metrics.clone(),
            progress: self.progress.clone(),
            abandon: self.abandon.clone(),
            overflow: self.overflow.clone(),
            buffers: self.buffers.clone(),
        }
    }
}

impl Actor for KafkaConsumer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let consumer = match self.connect() {
            Ok(consumer) => Arc::new(consumer),
            Err(error) => {
                tracing::error!(%error, "Kafka consumer not started");
                self.progress.report_stopped(error.to_string());
                ctx.stop();
                return;
            }
        };
        self.consumer = Some(Arc::clone(&consumer));
        let reader = Reader {
            runner: self.batch_runner(&consumer),
            workers: self.workers.clone(),
            permits: Arc::clone(&self.permits),
            stop: self.stop_reading.clone(),
            stats: Arc::clone(&self.stats),
            order: Arc::clone(&self.order),
        };
        ctx.spawn(reader.run().into_actor(self));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.stop_reading.cancel();
        self.abandon.cancel();
    }
}

/// A restart reconnects: a new client rejoins the group and resumes from committed offsets.
impl Supervised for KafkaConsumer {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.stop_reading.cancel();
        self.stop_reading = CancellationToken::new();
        self.consumer = None;
    }
}

impl Handler<Shutdown> for KafkaConsumer {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        let _timer = self.stats.message_received();
        self.stop_reading.cancel();
        let permits = Arc::clone(&self.permits);
        let all = self.config.max_in_flight_batches.max(1) as u32;
        let timeout = self.config.shutdown_timeout;
        let consumer = self.consumer.clone();
        let abandon = self.abandon.clone();
        let progress = self.progress.clone();
        Box::pin(async move {
            // Every permit back means every batch read has been stored (or abandoned).
            let drained = tokio::time::timeout(timeout, permits.acquire_many(all)).await;
            if drained.is_err() {
                tracing::error!("shutdown: batches still not stored; they will be re-read");
                abandon.cancel();
            }
            if let Some(consumer) = consumer {
                if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
                    tracing::debug!(%error, "final commit");
                }
                consumer.unsubscribe();
            }
            progress.report_idle();
        })
    }
}

/// The read loop: fills a batch, waits for an in-flight slot, hands the batch to a worker.
/// Reads through `runner`'s consumer, config, metrics and progress reporter.
struct Reader {
    runner: BatchRunner,
    workers: ArbiterHandle,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
    stats: Arc<ActorStats>,
    order: Arc<KeyOrder>,
}

#[derive(Default)]
struct Batch {
    messages: Payloads,
    /// The messages' Kafka keys, kept only when overflow rerouting needs them.
    keys: Vec<Option<Vec<u8>>>,
    /// Per partition: last offset and its Kafka timestamp.
    spans: Vec<(i32, i64, Option<i64>)>,
}

impl Batch {
    /// Notes a message's offset and timestamp as its partition's last. A fetch hands over
    /// messages in runs of one partition, so the search from the end almost always stops at
    /// the first entry it looks at.
    fn note(&mut self, partition: i32, offset: i64, timestamp_ms: Option<i64>) {
        match self.spans.iter_mut().rev().find(|span| span.0 == partition) {
            Some(span) => *span = (partition, offset, timestamp_ms),
            None => self.spans.push((partition, offset, timestamp_ms)),
        }
    }
}

impl Reader {
    async fn run(self) {
        use futures::StreamExt;
        use tokio::time::Instant;

        let idle_tick = Duration::from_secs(1);
        // One message stream and one timer for the whole loop: creating them per message
        // costs more than the message itself at high rates.
        let mut stream = self.runner.consumer.stream();
        let timer = tokio::time::sleep(idle_tick);
        tokio::pin!(timer);
        // One wait for the stop as well: a fresh one per message registers and drops a waiter
        // on the token each time.
        let stopped = self.stop.cancelled();
        tokio::pin!(stopped);
        loop {
            let mut batch = Batch {
                messages: self.runner.buffers.take(),
                ..Batch::default()
            };
            timer.as_mut().reset(Instant::now() + idle_tick);
            loop {
                let received = tokio::select! {
                    biased;
                    () = &mut stopped => break,
                    () = &mut timer => None,
                    received = stream.next() => received,
                };
                match received {
                    None if !batch.messages.is_empty() => break,
                    None => {
                        // A second without messages: what a backlog's batches took goes back.
                        self.runner.buffers.release();
                        // An idle tick is progress only while Kafka answers: with the
                        // brokers gone the loop idles just the same.
                        let unreachable = self
                            .runner
                            .shared
                            .brokers
                            .degraded(std::time::Instant::now());
                        match unreachable {
                            Some(reason) => self.runner.progress.report_degraded(reason),
                            None => self
                                .runner
                                .progress
                                .report(self.runner.config.progress_deadline),
                        }
                        timer.as_mut().reset(Instant::now() + idle_tick);
                    }
                    Some(Ok(message)) => {
                        if batch.messages.is_empty() {
                            timer
                                .as_mut()
                                .reset(Instant::now() + self.runner.config.max_batch_wait);
                        }
                        batch.messages.push(message.payload().unwrap_or_default());
                        if self.runner.overflow.is_some() {
                            batch.keys.push(message.key().map(<[u8]>::to_vec));
                        }
                        batch.note(
                            message.partition(),
                            message.offset(),
                            message.timestamp().to_millis(),
                        );
                        if batch.messages.len() >= self.runner.config.max_batch_messages
                            || batch.messages.byte_len() >= self.runner.config.max_batch_bytes
                        {
                            break;
                        }
                    }
                    Some(Err(error)) => {
                        self.runner.metrics.errors.inc();
                        self.stats.record_error();
                        tracing::warn!(%error, "Kafka read failed; retrying");
                        self.runner
                            .shared
                            .brokers
                            .error(error.to_string(), std::time::Instant::now());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            if !batch.messages.is_empty() {
                self.runner.shared.brokers.reading();
                let Ok(permit) = Arc::clone(&self.permits).acquire_owned().await else {
                    return;
                };
                let id = self
                    .runner
                    .shared
                    .tracker
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .register(&batch.spans);
                self.runner
                    .progress
                    .report(self.runner.config.progress_deadline);
                // Taken here, in read order, which is the order it keeps.
                let turn = Arc::new(self.order.next_turn());
                let runner = self.runner.clone();
                self.workers.spawn(async move {
                    runner.run(id, batch.messages, batch.keys, &turn).await;
                    // Ends the batch's claim on its distinct ids once it is stored or given up.
                    drop(turn);
                    drop(permit);
                });
            }
            if self.stop.is_cancelled() {
                return;
            }
        }
    }
}

/// Why one try to store a batch failed; the batch is tried again.
#[derive(Debug, thiserror::Error)]
enum BatchNotStored {
    #[error(transparent)]
    Pipeline(PipelineError),
    #[error("pipeline unavailable: {0}")]
    PipelineUnavailable(#[source] MailboxError),
}

/// Takes one batch through the pipeline, retrying until stored, then stores its offsets.
#[derive(Clone)]
struct BatchRunner {
    config: KafkaConsumerConfig,
    consumer: Arc<Client>,
    shared: Arc<Shared>,
    pipeline: ObservedAddr<IngestionPipeline>,
    metrics: ConsumerMetrics,
    progress: ProgressReporter,
    abandon: CancellationToken,
    overflow: Option<Arc<OverflowRouter>>,
    /// Where a batch's payload buffers go once it is done with them.
    buffers: PayloadBuffers,
}

impl BatchRunner {
    async fn run(
        self,
        id: u64,
        messages: Payloads,
        keys: Vec<Option<Vec<u8>>>,
        turn: &Arc<BatchTurn>,
    ) {
        let count = messages.len();
        let messages = match &self.overflow {
            Some(router) => {
                let keyed = messages
                    .iter()
                    .zip(keys)
                    .map(|(payload, key)| KeyedMessage {
                        key,
                        payload: payload.to_vec(),
                    })
                    .collect();
                self.buffers.give(messages);
                // Split once: a retry must not spend the buckets again.
                let (kept, overflow) = router.split(keyed);
                let overflow = &overflow;
                if !overflow.is_empty()
                    && !self
                        .until_done("overflow messages not produced", || {
                            router.reroute(overflow)
                        })
                        .await
                {
                    self.finish(id, false);
                    return;
                }
                kept.iter().collect()
            }
            None => messages,
        };
        let messages = Arc::new(messages);
        let (pipeline, reads_overflow) = (&self.pipeline, self.config.reads_overflow);
        let stored = messages.is_empty()
            || self
                .until_done("batch not stored", || {
                    let messages = Arc::clone(&messages);
                    async move {
                        match pipeline
                            .send(IngestBatch {
                                messages,
                                overflow: reads_overflow,
                                turn: Some(Arc::clone(turn)),
                            })
                            .await
                        {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err(error)) => Err(BatchNotStored::Pipeline(error)),
                            Err(error) => Err(BatchNotStored::PipelineUnavailable(error)),
                        }
                    }
                })
                .await;
        // The pipeline has let go of the batch by now, unless it failed while holding it.
        if let Ok(messages) = Arc::try_unwrap(messages) {
            self.buffers.give(messages);
        }
        if !stored {
            self.finish(id, false);
            return;
        }
        self.metrics.batches.inc();
        self.metrics.messages.inc_by(count as u64);
        self.finish(id, true);
        self.progress.report(self.config.progress_deadline);
    }

    /// Runs `attempt` until it succeeds, with backoff, reporting each failure; false when
    /// shutdown gave up first.
    async fn until_done<T, E, F>(&self, what: &str, mut attempt: impl FnMut() -> F) -> bool
    where
        E: std::fmt::Display,
        F: std::future::Future<Output = Result<T, E>>,
    {
        let mut delay = self.config.retry_initial;
        loop {
            let Err(error) = attempt().await else {
                return true;
            };
            self.metrics.errors.inc();
            tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "{what}; retrying");
            self.progress.report_degraded(error.to_string());
            tokio::select! {
                () = self.abandon.cancelled() => return false,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.config.retry_max);
        }
    }

    fn finish(&self, id: u64, stored: bool) {
        let mut tracker = self
            .shared
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if stored {
            for (partition, offset, timestamp) in tracker.complete(id) {
                // Fails only for a partition revoked meanwhile, which its new owner re-reads.
                if let Err(error) =
                    self.consumer
                        .store_offset(&self.config.topic, partition, offset)
                {
                    tracing::debug!(%error, partition, "offset not stored");
                }
                if let Some(timestamp) = timestamp {
                    self.metrics
                        .latest_processed_timestamp_ms
                        .with_label_values(&[
                            &self.config.topic,
                            &partition.to_string(),
                            self.config.metrics_group,
                        ])
                        .set(timestamp);
                }
            }
        } else {
            tracker.in_flight = tracker.in_flight.saturating_sub(1);
        }
        drop(tracker);
        self.shared.idle.notify_all();
    }
}

mod broker_watch;
pub mod overflow;

#[cfg(test)]
mod tests;
