//! `ActionHooks`: the actions whose matches post to their team's Slack (or Discord, Teams,
//! any) incoming webhook, and the posting.
//!
//! The actions of every team with `slack_incoming_webhook` set (`posthog_action.post_to_slack`,
//! not deleted, with their `posthog_actionstep`s) are loaded at start, every 5 minutes, and at
//! once when PostHog's app publishes on `reload-action` or `drop-action`, as PostHog reloads
//! them. Stored events of those teams are matched after the writer stored them, off the
//! ingestion path, and each match is posted once; a failed post is logged and counted, as
//! PostHog's hooks do, and never holds up ingestion.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use deadpool_postgres::Pool;
use prometheus::{IntCounterVec, Opts};
use serde_json::{Map, Value, json};
use tokio_postgres::types::Json;
use tokio_util::sync::CancellationToken;

use super::format::{MessageEvent, WebhookKind, message, payload};
use super::matcher::{Action, ActionStep, StepRow};
use crate::cluster::ClusterError;
use crate::cluster::pubsub::{PubSub, SubscribeOptions};
use crate::event::EventRow;
use crate::event::elements::chain_to_elements;
use crate::system::metrics::{Metrics, MetricsError};

/// PostHog's channels for a changed or deleted action (`{teamId, actionId}`).
pub const RELOAD_ACTION_CHANNEL: &str = "reload-action";
pub const DROP_ACTION_CHANNEL: &str = "drop-action";

#[derive(Debug, Clone)]
pub struct ActionHooksConfig {
    /// SITE_URL: where the messages' links point.
    pub site_url: String,
    pub reload_every: Duration,
    /// EXTERNAL_REQUEST_TIMEOUT_MS.
    pub request_timeout: Duration,
}

/// One team's webhook and its posting actions.
struct TeamHooks {
    webhook: String,
    actions: Vec<Action>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActionHooksError {
    #[error("loading actions failed (check DATABASE_URL): {0}")]
    Load(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("the webhook client could not be built: {0}")]
    Client(String),
}

pub struct ActionHooks {
    pool: Pool,
    config: ActionHooksConfig,
    teams: ArcSwap<HashMap<i64, TeamHooks>>,
    client: reqwest::Client,
    posted: IntCounterVec,
    stop: CancellationToken,
}

impl Drop for ActionHooks {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Whether PostHog's schema keeps the steps in `posthog_action.steps_json` (2024 and later).
const HAS_STEPS_JSON: &str = "SELECT 1 FROM information_schema.columns \
     WHERE table_schema = current_schema() AND table_name = 'posthog_action' \
     AND column_name = 'steps_json'";

const SELECT_ACTIONS_WITH_STEPS_JSON: &str = "SELECT a.id, a.team_id, \
     coalesce(a.name, '') AS name, coalesce(a.slack_message_format, '') AS slack_message_format, \
     t.slack_incoming_webhook, a.steps_json \
     FROM posthog_action a JOIN posthog_team t ON t.id = a.team_id \
     WHERE a.post_to_slack AND NOT a.deleted \
       AND coalesce(t.slack_incoming_webhook, '') <> '' \
     ORDER BY a.id";

const SELECT_ACTIONS: &str = "SELECT a.id, a.team_id, coalesce(a.name, '') AS name, \
     coalesce(a.slack_message_format, '') AS slack_message_format, t.slack_incoming_webhook, \
     s.id AS step_id, s.event, s.url, s.url_matching, s.tag_name, s.text, s.href, s.selector, s.properties \
     FROM posthog_action a \
     JOIN posthog_team t ON t.id = a.team_id \
     LEFT JOIN posthog_actionstep s ON s.action_id = a.id \
     WHERE a.post_to_slack AND NOT a.deleted \
       AND coalesce(t.slack_incoming_webhook, '') <> '' \
     ORDER BY a.id, s.id";

impl ActionHooks {
    /// Loads the actions, then keeps them current in the background until dropped.
    pub async fn start(
        pool: Pool,
        pubsub: &PubSub,
        config: ActionHooksConfig,
        metrics: &Metrics,
    ) -> Result<Arc<Self>, ActionHooksError> {
        let posted = IntCounterVec::new(
            Opts::new(
                "action_webhooks_total",
                "Action matches posted to their team's webhook, by outcome (sent, failed).",
            ),
            &["outcome"],
        )
        .map_err(MetricsError::from)?;
        metrics
            .registry()
            .register(Box::new(posted.clone()))
            .map_err(MetricsError::from)?;
        let client = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .build()
            .map_err(|error| ActionHooksError::Client(error.to_string()))?;
        let mut reloads = pubsub
            .subscribe_foreign(RELOAD_ACTION_CHANNEL, SubscribeOptions::default())
            .await?;
        let mut drops = pubsub
            .subscribe_foreign(DROP_ACTION_CHANNEL, SubscribeOptions::default())
            .await?;
        let hooks = Arc::new(Self {
            pool,
            teams: ArcSwap::from_pointee(HashMap::new()),
            client,
            posted,
            stop: CancellationToken::new(),
            config,
        });
        // Actions are an extra: a database whose tables this server cannot read (a PostHog
        // schema it does not know) leaves them off until a reload succeeds, not the server down.
        if let Err(error) = hooks.reload().await {
            tracing::warn!(%error, "actions not loaded; action webhooks are off until a reload succeeds");
        }
        let weak = Arc::downgrade(&hooks);
        let (stop, every) = (hooks.stop.clone(), hooks.config.reload_every);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                    notice = reloads.recv() => if notice.is_none() { return },
                    notice = drops.recv() => if notice.is_none() { return },
                }
                let Some(hooks) = weak.upgrade() else {
                    return;
                };
                if let Err(error) = hooks.reload().await {
                    tracing::warn!(%error, "actions not reloaded; the previous ones stay");
                }
            }
        });
        Ok(hooks)
    }

    async fn reload(&self) -> Result<(), ActionHooksError> {
        let teams = load_actions(&self.pool).await?;
        let count: usize = teams.values().map(|team| team.actions.len()).sum();
        tracing::debug!(teams = teams.len(), actions = count, "actions loaded");
        self.teams.store(Arc::new(teams));
        Ok(())
    }

    /// The rows of teams whose actions may post, to pass to [`Self::fire`] once stored.
    pub fn select(&self, rows: &[EventRow]) -> Vec<EventRow> {
        let teams = self.teams.load();
        if teams.is_empty() {
            return Vec::new();
        }
        rows.iter()
            .filter(|row| teams.contains_key(&row.team_id))
            .cloned()
            .collect()
    }

    /// Matches stored `rows` and posts each match, in the background.
    pub fn fire(self: &Arc<Self>, rows: Vec<EventRow>) {
        if rows.is_empty() {
            return;
        }
        let hooks = Arc::clone(self);
        tokio::spawn(async move {
            for row in rows {
                hooks.post_matches(&row).await;
            }
        });
    }

    async fn post_matches(&self, row: &EventRow) {
        let teams = self.teams.load();
        let Some(team) = teams.get(&row.team_id) else {
            return;
        };
        let properties = match serde_json::from_str::<Value>(&row.properties) {
            Ok(Value::Object(properties)) => properties,
            _ => Map::new(),
        };
        let person_properties = match serde_json::from_str::<Value>(&row.person_properties) {
            Ok(Value::Object(person)) => Some(person),
            _ => None,
        };
        let event = json!({
            "event": row.event,
            "distinct_id": row.distinct_id,
            "properties": properties,
            "elements": chain_to_elements(&row.elements_chain),
        });
        let kind = WebhookKind::of(&team.webhook);
        let uuid = row.uuid.to_string();
        for action in &team.actions {
            if !action.matches(&event, person_properties.as_ref()) {
                continue;
            }
            let (text, markdown) = message(
                action,
                &MessageEvent {
                    name: &row.event,
                    uuid: &uuid,
                    distinct_id: &row.distinct_id,
                    properties: &properties,
                    person_properties: person_properties.as_ref(),
                },
                &self.config.site_url,
                kind,
            );
            let sent = self
                .client
                .post(&team.webhook)
                .json(&payload(kind, &text, &markdown))
                .send()
                .await
                .and_then(reqwest::Response::error_for_status);
            match sent {
                Ok(_) => self.posted.with_label_values(&["sent"]).inc(),
                Err(error) => {
                    self.posted.with_label_values(&["failed"]).inc();
                    tracing::warn!(action_id = action.id, team_id = row.team_id, %error, "action webhook not delivered");
                }
            }
        }
    }
}

fn load_error(error: &dyn std::fmt::Display) -> ActionHooksError {
    ActionHooksError::Load(error.to_string())
}

/// Every posting action, by team, with the team's webhook.
async fn load_actions(pool: &Pool) -> Result<HashMap<i64, TeamHooks>, ActionHooksError> {
    let client = pool.get().await.map_err(|error| load_error(&error))?;
    let steps_json = client
        .query_opt(HAS_STEPS_JSON, &[])
        .await
        .map_err(|error| load_error(&error))?
        .is_some();
    let query = if steps_json {
        SELECT_ACTIONS_WITH_STEPS_JSON
    } else {
        SELECT_ACTIONS
    };
    let rows = client
        .query(query, &[])
        .await
        .map_err(|error| load_error(&error))?;
    let read = |error: tokio_postgres::Error| load_error(&error);
    let mut teams: HashMap<i64, TeamHooks> = HashMap::new();
    for row in rows {
        let id = i64::from(row.try_get::<_, i32>("id").map_err(read)?);
        let team_id = i64::from(row.try_get::<_, i32>("team_id").map_err(read)?);
        let team = teams.entry(team_id).or_insert_with(|| TeamHooks {
            webhook: row.try_get("slack_incoming_webhook").unwrap_or_default(),
            actions: Vec::new(),
        });
        if team.actions.last().is_none_or(|action| action.id != id) {
            team.actions.push(Action {
                id,
                team_id,
                name: row.try_get("name").map_err(read)?,
                message_format: row.try_get("slack_message_format").map_err(read)?,
                steps: Vec::new(),
            });
        }
        let steps: Vec<StepRow> = if steps_json {
            match row
                .try_get::<_, Option<Json<Value>>>("steps_json")
                .map_err(read)?
            {
                Some(Json(Value::Array(steps))) => steps.iter().map(StepRow::from_json).collect(),
                _ => Vec::new(),
            }
        } else if row
            .try_get::<_, Option<i32>>("step_id")
            .map_err(read)?
            .is_some()
        {
            vec![StepRow {
                event: row.try_get("event").map_err(read)?,
                url: row.try_get("url").map_err(read)?,
                url_matching: row.try_get("url_matching").map_err(read)?,
                tag_name: row.try_get("tag_name").map_err(read)?,
                text: row.try_get("text").map_err(read)?,
                href: row.try_get("href").map_err(read)?,
                selector: row.try_get("selector").map_err(read)?,
                properties: row
                    .try_get::<_, Option<Json<Value>>>("properties")
                    .map_err(read)?
                    .map(|Json(properties)| properties),
            }]
        } else {
            // An action without steps (the LEFT JOIN gives NULLs) matches nothing.
            Vec::new()
        };
        if let Some(action) = team.actions.last_mut() {
            action
                .steps
                .extend(steps.into_iter().map(ActionStep::prepare));
        }
    }
    Ok(teams)
}

#[cfg(all(test, feature = "integration-tests"))]
mod tests {
    use serde_json::json;

    use super::*;

    async fn database(name: &str) -> Pool {
        let (pool, _) = crate::test_support::fresh_postgres(&format!("ps_actions_{name}")).await;
        crate::test_support::insert_teams(&pool, &[2, 3]).await;
        pool.get()
            .await
            .expect("connection")
            .batch_execute(
                "UPDATE posthog_team SET slack_incoming_webhook = 'https://hooks.slack.com/x' WHERE id = 2;
                 INSERT INTO posthog_action (id, name, team_id, post_to_slack) VALUES
                   (1, 'Signed up', 2, true), (2, 'Deleted', 2, true), (3, 'Quiet', 2, false),
                   (4, 'No webhook', 3, true);
                 UPDATE posthog_action SET deleted = true WHERE id = 2;",
            )
            .await
            .expect("actions");
        pool
    }

    fn signup() -> Value {
        json!({"event": "signup", "properties": {}, "elements": []})
    }

    /// Only teams with a webhook, only posting actions that are not deleted; steps from
    /// `posthog_actionstep` (PostHog 2023).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn actions_load_with_their_steps_from_actionstep() {
        let pool = database("steps").await;
        pool.get()
            .await
            .expect("connection")
            .batch_execute(
                "INSERT INTO posthog_actionstep (action_id, event) VALUES (1, 'signup'), (1, 'login');",
            )
            .await
            .expect("steps");
        let teams = load_actions(&pool).await.expect("loaded");
        assert_eq!(teams.keys().copied().collect::<Vec<_>>(), [2]);
        let actions = &teams[&2].actions;
        assert_eq!(actions.iter().map(|a| a.id).collect::<Vec<_>>(), [1]);
        assert_eq!(actions[0].steps.len(), 2);
        assert!(actions[0].matches(&signup(), None));
    }

    /// PostHog 2024 and later keep the steps in `posthog_action.steps_json`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn actions_load_their_steps_from_steps_json_where_the_schema_has_it() {
        let pool = database("steps_json").await;
        pool.get()
            .await
            .expect("connection")
            .batch_execute(
                "ALTER TABLE posthog_action ADD COLUMN steps_json jsonb;
                 UPDATE posthog_action SET steps_json = '[{\"event\": \"signup\", \"url\": null}]' WHERE id = 1;",
            )
            .await
            .expect("steps_json");
        let teams = load_actions(&pool).await.expect("loaded");
        let action = &teams[&2].actions[0];
        assert_eq!(action.steps.len(), 1);
        assert!(action.matches(&signup(), None));
        assert!(!action.matches(&json!({"event": "login"}), None));
    }
}
