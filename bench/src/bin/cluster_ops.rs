//! Operations per second of each cluster primitive, in-process and on Redis, next to
//! `redis-benchmark` against the same Redis.
//!
//!     REDIS_URL=redis://127.0.0.1:6379 cargo run --release -p plugin-server-bench \
//!         --bin cluster_ops -- [OPS] [CONCURRENCY]
//!
//! Prints a Markdown table (ops/s; one run: the machines here are shared and noisy, so read
//! the ratios, not the absolute numbers).

use std::future::Future;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use plugin_server_actors::cluster::InstanceId;
use plugin_server_actors::cluster::cache::{
    CacheStore, InProcessCache, InProcessCacheBackend, RedisCache,
};
use plugin_server_actors::cluster::event_queue::{
    EventQueue, HandlerError, InProcessEventQueue, InProcessQueueBackend,
    PublishOptions as QueuePublishOptions, QueueHandler, QueueMessage, RedisEventQueue,
    SubscribeOptions as QueueSubscribeOptions,
};
use plugin_server_actors::cluster::lock::{
    InProcessLockBackend, InProcessLocks, LockManager, LockOptions, RedisLocks,
};
use plugin_server_actors::cluster::pubsub::{
    InProcessBus, PubSub, PublishOptions, RedisTransport, SubscribeOptions,
};
use plugin_server_actors::cluster::redis_pool::{RedisPool, RedisPoolConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

struct Row {
    operation: String,
    in_process: Option<f64>,
    redis: Option<f64>,
    redis_benchmark: Option<f64>,
}

/// Runs `ops` calls of `op(i)` with `concurrency` in flight; returns ops/s.
async fn measure<F, Fut>(ops: usize, concurrency: usize, op: F) -> anyhow::Result<f64>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let op = Arc::clone(&op);
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= ops {
                        return Ok::<_, anyhow::Error>(());
                    }
                    op(i).await?;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

async fn cache_rows(
    local: Arc<dyn CacheStore>,
    remote: Arc<dyn CacheStore>,
    ops: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (operation, kind) in [("cache set", 0), ("cache get", 1), ("cache incr", 2)] {
        let mut results = Vec::new();
        for store in [&local, &remote] {
            let store = Arc::clone(store);
            let rate = measure(ops, concurrency, move |i| {
                let store = Arc::clone(&store);
                async move {
                    let key = format!("k{}", i % 10_000);
                    match kind {
                        0 => store.set(&key, CACHE_VALUE, None).await?,
                        1 => {
                            store.get(&key).await?;
                        }
                        _ => {
                            store.incr_by("counter", 1, None).await?;
                        }
                    }
                    Ok(())
                }
            })
            .await?;
            results.push(rate);
        }
        rows.push(Row {
            operation: operation.to_owned(),
            in_process: Some(results[0]),
            redis: Some(results[1]),
            redis_benchmark: None,
        });
    }
    Ok(rows)
}

/// Messages published but not yet received that the pub/sub benchmark allows. Pub/sub drops a
/// message for a subscriber more than 1024 behind (fire and forget: a slow subscriber must not
/// stall delivery), so an unthrottled publisher measures drops, not delivery. With this window
/// plus `concurrency` publishes in flight the subscriber never falls that far behind.
const PUBSUB_WINDOW: usize = 512;
/// The receiver reports its count to the publishers every this many messages.
const PUBSUB_REPORT_EVERY: usize = 32;

/// Publishes `ops` messages from one instance and waits until another has received them all.
/// Publish `i` waits until fewer than `PUBSUB_WINDOW` messages are undelivered (credit-based
/// flow control), so this is the sustained publish → delivered rate with nothing dropped.
async fn pubsub_rate(
    publisher: PubSub,
    subscriber: PubSub,
    ops: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    if concurrency + PUBSUB_WINDOW + PUBSUB_REPORT_EVERY > 1024 {
        bail!("concurrency {concurrency} is too high for the pub/sub window (at most 480)");
    }
    let mut subscription = subscriber
        .subscribe("bench", SubscribeOptions::default())
        .await?;
    let (progress, received_so_far) = tokio::sync::watch::channel(0_usize);
    let received = tokio::spawn(async move {
        let mut count = 0;
        while count < ops {
            match tokio::time::timeout(Duration::from_secs(10), subscription.recv()).await {
                Ok(Some(_)) => count += 1,
                _ => break,
            }
            if count % PUBSUB_REPORT_EVERY == 0 {
                progress.send_replace(count);
            }
        }
        // Dropping `progress` here also wakes any publisher still waiting for credit.
        count
    });
    let started = Instant::now();
    let publisher = Arc::new(publisher);
    let published = measure(ops, concurrency, move |i| {
        let publisher = Arc::clone(&publisher);
        let mut received_so_far = received_so_far.clone();
        async move {
            received_so_far
                .wait_for(|&received| i < received + PUBSUB_WINDOW)
                .await
                .context("the subscriber stopped receiving")?;
            publisher
                .publish("bench", &json!({"i": i}), PublishOptions::default())
                .await?;
            Ok(())
        }
    })
    .await;
    let count = received.await?;
    published?;
    if count < ops {
        bail!("pub/sub delivered {count} of {ops}");
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

async fn lock_rate(
    locks: Arc<dyn LockManager>,
    ops: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    measure(ops, concurrency, move |i| {
        let locks = Arc::clone(&locks);
        async move {
            let key = format!("bench-{}", i % 1000);
            let options = LockOptions::with_ttl(Duration::from_secs(10));
            if let Some(guard) = locks.try_acquire(&key, options).await? {
                guard.release().await?;
            }
            Ok(())
        }
    })
    .await
}

struct CountingHandler {
    done: AtomicUsize,
    all_done: tokio::sync::Notify,
    target: usize,
}

#[async_trait::async_trait]
impl QueueHandler for CountingHandler {
    async fn process(&self, _: QueueMessage, _: CancellationToken) -> Result<(), HandlerError> {
        if self.done.fetch_add(1, Ordering::SeqCst) + 1 == self.target {
            self.all_done.notify_one();
        }
        Ok(())
    }
}

/// Publishes `ops` messages and waits until a subscriber with `concurrency` slots processed
/// them all.
async fn queue_rate(
    queue: Arc<dyn EventQueue>,
    ops: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let handler = Arc::new(CountingHandler {
        done: AtomicUsize::new(0),
        all_done: tokio::sync::Notify::new(),
        target: ops,
    });
    let channel = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let started = Instant::now();
    let subscription = queue
        .subscribe(
            &channel,
            handler.clone(),
            QueueSubscribeOptions {
                concurrency,
                ..QueueSubscribeOptions::default()
            },
        )
        .await?;
    let publisher = Arc::clone(&queue);
    let publish_channel = channel.clone();
    measure(ops, concurrency, move |i| {
        let queue = Arc::clone(&publisher);
        let channel = publish_channel.clone();
        async move {
            queue
                .publish(&channel, json!({"i": i}), QueuePublishOptions::default())
                .await?;
            Ok(())
        }
    })
    .await?;
    tokio::time::timeout(Duration::from_secs(120), handler.all_done.notified())
        .await
        .context("the queue did not process every message in 120 s")?;
    let rate = ops as f64 / started.elapsed().as_secs_f64();
    subscription.close().await;
    Ok(rate)
}

/// The value the cache benchmark stores (31 bytes); redis-benchmark SET/GET use the same size.
const CACHE_VALUE: &str = "value-of-about-thirty-bytes....";

/// Host and port of a `redis://[user:password@]host[:port][/db]` URL.
fn redis_host_port(url: &str) -> (String, String) {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rsplit_once(':') {
        Some((host, port)) => (host.to_owned(), port.to_owned()),
        None => (authority.to_owned(), "6379".to_owned()),
    }
}

/// `redis-benchmark -q` for the same operations, parsed from its "X: N requests per second".
fn redis_benchmark(url: &str, ops: usize, concurrency: usize) -> Vec<(String, f64)> {
    let (host, port) = redis_host_port(url);
    let value_size = CACHE_VALUE.len().to_string();
    let run = |args: &[&str]| -> Option<f64> {
        let output = Command::new("redis-benchmark")
            .args([
                "-h",
                &host,
                "-p",
                &port,
                "-q",
                "-n",
                &ops.to_string(),
                "-c",
                &concurrency.to_string(),
            ])
            .args(args)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout).replace('\r', "\n");
        text.lines()
            .filter_map(|line| line.split_once(':'))
            .rev()
            .find_map(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
    };
    let mut results = Vec::new();
    for (name, args) in [
        ("SET", vec!["-t", "set", "-d", &value_size]),
        ("GET", vec!["-t", "get", "-d", &value_size]),
        ("INCR", vec!["-t", "incr"]),
        ("PUBLISH", vec!["PUBLISH", "bench", "payload"]),
    ] {
        if let Some(rate) = run(&args) {
            results.push((name.to_owned(), rate));
        }
    }
    results
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let ops: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(50_000);
    let concurrency: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(50);
    let url = std::env::var("REDIS_URL").context("set REDIS_URL")?;
    let pool_config = RedisPoolConfig {
        url: url.clone(),
        min_size: 1,
        max_size: concurrency.clamp(1, 64),
    };
    let pool = RedisPool::connect(&pool_config).await?;
    let prefix = format!("bench:{}:", uuid::Uuid::new_v4().simple());

    let local_cache: Arc<dyn CacheStore> = Arc::new(InProcessCache::new(
        InProcessCacheBackend::new(),
        prefix.clone(),
    ));
    let redis_cache: Arc<dyn CacheStore> = Arc::new(RedisCache::new(pool.clone(), prefix.clone()));
    // Every key this run creates (cache, locks, queue streams) is under `prefix`: removed at
    // the end, also when a measurement fails.
    let measured = async {
        let mut rows = cache_rows(local_cache, Arc::clone(&redis_cache), ops, concurrency).await?;

        let bus = InProcessBus::new();
        let in_process_pubsub = |name: &str| {
            let (transport, inbound) = bus.transport();
            PubSub::new(InstanceId::new(name), prefix.clone(), transport, inbound)
        };
        let local_pubsub = pubsub_rate(
            in_process_pubsub("a"),
            in_process_pubsub("b"),
            ops,
            concurrency,
        )
        .await
        .context("in-process pub/sub")?;
        let redis_pubsub = |name: &str, pool: RedisPool| {
            let (transport, inbound) = RedisTransport::spawn(pool);
            PubSub::new(InstanceId::new(name), prefix.clone(), transport, inbound)
        };
        let subscriber_pool = RedisPool::connect(&pool_config).await?;
        let remote_pubsub = pubsub_rate(
            redis_pubsub("a", pool.clone()),
            redis_pubsub("b", subscriber_pool),
            ops,
            concurrency,
        )
        .await
        .context("Redis pub/sub")?;
        rows.push(Row {
            operation: "pub/sub publish → delivered".to_owned(),
            in_process: Some(local_pubsub),
            redis: Some(remote_pubsub),
            redis_benchmark: None,
        });

        let local_locks: Arc<dyn LockManager> = Arc::new(InProcessLocks::new(
            InProcessLockBackend::new(),
            InstanceId::new("bench"),
        ));
        let redis_locks: Arc<dyn LockManager> = Arc::new(RedisLocks::new(
            pool.clone(),
            prefix.clone(),
            InstanceId::new("bench"),
        ));
        rows.push(Row {
            operation: "lock try_acquire + release".to_owned(),
            in_process: Some(
                lock_rate(local_locks, ops, concurrency)
                    .await
                    .context("in-process locks")?,
            ),
            redis: Some(
                lock_rate(redis_locks, ops, concurrency)
                    .await
                    .context("Redis locks")?,
            ),
            redis_benchmark: None,
        });

        let local_queue: Arc<dyn EventQueue> =
            Arc::new(InProcessEventQueue::new(InProcessQueueBackend::new()));
        let redis_queue: Arc<dyn EventQueue> = Arc::new(RedisEventQueue::new(
            pool.clone(),
            prefix.clone(),
            InstanceId::new("bench"),
        ));
        rows.push(Row {
            operation: "event queue publish → processed".to_owned(),
            in_process: Some(
                queue_rate(local_queue, ops, concurrency)
                    .await
                    .context("in-process event queue")?,
            ),
            redis: Some(
                queue_rate(redis_queue, ops, concurrency)
                    .await
                    .context("Redis event queue")?,
            ),
            redis_benchmark: None,
        });

        for (command, rate) in redis_benchmark(&url, ops, concurrency) {
            let row = match command.as_str() {
                "SET" => rows.iter_mut().find(|row| row.operation == "cache set"),
                "GET" => rows.iter_mut().find(|row| row.operation == "cache get"),
                "INCR" => rows.iter_mut().find(|row| row.operation == "cache incr"),
                _ => rows
                    .iter_mut()
                    .find(|row| row.operation.starts_with("pub/sub")),
            };
            if let Some(row) = row {
                row.redis_benchmark = Some(rate);
            }
        }
        Ok::<_, anyhow::Error>(rows)
    }
    .await;
    let cleaned = redis_cache.reset().await;
    let rows = measured?;
    cleaned?;

    let cell = |value: Option<f64>| value.map_or("–".to_owned(), |v| format!("{v:.0}"));
    println!("ops per run: {ops}, concurrency: {concurrency}\n");
    println!(
        "| operation | in-process ops/s | Redis ops/s | redis-benchmark ops/s | Redis / redis-benchmark |"
    );
    println!("|---|---:|---:|---:|---:|");
    for row in &rows {
        let ratio = match (row.redis, row.redis_benchmark) {
            (Some(ours), Some(theirs)) => format!("{:.2}", ours / theirs),
            _ => "–".to_owned(),
        };
        println!(
            "| {} | {} | {} | {} | {} |",
            row.operation,
            cell(row.in_process),
            cell(row.redis),
            cell(row.redis_benchmark),
            ratio
        );
    }
    Ok(())
}
