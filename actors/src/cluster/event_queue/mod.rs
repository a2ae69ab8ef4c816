//! EventQueue: an at-least-once work queue shared by the instances of a deployment, with
//! explicit acks, retries with exponential backoff, dead letters, enforced timeouts and delayed
//! delivery (NocoBase's `app.eventQueue` without its flaws, `nocobase-cluster.md` §5 and §9.3).
//!
//! Users: plugin jobs (`meta.jobs.<name>(payload).runNow/runIn/runAt`, carrying
//! `{timeout, max_retries}` and a delay), and onEvent / composeWebhook delivery, where a slow or
//! failing destination is retried without holding up ingestion.
//!
//! Semantics, the same for both adapters:
//! - Publishing needs no local subscriber: messages wait until some instance consumes the
//!   channel (NocoBase threw, #7797 and #7875).
//! - At-least-once: a message is acked only after its handler succeeded. A handler error, a
//!   panic or a timeout is a failure: the message comes back after `backoff_base * 2^attempt`
//!   (capped at `backoff_max`) with `attempt + 1` and the same `id`; after `max_retries`
//!   retries it goes to the channel's dead letters with the last error, and is acked. Handlers
//!   de-duplicate by `id` where running twice matters.
//! - Timeouts are enforced: past the message's timeout the handler's token fires and its future
//!   is dropped (NocoBase only signalled).
//! - `concurrency` is a hard limit: a slot is taken before a message is fetched and given back
//!   after it is settled, so the limit holds under any interleaving (NocoBase #7267).
//! - `idle()` is the back-pressure hook: while false nothing new is fetched.
//!
//! Handlers return `Result<(), HandlerError>`: `Ok` acks, `Err(error)` retries or dead-letters
//! with the error's text.
//!
//! Adapters: [`InProcessEventQueue`] (embedded profile; not durable) and [`RedisEventQueue`]
//! (cluster profile; streams and a consumer group). Both run the consumer loop of this module;
//! an adapter only fetches messages and settles them.

mod memory;
mod redis;

use std::collections::HashSet;
use std::error::Error;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;

use super::ClusterError;

pub use self::memory::{InProcessEventQueue, InProcessQueueBackend};
pub use self::redis::RedisEventQueue;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_MAX_RETRIES: u32 = 3;
pub const DEFAULT_CONCURRENCY: usize = 1;
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_RECLAIM_IDLE: Duration = Duration::from_secs(60);
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Dead letters kept per channel. They are for inspection and re-drive tooling, so past this
/// the oldest are trimmed rather than letting a poison flood grow the store without bound.
pub const DEAD_LETTER_RETAIN: usize = 10_000;

/// Slots of an unlimited subscription (`concurrency: 0`): far more than a process can run, and
/// within what a semaphore and `acquire_many` accept on every platform.
const UNLIMITED_SLOTS: usize = 1 << 20;
/// Most messages one fetch takes for an unlimited subscription, so one instance does not grab a
/// whole backlog that other instances could share.
const UNLIMITED_FETCH_BATCH: usize = 64;
/// Backoff of the consumer loop while its store is unreachable.
const FETCH_BACKOFF_MIN: Duration = Duration::from_millis(50);
const FETCH_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Tries to ack, retry or dead-letter a message before giving up on it. A message that could
/// not be settled stays pending in Redis and is reclaimed, so giving up loses nothing.
const SETTLE_ATTEMPTS: u32 = 5;
const SETTLE_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// How long a timed-out handler's aborted task may take to be dropped before we stop waiting: a
/// handler that blocks its thread without yielding cannot be stopped at all.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// One delivery of a message to a handler.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueMessage {
    /// A uuid v7 given at publish, the same on every attempt: the key for de-duplication.
    pub id: String,
    /// The channel as published (without any deployment prefix).
    pub channel: String,
    pub payload: Value,
    /// 0 on the first delivery, then 1, 2, … up to `max_retries`.
    pub attempt: u32,
    pub max_retries: u32,
    /// Wall clock of the publisher, in Unix milliseconds.
    pub published_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOptions {
    /// How long one attempt may run before it is cancelled and counted as failed. Default 15 s.
    pub timeout: Duration,
    /// Retries after the first attempt before the message is dead-lettered. Default 3.
    pub max_retries: u32,
    /// Deliver no earlier than now + delay (`runIn`). Default: at once.
    pub delay: Option<Duration>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            max_retries: DEFAULT_MAX_RETRIES,
            delay: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Messages in flight on this instance at most. Default 1; 0 means unlimited.
    pub concurrency: usize,
    /// Retry n (counting from 0) waits `backoff_base * 2^n`, capped by `backoff_max`.
    /// Default 1 s.
    pub backoff_base: Duration,
    /// Default 5 min.
    pub backoff_max: Duration,
    /// Redis only: a delivered message unacked for this long is taken over from its consumer,
    /// which is presumed dead. Must exceed every message timeout, or a slow live handler's
    /// message is processed twice. Default 60 s.
    pub reclaim_idle: Duration,
    /// How often an idle consumer re-checks `idle()`, due retries and (Redis) reclaimable
    /// messages. Default 250 ms.
    pub poll_interval: Duration,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_CONCURRENCY,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            reclaim_idle: DEFAULT_RECLAIM_IDLE,
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }
}

/// A handler's own failure. The queue only logs it and keeps its text in the dead letter, so
/// each handler keeps whatever error type it has.
pub type HandlerError = Box<dyn Error + Send + Sync>;

/// Why one delivery of a message failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The handler returned an error; its text is the handler's own.
    #[error(transparent)]
    Handler(HandlerError),
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    #[error("handler panicked: {0}")]
    Panicked(String),
    #[error("handler task was cancelled")]
    Cancelled,
    /// A reclaimed message whose earlier deliveries, to consumers that died or stalled, used
    /// up its retries: it is dead-lettered without running the handler again.
    #[error("delivered {deliveries} times without being settled (its consumers died or stalled)")]
    NeverSettled { deliveries: u64 },
}

/// A message that failed its first attempt and every retry.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// As last delivered (`attempt` is the failed one).
    pub message: QueueMessage,
    /// The last attempt's error, as text: dead letters outlive the process that failed them.
    pub error: String,
    pub failed_at_ms: u64,
}

#[async_trait]
pub trait QueueHandler: Send + Sync + 'static {
    /// Processes one message; `Ok` acks it, `Err(error)` retries it or dead-letters it.
    /// `cancel` fires when the message's timeout passes (the future is then also dropped: real
    /// cancellation) or when the subscription is dropped without `close()`.
    async fn process(
        &self,
        message: QueueMessage,
        cancel: CancellationToken,
    ) -> Result<(), HandlerError>;

    /// Backpressure hook: while false, no new message is handed out (messages wait in the
    /// queue). Checked before each fetch and every `poll_interval`.
    fn idle(&self) -> bool {
        true
    }
}

#[async_trait]
pub trait EventQueue: Send + Sync {
    /// Enqueues; works without a local subscriber (unlike NocoBase). Returns the message id.
    async fn publish(
        &self,
        channel: &str,
        payload: Value,
        options: PublishOptions,
    ) -> Result<String, ClusterError>;

    /// Starts consuming `channel` on this instance with at most `concurrency` messages in
    /// flight. One subscription per channel per queue instance: a second one is
    /// `ClusterError::InvalidArgument` until the first is closed or dropped.
    async fn subscribe(
        &self,
        channel: &str,
        handler: Arc<dyn QueueHandler>,
        options: SubscribeOptions,
    ) -> Result<QueueSubscription, ClusterError>;

    /// Messages that exhausted their retries, oldest first (inspection, tests, re-drive
    /// tooling). At most the newest `DEAD_LETTER_RETAIN` are kept.
    async fn dead_letters(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, ClusterError>;
}

// ---------------------------------------------------------------------------------------------
// Validation shared by the adapters

/// Channels become Redis key suffixes (`queue:<channel>`, `queue:<channel>:dead`), so a channel
/// that ends like a sibling key would collide with another channel's keys.
fn validate_channel(channel: &str) -> Result<(), ClusterError> {
    if channel.is_empty() {
        return Err(ClusterError::InvalidArgument(
            "queue channel must not be empty".into(),
        ));
    }
    if channel.ends_with(":delayed") || channel.ends_with(":dead") {
        return Err(ClusterError::InvalidArgument(format!(
            "queue channel {channel:?} must not end with \":delayed\" or \":dead\""
        )));
    }
    Ok(())
}

fn validate_publish(channel: &str, options: &PublishOptions) -> Result<(), ClusterError> {
    validate_channel(channel)?;
    // Redis stores the timeout in whole milliseconds; a zero timeout could never succeed.
    if options.timeout < Duration::from_millis(1) {
        return Err(ClusterError::InvalidArgument(
            "queue message timeout must be at least 1 ms".into(),
        ));
    }
    Ok(())
}

fn validate_subscribe(channel: &str, options: &SubscribeOptions) -> Result<(), ClusterError> {
    validate_channel(channel)?;
    // A zero poll interval would spin, and a zero reclaim idle would steal live messages.
    if options.poll_interval < Duration::from_millis(1) {
        return Err(ClusterError::InvalidArgument(
            "queue poll interval must be at least 1 ms".into(),
        ));
    }
    if options.reclaim_idle < Duration::from_millis(1) {
        return Err(ClusterError::InvalidArgument(
            "queue reclaim idle must be at least 1 ms".into(),
        ));
    }
    Ok(())
}

/// Retry `attempt` (0 = the first failure) waits `base * 2^attempt`, capped by `max`.
pub(crate) fn retry_delay(base: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 2u32.checked_pow(attempt).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

pub(crate) fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

fn new_message_id() -> String {
    // v7 ids sort by publish time, which keeps logs and dead letters readable.
    uuid::Uuid::now_v7().to_string()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// One subscription per channel per queue instance

/// The channels a queue instance consumes.
#[derive(Default, Clone)]
struct Subscriptions(Arc<Mutex<HashSet<String>>>);

impl Subscriptions {
    fn register(&self, channel: &str) -> Result<Registration, ClusterError> {
        if !lock(&self.0).insert(channel.to_owned()) {
            return Err(ClusterError::InvalidArgument(format!(
                "queue channel {channel:?} is already subscribed on this instance"
            )));
        }
        Ok(Registration {
            subscriptions: self.clone(),
            channel: channel.to_owned(),
        })
    }
}

/// Frees the channel for a new subscription when the subscription ends.
struct Registration {
    subscriptions: Subscriptions,
    channel: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.subscriptions.0).remove(&self.channel);
    }
}

// ---------------------------------------------------------------------------------------------
// What an adapter provides to the consumer loop

/// One message handed to this consumer, with what its adapter needs to settle it.
struct Delivery {
    message: QueueMessage,
    timeout: Duration,
    /// The adapter's handle on this delivery: the stream entry id in Redis, empty in-process.
    receipt: String,
    /// Set when the message must be dead-lettered without running the handler: a reclaimed
    /// message whose earlier deliveries (to consumers that died) used up its retries.
    exhausted: Option<DeliveryError>,
}

enum Settlement {
    Ack,
    /// Put back unprocessed, as it was: fetched by a read already under way when the
    /// subscription stopped. Not an attempt.
    Release,
    /// Deliver again after `delay` with `attempt + 1`.
    Retry {
        delay: Duration,
    },
    DeadLetter {
        error: String,
    },
}

/// The fetching half of an adapter, owned by the consumer loop.
#[async_trait]
trait Source: Send + 'static {
    /// At most `max` deliveries (never more: each one already holds a slot). Waits about one
    /// poll interval for the first, and returns early and empty once `shutdown` fires where
    /// it can.
    async fn fetch(
        &mut self,
        max: usize,
        shutdown: &CancellationToken,
    ) -> Result<Vec<Delivery>, ClusterError>;
}

/// The settling half of an adapter, shared by the tasks running deliveries.
#[async_trait]
trait Settler: Send + Sync + 'static {
    async fn settle(
        &self,
        delivery: &Delivery,
        settlement: &Settlement,
    ) -> Result<(), ClusterError>;
}

// ---------------------------------------------------------------------------------------------
// The consumer loop

struct ConsumerContext {
    channel: String,
    handler: Arc<dyn QueueHandler>,
    settler: Arc<dyn Settler>,
    options: SubscribeOptions,
    /// One permit per message in flight, taken before the fetch and given back after the
    /// settle: this is what makes `concurrency` exact.
    slots: Arc<Semaphore>,
    /// Most messages one fetch asks for.
    fetch_limit: usize,
    /// Parent of every handler's token; fired when the subscription is dropped without close.
    abandon: CancellationToken,
}

/// Starts the consumer loop of a subscription.
fn start_consumer(
    channel: &str,
    source: impl Source,
    settler: Arc<dyn Settler>,
    handler: Arc<dyn QueueHandler>,
    options: SubscribeOptions,
    registration: Registration,
) -> QueueSubscription {
    let (total_slots, fetch_limit) = match options.concurrency {
        0 => (UNLIMITED_SLOTS, UNLIMITED_FETCH_BATCH),
        limit => (limit.min(UNLIMITED_SLOTS), limit.min(UNLIMITED_SLOTS)),
    };
    let slots = Arc::new(Semaphore::new(total_slots));
    let stop = CancellationToken::new();
    let abandon = CancellationToken::new();
    let context = Arc::new(ConsumerContext {
        channel: channel.to_owned(),
        handler,
        settler,
        options,
        slots: Arc::clone(&slots),
        fetch_limit,
        abandon: abandon.clone(),
    });
    let consumer = tokio::spawn(run_consumer(source, context, stop.clone()));
    QueueSubscription {
        channel: channel.to_owned(),
        stop,
        abandon,
        consumer: Some(consumer),
        slots,
        total_slots: u32::try_from(total_slots).expect("UNLIMITED_SLOTS fits in u32"),
        drained: false,
        _registration: registration,
    }
}

/// Takes free slots, fetches that many messages at most, and runs each in a task of its own
/// that gives its slot back once the message is settled. Only `stop` ends it: store errors
/// are logged and retried with backoff.
async fn run_consumer(
    mut source: impl Source,
    context: Arc<ConsumerContext>,
    stop: CancellationToken,
) {
    let channel = context.channel.as_str();
    let mut failures: u32 = 0;
    loop {
        let first_slot = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            slot = Arc::clone(&context.slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // unreachable: the semaphore is never closed
            },
        };
        if !context.handler.idle() {
            drop(first_slot);
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                () = tokio::time::sleep(context.options.poll_interval) => continue,
            }
        }
        let mut slots = first_slot;
        let extra = (context.fetch_limit - 1).min(context.slots.available_permits());
        if let Ok(extra) = u32::try_from(extra)
            && extra > 0
            && let Ok(more) = Arc::clone(&context.slots).try_acquire_many_owned(extra)
        {
            slots.merge(more);
        }
        match source.fetch(slots.num_permits(), &stop).await {
            Ok(deliveries) if stop.is_cancelled() => {
                // A read that was under way when the subscription stopped: hand its messages
                // back for whoever consumes next instead of running them after the stop.
                // Reversed, so the in-process adapter's put-backs at the head keep their order.
                for delivery in deliveries.into_iter().rev() {
                    settle(&context, &delivery, &Settlement::Release).await;
                }
                break;
            }
            Ok(deliveries) => {
                if failures > 0 {
                    tracing::info!(%channel, failures, "event queue consumer recovered");
                    failures = 0;
                }
                for delivery in deliveries {
                    let slot = match slots.split(1) {
                        Some(slot) => slot,
                        // Sources return at most what was asked; should one ever return more,
                        // wait for a slot rather than overshoot the limit.
                        None => match Arc::clone(&context.slots).acquire_owned().await {
                            Ok(slot) => slot,
                            Err(_) => break,
                        },
                    };
                    tokio::spawn(deliver(Arc::clone(&context), delivery, slot));
                }
            }
            Err(error) => {
                drop(slots);
                failures = failures.saturating_add(1);
                let retry_in = retry_delay(FETCH_BACKOFF_MIN, FETCH_BACKOFF_MAX, failures - 1);
                tracing::warn!(%channel, %error, failures, ?retry_in, "event queue fetch failed");
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(retry_in) => {}
                }
            }
        }
    }
    tracing::debug!(%channel, "event queue consumer stopped fetching");
}

/// Runs one delivery and settles it; `slot` is given back only after the settle.
async fn deliver(
    context: Arc<ConsumerContext>,
    mut delivery: Delivery,
    slot: OwnedSemaphorePermit,
) {
    let (outcome, may_retry) = match delivery.exhausted.take() {
        Some(error) => (Err(error), false),
        None => (run_handler(&context, &delivery).await, true),
    };
    let message = &delivery.message;
    let settlement = match outcome {
        Ok(()) => Settlement::Ack,
        Err(error) if may_retry && message.attempt < message.max_retries => {
            let delay = retry_delay(
                context.options.backoff_base,
                context.options.backoff_max,
                message.attempt,
            );
            tracing::warn!(
                channel = %message.channel, id = %message.id, attempt = message.attempt,
                %error, retry_in = ?delay, "queue message failed; retrying"
            );
            Settlement::Retry { delay }
        }
        Err(error) => {
            tracing::error!(
                channel = %message.channel, id = %message.id, attempt = message.attempt,
                %error, "queue message failed for good; dead-lettered"
            );
            Settlement::DeadLetter {
                error: error.to_string(),
            }
        }
    };
    settle(&context, &delivery, &settlement).await;
    drop(slot);
}

/// Runs the handler in a task of its own, so a panic is a failed attempt and not a dead
/// consumer, under the message's timeout.
async fn run_handler(context: &ConsumerContext, delivery: &Delivery) -> Result<(), DeliveryError> {
    let cancel = context.abandon.child_token();
    let handler = Arc::clone(&context.handler);
    let message = delivery.message.clone();
    let token = cancel.clone();
    let mut task = tokio::spawn(async move { handler.process(message, token).await });
    match tokio::time::timeout(delivery.timeout, &mut task).await {
        Ok(Ok(result)) => result.map_err(DeliveryError::Handler),
        Ok(Err(join_error)) => Err(join_failure(join_error)),
        Err(_elapsed) => {
            cancel.cancel();
            task.abort();
            // Wait for the aborted future to be dropped, so what it holds is released before a
            // retry can start.
            if tokio::time::timeout(ABORT_GRACE, task).await.is_err() {
                tracing::warn!(
                    channel = %context.channel, id = %delivery.message.id,
                    "a timed-out queue handler did not stop; it blocks its thread without yielding"
                );
            }
            Err(DeliveryError::TimedOut(delivery.timeout))
        }
    }
}

fn join_failure(error: JoinError) -> DeliveryError {
    if !error.is_panic() {
        return DeliveryError::Cancelled;
    }
    let panic = error.into_panic();
    let text = panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".to_owned());
    DeliveryError::Panicked(text)
}

/// Settles with a few retries. Giving up is logged: in Redis the message stays pending and is
/// reclaimed after `reclaim_idle`, so it is delivered again rather than lost.
async fn settle(context: &ConsumerContext, delivery: &Delivery, settlement: &Settlement) {
    let mut pause = SETTLE_BACKOFF_MIN;
    for attempt in 1..=SETTLE_ATTEMPTS {
        let error = match context.settler.settle(delivery, settlement).await {
            Ok(()) => return,
            Err(error) => error,
        };
        if attempt == SETTLE_ATTEMPTS {
            tracing::error!(
                channel = %context.channel, id = %delivery.message.id, %error,
                "could not settle a queue message; it will be delivered again after reclaim"
            );
            return;
        }
        tracing::warn!(
            channel = %context.channel, id = %delivery.message.id, %error, retry_in = ?pause,
            "could not settle a queue message; retrying"
        );
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
}

/// A running consumer of one channel on this instance.
///
/// `close()` drains: it stops fetching and waits for the messages in flight to finish (each
/// within its timeout) and be settled. Dropping it stops fetching at once and fires the
/// in-flight handlers' tokens; those messages are still settled in the background by what the
/// handlers return.
pub struct QueueSubscription {
    channel: String,
    /// Stops the consumer loop.
    stop: CancellationToken,
    /// Parent of the handlers' tokens.
    abandon: CancellationToken,
    consumer: Option<JoinHandle<()>>,
    /// The loop's slots: all of them free again means nothing is in flight.
    slots: Arc<Semaphore>,
    total_slots: u32,
    /// Set by `close()` once drained, so the drop that follows does not fire tokens.
    drained: bool,
    _registration: Registration,
}

impl QueueSubscription {
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Stops fetching, waits for in-flight messages to finish (up to their timeouts), and
    /// settles (acks, retries or dead-letters) them.
    pub async fn close(mut self) {
        self.stop.cancel();
        if let Some(consumer) = self.consumer.take()
            && let Err(error) = consumer.await
        {
            tracing::error!(channel = %self.channel, %error, "event queue consumer task failed");
        }
        // Each delivery holds its slot until settled: having them all means drained.
        if self.slots.acquire_many(self.total_slots).await.is_err() {
            tracing::error!(channel = %self.channel, "event queue slots closed while draining");
        }
        self.drained = true;
    }
}

impl Drop for QueueSubscription {
    fn drop(&mut self) {
        self.stop.cancel();
        if !self.drained {
            self.abandon.cancel();
        }
    }
}

impl std::fmt::Debug for QueueSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSubscription")
            .field("channel", &self.channel)
            .field(
                "in_flight",
                &(self.total_slots as usize - self.slots.available_permits()),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_is_capped() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(10);
        let delays: Vec<u64> = (0..6)
            .map(|n| retry_delay(base, max, n).as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(
            retry_delay(base, max, 200),
            max,
            "no overflow on huge attempts"
        );
    }

    #[test]
    fn channels_that_collide_with_sibling_keys_are_rejected() {
        assert!(validate_channel("plugin-jobs").is_ok());
        assert!(validate_channel("jobs:42").is_ok());
        for bad in ["", "x:dead", "x:delayed"] {
            assert!(matches!(
                validate_channel(bad),
                Err(ClusterError::InvalidArgument(_))
            ));
        }
    }
}
