//! `GET /_actors`: per-actor JSON (name, mailbox length, messages handled, errors, restarts,
//! last progress), and the plugin VM pool (configs, live VMs and their heap at load, per worker
//! thread). Read from shared stats, not by asking each actor, so a stuck actor still shows up,
//! with its growing mailbox.

use actix_web::{HttpResponse, web};

use plugin_server_actors::plugin_scheduler::SchedulerStats;

use super::AppState;

pub async fn actors(state: web::Data<AppState>) -> HttpResponse {
    let plugins = state.plugins.as_ref().map(|pool| pool.stats());
    let scheduler = state.scheduler.as_ref().map(SchedulerStats::snapshot);
    HttpResponse::Ok().json(serde_json::json!({
        "actors": state.registry.snapshot(),
        "plugin_vm_pool": plugins,
        "plugin_scheduler": scheduler,
    }))
}
