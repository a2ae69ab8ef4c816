//! A team (PostHog project) as every stage sees it: the columns of `posthog_team` that
//! ingestion and plugins read. How an event finds its team is `crate::ingest::teams`.

use uuid::Uuid;

/// The columns of `posthog_team` that ingestion and plugins read.
#[derive(Debug, Clone, PartialEq)]
pub struct Team {
    pub id: i64,
    pub uuid: Uuid,
    pub organization_id: Uuid,
    pub api_token: String,
    pub name: String,
    /// When set, `$ip` is never stored and the envelope's `ip` is dropped (spec 1.3, 1.7).
    pub anonymize_ips: bool,
    pub session_recording_opt_in: bool,
    pub ingested_event: bool,
    pub slack_incoming_webhook: Option<String>,
    pub timezone: String,
}
