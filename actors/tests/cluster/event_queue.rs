//! The EventQueue contract, run against the in-process adapter and (with the
//! `integration-tests` feature) against the real Redis, plus Redis-only tests: a consumer killed
//! mid-message, a poison message's backoff, 200 messages across two instances, delayed publish
//! and a Redis restart.

use crate::common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use plugin_server_actors::cluster::ClusterError;
use plugin_server_actors::cluster::event_queue::{
    DeadLetter, EventQueue, HandlerError, InProcessEventQueue, InProcessQueueBackend,
    PublishOptions, QueueHandler, QueueMessage, QueueSubscription, SubscribeOptions,
};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Makes queue instance `name` of the deployment `prefix`; instances of one factory and prefix
/// share their queues.
type Factory = Box<dyn Fn(&str, &str) -> BoxFuture<'static, Arc<dyn EventQueue>> + Send + Sync>;

fn in_process_factory() -> Factory {
    let backend = InProcessQueueBackend::new();
    Box::new(move |_name: &str, _prefix: &str| {
        let queue: Arc<dyn EventQueue> = Arc::new(InProcessEventQueue::new(Arc::clone(&backend)));
        Box::pin(async move { queue })
    })
}

const WAIT: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_millis(400);
const CHANNEL: &str = "jobs";

type Behaviour = Box<
    dyn Fn(QueueMessage, CancellationToken) -> BoxFuture<'static, Result<(), HandlerError>>
        + Send
        + Sync,
>;

/// A handler that records each delivery with its instant and runs `behaviour`.
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

    fn sleeping(work: Duration) -> Arc<Self> {
        Self::new(move |_, _| {
            Box::pin(async move {
                tokio::time::sleep(work).await;
                Ok(())
            })
        })
    }

    fn seen(&self) -> Vec<(QueueMessage, Instant)> {
        self.seen.lock().expect("seen lock").clone()
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
        self.seen
            .lock()
            .expect("seen lock")
            .push((message.clone(), Instant::now()));
        (self.behaviour)(message, cancel).await
    }

    fn idle(&self) -> bool {
        self.idle.load(Ordering::SeqCst)
    }
}

fn fast() -> SubscribeOptions {
    SubscribeOptions {
        backoff_base: Duration::from_millis(50),
        poll_interval: Duration::from_millis(20),
        ..SubscribeOptions::default()
    }
}

async fn subscribe(
    queue: &Arc<dyn EventQueue>,
    handler: Arc<Probe>,
    options: SubscribeOptions,
) -> QueueSubscription {
    queue
        .subscribe(CHANNEL, handler, options)
        .await
        .expect("subscribed")
}

async fn publish(queue: &Arc<dyn EventQueue>, payload: Value, options: PublishOptions) -> String {
    queue
        .publish(CHANNEL, payload, options)
        .await
        .expect("published")
}

async fn until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn dead_letters(queue: &Arc<dyn EventQueue>, count: usize) -> Vec<DeadLetter> {
    let deadline = Instant::now() + WAIT;
    loop {
        let letters = queue.dead_letters(CHANNEL, 100).await.expect("read");
        if letters.len() >= count {
            return letters;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {count} dead letters"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The contract

async fn published_before_subscribe_is_delivered(factory: Factory) {
    let prefix = common::unique_prefix("eq");
    let queue = factory("a", &prefix).await;
    let id = publish(
        &queue,
        json!({"job": "x", "n": [1, 2]}),
        PublishOptions::default(),
    )
    .await;
    let probe = Probe::ok();
    let _subscription = subscribe(&queue, probe.clone(), fast()).await;
    until("delivery", || probe.seen().len() == 1).await;
    let message = probe.seen()[0].0.clone();
    assert_eq!(message.id, id);
    assert_eq!(message.channel, CHANNEL);
    assert_eq!(message.payload, json!({"job": "x", "n": [1, 2]}));
    assert_eq!((message.attempt, message.max_retries), (0, 3));
    assert!(message.published_at_ms > 0);
    tokio::time::sleep(QUIET).await;
    assert_eq!(probe.seen().len(), 1, "acked: delivered once");
}

async fn fifo_with_concurrency_one(factory: Factory) {
    let prefix = common::unique_prefix("eq");
    let queue = factory("a", &prefix).await;
    for n in 0..20 {
        publish(&queue, json!(n), PublishOptions::default()).await;
    }
    let probe = Probe::ok();
    let _subscription = subscribe(&queue, probe.clone(), fast()).await;
    until("all", || probe.seen().len() == 20).await;
    assert_eq!(
        probe.payloads(),
        (0..20).map(|n| json!(n)).collect::<Vec<_>>()
    );
}

async fn concurrency_is_exact(factory: Factory) {
    for concurrency in [1, 3] {
        let prefix = common::unique_prefix("eq");
        let queue = factory("a", &prefix).await;
        let now = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let probe = {
            let (now, max, done) = (now.clone(), max.clone(), done.clone());
            Probe::new(move |_, _| {
                let (now, max, done) = (now.clone(), max.clone(), done.clone());
                Box::pin(async move {
                    let in_flight = now.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(in_flight, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
            })
        };
        let _subscription = subscribe(
            &queue,
            probe,
            SubscribeOptions {
                concurrency,
                ..fast()
            },
        )
        .await;
        for n in 0..15 {
            publish(&queue, json!(n), PublishOptions::default()).await;
        }
        until("all done", || done.load(Ordering::SeqCst) == 15).await;
        assert_eq!(max.load(Ordering::SeqCst), concurrency);
    }
}

async fn failures_retry_with_the_same_id_then_dead_letter(factory: Factory) {
    let prefix = common::unique_prefix("eq");
    let queue = factory("a", &prefix).await;
    let probe = Probe::new(|message, _| {
        Box::pin(async move { Err(format!("boom {}", message.attempt).into()) })
    });
    let id = publish(
        &queue,
        json!("poison"),
        PublishOptions {
            max_retries: 2,
            ..PublishOptions::default()
        },
    )
    .await;
    let _subscription = subscribe(&queue, probe.clone(), fast()).await;
    let letters = dead_letters(&queue, 1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].message.id, id);
    assert_eq!(letters[0].message.attempt, 2);
    assert_eq!(letters[0].message.payload, json!("poison"));
    assert_eq!(letters[0].error, "boom 2");
    assert!(letters[0].failed_at_ms > 0);
    let seen = probe.seen();
    assert_eq!(
        seen.iter().map(|(m, _)| m.attempt).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert!(seen.iter().all(|(m, _)| m.id == id));
    tokio::time::sleep(QUIET).await;
    assert_eq!(probe.seen().len(), 3, "nothing after the dead letter");
}

async fn success_after_a_retry_is_acked(factory: Factory) {
    let prefix = common::unique_prefix("eq");
    let queue = factory("a", &prefix).await;
    let probe = Probe::new(|message, _| {
        Box::pin(async move {
            if message.attempt == 0 {
                Err("flaky".into())
            } else {
                Ok(())
            }
        })
    });
    publish(&queue, json!("flaky"), PublishOptions::default()).await;
    let _subscription = subscribe(&queue, probe.clone(), fast()).await;
    until("the retry", || probe.seen().len() == 2).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(probe.seen().len(), 2);
    assert!(
        queue
            .dead_letters(CHANNEL, 10)
            .await
            .expect("read")
            .is_empty()
    );
}

async fn timeout_is_a_failure(factory: Factory) {
    let prefix = common::unique_prefix("eq");
    let queue = factory("a", &prefix).await;
    let fired = Arc::new(AtomicBool::new(false));
    let probe = {
        let fired = fired.clone();
        Probe::new(move |_, cancel| {
            let fired = fired.clone();
            Box::pin(async move {
                // Records that the token fired, then hangs: only dropping the future ends it.
                tokio::spawn(async move {
                    cancel.cancelled().await;
                    fired.store(true, Ordering::SeqCst);
                });
                std::future::pending::<()>().await;
                Ok(())
            })
        })
    };
    publish(
        &queue,
        json!("slow"),
        PublishOptions {
            timeout: Duration::from_millis(200),
            max_retries: 0,
            delay: None,
        },
    )
    .await;
    let _subscription = subscribe(&queue, probe, fast()).await;
    let letters = dead_letters(&queue, 1).await;
    assert!(
        letters[0].error.contains("timed out"),
        "{}",
        letters[0].error
    );
    until("the token fired", || fired.load(Ordering::SeqCst)).await;
}

async fn a_panic_is_a_failure_and_the_consumer_goes_on(factory: Factory) {
    let prefix = common::unique_prefix("eq");
    let queue = factory("a", &prefix).await;
    let probe = Probe::new(|message, _| {
        Box::pin(async move {
            assert_ne!(message.payload, json!("panic"), "handler exploded");
            Ok(())
        })
    });
    let once = PublishOptions {
        max_retries: 0,
        ..PublishOptions::default()
    };
    publish(&queue, json!("panic"), once).await;
    publish(&queue, json!("fine"), once).await;
    let _subscription = subscribe(&queue, probe.clone(), fast()).await;
    let letters = dead_letters(&queue, 1).await;
    assert!(
        letters[0].error.contains("panicked"),
        "{}",
        letters[0].error
    );
    until("the next one", || probe.seen().len() == 2).await;
    assert_eq!(probe.payloads(), vec![json!("panic"), json!("fine")]);
}

async fn not_idle_holds_messages(factory: Factory) {
    let prefix = common::unique_prefix("eq");
    let queue = factory("a", &prefix).await;
    let probe = Probe::ok();
    probe.idle.store(false, Ordering::SeqCst);
    let _subscription = subscribe(&queue, probe.clone(), fast()).await;
    publish(&queue, json!("held"), PublishOptions::default()).await;
    tokio::time::sleep(QUIET).await;
    assert!(probe.seen().is_empty(), "delivered while not idle");
    probe.idle.store(true, Ordering::SeqCst);
    until("delivery once idle", || probe.seen().len() == 1).await;
}

async fn one_subscription_per_channel_per_instance(factory: Factory) {
    let prefix = common::unique_prefix("eq");
    let queue = factory("a", &prefix).await;
    let first = subscribe(&queue, Probe::ok(), fast()).await;
    let second = queue.subscribe(CHANNEL, Probe::ok(), fast()).await;
    assert!(matches!(second, Err(ClusterError::InvalidArgument(_))));
    // Another instance may consume the same channel.
    let other = factory("b", &prefix).await;
    let _at_other = subscribe(&other, Probe::ok(), fast()).await;
    first.close().await;
    let _again = subscribe(&queue, Probe::ok(), fast()).await;
}

async fn two_instances_process_each_message_once(factory: Factory) {
    let prefix = common::unique_prefix("eq");
    let a = factory("a", &prefix).await;
    let b = factory("b", &prefix).await;
    let mut published = HashSet::new();
    for n in 0..60 {
        let queue = if n % 2 == 0 { &a } else { &b };
        published.insert(publish(queue, json!(n), PublishOptions::default()).await);
    }
    let options = SubscribeOptions {
        concurrency: 2,
        ..fast()
    };
    let (at_a, at_b) = (
        Probe::sleeping(Duration::from_millis(10)),
        Probe::sleeping(Duration::from_millis(10)),
    );
    let _sa = subscribe(&a, at_a.clone(), options).await;
    let _sb = subscribe(&b, at_b.clone(), options).await;
    until("all", || at_a.seen().len() + at_b.seen().len() >= 60).await;
    tokio::time::sleep(QUIET).await;
    let ids: Vec<String> = at_a
        .seen()
        .into_iter()
        .chain(at_b.seen())
        .map(|(m, _)| m.id)
        .collect();
    assert_eq!(ids.len(), 60, "each message once");
    assert_eq!(ids.into_iter().collect::<HashSet<_>>(), published);
    assert!(
        !at_a.seen().is_empty() && !at_b.seen().is_empty(),
        "both took work"
    );
}

async fn close_waits_for_in_flight(factory: Factory) {
    let prefix = common::unique_prefix("eq");
    let queue = factory("a", &prefix).await;
    let finished = Arc::new(AtomicBool::new(false));
    let probe = {
        let finished = finished.clone();
        Probe::new(move |_, _| {
            let finished = finished.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                finished.store(true, Ordering::SeqCst);
                Ok(())
            })
        })
    };
    let subscription = subscribe(&queue, probe.clone(), fast()).await;
    publish(&queue, json!("long"), PublishOptions::default()).await;
    until("start", || probe.seen().len() == 1).await;
    subscription.close().await;
    assert!(
        finished.load(Ordering::SeqCst),
        "close returned before the handler finished"
    );

    let after = Probe::ok();
    let _again = subscribe(&queue, after.clone(), fast()).await;
    tokio::time::sleep(QUIET).await;
    assert!(after.seen().is_empty(), "the drained message was acked");
}

async fn delayed_publish_waits(factory: Factory) {
    let prefix = common::unique_prefix("eq");
    let queue = factory("a", &prefix).await;
    let probe = Probe::ok();
    let _subscription = subscribe(&queue, probe.clone(), fast()).await;
    let published = Instant::now();
    publish(
        &queue,
        json!("later"),
        PublishOptions {
            delay: Some(Duration::from_millis(500)),
            ..PublishOptions::default()
        },
    )
    .await;
    publish(&queue, json!("now"), PublishOptions::default()).await;
    until("both", || probe.seen().len() == 2).await;
    let seen = probe.seen();
    assert_eq!(seen[0].0.payload, json!("now"));
    let waited = seen[1].1 - published;
    assert!(
        waited >= Duration::from_millis(480),
        "delivered after {waited:?}"
    );
}

macro_rules! contract {
    ($module:ident, $factory:expr) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn published_before_subscribe_is_delivered() {
                super::published_before_subscribe_is_delivered($factory).await;
            }
            #[tokio::test]
            async fn fifo_with_concurrency_one() {
                super::fifo_with_concurrency_one($factory).await;
            }
            #[tokio::test]
            async fn concurrency_is_exact() {
                super::concurrency_is_exact($factory).await;
            }
            #[tokio::test]
            async fn failures_retry_with_the_same_id_then_dead_letter() {
                super::failures_retry_with_the_same_id_then_dead_letter($factory).await;
            }
            #[tokio::test]
            async fn success_after_a_retry_is_acked() {
                super::success_after_a_retry_is_acked($factory).await;
            }
            #[tokio::test]
            async fn timeout_is_a_failure() {
                super::timeout_is_a_failure($factory).await;
            }
            #[tokio::test]
            async fn a_panic_is_a_failure_and_the_consumer_goes_on() {
                super::a_panic_is_a_failure_and_the_consumer_goes_on($factory).await;
            }
            #[tokio::test]
            async fn not_idle_holds_messages() {
                super::not_idle_holds_messages($factory).await;
            }
            #[tokio::test]
            async fn one_subscription_per_channel_per_instance() {
                super::one_subscription_per_channel_per_instance($factory).await;
            }
            #[tokio::test]
            async fn two_instances_process_each_message_once() {
                super::two_instances_process_each_message_once($factory).await;
            }
            #[tokio::test]
            async fn close_waits_for_in_flight() {
                super::close_waits_for_in_flight($factory).await;
            }
            #[tokio::test]
            async fn delayed_publish_waits() {
                super::delayed_publish_waits($factory).await;
            }
        }
    };
}

contract!(in_process, in_process_factory());

#[cfg(feature = "integration-tests")]
contract!(redis, redis_backed::factory());

// ---------------------------------------------------------------------------------------------
// Redis only

#[cfg(feature = "integration-tests")]
mod redis_backed {
    use super::*;
    use plugin_server_actors::cluster::InstanceId;
    use plugin_server_actors::cluster::event_queue::RedisEventQueue;
    use plugin_server_actors::cluster::redis_pool::RedisPool;
    use tokio::io::{AsyncBufReadExt, BufReader};

    /// Each instance gets its own pool, as separate processes would.
    pub fn factory_for(url: String) -> Factory {
        Box::new(move |name: &str, prefix: &str| {
            let url = url.clone();
            let name = format!("{name}-{}", uuid::Uuid::new_v4().simple());
            let prefix = prefix.to_owned();
            Box::pin(async move {
                let pool = common::redis_pool(&url).await;
                let queue: Arc<dyn EventQueue> =
                    Arc::new(RedisEventQueue::new(pool, prefix, InstanceId::new(name)));
                queue
            })
        })
    }

    pub fn factory() -> Factory {
        factory_for(common::redis_url())
    }

    fn stream(prefix: &str) -> String {
        format!("{prefix}queue:{CHANNEL}")
    }

    /// `XPENDING <stream> <group> - + 100` as (entry id, consumer, deliveries).
    async fn pending(pool: &RedisPool, prefix: &str) -> Vec<(String, String, u64)> {
        let mut connection = pool.get().await.expect("connection");
        let rows: Vec<(String, String, u64, u64)> = ::redis::cmd("XPENDING")
            .arg(stream(prefix))
            .arg(format!("{prefix}workers"))
            .arg("-")
            .arg("+")
            .arg(100)
            .query_async(&mut connection)
            .await
            .expect("xpending");
        rows.into_iter()
            .map(|(id, consumer, _idle, deliveries)| (id, consumer, deliveries))
            .collect()
    }

    const CHILD_ENV: &str = "EVENT_QUEUE_TEST_CHILD";
    /// The child test's name as the harness lists it: its module path without the crate.
    fn child_test() -> String {
        let module = module_path!();
        let path = module.split_once("::").map_or(module, |(_, rest)| rest);
        format!("{path}::child_consumer_that_hangs")
    }

    /// Not a test on its own: the child process of
    /// `a_consumer_killed_mid_message_has_it_redelivered`. It consumes as instance
    /// `$EVENT_QUEUE_TEST_CHILD`, prints `got <id>` for the first message and hangs.
    #[tokio::test]
    #[ignore = "run as a child process by a_consumer_killed_mid_message_has_it_redelivered"]
    async fn child_consumer_that_hangs() {
        let Ok(spec) = std::env::var(CHILD_ENV) else {
            return;
        };
        let (consumer, prefix) = spec.split_once('|').expect("<consumer>|<prefix>");
        let pool = common::redis_pool(&common::redis_url()).await;
        let queue = RedisEventQueue::new(pool, prefix, InstanceId::new(consumer));
        let probe = Probe::new(|message, _| {
            Box::pin(async move {
                println!("got {}", message.id);
                std::future::pending::<()>().await;
                Ok(())
            })
        });
        let _subscription = queue
            .subscribe(CHANNEL, probe, fast())
            .await
            .expect("subscribed");
        std::future::pending::<()>().await;
    }

    #[tokio::test]
    async fn a_consumer_killed_mid_message_has_it_redelivered() {
        let url = common::redis_url();
        let prefix = common::unique_prefix("eq-kill");
        let pool = common::redis_pool(&url).await;
        let child_consumer = format!("child-{}", uuid::Uuid::new_v4().simple());
        let queue = RedisEventQueue::new(pool.clone(), prefix.clone(), InstanceId::generate());
        // A long timeout: the child must still be "processing" when it is killed.
        let id = queue
            .publish(
                CHANNEL,
                json!("survives"),
                PublishOptions {
                    timeout: Duration::from_secs(60),
                    ..PublishOptions::default()
                },
            )
            .await
            .expect("published");

        let mut child = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", &child_test(), "--ignored", "--nocapture"])
            .env(CHILD_ENV, format!("{child_consumer}|{prefix}"))
            .env("REDIS_URL", &url)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("child started");
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let got = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.expect("child stdout") {
                if let Some((_, id)) = line.split_once("got ") {
                    return id.trim().to_owned();
                }
            }
            panic!("the child exited without receiving the message");
        })
        .await
        .expect("the child received the message within 60 s");
        assert_eq!(got, id);
        child.kill().await.expect("SIGKILL");

        let before = pending(&pool, &prefix).await;
        assert_eq!(before.len(), 1, "the dead child never acked: {before:?}");
        assert_eq!(before[0].1, child_consumer);

        let probe = Probe::ok();
        let queue: Arc<dyn EventQueue> = Arc::new(queue);
        let _subscription = subscribe(
            &queue,
            probe.clone(),
            SubscribeOptions {
                reclaim_idle: Duration::from_secs(1),
                ..fast()
            },
        )
        .await;
        until("the reclaimed message", || probe.seen().len() == 1).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let seen = probe.seen();
        assert_eq!(seen.len(), 1, "processed once");
        assert_eq!(seen[0].0.id, id, "same id");
        assert_eq!(
            seen[0].0.attempt, 1,
            "the dead consumer's delivery counts as an attempt"
        );
        assert!(pending(&pool, &prefix).await.is_empty(), "acked");
    }

    #[tokio::test]
    async fn a_poison_message_backs_off_then_is_dead_lettered() {
        let prefix = common::unique_prefix("eq-poison");
        let queue = factory()("a", &prefix).await;
        let probe = Probe::new(|message, _| {
            Box::pin(async move { Err(format!("poison on attempt {}", message.attempt).into()) })
        });
        let id = publish(
            &queue,
            json!("poison"),
            PublishOptions {
                max_retries: 3,
                ..PublishOptions::default()
            },
        )
        .await;
        let base = Duration::from_millis(200);
        let _subscription = subscribe(
            &queue,
            probe.clone(),
            SubscribeOptions {
                backoff_base: base,
                ..fast()
            },
        )
        .await;
        let letters = dead_letters(&queue, 1).await;
        assert_eq!(letters[0].message.id, id);
        assert_eq!(letters[0].error, "poison on attempt 3");

        let seen = probe.seen();
        assert_eq!(
            seen.iter().map(|(m, _)| m.attempt).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        let gaps: Vec<Duration> = seen.windows(2).map(|pair| pair[1].1 - pair[0].1).collect();
        for (n, gap) in gaps.iter().enumerate() {
            let expected = base * 2u32.pow(n as u32);
            // Late by at most a poll interval, a blocking read and the round trips.
            assert!(
                *gap >= expected - Duration::from_millis(5)
                    && *gap <= expected + Duration::from_millis(250),
                "retry {n} came after {gap:?}, expected about {expected:?} (all: {gaps:?})"
            );
        }
    }

    #[tokio::test]
    async fn two_hundred_messages_across_two_instances_each_processed_once() {
        let prefix = common::unique_prefix("eq-200");
        let a = factory()("a", &prefix).await;
        let b = factory()("b", &prefix).await;
        let processed: Arc<Mutex<HashSet<String>>> = Arc::default();
        let count = Arc::new(AtomicUsize::new(0));
        let handler = || {
            let (processed, count) = (processed.clone(), count.clone());
            Probe::new(move |message, _| {
                let (processed, count) = (processed.clone(), count.clone());
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    processed.lock().unwrap().insert(message.id);
                    count.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
            })
        };
        let (at_a, at_b) = (handler(), handler());
        let options = SubscribeOptions {
            concurrency: 4,
            ..fast()
        };
        let _sa = subscribe(&a, at_a.clone(), options).await;
        let _sb = subscribe(&b, at_b.clone(), options).await;
        let mut published = HashSet::new();
        for n in 0..200 {
            let queue = if n % 2 == 0 { &a } else { &b };
            published.insert(publish(queue, json!(n), PublishOptions::default()).await);
        }
        until("200 processed", || count.load(Ordering::SeqCst) >= 200).await;
        tokio::time::sleep(QUIET).await;
        assert_eq!(
            count.load(Ordering::SeqCst),
            200,
            "no message processed twice"
        );
        assert_eq!(*processed.lock().unwrap(), published);
        assert!(
            !at_a.seen().is_empty() && !at_b.seen().is_empty(),
            "both took work"
        );
    }

    #[tokio::test]
    async fn a_delayed_publish_is_not_delivered_early() {
        let prefix = common::unique_prefix("eq-delay");
        let queue = factory()("a", &prefix).await;
        let probe = Probe::ok();
        let _subscription = subscribe(&queue, probe.clone(), fast()).await;
        let published = Instant::now();
        publish(
            &queue,
            json!("in a second"),
            PublishOptions {
                delay: Some(Duration::from_secs(1)),
                ..PublishOptions::default()
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(probe.seen().is_empty(), "delivered before the delay");
        until("the delayed message", || probe.seen().len() == 1).await;
        let waited = probe.seen()[0].1 - published;
        assert!(
            waited >= Duration::from_millis(990) && waited < Duration::from_secs(2),
            "delivered after {waited:?}"
        );
    }

    #[tokio::test]
    async fn the_consumer_recovers_from_a_redis_restart() {
        let mut redis = common::PrivateRedis::start();
        let factory = factory_for(redis.url());
        let prefix = common::unique_prefix("eq-restart");
        let queue = factory("a", &prefix).await;
        let probe = Probe::ok();
        let _subscription = subscribe(&queue, probe.clone(), fast()).await;
        publish(&queue, json!("before"), PublishOptions::default()).await;
        until("before", || probe.seen().len() == 1).await;

        redis.stop();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            queue
                .publish(CHANNEL, json!("lost"), PublishOptions::default())
                .await
                .is_err(),
            "publishing while Redis is down is an error"
        );
        redis.restart();

        // Redis came back empty: the loop must reconnect and re-create the group.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if queue
                .publish(CHANNEL, json!("after"), PublishOptions::default())
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "could not publish after the restart"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        until("after", || probe.seen().len() == 2).await;
        assert_eq!(probe.payloads(), vec![json!("before"), json!("after")]);
    }
}
