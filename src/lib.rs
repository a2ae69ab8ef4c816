//! plugin-server: PostHog's plugin server as a supervised actix actor system.
//!
//! `start` brings up the actors and the HTTP server inside the current actix `System` and
//! returns a handle; `main.rs` waits on it for SIGINT/SIGTERM, tests call `shutdown` directly.

pub mod error;
pub mod http;
pub mod settings;
pub mod telemetry;
pub mod topology;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use plugin_server_actors::system::metrics::MetricsError;

pub use error::ServerError;
pub use settings::{LoadOptions, Settings};
pub use topology::Topology;

/// How long in-flight HTTP requests get to finish once shutdown stops the listener.
const HTTP_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// A started server.
pub struct RunningServer {
    local_addr: SocketAddr,
    topology: Topology,
    http: actix_web::dev::ServerHandle,
    http_task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Starts the actors, then the HTTP server, then marks the server ready.
/// Must be called inside an actix `System` (as `main` and `#[actix::test]` provide).
pub async fn start(settings: Settings) -> Result<RunningServer, ServerError> {
    telemetry::install_tls_provider();
    let topology = Topology::start(&settings).await?;
    let addr = settings.http_listen_addr()?;
    let listener = TcpListener::bind(addr).map_err(|source| ServerError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;

    let state = http::AppState {
        health: topology.health.clone(),
        registry: topology.registry.clone(),
        metrics: topology.metrics.clone(),
        plugins: Some(topology.plugins.clone()),
        scheduler: topology.scheduler_stats(),
        job_queue: topology.job_queue_stats(),
        mode: settings.mode()?.map(|mode| mode.as_str().to_owned()),
        capabilities: topology.capabilities.names(),
    };
    let capture_metrics = http::capture::CaptureMetrics::new().map_err(MetricsError::from)?;
    capture_metrics
        .register(topology.metrics.registry())
        .map_err(MetricsError::from)?;
    let capture = web::Data::new(http::capture::CaptureState {
        metrics: capture_metrics,
        intake: topology.intake.clone(),
        max_body_bytes: http::capture::DEFAULT_MAX_BODY_BYTES,
        known_tokens: topology.known_tokens.clone(),
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .app_data(capture.clone())
            .configure(http::capture::routes)
            .configure(http::sdk_config::routes)
            .configure(http::routes)
    })
    // Signals are ours: shutdown must drain the actors before the listener goes away.
    .disable_signals()
    .shutdown_timeout(HTTP_SHUTDOWN_TIMEOUT.as_secs())
    .listen(listener)
    .map_err(|source| ServerError::Bind { addr, source })?
    .run();
    let http = server.handle();
    let http_task = actix::spawn(server);

    topology.mark_ready();
    // PostHog settings that are set but cannot apply here, said once rather than ignored.
    let not_applied: Vec<String> = settings
        .inapplicable()
        .iter()
        .map(|(name, why)| format!("{name}: {why}"))
        .collect();
    tracing::info!(
        %local_addr,
        version = env!("CARGO_PKG_VERSION"),
        profile = profile_summary(&settings),
        settings_not_applied = not_applied.join("; "),
        instance = %topology.cluster.instance,
        "plugin server started"
    );
    Ok(RunningServer {
        local_addr,
        topology,
        http,
        http_task,
    })
}

/// One word per part, so the log says which profile each part runs in.
fn profile_summary(settings: &Settings) -> String {
    let part = |configured: bool, cluster: &str, embedded: &str| {
        if configured { cluster } else { embedded }.to_owned()
    };
    [
        part(
            settings.database_url().is_some(),
            "postgres",
            "embedded-store",
        ),
        part(
            settings.redis_url().is_some(),
            "redis",
            "in-process-cluster",
        ),
        part(
            settings.clickhouse_url().is_some(),
            "clickhouse",
            "jsonl-sink",
        ),
        part(
            !settings.kafka_hosts.trim().is_empty(),
            "kafka",
            "http-capture-only",
        ),
    ]
    .join(",")
}

/// SIGTERM and SIGINT, caught from `install` on. Installed before the server starts, so that a
/// signal sent as soon as it announces itself is a graceful stop, not the default kill.
pub struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Must be called inside a tokio runtime.
    pub fn install() -> Result<Self, ServerError> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate()).map_err(ServerError::Signals)?,
            interrupt: signal(SignalKind::interrupt()).map_err(ServerError::Signals)?,
        })
    }
}

impl RunningServer {
    /// The address the HTTP server listens on (the real port when `HTTP_SERVER_PORT` is 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn topology_mut(&mut self) -> &mut Topology {
        &mut self.topology
    }

    /// Waits for SIGINT or SIGTERM (caught from `signals` on), then shuts down gracefully.
    pub async fn run_until(self, mut signals: ShutdownSignals) -> Result<(), ServerError> {
        tokio::select! {
            _ = signals.terminate.recv() => tracing::info!("SIGTERM received; shutting down"),
            _ = signals.interrupt.recv() => tracing::info!("SIGINT received; shutting down"),
        }
        self.shutdown().await;
        Ok(())
    }

    /// Readiness goes 503, the actors drain in reverse dependency order, then HTTP stops.
    /// HTTP stays up meanwhile, so probes see the 503 instead of a refused connection.
    pub async fn shutdown(self) {
        self.topology.shutdown().await;
        self.http.stop(true).await;
        match self.http_task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "http server ended with an error"),
            Err(error) => tracing::warn!(%error, "http server task failed"),
        }
        tracing::info!("plugin server stopped");
    }
}
