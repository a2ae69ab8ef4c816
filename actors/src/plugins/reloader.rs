//! Hot reload of plugins on PostHog's `reload-plugins` pub/sub channel (spec 4): PostHog's app
//! publishes on it (a bare string) whenever a plugin, its source or a config changes.
//!
//! A notice waits a random jitter of up to RELOAD_PLUGIN_JITTER_MAX_MS, so that a fleet does
//! not reload at once; notices that arrive meanwhile are absorbed, and one that arrives during
//! a reload schedules exactly one more. A reload reads every active config again (only changed
//! plugins are transpiled again), swaps the set into the pool, and has the workers tear down
//! the VMs of configs that are gone or changed; the new versions are built and set up on
//! their next use. A failed read is tried 3 times, 5 s apart, as PostHog does.
//!
//! It also answers `populate-plugin-capabilities` (`{"plugin_id": N}`): a VM of one of the
//! plugin's active configs is built, which writes what it exports to
//! `posthog_plugin.capabilities`. A plugin without an active config here gets them written
//! when its first config loads.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::mpsc::error::TryRecvError;
use tokio_util::sync::CancellationToken;

use crate::Shutdown;

use crate::cluster::ClusterError;
use crate::cluster::pubsub::{PubSub, SubscribeOptions, Subscription};
use crate::plugins::outputs::PluginOutputs;
use crate::plugins::pool::{PluginSet, PluginVmPool};
use crate::plugins::registry::{LoadProblem, PluginRegistry};
use crate::system::stats::ActorStats;

/// PostHog's channel, published by its app when a plugin is installed or updated.
pub const POPULATE_CAPABILITIES_CHANNEL: &str = "populate-plugin-capabilities";

const RELOAD_ATTEMPTS: u32 = 3;
const RELOAD_RETRY: Duration = Duration::from_secs(5);

pub struct PluginReloaderConfig {
    /// PLUGINS_RELOAD_PUBSUB_CHANNEL.
    pub channel: String,
    /// RELOAD_PLUGIN_JITTER_MAX_MS.
    pub jitter_max: Duration,
}

/// The two channels, subscribed before the actor starts so that a notice published right
/// after the server started is not missed.
pub struct ReloadSubscriptions {
    reload: Subscription,
    populate: Subscription,
}

impl ReloadSubscriptions {
    pub async fn subscribe(pubsub: &PubSub, channel: &str) -> Result<Self, ClusterError> {
        Ok(Self {
            reload: pubsub
                .subscribe_foreign(channel, SubscribeOptions::default())
                .await?,
            populate: pubsub
                .subscribe_foreign(POPULATE_CAPABILITIES_CHANNEL, SubscribeOptions::default())
                .await?,
        })
    }
}

/// The `PubSub` actor of the design: the reload subscriber. Reloads the plugins on
/// PLUGINS_RELOAD_PUBSUB_CHANNEL and populates capabilities on request.
///
/// A restart (after a panic) drops the subscriptions with the loops and subscribes again; a
/// notice published during that moment is missed, as it would be by a reconnecting instance.
///
/// Receives: `Shutdown` from the topology (stop listening).
pub struct PluginReloader {
    config: PluginReloaderConfig,
    pubsub: PubSub,
    /// The first start's subscriptions; later starts subscribe again.
    subscriptions: Option<ReloadSubscriptions>,
    /// Shared with the loop; loads reuse what earlier loads transpiled.
    registry: Arc<tokio::sync::Mutex<PluginRegistry>>,
    pool: PluginVmPool,
    outputs: Arc<dyn PluginOutputs>,
    stats: Arc<ActorStats>,
    /// Stops the running loops; replaced on restart.
    stop: CancellationToken,
}

impl PluginReloader {
    pub fn new(
        config: PluginReloaderConfig,
        pubsub: PubSub,
        subscriptions: ReloadSubscriptions,
        registry: PluginRegistry,
        pool: PluginVmPool,
        outputs: Arc<dyn PluginOutputs>,
        stats: Arc<ActorStats>,
    ) -> Self {
        Self {
            config,
            pubsub,
            subscriptions: Some(subscriptions),
            registry: Arc::new(tokio::sync::Mutex::new(registry)),
            pool,
            outputs,
            stats,
            stop: CancellationToken::new(),
        }
    }
}

impl Actor for PluginReloader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let subscriptions = self.subscriptions.take();
        let pubsub = self.pubsub.clone();
        let channel = self.config.channel.clone();
        let jitter_max = self.config.jitter_max;
        let registry = Arc::clone(&self.registry);
        let pool = self.pool.clone();
        let outputs = Arc::clone(&self.outputs);
        let stop = self.stop.clone();
        let stats = Arc::clone(&self.stats);
        ctx.spawn(
            async move {
                let subscriptions = match subscriptions {
                    Some(subscriptions) => subscriptions,
                    None => match ReloadSubscriptions::subscribe(&pubsub, &channel).await {
                        Ok(subscriptions) => subscriptions,
                        Err(error) => {
                            // The actor stays up without listening; a restart tries again.
                            stats.record_error();
                            tracing::error!(%error, "could not subscribe to the plugin reload channels");
                            return;
                        }
                    },
                };
                let ReloadSubscriptions { reload, populate } = subscriptions;
                futures::join!(
                    run(reload, jitter_max, registry, pool.clone(), outputs, stop.clone()),
                    populate_capabilities(populate, pool, stop),
                );
            }
            .into_actor(self),
        );
    }
}

impl Supervised for PluginReloader {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.stop.cancel();
        self.stop = CancellationToken::new();
    }
}

impl Handler<Shutdown> for PluginReloader {
    type Result = ();

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) {
        let _timer = self.stats.message_received();
        self.stop.cancel();
    }
}

#[cfg(any(test, feature = "test-util"))]
impl Handler<crate::system::supervisor::Crash> for PluginReloader {
    type Result = ();

    fn handle(&mut self, crash: crate::system::supervisor::Crash, _: &mut Context<Self>) {
        crash.now();
    }
}

async fn run(
    mut notices: Subscription,
    jitter_max: Duration,
    registry: Arc<tokio::sync::Mutex<PluginRegistry>>,
    pool: PluginVmPool,
    outputs: Arc<dyn PluginOutputs>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            notice = notices.recv() => if notice.is_none() { return },
        }
        let jitter = jitter_max.mul_f64(rand::random::<f64>());
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(jitter) => {}
        }
        // Notices that came during the jitter are covered by this reload.
        loop {
            match notices.try_recv() {
                Ok(_) => continue,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        reload(&mut *registry.lock().await, &pool, outputs.as_ref()).await;
        // A notice that arrived during the reload stays queued and starts the next round.
    }
}

async fn reload(registry: &mut PluginRegistry, pool: &PluginVmPool, outputs: &dyn PluginOutputs) {
    for attempt in 1..=RELOAD_ATTEMPTS {
        match registry.load().await {
            Ok((configs, problems)) => {
                let count = configs.len();
                if !problems.is_empty() {
                    outputs.side_effects(LoadProblem::report_all(problems));
                }
                pool.replace_plugins(PluginSet::new(configs)).await;
                tracing::info!(configs = count, "Plugins reloaded.");
                return;
            }
            Err(error) => {
                tracing::error!(attempt, %error, "Plugins could not be reloaded.");
                if attempt < RELOAD_ATTEMPTS {
                    tokio::time::sleep(RELOAD_RETRY).await;
                }
            }
        }
    }
}

async fn populate_capabilities(
    mut requests: Subscription,
    pool: PluginVmPool,
    stop: CancellationToken,
) {
    loop {
        let request = tokio::select! {
            () = stop.cancelled() => return,
            request = requests.recv() => match request {
                Some(request) => request,
                None => return,
            },
        };
        let Some(plugin_id) = plugin_id_of(&request.payload) else {
            tracing::warn!(payload = %request.payload, "populate-plugin-capabilities without a plugin_id; ignored");
            continue;
        };
        match pool.inspect_plugin(plugin_id).await {
            Ok(true) => tracing::info!(plugin_id, "Plugin capabilities populated."),
            Ok(false) => tracing::info!(
                plugin_id,
                "No active config of the plugin here; its capabilities are written when one loads."
            ),
            Err(error) => {
                tracing::warn!(plugin_id, %error, "Plugin capabilities could not be populated.");
            }
        }
    }
}

/// PostHog publishes `{"plugin_id": N}` as raw JSON, which arrives as a string.
fn plugin_id_of(payload: &serde_json::Value) -> Option<i64> {
    let parsed = match payload {
        serde_json::Value::String(raw) => serde_json::from_str(raw).ok()?,
        other => other.clone(),
    };
    parsed.get("plugin_id")?.as_i64()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::cluster::InstanceId;
    use crate::cluster::pubsub::{InProcessBus, PubSubTransport};
    use crate::plugins::registry::RegistrySource;
    use crate::plugins::test_pool::{self, Collected};
    use crate::system::metrics::Metrics;
    use crate::system::stats::ActorRegistry;
    use crate::system::supervisor::{Crash, SpawnOptions, spawn_supervised};

    /// `count` configs of one plugin for team 2, as the embedded profile's configs file.
    fn write_configs(file: &std::path::Path, count: usize) {
        let configs = "[[plugin_config]]\nplugin = \"noop\"\nteam_id = 2\n\n".repeat(count);
        std::fs::write(file, configs).expect("configs file");
    }

    /// Publishes PostHog's bare reload notice until the pool runs `configs` configs.
    async fn reload_until(bus_side: &dyn PubSubTransport, pool: &PluginVmPool, configs: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while pool.plugins().config_count() != configs {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never reloaded to {configs}"
            );
            bus_side
                .publish("reload-plugins", "reload")
                .await
                .expect("published");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A panic in the reload subscriber's handler: supervision restarts it (counted), it
    /// subscribes again, and the next notice reloads the plugins.
    #[actix::test]
    async fn a_panicking_reload_subscriber_is_restarted_and_reloads_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugins_dir = dir.path().join("plugins");
        std::fs::create_dir_all(plugins_dir.join("noop")).expect("mkdir");
        std::fs::write(
            plugins_dir.join("noop/index.js"),
            "exports.processEvent = (e) => e;",
        )
        .expect("plugin");
        let configs_file = dir.path().join("plugins.toml");
        write_configs(&configs_file, 1);
        let mut plugin_registry = PluginRegistry::new(RegistrySource::Directory {
            plugins_dir,
            configs_file: configs_file.clone(),
            ids: None,
        });
        let (configs, problems) = plugin_registry.load().await.expect("loaded");
        assert!(problems.is_empty());
        let outputs = Arc::new(Collected::default());
        let jobs = Arc::new(crate::plugins::jobs::MemoryJobStore::new());
        let pool = test_pool::start(configs, jobs, Arc::clone(&outputs)).await;

        let bus = InProcessBus::new();
        let (transport, inbound) = bus.transport();
        let pubsub = PubSub::new(InstanceId::generate(), "test:", transport, inbound);
        let (publisher, _) = bus.transport();
        let subscriptions = ReloadSubscriptions::subscribe(&pubsub, "reload-plugins")
            .await
            .expect("subscribed");
        let registry = ActorRegistry::new(Metrics::new().expect("metrics"));
        let reloader = spawn_supervised(&registry, SpawnOptions::new("pubsub"), |stats| {
            PluginReloader::new(
                PluginReloaderConfig {
                    channel: "reload-plugins".into(),
                    jitter_max: Duration::ZERO,
                },
                pubsub,
                subscriptions,
                plugin_registry,
                pool.clone(),
                outputs,
                stats,
            )
        });
        write_configs(&configs_file, 2);
        reload_until(publisher.as_ref(), &pool, 2).await;

        let lost = reloader.send(Crash).await;
        assert!(matches!(lost, Err(MailboxError::Closed)), "{lost:?}");
        let snapshot = reloader.stats().snapshot();
        assert_eq!((snapshot.restarts, snapshot.errors), (1, 1));

        write_configs(&configs_file, 3);
        reload_until(publisher.as_ref(), &pool, 3).await;
        reloader.send(Shutdown).await.expect("stopped");
    }

    #[test]
    fn the_plugin_id_is_read_from_raw_or_parsed_json() {
        assert_eq!(plugin_id_of(&json!(r#"{"plugin_id": 7}"#)), Some(7));
        assert_eq!(plugin_id_of(&json!({ "plugin_id": 8 })), Some(8));
        assert_eq!(plugin_id_of(&json!("reload!")), None);
        assert_eq!(plugin_id_of(&json!({ "pluginId": 8 })), None);
    }
}
