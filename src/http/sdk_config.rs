//! What posthog-js asks of its `api_host` besides capture: the remote config
//! (`/array/<token>/config.js`, falling back to `/array/<token>/config`) and feature flags
//! (`/flags/?v=2`, older SDKs `/decide/`). The SDK turns autocapture on only once a remote
//! config says `autocapture_opt_out: false`, so without these a browser sends pageviews and
//! custom events but never `$autocapture`.
//!
//! This server evaluates no feature flags, so every answer says there are none
//! (`hasFeatureFlags: false` makes the SDK skip `/flags` entirely), and offers the
//! compression it decodes. Nothing here is secret: project tokens are public, and the answer is
//! the same for every token, as for a project with PostHog's defaults.

use actix_web::http::Method;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};

use super::capture::add_cors_headers;

/// Registers the endpoints; each path is one resource with all its methods (see
/// `capture::routes`).
pub fn routes(config: &mut web::ServiceConfig) {
    config.service(
        web::resource("/array/{token}/config")
            .route(web::get().to(remote_config_json))
            .route(web::method(Method::OPTIONS).to(preflight)),
    );
    config.service(
        web::resource("/array/{token}/config.js")
            .route(web::get().to(remote_config_js))
            .route(web::method(Method::OPTIONS).to(preflight)),
    );
    for path in ["/flags", "/flags/", "/decide", "/decide/"] {
        config.service(
            web::resource(path)
                .route(web::post().to(flags))
                .route(web::get().to(flags))
                .route(web::method(Method::OPTIONS).to(preflight)),
        );
    }
}

/// The remote config of a project with PostHog's defaults and no feature flags. Surveys,
/// session recording and site apps are left out: naming them makes the SDK load their
/// scripts from `/static/`, which this server does not serve.
fn remote_config(token: &str) -> Value {
    json!({
        "token": token,
        "supportedCompression": ["gzip", "gzip-js"],
        "hasFeatureFlags": false,
        "autocapture_opt_out": false,
        "autocaptureExceptions": false,
        "capturePerformance": false,
        "captureDeadClicks": false,
        "heatmaps": false,
        "sessionRecording": false,
        "elementsChainAsString": true,
        "defaultIdentifiedOnly": true,
        "siteApps": [],
    })
}

async fn remote_config_json(request: HttpRequest, token: web::Path<String>) -> HttpResponse {
    let mut response = HttpResponse::Ok().json(remote_config(&token));
    add_cors_headers(&request, response.headers_mut());
    response
}

/// The script form: it registers the config where the SDK looks for it, saving the JSON
/// request.
async fn remote_config_js(request: HttpRequest, token: web::Path<String>) -> HttpResponse {
    // The token is written as a JSON string, so nothing in it can end the script.
    let token_literal = Value::String(token.to_string()).to_string();
    let script = format!(
        "(function() {{\n  window._POSTHOG_REMOTE_CONFIG = window._POSTHOG_REMOTE_CONFIG || {{}};\n  \
         window._POSTHOG_REMOTE_CONFIG[{token_literal}] = {{ config: {}, siteApps: [] }};\n}})();\n",
        remote_config(&token)
    );
    let mut response = HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/javascript"),
        ))
        .body(script);
    add_cors_headers(&request, response.headers_mut());
    response
}

/// No flags: the `/flags` (v2) answer, with the `/decide` fields older SDKs read.
async fn flags(request: HttpRequest) -> HttpResponse {
    let mut response = HttpResponse::Ok().json(json!({
        "flags": {},
        "featureFlags": {},
        "featureFlagPayloads": {},
        "errorsWhileComputingFlags": false,
        "quotaLimited": [],
        "config": {"enable_collect_everything": true},
        "autocapture_opt_out": false,
        "supportedCompression": ["gzip", "gzip-js"],
        "sessionRecording": false,
        "isAuthenticated": false,
        "toolbarParams": {},
        "siteApps": [],
    }));
    add_cors_headers(&request, response.headers_mut());
    response
}

async fn preflight(request: HttpRequest) -> HttpResponse {
    let mut response = HttpResponse::Ok().finish();
    add_cors_headers(&request, response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use actix_web::{App, test};

    use super::*;

    #[actix_web::test]
    async fn the_remote_config_turns_autocapture_on_with_cors() {
        let app = test::init_service(App::new().configure(routes)).await;
        let request = test::TestRequest::get()
            .uri("/array/phc_abc/config")
            .insert_header((header::ORIGIN, "http://shop.example"))
            .to_request();
        let response = test::call_service(&app, request).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers().get(header::ACCESS_CONTROL_ALLOW_ORIGIN),
            Some(&HeaderValue::from_static("http://shop.example"))
        );
        let body: Value = test::read_body_json(response).await;
        assert_eq!(body["token"], "phc_abc");
        assert_eq!(body["autocapture_opt_out"], false);
        assert_eq!(body["hasFeatureFlags"], false);
    }

    #[actix_web::test]
    async fn the_script_registers_the_config_under_the_token() {
        let app = test::init_service(App::new().configure(routes)).await;
        let request = test::TestRequest::get()
            .uri("/array/phc_a%22b/config.js")
            .to_request();
        let response = test::call_service(&app, request).await;
        assert_eq!(response.status(), 200);
        let script = String::from_utf8(test::read_body(response).await.to_vec()).expect("utf-8");
        assert!(
            script.contains(r#"window._POSTHOG_REMOTE_CONFIG["phc_a\"b"] = { config: {"#),
            "{script}"
        );
    }

    #[actix_web::test]
    async fn flags_and_decide_answer_no_flags() {
        let app = test::init_service(App::new().configure(routes)).await;
        for uri in ["/flags/?v=2&compression=base64", "/decide/?v=3"] {
            let request = test::TestRequest::post()
                .uri(uri)
                .set_payload("data=e30%3D")
                .to_request();
            let response = test::call_service(&app, request).await;
            assert_eq!(response.status(), 200, "{uri}");
            let body: Value = test::read_body_json(response).await;
            assert_eq!(body["flags"], json!({}), "{uri}");
            assert_eq!(body["featureFlags"], json!({}), "{uri}");
        }
    }
}
