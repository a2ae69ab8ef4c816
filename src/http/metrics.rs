//! `GET /_metrics`: the Prometheus text format.

use actix_web::{HttpResponse, web};

use super::AppState;

/// The content type Prometheus expects for the text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    // Encoding walks every family; they are few (no per-event labels), so it stays inline.
    HttpResponse::Ok()
        .content_type(PROMETHEUS_TEXT)
        .body(state.metrics.render())
}
