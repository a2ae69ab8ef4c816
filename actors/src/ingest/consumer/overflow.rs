//! Overflow rerouting (spec 1.2, with INGESTION_OVERFLOW_ENABLED): one hot distinct id must not
//! hold up the partition it shares with everyone else. Each `team_id|token:distinct_id` has a
//! token bucket of EVENT_OVERFLOW_BUCKET_CAPACITY events, refilled at
//! EVENT_OVERFLOW_BUCKET_REPLENISH_RATE per second; a message over its bucket, or one without a
//! Kafka key (capture's way of asking for overflow), is produced unchanged to the overflow topic,
//! which the `ingestion-overflow` capability consumes with the same pipeline.
//!
//! The batch's offsets are stored only once its overflow messages are acknowledged by Kafka
//! and the rest is stored, so a message is never lost between the two topics.

use std::num::NonZeroUsize;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;
use prometheus::IntCounter;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use serde_json::Value;

use crate::kafka::{KafkaConnection, KafkaSetupError};
use crate::system::metrics::{Metrics, MetricsError};

#[derive(Debug, Clone)]
pub struct OverflowConfig {
    /// With KAFKA_PREFIX applied.
    pub topic: String,
    /// EVENT_OVERFLOW_BUCKET_CAPACITY.
    pub bucket_capacity: u32,
    /// EVENT_OVERFLOW_BUCKET_REPLENISH_RATE, events per second.
    pub replenish_rate: f64,
    /// Keys whose buckets are remembered; a forgotten key starts again with a full bucket.
    pub tracked_keys: usize,
}

/// A message as read: its Kafka key and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedMessage {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// Token buckets per key.
pub struct Limiter {
    buckets: LruCache<String, Bucket>,
    capacity: f64,
    replenish_rate: f64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Limiter {
    pub fn new(capacity: u32, replenish_rate: f64, tracked_keys: usize) -> Self {
        Self {
            buckets: LruCache::new(NonZeroUsize::new(tracked_keys).unwrap_or(NonZeroUsize::MIN)),
            capacity: f64::from(capacity),
            replenish_rate,
        }
    }

    /// Takes one token from `key`'s bucket; false when it is empty.
    pub fn consume(&mut self, key: &str, now: Instant) -> bool {
        if let Some(bucket) = self.buckets.get_mut(key) {
            let refill = now.duration_since(bucket.at).as_secs_f64() * self.replenish_rate;
            bucket.tokens = (bucket.tokens + refill).min(self.capacity);
            bucket.at = now;
            if bucket.tokens >= 1.0 {
                bucket.tokens -= 1.0;
                return true;
            }
            return false;
        }
        if self.capacity < 1.0 {
            return false;
        }
        self.buckets.put(
            key.to_owned(),
            Bucket {
                tokens: self.capacity - 1.0,
                at: now,
            },
        );
        true
    }
}

/// The envelope fields the bucket key is made of; the rest (notably `data`) is skipped.
#[derive(Deserialize)]
struct KeyFields {
    team_id: Option<Value>,
    token: Option<String>,
    distinct_id: Option<Value>,
}

/// `team_id|token:distinct_id` of a message, as PostHog keys its buckets; `None` when the
/// message has neither (the pipeline dead-letters it, so it is not rerouted).
fn bucket_key(payload: &[u8]) -> Option<String> {
    let fields: KeyFields = serde_json::from_slice(payload).ok()?;
    let owner = match (fields.team_id, fields.token) {
        (Some(Value::Number(team)), _) => team.to_string(),
        (_, Some(token)) => token,
        _ => return None,
    };
    let distinct_id = match fields.distinct_id? {
        Value::String(id) => id,
        other => other.to_string(),
    };
    Some(format!("{owner}:{distinct_id}"))
}

pub struct OverflowRouter {
    config: OverflowConfig,
    producer: FutureProducer,
    limiter: Mutex<Limiter>,
    rerouted: IntCounter,
}

impl OverflowRouter {
    pub fn new(
        connection: &KafkaConnection,
        config: OverflowConfig,
        rerouted: IntCounter,
    ) -> Result<Self, KafkaSetupError> {
        let producer = connection.acknowledged_producer()?;
        let limiter = Limiter::new(
            config.bucket_capacity,
            config.replenish_rate,
            config.tracked_keys,
        );
        Ok(Self {
            config,
            producer,
            limiter: Mutex::new(limiter),
            rerouted,
        })
    }

    /// `ingestion_overflow_rerouted_total`, which [`Self::new`] takes.
    pub fn register_metric(metrics: &Metrics) -> Result<IntCounter, MetricsError> {
        let rerouted = IntCounter::new(
            "ingestion_overflow_rerouted_total",
            "Messages the ingestion consumer sent to the overflow topic.",
        )?;
        metrics.registry().register(Box::new(rerouted.clone()))?;
        Ok(rerouted)
    }

    /// The payloads to ingest here, and the messages for the overflow topic, in order.
    pub fn split(&self, messages: Vec<KeyedMessage>) -> (Vec<Vec<u8>>, Vec<KeyedMessage>) {
        split(&self.limiter, messages, Instant::now())
    }

    /// Produces `messages` to the overflow topic with their keys, waiting for every delivery.
    pub async fn reroute(
        &self,
        messages: &[KeyedMessage],
    ) -> Result<(), rdkafka::error::KafkaError> {
        let deliveries = messages.iter().map(|message| {
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.config.topic)
                .payload(message.payload.as_slice());
            if let Some(key) = &message.key {
                record = record.key(key.as_slice());
            }
            self.producer.send(record, Duration::from_secs(30))
        });
        for delivery in futures::future::join_all(deliveries).await {
            delivery.map_err(|(error, _)| error)?;
        }
        self.rerouted.inc_by(messages.len() as u64);
        Ok(())
    }
}

fn split(
    limiter: &Mutex<Limiter>,
    messages: Vec<KeyedMessage>,
    now: Instant,
) -> (Vec<Vec<u8>>, Vec<KeyedMessage>) {
    let mut limiter = limiter.lock().unwrap_or_else(PoisonError::into_inner);
    let mut kept = Vec::with_capacity(messages.len());
    let mut overflow = Vec::new();
    for message in messages {
        let over = match (&message.key, bucket_key(&message.payload)) {
            (None, _) => true,
            (Some(_), Some(key)) => !limiter.consume(&key, now),
            (Some(_), None) => false,
        };
        if over {
            overflow.push(message);
        } else {
            kept.push(message.payload);
        }
    }
    (kept, overflow)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn message(key: Option<&str>, envelope: Value) -> KeyedMessage {
        KeyedMessage {
            key: key.map(|key| key.as_bytes().to_vec()),
            payload: serde_json::to_vec(&envelope).unwrap(),
        }
    }

    #[test]
    fn a_bucket_empties_then_refills_at_the_rate() {
        let mut limiter = Limiter::new(3, 2.0, 100);
        let start = Instant::now();
        assert!((0..3).all(|_| limiter.consume("k", start)));
        assert!(!limiter.consume("k", start));
        assert!(limiter.consume("other", start), "buckets are per key");
        // Half a second at 2 per second is one token.
        let later = start + Duration::from_millis(500);
        assert!(limiter.consume("k", later));
        assert!(!limiter.consume("k", later));
        // Never more than the capacity, however long the pause.
        let much_later = later + Duration::from_secs(3600);
        assert_eq!(
            (0..5).filter(|_| limiter.consume("k", much_later)).count(),
            3
        );
    }

    #[test]
    fn keys_are_team_or_token_and_distinct_id() {
        let by_token = json!({"token": "phc", "distinct_id": "u1", "data": "{}"});
        let by_team = json!({"team_id": 2, "token": "phc", "distinct_id": 7});
        assert_eq!(
            bucket_key(&serde_json::to_vec(&by_token).unwrap()).as_deref(),
            Some("phc:u1")
        );
        assert_eq!(
            bucket_key(&serde_json::to_vec(&by_team).unwrap()).as_deref(),
            Some("2:7")
        );
        assert_eq!(bucket_key(b"not json"), None);
        assert_eq!(bucket_key(br#"{"distinct_id": "u1"}"#), None);
    }

    #[test]
    fn over_limit_and_keyless_messages_overflow_in_order_and_the_rest_stays() {
        let limiter = Mutex::new(Limiter::new(2, 0.0, 100));
        let hot = |n: u32| {
            message(
                Some("phc:hot"),
                json!({"token": "phc", "distinct_id": "hot", "n": n}),
            )
        };
        let messages = vec![
            hot(1),
            message(
                Some("phc:cold"),
                json!({"token": "phc", "distinct_id": "cold"}),
            ),
            hot(2),
            hot(3),
            message(None, json!({"token": "phc", "distinct_id": "keyless"})),
            message(Some("x"), json!("not an envelope")),
            hot(4),
        ];
        let (kept, overflow) = split(&limiter, messages.clone(), Instant::now());
        assert_eq!(
            kept,
            [&messages[0], &messages[1], &messages[2], &messages[5]].map(|m| m.payload.clone())
        );
        assert_eq!(
            overflow,
            [
                messages[3].clone(),
                messages[4].clone(),
                messages[6].clone()
            ]
        );
    }
}
