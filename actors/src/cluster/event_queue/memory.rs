//! The in-process adapter (embedded profile): one [`InProcessQueueBackend`] per process holds,
//! per channel, a FIFO of ready messages, a heap of delayed ones (retries and `delay`) and the
//! dead letters. Several [`InProcessEventQueue`]s may share a backend: that is several server
//! instances in one process, as the tests run them.
//!
//! Not durable: everything lives in memory, so a crash or restart loses queued, delayed and
//! in-flight messages and the dead letters. "Ack" is implicit: a fetched message is owned by
//! its consumer's task until settled. Delays use tokio's clock, so a paused clock drives them.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    DEAD_LETTER_RETAIN, DeadLetter, Delivery, EventQueue, PublishOptions, QueueHandler,
    QueueMessage, QueueSubscription, Settlement, Settler, Source, SubscribeOptions, Subscriptions,
    lock, new_message_id, start_consumer, unix_millis, validate_channel, validate_publish,
    validate_subscribe,
};
use crate::cluster::ClusterError;

/// The queues of every channel, shared by the `InProcessEventQueue`s of one process.
#[derive(Default)]
pub struct InProcessQueueBackend {
    channels: Mutex<HashMap<String, Arc<ChannelQueue>>>,
}

impl InProcessQueueBackend {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn channel(&self, channel: &str) -> Arc<ChannelQueue> {
        let mut channels = lock(&self.channels);
        Arc::clone(channels.entry(channel.to_owned()).or_default())
    }
}

#[derive(Default)]
struct ChannelQueue {
    state: Mutex<ChannelState>,
    /// Wakes the consumers waiting for this channel when a message is queued or delayed (the
    /// latter so they re-compute when to wake).
    wake: Notify,
}

#[derive(Default)]
struct ChannelState {
    ready: VecDeque<Queued>,
    delayed: BinaryHeap<Reverse<Delayed>>,
    dead: VecDeque<DeadLetter>,
    /// Breaks ties between delayed messages due at the same instant: first scheduled, first out.
    next_sequence: u64,
}

struct Queued {
    message: QueueMessage,
    timeout: Duration,
}

struct Delayed {
    due: Instant,
    sequence: u64,
    queued: Queued,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Delayed {}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.due, self.sequence).cmp(&(other.due, other.sequence))
    }
}

impl ChannelQueue {
    fn push_ready(&self, queued: Queued) {
        lock(&self.state).ready.push_back(queued);
        self.wake.notify_waiters();
    }

    fn push_front(&self, queued: Queued) {
        lock(&self.state).ready.push_front(queued);
        self.wake.notify_waiters();
    }

    fn push_delayed(&self, due: Instant, queued: Queued) {
        {
            let mut state = lock(&self.state);
            let sequence = state.next_sequence;
            state.next_sequence += 1;
            state.delayed.push(Reverse(Delayed {
                due,
                sequence,
                queued,
            }));
        }
        self.wake.notify_waiters();
    }

    fn push_dead(&self, letter: DeadLetter) {
        let mut state = lock(&self.state);
        state.dead.push_back(letter);
        while state.dead.len() > DEAD_LETTER_RETAIN {
            state.dead.pop_front();
        }
    }

    /// Moves due delayed messages to the tail of the FIFO, then takes up to `max` from its
    /// head. Also returns when the next delayed message is due.
    fn take(&self, max: usize) -> (Vec<Queued>, Option<Instant>) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        while state
            .delayed
            .peek()
            .is_some_and(|Reverse(delayed)| delayed.due <= now)
        {
            if let Some(Reverse(delayed)) = state.delayed.pop() {
                state.ready.push_back(delayed.queued);
            }
        }
        let count = max.min(state.ready.len());
        let taken = state.ready.drain(..count).collect();
        let next_due = state.delayed.peek().map(|Reverse(delayed)| delayed.due);
        (taken, next_due)
    }
}

/// One instance's view of an in-process backend.
pub struct InProcessEventQueue {
    backend: Arc<InProcessQueueBackend>,
    subscriptions: Subscriptions,
}

impl InProcessEventQueue {
    pub fn new(backend: Arc<InProcessQueueBackend>) -> Self {
        Self {
            backend,
            subscriptions: Subscriptions::default(),
        }
    }
}

#[async_trait]
impl EventQueue for InProcessEventQueue {
    async fn publish(
        &self,
        channel: &str,
        payload: Value,
        options: PublishOptions,
    ) -> Result<String, ClusterError> {
        validate_publish(channel, &options)?;
        let id = new_message_id();
        let queued = Queued {
            message: QueueMessage {
                id: id.clone(),
                channel: channel.to_owned(),
                payload,
                attempt: 0,
                max_retries: options.max_retries,
                published_at_ms: unix_millis(),
            },
            timeout: options.timeout,
        };
        let queue = self.backend.channel(channel);
        match options.delay {
            Some(delay) if !delay.is_zero() => queue.push_delayed(Instant::now() + delay, queued),
            _ => queue.push_ready(queued),
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
        let queue = self.backend.channel(channel);
        let source = MemorySource {
            queue: Arc::clone(&queue),
            poll_interval: options.poll_interval,
        };
        let settler = Arc::new(MemorySettler { queue });
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
        let queue = self.backend.channel(channel);
        let state = lock(&queue.state);
        Ok(state.dead.iter().take(limit).cloned().collect())
    }
}

struct MemorySource {
    queue: Arc<ChannelQueue>,
    poll_interval: Duration,
}

#[async_trait]
impl Source for MemorySource {
    async fn fetch(
        &mut self,
        max: usize,
        shutdown: &CancellationToken,
    ) -> Result<Vec<Delivery>, ClusterError> {
        // Registered before looking, so a publish between the look and the wait still wakes us.
        let woken = self.queue.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let (taken, next_due) = self.queue.take(max);
        if !taken.is_empty() {
            return Ok(taken.into_iter().map(into_delivery).collect());
        }
        let poll_deadline = Instant::now() + self.poll_interval;
        let wake_at = next_due.map_or(poll_deadline, |due| due.min(poll_deadline));
        tokio::select! {
            // Shutdown first: a stopped subscription must not take what a publish woke it for.
            biased;
            () = shutdown.cancelled() => return Ok(Vec::new()),
            () = &mut woken => {}
            () = tokio::time::sleep_until(wake_at) => {}
        }
        if shutdown.is_cancelled() {
            return Ok(Vec::new());
        }
        let (taken, _) = self.queue.take(max);
        Ok(taken.into_iter().map(into_delivery).collect())
    }
}

fn into_delivery(queued: Queued) -> Delivery {
    Delivery {
        message: queued.message,
        timeout: queued.timeout,
        receipt: String::new(),
        exhausted: None,
    }
}

struct MemorySettler {
    queue: Arc<ChannelQueue>,
}

#[async_trait]
impl Settler for MemorySettler {
    async fn settle(
        &self,
        delivery: &Delivery,
        settlement: &Settlement,
    ) -> Result<(), ClusterError> {
        match settlement {
            // The message left the FIFO when it was fetched: nothing is left to remove.
            Settlement::Ack => {}
            // At the head: it was next in line when it was taken.
            Settlement::Release => self.queue.push_front(Queued {
                message: delivery.message.clone(),
                timeout: delivery.timeout,
            }),
            Settlement::Retry { delay } => {
                let mut message = delivery.message.clone();
                message.attempt += 1;
                let queued = Queued {
                    message,
                    timeout: delivery.timeout,
                };
                self.queue.push_delayed(Instant::now() + *delay, queued);
            }
            Settlement::DeadLetter { error } => self.queue.push_dead(DeadLetter {
                message: delivery.message.clone(),
                error: error.clone(),
                failed_at_ms: unix_millis(),
            }),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};

    use futures::future::BoxFuture;
    use serde_json::json;

    use super::super::{DEFAULT_POLL_INTERVAL, HandlerError};
    use super::*;

    type Behaviour = Box<
        dyn Fn(QueueMessage, CancellationToken) -> BoxFuture<'static, Result<(), HandlerError>>
            + Send
            + Sync,
    >;

    /// Records every delivery and runs `behaviour` for it.
    struct Probe {
        behaviour: Behaviour,
        seen: Mutex<Vec<(QueueMessage, Instant)>>,
        idle: AtomicBool,
    }

    impl Probe {
        fn new(
            behaviour: impl Fn(
                QueueMessage,
                CancellationToken,
            ) -> BoxFuture<'static, Result<(), HandlerError>>
            + Send
            + Sync
            + 'static,
        ) -> Arc<Self> {
            Arc::new(Self {
                behaviour: Box::new(behaviour),
                seen: Mutex::new(Vec::new()),
                idle: AtomicBool::new(true),
            })
        }

        fn ok() -> Arc<Self> {
            Self::new(|_, _| Box::pin(async { Ok(()) }))
        }

        fn seen(&self) -> Vec<(QueueMessage, Instant)> {
            lock(&self.seen).clone()
        }

        fn payloads(&self) -> Vec<Value> {
            self.seen().into_iter().map(|(m, _)| m.payload).collect()
        }
    }

    #[async_trait]
    impl QueueHandler for Probe {
        async fn process(
            &self,
            message: QueueMessage,
            cancel: CancellationToken,
        ) -> Result<(), HandlerError> {
            lock(&self.seen).push((message.clone(), Instant::now()));
            (self.behaviour)(message, cancel).await
        }

        fn idle(&self) -> bool {
            self.idle.load(AtomicOrdering::SeqCst)
        }
    }

    /// Tracks the messages in flight and the most ever in flight at once.
    #[derive(Default)]
    struct InFlight {
        now: AtomicUsize,
        max: AtomicUsize,
        done: AtomicUsize,
    }

    impl InFlight {
        fn probe(self: &Arc<Self>, work: Duration) -> Arc<Probe> {
            let tracker = Arc::clone(self);
            Probe::new(move |_, _| {
                let tracker = Arc::clone(&tracker);
                Box::pin(async move {
                    let now = tracker.now.fetch_add(1, AtomicOrdering::SeqCst) + 1;
                    tracker.max.fetch_max(now, AtomicOrdering::SeqCst);
                    tokio::time::sleep(work).await;
                    tracker.now.fetch_sub(1, AtomicOrdering::SeqCst);
                    tracker.done.fetch_add(1, AtomicOrdering::SeqCst);
                    Ok(())
                })
            })
        }
    }

    fn queue() -> (Arc<InProcessQueueBackend>, InProcessEventQueue) {
        let backend = InProcessQueueBackend::new();
        let queue = InProcessEventQueue::new(Arc::clone(&backend));
        (backend, queue)
    }

    async fn publish(queue: &InProcessEventQueue, payload: Value) -> String {
        queue
            .publish("jobs", payload, PublishOptions::default())
            .await
            .expect("published")
    }

    async fn subscribe(
        queue: &InProcessEventQueue,
        handler: Arc<Probe>,
        options: SubscribeOptions,
    ) -> QueueSubscription {
        queue
            .subscribe("jobs", handler, options)
            .await
            .expect("subscribed")
    }

    async fn until(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(3600);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn dead(queue: &InProcessEventQueue, count: usize) -> Vec<DeadLetter> {
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            let letters = queue.dead_letters("jobs", 100).await.expect("read");
            if letters.len() >= count {
                return letters;
            }
            assert!(Instant::now() < deadline, "no dead letters");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn delivers_in_fifo_order() {
        let (_, queue) = queue();
        for n in 0..20 {
            publish(&queue, json!(n)).await;
        }
        let probe = Probe::ok();
        let _subscription = subscribe(&queue, probe.clone(), SubscribeOptions::default()).await;
        until("all 20", || probe.seen().len() == 20).await;
        assert_eq!(
            probe.payloads(),
            (0..20).map(|n| json!(n)).collect::<Vec<_>>()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_limit_is_exact() {
        for concurrency in [1, 2] {
            let (_, queue) = queue();
            let tracker = Arc::new(InFlight::default());
            let _subscription = subscribe(
                &queue,
                tracker.probe(Duration::from_millis(100)),
                SubscribeOptions {
                    concurrency,
                    ..SubscribeOptions::default()
                },
            )
            .await;
            // Published while the consumer runs, in bursts, to race fetches against settles.
            for n in 0..12 {
                publish(&queue, json!(n)).await;
                if n % 3 == 0 {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            }
            until("all done", || {
                tracker.done.load(AtomicOrdering::SeqCst) == 12
            })
            .await;
            assert_eq!(tracker.max.load(AtomicOrdering::SeqCst), concurrency);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_concurrency_runs_everything_at_once() {
        let (_, queue) = queue();
        let tracker = Arc::new(InFlight::default());
        for n in 0..30 {
            publish(&queue, json!(n)).await;
        }
        let _subscription = subscribe(
            &queue,
            tracker.probe(Duration::from_secs(1)),
            SubscribeOptions {
                concurrency: 0,
                ..SubscribeOptions::default()
            },
        )
        .await;
        until("all done", || {
            tracker.done.load(AtomicOrdering::SeqCst) == 30
        })
        .await;
        assert_eq!(tracker.max.load(AtomicOrdering::SeqCst), 30);
    }

    #[tokio::test(start_paused = true)]
    async fn not_idle_holds_messages_until_idle() {
        let (_, queue) = queue();
        let probe = Probe::ok();
        probe.idle.store(false, AtomicOrdering::SeqCst);
        let _subscription = subscribe(&queue, probe.clone(), SubscribeOptions::default()).await;
        publish(&queue, json!("held")).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(probe.seen().is_empty(), "delivered while not idle");

        let turned_idle = Instant::now();
        probe.idle.store(true, AtomicOrdering::SeqCst);
        until("delivery", || probe.seen().len() == 1).await;
        let waited = probe.seen()[0].1 - turned_idle;
        assert!(waited <= DEFAULT_POLL_INTERVAL, "waited {waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_retry_with_growing_delays_then_dead_letter() {
        let (_, queue) = queue();
        let probe = Probe::new(|message, _| {
            Box::pin(async move { Err(format!("boom on attempt {}", message.attempt).into()) })
        });
        let id = publish(&queue, json!("poison")).await;
        let _subscription = subscribe(&queue, probe.clone(), SubscribeOptions::default()).await;
        let letters = dead(&queue, 1).await;

        let seen = probe.seen();
        let attempts: Vec<u32> = seen.iter().map(|(m, _)| m.attempt).collect();
        assert_eq!(
            attempts,
            vec![0, 1, 2, 3],
            "first delivery and max_retries = 3 retries"
        );
        assert!(
            seen.iter().all(|(m, _)| m.id == id),
            "the id is stable across retries"
        );
        let gaps: Vec<Duration> = seen.windows(2).map(|pair| pair[1].1 - pair[0].1).collect();
        assert_eq!(
            gaps,
            vec![
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(4)
            ]
        );

        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].message.id, id);
        assert_eq!(letters[0].message.attempt, 3);
        assert_eq!(letters[0].error, "boom on attempt 3");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(probe.seen().len(), 4, "nothing after the dead letter");
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_capped() {
        let (_, queue) = queue();
        let probe = Probe::new(|_, _| Box::pin(async { Err("no".into()) }));
        queue
            .publish(
                "jobs",
                json!(1),
                PublishOptions {
                    max_retries: 4,
                    ..PublishOptions::default()
                },
            )
            .await
            .expect("published");
        let _subscription = subscribe(
            &queue,
            probe.clone(),
            SubscribeOptions {
                backoff_base: Duration::from_secs(1),
                backoff_max: Duration::from_secs(3),
                ..SubscribeOptions::default()
            },
        )
        .await;
        dead(&queue, 1).await;
        let seen = probe.seen();
        let gaps: Vec<u64> = seen
            .windows(2)
            .map(|p| (p[1].1 - p[0].1).as_secs())
            .collect();
        assert_eq!(gaps, vec![1, 2, 3, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_cancels_the_handler_and_counts_as_a_failure() {
        let (_, queue) = queue();
        let token_seen: Arc<Mutex<Option<CancellationToken>>> = Arc::default();
        let dropped = Arc::new(AtomicBool::new(false));

        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, AtomicOrdering::SeqCst);
            }
        }

        let probe = {
            let token_seen = Arc::clone(&token_seen);
            let dropped = Arc::clone(&dropped);
            Probe::new(move |_, cancel| {
                *lock(&token_seen) = Some(cancel);
                let guard = SetOnDrop(Arc::clone(&dropped));
                Box::pin(async move {
                    let _guard = guard;
                    std::future::pending::<()>().await;
                    Ok(())
                })
            })
        };
        queue
            .publish(
                "jobs",
                json!("slow"),
                PublishOptions {
                    timeout: Duration::from_secs(5),
                    max_retries: 0,
                    delay: None,
                },
            )
            .await
            .expect("published");
        let started = Instant::now();
        let _subscription = subscribe(&queue, probe.clone(), SubscribeOptions::default()).await;
        let letters = dead(&queue, 1).await;
        let elapsed = Instant::now() - started;

        assert!(
            letters[0].error.contains("timed out"),
            "{}",
            letters[0].error
        );
        assert!(elapsed >= Duration::from_secs(5) && elapsed < Duration::from_secs(6));
        let token = lock(&token_seen).clone().expect("the handler ran");
        assert!(token.is_cancelled(), "the token fired");
        assert!(
            dropped.load(AtomicOrdering::SeqCst),
            "the handler future was dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_handler_is_a_failure_and_the_consumer_goes_on() {
        let (_, queue) = queue();
        let probe = Probe::new(|message, _| {
            Box::pin(async move {
                if message.payload == json!("panic") {
                    panic!("handler exploded");
                }
                Ok(())
            })
        });
        let options = PublishOptions {
            max_retries: 0,
            ..PublishOptions::default()
        };
        queue
            .publish("jobs", json!("panic"), options)
            .await
            .expect("published");
        queue
            .publish("jobs", json!("fine"), options)
            .await
            .expect("published");
        let _subscription = subscribe(&queue, probe.clone(), SubscribeOptions::default()).await;
        let letters = dead(&queue, 1).await;
        assert!(
            letters[0].error.contains("panicked: handler exploded"),
            "{}",
            letters[0].error
        );
        until("the next message", || probe.seen().len() == 2).await;
        assert_eq!(probe.payloads(), vec![json!("panic"), json!("fine")]);
    }

    #[tokio::test(start_paused = true)]
    async fn delay_holds_a_message_back() {
        let (_, queue) = queue();
        let probe = Probe::ok();
        let _subscription = subscribe(&queue, probe.clone(), SubscribeOptions::default()).await;
        let published = Instant::now();
        queue
            .publish(
                "jobs",
                json!("later"),
                PublishOptions {
                    delay: Some(Duration::from_secs(30)),
                    ..PublishOptions::default()
                },
            )
            .await
            .expect("published");
        publish(&queue, json!("now")).await;
        until("both", || probe.seen().len() == 2).await;
        let seen = probe.seen();
        assert_eq!(seen[0].0.payload, json!("now"));
        assert_eq!(seen[1].0.payload, json!("later"));
        assert_eq!(seen[1].1 - published, Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn publish_without_subscriber_is_delivered_on_subscribe() {
        let (_, queue) = queue();
        let id = publish(&queue, json!({"job": 1})).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let probe = Probe::ok();
        let _subscription = subscribe(&queue, probe.clone(), SubscribeOptions::default()).await;
        until("delivery", || probe.seen().len() == 1).await;
        let message = &probe.seen()[0].0;
        assert_eq!(message.id, id);
        assert_eq!(message.channel, "jobs");
        assert_eq!(message.payload, json!({"job": 1}));
        assert_eq!((message.attempt, message.max_retries), (0, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn instances_sharing_a_backend_split_the_work_exactly_once() {
        let backend = InProcessQueueBackend::new();
        let a = InProcessEventQueue::new(Arc::clone(&backend));
        let b = InProcessEventQueue::new(Arc::clone(&backend));
        let work = || {
            Probe::new(|_, _| {
                Box::pin(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(())
                })
            })
        };
        let (at_a, at_b) = (work(), work());
        let options = SubscribeOptions {
            concurrency: 3,
            ..SubscribeOptions::default()
        };
        let _sa = subscribe(&a, at_a.clone(), options).await;
        let _sb = subscribe(&b, at_b.clone(), options).await;
        let mut published = HashSet::new();
        for n in 0..100 {
            let queue = if n % 2 == 0 { &a } else { &b };
            published.insert(publish(queue, json!(n)).await);
        }
        until("all", || at_a.seen().len() + at_b.seen().len() >= 100).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let ids: Vec<String> = at_a
            .seen()
            .into_iter()
            .chain(at_b.seen())
            .map(|(m, _)| m.id)
            .collect();
        assert_eq!(ids.len(), 100, "each message once");
        assert_eq!(ids.into_iter().collect::<HashSet<_>>(), published);
        assert!(
            !at_a.seen().is_empty() && !at_b.seen().is_empty(),
            "both took work"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn close_waits_for_in_flight_messages() {
        let (_, queue) = queue();
        let finished = Arc::new(AtomicBool::new(false));
        let probe = {
            let finished = Arc::clone(&finished);
            Probe::new(move |_, cancel| {
                let finished = Arc::clone(&finished);
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    assert!(!cancel.is_cancelled(), "close does not cancel");
                    finished.store(true, AtomicOrdering::SeqCst);
                    Ok(())
                })
            })
        };
        let subscription = subscribe(&queue, probe.clone(), SubscribeOptions::default()).await;
        publish(&queue, json!("long")).await;
        publish(&queue, json!("not started")).await;
        until("start", || probe.seen().len() == 1).await;
        let closing = Instant::now();
        subscription.close().await;
        assert!(
            finished.load(AtomicOrdering::SeqCst),
            "in-flight message finished"
        );
        assert!(Instant::now() - closing >= Duration::from_secs(9));
        assert!(
            queue
                .dead_letters("jobs", 10)
                .await
                .expect("read")
                .is_empty()
        );

        // Acked: a new subscription gets only the message that had not started.
        let after = Probe::ok();
        let _again = subscribe(&queue, after.clone(), SubscribeOptions::default()).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(after.payloads(), vec![json!("not started")]);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_a_subscription_fires_in_flight_tokens() {
        let (_, queue) = queue();
        let probe = Probe::new(|_, cancel| {
            Box::pin(async move {
                cancel.cancelled().await;
                Err("cancelled".into())
            })
        });
        let subscription = subscribe(&queue, probe.clone(), SubscribeOptions::default()).await;
        publish(&queue, json!("x")).await;
        until("start", || probe.seen().len() == 1).await;
        drop(subscription);
        // The handler returns on the token, and the failure schedules a retry.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let state = lock(&queue.backend.channel("jobs").state).delayed.len();
        assert_eq!(state, 1, "the cancelled attempt is retried later");
    }

    #[tokio::test]
    async fn a_second_subscription_per_channel_is_rejected() {
        let (_, queue) = queue();
        let first = subscribe(&queue, Probe::ok(), SubscribeOptions::default()).await;
        let second = queue
            .subscribe("jobs", Probe::ok(), SubscribeOptions::default())
            .await;
        assert!(matches!(second, Err(ClusterError::InvalidArgument(_))));
        first.close().await;
        let _third = subscribe(&queue, Probe::ok(), SubscribeOptions::default()).await;
    }
}
