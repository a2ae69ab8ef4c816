//! Plugin log entries and app metrics (spec 2.6), batched off the event path: into ClickHouse
//! (`plugin_log_entries`, `app_metrics`), or, where events go to Kafka for ClickHouse's
//! Kafka-engine tables (no `CLICKHOUSE_HOST`), to PostHog's topics `plugin_log_entries` and
//! `clickhouse_app_metrics` as JSON.
//!
//! Log entries are inserted every second (or at 1,000 entries). App metrics are summed per
//! (team, config, category, error type) and inserted every APP_METRICS_FLUSH_FREQUENCY_MS, as
//! PostHog does. A failed insert is logged and the rows dropped: these are diagnostics, and
//! holding events back for them would be the wrong trade.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clickhouse::Row;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::PluginLogEntry;

/// PostHog drops longer messages.
const MAX_MESSAGE_CHARS: usize = 50_000;
const LOG_BATCH: usize = 1_000;
const LOG_FLUSH: Duration = Duration::from_secs(1);

/// One outcome of one plugin method call, for app metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MethodOutcome {
    pub team_id: i64,
    pub plugin_config_id: i64,
    /// One of [`CATEGORIES`]: setupPlugin | processEvent | onEvent | exportEvents |
    /// composeWebhook | webhook | scheduledTask | job.
    pub category: &'static str,
    /// Events the call covered (exportEvents takes many at once).
    pub count: u64,
    /// A success after a RetryError (PostHog's `successes_on_retry`).
    pub on_retry: bool,
    /// `None` for a success.
    pub error_type: Option<String>,
}

/// The categories a method outcome may have, as `&'static str` again once it crossed from a
/// plugin worker process.
const CATEGORIES: [&str; 8] = [
    "setupPlugin",
    "processEvent",
    "onEvent",
    "exportEvents",
    "composeWebhook",
    "webhook",
    "scheduledTask",
    "job",
];

/// [`MethodOutcome`] as a plugin worker process sends it.
#[derive(serde::Deserialize)]
struct OutcomeFromWorker {
    team_id: i64,
    plugin_config_id: i64,
    category: String,
    count: u64,
    on_retry: bool,
    error_type: Option<String>,
}

impl<'de> serde::Deserialize<'de> for MethodOutcome {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::try_from(OutcomeFromWorker::deserialize(deserializer)?)
            .map_err(serde::de::Error::custom)
    }
}

impl TryFrom<OutcomeFromWorker> for MethodOutcome {
    type Error = String;

    fn try_from(outcome: OutcomeFromWorker) -> Result<Self, Self::Error> {
        let category = CATEGORIES
            .iter()
            .find(|known| **known == outcome.category)
            .ok_or_else(|| format!("unknown method outcome category {:?}", outcome.category))?;
        Ok(Self {
            team_id: outcome.team_id,
            plugin_config_id: outcome.plugin_config_id,
            category,
            count: outcome.count,
            on_retry: outcome.on_retry,
            error_type: outcome.error_type,
        })
    }
}

enum Record {
    Log(PluginLogEntry),
    Outcome(MethodOutcome),
}

/// A cheap handle; records go to a background task.
#[derive(Clone)]
pub struct PluginTelemetry {
    sender: mpsc::UnboundedSender<Record>,
}

/// Where log entries and app metrics go.
pub enum TelemetryDestination {
    ClickHouse(Box<clickhouse::Client>),
    /// PostHog's topics (with KAFKA_PREFIX), one JSON message per row, as its plugin server
    /// produces them.
    Kafka {
        producer: FutureProducer,
        logs_topic: String,
        metrics_topic: String,
    },
}

impl PluginTelemetry {
    /// Starts the writer task on the current runtime.
    pub fn start(
        destination: TelemetryDestination,
        instance_id: Uuid,
        app_metrics_flush: Duration,
    ) -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(receiver, destination, instance_id, app_metrics_flush));
        Self { sender }
    }

    pub fn log(&self, entry: PluginLogEntry) {
        if entry.message.chars().count() <= MAX_MESSAGE_CHARS {
            let _ = self.sender.send(Record::Log(entry));
        }
    }

    pub fn outcome(&self, outcome: MethodOutcome) {
        let _ = self.sender.send(Record::Outcome(outcome));
    }
}

#[derive(Row, Serialize)]
struct LogRow {
    #[serde(with = "clickhouse::serde::uuid")]
    id: Uuid,
    team_id: i64,
    plugin_id: i64,
    plugin_config_id: i64,
    #[serde(with = "clickhouse::serde::chrono::datetime")]
    timestamp: DateTime<Utc>,
    source: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    message: String,
    #[serde(with = "clickhouse::serde::uuid")]
    instance_id: Uuid,
    _offset: u64,
}

#[derive(Row, Serialize)]
struct MetricRow {
    #[serde(with = "clickhouse::serde::chrono::datetime")]
    timestamp: DateTime<Utc>,
    team_id: i64,
    plugin_config_id: i64,
    job_id: String,
    category: &'static str,
    successes: i64,
    successes_on_retry: i64,
    failures: i64,
    #[serde(with = "clickhouse::serde::uuid")]
    error_uuid: Uuid,
    error_type: String,
    error_details: String,
    _offset: u64,
}

type MetricKey = (i64, i64, &'static str, String);

async fn run(
    mut receiver: mpsc::UnboundedReceiver<Record>,
    destination: TelemetryDestination,
    instance_id: Uuid,
    app_metrics_flush: Duration,
) {
    let mut logs: Vec<LogRow> = Vec::new();
    let mut metrics: HashMap<MetricKey, Counts> = HashMap::new();
    let mut log_tick = tokio::time::interval(LOG_FLUSH);
    let mut metric_tick = tokio::time::interval(app_metrics_flush.max(Duration::from_millis(10)));
    loop {
        tokio::select! {
            record = receiver.recv() => match record {
                Some(Record::Log(entry)) => {
                    logs.push(LogRow {
                        id: Uuid::now_v7(),
                        team_id: entry.team_id,
                        plugin_id: entry.plugin_id,
                        plugin_config_id: entry.plugin_config_id,
                        timestamp: entry.timestamp,
                        source: entry.source.as_str(),
                        kind: entry.level.as_str(),
                        message: entry.message,
                        instance_id,
                        _offset: 0,
                    });
                    if logs.len() >= LOG_BATCH {
                        destination.write_logs(std::mem::take(&mut logs)).await;
                    }
                }
                Some(Record::Outcome(outcome)) => {
                    let key = (outcome.team_id, outcome.plugin_config_id, outcome.category, outcome.error_type.clone().unwrap_or_default());
                    let counts = metrics.entry(key).or_default();
                    let count = i64::try_from(outcome.count).unwrap_or(i64::MAX);
                    match (&outcome.error_type, outcome.on_retry) {
                        (Some(_), _) => counts.failures += count,
                        (None, true) => counts.successes_on_retry += count,
                        (None, false) => counts.successes += count,
                    }
                }
                None => {
                    destination.write_logs(std::mem::take(&mut logs)).await;
                    destination.write_metrics(metric_rows(std::mem::take(&mut metrics))).await;
                    return;
                }
            },
            _ = log_tick.tick() => destination.write_logs(std::mem::take(&mut logs)).await,
            _ = metric_tick.tick() => destination.write_metrics(metric_rows(std::mem::take(&mut metrics))).await,
        }
    }
}

#[derive(Default)]
struct Counts {
    successes: i64,
    successes_on_retry: i64,
    failures: i64,
}

fn metric_rows(metrics: HashMap<MetricKey, Counts>) -> Vec<MetricRow> {
    let now = Utc::now();
    metrics
        .into_iter()
        .map(
            |((team_id, plugin_config_id, category, error_type), counts)| MetricRow {
                timestamp: now,
                team_id,
                plugin_config_id,
                job_id: String::new(),
                category,
                successes: counts.successes,
                successes_on_retry: counts.successes_on_retry,
                failures: counts.failures,
                error_uuid: Uuid::nil(),
                error_type,
                error_details: String::new(),
                _offset: 0,
            },
        )
        .collect()
}

impl TelemetryDestination {
    async fn write_logs(&self, rows: Vec<LogRow>) {
        match self {
            Self::ClickHouse(client) => insert(client, "plugin_log_entries", rows).await,
            Self::Kafka {
                producer,
                logs_topic,
                ..
            } => {
                let messages = rows.iter().map(log_json).collect();
                produce(producer, logs_topic, messages).await;
            }
        }
    }

    async fn write_metrics(&self, rows: Vec<MetricRow>) {
        match self {
            Self::ClickHouse(client) => insert(client, "app_metrics", rows).await,
            Self::Kafka {
                producer,
                metrics_topic,
                ..
            } => {
                let messages = rows.iter().map(metric_json).collect();
                produce(producer, metrics_topic, messages).await;
            }
        }
    }
}

/// ClickHouse's `DateTime64(6)` as PostHog's Kafka messages write it.
fn clickhouse_time(time: &DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

/// PostHog's `plugin_log_entries` message.
fn log_json(row: &LogRow) -> String {
    json!({
        "id": row.id.to_string(),
        "team_id": row.team_id,
        "plugin_id": row.plugin_id,
        "plugin_config_id": row.plugin_config_id,
        "timestamp": clickhouse_time(&row.timestamp),
        "source": row.source,
        "type": row.kind,
        "message": row.message,
        "instance_id": row.instance_id.to_string(),
    })
    .to_string()
}

/// PostHog's `clickhouse_app_metrics` message.
fn metric_json(row: &MetricRow) -> String {
    json!({
        "timestamp": clickhouse_time(&row.timestamp),
        "team_id": row.team_id,
        "plugin_config_id": row.plugin_config_id,
        "job_id": row.job_id,
        "category": row.category,
        "successes": row.successes,
        "successes_on_retry": row.successes_on_retry,
        "failures": row.failures,
        "error_uuid": row.error_uuid.to_string(),
        "error_type": row.error_type,
        "error_details": row.error_details,
    })
    .to_string()
}

/// Sends `messages` and waits for the broker's acknowledgements; failures are logged and the
/// messages dropped, as a failed ClickHouse insert's rows are.
async fn produce(producer: &FutureProducer, topic: &str, messages: Vec<String>) {
    if messages.is_empty() {
        return;
    }
    let count = messages.len();
    let deliveries = messages.iter().map(|message| {
        producer.send(
            FutureRecord::<(), str>::to(topic).payload(message.as_str()),
            Duration::from_secs(30),
        )
    });
    let failed = futures::future::join_all(deliveries)
        .await
        .into_iter()
        .filter_map(Result::err)
        .map(|(error, _)| error)
        .last();
    if let Some(error) = failed {
        tracing::warn!(topic, count, %error, "Could not send plugin telemetry; these messages are dropped.");
    }
}

async fn insert<R>(client: &clickhouse::Client, table: &str, rows: Vec<R>)
where
    R: for<'a> clickhouse::RowWrite<Value<'a> = R>,
{
    if rows.is_empty() {
        return;
    }
    let count = rows.len();
    let result = async {
        let mut insert = client.insert::<R>(table).await?;
        for row in &rows {
            insert.write(row).await?;
        }
        insert.end().await
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(table, count, %error, "Could not store plugin telemetry; these rows are dropped.");
    }
}
