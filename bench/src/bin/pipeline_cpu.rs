//! CPU per event of the pipeline's steps that need no service: envelope parsing,
//! normalization and stamping, the group step (in-memory store; events naming no group, the common
//! case), the definitions check (warm caches: the steady state), and building the row. Two
//! event shapes: the end-to-end benchmark's (3 properties, shared with the naive peer) and one
//! like posthog-js sends (35 properties). For profiling: `perf record target/release/pipeline_cpu`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use chrono::Utc;
use plugin_server_actors::definitions::{
    DefinitionConfig, DefinitionStore, DefinitionStoreError, DefinitionsManager, NewDefinitions,
};
use plugin_server_actors::event::StampedEvent;
use plugin_server_actors::event::Team;
use plugin_server_actors::event::envelope::{EnvelopeLimits, normalize_event, parse_envelope};
use plugin_server_actors::groups::{GroupColumns, GroupConfig, GroupManager, MemoryGroupStore};
use plugin_server_actors::ingest::prepare::{build_row, stamp_event};
use serde_json::{Value, json};
use uuid::Uuid;

/// The server's allocator (see src/main.rs), so the figures match it.
#[global_allocator]
static ALLOCATOR: plugin_server_alloc::MiMalloc = plugin_server_alloc::MiMalloc;

/// Definitions go nowhere: the steady state is measured, where the caches answer.
struct NoStore;

#[async_trait::async_trait]
impl DefinitionStore for NoStore {
    async fn write(&self, _: &NewDefinitions) -> Result<(), DefinitionStoreError> {
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let count = plugin_server_bench::event_count_argument(200_000)?;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let small = |i: usize| json!({"i": i, "$current_url": "https://example.com/p?q=1", "blob": "x".repeat(i % 300)});
    let web = |i: usize| {
        let mut properties = serde_json::Map::new();
        for (n, key) in [
            "$os",
            "$os_version",
            "$browser",
            "$browser_version",
            "$device_type",
            "$current_url",
            "$host",
            "$pathname",
            "$raw_user_agent",
            "$screen_height",
            "$screen_width",
            "$viewport_height",
            "$viewport_width",
            "$lib",
            "$lib_version",
            "$insert_id",
            "$time",
            "distinct_id",
            "$device_id",
            "$user_id",
            "$referrer",
            "$referring_domain",
            "$session_id",
            "$window_id",
            "$pageview_id",
            "$is_identified",
            "$timezone",
            "$browser_language",
            "$configured_session_timeout_ms",
            "$lib_rate_limit_remaining_tokens",
            "$sent_at",
            "token",
            "plan",
            "experiment",
            "$active_feature_flags",
        ]
        .iter()
        .enumerate()
        {
            properties.insert((*key).to_owned(), json!(format!("value-{}", (i + n) % 50)));
        }
        Value::Object(properties)
    };
    for (shape, properties) in [
        ("3 properties", &small as &dyn Fn(usize) -> Value),
        ("35 properties (posthog-js)", &web),
    ] {
        run(&runtime, count, shape, properties)?;
    }
    Ok(())
}

fn run(
    runtime: &tokio::runtime::Runtime,
    count: usize,
    shape: &str,
    properties: &dyn Fn(usize) -> Value,
) -> anyhow::Result<()> {
    let now = Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let messages: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            let data = json!({
                "event": format!("e{}", i % 7),
                "properties": properties(i),
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
    let groups = GroupManager::new(Arc::new(MemoryGroupStore::new()), GroupConfig::default());
    let definitions = DefinitionsManager::new(Arc::new(NoStore), DefinitionConfig::default());

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
    let mut warnings = Vec::new();
    let mut stamped: Vec<StampedEvent> = parsed
        .into_iter()
        .filter_map(|event| {
            // The pipeline normalizes after the plugins, just before stamping.
            let mut event = event.event;
            normalize_event(&mut event);
            stamp_event(event, &team, &mut warnings).ok()
        })
        .collect();
    let stamp = started.elapsed();

    // In batches of 1,000, as the pipeline gets them.
    let started = Instant::now();
    for batch in stamped.chunks_mut(1_000) {
        let mut events: Vec<&mut StampedEvent> = batch.iter_mut().collect();
        runtime.block_on(groups.resolve_batch(&mut events))?;
    }
    let group_step = started.elapsed();

    // Warm: the shapes are seen once before the clock starts.
    drop(
        definitions.collect(
            stamped
                .iter()
                .take(7)
                .map(|event| (&team, &*event.event, None)),
        ),
    );
    let started = Instant::now();
    let mut new = 0;
    for batch in stamped.chunks(1_000) {
        let found = definitions.collect(batch.iter().map(|event| (&team, &*event.event, None)));
        new += found.properties.len();
    }
    let definitions_step = started.elapsed();

    let started = Instant::now();
    let created_at = Utc::now();
    let rows = stamped
        .into_iter()
        .filter_map(|event| {
            build_row(event, &team, created_at, None, &GroupColumns::default()).ok()
        })
        .count();
    let build = started.elapsed();

    let per_event = |d: std::time::Duration| d.as_secs_f64() * 1e6 / count as f64;
    let total = parse + stamp + group_step + definitions_step + build;
    println!(
        "{shape}: {count} events, {} bytes on average",
        bytes / count
    );
    println!(
        "  serde_json alone (envelope + data as Value): {:.2} µs/event ({baseline} objects)",
        per_event(json_only)
    );
    println!(
        "  parse {:.2}, stamp {:.2}, groups {:.2}, definitions {:.2}, build row {:.2} µs/event; \
         total {:.2} µs/event ({:.0} events/s on one core); {rows} rows, {} warnings, {new} \
         definitions new after warm-up",
        per_event(parse),
        per_event(stamp),
        per_event(group_step),
        per_event(definitions_step),
        per_event(build),
        per_event(total),
        count as f64 / total.as_secs_f64(),
        warnings.len()
    );
    Ok(())
}
