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

use tokio::sync::mpsc::error::TryRecvError;
use tokio_util::sync::CancellationToken;

use crate::cluster::ClusterError;
use crate::cluster::pubsub::{PubSub, SubscribeOptions, Subscription};
use crate::plugins::outputs::PluginOutputs;
use crate::plugins::pool::{PluginSet, PluginVmPool};
use crate::plugins::registry::PluginRegistry;
use crate::plugins::worker::SideEffects;

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

/// The running reloader; it stops when dropped.
pub struct PluginReloader {
    stop: CancellationToken,
}

impl Drop for PluginReloader {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl PluginReloader {
    /// Subscribes now (so a notice published right after start is not missed), then reloads
    /// in the background.
    pub async fn start(
        config: PluginReloaderConfig,
        pubsub: &PubSub,
        registry: PluginRegistry,
        pool: PluginVmPool,
        outputs: Arc<dyn PluginOutputs>,
    ) -> Result<Self, ClusterError> {
        let subscription = pubsub
            .subscribe_foreign(&config.channel, SubscribeOptions::default())
            .await?;
        let populate = pubsub
            .subscribe_foreign(POPULATE_CAPABILITIES_CHANNEL, SubscribeOptions::default())
            .await?;
        let stop = CancellationToken::new();
        tokio::spawn(populate_capabilities(populate, pool.clone(), stop.clone()));
        tokio::spawn(run(
            subscription,
            config.jitter_max,
            registry,
            pool,
            outputs,
            stop.clone(),
        ));
        Ok(Self { stop })
    }
}

async fn run(
    mut notices: Subscription,
    jitter_max: Duration,
    mut registry: PluginRegistry,
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
        reload(&mut registry, &pool, outputs.as_ref()).await;
        // A notice that arrived during the reload stays queued and starts the next round.
    }
}

async fn reload(registry: &mut PluginRegistry, pool: &PluginVmPool, outputs: &dyn PluginOutputs) {
    for attempt in 1..=RELOAD_ATTEMPTS {
        match registry.load().await {
            Ok((configs, problems)) => {
                let count = configs.len();
                if !problems.is_empty() {
                    let mut side = SideEffects::default();
                    for problem in problems {
                        tracing::error!(plugin_config_id = problem.identity.plugin_config_id, plugin = %problem.identity.plugin_name, error = %problem.message, "A plugin could not be loaded; its config is skipped.");
                        side.config_errors.push((problem.identity, problem.message));
                    }
                    outputs.side_effects(side);
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

    use super::plugin_id_of;

    #[test]
    fn the_plugin_id_is_read_from_raw_or_parsed_json() {
        assert_eq!(plugin_id_of(&json!(r#"{"plugin_id": 7}"#)), Some(7));
        assert_eq!(plugin_id_of(&json!({ "plugin_id": 8 })), Some(8));
        assert_eq!(plugin_id_of(&json!("reload!")), None);
        assert_eq!(plugin_id_of(&json!({ "pluginId": 8 })), None);
    }
}
