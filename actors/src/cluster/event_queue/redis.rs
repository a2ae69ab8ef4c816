//! The Redis adapter (cluster profile): a stream per channel read through one consumer group
//! shared by every instance of the deployment, a sorted set of delayed messages, and a stream
//! of dead letters. Durable as far as Redis is (AOF or RDB).
//!
//! Keys, for deployment prefix `<p>` and channel `<c>`:
//! - `<p>queue:<c>`: the stream of ready messages; each entry has one field, `message`, the
//!   JSON `{id, payload, attempt, max_retries, timeout_ms, published_at_ms}`.
//! - `<p>workers`: the consumer group on every channel's stream (created at `0` with MKSTREAM,
//!   so messages published before the first subscriber are delivered); consumer = instance id.
//! - `<p>queue:<c>:delayed`: sorted set of message JSONs scored by due time (Unix ms of the
//!   Redis clock, so instances' clock skew does not matter): delayed publishes and retries.
//! - `<p>queue:<c>:dead`: stream of dead letters, fields `message`, `error`, `failed_at_ms`,
//!   trimmed to about `DEAD_LETTER_RETAIN` entries.
//!
//! Every state change that spans keys is one Lua script, so a crash cannot split it:
//! - ack = XACK + XDEL. Entries are deleted once acked rather than trimmed with `MAXLEN`:
//!   trimming would also drop messages not yet read when the backlog is long.
//! - retry = XACK + ZADD (due = now + backoff) + XDEL; dead letter = XACK + XADD to the dead
//!   stream + XDEL. Both act only if the XACK acked, so a slow consumer and the one that
//!   reclaimed its message cannot both schedule a retry.
//! - promote = ZRANGEBYSCORE due + XADD each + ZREM, run by every consumer before it reads.
//! - release (entries a read returned after the subscription stopped) = XACK + XADD the same
//!   message at the tail + XDEL: not an attempt.
//!
//! The window we accept: between the end of a handler and its settle script (a crash, or Redis
//! unreachable through every settle attempt) the message stays pending in the group. After
//! `reclaim_idle` another consumer takes it over with XAUTOCLAIM and runs it again, so a
//! message can be processed twice but never lost: handlers de-duplicate by `id`.
//!
//! A reclaimed message counts as a new attempt (the dead consumer's attempt failed): its
//! attempt is the stored one plus the deliveries before the claim, taken from the group's
//! delivery counter. Past `max_retries` it is dead-lettered without running, so a message that
//! kills its consumer does not kill every consumer in turn.
//!
//! Multi-key scripts need all keys in one slot: this adapter targets a single Redis (or a
//! primary with replicas), not Redis Cluster.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    DEAD_LETTER_RETAIN, DeadLetter, Delivery, DeliveryError, EventQueue, PublishOptions,
    QueueHandler, QueueMessage, QueueSubscription, Settlement, Settler, Source, SubscribeOptions,
    Subscriptions, new_message_id, start_consumer, unix_millis, validate_channel, validate_publish,
    validate_subscribe,
};
use crate::cluster::redis_pool::RedisPool;
use crate::cluster::{ClusterError, InstanceId};

const QUEUE_KEY: &str = "queue:";
const DELAYED_SUFFIX: &str = ":delayed";
const DEAD_SUFFIX: &str = ":dead";
const GROUP: &str = "workers";
const FIELD_MESSAGE: &str = "message";
const FIELD_ERROR: &str = "error";
const FIELD_FAILED_AT: &str = "failed_at_ms";
/// Delayed messages moved to the stream per promote call; the rest follow on the next fetch.
const PROMOTE_BATCH: usize = 100;
/// Extra time the blocking read's connection waits for a reply beyond the BLOCK time itself.
const BLOCKING_REPLY_MARGIN: Duration = Duration::from_secs(5);
/// The redis cursor XAUTOCLAIM starts from and returns once it has scanned everything.
const CURSOR_START: &str = "0-0";

/// due = Redis time + ARGV[1] ms. KEYS: delayed. ARGV: delay ms, message JSON.
static PUBLISH_DELAYED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local now = redis.call('TIME')
local due = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], due, ARGV[2])
return due
",
    )
});

/// Moves due delayed messages to the stream. KEYS: delayed, stream. ARGV: batch, field.
static PROMOTE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
for _, message in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', ARGV[2], message)
  redis.call('ZREM', KEYS[1], message)
end
return #due
",
    )
});

/// KEYS: stream. ARGV: group, entry id. Returns 1 if this call acked the entry.
static ACK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return acked
",
    )
});

/// Re-queues an entry at the tail, unprocessed. KEYS: stream. ARGV: group, entry id, JSON,
/// field.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then
  redis.call('XADD', KEYS[1], '*', ARGV[4], ARGV[3])
end
redis.call('XDEL', KEYS[1], ARGV[2])
return acked
",
    )
});

/// KEYS: stream, delayed. ARGV: group, entry id, delay ms, next attempt's JSON.
static RETRY: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then
  local now = redis.call('TIME')
  local due = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[3])
  redis.call('ZADD', KEYS[2], due, ARGV[4])
end
redis.call('XDEL', KEYS[1], ARGV[2])
return acked
",
    )
});

/// KEYS: stream, dead stream. ARGV: group, entry id, message JSON, error, failed_at_ms, retain,
/// then the three field names.
static DEAD_LETTER: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*',
    ARGV[7], ARGV[3], ARGV[8], ARGV[4], ARGV[9], ARGV[5])
end
redis.call('XDEL', KEYS[1], ARGV[2])
return acked
",
    )
});

/// XAUTOCLAIM, plus each claimed entry's delivery count (after the claim) from XPENDING.
/// KEYS: stream. ARGV: group, consumer, min idle ms, cursor, count, field.
/// Returns `{next cursor, {{entry id, message JSON or '', deliveries}, ...}}`.
static RECLAIM: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  'COUNT', tonumber(ARGV[5]))
local entries = {}
for _, entry in ipairs(claimed[2]) do
  local id = entry[1]
  local fields = entry[2]
  local message = ''
  if fields then
    for i = 1, #fields, 2 do
      if fields[i] == ARGV[6] then message = fields[i + 1] end
    end
  end
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  local deliveries = 1
  if pending[1] then deliveries = pending[1][4] end
  table.insert(entries, {id, message, deliveries})
end
return {claimed[1], entries}
",
    )
});

/// A message as stored in the stream and the delayed set. The channel is the key's.
#[derive(Debug, Serialize, Deserialize)]
struct WireMessage {
    id: String,
    payload: Value,
    attempt: u32,
    max_retries: u32,
    timeout_ms: u64,
    published_at_ms: u64,
}

impl WireMessage {
    fn of(message: &QueueMessage, timeout: Duration) -> Self {
        Self {
            id: message.id.clone(),
            payload: message.payload.clone(),
            attempt: message.attempt,
            max_retries: message.max_retries,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            published_at_ms: message.published_at_ms,
        }
    }

    fn into_message(self, channel: &str) -> (QueueMessage, Duration) {
        let timeout = Duration::from_millis(self.timeout_ms);
        let message = QueueMessage {
            id: self.id,
            channel: channel.to_owned(),
            payload: self.payload,
            attempt: self.attempt,
            max_retries: self.max_retries,
            published_at_ms: self.published_at_ms,
        };
        (message, timeout)
    }
}

/// The keys of one channel.
struct ChannelKeys {
    channel: String,
    stream: String,
    delayed: String,
    dead: String,
    group: String,
}

impl ChannelKeys {
    fn new(prefix: &str, channel: &str) -> Self {
        let stream = format!("{prefix}{QUEUE_KEY}{channel}");
        Self {
            channel: channel.to_owned(),
            delayed: format!("{stream}{DELAYED_SUFFIX}"),
            dead: format!("{stream}{DEAD_SUFFIX}"),
            group: format!("{prefix}{GROUP}"),
            stream,
        }
    }

    /// Creates the consumer group (and the stream) unless it exists.
    async fn ensure_group(
        &self,
        connection: &mut impl redis::aio::ConnectionLike,
    ) -> Result<(), ClusterError> {
        let created = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<()>(connection)
            .await;
        match created {
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            other => Ok(other?),
        }
    }
}

/// One instance's view of the Redis queue of a deployment.
pub struct RedisEventQueue {
    pool: RedisPool,
    prefix: String,
    consumer: InstanceId,
    subscriptions: Subscriptions,
}

impl RedisEventQueue {
    /// `prefix` namespaces every key (`<prefix>queue:<channel>`), so deployments can share one
    /// Redis; `consumer` names this instance in the consumer group.
    pub fn new(pool: RedisPool, prefix: impl Into<String>, consumer: InstanceId) -> Self {
        Self {
            pool,
            prefix: prefix.into(),
            consumer,
            subscriptions: Subscriptions::default(),
        }
    }
}

#[async_trait]
impl EventQueue for RedisEventQueue {
    async fn publish(
        &self,
        channel: &str,
        payload: Value,
        options: PublishOptions,
    ) -> Result<String, ClusterError> {
        validate_publish(channel, &options)?;
        let keys = ChannelKeys::new(&self.prefix, channel);
        let id = new_message_id();
        let message = QueueMessage {
            id: id.clone(),
            channel: channel.to_owned(),
            payload,
            attempt: 0,
            max_retries: options.max_retries,
            published_at_ms: unix_millis(),
        };
        let json = serde_json::to_string(&WireMessage::of(&message, options.timeout))?;
        let mut connection = self.pool.get().await?;
        match options.delay {
            Some(delay) if !delay.is_zero() => {
                PUBLISH_DELAYED
                    .key(&keys.delayed)
                    .arg(duration_ms(delay))
                    .arg(&json)
                    .invoke_async::<i64>(&mut connection)
                    .await?;
            }
            _ => {
                redis::cmd("XADD")
                    .arg(&keys.stream)
                    .arg("*")
                    .arg(FIELD_MESSAGE)
                    .arg(&json)
                    .query_async::<String>(&mut connection)
                    .await?;
            }
        }
        Ok(id)
    }

    async fn subscribe(
        &self,
        channel: &str,
        handler: Arc<dyn QueueHandler>,
        options: SubscribeOptions,
    ) -> Result<QueueSubscription, ClusterError> {
        validate_subscribe(channel, &options)?;
        let registration = self.subscriptions.register(channel)?;
        let keys = Arc::new(ChannelKeys::new(&self.prefix, channel));
        // Now rather than only in the loop, so a wrong URL or a down Redis fails the subscribe.
        keys.ensure_group(&mut self.pool.get().await?).await?;
        let source = RedisSource {
            pool: self.pool.clone(),
            keys: Arc::clone(&keys),
            consumer: self.consumer.as_str().to_owned(),
            poll_interval: options.poll_interval,
            reclaim_idle: options.reclaim_idle,
            reclaim_every: (options.reclaim_idle / 2).max(options.poll_interval),
            connection: None,
            next_reclaim: Instant::now(),
            reclaim_cursor: CURSOR_START.to_owned(),
        };
        let settler = Arc::new(RedisSettler {
            pool: self.pool.clone(),
            keys,
        });
        Ok(start_consumer(
            channel,
            source,
            settler,
            handler,
            options,
            registration,
        ))
    }

    async fn dead_letters(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, ClusterError> {
        validate_channel(channel)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let keys = ChannelKeys::new(&self.prefix, channel);
        let mut connection = self.pool.get().await?;
        let range: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&keys.dead)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut connection)
            .await?;
        Ok(range
            .ids
            .iter()
            .filter_map(|entry| parse_dead_letter(channel, entry))
            .collect())
    }
}

fn parse_dead_letter(channel: &str, entry: &StreamId) -> Option<DeadLetter> {
    let raw: String = entry.get(FIELD_MESSAGE)?;
    let wire: WireMessage = match serde_json::from_str(&raw) {
        Ok(wire) => wire,
        Err(error) => {
            // A malformed message that was dead-lettered as is: not a QueueMessage.
            tracing::warn!(%channel, entry = %entry.id, %error, "skipped an unreadable dead letter");
            return None;
        }
    };
    Some(DeadLetter {
        message: wire.into_message(channel).0,
        error: entry.get(FIELD_ERROR).unwrap_or_default(),
        failed_at_ms: entry.get(FIELD_FAILED_AT).unwrap_or_default(),
    })
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Reads the channel for one consumer loop: XREADGROUP on a connection of its own (the read
/// blocks for up to a poll interval), scripts through the pool.
struct RedisSource {
    pool: RedisPool,
    keys: Arc<ChannelKeys>,
    consumer: String,
    poll_interval: Duration,
    reclaim_idle: Duration,
    reclaim_every: Duration,
    /// None until connected, and again after any error: the next fetch reconnects and
    /// re-creates the group (a Redis restarted without persistence lost it).
    connection: Option<MultiplexedConnection>,
    next_reclaim: Instant,
    /// Where the next XAUTOCLAIM resumes its scan of the pending entries.
    reclaim_cursor: String,
}

#[async_trait]
impl Source for RedisSource {
    async fn fetch(
        &mut self,
        max: usize,
        _shutdown: &CancellationToken,
    ) -> Result<Vec<Delivery>, ClusterError> {
        // Not cut short by shutdown: the blocking read ends within a poll interval, and entries
        // it read are then processed (and drained by close) instead of waiting for a reclaim.
        let fetched = self.fetch_connected(max).await;
        if fetched.is_err() {
            self.connection = None;
        }
        fetched
    }
}

impl RedisSource {
    async fn fetch_connected(&mut self, max: usize) -> Result<Vec<Delivery>, ClusterError> {
        let keys = Arc::clone(&self.keys);
        let mut connection = match self.connection.take() {
            Some(connection) => connection,
            None => {
                let mut connection = self.pool.dedicated_connection().await?;
                // The default reply timeout (500 ms) would cut a longer BLOCK short.
                connection.set_response_timeout(self.poll_interval + BLOCKING_REPLY_MARGIN);
                keys.ensure_group(&mut connection).await?;
                connection
            }
        };

        PROMOTE
            .key(&keys.delayed)
            .key(&keys.stream)
            .arg(PROMOTE_BATCH)
            .arg(FIELD_MESSAGE)
            .invoke_async::<i64>(&mut connection)
            .await?;

        if Instant::now() >= self.next_reclaim {
            let reclaimed = self.reclaim(&mut connection, max).await?;
            if !reclaimed.is_empty() {
                self.connection = Some(connection);
                return Ok(reclaimed);
            }
        }

        let block_ms = duration_ms(self.poll_interval).max(1);
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&keys.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&keys.stream)
            .arg(">")
            .query_async(&mut connection)
            .await?;
        let mut deliveries = Vec::new();
        for entry in reply
            .into_iter()
            .flat_map(|reply| reply.keys)
            .flat_map(|key| key.ids)
        {
            let raw: String = entry.get(FIELD_MESSAGE).unwrap_or_default();
            if let Some(delivery) = self.decode(&entry.id, &raw, 1).await {
                deliveries.push(delivery);
            }
        }
        self.connection = Some(connection);
        Ok(deliveries)
    }

    /// Takes over messages left unacked for `reclaim_idle` by consumers presumed dead.
    async fn reclaim(
        &mut self,
        connection: &mut MultiplexedConnection,
        max: usize,
    ) -> Result<Vec<Delivery>, ClusterError> {
        let (cursor, claimed): (String, Vec<(String, String, u64)>) = RECLAIM
            .key(&self.keys.stream)
            .arg(&self.keys.group)
            .arg(&self.consumer)
            .arg(duration_ms(self.reclaim_idle))
            .arg(&self.reclaim_cursor)
            .arg(max)
            .arg(FIELD_MESSAGE)
            .invoke_async(connection)
            .await?;
        // A cursor other than 0-0 means more pending entries to scan: continue on the next fetch.
        self.next_reclaim = if cursor == CURSOR_START {
            Instant::now() + self.reclaim_every
        } else {
            Instant::now()
        };
        self.reclaim_cursor = cursor;
        let mut deliveries = Vec::new();
        for (entry_id, raw, delivered) in claimed {
            tracing::info!(
                channel = %self.keys.channel, entry = %entry_id, delivered,
                "reclaimed a queue message from a dead or stalled consumer"
            );
            if let Some(delivery) = self.decode(&entry_id, &raw, delivered).await {
                deliveries.push(delivery);
            }
        }
        Ok(deliveries)
    }

    /// Turns a stream entry delivered `delivered` times into a delivery; a malformed entry is
    /// dead-lettered as is and skipped.
    async fn decode(&self, entry_id: &str, raw: &str, delivered: u64) -> Option<Delivery> {
        let wire: WireMessage = match serde_json::from_str(raw) {
            Ok(wire) => wire,
            Err(error) => {
                let reason = format!("malformed queue entry: {error}");
                tracing::error!(channel = %self.keys.channel, entry = %entry_id, %reason);
                let settler = RedisSettler {
                    pool: self.pool.clone(),
                    keys: Arc::clone(&self.keys),
                };
                if let Err(error) = settler.dead_letter(entry_id, raw, &reason).await {
                    tracing::warn!(
                        channel = %self.keys.channel, entry = %entry_id, %error,
                        "could not dead-letter a malformed entry; it will be reclaimed"
                    );
                }
                return None;
            }
        };
        let (mut message, timeout) = wire.into_message(&self.keys.channel);
        // Each earlier delivery that was never settled was a failed attempt of a dead consumer.
        let earlier = u32::try_from(delivered.saturating_sub(1)).unwrap_or(u32::MAX);
        message.attempt = message.attempt.saturating_add(earlier);
        let exhausted =
            (message.attempt > message.max_retries).then_some(DeliveryError::NeverSettled {
                deliveries: delivered,
            });
        if exhausted.is_some() {
            // The dead letter records the last attempt that could have run.
            message.attempt = message.max_retries;
        }
        Some(Delivery {
            message,
            timeout,
            receipt: entry_id.to_owned(),
            exhausted,
        })
    }
}

struct RedisSettler {
    pool: RedisPool,
    keys: Arc<ChannelKeys>,
}

impl RedisSettler {
    async fn dead_letter(
        &self,
        entry_id: &str,
        json: &str,
        error: &str,
    ) -> Result<(), ClusterError> {
        let mut connection = self.pool.get().await?;
        DEAD_LETTER
            .key(&self.keys.stream)
            .key(&self.keys.dead)
            .arg(&self.keys.group)
            .arg(entry_id)
            .arg(json)
            .arg(error)
            .arg(unix_millis())
            .arg(DEAD_LETTER_RETAIN)
            .arg(FIELD_MESSAGE)
            .arg(FIELD_ERROR)
            .arg(FIELD_FAILED_AT)
            .invoke_async::<i64>(&mut connection)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Settler for RedisSettler {
    async fn settle(
        &self,
        delivery: &Delivery,
        settlement: &Settlement,
    ) -> Result<(), ClusterError> {
        let entry_id = delivery.receipt.as_str();
        let acked = match settlement {
            Settlement::Ack => {
                let mut connection = self.pool.get().await?;
                ACK.key(&self.keys.stream)
                    .arg(&self.keys.group)
                    .arg(entry_id)
                    .invoke_async::<i64>(&mut connection)
                    .await?
            }
            Settlement::Release => {
                let json =
                    serde_json::to_string(&WireMessage::of(&delivery.message, delivery.timeout))?;
                let mut connection = self.pool.get().await?;
                RELEASE
                    .key(&self.keys.stream)
                    .arg(&self.keys.group)
                    .arg(entry_id)
                    .arg(&json)
                    .arg(FIELD_MESSAGE)
                    .invoke_async::<i64>(&mut connection)
                    .await?
            }
            Settlement::Retry { delay } => {
                let mut next = WireMessage::of(&delivery.message, delivery.timeout);
                next.attempt += 1;
                let json = serde_json::to_string(&next)?;
                let mut connection = self.pool.get().await?;
                RETRY
                    .key(&self.keys.stream)
                    .key(&self.keys.delayed)
                    .arg(&self.keys.group)
                    .arg(entry_id)
                    .arg(duration_ms(*delay))
                    .arg(&json)
                    .invoke_async::<i64>(&mut connection)
                    .await?
            }
            Settlement::DeadLetter { error } => {
                let json =
                    serde_json::to_string(&WireMessage::of(&delivery.message, delivery.timeout))?;
                self.dead_letter(entry_id, &json, error).await?;
                1
            }
        };
        if acked == 0 {
            // Another consumer reclaimed it while this one was slow, and settled it first.
            tracing::debug!(
                channel = %self.keys.channel, id = %delivery.message.id, entry = %entry_id,
                "queue message was already settled elsewhere"
            );
        }
        Ok(())
    }
}
