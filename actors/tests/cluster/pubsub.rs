//! The pub/sub contract across two instances, in-process and on the real Redis, plus a Redis
//! restart in the middle.

use crate::common;

use std::time::Duration;

use futures::future::BoxFuture;
use plugin_server_actors::cluster::InstanceId;
use plugin_server_actors::cluster::pubsub::{
    InProcessBus, PubSub, PublishOptions, SubscribeOptions, Subscription,
};
use serde_json::{Value, json};

const QUIET: Duration = Duration::from_millis(300);

/// Makes instance `name` on the deployment prefix `prefix`, all on one shared backend.
type Factory = Box<dyn Fn(&str, &str) -> BoxFuture<'static, PubSub> + Send + Sync>;

fn in_process_factory() -> Factory {
    let bus = InProcessBus::new();
    Box::new(move |name: &str, prefix: &str| {
        let (transport, inbound) = bus.transport();
        let pubsub = PubSub::new(InstanceId::new(name), prefix, transport, inbound);
        Box::pin(async move { pubsub })
    })
}

async fn next(subscription: &mut Subscription) -> Value {
    tokio::time::timeout(Duration::from_secs(5), subscription.recv())
        .await
        .expect("a message within 5 s")
        .expect("subscription open")
        .payload
}

async fn nothing(subscription: &mut Subscription) {
    let got = tokio::time::timeout(QUIET, subscription.recv()).await;
    assert!(got.is_err(), "expected no message, got {got:?}");
}

async fn sub(pubsub: &PubSub, channel: &str) -> Subscription {
    pubsub
        .subscribe(channel, SubscribeOptions::default())
        .await
        .expect("subscribed")
}

async fn skip_self_is_the_default(factory: Factory) {
    let prefix = common::unique_prefix("pubsub");
    let a = factory("a", &prefix).await;
    let b = factory("b", &prefix).await;
    let mut at_a = sub(&a, "reload").await;
    let mut at_b = sub(&b, "reload").await;
    a.publish("reload", &json!("x"), PublishOptions::default())
        .await
        .expect("published");
    assert_eq!(next(&mut at_b).await, json!("x"));
    nothing(&mut at_a).await;
    nothing(&mut at_b).await;
}

async fn everyone_and_only_self(factory: Factory) {
    let prefix = common::unique_prefix("pubsub");
    let a = factory("a", &prefix).await;
    let b = factory("b", &prefix).await;
    let mut at_a = sub(&a, "c").await;
    let mut at_b = sub(&b, "c").await;
    a.publish("c", &json!(1), PublishOptions::everyone())
        .await
        .expect("published");
    assert_eq!(next(&mut at_a).await, json!(1));
    assert_eq!(next(&mut at_b).await, json!(1));

    let only_self = PublishOptions {
        skip_self: false,
        only_self: true,
    };
    a.publish("c", &json!(2), only_self)
        .await
        .expect("published");
    assert_eq!(next(&mut at_a).await, json!(2));
    nothing(&mut at_b).await;
}

async fn prefixes_isolate_deployments(factory: Factory) {
    let a = factory("a", &common::unique_prefix("deploy1")).await;
    let b = factory("b", &common::unique_prefix("deploy2")).await;
    let mut at_b = sub(&b, "reload-plugins").await;
    a.publish("reload-plugins", &json!("x"), PublishOptions::default())
        .await
        .expect("published");
    nothing(&mut at_b).await;
}

async fn every_json_value_round_trips(factory: Factory) {
    let prefix = common::unique_prefix("pubsub");
    let a = factory("a", &prefix).await;
    let b = factory("b", &prefix).await;
    let mut at_b = sub(&b, "types").await;
    let values = [
        json!(null),
        json!(true),
        json!(0),
        json!(-1.5),
        json!(""),
        json!("reload!"),
        json!([1, "two", {"three": 3}]),
        json!({"teamId": 2, "actionId": 7, "nested": {"ü": "✓"}}),
    ];
    for value in &values {
        a.publish("types", value, PublishOptions::default())
            .await
            .expect("published");
        assert_eq!(&next(&mut at_b).await, value);
    }
}

async fn dropping_a_subscription_stops_only_it(factory: Factory) {
    let prefix = common::unique_prefix("pubsub");
    let a = factory("a", &prefix).await;
    let b = factory("b", &prefix).await;
    let first = sub(&b, "c").await;
    let mut second = sub(&b, "c").await;
    drop(first);
    a.publish("c", &json!("still"), PublishOptions::default())
        .await
        .expect("published");
    assert_eq!(next(&mut second).await, json!("still"));
    drop(second);
    // With no subscriber left the channel is unsubscribed; a new one works again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = sub(&b, "c").await;
    a.publish("c", &json!("again"), PublishOptions::default())
        .await
        .expect("published");
    assert_eq!(next(&mut third).await, json!("again"));
    nothing(&mut third).await;
}

async fn debounce_collapses_bursts_across_instances(factory: Factory) {
    let prefix = common::unique_prefix("pubsub");
    let a = factory("a", &prefix).await;
    let b = factory("b", &prefix).await;
    let mut at_b = b
        .subscribe(
            "burst",
            SubscribeOptions {
                debounce: Some(Duration::from_millis(200)),
            },
        )
        .await
        .expect("subscribed");
    for _ in 0..10 {
        for team in [1, 2] {
            a.publish("burst", &json!({"team": team}), PublishOptions::default())
                .await
                .expect("published");
        }
    }
    let mut teams = vec![
        next(&mut at_b).await["team"].clone(),
        next(&mut at_b).await["team"].clone(),
    ];
    teams.sort_by_key(|team| team.as_i64());
    assert_eq!(teams, vec![json!(1), json!(2)]);
    nothing(&mut at_b).await;
}

macro_rules! contract {
    ($module:ident, $factory:expr) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn skip_self_is_the_default() {
                super::skip_self_is_the_default($factory).await;
            }
            #[tokio::test]
            async fn everyone_and_only_self() {
                super::everyone_and_only_self($factory).await;
            }
            #[tokio::test]
            async fn prefixes_isolate_deployments() {
                super::prefixes_isolate_deployments($factory).await;
            }
            #[tokio::test]
            async fn every_json_value_round_trips() {
                super::every_json_value_round_trips($factory).await;
            }
            #[tokio::test]
            async fn dropping_a_subscription_stops_only_it() {
                super::dropping_a_subscription_stops_only_it($factory).await;
            }
            #[tokio::test]
            async fn debounce_collapses_bursts_across_instances() {
                super::debounce_collapses_bursts_across_instances($factory).await;
            }
        }
    };
}

contract!(in_process, in_process_factory());

#[cfg(feature = "integration-tests")]
mod redis_backed {
    use super::*;
    use plugin_server_actors::cluster::pubsub::RedisTransport;

    /// Each instance gets its own pool and subscriber connection, as separate processes would.
    pub fn factory_for(url: String) -> Factory {
        Box::new(move |name: &str, prefix: &str| {
            let url = url.clone();
            let name = name.to_owned();
            let prefix = prefix.to_owned();
            Box::pin(async move {
                let pool = common::redis_pool(&url).await;
                let (transport, inbound) = RedisTransport::spawn(pool);
                PubSub::new(InstanceId::new(name), prefix, transport, inbound)
            })
        })
    }

    pub fn factory() -> Factory {
        factory_for(common::redis_url())
    }

    #[tokio::test]
    async fn subscriptions_survive_a_redis_restart() {
        let mut redis = common::PrivateRedis::start();
        let factory = factory_for(redis.url());
        let prefix = common::unique_prefix("restart");
        let a = factory("a", &prefix).await;
        let b = factory("b", &prefix).await;
        let mut at_b = sub(&b, "reload-plugins").await;
        a.publish(
            "reload-plugins",
            &json!("before"),
            PublishOptions::default(),
        )
        .await
        .expect("published");
        assert_eq!(next(&mut at_b).await, json!("before"));

        redis.stop();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            a.publish("reload-plugins", &json!("lost"), PublishOptions::default())
                .await
                .is_err(),
            "publishing while Redis is down is an error, not a silent drop"
        );
        redis.restart();

        // The subscriber reconnects with backoff; publish until it hears us again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            a.publish("reload-plugins", &json!("after"), PublishOptions::default())
                .await
                .ok();
            if let Ok(Some(message)) =
                tokio::time::timeout(Duration::from_millis(200), at_b.recv()).await
            {
                assert_eq!(message.payload, json!("after"));
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never resubscribed");
        }
    }
}

#[cfg(feature = "integration-tests")]
contract!(redis, redis_backed::factory());
