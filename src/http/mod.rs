//! The HTTP surface: health, readiness, metrics and actor stats. Handlers only read shared
//! stats or `send` to actors; they never do work of their own.

mod actors;
pub mod capture;
mod health;
mod metrics;
pub mod sdk_config;

use plugin_server_actors::plugins::job_queue::JobQueueStats;
use plugin_server_actors::plugins::pool::PluginVmPool;
use plugin_server_actors::plugins::scheduler::SchedulerStats;
use std::sync::Arc;

use actix_web::{HttpResponse, web};
use plugin_server_actors::system::health::Health;
use plugin_server_actors::system::metrics::Metrics;
use plugin_server_actors::system::stats::{ActorRegistry, ObservedAddr};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub health: ObservedAddr<Health>,
    pub registry: Arc<ActorRegistry>,
    pub metrics: Metrics,
    /// The plugin VM pool, shown in `/_actors` beside the actors.
    pub plugins: Option<PluginVmPool>,
    /// The scheduler's state (`holds_lock`, ticks), shown in `/_actors`.
    pub scheduler: Option<SchedulerStats>,
    /// The job queue's counters (claimed, succeeded, retried, dead-lettered), in `/_actors`.
    pub job_queue: Option<JobQueueStats>,
    /// PLUGIN_SERVER_MODE (null when unset) and PostHog's names of what it runs.
    pub mode: Option<String>,
    pub capabilities: Vec<&'static str>,
}

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/_health", web::get().to(health::health))
        .route("/_ready", web::get().to(health::ready))
        .route("/_metrics", web::get().to(metrics::metrics))
        .route("/_actors", web::get().to(actors::actors))
        .default_service(web::to(not_found));
}

async fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(serde_json::json!({"error": "not found"}))
}
