//! CPU per event of the person step on the in-memory store, for the `ingest` benchmark's
//! `persons` scenario: every event `$set`s a property of its person, 10,000 distinct ids, one
//! team, batches of 10,000 events (what the consumer cuts from that backlog). The first batch
//! creates the persons and is not timed; the rest update each person once per batch, the
//! steady state. What the pipeline does around the step is measured too: reading the
//! updates from the event (`person_event`) and dropping the answers once the rows are built.
//!
//! For instruction counts per event (repeatable on a shared machine):
//!     valgrind --tool=callgrind target/release/persons_cpu 50000
//! For a profile: `perf record --call-graph dwarf target/release/persons_cpu`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use plugin_server_actors::event::Properties;
use plugin_server_actors::persons::{
    MemoryPersonStore, PersonConfig, PersonEvent, PersonManager, merge_intent, person_updates,
};
use serde_json::json;
use uuid::Uuid;

/// The server's allocator (see src/main.rs), so the figures match it.
#[global_allocator]
static ALLOCATOR: plugin_server_alloc::MiMalloc = plugin_server_alloc::MiMalloc;

const DISTINCT_IDS: usize = 10_000;
const BATCH: usize = 10_000;

fn main() -> anyhow::Result<()> {
    let count = plugin_server_bench::event_count_argument(200_000)?;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let manager = PersonManager::new(Arc::new(MemoryPersonStore::new()), PersonConfig::default());
    let timestamp = Utc::now();
    // The event's properties as the pipeline has them after parsing: each value as the text
    // it arrived as, parsed when a step first reads it.
    let properties: Vec<Properties> = (0..count + BATCH)
        .map(|i| {
            let text = json!({
                "i": i,
                "$current_url": "https://example.com/p?q=1",
                "blob": "x".repeat(i % 300),
                "$set": {"last_i": i},
            })
            .to_string();
            serde_json::from_str::<Properties>(&text)
        })
        .collect::<Result<_, _>>()?;
    let uuids: Vec<String> = (0..count + BATCH)
        .map(|_| Uuid::new_v4().to_string())
        .collect();
    let distinct_ids: Vec<String> = (0..count + BATCH)
        .map(|i| format!("user-{}", i % DISTINCT_IDS))
        .collect();

    let mut read = Duration::ZERO;
    let mut step = Duration::ZERO;
    let mut drop_answers = Duration::ZERO;
    let mut changed = 0usize;
    for (number, start) in (0..count + BATCH).step_by(BATCH).enumerate() {
        let end = (start + BATCH).min(count + BATCH);
        let started = Instant::now();
        // What the pipeline's `person_event` reads of each event, borrowed from it.
        let events: Vec<PersonEvent> = (start..end)
            .map(|i| PersonEvent {
                team_id: 2,
                intent: merge_intent("e", &distinct_ids[i], &properties[i]),
                distinct_id: Cow::Borrowed(&distinct_ids[i]),
                event_uuid: Cow::Borrowed(&uuids[i]),
                timestamp,
                updates: person_updates(&properties[i]),
                process_person: true,
            })
            .collect();
        let read_time = started.elapsed();
        let started = Instant::now();
        let answers = runtime.block_on(manager.resolve_batch(&events));
        let step_time = started.elapsed();
        let batch_changed = answers
            .iter()
            .filter(|answer| matches!(answer, Ok(outcome) if outcome.changes.is_some()))
            .count();
        let started = Instant::now();
        drop(answers);
        drop(events);
        let drop_time = started.elapsed();
        // The first batch creates every person: the steady state starts after it.
        if number > 0 {
            read += read_time;
            step += step_time;
            drop_answers += drop_time;
            changed += batch_changed;
        }
    }
    let per_event = |d: Duration| d.as_secs_f64() * 1e6 / count as f64;
    println!(
        "persons: {count} events after a warm-up batch, {BATCH} per batch, {DISTINCT_IDS} distinct ids, \
         {changed} answers carrying a change"
    );
    println!(
        "  read updates {:.2}, person step {:.2}, drop answers {:.2} µs/event; total {:.2} µs/event",
        per_event(read),
        per_event(step),
        per_event(drop_answers),
        per_event(read + step + drop_answers),
    );
    Ok(())
}
