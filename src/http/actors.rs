//! `GET /_actors`: per-actor JSON (name, mailbox length, messages handled, errors, restarts,
//! last progress). Read from the shared stats, not by asking each actor, so a stuck actor
//! still shows up, with its growing mailbox.

use actix_web::{HttpResponse, web};

use super::AppState;

pub async fn actors(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"actors": state.registry.snapshot()}))
}
