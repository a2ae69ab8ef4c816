//! Where HTTP capture hands events: to the pipeline directly (embedded profile) or to the
//! Kafka topic the consumer reads (cluster profile, durable first like PostHog's capture).

use async_trait::async_trait;

/// One captured event in the Kafka envelope shape of spec 1.1: a JSON object with
/// `distinct_id`, `ip`, `site_url`, `token`, `now`, `sent_at`, `uuid` and `data` (the event
/// itself, as a JSON string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedEvent {
    /// Kafka message key, `<token>:<distinct_id>` as PostHog's capture uses, so that the events
    /// of one person stay in order within a partition.
    pub key: String,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The events were not accepted; the client should retry (HTTP 503).
    #[error("events could not be accepted: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait EventIntake: Send + Sync + 'static {
    /// Returns once the events are durable: produced and acknowledged by Kafka, or stored by
    /// the writer in the embedded profile. Bad events are not an error here: the pipeline
    /// dead-letters them.
    async fn submit(&self, events: Vec<CapturedEvent>) -> Result<(), IntakeError>;
}
