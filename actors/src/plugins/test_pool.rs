//! A VM pool for the plugin actors' tests, on the server's own host services (in-process
//! cache, storage and job store, no network needed unless a plugin fetches).

use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use super::LoadedConfig;
use super::host_services::{PluginHttp, PluginStorage, ServerHost, ServerHostConfig};
use super::jobs::JobStore;
use super::outputs::PluginOutputs;
use super::pool::{HostFactory, PluginSet, PluginVmPool, PluginVmPoolConfig};
use super::runtime::natives::PluginHost;
use super::runtime::vm::VmLimits;
use super::runtime::{VmIdentity, VmSource};
use super::worker::SideEffects;
use crate::cluster::cache::{CacheStore, InProcessCache, InProcessCacheBackend};
use crate::geoip::GeoIpHandle;
use crate::system::metrics::Metrics;

/// What the plugins produced besides events (console output among it).
#[derive(Default)]
pub(crate) struct Collected(pub(crate) Mutex<Vec<SideEffects>>);

impl PluginOutputs for Collected {
    fn side_effects(&self, side: SideEffects) {
        if let Ok(mut all) = self.0.lock() {
            all.push(side);
        }
    }
}

/// Config `id` of team `team_id` running `code` (CommonJS).
pub(crate) fn config(id: i64, team_id: i64, code: &str) -> LoadedConfig {
    LoadedConfig {
        identity: VmIdentity {
            plugin_config_id: id,
            plugin_id: id,
            team_id,
            plugin_name: format!("plugin-{id}"),
        },
        source: VmSource {
            file_name: "index.js".into(),
            code: Arc::from(code),
        },
        config: json!({}),
        attachments: Vec::new(),
        order: 1,
        version: "1".into(),
        log_level: 0,
        webhook_filters: None,
    }
}

/// A one-worker pool running `configs`, its jobs in `jobs`.
pub(crate) async fn start(
    configs: Vec<LoadedConfig>,
    jobs: Arc<dyn JobStore>,
    outputs: Arc<Collected>,
) -> PluginVmPool {
    // reqwest is built without a default TLS provider; the server installs ring at start.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Handle::current();
    let http = PluginHttp::new(
        reqwest::Client::new(),
        ServerHostConfig {
            request_timeout: Duration::from_secs(5),
            refuse_private_addresses: false,
            site_url: "http://localhost:8000".to_owned(),
        },
    );
    let cache: Arc<dyn CacheStore> =
        Arc::new(InProcessCache::new(InProcessCacheBackend::new(), "test:"));
    let factory: HostFactory = Arc::new(move || {
        Rc::new(ServerHost::new(
            runtime.clone(),
            http.clone(),
            Arc::clone(&cache),
            PluginStorage::InProcess(Arc::default()),
            GeoIpHandle::new(),
            Arc::clone(&jobs),
        )) as Rc<dyn PluginHost>
    });
    let config = PluginVmPoolConfig {
        workers: 1,
        async_workers: 1,
        tasks_per_worker: 10,
        limits: VmLimits {
            task_timeout: Duration::from_secs(5),
            memory_limit_bytes: 64 * 1024 * 1024,
            ..VmLimits::default()
        },
        setup_retry_base: Duration::from_millis(50),
        retention: crate::plugins::worker::VmRetention::default(),
        isolation: crate::plugins::isolation::WorkerIsolation::Thread,
    };
    let metrics = Metrics::new().expect("metrics");
    let pool = PluginVmPool::start(config, factory, outputs, &metrics).expect("pool starts");
    pool.replace_plugins(PluginSet::new(configs)).await;
    pool
}

/// Waits up to 10 s for `check` to hold.
pub(crate) async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
