//! `GET /_health` (liveness: every check making progress) and `GET /_ready` (readiness).

use actix_web::{HttpResponse, web};
use plugin_server_actors::system::health::{GetHealth, GetReadiness, Readiness};
use serde_json::json;

use super::AppState;

/// 200 `{"status":"ok","checks":{..}}`, or 503 with each failing check named.
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    match state.health.send(GetHealth).await {
        Ok(report) if report.is_healthy() => HttpResponse::Ok().json(report),
        Ok(report) => HttpResponse::ServiceUnavailable().json(report),
        Err(error) => HttpResponse::ServiceUnavailable().json(json!({
            "status": "error",
            "checks": {"health": format!("unavailable: {error}")},
        })),
    }
}

/// 200 once started, 503 while starting and again once shutdown begins.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    match state.health.send(GetReadiness).await {
        Ok(Readiness::Ready) => HttpResponse::Ok().json(json!({"status": "ok"})),
        Ok(readiness) => HttpResponse::ServiceUnavailable().json(json!({"status": readiness})),
        Err(error) => HttpResponse::ServiceUnavailable()
            .json(json!({"status": "error", "error": error.to_string()})),
    }
}
