use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::Mutex;

use actix_web::App;
use actix_web::dev::ServiceResponse;
use actix_web::http::StatusCode;
use actix_web::test::{TestRequest, call_service, init_service, read_body_json};
use base64::engine::general_purpose::STANDARD;
use flate2::write::GzEncoder;
use serde_json::json;

use super::*;

/// Records every `submit`, or refuses them all when `unavailable`.
#[derive(Default)]
struct RecordingIntake {
    submissions: Mutex<Vec<Vec<CapturedEvent>>>,
    unavailable: bool,
}

// Written out instead of `#[async_trait]`, which the root package does not depend on.
impl EventIntake for RecordingIntake {
    fn submit<'life0, 'async_trait>(
        &'life0 self,
        events: Vec<CapturedEvent>,
    ) -> Pin<Box<dyn Future<Output = Result<(), IntakeError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            if self.unavailable {
                return Err(IntakeError::Unavailable("kafka is down".to_owned()));
            }
            self.submissions.lock().unwrap().push(events);
            Ok(())
        })
    }
}

impl RecordingIntake {
    fn submissions(&self) -> Vec<Vec<CapturedEvent>> {
        self.submissions.lock().unwrap().clone()
    }

    /// The envelopes of the only submission, parsed.
    fn only_submission(&self) -> Vec<Value> {
        let submissions = self.submissions();
        assert_eq!(submissions.len(), 1, "expected exactly one submit");
        submissions[0]
            .iter()
            .map(|event| serde_json::from_slice(&event.payload).unwrap())
            .collect()
    }
}

async fn respond(
    intake: &Arc<RecordingIntake>,
    max_body_bytes: usize,
    request: TestRequest,
) -> ServiceResponse {
    let state = CaptureState {
        metrics: CaptureMetrics::new().expect("metrics"),
        intake: intake.clone(),
        max_body_bytes,
        known_tokens: None,
    };
    let app = init_service(App::new().app_data(web::Data::new(state)).configure(routes)).await;
    call_service(&app, request.to_request()).await
}

async fn send(intake: &Arc<RecordingIntake>, request: TestRequest) -> (StatusCode, Value) {
    send_with_limit(intake, DEFAULT_MAX_BODY_BYTES, request).await
}

async fn send_with_limit(
    intake: &Arc<RecordingIntake>,
    max_body_bytes: usize,
    request: TestRequest,
) -> (StatusCode, Value) {
    let response = respond(intake, max_body_bytes, request).await;
    let status = response.status();
    let body: Value = read_body_json(response).await;
    (status, body)
}

fn post_json(path: &str, body: &Value) -> TestRequest {
    TestRequest::post()
        .uri(path)
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .set_payload(serde_json::to_vec(body).unwrap())
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn pageview(distinct_id: &str) -> Value {
    json!({
        "event": "$pageview",
        "distinct_id": distinct_id,
        "properties": {"$current_url": "https://example.com/"},
    })
}

fn assert_ok(status: StatusCode, body: &Value) {
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, &json!({"status": 1}));
}

/// The event as the client sent it, from the envelope's `data` string.
fn data_of(envelope: &Value) -> Value {
    let data = envelope["data"].as_str().expect("data is a JSON string");
    serde_json::from_str(data).unwrap()
}

#[actix_web::test]
async fn single_event_object_is_captured_with_its_envelope() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    event["api_key"] = json!("phc_token");

    let (status, body) = send(&intake, post_json("/capture/", &event)).await;

    assert_ok(status, &body);
    let submissions = intake.submissions();
    assert_eq!(submissions.len(), 1);
    assert_eq!(submissions[0].len(), 1);
    assert_eq!(submissions[0][0].key, "phc_token:user-1");
    let envelope: Value = serde_json::from_slice(&submissions[0][0].payload).unwrap();
    assert_eq!(envelope["distinct_id"], "user-1");
    assert_eq!(envelope["token"], "phc_token");
    assert_eq!(envelope["sent_at"], "");
    assert_eq!(data_of(&envelope), event);
}

#[actix_web::test]
async fn array_of_events_is_submitted_once() {
    let intake = Arc::new(RecordingIntake::default());
    let mut first = pageview("user-1");
    first["properties"]["token"] = json!("phc_token");
    let second = json!({"event": "clicked", "properties": {"distinct_id": "user-2"}});

    let (status, body) = send(&intake, post_json("/e/", &json!([first, second]))).await;

    assert_ok(status, &body);
    let submissions = intake.submissions();
    assert_eq!(submissions.len(), 1);
    let keys: Vec<&str> = submissions[0]
        .iter()
        .map(|event| event.key.as_str())
        .collect();
    assert_eq!(keys, ["phc_token:user-1", "phc_token:user-2"]);
}

#[actix_web::test]
async fn batch_with_api_key_takes_token_and_sent_at_from_the_wrapper() {
    let intake = Arc::new(RecordingIntake::default());
    let request = json!({
        "api_key": "phc_batch",
        "sent_at": "2024-05-06T07:08:09.123456+02:00",
        "batch": [pageview("a"), pageview("b")],
    });

    let (status, body) = send(&intake, post_json("/batch/", &request)).await;

    assert_ok(status, &body);
    let envelopes = intake.only_submission();
    assert_eq!(envelopes.len(), 2);
    for envelope in &envelopes {
        assert_eq!(envelope["token"], "phc_batch");
        assert_eq!(envelope["sent_at"], "2024-05-06T05:08:09.123Z");
    }
    assert_eq!(envelopes[1]["distinct_id"], "b");
}

#[actix_web::test]
async fn token_key_of_the_batch_wrapper_is_accepted() {
    let intake = Arc::new(RecordingIntake::default());
    let request = json!({"token": "phc_batch", "batch": [pageview("a")]});

    let (status, body) = send(&intake, post_json("/batch", &request)).await;

    assert_ok(status, &body);
    assert_eq!(intake.only_submission()[0]["token"], "phc_batch");
}

#[actix_web::test]
async fn form_body_with_base64_data_is_decoded() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    // `>>>` encodes to `Pj4+`, so the base64 carries a `+` that form encoding must keep.
    event["properties"]["token"] = json!("tok>>>");
    let encoded = STANDARD.encode(serde_json::to_vec(&event).unwrap());
    assert!(encoded.contains('+'));
    let form = format!(
        "data={}&ver=1.2.3",
        encoded.replace('+', "%2B").replace('=', "%3D")
    );

    let request = TestRequest::post()
        .uri("/e/?ip=1&_=1700000000000")
        .insert_header((header::CONTENT_TYPE, "application/x-www-form-urlencoded"))
        .set_payload(form);
    let (status, body) = send(&intake, request).await;

    assert_ok(status, &body);
    let envelope = &intake.only_submission()[0];
    assert_eq!(envelope["token"], "tok>>>");
    assert_eq!(envelope["sent_at"], "2023-11-14T22:13:20.000Z");
    assert_eq!(data_of(envelope), event);
}

#[actix_web::test]
async fn form_data_whose_plus_signs_became_spaces_is_still_decoded() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    event["properties"]["token"] = json!("tok>>>");
    let encoded = STANDARD.encode(serde_json::to_vec(&event).unwrap());

    // A client that did not escape `+`: form decoding turns it into a space.
    let request = TestRequest::post()
        .uri("/e")
        .insert_header((header::CONTENT_TYPE, "text/plain"))
        .set_payload(format!("data={encoded}"));
    let (status, body) = send(&intake, request).await;

    assert_ok(status, &body);
    assert_eq!(data_of(&intake.only_submission()[0]), event);
}

#[actix_web::test]
async fn form_with_gzip_compression_field_is_inflated() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    event["token"] = json!("phc_token");
    let encoded = STANDARD.encode(gzip(&serde_json::to_vec(&event).unwrap()));
    let form = format!(
        "compression=gzip-js&data={}",
        encoded.replace('+', "%2B").replace('/', "%2F")
    );

    let request = TestRequest::post()
        .uri("/e/")
        .insert_header((header::CONTENT_TYPE, "application/x-www-form-urlencoded"))
        .set_payload(form);
    let (status, body) = send(&intake, request).await;

    assert_ok(status, &body);
    assert_eq!(data_of(&intake.only_submission()[0]), event);
}

#[actix_web::test]
async fn gzip_body_with_content_encoding_is_inflated() {
    let intake = Arc::new(RecordingIntake::default());
    let request_body = json!({"api_key": "phc_token", "batch": [pageview("user-1")]});

    let request = TestRequest::post()
        .uri("/batch/")
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .insert_header((header::CONTENT_ENCODING, "gzip"))
        .set_payload(gzip(&serde_json::to_vec(&request_body).unwrap()));
    let (status, body) = send(&intake, request).await;

    assert_ok(status, &body);
    assert_eq!(intake.only_submission()[0]["distinct_id"], "user-1");
}

#[actix_web::test]
async fn gzip_body_with_compression_query_is_inflated() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    event["properties"]["token"] = json!("phc_token");

    let request = TestRequest::post()
        .uri("/i/v0/e/?compression=gzip-js&ver=1.100.0&_=1700000000123")
        .insert_header((header::CONTENT_TYPE, "text/plain"))
        .set_payload(gzip(&serde_json::to_vec(&json!([event])).unwrap()));
    let (status, body) = send(&intake, request).await;

    assert_ok(status, &body);
    let envelope = &intake.only_submission()[0];
    assert_eq!(data_of(envelope), event);
    assert_eq!(envelope["sent_at"], "2023-11-14T22:13:20.123Z");
}

#[actix_web::test]
async fn unannounced_gzip_is_recognised_by_its_magic_bytes() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    event["token"] = json!("phc_token");

    let request = TestRequest::post()
        .uri("/i/v0/e")
        .set_payload(gzip(&serde_json::to_vec(&event).unwrap()));
    let (status, body) = send(&intake, request).await;

    assert_ok(status, &body);
}

#[actix_web::test]
async fn base64_json_body_is_decoded() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    event["token"] = json!("phc_token");

    let request = TestRequest::post()
        .uri("/e/?compression=base64")
        .insert_header((header::CONTENT_TYPE, "text/plain"))
        .set_payload(STANDARD.encode(serde_json::to_vec(&event).unwrap()));
    let (status, body) = send(&intake, request).await;

    assert_ok(status, &body);
    assert_eq!(data_of(&intake.only_submission()[0]), event);
}

#[actix_web::test]
async fn get_with_data_query_is_captured() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    event["properties"]["token"] = json!("phc_token");
    let encoded = STANDARD.encode(serde_json::to_vec(&event).unwrap());
    let query = encoded
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");

    let request = TestRequest::get().uri(&format!("/e/?data={query}&ip=1"));
    let (status, body) = send(&intake, request).await;

    assert_ok(status, &body);
    assert_eq!(data_of(&intake.only_submission()[0]), event);
}

#[actix_web::test]
async fn get_is_refused_on_batch_paths() {
    let intake = Arc::new(RecordingIntake::default());

    let response = respond(
        &intake,
        DEFAULT_MAX_BODY_BYTES,
        TestRequest::get().uri("/batch/"),
    )
    .await;

    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[actix_web::test]
async fn token_from_properties_of_an_event() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    event["properties"]["token"] = json!("phc_from_properties");

    let (status, body) = send(&intake, post_json("/e", &event)).await;

    assert_ok(status, &body);
    assert_eq!(intake.submissions()[0][0].key, "phc_from_properties:user-1");
}

#[actix_web::test]
async fn token_from_query_string() {
    let intake = Arc::new(RecordingIntake::default());

    let (status, body) = send(
        &intake,
        post_json("/capture?token=phc_query", &pageview("user-1")),
    )
    .await;

    assert_ok(status, &body);
    assert_eq!(intake.only_submission()[0]["token"], "phc_query");
}

#[actix_web::test]
async fn missing_token_is_401_in_posthogs_shape() {
    let intake = Arc::new(RecordingIntake::default());

    let (status, body) = send(&intake, post_json("/capture/", &pageview("user-1"))).await;

    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body,
        json!({
            "type": "authentication_error",
            "code": "missing_api_key",
            "detail": "API key not provided. You can find your project API key in PostHog project settings.",
        })
    );
    assert!(intake.submissions().is_empty());
}

#[actix_web::test]
async fn missing_event_name_refuses_the_whole_request() {
    let intake = Arc::new(RecordingIntake::default());
    let request = json!({
        "api_key": "phc_token",
        "batch": [pageview("a"), {"distinct_id": "b", "properties": {}}],
    });

    let (status, body) = send(&intake, post_json("/batch/", &request)).await;

    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["type"], "validation_error");
    assert_eq!(body["code"], "invalid_payload");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("index 1"), "{detail}");
    assert!(detail.contains("`event`"), "{detail}");
    assert!(intake.submissions().is_empty());
}

#[actix_web::test]
async fn missing_distinct_id_refuses_the_whole_request() {
    let intake = Arc::new(RecordingIntake::default());
    let mut first = pageview("a");
    first["properties"]["token"] = json!("phc_token");
    let second = json!({"event": "clicked", "properties": {"distinct_id": null}});

    let (status, body) = send(&intake, post_json("/e/", &json!([first, second]))).await;

    assert_eq!(status, StatusCode::BAD_REQUEST);
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("index 1"), "{detail}");
    assert!(detail.contains("distinct_id"), "{detail}");
    assert!(intake.submissions().is_empty());
}

#[actix_web::test]
async fn empty_distinct_id_and_bad_properties_are_refused() {
    let intake = Arc::new(RecordingIntake::default());
    let cases = [
        (
            json!({"event": "e", "distinct_id": "", "token": "t"}),
            EventProblem::EmptyDistinctId,
        ),
        (
            json!({"event": "e", "distinct_id": "d", "token": "t", "properties": [1]}),
            EventProblem::PropertiesNotAnObject,
        ),
        (
            json!({"event": 5, "distinct_id": "d", "token": "t"}),
            EventProblem::EventNameNotString,
        ),
    ];
    for (event, problem) in cases {
        let (status, body) = send(&intake, post_json("/e", &event)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{event}");
        let expected = CaptureError::InvalidEvent { index: 0, problem }.to_string();
        assert_eq!(body["detail"], expected.as_str());
    }
    let (status, body) = send(
        &intake,
        post_json("/e?token=t", &json!([pageview("a"), "not an event"])),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let expected = CaptureError::InvalidEvent {
        index: 1,
        problem: EventProblem::NotAnObject,
    };
    assert_eq!(body["detail"], expected.to_string().as_str());
    assert!(intake.submissions().is_empty());
}

#[actix_web::test]
async fn invalid_json_is_400_naming_the_failure() {
    let intake = Arc::new(RecordingIntake::default());

    let request = TestRequest::post()
        .uri("/e/")
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .set_payload(r#"{"event": "$pageview", "distinct_id": "#);
    let (status, body) = send(&intake, request).await;

    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON: "),
        "{body}"
    );
}

#[actix_web::test]
async fn invalid_gzip_and_base64_are_400() {
    let intake = Arc::new(RecordingIntake::default());

    let gzip_request = TestRequest::post()
        .uri("/e/?compression=gzip-js")
        .set_payload(vec![0x1f, 0x8b, 0x08, 0x00, 0x01, 0x02]);
    let (status, body) = send(&intake, gzip_request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .starts_with("invalid gzip data: "),
        "{body}"
    );

    let base64_request = TestRequest::post()
        .uri("/e/")
        .set_payload("data=%%%not*base64");
    let (status, body) = send(&intake, base64_request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .starts_with("invalid base64 data: "),
        "{body}"
    );
}

/// Older posthog-js: `LZString.compressToBase64` of the batch in a url-encoded `data` field,
/// `compression=lz64` in the query.
#[actix_web::test]
async fn lz64_form_bodies_are_decompressed() {
    let intake = Arc::new(RecordingIntake::default());
    let batch = json!([
        {"event": "$pageview", "distinct_id": "old-js", "properties": {"token": "phc_lz", "$current_url": "https://example.com/ü"}},
        {"event": "clicked", "distinct_id": "old-js", "properties": {"token": "phc_lz"}},
    ]);
    let encoded = lz_str::compress_to_base64(batch.to_string().as_str());
    let form: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("data", &encoded)
        .finish();

    let request = TestRequest::post()
        .uri("/e/?compression=lz64")
        .insert_header((header::CONTENT_TYPE, "application/x-www-form-urlencoded"))
        .set_payload(form);
    let (status, body) = send(&intake, request).await;

    assert_eq!(status, StatusCode::OK, "{body}");
    let events = intake.only_submission();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["token"], "phc_lz");
    let data: Value =
        serde_json::from_str(events[0]["data"].as_str().expect("data")).expect("json");
    assert_eq!(data["properties"]["$current_url"], "https://example.com/ü");

    // Broken lz64 is a 400 naming the compression.
    let request = TestRequest::post()
        .uri("/e/")
        .insert_header((header::CONTENT_TYPE, "application/x-www-form-urlencoded"))
        .set_payload("compression=lz64&data=N4IgLg");
    let (status, body) = send(&intake, request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|detail| detail.starts_with("invalid lz64 data")),
        "{body}"
    );
}

#[actix_web::test]
async fn empty_body_and_empty_batch_are_400() {
    let intake = Arc::new(RecordingIntake::default());

    let (status, body) = send(&intake, TestRequest::post().uri("/e/")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["detail"], CaptureError::NoData.to_string().as_str());

    let (status, body) = send(
        &intake,
        post_json("/batch", &json!({"api_key": "t", "batch": []})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(intake.submissions().is_empty());
}

#[actix_web::test]
async fn body_over_the_limit_is_413() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    event["token"] = json!("phc_token");
    event["properties"]["padding"] = json!("x".repeat(2_000));

    let (status, body) = send_with_limit(&intake, 1_024, post_json("/e/", &event)).await;

    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "payload_too_large");
    assert!(intake.submissions().is_empty());
}

#[actix_web::test]
async fn gzip_that_inflates_past_the_limit_is_413() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    event["token"] = json!("phc_token");
    event["properties"]["padding"] = json!("x".repeat(100_000));
    let compressed = gzip(&serde_json::to_vec(&event).unwrap());
    assert!(compressed.len() < 10_000);

    let request = TestRequest::post()
        .uri("/e/")
        .insert_header((header::CONTENT_ENCODING, "gzip"))
        .set_payload(compressed);
    let (status, body) = send_with_limit(&intake, 10_000, request).await;

    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(intake.submissions().is_empty());
}

#[actix_web::test]
async fn bodies_larger_than_actix_default_limit_are_accepted() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    event["token"] = json!("phc_token");
    // actix-web's own extractors stop at 256 KiB.
    event["properties"]["padding"] = json!("x".repeat(1_000_000));

    let (status, body) = send(&intake, post_json("/batch/", &json!([event]))).await;

    assert_ok(status, &body);
}

#[actix_web::test]
async fn intake_unavailable_is_503() {
    let intake = Arc::new(RecordingIntake {
        unavailable: true,
        ..RecordingIntake::default()
    });
    let mut event = pageview("user-1");
    event["token"] = json!("phc_token");

    let (status, body) = send(&intake, post_json("/e/", &event)).await;

    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["type"], "server_error");
    assert_eq!(body["code"], "unavailable");
    assert!(
        body["detail"].as_str().unwrap().contains("kafka is down"),
        "{body}"
    );
}

#[actix_web::test]
async fn envelope_carries_every_spec_field() {
    let intake = Arc::new(RecordingIntake::default());
    let client_uuid = "0190a5b2-7c3e-7d4f-8a6b-1c2d3e4f5a6b";
    let event = json!({
        "event": "$autocapture",
        "$distinct_id": 42,
        "uuid": client_uuid,
        "timestamp": "2024-01-01T00:00:00.000Z",
        "properties": {"token": "phc_token", "$ip": "198.51.100.1"},
    });

    let request = post_json("/i/v0/e/?_=1700000000000", &event)
        .insert_header(("Host", "capture.example.com"))
        .insert_header(("X-Forwarded-For", "203.0.113.7:51234, 10.0.0.1"))
        .peer_addr("10.1.2.3:4000".parse().unwrap());
    let before = Utc::now();
    let (status, body) = send(&intake, request).await;
    let after = Utc::now();

    assert_ok(status, &body);
    assert_eq!(intake.submissions()[0][0].key, "phc_token:42");
    let envelope = &intake.only_submission()[0];
    let fields: Vec<&str> = envelope
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted_fields = fields.clone();
    sorted_fields.sort_unstable();
    assert_eq!(
        sorted_fields,
        [
            "data",
            "distinct_id",
            "ip",
            "now",
            "sent_at",
            "site_url",
            "token",
            "uuid"
        ]
    );
    assert_eq!(envelope["distinct_id"], "42");
    assert_eq!(envelope["ip"], "203.0.113.7");
    assert_eq!(envelope["site_url"], "http://capture.example.com");
    assert_eq!(envelope["uuid"], client_uuid);
    assert_eq!(envelope["token"], "phc_token");
    assert_eq!(envelope["sent_at"], "2023-11-14T22:13:20.000Z");
    assert!(envelope["data"].is_string());
    assert_eq!(data_of(envelope), event);

    let now = envelope["now"].as_str().unwrap();
    // `2024-05-06T07:08:09.123Z`: milliseconds and a `Z`.
    assert_eq!(now.len(), 24, "{now}");
    assert!(now.ends_with('Z') && now.as_bytes()[19] == b'.', "{now}");
    let parsed = DateTime::parse_from_rfc3339(now)
        .unwrap()
        .with_timezone(&Utc);
    let truncated_before = before - chrono::Duration::milliseconds(1);
    assert!(parsed >= truncated_before && parsed <= after, "{now}");
}

#[actix_web::test]
async fn peer_address_is_the_ip_without_forwarding() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    event["token"] = json!("phc_token");

    let request = post_json("/e/", &event).peer_addr("192.0.2.9:4000".parse().unwrap());
    let (status, body) = send(&intake, request).await;

    assert_ok(status, &body);
    assert_eq!(intake.only_submission()[0]["ip"], "192.0.2.9");
}

#[actix_web::test]
async fn invalid_or_missing_uuid_gets_a_new_v7() {
    let intake = Arc::new(RecordingIntake::default());
    let mut with_bad_uuid = pageview("a");
    with_bad_uuid["uuid"] = json!("not-a-uuid");
    let request = json!({"api_key": "t", "batch": [with_bad_uuid, pageview("b")]});

    let (status, body) = send(&intake, post_json("/batch", &request)).await;

    assert_ok(status, &body);
    for envelope in intake.only_submission() {
        let uuid = Uuid::parse_str(envelope["uuid"].as_str().unwrap()).unwrap();
        assert_eq!(uuid.get_version_num(), 7);
    }
}

#[actix_web::test]
async fn invalid_sent_at_is_400() {
    let intake = Arc::new(RecordingIntake::default());
    let request = json!({"api_key": "t", "sent_at": "yesterday", "batch": [pageview("a")]});

    let (status, body) = send(&intake, post_json("/batch", &request)).await;

    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["detail"].as_str().unwrap().contains("sent_at"),
        "{body}"
    );
}

#[actix_web::test]
async fn lone_surrogates_are_replaced_rather_than_refused() {
    let intake = Arc::new(RecordingIntake::default());
    let raw = r#"{"event":"e","distinct_id":"d","token":"t","properties":{"title":"a\ud83d b \ud83d\ude00 \\ud800"}}"#;

    let request = TestRequest::post().uri("/e/").set_payload(raw);
    let (status, body) = send(&intake, request).await;

    assert_ok(status, &body);
    let event = data_of(&intake.only_submission()[0]);
    assert_eq!(
        event["properties"]["title"],
        "a\u{fffd} b \u{1f600} \\ud800"
    );
}

#[actix_web::test]
async fn distinct_ids_are_truncated_to_200_characters() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview(&"é".repeat(250));
    event["token"] = json!("t");

    let (status, body) = send(&intake, post_json("/e", &event)).await;

    assert_ok(status, &body);
    let envelope = &intake.only_submission()[0];
    assert_eq!(envelope["distinct_id"], "é".repeat(200).as_str());
}

#[actix_web::test]
async fn cors_headers_echo_the_origin() {
    let intake = Arc::new(RecordingIntake::default());

    let preflight = TestRequest::default()
        .method(Method::OPTIONS)
        .uri("/e/")
        .insert_header((header::ORIGIN, "https://app.example.com"))
        .insert_header((header::ACCESS_CONTROL_REQUEST_HEADERS, "content-type"));
    let response = respond(&intake, DEFAULT_MAX_BODY_BYTES, preflight).await;

    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    assert_eq!(
        headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).unwrap(),
        "https://app.example.com"
    );
    assert_eq!(
        headers
            .get(header::ACCESS_CONTROL_ALLOW_CREDENTIALS)
            .unwrap(),
        "true"
    );
    assert_eq!(
        headers.get(header::ACCESS_CONTROL_ALLOW_HEADERS).unwrap(),
        "content-type"
    );

    let refused =
        post_json("/e/", &pageview("a")).insert_header((header::ORIGIN, "https://app.example.com"));
    let response = respond(&intake, DEFAULT_MAX_BODY_BYTES, refused).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response
            .headers()
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .unwrap(),
        "https://app.example.com"
    );
}

#[test]
fn sent_at_accepts_seconds_milliseconds_and_iso() {
    let expected = DateTime::parse_from_rfc3339("2023-11-14T22:13:20Z")
        .unwrap()
        .with_timezone(&Utc);
    assert_eq!(parse_sent_at("1700000000"), Some(expected));
    assert_eq!(parse_sent_at("1700000000000"), Some(expected));
    assert_eq!(parse_sent_at("1700000000000.4"), Some(expected));
    assert_eq!(parse_sent_at("2023-11-14T22:13:20Z"), Some(expected));
    assert_eq!(parse_sent_at("2023-11-14T23:13:20+01:00"), Some(expected));
    assert_eq!(parse_sent_at("soon"), None);
    assert_eq!(parse_sent_at("1e5"), None);
}

#[test]
fn form_fields_are_percent_decoded_to_bytes() {
    let fields = FormFields::parse(b"data=%1f%8B%00a+b&compression=gzip-js&api_key=k%3D1&_=17&x");

    assert_eq!(fields.data.as_deref(), Some(&b"\x1f\x8b\x00a b"[..]));
    assert_eq!(fields.compression.as_deref(), Some("gzip-js"));
    assert_eq!(fields.api_key.as_deref(), Some("k=1"));
    assert_eq!(fields.sent_at.as_deref(), Some("17"));
    assert_eq!(percent_decode(b"100%+%zz%4"), b"100% %zz%4");
}

#[test]
fn compression_hints_are_read_in_posthogs_order() {
    assert_eq!(
        Compression::from_hints([None, None, Some("gzip")]),
        Compression::Gzip
    );
    assert_eq!(
        Compression::from_hints([Some(""), Some("GZIP-JS"), None]),
        Compression::Gzip
    );
    assert_eq!(
        Compression::from_hints([Some("base64"), None, Some("gzip")]),
        Compression::None
    );
    assert_eq!(
        Compression::from_hints([None, None, Some("br")]),
        Compression::None
    );
    assert_eq!(
        Compression::from_hints([Some("lz64"), None, None]),
        Compression::Lz64
    );
}

#[actix_web::test]
async fn mislabelled_plain_json_is_still_accepted() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    event["token"] = json!("phc_token");

    let gzip_hint = post_json("/e/?compression=gzip-js", &event);
    let (status, body) = send(&intake, gzip_hint).await;
    assert_ok(status, &body);

    let form_type = TestRequest::post()
        .uri("/e/")
        .insert_header((header::CONTENT_TYPE, "application/x-www-form-urlencoded"))
        .set_payload(serde_json::to_vec(&event).unwrap());
    let (status, body) = send(&intake, form_type).await;
    assert_ok(status, &body);

    assert_eq!(intake.submissions().len(), 2);
}

#[actix_web::test]
async fn single_event_keeps_its_own_fields_in_data() {
    let intake = Arc::new(RecordingIntake::default());
    let mut event = pageview("user-1");
    event["api_key"] = json!("phc_token");
    event["sent_at"] = json!("2024-01-02T03:04:05Z");
    event["batch"] = Value::Null;

    let (status, body) = send(&intake, post_json("/capture", &event)).await;

    assert_ok(status, &body);
    let envelope = &intake.only_submission()[0];
    assert_eq!(envelope["sent_at"], "2024-01-02T03:04:05.000Z");
    assert_eq!(data_of(envelope), event);
}
