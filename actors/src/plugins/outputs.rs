//! Where the server sends what plugins produce besides events (from any tokio task: the
//! post-ingestion consumer runs outside actix): `posthog.capture` events back
//! into ingestion, config errors to `posthog_pluginconfig`, console output to the log, the
//! webhooks `composeWebhook` composed, and RetryError retries back to the queue.

use std::sync::{Arc, OnceLock};

use chrono::{SecondsFormat, Utc};
use deadpool_postgres::Pool;
use serde_json::{Value, json};
use tokio_postgres::types::ToSql;

use crate::event::envelope::Envelope;
use crate::event::intake::{CapturedEvent, EventIntake};
use crate::plugins::host_services::{FetchError, PluginHttp};
use crate::plugins::post_ingestion::PostIngestionPublisher;
use crate::plugins::runtime::VmIdentity;
use crate::plugins::runtime::natives::FetchRequest;
use crate::plugins::telemetry::{MethodOutcome, PluginTelemetry};
use crate::plugins::worker::{ConfigError, ConfigFailure, SideEffects};

/// Why a composed webhook was not delivered.
#[derive(Debug, thiserror::Error)]
enum WebhookFailure {
    #[error("HTTP {status} {status_text}")]
    Status { status: u16, status_text: String },
    #[error(transparent)]
    Fetch(FetchError),
}

/// Where the pool sends what plugins produce besides events; [`ServerOutputs`] in the server.
pub trait PluginOutputs: Send + Sync {
    fn side_effects(&self, side: SideEffects);
}

pub struct ServerOutputs {
    /// Set once the intake exists (it is built after the pipeline that needs these outputs).
    intake: OnceLock<Arc<dyn EventIntake>>,
    postgres: Option<Pool>,
    /// ClickHouse `plugin_log_entries` and `app_metrics`, when ClickHouse is configured.
    telemetry: Option<PluginTelemetry>,
    /// Set once the pool and the queue exist: where webhooks and retries go.
    delivery: OnceLock<(PostIngestionPublisher, PluginHttp)>,
}

impl ServerOutputs {
    pub fn new(postgres: Option<Pool>, telemetry: Option<PluginTelemetry>) -> Self {
        Self {
            intake: OnceLock::new(),
            postgres,
            telemetry,
            delivery: OnceLock::new(),
        }
    }

    pub fn set_delivery(&self, publisher: PostIngestionPublisher, http: PluginHttp) {
        let _ = self.delivery.set((publisher, http));
    }

    /// Sends a composed webhook; the delivery is app metric `webhook`.
    fn send_webhook(&self, http: &PluginHttp, identity: VmIdentity, request: FetchRequest) {
        let http = http.clone();
        let telemetry = self.telemetry.clone();
        tokio::spawn(async move {
            let url = request.url.clone();
            let error = match http.send(request).await {
                Ok(reply) if reply.status < 400 => None,
                Ok(reply) => Some(WebhookFailure::Status {
                    status: reply.status,
                    status_text: reply.status_text,
                }),
                Err(error) => Some(WebhookFailure::Fetch(error)),
            };
            if let Some(error) = &error {
                tracing::warn!(team_id = identity.team_id, plugin_config_id = identity.plugin_config_id, %url, %error, "A plugin's webhook failed.");
            }
            if let Some(telemetry) = telemetry {
                telemetry.outcome(MethodOutcome {
                    team_id: identity.team_id,
                    plugin_config_id: identity.plugin_config_id,
                    category: "webhook",
                    count: 1,
                    on_retry: false,
                    error_type: error.map(|_| "WebhookError".to_owned()),
                });
            }
        });
    }

    pub fn set_intake(&self, intake: Arc<dyn EventIntake>) {
        let _ = self.intake.set(intake);
    }
}

impl PluginOutputs for ServerOutputs {
    fn side_effects(&self, side: SideEffects) {
        match self.delivery.get() {
            Some((publisher, http)) => {
                for (identity, request) in side.webhooks {
                    self.send_webhook(http, identity, request);
                }
                for retry in side.retries {
                    let publisher = publisher.clone();
                    tokio::spawn(async move { publisher.publish_retry(retry).await });
                }
            }
            None if !side.webhooks.is_empty() || !side.retries.is_empty() => tracing::error!(
                webhooks = side.webhooks.len(),
                retries = side.retries.len(),
                "Plugin webhooks and retries were lost: post-ingestion delivery is not set up."
            ),
            None => {}
        }
        if let Some(telemetry) = &self.telemetry {
            for outcome in side.outcomes {
                telemetry.outcome(outcome);
            }
        }
        for entry in side.logs {
            tracing::info!(
                target: "plugin_log",
                team_id = entry.team_id,
                plugin_id = entry.plugin_id,
                plugin_config_id = entry.plugin_config_id,
                source = entry.source.as_str(),
                level = entry.level.as_str(),
                "{}",
                entry.message
            );
            if let Some(telemetry) = &self.telemetry {
                telemetry.log(entry);
            }
        }
        if !side.captures.is_empty() {
            match self.intake.get() {
                Some(intake) => {
                    let events = side
                        .captures
                        .iter()
                        .map(|(identity, captured)| {
                            capture_envelope(
                                identity.team_id,
                                &identity.plugin_name,
                                &captured.event,
                                &captured.properties,
                            )
                        })
                        .collect::<Vec<_>>();
                    let intake = Arc::clone(intake);
                    tokio::spawn(async move {
                        let count = events.len();
                        if let Err(error) = intake.submit(events).await {
                            tracing::error!(count, %error, "Events a plugin captured could not be ingested.");
                        }
                    });
                }
                None => tracing::error!(
                    count = side.captures.len(),
                    "Events a plugin captured were lost: no intake yet."
                ),
            }
        }
        if let Some(pool) = &self.postgres {
            for (identity, capabilities) in side.capabilities {
                let pool = pool.clone();
                tokio::spawn(async move {
                    // Written only when they changed, as PostHog does, so that a fleet building
                    // VMs does not rewrite the row each time.
                    let result = execute(
                        &pool,
                        "UPDATE posthog_plugin SET capabilities = $2 \
                         WHERE id = $1 AND capabilities IS DISTINCT FROM $2",
                        &[&(identity.plugin_id as i32), &capabilities],
                    )
                    .await;
                    if let Err(error) = result {
                        tracing::error!(plugin_id = identity.plugin_id, %error, "Could not record a plugin's capabilities.");
                    }
                });
            }
            for ConfigError {
                identity,
                message,
                failure,
            } in side.config_errors
            {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let error = json!({"message": message, "time": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)});
                    let statement = match failure {
                        ConfigFailure::Disabled => {
                            "UPDATE posthog_pluginconfig SET error = $2, enabled = false WHERE id = $1"
                        }
                        ConfigFailure::Reported => {
                            "UPDATE posthog_pluginconfig SET error = $2 WHERE id = $1"
                        }
                    };
                    let result = execute(
                        &pool,
                        statement,
                        &[&(identity.plugin_config_id as i32), &error],
                    )
                    .await;
                    if let Err(error) = result {
                        tracing::error!(plugin_config_id = identity.plugin_config_id, %error, "Could not record a plugin config's error.");
                    }
                });
            }
        } else {
            for error in side.config_errors {
                tracing::error!(plugin_config_id = error.identity.plugin_config_id, plugin = %error.identity.plugin_name, failure = ?error.failure, "Plugin config failed: {}", error.message);
            }
        }
    }
}

/// Why a plugin's capabilities or a config's error were not recorded.
#[derive(Debug, thiserror::Error)]
enum RecordError {
    #[error(transparent)]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Query(#[from] tokio_postgres::Error),
}

/// Runs one statement on a connection of the pool.
async fn execute(
    pool: &Pool,
    statement: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<(), RecordError> {
    pool.get().await?.execute(statement, params).await?;
    Ok(())
}

/// PostHog's `posthog.capture` envelope: the plugin's name is the default distinct id and
/// `$lib` says where the event came from.
fn capture_envelope(
    team_id: i64,
    plugin_name: &str,
    event: &str,
    properties: &Value,
) -> CapturedEvent {
    let mut properties = properties.as_object().cloned().unwrap_or_default();
    let distinct_id = properties
        .get("distinct_id")
        .and_then(Value::as_str)
        .map_or_else(|| plugin_name.to_string(), str::to_string);
    properties.insert("$lib".into(), Value::String("posthog-plugin-server".into()));
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let data = json!({"event": event, "distinct_id": distinct_id, "properties": properties, "timestamp": now});
    let envelope = Envelope {
        uuid: uuid::Uuid::now_v7().to_string(),
        distinct_id: &distinct_id,
        ip: None,
        site_url: "",
        data: data.to_string(),
        now: &now,
        sent_at: &now,
        token: None,
        team_id: Some(team_id),
    };
    CapturedEvent {
        key: envelope.kafka_key(),
        // Serializing strings and numbers cannot fail; an empty payload would be dead-lettered.
        payload: envelope.encode().unwrap_or_default(),
    }
}
