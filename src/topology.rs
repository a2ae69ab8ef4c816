//! Spawns the actors bottom-up and wires them together; the only place that knows them all.
//!
//! Each actor gets its typed config and the addresses it sends to in its constructor. Actors
//! that hold in-flight work register for shutdown here, in start order, so that shutdown can
//! drain them in reverse: consumers first, then the workers they feed, then the writers.

use std::sync::Arc;

use actix::{MailboxError, Recipient};
use plugin_server_actors::Shutdown;
use plugin_server_actors::cluster::redis_pool::RedisPoolConfig;
use plugin_server_actors::cluster::{Cluster, ClusterConfig, InstanceId};
use plugin_server_actors::health::{BeginShutdown, Health, HealthConfig, SetReady};
use plugin_server_actors::metrics::Metrics;
use plugin_server_actors::stats::{ActorRegistry, ObservedAddr};
use plugin_server_actors::supervisor::{SpawnOptions, spawn_supervised};

use crate::error::ServerError;
use crate::settings::Settings;

/// The running actors.
pub struct Topology {
    pub metrics: Metrics,
    pub registry: Arc<ActorRegistry>,
    pub health: ObservedAddr<Health>,
    /// Cache, pub/sub, sync messages, locks and event queue: Redis when `REDIS_URL` is set.
    pub cluster: Cluster,
    /// Actors to drain on shutdown, in start order (dependencies first).
    drain_order: Vec<(String, Recipient<Shutdown>)>,
}

impl Topology {
    /// Connects the cluster primitives and starts every actor this instance runs. Must be
    /// called inside an actix `System`.
    pub async fn start(settings: &Settings) -> Result<Self, ServerError> {
        let cluster = Cluster::connect(cluster_config(settings))
            .await
            .map_err(ServerError::Redis)?;
        let metrics = Metrics::new()?;
        let registry = Arc::new(ActorRegistry::new(metrics.clone()));
        let health_config = HealthConfig {
            max_stale: settings.healthcheck_max_stale(),
        };
        let health = spawn_supervised(&registry, SpawnOptions::new("health"), |stats| {
            Health::new(health_config, stats)
        });
        Ok(Self {
            metrics,
            registry,
            health,
            cluster,
            drain_order: Vec::new(),
        })
    }

    /// Adds an actor to the shutdown sequence; actors added later are drained earlier.
    pub fn drain_on_shutdown(&mut self, name: impl Into<String>, actor: Recipient<Shutdown>) {
        self.drain_order.push((name.into(), actor));
    }

    /// Readiness turns green.
    pub fn mark_ready(&self) {
        self.health.do_send(SetReady);
    }

    /// Readiness turns red, then every registered actor drains, last started first.
    pub async fn shutdown(&self) {
        if let Err(error) = self.health.send(BeginShutdown).await {
            tracing::warn!(%error, "health did not take the shutdown notice");
        }
        for (name, actor) in self.drain_order.iter().rev() {
            tracing::info!(actor = %name, "draining");
            match actor.send(Shutdown).await {
                Ok(()) => tracing::info!(actor = %name, "drained"),
                Err(MailboxError::Closed) => tracing::warn!(actor = %name, "already stopped"),
                Err(MailboxError::Timeout) => tracing::warn!(actor = %name, "drain timed out"),
            }
        }
    }
}

/// The cluster primitives' settings: Redis when a URL is configured, in-process otherwise.
fn cluster_config(settings: &Settings) -> ClusterConfig {
    ClusterConfig {
        redis: settings.redis_url().map(|url| RedisPoolConfig {
            url,
            min_size: settings.redis_pool_min_size,
            max_size: settings.redis_pool_max_size,
        }),
        prefix: settings.cluster_prefix.clone(),
        instance: InstanceId::generate(),
    }
}
