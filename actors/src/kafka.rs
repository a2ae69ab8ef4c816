//! Kafka client settings shared by the consumer and the producer: brokers, TLS from PostHog's
//! base64 PEM variables, SASL; the one producer of the server's acknowledged writes, and HTTP
//! capture's intake in the cluster profile, which produces through it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::event::intake::{CapturedEvent, EventIntake, IntakeError};

/// How to reach the brokers: PostHog's KAFKA_* variables.
#[derive(Debug, Clone, Default)]
pub struct KafkaConnection {
    /// `KAFKA_HOSTS`, comma-separated.
    pub brokers: String,
    /// `KAFKA_SECURITY_PROTOCOL`: empty (plaintext, or SSL when certificates are given),
    /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    pub security_protocol: String,
    pub sasl_mechanism: String,
    pub sasl_user: String,
    pub sasl_password: String,
    /// `KAFKA_CLIENT_CERT_B64`, `KAFKA_CLIENT_CERT_KEY_B64`, `KAFKA_TRUSTED_CERT_B64`: base64 of
    /// PEM files, as PostHog's Heroku-style deployments pass them.
    pub client_cert_b64: String,
    pub client_cert_key_b64: String,
    pub trusted_cert_b64: String,
    /// Whether the brokers answered `ensure_topics`' first metadata probe, shared by every
    /// clone: a start against unreachable brokers waits for one probe, not one per role.
    pub start_probe: Arc<tokio::sync::OnceCell<bool>>,
    /// `KAFKA_PRODUCER_MAX_QUEUE_SIZE`: PostHog's producer sends once this many messages are
    /// queued; here, the most messages librdkafka puts in one produce request
    /// (`batch.num.messages`). 0 sends each message at once (no linger), as PostHog's tests
    /// configure it.
    pub producer_max_queue_size: u64,
    /// The acknowledged producer, made on first use and shared by every clone (see
    /// [`KafkaConnection::acknowledged_producer`]).
    pub acknowledged: SharedProducer,
}

/// One producer for all of a server's acknowledged writes, as PostHog's server shares one.
///
/// Each producer is its own librdkafka client: a connection per broker, its threads, and a
/// polling thread (rdkafka's) that wakes every 100 ms and spins through the last millisecond
/// of each wait, since the time left is passed to librdkafka in whole milliseconds. Idle, two
/// such producers took 1.75 % of a core between them.
#[derive(Clone, Default)]
pub struct SharedProducer(Arc<std::sync::Mutex<Option<FutureProducer>>>);

impl std::fmt::Debug for SharedProducer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SharedProducer")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("invalid {var}: not base64 of a PEM file ({reason})")]
    Certificate { var: &'static str, reason: String },
    #[error("cannot create the Kafka client (check KAFKA_HOSTS and KAFKA_* settings): {0}")]
    Client(#[source] rdkafka::error::KafkaError),
}

impl KafkaConnection {
    /// A librdkafka config with the connection settings applied.
    /// The producer of the server's own writes (rows, dead letters, overflow): every message
    /// acknowledged by all in-sync replicas, batched for 20 ms and compressed, up to the
    /// ingestion topic's own message limit (dead letters and rerouted messages keep raw
    /// payloads that large).
    ///
    /// Every call (on any clone of this connection) gets the same producer.
    pub fn acknowledged_producer(&self) -> Result<FutureProducer, KafkaSetupError> {
        let mut shared = self
            .acknowledged
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(producer) = shared.as_ref() {
            return Ok(producer.clone());
        }
        let producer: FutureProducer = self
            .acknowledged_producer_config()?
            .create()
            .map_err(KafkaSetupError::Client)?;
        *shared = Some(producer.clone());
        Ok(producer)
    }

    fn acknowledged_producer_config(&self) -> Result<ClientConfig, KafkaSetupError> {
        let mut config = self.client_config()?;
        config
            .set("compression.type", "lz4")
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .set("message.max.bytes", "20000000");
        match self.producer_max_queue_size {
            0 => config.set("linger.ms", "0").set("batch.num.messages", "1"),
            size => config
                .set("linger.ms", "20")
                .set("batch.num.messages", size.to_string()),
        };
        Ok(config)
    }

    pub fn client_config(&self) -> Result<ClientConfig, KafkaSetupError> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        let pem = |var: &'static str, value: &str| -> Result<Option<String>, KafkaSetupError> {
            if value.trim().is_empty() {
                return Ok(None);
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value.trim())
                .map_err(|error| KafkaSetupError::Certificate {
                    var,
                    reason: error.to_string(),
                })?;
            let text = String::from_utf8(bytes).map_err(|_| KafkaSetupError::Certificate {
                var,
                reason: "not UTF-8 text".to_owned(),
            })?;
            if !text.contains("-----BEGIN") {
                return Err(KafkaSetupError::Certificate {
                    var,
                    reason: "no PEM header".to_owned(),
                });
            }
            Ok(Some(text))
        };
        let cert = pem("KAFKA_CLIENT_CERT_B64", &self.client_cert_b64)?;
        let key = pem("KAFKA_CLIENT_CERT_KEY_B64", &self.client_cert_key_b64)?;
        let ca = pem("KAFKA_TRUSTED_CERT_B64", &self.trusted_cert_b64)?;
        let has_certificates = cert.is_some() || key.is_some() || ca.is_some();
        if let Some(cert) = cert {
            config.set("ssl.certificate.pem", cert);
        }
        if let Some(key) = key {
            config.set("ssl.key.pem", key);
        }
        if let Some(ca) = ca {
            config.set("ssl.ca.pem", ca);
        }
        let protocol = if !self.security_protocol.trim().is_empty() {
            self.security_protocol.trim().to_lowercase()
        } else if has_certificates {
            // PostHog turns TLS on whenever certificates are configured.
            "ssl".to_owned()
        } else {
            "plaintext".to_owned()
        };
        config.set("security.protocol", protocol);
        if !self.sasl_mechanism.trim().is_empty() {
            config.set("sasl.mechanism", self.sasl_mechanism.trim().to_uppercase());
            config.set("sasl.username", &self.sasl_user);
            config.set("sasl.password", &self.sasl_password);
        }
        Ok(config)
    }
}

/// HTTP capture's intake in the cluster profile: each event is produced to the consumption
/// topic and the request succeeds only once Kafka acknowledged all of them (durable first).
/// It produces through the server's shared acknowledged producer (acknowledged by all in-sync
/// replicas, LZ4), so a request may wait for its linger (20 ms, none with
/// `KAFKA_PRODUCER_MAX_QUEUE_SIZE=0`).
pub struct KafkaIntake {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
}

impl KafkaIntake {
    pub fn new(connection: &KafkaConnection, topic: String) -> Result<Self, KafkaSetupError> {
        Ok(Self {
            // Nothing may be lost once the client has its 200: acks from all replicas.
            producer: connection.acknowledged_producer()?,
            topic,
            timeout: Duration::from_secs(30),
        })
    }
}

#[async_trait]
impl EventIntake for KafkaIntake {
    async fn submit(&self, events: Vec<CapturedEvent>) -> Result<(), IntakeError> {
        let deliveries = events.iter().map(|event| {
            self.producer.send(
                FutureRecord::to(&self.topic)
                    .key(&event.key)
                    .payload(&event.payload),
                self.timeout,
            )
        });
        for delivery in futures::future::join_all(deliveries).await {
            delivery.map_err(|(error, _)| {
                IntakeError::Unavailable(format!("Kafka did not take the event: {error}"))
            })?;
        }
        Ok(())
    }
}

/// Creates the topics this server produces to when they are missing (one partition per topic
/// unless the broker's default says otherwise is not expressible here, so 1; existing topics
/// are left alone). Brokers without auto-creation would otherwise time out every produce, and
/// the writer would retry forever. Failure to create (e.g. no ACL) is logged, not fatal: the
/// topics may exist and be invisible to this user.
pub async fn ensure_topics(
    connection: &KafkaConnection,
    topics: &[String],
) -> Result<(), KafkaSetupError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;

    if topics.is_empty() {
        return Ok(());
    }
    if connection.start_probe.get() == Some(&false) {
        tracing::warn!(?topics, "not created: Kafka was unreachable at start");
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = connection
        .client_config()?
        .create()
        .map_err(KafkaSetupError::Client)?;
    // Unreachable brokers must not hold up the start (each admin request would wait a minute
    // by default, several times over): a short metadata probe first, and bounded requests.
    // Whatever is missing then is created by the broker on first use, or reported by the
    // consumers' health.
    let admin = Arc::new(admin);
    let reachable = *connection
        .start_probe
        .get_or_init(|| {
            let admin = Arc::clone(&admin);
            async move {
                let probe = tokio::task::spawn_blocking(move || {
                    admin
                        .inner()
                        .fetch_metadata(None, TOPIC_SETUP_TIMEOUT / 2)
                        .map(drop)
                })
                .await;
                match probe {
                    Ok(Ok(())) => true,
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "Kafka unreachable at start; topics are not created now");
                        false
                    }
                    Err(error) => {
                        tracing::warn!(%error, "Kafka metadata probe did not finish");
                        false
                    }
                }
            }
        })
        .await;
    if !reachable {
        tracing::warn!(?topics, "not created: Kafka was unreachable at start");
        return Ok(());
    }
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|topic| NewTopic::new(topic, 1, TopicReplication::Fixed(-1)))
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(TOPIC_SETUP_TIMEOUT))
        .request_timeout(Some(TOPIC_SETUP_TIMEOUT));
    match admin.create_topics(&new_topics, &options).await {
        Ok(results) => {
            for result in results {
                match result {
                    Ok(topic) => tracing::info!(%topic, "created Kafka topic"),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((topic, code)) => {
                        tracing::warn!(%topic, error = %code, "could not create Kafka topic")
                    }
                }
            }
        }
        Err(error) => {
            tracing::warn!(%error, "could not create the Kafka topics this server produces to")
        }
    }
    Ok(())
}

/// The longest one start-up topic step may take.
const TOPIC_SETUP_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    /// Every clone of a connection hands out the same librdkafka client; another connection
    /// (another server in one process, as the tests run them) has its own.
    #[tokio::test]
    async fn clones_of_a_connection_share_one_acknowledged_producer() {
        use rdkafka::producer::Producer;
        let connection = KafkaConnection {
            brokers: "127.0.0.1:1".to_owned(),
            ..KafkaConnection::default()
        };
        let client = |connection: &KafkaConnection| {
            connection
                .acknowledged_producer()
                .expect("producer")
                .client()
                .native_ptr()
        };
        let first = client(&connection);
        assert_eq!(client(&connection), first);
        assert_eq!(client(&connection.clone()), first);
        let other = KafkaConnection {
            brokers: "127.0.0.1:1".to_owned(),
            ..KafkaConnection::default()
        };
        assert_ne!(client(&other), first);
    }

    #[test]
    fn the_producer_queue_size_bounds_each_produce_request() {
        let config = |size| {
            KafkaConnection {
                brokers: "k:9092".to_owned(),
                producer_max_queue_size: size,
                ..KafkaConnection::default()
            }
            .acknowledged_producer_config()
            .expect("config")
        };
        let posthog_default = config(20);
        assert_eq!(posthog_default.get("batch.num.messages"), Some("20"));
        assert_eq!(posthog_default.get("linger.ms"), Some("20"));
        let immediate = config(0);
        assert_eq!(immediate.get("batch.num.messages"), Some("1"));
        assert_eq!(immediate.get("linger.ms"), Some("0"));
    }

    #[test]
    fn plaintext_without_certificates() {
        let config = KafkaConnection {
            brokers: "k1:9092,k2:9092".to_owned(),
            ..KafkaConnection::default()
        }
        .client_config()
        .expect("config");
        assert_eq!(config.get("bootstrap.servers"), Some("k1:9092,k2:9092"));
        assert_eq!(config.get("security.protocol"), Some("plaintext"));
        assert_eq!(config.get("ssl.ca.pem"), None);
    }

    #[test]
    fn base64_certificates_turn_tls_on_as_in_posthog() {
        let config = KafkaConnection {
            brokers: "k:9093".to_owned(),
            client_cert_b64: b64(PEM),
            client_cert_key_b64: b64(PEM),
            trusted_cert_b64: b64(PEM),
            ..KafkaConnection::default()
        }
        .client_config()
        .expect("config");
        assert_eq!(config.get("security.protocol"), Some("ssl"));
        assert_eq!(config.get("ssl.certificate.pem"), Some(PEM));
        assert_eq!(config.get("ssl.key.pem"), Some(PEM));
        assert_eq!(config.get("ssl.ca.pem"), Some(PEM));
    }

    #[test]
    fn sasl_settings_are_passed_through() {
        let config = KafkaConnection {
            brokers: "k:9096".to_owned(),
            security_protocol: "SASL_SSL".to_owned(),
            sasl_mechanism: "scram-sha-512".to_owned(),
            sasl_user: "posthog".to_owned(),
            sasl_password: "secret".to_owned(),
            ..KafkaConnection::default()
        }
        .client_config()
        .expect("config");
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.username"), Some("posthog"));
        assert_eq!(config.get("sasl.password"), Some("secret"));
    }

    #[test]
    fn a_bad_certificate_names_its_variable() {
        let not_base64 = KafkaConnection {
            trusted_cert_b64: "%%%".to_owned(),
            ..KafkaConnection::default()
        }
        .client_config()
        .expect_err("refused");
        assert!(
            not_base64
                .to_string()
                .starts_with("invalid KAFKA_TRUSTED_CERT_B64: "),
            "{not_base64}"
        );
        let not_pem = KafkaConnection {
            client_cert_b64: b64("hello"),
            ..KafkaConnection::default()
        }
        .client_config()
        .expect_err("refused");
        assert_eq!(
            not_pem.to_string(),
            "invalid KAFKA_CLIENT_CERT_B64: not base64 of a PEM file (no PEM header)"
        );
    }
}
