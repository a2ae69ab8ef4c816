//! PostHog-SDK-compatible event capture: `/capture`, `/batch`, `/e` and `/i/v0/e` (each with
//! and without a trailing slash), as PostHog's Django `capture.py` and its Rust `capture`
//! service accept them.
//!
//! A request is decoded (form field, base64, gzip, JSON), checked as a whole, turned into one
//! spec 1.1 Kafka envelope per event and handed to the [`EventIntake`] in a single `submit`,
//! so a request is either accepted entirely or not at all. The token is not checked here:
//! the pipeline looks it up and dead-letters events of unknown projects.

mod lz_string;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use chrono::{DateTime, SecondsFormat, Utc};
use flate2::read::MultiGzDecoder;
use futures::StreamExt;
use plugin_server_actors::event::envelope::{Envelope, from_str_repairing};
use plugin_server_actors::event::intake::{CapturedEvent, EventIntake, IntakeError};
use plugin_server_actors::event::iso8601::parse_iso8601;
use plugin_server_actors::event::js::type_name;
use plugin_server_actors::ingest::teams::TeamManager;
use prometheus::{IntCounter, IntCounterVec, Opts};
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// Every path PostHog's SDKs post events to.
const CAPTURE_PATHS: [&str; 8] = [
    "/capture",
    "/capture/",
    "/batch",
    "/batch/",
    "/e",
    "/e/",
    "/i/v0/e",
    "/i/v0/e/",
];

/// Paths that also take `GET ?data=`, as PostHog's capture does for posthog-js.
const GET_CAPTURE_PATHS: [&str; 4] = ["/capture", "/capture/", "/e", "/e/"];

/// PostHog caps request bodies at 20 MiB (Django's `DATA_UPLOAD_MAX_MEMORY_SIZE`).
pub const DEFAULT_MAX_BODY_BYTES: usize = 20 * 1024 * 1024;

/// PostHog truncates distinct ids to 200 characters before producing them.
const MAX_DISTINCT_ID_CHARS: usize = 200;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

const MISSING_API_KEY_DETAIL: &str =
    "API key not provided. You can find your project API key in PostHog project settings.";

const INVALID_API_KEY_DETAIL: &str =
    "Project API key invalid. You can find your project API key in PostHog project settings.";

/// Standard base64 that also takes missing padding and trailing bits: SDKs and proxies are
/// not consistent about either, and PostHog pads whatever arrives before decoding.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, lenient_config());
/// The URL-safe alphabet, for the few clients that encode with it.
const LENIENT_BASE64_URL_SAFE: GeneralPurpose =
    GeneralPurpose::new(&alphabet::URL_SAFE, lenient_config());

const fn lenient_config() -> GeneralPurposeConfig {
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true)
}

/// What the capture handlers read.
pub struct CaptureState {
    /// Where accepted events go: Kafka in the cluster profile, the pipeline when embedded.
    pub intake: Arc<dyn EventIntake>,
    /// Larger bodies, and gzip bodies that inflate past it, are refused with 413.
    pub max_body_bytes: usize,
    pub metrics: CaptureMetrics,
    /// When set, a request naming a token without a team is refused with PostHog's 401
    /// (the embedded profile with `EMBEDDED_UNKNOWN_TOKENS=refuse`).
    pub known_tokens: Option<Arc<TeamManager>>,
}

/// Requests by outcome (`ok` or the error code) and events accepted.
#[derive(Clone)]
pub struct CaptureMetrics {
    requests: IntCounterVec,
    events: IntCounter,
}

impl CaptureMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "capture_requests_total",
                    "HTTP capture requests, by outcome: ok or PostHog's error code.",
                ),
                &["outcome"],
            )?,
            events: IntCounter::new(
                "capture_events_accepted_total",
                "Events HTTP capture handed to Kafka or the pipeline.",
            )?,
        })
    }

    pub fn register(&self, registry: &prometheus::Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.requests.clone()))?;
        registry.register(Box::new(self.events.clone()))
    }
}

/// Registers the capture endpoints. Each path is one resource with all its methods, because
/// actix routes a path to the first resource matching it and answers 405 from there.
pub fn routes(config: &mut web::ServiceConfig) {
    for path in CAPTURE_PATHS {
        let mut resource = web::resource(path)
            .route(web::post().to(capture))
            .route(web::method(Method::OPTIONS).to(preflight));
        if GET_CAPTURE_PATHS.contains(&path) {
            resource = resource.route(web::get().to(capture));
        }
        config.service(resource);
    }
}

/// Why a request was refused. Each variant maps to one status code and PostHog error body.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("decompressed request body is larger than the limit of {limit} bytes")]
    DecompressedTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    ReadBody(String),
    #[error("no data found: send the events as the request body or in a `data` field")]
    NoData,
    #[error("invalid lz64 data: {0}")]
    InvalidLz64(String),
    #[error("invalid gzip data: {0}")]
    InvalidGzip(String),
    #[error("invalid base64 data: {0}")]
    InvalidBase64(String),
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("invalid payload: {0}")]
    InvalidPayload(String),
    #[error("invalid sent_at {0:?}: expected seconds or milliseconds since the epoch, or ISO 8601")]
    InvalidSentAt(String),
    #[error("invalid event at index {index}: {problem}")]
    InvalidEvent { index: usize, problem: EventProblem },
    #[error("{MISSING_API_KEY_DETAIL}")]
    MissingToken,
    #[error("{INVALID_API_KEY_DETAIL}")]
    InvalidToken,
    #[error("events could not be accepted, please retry: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// What is wrong with one event of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EventProblem {
    #[error("an event must be a JSON object")]
    NotAnObject,
    #[error("missing event name field `event`")]
    MissingEventName,
    #[error("event name field `event` must be a string")]
    EventNameNotString,
    #[error(
        "missing distinct id field `distinct_id` (also looked for `$distinct_id` and \
         `properties.distinct_id`)"
    )]
    MissingDistinctId,
    #[error("distinct id field `distinct_id` is empty")]
    EmptyDistinctId,
    #[error("field `properties` must be a JSON object")]
    PropertiesNotAnObject,
}

impl CaptureError {
    /// The status, and the `type` and `code` of PostHog's error body.
    fn classify(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::BodyTooLarge { .. } | Self::DecompressedTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "validation_error",
                "payload_too_large",
            ),
            Self::ReadBody(_)
            | Self::NoData
            | Self::InvalidLz64(_)
            | Self::InvalidGzip(_)
            | Self::InvalidBase64(_)
            | Self::InvalidJson(_)
            | Self::InvalidPayload(_)
            | Self::InvalidSentAt(_)
            | Self::InvalidEvent { .. } => (
                StatusCode::BAD_REQUEST,
                "validation_error",
                "invalid_payload",
            ),
            Self::MissingToken => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing_api_key",
            ),
            Self::InvalidToken => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
            ),
            Self::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "unavailable",
            ),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
            ),
        }
    }

    fn to_response(&self) -> HttpResponse {
        let (status, error_type, code) = self.classify();
        HttpResponse::build(status).json(json!({
            "type": error_type,
            "code": code,
            "detail": self.to_string(),
        }))
    }
}

/// `POST`/`GET` on a capture path: 200 `{"status": 1}` once the intake holds every event.
async fn capture(
    state: web::Data<CaptureState>,
    request: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let mut response = match accept(&state, &request, payload).await {
        Ok(accepted) => {
            state.metrics.requests.with_label_values(&["ok"]).inc();
            state.metrics.events.inc_by(accepted as u64);
            tracing::trace!(accepted, path = request.path(), "captured events");
            HttpResponse::Ok().json(json!({"status": 1}))
        }
        Err(error) => {
            state
                .metrics
                .requests
                .with_label_values(&[error.classify().2])
                .inc();
            match &error {
                CaptureError::Unavailable(_) | CaptureError::Internal(_) => {
                    tracing::warn!(%error, path = request.path(), "capture failed")
                }
                _ => tracing::debug!(%error, path = request.path(), "capture refused"),
            }
            error.to_response()
        }
    };
    add_cors_headers(&request, response.headers_mut());
    response
}

/// CORS preflight. PostHog answers it with the same body as a capture.
async fn preflight(request: HttpRequest) -> HttpResponse {
    let mut response = HttpResponse::Ok().json(json!({"status": 1}));
    add_cors_headers(&request, response.headers_mut());
    response
}

/// Browsers discard responses to cross-origin posts that lack these headers, and posthog-js
/// then retries, duplicating the events. Like PostHog, any origin is allowed: project tokens
/// are public.
pub(super) fn add_cors_headers(request: &HttpRequest, headers: &mut HeaderMap) {
    let Some(origin) = request.headers().get(header::ORIGIN) else {
        return;
    };
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    let allowed_headers = request
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("X-Requested-With"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed_headers);
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
}

/// Reads, decodes and submits one request; returns how many events were accepted.
async fn accept(
    state: &CaptureState,
    request: &HttpRequest,
    payload: web::Payload,
) -> Result<usize, CaptureError> {
    let body = read_body(request, payload, state.max_body_bytes).await?;
    let context = RequestContext::from_request(request, state.max_body_bytes, Utc::now());
    // Inflating and parsing up to 20 MB takes far longer than an arbiter may be blocked.
    let (token, events) = web::block(move || build_events(&context, &body))
        .await
        .map_err(|error| CaptureError::Internal(format!("decoding task failed: {error}")))??;
    let accepted = events.len();
    if let Some(teams) = &state.known_tokens
        && !events.is_empty()
        && teams
            .by_token(&token)
            .await
            .map_err(|error| CaptureError::Unavailable(error.to_string()))?
            .is_none()
    {
        return Err(CaptureError::InvalidToken);
    }
    state
        .intake
        .submit(events)
        .await
        .map_err(|error| match error {
            IntakeError::Unavailable(reason) => CaptureError::Unavailable(reason),
        })?;
    Ok(accepted)
}

/// The raw body, refused as soon as it is known to exceed `limit`. The stream is read by hand
/// (rather than through `web::Bytes`) so the limit is the state's and nothing is inflated
/// behind our back.
async fn read_body(
    request: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::Bytes, CaptureError> {
    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<usize>().ok());
    if declared_length.is_some_and(|length| length > limit) {
        return Err(CaptureError::BodyTooLarge { limit });
    }

    let mut body = web::BytesMut::with_capacity(declared_length.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|error| CaptureError::ReadBody(error.to_string()))?;
        if body.len().saturating_add(chunk.len()) > limit {
            return Err(CaptureError::BodyTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Everything taken from the request besides the body, owned so that decoding can run on
/// the blocking pool.
#[derive(Debug, Clone)]
struct RequestContext {
    query: FormFields,
    /// The body is `application/x-www-form-urlencoded`, so the events are in its `data` field.
    is_form: bool,
    content_encoding: Option<String>,
    ip: Option<String>,
    site_url: String,
    now: DateTime<Utc>,
    max_body_bytes: usize,
}

impl RequestContext {
    fn from_request(request: &HttpRequest, max_body_bytes: usize, now: DateTime<Utc>) -> Self {
        let header_text = |name: header::HeaderName| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(|value| value.trim().to_ascii_lowercase())
        };
        let is_form = header_text(header::CONTENT_TYPE).is_some_and(|content_type| {
            content_type.starts_with("application/x-www-form-urlencoded")
        });
        let connection = request.connection_info();
        Self {
            query: FormFields::parse(request.query_string().as_bytes()),
            is_form,
            content_encoding: header_text(header::CONTENT_ENCODING),
            ip: client_ip(request),
            site_url: format!("{}://{}", connection.scheme(), connection.host()),
            now,
            max_body_bytes,
        }
    }
}

/// The first `X-Forwarded-For` entry (the client, as the load balancer saw it), else the peer.
fn client_ip(request: &HttpRequest) -> Option<String> {
    let forwarded = request
        .headers()
        .get("x-forwarded-for")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(',').next())
        .map(str::trim)
        .filter(|value| !value.is_empty());
    match forwarded {
        // Some gateways append the client's port, which PostHog strips too.
        Some(address) => Some(match address.parse::<SocketAddr>() {
            Ok(socket) => socket.ip().to_string(),
            Err(_) => address.to_owned(),
        }),
        None => request.peer_addr().map(|peer| peer.ip().to_string()),
    }
}

/// The fields PostHog reads from a query string or an urlencoded body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FormFields {
    /// Bytes, not text: a form field may carry gzip output.
    data: Option<Vec<u8>>,
    compression: Option<String>,
    api_key: Option<String>,
    token: Option<String>,
    /// `_` in a query (posthog-js), `sent_at` in a form body.
    sent_at: Option<String>,
}

impl FormFields {
    fn parse(encoded: &[u8]) -> Self {
        let mut fields = Self::default();
        for pair in encoded.split(|byte| *byte == b'&') {
            let (name, value) = match pair.iter().position(|byte| *byte == b'=') {
                Some(equals) => (&pair[..equals], &pair[equals + 1..]),
                None => (pair, &[][..]),
            };
            let value = percent_decode(value);
            let as_text = || Some(String::from_utf8_lossy(&value).into_owned());
            // A repeated field keeps its last value, as Django's `QueryDict.get` does.
            match percent_decode(name).as_slice() {
                b"data" => fields.data = Some(value),
                b"compression" => fields.compression = as_text(),
                b"api_key" => fields.api_key = as_text(),
                b"token" => fields.token = as_text(),
                b"_" | b"sent_at" => fields.sent_at = as_text(),
                _ => {}
            }
        }
        fields
    }
}

/// `application/x-www-form-urlencoded` decoding to bytes: `+` is a space, `%XX` a byte, and
/// a malformed escape is kept as it is.
fn percent_decode(encoded: &[u8]) -> Vec<u8> {
    let hex_value =
        |byte: Option<&u8>| -> Option<u8> { char::from(*byte?).to_digit(16)?.try_into().ok() };
    let mut decoded = Vec::with_capacity(encoded.len());
    let mut position = 0;
    while let Some(&byte) = encoded.get(position) {
        match byte {
            b'+' => {
                decoded.push(b' ');
                position += 1;
            }
            b'%' => match (
                hex_value(encoded.get(position + 1)),
                hex_value(encoded.get(position + 2)),
            ) {
                (Some(high), Some(low)) => {
                    decoded.push((high << 4) | low);
                    position += 3;
                }
                _ => {
                    decoded.push(b'%');
                    position += 1;
                }
            },
            other => {
                decoded.push(other);
                position += 1;
            }
        }
    }
    decoded
}

/// How the client says the payload is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    /// Plain or base64 JSON; which one is told from the content.
    None,
    Gzip,
    /// LZString's `compressToBase64`, older posthog-js's `compression=lz64`.
    Lz64,
}

impl Compression {
    /// PostHog reads the `compression` query parameter, then the form field, then the
    /// `Content-Encoding` header. Unknown values are ignored, as PostHog does: the payload is
    /// then tried as plain or base64 JSON, and gzip is still recognised by its magic bytes.
    fn from_hints(hints: [Option<&str>; 3]) -> Self {
        let hint = hints
            .into_iter()
            .flatten()
            .map(str::trim)
            .find(|hint| !hint.is_empty())
            .map(str::to_ascii_lowercase);
        match hint.as_deref() {
            Some("gzip" | "gzip-js" | "x-gzip") => Self::Gzip,
            // posthog-js's lz-string mode, its default before gzip-js.
            Some("lz64" | "lz-string") => Self::Lz64,
            _ => Self::None,
        }
    }
}

/// Decodes the body (or `data` field) and builds one envelope per event. All-or-nothing: the
/// first problem refuses the whole request, as PostHog does.
/// The request's token (one serves every event, see [`request_token`]) and its events.
fn build_events(
    context: &RequestContext,
    body: &[u8],
) -> Result<(String, Vec<CapturedEvent>), CaptureError> {
    // posthog-js sometimes sends `data=...` as `text/plain`; PostHog strips the prefix too.
    // A JSON body under a form content type is a client mislabelling it, not a form.
    let is_form = (context.is_form && !looks_like_json(body)) || body.starts_with(b"data=");
    let form = is_form.then(|| FormFields::parse(body));
    let body_data = match &form {
        Some(form) => form.data.as_deref().unwrap_or_default(),
        None => body,
    };
    let data = if body_data.is_empty() {
        context.query.data.as_deref().unwrap_or_default()
    } else {
        body_data
    };
    if data.iter().all(u8::is_ascii_whitespace) {
        return Err(CaptureError::NoData);
    }

    let compression = Compression::from_hints([
        context.query.compression.as_deref(),
        form.as_ref().and_then(|form| form.compression.as_deref()),
        context.content_encoding.as_deref(),
    ]);
    let decoded = decode_payload(data, compression, context.max_body_bytes)?;
    let request = CaptureRequest::from_json(decoded)?;

    let sent_at = request_sent_at(context, form.as_ref(), &request)?;
    let token =
        request_token(context, form.as_ref(), &request).ok_or(CaptureError::MissingToken)?;
    let shared = SharedFields {
        token: &token,
        ip: context.ip.as_deref(),
        site_url: &context.site_url,
        now: context.now.to_rfc3339_opts(SecondsFormat::Millis, true),
        sent_at: sent_at
            .map(|sent_at| sent_at.to_rfc3339_opts(SecondsFormat::Millis, true))
            .unwrap_or_default(),
    };

    let events = request
        .events
        .into_iter()
        .enumerate()
        .map(|(index, event)| build_event(index, event, &shared))
        .collect::<Result<_, _>>()?;
    Ok((token, events))
}

/// gzip (announced or recognised by its magic bytes), then base64 if the text is not JSON,
/// then JSON. Every step is bounded by `limit`.
fn decode_payload(
    data: &[u8],
    compression: Compression,
    limit: usize,
) -> Result<Value, CaptureError> {
    if compression == Compression::Lz64 && !looks_like_json(data) {
        // Plain JSON despite the hint is taken as it is, as with gzip.
        let text = std::str::from_utf8(data)
            .map_err(|_| CaptureError::InvalidLz64("not ASCII base64".to_owned()))?;
        let json = lz_string::decompress_from_base64(text, limit).map_err(|error| match error {
            lz_string::LzStringError::TooLarge { .. } => {
                CaptureError::DecompressedTooLarge { limit }
            }
            other => CaptureError::InvalidLz64(other.to_string()),
        })?;
        return parse_json(json.as_bytes());
    }
    let mut payload = Cow::Borrowed(data);
    if payload.starts_with(&GZIP_MAGIC) {
        payload = Cow::Owned(gunzip(&payload, limit)?);
    } else if compression == Compression::Gzip && !looks_like_json(&payload) {
        // gzip carried in a form field arrives base64 encoded. Plain JSON despite the gzip
        // hint is taken as it is: its meaning is not in doubt.
        payload = Cow::Owned(gunzip(&decode_base64(&payload)?, limit)?);
    }

    if looks_like_json(&payload) {
        return parse_json(&payload);
    }
    let decoded = decode_base64(&payload)?;
    if decoded.starts_with(&GZIP_MAGIC) {
        return parse_json(&gunzip(&decoded, limit)?);
    }
    parse_json(&decoded).map_err(|error| match error {
        CaptureError::InvalidJson(reason) => {
            CaptureError::InvalidJson(format!("base64-decoded body: {reason}"))
        }
        other => other,
    })
}

/// JSON bodies are objects or arrays; anything else is taken to be base64.
fn looks_like_json(payload: &[u8]) -> bool {
    matches!(payload.trim_ascii_start().first(), Some(b'{' | b'['))
}

fn gunzip(compressed: &[u8], limit: usize) -> Result<Vec<u8>, CaptureError> {
    // One byte over the limit is enough to know it is too large, without inflating a bomb.
    let read_limit = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let mut inflated = Vec::new();
    MultiGzDecoder::new(compressed)
        .take(read_limit)
        .read_to_end(&mut inflated)
        .map_err(|error| CaptureError::InvalidGzip(error.to_string()))?;
    if inflated.len() > limit {
        return Err(CaptureError::DecompressedTooLarge { limit });
    }
    Ok(inflated)
}

fn decode_base64(encoded: &[u8]) -> Result<Vec<u8>, CaptureError> {
    // Form decoding turns the alphabet's `+` into spaces, and some clients wrap lines.
    let cleaned: Vec<u8> = encoded
        .trim_ascii()
        .iter()
        .filter_map(|byte| match byte {
            b' ' => Some(b'+'),
            b'\r' | b'\n' | b'\t' => None,
            other => Some(*other),
        })
        .collect();
    let engine = if cleaned.iter().any(|byte| matches!(byte, b'-' | b'_')) {
        &LENIENT_BASE64_URL_SAFE
    } else {
        &LENIENT_BASE64
    };
    engine
        .decode(&cleaned)
        .map_err(|error| CaptureError::InvalidBase64(error.to_string()))
}

/// Browsers send strings with lone UTF-16 surrogates, which JavaScript (and PostHog's
/// `surrogatepass`) accept but serde_json refuses; the pipeline's parser repairs them.
fn parse_json(text: &[u8]) -> Result<Value, CaptureError> {
    let text =
        std::str::from_utf8(text).map_err(|error| CaptureError::InvalidJson(error.to_string()))?;
    from_str_repairing(text).map_err(|error| CaptureError::InvalidJson(error.to_string()))
}

/// The events of a request, and where its request-wide fields (`api_key`, `sent_at`) are.
struct CaptureRequest {
    /// The `{"batch": [...]}` wrapper, without its events.
    batch_wrapper: Option<Map<String, Value>>,
    /// A body that was one event object, which then also holds the request-wide fields.
    is_single_event: bool,
    events: Vec<Value>,
}

impl CaptureRequest {
    fn from_json(value: Value) -> Result<Self, CaptureError> {
        let request = match value {
            Value::Array(events) => Self {
                batch_wrapper: None,
                is_single_event: false,
                events,
            },
            Value::Object(mut object) => match object.remove("batch") {
                Some(Value::Array(events)) => Self {
                    batch_wrapper: Some(object),
                    is_single_event: false,
                    events,
                },
                // An event with `"batch": null` keeps it, as the client sent it.
                batch @ (None | Some(Value::Null)) => {
                    if let Some(null) = batch {
                        object.insert("batch".to_owned(), null);
                    }
                    Self {
                        batch_wrapper: None,
                        is_single_event: true,
                        events: vec![Value::Object(object)],
                    }
                }
                Some(other) => {
                    return Err(CaptureError::InvalidPayload(format!(
                        "`batch` must be an array, got {}",
                        type_name(&other)
                    )));
                }
            },
            other => {
                return Err(CaptureError::InvalidPayload(format!(
                    "expected an event object, an array of events or a batch, got {}",
                    type_name(&other)
                )));
            }
        };
        if request.events.is_empty() {
            return Err(CaptureError::InvalidPayload(
                "the request holds no events".to_owned(),
            ));
        }
        Ok(request)
    }

    /// The object holding request-wide fields: the batch wrapper or the single event.
    fn top_level(&self) -> Option<&Map<String, Value>> {
        match &self.batch_wrapper {
            Some(wrapper) => Some(wrapper),
            None if self.is_single_event => self.events.first().and_then(Value::as_object),
            None => None,
        }
    }
}

/// PostHog's order: form fields, then the body (its top level, then the events, each by
/// `$token`, `token`, `api_key`, then `properties.token`), then the query string. PostHog
/// reads only the first event; any event may carry it here. One token serves the whole
/// request, so every event is keyed and attributed by it.
fn request_token(
    context: &RequestContext,
    form: Option<&FormFields>,
    request: &CaptureRequest,
) -> Option<String> {
    let non_empty =
        |token: Option<&str>| token.filter(|token| !token.is_empty()).map(str::to_owned);
    let from_object = |object: &Map<String, Value>| {
        ["$token", "token", "api_key"]
            .into_iter()
            .find_map(|name| non_empty(object.get(name).and_then(Value::as_str)))
            .or_else(|| {
                let properties = object.get("properties").and_then(Value::as_object)?;
                non_empty(properties.get("token").and_then(Value::as_str))
            })
    };

    form.and_then(|form| {
        non_empty(form.api_key.as_deref()).or_else(|| non_empty(form.token.as_deref()))
    })
    .or_else(|| request.top_level().and_then(from_object))
    .or_else(|| {
        request
            .events
            .iter()
            .filter_map(Value::as_object)
            .find_map(from_object)
    })
    .or_else(|| non_empty(context.query.token.as_deref()))
    .or_else(|| non_empty(context.query.api_key.as_deref()))
}

/// When the client sent the request, which the pipeline uses to correct client clocks:
/// `?_=` (posthog-js), then the body's `sent_at` (mobile SDKs), then the form's.
fn request_sent_at(
    context: &RequestContext,
    form: Option<&FormFields>,
    request: &CaptureRequest,
) -> Result<Option<DateTime<Utc>>, CaptureError> {
    let from_body = request
        .top_level()
        .and_then(|object| object.get("sent_at"))
        .and_then(|value| match value {
            Value::String(text) => Some(text.clone()),
            Value::Number(number) => Some(number.to_string()),
            _ => None,
        });
    let raw = [
        context.query.sent_at.clone(),
        from_body,
        form.and_then(|form| form.sent_at.clone()),
    ]
    .into_iter()
    .flatten()
    .map(|text| text.trim().to_owned())
    .find(|text| !text.is_empty());
    match raw {
        None => Ok(None),
        Some(text) => parse_sent_at(&text)
            .map(Some)
            .ok_or(CaptureError::InvalidSentAt(text)),
    }
}

/// Digits are an epoch timestamp: milliseconds when longer than 11 digits (PostHog's rule,
/// good until the year 5138), seconds otherwise. Anything else must be ISO 8601.
fn parse_sent_at(text: &str) -> Option<DateTime<Utc>> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let is_number = !whole.is_empty()
        && whole.bytes().all(|byte| byte.is_ascii_digit())
        && fraction.bytes().all(|byte| byte.is_ascii_digit());
    if !is_number {
        return parse_iso8601(text);
    }
    let value: f64 = text.parse().ok()?;
    let milliseconds = if whole.len() > 11 {
        value
    } else {
        value * 1000.0
    };
    if !milliseconds.is_finite() || milliseconds > i64::MAX as f64 {
        return None;
    }
    DateTime::from_timestamp_millis(milliseconds.round() as i64)
}

/// The envelope fields that are the same for every event of a request.
struct SharedFields<'a> {
    token: &'a str,
    ip: Option<&'a str>,
    site_url: &'a str,
    now: String,
    sent_at: String,
}

fn build_event(
    index: usize,
    event: Value,
    shared: &SharedFields<'_>,
) -> Result<CapturedEvent, CaptureError> {
    let invalid = |problem| CaptureError::InvalidEvent { index, problem };
    let Value::Object(event) = event else {
        return Err(invalid(EventProblem::NotAnObject));
    };
    check_event(&event).map_err(invalid)?;
    let distinct_id = distinct_id_of(&event).map_err(invalid)?;
    // A client uuid makes retries idempotent downstream; an invalid one is replaced rather
    // than refused, so that one bad SDK does not lose the whole batch.
    let uuid = event
        .get("uuid")
        .and_then(Value::as_str)
        .and_then(|text| Uuid::parse_str(text).ok())
        .unwrap_or_else(Uuid::now_v7);
    encode_envelope(event, uuid, &distinct_id, shared)
}

/// The event name and properties, which the pipeline would otherwise dead-letter.
fn check_event(event: &Map<String, Value>) -> Result<(), EventProblem> {
    match event.get("properties") {
        None | Some(Value::Null | Value::Object(_)) => {}
        Some(_) => return Err(EventProblem::PropertiesNotAnObject),
    }
    match event.get("event") {
        Some(Value::String(name)) if !name.is_empty() => Ok(()),
        None | Some(Value::Null | Value::String(_)) => Err(EventProblem::MissingEventName),
        Some(_) => Err(EventProblem::EventNameNotString),
    }
}

fn encode_envelope(
    event: Map<String, Value>,
    uuid: Uuid,
    distinct_id: &str,
    shared: &SharedFields<'_>,
) -> Result<CapturedEvent, CaptureError> {
    let encoding_failed =
        |error: serde_json::Error| CaptureError::Internal(format!("cannot encode event: {error}"));
    let envelope = Envelope {
        uuid: uuid.to_string(),
        distinct_id,
        ip: shared.ip,
        site_url: shared.site_url,
        data: serde_json::to_string(&event).map_err(encoding_failed)?,
        now: &shared.now,
        sent_at: &shared.sent_at,
        token: Some(shared.token),
        team_id: None,
    };
    Ok(CapturedEvent {
        key: envelope.kafka_key(),
        payload: envelope.encode().map_err(encoding_failed)?,
    })
}

/// `distinct_id`, `$distinct_id` or `properties.distinct_id`, the first that is not null, as
/// text: numbers are accepted and keep their JSON spelling, as in PostHog's Rust capture.
fn distinct_id_of(event: &Map<String, Value>) -> Result<String, EventProblem> {
    let from_properties = event
        .get("properties")
        .and_then(Value::as_object)
        .and_then(|properties| properties.get("distinct_id"));
    let value = [
        event.get("distinct_id"),
        event.get("$distinct_id"),
        from_properties,
    ]
    .into_iter()
    .flatten()
    .find(|value| !value.is_null())
    .ok_or(EventProblem::MissingDistinctId)?;
    let text = match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    if text.is_empty() {
        return Err(EventProblem::EmptyDistinctId);
    }
    Ok(match text.char_indices().nth(MAX_DISTINCT_ID_CHARS) {
        Some((cut, _)) => text[..cut].to_owned(),
        None => text,
    })
}
