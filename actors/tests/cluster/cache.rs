//! The cache contract, run against the in-process adapter and against the real Redis.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use plugin_server_actors::cluster::cache::{
    Cache, CacheStore, InProcessCache, InProcessCacheBackend, WrapError, WrapOptions,
};

/// Two stores in sibling namespaces of one backend, so isolation can be checked.
type Pair = (Arc<dyn CacheStore>, Arc<dyn CacheStore>);

fn in_process_pair() -> Pair {
    let backend = InProcessCacheBackend::new();
    let root = common::unique_prefix("cache");
    (
        Arc::new(InProcessCache::new(
            Arc::clone(&backend),
            format!("{root}a:"),
        )),
        Arc::new(InProcessCache::new(backend, format!("{root}b:"))),
    )
}

async fn basic_operations(store: Arc<dyn CacheStore>) {
    assert_eq!(store.get("missing").await.expect("get"), None);
    store.set("k", "v", None).await.expect("set");
    assert_eq!(store.get("k").await.expect("get").as_deref(), Some("v"));
    assert_eq!(store.ttl("k").await.expect("ttl"), None, "no TTL given");
    store.set("k", "w", None).await.expect("overwrite");
    assert_eq!(store.get("k").await.expect("get").as_deref(), Some("w"));
    assert!(store.del("k").await.expect("del"));
    assert!(!store.del("k").await.expect("del again"));
    assert_eq!(store.get("k").await.expect("get"), None);

    store
        .mset(&[("m1", "1"), ("m2", "2")], None)
        .await
        .expect("mset");
    assert_eq!(
        store.mget(&["m1", "nope", "m2"]).await.expect("mget"),
        vec![Some("1".to_owned()), None, Some("2".to_owned())]
    );
    assert_eq!(store.mdel(&["m1", "m2", "nope"]).await.expect("mdel"), 2);
    assert_eq!(store.mget(&["m1"]).await.expect("mget"), vec![None]);
}

async fn ttls_expire(store: Arc<dyn CacheStore>) {
    store
        .set("short", "v", Some(Duration::from_millis(300)))
        .await
        .expect("set");
    let ttl = store.ttl("short").await.expect("ttl").expect("has a TTL");
    assert!(
        ttl <= Duration::from_millis(300) && ttl > Duration::from_millis(100),
        "{ttl:?}"
    );
    store.set("later", "v", None).await.expect("set");
    assert!(
        store
            .expire("later", Duration::from_millis(300))
            .await
            .expect("expire")
    );
    assert!(
        !store
            .expire("absent", Duration::from_secs(1))
            .await
            .expect("expire")
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(store.get("short").await.expect("get"), None);
    assert_eq!(store.get("later").await.expect("get"), None);
    store
        .mset(&[("a", "1"), ("b", "2")], Some(Duration::from_millis(200)))
        .await
        .expect("mset");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        store.mget(&["a", "b"]).await.expect("mget"),
        vec![None, None]
    );
}

async fn counters_are_atomic(store: Arc<dyn CacheStore>) {
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.incr_by("hits", 1, None).await.expect("incr") })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    assert_eq!(
        store.get("hits").await.expect("get").as_deref(),
        Some("100")
    );
    assert_eq!(store.incr_by("hits", -10, None).await.expect("decr"), 90);

    // A TTL applies only when the counter is created: a fixed window.
    let window = Duration::from_millis(400);
    assert_eq!(
        store
            .incr_by("window", 1, Some(window))
            .await
            .expect("incr"),
        1
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        store
            .incr_by("window", 1, Some(window))
            .await
            .expect("incr"),
        2
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        store
            .incr_by("window", 1, Some(window))
            .await
            .expect("incr"),
        1,
        "the window started at the first increment and has passed"
    );

    store.set("text", "abc", None).await.expect("set");
    assert!(
        store.incr_by("text", 1, None).await.is_err(),
        "not an integer"
    );
}

async fn lists_follow_posthogs_meta_cache(store: Arc<dyn CacheStore>) {
    assert_eq!(store.llen("list").await.expect("llen"), 0);
    assert_eq!(store.lpush("list", &["a", "b"]).await.expect("lpush"), 2);
    assert_eq!(store.lpush("list", &["c", "b"]).await.expect("lpush"), 4);
    assert_eq!(
        store.lrange("list", 0, -1).await.expect("lrange"),
        vec!["b", "c", "b", "a"]
    );
    assert_eq!(
        store.lrange("list", 1, 2).await.expect("lrange"),
        vec!["c", "b"]
    );
    assert_eq!(
        store.lrange("list", -1, -1).await.expect("lrange"),
        vec!["a"]
    );
    assert_eq!(store.lrem("list", 1, "b").await.expect("lrem"), 1);
    assert_eq!(
        store.lrange("list", 0, -1).await.expect("lrange"),
        vec!["c", "b", "a"]
    );
    assert_eq!(store.lpop("list", 2).await.expect("lpop"), vec!["c", "b"]);
    assert_eq!(store.llen("list").await.expect("llen"), 1);
    assert_eq!(store.lpop("list", 5).await.expect("lpop"), vec!["a"]);
    assert_eq!(store.llen("list").await.expect("llen"), 0);
    assert!(store.lpop("list", 1).await.expect("lpop").is_empty());
    store.set("plain", "x", None).await.expect("set");
    assert!(store.lpush("plain", &["y"]).await.is_err(), "wrong type");
}

async fn reset_clears_only_its_namespace((store, sibling): Pair) {
    store.set("one", "1", None).await.expect("set");
    store.lpush("two", &["x"]).await.expect("lpush");
    store
        .scoped("child:")
        .set("three", "3", None)
        .await
        .expect("set");
    sibling.set("one", "kept", None).await.expect("set");
    assert_eq!(store.reset().await.expect("reset"), 3);
    assert_eq!(store.get("one").await.expect("get"), None);
    assert_eq!(store.llen("two").await.expect("llen"), 0);
    assert_eq!(
        sibling.get("one").await.expect("get").as_deref(),
        Some("kept"),
        "the sibling namespace is untouched"
    );
}

async fn scoped_stores_nest(store: Arc<dyn CacheStore>) {
    let plugin = store.scoped("@plugin/7/2/");
    plugin.set("k", "v", None).await.expect("set");
    assert_eq!(
        plugin.namespace(),
        format!("{}@plugin/7/2/", store.namespace())
    );
    assert_eq!(
        store.get("@plugin/7/2/k").await.expect("get").as_deref(),
        Some("v")
    );
}

async fn wrap_caches_falsy_values_too(store: Arc<dyn CacheStore>) {
    let cache = Cache::new(store);
    let calls = std::sync::atomic::AtomicU32::new(0);
    for _ in 0..3 {
        let value: i64 = cache
            .wrap("zero", None, || async {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, String>(0)
            })
            .await
            .expect("wrap");
        assert_eq!(value, 0);
    }
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "0 was a hit"
    );

    for _ in 0..2 {
        let value: bool = cache
            .wrap("false", None, || async { Ok::<_, String>(false) })
            .await
            .expect("wrap");
        assert!(!value);
    }
    assert_eq!(
        cache.get_json::<bool>("false").await.expect("get"),
        Some(false)
    );

    // Not cacheable: computed every time.
    let computed = std::sync::atomic::AtomicU32::new(0);
    for _ in 0..2 {
        let value: String = cache
            .wrap_with_condition(
                "cond",
                WrapOptions::new(None),
                |value: &String| !value.is_empty(),
                || async {
                    computed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Ok::<_, String>(String::new())
                },
            )
            .await
            .expect("wrap");
        assert_eq!(value, "");
    }
    assert_eq!(computed.load(std::sync::atomic::Ordering::SeqCst), 2);

    // use_cache false neither reads nor writes.
    let bypass = WrapOptions {
        use_cache: false,
        ttl: None,
    };
    let value: i64 = cache
        .wrap_with_condition("zero", bypass, |_| true, || async { Ok::<_, String>(5) })
        .await
        .expect("wrap");
    assert_eq!(value, 5);
    assert_eq!(cache.get_json::<i64>("zero").await.expect("get"), Some(0));

    let failed = cache
        .wrap::<i64, _, _, _>("err", None, || async { Err("boom".to_owned()) })
        .await;
    assert!(matches!(failed, Err(WrapError::Compute(message)) if message == "boom"));
    assert_eq!(
        cache.get_json::<i64>("err").await.expect("get"),
        None,
        "errors are not cached"
    );
}

macro_rules! contract {
    ($module:ident, $pair:expr) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn basic_operations() {
                super::basic_operations($pair.await.0).await;
            }
            #[tokio::test]
            async fn ttls_expire() {
                super::ttls_expire($pair.await.0).await;
            }
            #[tokio::test]
            async fn counters_are_atomic() {
                super::counters_are_atomic($pair.await.0).await;
            }
            #[tokio::test]
            async fn lists_follow_posthogs_meta_cache() {
                super::lists_follow_posthogs_meta_cache($pair.await.0).await;
            }
            #[tokio::test]
            async fn reset_clears_only_its_namespace() {
                super::reset_clears_only_its_namespace($pair.await).await;
            }
            #[tokio::test]
            async fn scoped_stores_nest() {
                super::scoped_stores_nest($pair.await.0).await;
            }
            #[tokio::test]
            async fn wrap_caches_falsy_values_too() {
                super::wrap_caches_falsy_values_too($pair.await.0).await;
            }
        }
    };
}

contract!(in_process, async { in_process_pair() });

#[cfg(feature = "integration-tests")]
mod redis_backed {
    use super::*;
    use plugin_server_actors::cluster::cache::RedisCache;

    pub async fn pair() -> Pair {
        let pool = common::redis_pool(&common::redis_url()).await;
        let root = common::unique_prefix("cache");
        (
            Arc::new(RedisCache::new(pool.clone(), format!("{root}a:"))),
            Arc::new(RedisCache::new(pool, format!("{root}b:"))),
        )
    }

    #[tokio::test]
    async fn reset_never_touches_keys_outside_the_namespace() {
        let pool = common::redis_pool(&common::redis_url()).await;
        let root = common::unique_prefix("cache");
        // A namespace with glob characters must match literally.
        let store = RedisCache::new(pool.clone(), format!("{root}[x]*:"));
        let lookalike = RedisCache::new(pool.clone(), format!("{root}x"));
        store.set("k", "1", None).await.expect("set");
        lookalike.set("k", "2", None).await.expect("set");
        assert_eq!(store.reset().await.expect("reset"), 1);
        assert_eq!(lookalike.get("k").await.expect("get").as_deref(), Some("2"));
        let unscoped = RedisCache::new(pool, "");
        assert!(
            unscoped.reset().await.is_err(),
            "a whole-database reset is refused"
        );
        lookalike.reset().await.expect("cleanup");
    }
}

#[cfg(feature = "integration-tests")]
contract!(redis, redis_backed::pair());
