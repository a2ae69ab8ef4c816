//! CPU per event of the pipeline's pure steps (envelope parsing and normalization, then row
//! preparation), on the same event shape as the end-to-end benchmark and the naive peer, with
//! no services. For profiling: `perf record target/release/pipeline_cpu 200000`.

use std::time::Instant;

use anyhow::Context;
use chrono::Utc;
use plugin_server_actors::ingestion::Team;
use plugin_server_actors::ingestion::envelope::{EnvelopeLimits, parse_envelope};
use plugin_server_actors::ingestion::prepare::prepare_event;
use serde_json::json;
use uuid::Uuid;

/// The server's allocator (see src/main.rs), so the figures match it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let count: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()
        .context("the argument is a number of events")?
        .unwrap_or(200_000);
    let now = Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let messages: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            let data = json!({
                "event": format!("e{}", i % 7),
                "properties": {"i": i, "$current_url": "https://example.com/p?q=1", "blob": "x".repeat(i % 300)},
                "timestamp": now,
            });
            serde_json::to_vec(&json!({
                "uuid": Uuid::new_v4().to_string(),
                "distinct_id": format!("user-{}", i % 10_000),
                "ip": "10.1.2.3",
                "team_id": 2,
                "now": now,
                "sent_at": now,
                "data": data.to_string(),
            }))
            .context("encode")
        })
        .collect::<anyhow::Result<_>>()?;
    let bytes: usize = messages.iter().map(Vec::len).sum();
    let team = Team {
        id: 2,
        uuid: Uuid::nil(),
        organization_id: Uuid::nil(),
        api_token: "phc_bench".to_owned(),
        name: "bench".to_owned(),
        anonymize_ips: false,
        session_recording_opt_in: false,
        ingested_event: true,
        slack_incoming_webhook: None,
        timezone: "UTC".to_owned(),
    };
    let limits = EnvelopeLimits::default();

    // Baseline: what serde_json alone costs for the two JSON layers of each message.
    let started = Instant::now();
    let mut baseline = 0usize;
    for raw in &messages {
        let outer: serde_json::Value = serde_json::from_slice(raw).context("outer")?;
        let data = outer["data"].as_str().unwrap_or_default();
        let inner: serde_json::Value = serde_json::from_str(data).context("inner")?;
        baseline += usize::from(inner.is_object());
    }
    let json_only = started.elapsed();

    let started = Instant::now();
    let parsed: Vec<_> = messages
        .iter()
        .filter_map(|raw| parse_envelope(raw, &limits).ok())
        .collect();
    let parse = started.elapsed();

    let started = Instant::now();
    let created_at = Utc::now();
    let mut warnings = Vec::new();
    let rows = parsed
        .into_iter()
        .filter_map(|event| prepare_event(event.event, &team, created_at, &mut warnings).ok())
        .count();
    let prepare = started.elapsed();

    let per_event = |d: std::time::Duration| d.as_secs_f64() * 1e6 / count as f64;
    println!(
        "serde_json alone (envelope + data as Value): {:.2} µs/event ({baseline} objects)",
        per_event(json_only)
    );
    println!(
        "{count} events, {} bytes on average: parse {:.2} µs/event, prepare {:.2} µs/event, \
         total {:.2} µs/event ({:.0} events/s on one core); {rows} rows, {} warnings",
        bytes / count,
        per_event(parse),
        per_event(prepare),
        per_event(parse + prepare),
        count as f64 / (parse + prepare).as_secs_f64(),
        warnings.len()
    );
    Ok(())
}
