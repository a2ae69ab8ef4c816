//! The lock contract across two instances, in-process and on the real Redis, plus Redis-only
//! checks: a holder process killed with SIGKILL, and raw looks at the lease key.

#[cfg(feature = "integration-tests")]
use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use plugin_server_actors::cluster::lock::{
    InProcessLockBackend, InProcessLocks, LockManager, LockOptions, run_exclusive,
};
use plugin_server_actors::cluster::{ClusterError, InstanceId};

/// Two instances sharing one lock store.
type Pair = (Arc<dyn LockManager>, Arc<dyn LockManager>);

const TTL: Duration = Duration::from_millis(300);

fn in_process_pair() -> Pair {
    let backend = InProcessLockBackend::new();
    (
        Arc::new(InProcessLocks::new(
            Arc::clone(&backend),
            InstanceId::new("a"),
        )),
        Arc::new(InProcessLocks::new(backend, InstanceId::new("b"))),
    )
}

async fn try_acquire_excludes_and_release_frees((a, b): Pair) {
    let guard = a
        .try_acquire("k", LockOptions::with_ttl(TTL))
        .await
        .expect("try_acquire")
        .expect("free");
    assert!(guard.is_held());
    assert!(
        guard.token().starts_with("a:"),
        "token carries the instance id: {}",
        guard.token()
    );
    assert!(
        b.try_acquire("k", LockOptions::with_ttl(TTL))
            .await
            .expect("try")
            .is_none()
    );
    assert!(
        a.try_acquire("k", LockOptions::with_ttl(TTL))
            .await
            .expect("try")
            .is_none()
    );
    guard.release().await.expect("release");
    let second = b
        .try_acquire("k", LockOptions::with_ttl(TTL))
        .await
        .expect("try");
    assert!(second.expect("free after release").is_held());
}

async fn drop_releases((a, b): Pair) {
    let guard = a
        .try_acquire("k", LockOptions::with_ttl(TTL))
        .await
        .expect("try");
    drop(guard.expect("free"));
    // The Redis release runs in a spawned task: wait for it, well within the TTL.
    let acquired = b
        .acquire("k", LockOptions::with_ttl(TTL), TTL / 2)
        .await
        .expect("released on drop, not by expiry");
    acquired.release().await.expect("release");
}

/// (c) A live holder keeps its lease across many TTLs while the other side keeps failing.
async fn renewal_keeps_a_live_holder((a, b): Pair) {
    let guard = a
        .try_acquire("k", LockOptions::with_ttl(TTL))
        .await
        .expect("try")
        .expect("free");
    let started = std::time::Instant::now();
    let mut attempts = 0;
    while started.elapsed() < TTL * 5 {
        let stolen = b
            .try_acquire("k", LockOptions::with_ttl(TTL))
            .await
            .expect("try");
        assert!(
            stolen.is_none(),
            "taken from a live holder after {:?}",
            started.elapsed()
        );
        assert!(guard.is_held());
        attempts += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(attempts > 20, "{attempts}");
    guard.release().await.expect("release");
}

async fn acquire_waits_for_release((a, b): Pair) {
    let guard = a
        .try_acquire("k", LockOptions::with_ttl(TTL))
        .await
        .expect("try")
        .expect("free");
    let releaser = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        guard.release().await.expect("release");
    });
    let started = std::time::Instant::now();
    let acquired = b
        .acquire("k", LockOptions::with_ttl(TTL), Duration::from_secs(5))
        .await
        .expect("acquired once released");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    releaser.await.expect("releaser");
    acquired.release().await.expect("release");
}

async fn acquire_times_out((a, b): Pair) {
    let guard = a
        .try_acquire("k", LockOptions::with_ttl(TTL))
        .await
        .expect("try");
    let timeout = Duration::from_millis(400);
    let started = std::time::Instant::now();
    let outcome = b.acquire("k", LockOptions::with_ttl(TTL), timeout).await;
    assert!(
        matches!(outcome, Err(ClusterError::Timeout(t)) if t == timeout),
        "{outcome:?}"
    );
    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    assert!(started.elapsed() < timeout * 3, "{:?}", started.elapsed());
    drop(guard);
}

async fn run_exclusive_returns_the_value((a, b): Pair) {
    let value = run_exclusive(&*a, "k", LockOptions::with_ttl(TTL), TTL, async {
        let inside = b
            .try_acquire("k", LockOptions::with_ttl(TTL))
            .await
            .expect("try");
        assert!(inside.is_none(), "exclusive while the work runs");
        tokio::time::sleep(TTL * 2).await;
        "done"
    })
    .await;
    assert_eq!(value.expect("ran"), "done");
    let after = b
        .try_acquire("k", LockOptions::with_ttl(TTL))
        .await
        .expect("try");
    assert!(after.is_some(), "released after the work");
}

async fn run_exclusive_cancels_work_on_a_lost_lease((a, b): Pair) {
    let finished = AtomicBool::new(false);
    let outcome = run_exclusive(&*a, "k", LockOptions::without_renewal(TTL), TTL, async {
        tokio::time::sleep(TTL * 3).await;
        finished.store(true, Ordering::SeqCst);
    })
    .await;
    assert!(
        matches!(outcome, Err(ClusterError::LockLost { .. })),
        "{outcome:?}"
    );
    assert!(!finished.load(Ordering::SeqCst), "the work was cancelled");
    // The store's own expiry may trail the guard's conservative one by a few milliseconds.
    let after = b.acquire("k", LockOptions::with_ttl(TTL), TTL).await;
    assert!(after.is_ok(), "expired: {after:?}");
}

/// (d), the part both adapters share: the late release of an expired holder is a no-op.
async fn late_release_keeps_the_new_owner((a, b): Pair) {
    let old = a
        .try_acquire("k", LockOptions::without_renewal(TTL))
        .await
        .expect("try")
        .expect("free");
    tokio::time::timeout(TTL * 3, old.lost())
        .await
        .expect("lost at expiry");
    assert!(!old.is_held());
    // The store's own expiry may trail the guard's conservative one by a few milliseconds.
    let new = b
        .acquire("k", LockOptions::with_ttl(TTL), TTL)
        .await
        .expect("free after expiry");
    old.release().await.expect("late release is not an error");
    let third = a
        .try_acquire("k", LockOptions::with_ttl(TTL))
        .await
        .expect("try");
    assert!(
        third.is_none(),
        "the new owner's lease survived the late release"
    );
    tokio::time::sleep(TTL * 2).await;
    assert!(new.is_held(), "and is still renewed");
    new.release().await.expect("release");
}

/// (a) Two contenders, 50 rounds each, alternating `try_acquire` spins and `acquire`: the
/// intervals during which each believed it held the lock never overlap.
async fn contenders_never_overlap((a, b): Pair) {
    async fn contend(locks: Arc<dyn LockManager>) -> Vec<(std::time::Instant, std::time::Instant)> {
        let mut intervals = Vec::with_capacity(50);
        for round in 0..50 {
            let guard = if round % 2 == 0 {
                loop {
                    let claimed = locks
                        .try_acquire("k", LockOptions::with_ttl(Duration::from_secs(5)))
                        .await
                        .expect("try");
                    match claimed {
                        Some(guard) => break guard,
                        None => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
            } else {
                locks
                    .acquire(
                        "k",
                        LockOptions::with_ttl(Duration::from_secs(5)),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("acquire")
            };
            let start = std::time::Instant::now();
            tokio::time::sleep(Duration::from_millis(1 + round % 3)).await;
            let end = std::time::Instant::now();
            guard.release().await.expect("release");
            intervals.push((start, end));
            tokio::task::yield_now().await;
        }
        intervals
    }
    let first = tokio::spawn(contend(a));
    let second = tokio::spawn(contend(b));
    let mut intervals = first.await.expect("a");
    intervals.extend(second.await.expect("b"));
    assert_eq!(intervals.len(), 100);
    intervals.sort();
    for window in intervals.windows(2) {
        assert!(window[0].1 <= window[1].0, "overlap: {:?}", window);
    }
}

/// Instantiates the contract for one adapter. `$pair` builds a fresh pair on a fresh namespace.
macro_rules! contract {
    ($name:ident, $pair:expr) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn try_acquire_excludes_and_release_frees() {
                super::try_acquire_excludes_and_release_frees($pair.await).await;
            }
            #[tokio::test]
            async fn drop_releases() {
                super::drop_releases($pair.await).await;
            }
            #[tokio::test]
            async fn renewal_keeps_a_live_holder() {
                super::renewal_keeps_a_live_holder($pair.await).await;
            }
            #[tokio::test]
            async fn acquire_waits_for_release() {
                super::acquire_waits_for_release($pair.await).await;
            }
            #[tokio::test]
            async fn acquire_times_out() {
                super::acquire_times_out($pair.await).await;
            }
            #[tokio::test]
            async fn run_exclusive_returns_the_value() {
                super::run_exclusive_returns_the_value($pair.await).await;
            }
            #[tokio::test]
            async fn run_exclusive_cancels_work_on_a_lost_lease() {
                super::run_exclusive_cancels_work_on_a_lost_lease($pair.await).await;
            }
            #[tokio::test]
            async fn late_release_keeps_the_new_owner() {
                super::late_release_keeps_the_new_owner($pair.await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn contenders_never_overlap() {
                super::contenders_never_overlap($pair.await).await;
            }
        }
    };
}

contract!(in_process, async { in_process_pair() });

#[cfg(feature = "integration-tests")]
mod redis_backed {
    use std::process::Stdio;

    use plugin_server_actors::cluster::lock::RedisLocks;
    use plugin_server_actors::cluster::redis_pool::{RedisPool, RedisPoolConfig};
    use tokio::io::{AsyncBufReadExt, BufReader};

    use super::*;

    /// Set in the child process that plays the holder to be killed.
    const HOLDER_KEY_ENV: &str = "LOCK_HOLDER_KEY";
    const HOLDER_PREFIX_ENV: &str = "LOCK_HOLDER_PREFIX";
    /// The child test's name as the harness lists it: its module path without the crate.
    fn holder_test() -> String {
        let module = module_path!();
        let path = module.split_once("::").map_or(module, |(_, rest)| rest);
        format!("{path}::lock_holder_process")
    }

    async fn pool() -> RedisPool {
        RedisPool::connect(&RedisPoolConfig {
            url: common::redis_url(),
            min_size: 1,
            max_size: 4,
        })
        .await
        .expect("redis at REDIS_URL")
    }

    /// Two instances with separate pools, as two processes would have.
    pub async fn pair_on(prefix: &str) -> Pair {
        (
            Arc::new(RedisLocks::new(pool().await, prefix, InstanceId::new("a"))),
            Arc::new(RedisLocks::new(pool().await, prefix, InstanceId::new("b"))),
        )
    }

    pub async fn pair() -> Pair {
        pair_on(&common::unique_prefix("lock")).await
    }

    async fn raw_get(key: &str) -> Option<String> {
        let mut connection = pool().await.get().await.expect("connection");
        ::redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("GET")
    }

    /// (d) with a raw look at the key: after expiry and takeover, the old guard's release
    /// leaves the new owner's token in place.
    #[tokio::test]
    async fn late_release_leaves_the_new_owners_key() {
        let prefix = common::unique_prefix("lock");
        let (a, b) = pair_on(&prefix).await;
        let redis_key = format!("{prefix}k");
        let old = a
            .try_acquire("k", LockOptions::without_renewal(TTL))
            .await
            .expect("try")
            .expect("free");
        assert_eq!(raw_get(&redis_key).await.as_deref(), Some(old.token()));
        let new = b
            .acquire("k", LockOptions::with_ttl(TTL), TTL * 3)
            .await
            .expect("taken after expiry");
        assert!(!old.is_held());
        old.release().await.expect("late release");
        assert_eq!(raw_get(&redis_key).await.as_deref(), Some(new.token()));
        new.release().await.expect("release");
        assert_eq!(raw_get(&redis_key).await, None);
    }

    /// A takeover behind the holder's back (a raw SET) is noticed at the next renewal, and the
    /// renewal does not touch the other owner's value.
    #[tokio::test]
    async fn renewal_notices_a_takeover() {
        let prefix = common::unique_prefix("lock");
        let (a, _b) = pair_on(&prefix).await;
        let redis_key = format!("{prefix}k");
        let guard = a
            .try_acquire("k", LockOptions::with_ttl(TTL))
            .await
            .expect("try")
            .expect("free");
        let mut connection = pool().await.get().await.expect("connection");
        ::redis::cmd("SET")
            .arg(&redis_key)
            .arg("intruder")
            .arg("PX")
            .arg(10_000)
            .query_async::<()>(&mut connection)
            .await
            .expect("SET");
        tokio::time::timeout(TTL, guard.lost())
            .await
            .expect("lost at the next renewal");
        assert!(!guard.is_held());
        drop(guard);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(raw_get(&redis_key).await.as_deref(), Some("intruder"));
        ::redis::cmd("DEL")
            .arg(&redis_key)
            .query_async::<()>(&mut connection)
            .await
            .expect("cleanup");
    }

    /// Not a test on its own: the holder process of `a_killed_holder_loses_the_lock_after_its_ttl`,
    /// which runs this binary again with `--ignored --exact` and the env set. Holds the lock
    /// (renewing it) until killed.
    #[tokio::test]
    #[ignore = "the child process of a_killed_holder_loses_the_lock_after_its_ttl"]
    async fn lock_holder_process() {
        let (Ok(key), Ok(prefix)) = (
            std::env::var(HOLDER_KEY_ENV),
            std::env::var(HOLDER_PREFIX_ENV),
        ) else {
            return;
        };
        let locks = RedisLocks::new(pool().await, prefix, InstanceId::new("doomed"));
        let guard = locks
            .acquire(
                &key,
                LockOptions::with_ttl(Duration::from_secs(1)),
                Duration::from_secs(5),
            )
            .await
            .expect("acquired");
        println!("held");
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            assert!(guard.is_held());
        }
    }

    /// (b) A holder in another process, killed with SIGKILL, cannot release: its lease runs out
    /// after the TTL and only then does another owner get the lock.
    #[tokio::test]
    async fn a_killed_holder_loses_the_lock_after_its_ttl() {
        let ttl = Duration::from_secs(1);
        let prefix = common::unique_prefix("lock");
        let mut child = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", &holder_test(), "--ignored", "--nocapture"])
            .env(HOLDER_KEY_ENV, "k")
            .env(HOLDER_PREFIX_ENV, &prefix)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("holder process");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("child stdout") {
                if line.trim_end().ends_with("held") {
                    return;
                }
            }
            panic!("the holder exited before holding the lock");
        })
        .await
        .expect("the holder holds the lock within 30 s");

        let locks = RedisLocks::new(pool().await, prefix, InstanceId::new("survivor"));
        // Longer than the TTL: the child's renewals keep it.
        let watched = std::time::Instant::now();
        while watched.elapsed() < ttl * 2 {
            let taken = locks
                .try_acquire("k", LockOptions::with_ttl(ttl))
                .await
                .expect("try");
            assert!(taken.is_none(), "taken from a live holder");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        child.kill().await.expect("SIGKILL the holder");
        let killed_at = std::time::Instant::now();
        let guard = loop {
            let claimed = locks
                .try_acquire("k", LockOptions::with_ttl(ttl))
                .await
                .expect("try");
            if let Some(guard) = claimed {
                break guard;
            }
            assert!(
                killed_at.elapsed() < ttl + Duration::from_millis(500),
                "never expired"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let waited = killed_at.elapsed();
        // The last renewal came at most ttl/3 before the kill, so the lease had at least
        // 2/3 of the TTL left.
        assert!(
            waited >= ttl * 2 / 3 - Duration::from_millis(50),
            "too early: {waited:?}"
        );
        assert!(guard.is_held());
        guard.release().await.expect("release");
    }
}

#[cfg(feature = "integration-tests")]
contract!(redis, redis_backed::pair());
