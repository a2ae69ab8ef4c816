//! Pub/sub: fire-and-forget broadcast between instances, for reload notices and cache
//! invalidation (`reload-plugins`, `reload-action`, sync messages).
//!
//! `PubSub` holds the semantics, the same for every adapter; a `PubSubTransport` only moves raw
//! envelopes between instances (in-process bus, or Redis PUBLISH/SUBSCRIBE). That keeps what
//! NocoBase got wrong in one place:
//! - `skip_self` defaults to true: an instance does not hear its own messages unless it asks;
//!   `only_self` delivers to the publisher only.
//! - Every message is an envelope `{id, publisher, ts, skip_self, only_self, payload}`.
//! - Debounce is per subscription and keyed by the payload: identical messages within the
//!   window collapse into the last one; the pending map is bounded.
//! - Channels are prefixed per deployment (`<prefix><channel>`), so two deployments can share
//!   one Redis. PostHog's own channels (`reload-plugins`) are used with an empty prefix.
//! - The Redis transport reconnects and re-subscribes after a Redis restart. Messages published
//!   while it is down are lost, as with any Redis pub/sub: callers that must not miss a change
//!   also poll (the plugin registry compares `updated_at`).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::redis_pool::RedisPool;
use super::{ClusterError, InstanceId};

/// Messages a subscriber may fall behind by before new ones are dropped (and counted in logs):
/// a slow subscriber must not stall delivery to everyone else.
const SUBSCRIBER_BUFFER: usize = 1024;
/// Distinct payloads a debounced subscription holds at once; past it the oldest is delivered
/// early rather than the map growing without bound (NocoBase #4933).
const MAX_PENDING_DEBOUNCE: usize = 1024;
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct PublishOptions {
    /// Do not deliver to subscribers of the publishing instance. Default true.
    pub skip_self: bool,
    /// Deliver only to subscribers of the publishing instance. Wins over `skip_self`.
    pub only_self: bool,
}

impl Default for PublishOptions {
    fn default() -> Self {
        Self {
            skip_self: true,
            only_self: false,
        }
    }
}

impl PublishOptions {
    /// Every instance, this one included (reload broadcasts).
    pub fn everyone() -> Self {
        Self {
            skip_self: false,
            only_self: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SubscribeOptions {
    /// Collapse identical payloads arriving within this window into one, delivered when the
    /// window has been quiet (trailing edge).
    pub debounce: Option<Duration>,
}

/// A delivered message.
#[derive(Debug, Clone, PartialEq)]
pub struct PubSubMessage {
    pub id: String,
    /// The channel as subscribed, without the deployment prefix.
    pub channel: String,
    pub publisher: String,
    pub published_at_ms: u64,
    pub payload: Value,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    id: String,
    publisher: String,
    ts: u64,
    #[serde(default = "default_true")]
    skip_self: bool,
    #[serde(default)]
    only_self: bool,
    payload: Value,
}

fn default_true() -> bool {
    true
}

/// Moves raw envelopes between instances. Subscribed channels' messages go to the inbound
/// sender the transport was built with, as `(full channel, raw envelope)`.
#[async_trait]
pub trait PubSubTransport: Send + Sync {
    async fn publish(&self, channel: &str, envelope: &str) -> Result<(), ClusterError>;
    async fn subscribe(&self, channel: &str) -> Result<(), ClusterError>;
    async fn unsubscribe(&self, channel: &str) -> Result<(), ClusterError>;
}

/// `(full channel, raw envelope)` as received by a transport.
pub type Inbound = (String, String);

// ---------------------------------------------------------------------------------------------
// PubSub: the semantics

struct LocalSubscriber {
    id: u64,
    sender: mpsc::Sender<PubSubMessage>,
}

struct Inner {
    instance: InstanceId,
    prefix: String,
    transport: Arc<dyn PubSubTransport>,
    /// Full channel → local subscribers.
    subscribers: Mutex<HashMap<String, Vec<LocalSubscriber>>>,
    next_subscriber: AtomicU64,
    /// Channels other programs publish on (`subscribe_foreign`), by full name.
    foreign: Mutex<HashSet<String>>,
}

/// One instance's pub/sub. Cheap to clone.
#[derive(Clone)]
pub struct PubSub {
    inner: Arc<Inner>,
}

impl PubSub {
    /// Wires the semantics onto a transport; `inbound` is the receiving end of what the
    /// transport delivers. Must be called inside a tokio runtime (it spawns the dispatcher).
    pub fn new(
        instance: InstanceId,
        prefix: impl Into<String>,
        transport: Arc<dyn PubSubTransport>,
        inbound: mpsc::UnboundedReceiver<Inbound>,
    ) -> Self {
        let inner = Arc::new(Inner {
            instance,
            prefix: prefix.into(),
            transport,
            subscribers: Mutex::new(HashMap::new()),
            next_subscriber: AtomicU64::new(0),
            foreign: Mutex::new(HashSet::new()),
        });
        tokio::spawn(dispatch(Arc::downgrade(&inner), inbound));
        Self { inner }
    }

    pub fn instance(&self) -> &InstanceId {
        &self.inner.instance
    }

    pub async fn publish(
        &self,
        channel: &str,
        payload: &Value,
        options: PublishOptions,
    ) -> Result<(), ClusterError> {
        let envelope = Envelope {
            id: uuid::Uuid::now_v7().to_string(),
            publisher: self.inner.instance.as_str().to_owned(),
            ts: unix_millis(),
            skip_self: options.skip_self,
            only_self: options.only_self,
            payload: payload.clone(),
        };
        let raw = serde_json::to_string(&envelope)?;
        self.inner
            .transport
            .publish(&self.full_channel(channel), &raw)
            .await
    }

    /// Subscribes this instance to `channel`; messages arrive on the returned subscription
    /// until it is dropped.
    pub async fn subscribe(
        &self,
        channel: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, ClusterError> {
        self.subscribe_full(self.full_channel(channel), options)
            .await
    }

    /// Subscribes to a channel that another program publishes on, such as PostHog's
    /// `reload-plugins` (Django sends a bare string): the exact channel name, without the
    /// deployment prefix, and a message that is not an envelope arrives with its raw text as
    /// a string payload and an empty publisher.
    pub async fn subscribe_foreign(
        &self,
        channel: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, ClusterError> {
        lock(&self.inner.foreign).insert(channel.to_owned());
        self.subscribe_full(channel.to_owned(), options).await
    }

    async fn subscribe_full(
        &self,
        full: String,
        options: SubscribeOptions,
    ) -> Result<Subscription, ClusterError> {
        let id = self.inner.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::channel(SUBSCRIBER_BUFFER);
        let sender = match options.debounce {
            Some(window) if !window.is_zero() => spawn_debouncer(window, sender),
            _ => sender,
        };
        let first = {
            let mut subscribers = lock(&self.inner.subscribers);
            let entry = subscribers.entry(full.clone()).or_default();
            entry.push(LocalSubscriber { id, sender });
            entry.len() == 1
        };
        if first && let Err(error) = self.inner.transport.subscribe(&full).await {
            self.remove_subscriber(&full, id);
            return Err(error);
        }
        Ok(Subscription {
            receiver,
            channel: full,
            id,
            inner: Arc::downgrade(&self.inner),
        })
    }

    fn full_channel(&self, channel: &str) -> String {
        format!("{}{channel}", self.inner.prefix)
    }

    fn remove_subscriber(&self, channel: &str, id: u64) {
        remove_subscriber(&self.inner, channel, id);
    }
}

/// Removes a local subscriber; unsubscribes the transport when it was the channel's last.
fn remove_subscriber(inner: &Arc<Inner>, channel: &str, id: u64) {
    let last = {
        let mut subscribers = lock(&inner.subscribers);
        let Some(entry) = subscribers.get_mut(channel) else {
            return;
        };
        entry.retain(|subscriber| subscriber.id != id);
        let last = entry.is_empty();
        if last {
            subscribers.remove(channel);
        }
        last
    };
    if last && let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let transport = Arc::clone(&inner.transport);
        let channel = channel.to_owned();
        runtime.spawn(async move {
            if let Err(error) = transport.unsubscribe(&channel).await {
                tracing::warn!(%channel, %error, "unsubscribe failed");
            }
        });
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// Receives what the transport delivers, filters it by `skip_self`/`only_self`, and hands it to
/// the local subscribers of its channel. Ends when the `PubSub` is gone.
async fn dispatch(inner: Weak<Inner>, mut inbound: mpsc::UnboundedReceiver<Inbound>) {
    while let Some((channel, raw)) = inbound.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let envelope: Envelope = match serde_json::from_str(&raw) {
            Ok(envelope) => envelope,
            Err(_) if lock(&inner.foreign).contains(&channel) => Envelope {
                id: uuid::Uuid::now_v7().to_string(),
                publisher: String::new(),
                ts: unix_millis(),
                skip_self: false,
                only_self: false,
                payload: Value::String(raw),
            },
            Err(error) => {
                tracing::warn!(%channel, %error, "dropped a pub/sub message that is not an envelope");
                continue;
            }
        };
        let from_self = envelope.publisher == inner.instance.as_str();
        let deliver = if envelope.only_self {
            from_self
        } else {
            !(envelope.skip_self && from_self)
        };
        if !deliver {
            continue;
        }
        let message = PubSubMessage {
            id: envelope.id,
            channel: channel
                .strip_prefix(&inner.prefix)
                .unwrap_or(&channel)
                .to_owned(),
            publisher: envelope.publisher,
            published_at_ms: envelope.ts,
            payload: envelope.payload,
        };
        let subscribers = lock(&inner.subscribers);
        for subscriber in subscribers.get(&channel).into_iter().flatten() {
            if subscriber.sender.try_send(message.clone()).is_err() {
                tracing::warn!(%channel, "a subscriber is full or gone; message dropped for it");
            }
        }
    }
}

/// Puts a debouncer in front of `output`: returns the sender the dispatcher should use.
fn spawn_debouncer(
    window: Duration,
    output: mpsc::Sender<PubSubMessage>,
) -> mpsc::Sender<PubSubMessage> {
    let (sender, mut input) = mpsc::channel::<PubSubMessage>(SUBSCRIBER_BUFFER);
    tokio::spawn(async move {
        // Payload hash → (deadline, latest message with that payload).
        let mut pending: HashMap<u64, (Instant, PubSubMessage)> = HashMap::new();
        loop {
            let next_deadline = pending.values().map(|(deadline, _)| *deadline).min();
            tokio::select! {
                received = input.recv() => {
                    let Some(message) = received else { break };
                    let key = payload_key(&message.payload);
                    pending.insert(key, (Instant::now() + window, message));
                    if pending.len() > MAX_PENDING_DEBOUNCE {
                        flush_oldest(&mut pending, &output).await;
                    }
                }
                () = sleep_until_opt(next_deadline) => {
                    let now = Instant::now();
                    let due: Vec<u64> = pending
                        .iter()
                        .filter(|(_, (deadline, _))| *deadline <= now)
                        .map(|(key, _)| *key)
                        .collect();
                    for key in due {
                        if let Some((_, message)) = pending.remove(&key)
                            && output.send(message).await.is_err()
                        {
                            return;
                        }
                    }
                }
            }
        }
        // The subscription is gone or the PubSub closed: deliver nothing more.
    });
    sender
}

async fn flush_oldest(
    pending: &mut HashMap<u64, (Instant, PubSubMessage)>,
    output: &mpsc::Sender<PubSubMessage>,
) {
    let oldest = pending
        .iter()
        .min_by_key(|(_, (deadline, _))| *deadline)
        .map(|(key, _)| *key);
    if let Some((_, message)) = oldest.and_then(|key| pending.remove(&key)) {
        let _ = output.send(message).await;
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn payload_key(payload: &Value) -> u64 {
    let mut hasher = DefaultHasher::new();
    payload.to_string().hash(&mut hasher);
    hasher.finish()
}

/// Messages of one subscribed channel. Dropping it unsubscribes.
pub struct Subscription {
    receiver: mpsc::Receiver<PubSubMessage>,
    channel: String,
    id: u64,
    inner: Weak<Inner>,
}

impl Subscription {
    /// The next message; `None` once the `PubSub` is gone.
    pub async fn recv(&mut self) -> Option<PubSubMessage> {
        self.receiver.recv().await
    }

    /// A message already received, without waiting.
    pub fn try_recv(&mut self) -> Result<PubSubMessage, mpsc::error::TryRecvError> {
        self.receiver.try_recv()
    }

    /// As a stream, for `ctx.add_stream` in actors.
    pub fn into_stream(self) -> impl futures::Stream<Item = PubSubMessage> + Unpin {
        futures::stream::unfold(self, |mut subscription| async move {
            subscription
                .recv()
                .await
                .map(|message| (message, subscription))
        })
        .boxed()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            remove_subscriber(&inner, &self.channel, self.id);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// In-process transport

/// A subscribed transport: its id and where its inbound messages go.
type Route = (u64, mpsc::UnboundedSender<Inbound>);

/// A bus shared by the in-process transports of one process: the embedded profile's single
/// instance, or several instances in tests.
#[derive(Default)]
pub struct InProcessBus {
    /// Full channel → the transports subscribed to it.
    routes: Mutex<HashMap<String, Vec<Route>>>,
    next_transport: AtomicU64,
}

impl InProcessBus {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A transport on this bus, and the inbound receiver to hand to `PubSub::new`.
    pub fn transport(
        self: &Arc<Self>,
    ) -> (Arc<dyn PubSubTransport>, mpsc::UnboundedReceiver<Inbound>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let transport = InProcessTransport {
            bus: Arc::clone(self),
            id: self.next_transport.fetch_add(1, Ordering::Relaxed),
            inbound: sender,
        };
        (Arc::new(transport), receiver)
    }
}

struct InProcessTransport {
    bus: Arc<InProcessBus>,
    id: u64,
    inbound: mpsc::UnboundedSender<Inbound>,
}

#[async_trait]
impl PubSubTransport for InProcessTransport {
    async fn publish(&self, channel: &str, envelope: &str) -> Result<(), ClusterError> {
        let mut routes = lock(&self.bus.routes);
        if let Some(subscribers) = routes.get_mut(channel) {
            // A transport whose PubSub is gone is pruned here.
            subscribers.retain(|(_, sender)| {
                sender
                    .send((channel.to_owned(), envelope.to_owned()))
                    .is_ok()
            });
        }
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<(), ClusterError> {
        let mut routes = lock(&self.bus.routes);
        let subscribers = routes.entry(channel.to_owned()).or_default();
        if !subscribers.iter().any(|(id, _)| *id == self.id) {
            subscribers.push((self.id, self.inbound.clone()));
        }
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), ClusterError> {
        let mut routes = lock(&self.bus.routes);
        if let Some(subscribers) = routes.get_mut(channel) {
            subscribers.retain(|(id, _)| *id != self.id);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Redis transport

enum Command {
    Subscribe(
        String,
        tokio::sync::oneshot::Sender<Result<(), ClusterError>>,
    ),
    Unsubscribe(String),
}

/// PUBLISH through the pool; SUBSCRIBE on a connection of its own, owned by a task that
/// reconnects with backoff and re-subscribes every channel after a Redis restart.
pub struct RedisTransport {
    pool: RedisPool,
    commands: mpsc::UnboundedSender<Command>,
}

impl RedisTransport {
    /// Starts the subscriber task; returns the transport and the inbound receiver to hand to
    /// `PubSub::new`.
    pub fn spawn(pool: RedisPool) -> (Arc<dyn PubSubTransport>, mpsc::UnboundedReceiver<Inbound>) {
        let (inbound_sender, inbound) = mpsc::unbounded_channel();
        let (commands, command_receiver) = mpsc::unbounded_channel();
        tokio::spawn(run_subscriber(
            pool.client().clone(),
            command_receiver,
            inbound_sender,
        ));
        (Arc::new(Self { pool, commands }), inbound)
    }
}

#[async_trait]
impl PubSubTransport for RedisTransport {
    async fn publish(&self, channel: &str, envelope: &str) -> Result<(), ClusterError> {
        let mut connection = self.pool.get().await?;
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(envelope)
            .query_async::<i64>(&mut connection)
            .await?;
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<(), ClusterError> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::Subscribe(channel.to_owned(), done))
            .map_err(|_| ClusterError::Closed("redis pub/sub"))?;
        result
            .await
            .map_err(|_| ClusterError::Closed("redis pub/sub"))?
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), ClusterError> {
        self.commands
            .send(Command::Unsubscribe(channel.to_owned()))
            .map_err(|_| ClusterError::Closed("redis pub/sub"))
    }
}

/// Owns the subscriber connection. The set of channels is the truth: after a reconnect every
/// one of them is subscribed again before messages flow.
async fn run_subscriber(
    client: redis::Client,
    mut commands: mpsc::UnboundedReceiver<Command>,
    inbound: mpsc::UnboundedSender<Inbound>,
) {
    let mut channels: HashSet<String> = HashSet::new();
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = async {
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            for channel in &channels {
                sink.subscribe(channel).await?;
            }
            Ok::<_, redis::RedisError>((sink, stream))
        }
        .await;
        let (mut sink, mut stream) = match connected {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "redis pub/sub connection failed");
                // Keep taking commands while down, so subscribers are not stuck: they are
                // recorded and subscribed on reconnect.
                let deadline = tokio::time::sleep(backoff);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        () = &mut deadline => break,
                        command = commands.recv() => match command {
                            None => return,
                            Some(Command::Subscribe(channel, done)) => {
                                channels.insert(channel);
                                let _ = done.send(Ok(()));
                            }
                            Some(Command::Unsubscribe(channel)) => {
                                channels.remove(&channel);
                            }
                        },
                    }
                }
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                continue;
            }
        };
        if backoff > Duration::from_millis(50) {
            tracing::info!(
                channels = channels.len(),
                "redis pub/sub reconnected and resubscribed"
            );
        }
        backoff = Duration::from_millis(50);
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else {
                        tracing::warn!("redis pub/sub connection lost; reconnecting");
                        break;
                    };
                    let channel = message.get_channel_name().to_owned();
                    match message.get_payload::<String>() {
                        Ok(payload) => {
                            if inbound.send((channel, payload)).is_err() {
                                return;
                            }
                        }
                        Err(error) => tracing::warn!(%channel, %error, "unreadable pub/sub payload"),
                    }
                }
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Subscribe(channel, done)) => {
                        let result = sink.subscribe(&channel).await.map_err(ClusterError::from);
                        // Recorded even on failure: the reconnect that follows subscribes it.
                        channels.insert(channel);
                        let failed = result.is_err();
                        let _ = done.send(result);
                        if failed {
                            break;
                        }
                    }
                    Some(Command::Unsubscribe(channel)) => {
                        channels.remove(&channel);
                        if sink.unsubscribe(&channel).await.is_err() {
                            break;
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn instance(bus: &Arc<InProcessBus>, name: &str) -> PubSub {
        let (transport, inbound) = bus.transport();
        PubSub::new(InstanceId::new(name), "test:", transport, inbound)
    }

    #[tokio::test(start_paused = true)]
    async fn debounce_collapses_identical_payloads_and_keeps_distinct_ones() {
        let bus = InProcessBus::new();
        let publisher = instance(&bus, "a");
        let listener = instance(&bus, "b");
        let mut subscription = listener
            .subscribe(
                "reload",
                SubscribeOptions {
                    debounce: Some(Duration::from_millis(500)),
                },
            )
            .await
            .expect("subscribed");
        for round in 0..6 {
            for payload in [json!({"team": 1}), json!({"team": 2})] {
                publisher
                    .publish("reload", &payload, PublishOptions::default())
                    .await
                    .expect("published");
            }
            tokio::time::advance(Duration::from_millis(50 + round)).await;
        }
        let first = subscription.recv().await.expect("one per payload");
        let second = subscription.recv().await.expect("one per payload");
        let mut teams = vec![
            first.payload["team"].clone(),
            second.payload["team"].clone(),
        ];
        teams.sort_by_key(|team| team.as_i64());
        assert_eq!(teams, vec![json!(1), json!(2)]);
        let more = tokio::time::timeout(Duration::from_secs(5), subscription.recv()).await;
        assert!(more.is_err(), "nothing else: {more:?}");
    }

    #[tokio::test]
    async fn foreign_channels_take_raw_messages_without_the_prefix() {
        let bus = InProcessBus::new();
        let listener = instance(&bus, "b");
        let mut subscription = listener
            .subscribe_foreign("reload-plugins", SubscribeOptions::default())
            .await
            .expect("subscribed");
        let (raw_transport, _inbound) = bus.transport();
        raw_transport
            .publish("reload-plugins", "")
            .await
            .expect("sent");
        let message = subscription.recv().await.expect("the raw message arrives");
        assert_eq!(message.payload, json!(""));
        assert_eq!(message.channel, "reload-plugins");
        assert_eq!(message.publisher, "");
    }

    #[tokio::test]
    async fn a_message_that_is_not_an_envelope_is_dropped() {
        let bus = InProcessBus::new();
        let listener = instance(&bus, "b");
        let mut subscription = listener
            .subscribe("raw", SubscribeOptions::default())
            .await
            .expect("subscribed");
        let (raw_transport, _inbound) = bus.transport();
        raw_transport
            .publish("test:raw", "not json")
            .await
            .expect("sent");
        let publisher = instance(&bus, "a");
        publisher
            .publish("raw", &json!("after"), PublishOptions::default())
            .await
            .expect("published");
        let message = subscription.recv().await.expect("the good one arrives");
        assert_eq!(message.payload, json!("after"));
        assert_eq!(message.channel, "raw");
    }
}
