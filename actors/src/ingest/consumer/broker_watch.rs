//! Whether a consumer can reach Kafka, for `/_health`.
//!
//! librdkafka never fails a read while its brokers are down: it retries forever, and the read
//! loop only sees no messages, which looks exactly like an idle topic. Two signals tell them
//! apart: the client's error callback (transport failures, "all brokers down"), which fires
//! within a second of an outage, and the statistics callback, which says every interval whether
//! a broker connection is up and the consumer group is joined. An error starts a trouble; the
//! next statistics that find the consumer connected, or the next message read, end it.
//!
//! A trouble shorter than `grace` is not shown: librdkafka reports a dropped idle connection as
//! an error too, and reconnects before anyone should be told. The grace is longer than the
//! statistics interval, so a passing error is cleared before it would show.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::Statistics;

#[derive(Debug)]
pub(super) struct BrokerWatch {
    grace: Duration,
    /// Whether `trouble` is set, read without the lock on the per-batch path.
    troubled: AtomicBool,
    trouble: Mutex<Option<Trouble>>,
}

#[derive(Debug)]
struct Trouble {
    since: Instant,
    /// The latest reason, so the report names what is failing now.
    reason: String,
}

impl BrokerWatch {
    pub(super) fn new(grace: Duration) -> Self {
        Self {
            grace,
            troubled: AtomicBool::new(false),
            trouble: Mutex::new(None),
        }
    }

    /// librdkafka's error callback, or a failed read.
    pub(super) fn error(&self, reason: String, now: Instant) {
        let mut trouble = self.trouble.lock().unwrap_or_else(PoisonError::into_inner);
        match trouble.as_mut() {
            Some(trouble) => trouble.reason = reason,
            None => *trouble = Some(Trouble { since: now, reason }),
        }
        self.troubled.store(true, Ordering::Release);
    }

    /// librdkafka's statistics: connected ends a trouble, disconnected starts one (an outage
    /// that began before the client ever reported an error).
    pub(super) fn statistics(&self, statistics: &Statistics, now: Instant) {
        match disconnection(statistics) {
            None => self.clear(),
            Some(reason) => {
                let mut trouble = self.trouble.lock().unwrap_or_else(PoisonError::into_inner);
                if trouble.is_none() {
                    *trouble = Some(Trouble { since: now, reason });
                    self.troubled.store(true, Ordering::Release);
                }
            }
        }
    }

    /// A message was read: the brokers answer.
    pub(super) fn reading(&self) {
        if self.troubled.load(Ordering::Acquire) {
            self.clear();
        }
    }

    fn clear(&self) {
        let mut trouble = self.trouble.lock().unwrap_or_else(PoisonError::into_inner);
        *trouble = None;
        self.troubled.store(false, Ordering::Release);
    }

    /// What to show in `/_health` when the trouble has lasted past the grace.
    pub(super) fn degraded(&self, now: Instant) -> Option<String> {
        if !self.troubled.load(Ordering::Acquire) {
            return None;
        }
        let trouble = self.trouble.lock().unwrap_or_else(PoisonError::into_inner);
        let trouble = trouble.as_ref()?;
        let lasted = now.saturating_duration_since(trouble.since);
        (lasted >= self.grace).then(|| {
            format!(
                "Kafka unreachable for {}s: {}",
                lasted.as_secs(),
                trouble.reason
            )
        })
    }
}

/// Why the statistics say the consumer is cut off from Kafka, if they do: no broker
/// connection up (bootstrap entries aside), or the group not joined.
fn disconnection(statistics: &Statistics) -> Option<String> {
    let brokers: Vec<_> = statistics
        .brokers
        .values()
        .filter(|broker| broker.nodeid >= 0)
        .collect();
    if !brokers.iter().any(|broker| broker.state == "UP") {
        let states: Vec<String> = brokers
            .iter()
            .map(|broker| format!("{} {}", broker.nodename, broker.state))
            .collect();
        return Some(if states.is_empty() {
            "no broker known yet".to_owned()
        } else {
            format!("no broker up ({})", states.join(", "))
        });
    }
    match &statistics.cgrp {
        Some(group) if group.state != "up" => {
            Some(format!("consumer group coordinator {}", group.state))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rdkafka::statistics::{Broker, ConsumerGroup};

    use super::*;

    const GRACE: Duration = Duration::from_secs(15);

    fn statistics(brokers: &[(i32, &str)], group: &str) -> Statistics {
        let brokers: HashMap<String, Broker> = brokers
            .iter()
            .map(|(nodeid, state)| {
                let broker = Broker {
                    name: format!("127.0.0.1:9092/{nodeid}"),
                    nodeid: *nodeid,
                    nodename: "127.0.0.1:9092".to_owned(),
                    state: (*state).to_owned(),
                    ..Broker::default()
                };
                (broker.name.clone(), broker)
            })
            .collect();
        Statistics {
            brokers,
            cgrp: Some(ConsumerGroup {
                state: group.to_owned(),
                ..ConsumerGroup::default()
            }),
            ..Statistics::default()
        }
    }

    #[test]
    fn an_error_shows_only_once_it_outlasts_the_grace() {
        let watch = BrokerWatch::new(GRACE);
        let start = Instant::now();
        assert_eq!(watch.degraded(start), None);
        watch.error("Local: All broker connections are down".to_owned(), start);
        assert_eq!(watch.degraded(start + Duration::from_secs(14)), None);
        watch.error("Local: Broker transport failure".to_owned(), start + GRACE);
        assert_eq!(
            watch.degraded(start + Duration::from_secs(16)).as_deref(),
            Some("Kafka unreachable for 16s: Local: Broker transport failure")
        );
    }

    #[test]
    fn connected_statistics_or_a_message_end_the_trouble() {
        let watch = BrokerWatch::new(GRACE);
        let start = Instant::now();
        let later = start + Duration::from_secs(20);
        watch.error("down".to_owned(), start);
        watch.statistics(&statistics(&[(-1, "INIT"), (1, "UP")], "up"), later);
        assert_eq!(watch.degraded(later), None);

        watch.error("down".to_owned(), start);
        watch.reading();
        assert_eq!(watch.degraded(later), None);
    }

    #[test]
    fn disconnected_statistics_start_a_trouble_without_an_error() {
        let watch = BrokerWatch::new(GRACE);
        let start = Instant::now();
        // Only the bootstrap entry is up: no real broker is.
        watch.statistics(&statistics(&[(-1, "UP"), (1, "CONNECT")], "up"), start);
        let report = watch.degraded(start + GRACE);
        assert_eq!(
            report.as_deref(),
            Some("Kafka unreachable for 15s: no broker up (127.0.0.1:9092 CONNECT)")
        );
        // A later disconnected report keeps the trouble's start.
        watch.statistics(&statistics(&[(1, "DOWN")], "up"), start + GRACE);
        assert!(watch.degraded(start + GRACE).is_some());
    }

    #[test]
    fn a_group_without_its_coordinator_is_a_trouble() {
        let watch = BrokerWatch::new(GRACE);
        let start = Instant::now();
        watch.statistics(&statistics(&[(1, "UP")], "wait-coord"), start);
        assert_eq!(
            watch.degraded(start + GRACE).as_deref(),
            Some("Kafka unreachable for 15s: consumer group coordinator wait-coord")
        );
    }
}
