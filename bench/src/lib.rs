//! What the benchmark binaries share.

pub mod process;

/// The number of events a CPU bench runs: its first argument, or `default`.
pub fn event_count_argument(default: usize) -> anyhow::Result<usize> {
    use anyhow::Context;

    Ok(std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()
        .context("the argument is a number of events")?
        .unwrap_or(default))
}

/// The processEvent plugin of the Node vm2 peer (`shared/bench/node_vm2_bench.js`), byte for
/// byte: parse a URL, rename a property, add a field, rename the event with `config.suffix`.
pub const BENCH_PLUGIN: &str = r#"
function processEvent(event, meta) {
    const props = event.properties || {}
    const url = new URL(props.$current_url)
    props.host_seen = url.hostname
    props.renamed = props.i; delete props.i
    event.event = event.event + meta.config.suffix
    event.properties = props
    return event
}"#;
