//! Per-actor statistics: mailbox length, messages handled, errors, restarts and last progress.
//!
//! actix does not expose how many messages wait in a mailbox, so the count is kept on both
//! sides: `ObservedAddr` increments it when it sends, and the handler's `MessageTimer`
//! decrements it when handling starts. The figures live outside the actor, in atomics and
//! Prometheus children, so `/_actors` can still read them when an actor is stuck and could not
//! answer a `GetStats` message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, Handler, MailboxError, Message};
use prometheus::{Histogram, IntCounter, IntGauge};
use serde::Serialize;

use crate::system::metrics::Metrics;

/// The counters of one actor. Shared by its address, its handlers and its supervisor.
pub struct ActorStats {
    name: String,
    messages_handled: IntCounter,
    errors: IntCounter,
    restarts: IntCounter,
    mailbox_messages: IntGauge,
    message_duration: Histogram,
    /// Unix milliseconds of the last progress report; 0 before the first.
    last_progress_unix_ms: AtomicU64,
}

/// What `/_actors` shows for one actor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActorSnapshot {
    pub name: String,
    pub mailbox_len: i64,
    pub messages_handled: u64,
    pub errors: u64,
    pub restarts: u64,
    /// Unix milliseconds of the last progress report, if any.
    pub last_progress_unix_ms: Option<u64>,
}

impl ActorStats {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Call at the start of every handler; the returned guard records the message as handled,
    /// with its duration, when dropped. Move it into the future of an async handler.
    pub fn message_received(self: &Arc<Self>) -> MessageTimer {
        self.mailbox_messages.dec();
        MessageTimer {
            stats: Arc::clone(self),
            started: Instant::now(),
        }
    }

    pub fn record_error(&self) {
        self.errors.inc();
    }

    pub fn record_restart(&self) {
        self.restarts.inc();
    }

    /// Progress means real work was done; `Health` gets the same report with a deadline.
    pub fn record_progress(&self) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        self.last_progress_unix_ms.store(now_ms, Ordering::Relaxed);
    }

    fn message_sent(&self) {
        self.mailbox_messages.inc();
    }

    /// A send that never reached the mailbox must not count as waiting in it.
    fn send_failed(&self) {
        self.mailbox_messages.dec();
    }

    pub fn snapshot(&self) -> ActorSnapshot {
        let last_progress = self.last_progress_unix_ms.load(Ordering::Relaxed);
        ActorSnapshot {
            name: self.name.clone(),
            mailbox_len: self.mailbox_messages.get().max(0),
            messages_handled: self.messages_handled.get(),
            errors: self.errors.get(),
            restarts: self.restarts.get(),
            last_progress_unix_ms: (last_progress > 0).then_some(last_progress),
        }
    }
}

/// Records one handled message and its duration when dropped.
pub struct MessageTimer {
    stats: Arc<ActorStats>,
    started: Instant,
}

impl Drop for MessageTimer {
    fn drop(&mut self) {
        self.stats.messages_handled.inc();
        self.stats
            .message_duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Every actor's stats, in start order. `/_actors` and `/_metrics` read from here.
pub struct ActorRegistry {
    metrics: Metrics,
    actors: RwLock<Vec<Arc<ActorStats>>>,
}

impl ActorRegistry {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            actors: RwLock::new(Vec::new()),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stats for a new actor. A name registered twice (a pool of identical actors) shares its
    /// Prometheus children but is listed once per actor.
    pub fn register(&self, name: &str) -> Arc<ActorStats> {
        let families = &self.metrics.actors;
        let stats = Arc::new(ActorStats {
            name: name.to_owned(),
            messages_handled: families.messages_handled.with_label_values(&[name]),
            errors: families.errors.with_label_values(&[name]),
            restarts: families.restarts.with_label_values(&[name]),
            mailbox_messages: families.mailbox_messages.with_label_values(&[name]),
            message_duration: families.message_duration.with_label_values(&[name]),
            last_progress_unix_ms: AtomicU64::new(0),
        });
        self.actors
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::clone(&stats));
        stats
    }

    pub fn snapshot(&self) -> Vec<ActorSnapshot> {
        self.actors
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|stats| stats.snapshot())
            .collect()
    }
}

/// An actor's address that keeps its mailbox count. Hand this out instead of a bare `Addr`.
pub struct ObservedAddr<A: Actor> {
    addr: Addr<A>,
    stats: Arc<ActorStats>,
}

impl<A: Actor> Clone for ObservedAddr<A> {
    fn clone(&self) -> Self {
        Self {
            addr: self.addr.clone(),
            stats: Arc::clone(&self.stats),
        }
    }
}

impl<A: Actor> ObservedAddr<A> {
    pub fn new(addr: Addr<A>, stats: Arc<ActorStats>) -> Self {
        Self { addr, stats }
    }

    pub fn stats(&self) -> &Arc<ActorStats> {
        &self.stats
    }

    /// The bare address, for messages whose mailbox count does not matter (tests, control).
    pub fn addr(&self) -> &Addr<A> {
        &self.addr
    }

    /// Sends and waits for the reply; waits for mailbox space first (backpressure).
    pub async fn send<M>(&self, message: M) -> Result<M::Result, MailboxError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        self.stats.message_sent();
        let reply = self.addr.send(message).await;
        if matches!(reply, Err(MailboxError::Closed)) && !self.addr.connected() {
            self.stats.send_failed();
        }
        reply
    }

    /// Queues without waiting, even past the mailbox capacity: control traffic only.
    pub fn do_send<M>(&self, message: M)
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        if self.addr.connected() {
            self.stats.message_sent();
        }
        self.addr.do_send(message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mailbox_count_follows_sends_and_receipts() {
        let registry = ActorRegistry::new(Metrics::new().expect("metrics"));
        let stats = registry.register("counted");
        stats.message_sent();
        stats.message_sent();
        assert_eq!(stats.snapshot().mailbox_len, 2);
        let timer = stats.message_received();
        assert_eq!(stats.snapshot().mailbox_len, 1);
        assert_eq!(
            stats.snapshot().messages_handled,
            0,
            "not before it is done"
        );
        drop(timer);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.messages_handled, 1);
        assert_eq!(snapshot.last_progress_unix_ms, None);
        stats.record_progress();
        stats.record_error();
        stats.record_restart();
        let snapshot = stats.snapshot();
        assert!(snapshot.last_progress_unix_ms.is_some());
        assert_eq!((snapshot.errors, snapshot.restarts), (1, 1));
        assert_eq!(registry.snapshot(), vec![snapshot]);
    }

    #[test]
    fn the_figures_reach_prometheus() {
        let metrics = Metrics::new().expect("metrics");
        let registry = ActorRegistry::new(metrics.clone());
        let stats = registry.register("exported");
        drop(stats.message_received());
        stats.record_restart();
        let text = metrics.render();
        assert!(
            text.contains("actor_messages_handled_total{actor=\"exported\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("actor_restarts_total{actor=\"exported\"} 1"),
            "{text}"
        );
        assert!(text.contains("actor_message_duration_seconds_bucket{actor=\"exported\""));
    }
}
