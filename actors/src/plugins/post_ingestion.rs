//! Post-ingestion plugin work (spec 1.11): once a batch is stored, its events go through the
//! cluster `EventQueue` to `onEvent`, `composeWebhook` and `exportEvents`, so that a slow or
//! failing destination never holds up ingestion.
//!
//! - The pipeline publishes, after the writer acknowledged a batch, one message per team whose
//!   plugins have such a method: `{team_id, events}` with the events as plugins see them.
//! - Any instance consuming the channel runs them in the `PluginVmPool`. With Redis the queue is
//!   durable and shared; in the embedded profile it is in-process.
//! - `RetryError` comes back as a message for one config and method (`target`), published with
//!   PostHog's delay (onEvent 5 s × 2ⁿ⁻¹ up to 5 attempts, exportEvents 6/12/24 s).
//! - Export buffers are flushed by a ticker when `exportEventsBufferSeconds` has passed, and
//!   all of them at shutdown.
//!
//! A message is acked once the pool answered, whatever the plugins did (their failures are app
//! metrics and log entries). It comes back only if its worker was replaced mid-call, so
//! delivery is at least once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus::{IntCounterVec, Opts};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::cluster::ClusterError;
use crate::cluster::event_queue::{
    EventQueue, HandlerError, PublishOptions, QueueHandler, QueueMessage, QueueSubscription,
    SubscribeOptions,
};
use crate::event::EventRow;
use crate::plugins::pool::{PluginVmPool, PoolError};
use crate::plugins::post_ingestion_messages::{AsyncRetry, AsyncTarget, StoredEvents};
use crate::system::metrics::{Metrics, MetricsError};

/// The queue channel of post-ingestion work.
pub const CHANNEL: &str = "plugin-server:post-ingestion";
/// One message may run every config of a team over a whole batch; past this it is presumed
/// lost and delivered again.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Re-deliveries of a message whose worker went away (plugin retries are messages of their own).
const MESSAGE_RETRIES: u32 = 2;
/// How often export buffers are checked against `exportEventsBufferSeconds`.
const EXPORT_TICK: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize, Deserialize)]
struct PostIngestionMessage {
    team_id: i64,
    #[serde(flatten)]
    events: StoredEvents,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<AsyncTarget>,
}

/// Stored events of a batch that plugins want to see, by team.
#[derive(Debug, Default)]
pub struct FollowUp(HashMap<i64, StoredEvents>);

impl FollowUp {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Publishes post-ingestion work; cheap to clone.
#[derive(Clone)]
pub struct PostIngestionPublisher {
    queue: Arc<dyn EventQueue>,
    published: IntCounterVec,
}

impl PostIngestionPublisher {
    pub fn new(queue: Arc<dyn EventQueue>, metrics: &Metrics) -> Result<Self, MetricsError> {
        let published = IntCounterVec::new(
            Opts::new(
                "plugin_post_ingestion_messages_total",
                "Post-ingestion messages (onEvent, composeWebhook, exportEvents) by kind and outcome of publishing",
            ),
            &["kind", "outcome"],
        )?;
        metrics.registry().register(Box::new(published.clone()))?;
        Ok(Self { queue, published })
    }

    async fn publish(
        &self,
        message: &PostIngestionMessage,
        delay: Option<Duration>,
    ) -> Result<(), ClusterError> {
        let kind = if message.target.is_some() {
            "retry"
        } else {
            "events"
        };
        let payload = serde_json::to_value(message)
            .map_err(|e| ClusterError::InvalidArgument(e.to_string()))?;
        let options = PublishOptions {
            timeout: MESSAGE_TIMEOUT,
            max_retries: MESSAGE_RETRIES,
            delay,
        };
        let result = self.queue.publish(CHANNEL, payload, options).await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.published.with_label_values(&[kind, outcome]).inc();
        result.map(|_| ())
    }

    /// The rows of teams with post-ingestion methods, as plugins see them, by team. Taken
    /// before the rows go to the writer; published once it has stored them.
    pub fn follow_up(pool: &PluginVmPool, rows: &[EventRow]) -> FollowUp {
        let mut by_team: HashMap<i64, StoredEvents> = HashMap::new();
        // Per team: `None` when it wants no events, else whether its webhook filters need
        // persons.
        let mut wanted: HashMap<i64, Option<bool>> = HashMap::new();
        // A batch's rows come in runs of one team: most rows reuse the last answer.
        let mut last: Option<(i64, Option<bool>)> = None;
        for row in rows {
            let needs = match last {
                Some((team_id, needs)) if team_id == row.team_id => needs,
                _ => {
                    let needs = *wanted
                        .entry(row.team_id)
                        .or_insert_with(|| pool.follow_up_needs(row.team_id));
                    last = Some((row.team_id, needs));
                    needs
                }
            };
            if let Some(with_persons) = needs {
                by_team
                    .entry(row.team_id)
                    .or_default()
                    .push(row, with_persons);
            }
        }
        FollowUp(by_team)
    }

    /// Publishes a stored batch's follow-up, one message per team. The first failure stops it
    /// and fails the batch, so that its offsets are not committed: the batch is retried (its
    /// rows written again collapse in ClickHouse) and no plugin loses the events of a queue
    /// outage; teams published before the failure see those events again (at least once).
    pub async fn publish_stored(&self, follow_up: FollowUp) -> Result<(), ClusterError> {
        for (team_id, events) in follow_up.0 {
            let count = events.events.len();
            let message = PostIngestionMessage {
                team_id,
                events,
                target: None,
            };
            if let Err(error) = self.publish(&message, None).await {
                tracing::warn!(team_id, count, %error, "Stored events could not be queued for onEvent, composeWebhook and exportEvents; the batch will be retried.");
                return Err(error);
            }
        }
        Ok(())
    }

    /// Queues a RetryError retry for later.
    pub async fn publish_retry(&self, retry: AsyncRetry) {
        let count = retry.events.len();
        let message = PostIngestionMessage {
            team_id: retry.team_id,
            events: retry.events.into(),
            target: Some(retry.target),
        };
        if let Err(error) = self.publish(&message, Some(retry.delay)).await {
            tracing::error!(team_id = retry.team_id, plugin_config_id = retry.target.plugin_config_id, count, %error, "A plugin's retry could not be queued; its events are dropped.");
        }
    }
}

struct Consumer {
    pool: PluginVmPool,
}

/// Why a post-ingestion message was not run; the queue retries it or dead-letters it.
#[derive(Debug, thiserror::Error)]
enum ConsumeError {
    #[error("not a post-ingestion message: {0}")]
    NotAMessage(#[source] serde_json::Error),
    #[error(transparent)]
    Pool(#[from] PoolError),
}

#[async_trait]
impl QueueHandler for Consumer {
    async fn process(
        &self,
        message: QueueMessage,
        _: CancellationToken,
    ) -> Result<(), HandlerError> {
        let message: PostIngestionMessage =
            serde_json::from_value(message.payload).map_err(ConsumeError::NotAMessage)?;
        self.pool
            .run_async(message.team_id, message.events, message.target)
            .await
            .map_err(ConsumeError::from)?;
        Ok(())
    }
}

/// This instance's consumer of post-ingestion work and its export ticker.
pub struct PostIngestionConsumer {
    subscription: QueueSubscription,
    ticker: CancellationToken,
    pool: PluginVmPool,
}

impl PostIngestionConsumer {
    /// Subscribes with as many messages in flight as the pool has request slots.
    pub async fn start(
        queue: &Arc<dyn EventQueue>,
        pool: PluginVmPool,
        concurrency: usize,
    ) -> Result<Self, ClusterError> {
        let options = SubscribeOptions {
            concurrency: concurrency.max(1),
            reclaim_idle: MESSAGE_TIMEOUT + Duration::from_secs(60),
            ..SubscribeOptions::default()
        };
        let subscription = queue
            .subscribe(CHANNEL, Arc::new(Consumer { pool: pool.clone() }), options)
            .await?;
        let ticker = CancellationToken::new();
        actix::spawn({
            let pool = pool.clone();
            let stop = ticker.clone();
            async move {
                let mut tick = tokio::time::interval(EXPORT_TICK);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = tick.tick() => pool.flush_exports(false).await,
                    }
                }
            }
        });
        Ok(Self {
            subscription,
            ticker,
            pool,
        })
    }

    /// Stops consuming (messages in flight finish) and exports every buffer.
    pub async fn stop(self) {
        self.ticker.cancel();
        self.subscription.close().await;
        self.pool.flush_exports(true).await;
    }
}
