//! `GET /_actors`: per-actor JSON (name, mailbox length, messages handled, errors, restarts,
//! last progress), the plugin VM pool (configs, live VMs and their heap at load, per worker
//! thread), the scheduler and the job queue. Read from shared stats, not by asking each actor, so a stuck actor still shows up,
//! with its growing mailbox.

use actix_web::{HttpResponse, web};

use plugin_server_actors::plugins::job_queue::JobQueueStats;
use plugin_server_actors::plugins::scheduler::SchedulerStats;

use super::AppState;

pub async fn actors(state: web::Data<AppState>) -> HttpResponse {
    let plugins = state.plugins.as_ref().map(|pool| pool.stats());
    let scheduler = state.scheduler.as_ref().map(SchedulerStats::snapshot);
    let job_queue = state.job_queue.as_ref().map(JobQueueStats::snapshot);
    HttpResponse::Ok().json(serde_json::json!({
        "mode": state.mode,
        "capabilities": state.capabilities,
        "actors": state.registry.snapshot(),
        "plugin_vm_pool": plugins,
        "plugin_scheduler": scheduler,
        "plugin_job_queue": job_queue,
    }))
}
