//! The plugin runtime next to the Node peer (`/work/shared/bench/node_vm2_*.js`): processEvent
//! throughput per worker thread (one VM, and through the pool), memory and creation time per
//! plugin VM with 1,000 loaded, and boot time with 1,000 configs. No services needed.
//!
//! ```sh
//! plugin_vm throughput                 # node node_vm2_bench.js 200000
//! plugin_vm memory                     # node --expose-gc node_vm2_memory.js 1000
//! plugin_vm memory --variant bare      # breakdown: bare | realm | url | prelude
//! plugin_vm boot --layout teams        # registry + pool + first event of every team
//! ```
//!
//! Each run prints one JSON line per measurement. Run the memory variants in separate
//! processes: freed memory does not always go back to the system, so RSS only adds up from a
//! fresh process.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use boa_engine::{Context, JsObject};
use clap::{Parser, Subcommand, ValueEnum};
use plugin_server_actors::plugins::LoadedConfig;
use plugin_server_actors::plugins::chain::{ChainEvent, ChainOutput};
use plugin_server_actors::plugins::host_services::HostServiceError;
use plugin_server_actors::plugins::isolation::{WorkerCommand, WorkerIsolation};
use plugin_server_actors::plugins::outputs::PluginOutputs;
use plugin_server_actors::plugins::pool::{
    HostFactory, PluginSet, PluginVmPool, PluginVmPoolConfig,
};
use plugin_server_actors::plugins::registry::{PluginRegistry, RegistrySource};
use plugin_server_actors::plugins::runtime::natives::{FetchReply, FetchRequest, PluginHost};
use plugin_server_actors::plugins::runtime::prelude::Prelude;
use plugin_server_actors::plugins::runtime::transpile::transpile;
use plugin_server_actors::plugins::runtime::vm::{CallArg, Method, PluginVm, VmLimits};
use plugin_server_actors::plugins::runtime::{VmIdentity, VmSource};
use plugin_server_actors::plugins::worker::{SideEffects, VmRetention};
use plugin_server_actors::system::metrics::Metrics;
use plugin_server_bench::BENCH_PLUGIN;
use serde_json::{Value, json};

/// The server's allocator (see src/main.rs): PluginVm calls open a memory budget that relies on
/// it, and the memory figures then match the server's.
#[global_allocator]
static ALLOCATOR: plugin_server_alloc::BudgetedAllocator<plugin_server_alloc::MiMalloc> =
    plugin_server_alloc::BudgetedAllocator(plugin_server_alloc::MiMalloc);

/// The plugin of `node_vm2_memory.js`, byte for byte.
const SMALL_PLUGIN: &str = "function processEvent(event, meta) { event.properties.host_seen = new URL(event.properties.$current_url).hostname; return event }";

#[derive(Debug, Parser)]
#[command(
    name = "plugin_vm",
    about = "Plugin runtime benchmarks (release builds)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// processEvent events/s on one thread, JSON in and out: one VM called directly, then
    /// the same through `PluginVmPool::process_events` with one worker.
    Throughput {
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        #[arg(long, default_value_t = 20_000)]
        warmup: usize,
        /// Events per `process_events` call in the pool measurement.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Skip the pool measurement.
        #[arg(long)]
        direct_only: bool,
        /// Configs of the plugin in the team's chain, in the pool measurement.
        #[arg(long, default_value_t = 1)]
        chain: usize,
        /// The pool's worker as a process of this server executable (`<exe> --plugin-worker`)
        /// instead of a thread of this benchmark.
        #[arg(long, value_name = "EXE")]
        worker_exe: Option<PathBuf>,
    },
    /// Creation time and resident memory of N VMs kept alive on one thread.
    Memory {
        #[arg(long, default_value_t = 1000)]
        vms: usize,
        #[arg(long, value_enum, default_value_t = Variant::Plugin)]
        variant: Variant,
        /// With `--variant plugin`: events then run through the first VM while all N are
        /// alive (boa's GC is per thread, so it traces all of them), 0 to skip.
        #[arg(long, default_value_t = 100_000)]
        loaded_events: usize,
    },
    /// Time from nothing to every config's VM built and run once: registry load (transpile)
    /// + pool start + one event per team through `process_events`, concurrently.
    Boot {
        #[arg(long, default_value_t = 1000)]
        configs: usize,
        /// WORKER_CONCURRENCY.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[arg(long, value_enum, default_value_t = Layout::Teams)]
        layout: Layout,
        /// Rounds of one event per team; each round starts when the previous one is done.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// PLUGIN_VM_MEMORY_BUDGET_MB (the server's default); 0 for no limit.
        #[arg(long, default_value_t = 1024)]
        budget_mb: u64,
        /// Run the workers as processes of this server executable
        /// (PLUGIN_WORKER_ISOLATION=process, `<exe> --plugin-worker`) instead of threads of
        /// this benchmark.
        #[arg(long, value_name = "EXE")]
        worker_exe: Option<PathBuf>,
    },
}

/// What each of the N contexts of `memory` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Variant {
    /// `Context::builder().build()`: boa's realm with every built-in (Intl and Temporal too).
    Bare,
    /// N `create_realm()` in one shared Context: a realm's share of `bare`.
    Realm,
    /// + boa_runtime's URL extension, as `PluginVm::load` registers it.
    Url,
    /// + the prelude's core installed (with an empty host object).
    Prelude,
    /// `PluginVm::load` of the small plugin, then one processEvent call each (the peer's).
    Plugin,
}

/// How `boot` spreads the configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Layout {
    /// One plugin; N teams with one config each.
    Teams,
    /// 10 plugins (same code, different files); N/10 teams with a chain of all 10.
    Plugins,
}

struct NoNetwork;

impl PluginHost for NoNetwork {
    fn fetch(&self, _: FetchRequest) -> Result<FetchReply, HostServiceError> {
        Err(HostServiceError::NotAvailable("fetch"))
    }

    fn cache(
        &self,
        _: &VmIdentity,
        _: plugin_server_actors::plugins::runtime::natives::CacheOp,
    ) -> Result<Value, HostServiceError> {
        Err(HostServiceError::NotAvailable("meta.cache"))
    }

    fn storage(
        &self,
        _: &VmIdentity,
        _: plugin_server_actors::plugins::runtime::natives::StorageOp,
    ) -> Result<Value, HostServiceError> {
        Err(HostServiceError::NotAvailable("meta.storage"))
    }

    fn geoip(&self, _: &str) -> Value {
        Value::Null
    }

    fn enqueue_job(
        &self,
        _: &VmIdentity,
        _: plugin_server_actors::plugins::runtime::natives::JobRequest,
    ) -> Result<Value, HostServiceError> {
        Err(HostServiceError::NotAvailable("meta.jobs"))
    }
}

/// Counts what the pool reports besides events; a config error fails the run.
#[derive(Default)]
struct Outputs {
    config_errors: AtomicUsize,
    logs: AtomicUsize,
}

impl PluginOutputs for Outputs {
    fn side_effects(&self, side: SideEffects) {
        for error in &side.config_errors {
            eprintln!(
                "config {} failed: {}",
                error.identity.plugin_config_id, error.message
            );
        }
        self.config_errors
            .fetch_add(side.config_errors.len(), Ordering::Relaxed);
        self.logs.fetch_add(side.logs.len(), Ordering::Relaxed);
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Throughput {
            events,
            warmup,
            batch,
            direct_only,
            chain,
            worker_exe,
        } => {
            throughput_direct(events, warmup)?;
            if !direct_only {
                let isolation = isolation(worker_exe);
                actix::System::new()
                    .block_on(throughput_pool(events, warmup, batch, chain, isolation))?;
            }
        }
        Command::Memory {
            vms,
            variant,
            loaded_events,
        } => memory(vms, variant, loaded_events)?,
        Command::Boot {
            configs,
            workers,
            layout,
            rounds,
            budget_mb,
            worker_exe,
        } => actix::System::new().block_on(boot(BootRun {
            configs,
            workers,
            layout,
            rounds,
            budget_mb,
            isolation: isolation(worker_exe),
        }))?,
    }
    Ok(())
}

/// The event of `node_vm2_bench.js`, serialized as `JSON.stringify` does (same key order).
fn bench_event() -> anyhow::Result<String> {
    serde_json::to_string(&json!({
        "event": "page",
        "distinct_id": "u1",
        "properties": {"i": 1, "$current_url": "https://example.com/x?y=1", "blob": "x".repeat(150)},
    }))
    .context("serialize the event")
}

fn identity(plugin_config_id: i64, team_id: i64, name: &str) -> VmIdentity {
    VmIdentity {
        plugin_config_id,
        plugin_id: 1,
        team_id,
        plugin_name: name.into(),
    }
}

fn source(code: &str) -> anyhow::Result<VmSource> {
    Ok(VmSource {
        file_name: "index.js".into(),
        code: Arc::from(transpile(code, "index.js").context("transpile")?),
    })
}

fn host() -> Rc<dyn PluginHost> {
    Rc::new(NoNetwork)
}

/// Parses `raw`, runs processEvent, serializes the result; returns its length.
/// JSON text in, JSON text out, as the chain runs a config (and as the peer does with
/// `JSON.parse` and `JSON.stringify`).
fn one_event(vm: &mut PluginVm, raw: &str) -> anyhow::Result<usize> {
    let (result, _) = vm.call_plain(Method::ProcessEvent, &[CallArg::Text(raw)]);
    let out = result
        .map_err(|e| anyhow!("processEvent failed: {e}"))?
        .ok_or_else(|| anyhow!("processEvent dropped the event"))?;
    Ok(serde_json::to_string(&out).context("serialize")?.len())
}

fn events_per_s(events: usize, elapsed: Duration) -> u64 {
    (events as f64 / elapsed.as_secs_f64()).round() as u64
}

/// A VM as the pool builds one, with default limits and the benchmark's host.
fn load_bench_vm(
    identity: VmIdentity,
    source: &VmSource,
    config: &Value,
) -> anyhow::Result<PluginVm> {
    let (vm, _) = PluginVm::load(identity, source, config, &[], VmLimits::default(), host())
        .context("load the VM")?;
    Ok(vm)
}

fn throughput_direct(events: usize, warmup: usize) -> anyhow::Result<()> {
    let raw = bench_event()?;
    let mut vm = load_bench_vm(
        identity(1, 2, "bench"),
        &source(BENCH_PLUGIN)?,
        &json!({"suffix": "_x"}),
    )?;
    for _ in 0..warmup {
        one_event(&mut vm, &raw)?;
    }
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..events {
        bytes += one_event(&mut vm, &raw)?;
    }
    let elapsed = started.elapsed();
    println!(
        "{}",
        json!({
            "measurement": "throughput_direct",
            "events": events,
            "seconds": round3(elapsed.as_secs_f64()),
            "events_per_s": events_per_s(events, elapsed),
            "us_per_event": round3(elapsed.as_secs_f64() * 1e6 / events as f64),
            "bytes": bytes,
        })
    );
    Ok(())
}

/// Threads of this benchmark, or processes of a server executable.
fn isolation(worker_exe: Option<PathBuf>) -> WorkerIsolation {
    match worker_exe {
        Some(program) => WorkerIsolation::Process(WorkerCommand {
            program,
            args: vec!["--plugin-worker".into()],
            env: Vec::new(),
        }),
        None => WorkerIsolation::Thread,
    }
}

async fn throughput_pool(
    events: usize,
    warmup: usize,
    batch: usize,
    chain: usize,
    isolation: WorkerIsolation,
) -> anyhow::Result<()> {
    let raw = bench_event()?;
    let outputs = Arc::new(Outputs::default());
    let pool = start_pool(1, 0, isolation, outputs.clone())?;
    let code = source(BENCH_PLUGIN)?;
    pool.set_plugins(PluginSet::new((1..=chain).map(|order| LoadedConfig {
        identity: identity(order as i64, 2, "bench"),
        source: code.clone(),
        config: json!({"suffix": "_x"}),
        attachments: Vec::new(),
        order: order as i32,
        version: "1".into(),
        log_level: 0,
        webhook_filters: None,
    })));
    let mut template =
        ChainEvent::from_value(&serde_json::from_str(&raw).context("parse the event")?);
    // As the pipeline asks: it keeps the event, so only what changed comes back.
    template.answer_with_changes = true;
    let run = |count: usize| {
        let pool = pool.clone();
        let template = &template;
        async move {
            let mut bytes = 0;
            let mut failures = 0;
            let mut left = count;
            while left > 0 {
                let size = left.min(batch);
                left -= size;
                // As the pipeline hands them over: the event's text and what the chain reads.
                let events = vec![template.clone(); size];
                for outcome in pool.process_events(2, events).await {
                    failures += outcome.failures.len();
                    let event = outcome
                        .event
                        .ok_or_else(|| anyhow!("processEvent dropped the event"))?;
                    bytes += match event {
                        ChainOutput::Text(text) => text.len(),
                        ChainOutput::Changes(changes) => {
                            changes.head.len() + changes.set.len() + 4 * changes.order.len()
                        }
                    };
                }
            }
            anyhow::Ok((bytes, failures))
        }
    };
    run(warmup).await?;
    let started = Instant::now();
    let (bytes, failures) = run(events).await?;
    let elapsed = started.elapsed();
    if failures > 0 || outputs.config_errors.load(Ordering::Relaxed) > 0 {
        bail!("{failures} events failed in the pool");
    }
    println!(
        "{}",
        json!({
            "measurement": "throughput_pool",
            "workers": 1,
            "chain": chain,
            "batch": batch,
            "events": events,
            "seconds": round3(elapsed.as_secs_f64()),
            "events_per_s": events_per_s(events, elapsed),
            "us_per_event": round3(elapsed.as_secs_f64() * 1e6 / events as f64),
            "bytes": bytes,
        })
    );
    actix::System::current().stop();
    Ok(())
}

/// Holds one context of a `memory` variant alive.
enum Held {
    Context { _kept: Box<Context> },
    Realm { _kept: boa_engine::realm::Realm },
    Vm(Box<PluginVm>),
}

fn build_context(variant: Variant) -> anyhow::Result<Context> {
    let mut context = Context::builder()
        .build()
        .map_err(|e| anyhow!("context: {e}"))?;
    if variant == Variant::Bare {
        return Ok(context);
    }
    boa_runtime::extensions::RuntimeExtension::register(
        boa_runtime::extensions::UrlExtension,
        None,
        &mut context,
    )
    .map_err(|e| anyhow!("URL extension: {e}"))?;
    if variant == Variant::Url {
        return Ok(context);
    }
    let stub_host = JsObject::with_object_proto(context.intrinsics());
    Prelude::install(stub_host, &mut context).map_err(|e| anyhow!("prelude: {e}"))?;
    Ok(context)
}

fn memory(count: usize, variant: Variant, loaded_events: usize) -> anyhow::Result<()> {
    let code = source(SMALL_PLUGIN)?;
    let config = json!({});
    let call_event = json!({"event": "e", "properties": {"$current_url": "https://a.b/c"}});
    let rss_before = rss_bytes()?;
    let started = Instant::now();
    let mut held = Vec::with_capacity(count);
    let mut shared = match variant {
        Variant::Realm => Some(build_context(Variant::Bare)?),
        _ => None,
    };
    for i in 0..count {
        let id = i as i64 + 1;
        held.push(match variant {
            Variant::Plugin => {
                let vm = load_bench_vm(identity(id, id, "small"), &code, &config)?;
                Held::Vm(Box::new(vm))
            }
            Variant::Realm => Held::Realm {
                _kept: shared
                    .as_mut()
                    .ok_or_else(|| anyhow!("no shared context"))?
                    .create_realm()
                    .map_err(|e| anyhow!("realm: {e}"))?,
            },
            other => Held::Context {
                _kept: Box::new(build_context(other)?),
            },
        });
    }
    let create = started.elapsed();
    let rss_created = rss_bytes()?;
    let mut calls = 0;
    for vm in &mut held {
        if let Held::Vm(vm) = vm {
            let (result, _) = vm.call(Method::ProcessEvent, &[&call_event]);
            result.map_err(|e| anyhow!("processEvent failed: {e}"))?;
            calls += 1;
        }
    }
    let rss_called = rss_bytes()?;
    // As the peer's `global.gc()`.
    boa_engine::gc::force_collect();
    let rss_after = rss_bytes()?;
    let mb = |bytes: u64| round3(bytes as f64 / 1_048_576.0);
    let per_vm =
        |bytes: u64| round3(bytes.saturating_sub(rss_before) as f64 / count as f64 / 1_048_576.0);
    println!(
        "{}",
        json!({
            "measurement": "memory",
            "variant": value_name(variant),
            "vms": count,
            "create_s": round3(create.as_secs_f64()),
            "create_ms_per_vm": round3(create.as_secs_f64() * 1e3 / count as f64),
            "calls": calls,
            "rss_before_mb": mb(rss_before),
            "rss_mb_per_vm_created": per_vm(rss_created),
            "rss_mb_per_vm_called": per_vm(rss_called),
            "rss_mb_per_vm": per_vm(rss_after),
            "rss_total_mb": mb(rss_after),
        })
    );

    if variant == Variant::Plugin && loaded_events > 0 {
        // The throughput loop of `throughput_direct` on one more VM, next to the N others:
        // boa's GC is one per thread, so each collection traces every VM of the thread.
        let raw = bench_event()?;
        let mut vm = load_bench_vm(
            identity(0, 0, "bench"),
            &source(BENCH_PLUGIN)?,
            &json!({"suffix": "_x"}),
        )?;
        for _ in 0..loaded_events / 10 {
            one_event(&mut vm, &raw)?;
        }
        let started = Instant::now();
        for _ in 0..loaded_events {
            one_event(&mut vm, &raw)?;
        }
        let elapsed = started.elapsed();
        println!(
            "{}",
            json!({
                "measurement": "throughput_direct_with_vms_loaded",
                "vms_loaded": count,
                "events": loaded_events,
                "events_per_s": events_per_s(loaded_events, elapsed),
                "rss_total_mb": mb(rss_bytes()?),
            })
        );
    }
    drop(held);
    drop(shared);
    Ok(())
}

/// Resident bytes: `/proc/self/statm` resident pages × the page size.
fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("read /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("statm has no resident field"))?
        .parse()
        .context("statm resident")?;
    Ok(pages * page_size()?)
}

/// The page size, from the kernel's auxiliary vector (AT_PAGESZ = 6) without libc.
fn page_size() -> anyhow::Result<u64> {
    let auxv = std::fs::read("/proc/self/auxv").context("read /proc/self/auxv")?;
    for pair in auxv.chunks_exact(16) {
        let (key, value) = pair.split_at(8);
        let key = u64::from_ne_bytes(key.try_into().context("auxv key")?);
        if key == 6 {
            return Ok(u64::from_ne_bytes(value.try_into().context("auxv value")?));
        }
    }
    bail!("no AT_PAGESZ in /proc/self/auxv")
}

fn start_pool(
    workers: usize,
    budget_mb: u64,
    isolation: WorkerIsolation,
    outputs: Arc<Outputs>,
) -> anyhow::Result<PluginVmPool> {
    let metrics = Metrics::new().map_err(|e| anyhow!("metrics: {e}"))?;
    let factory: HostFactory = Arc::new(host);
    // PLUGIN_VM_MEMORY_BUDGET_MB, for all the pool's workers together.
    let budget_bytes = (budget_mb > 0).then(|| (budget_mb * 1024 * 1024) as i64);
    PluginVmPool::start(
        PluginVmPoolConfig {
            workers,
            async_workers: 1,
            tasks_per_worker: 10,
            limits: VmLimits::default(),
            setup_retry_base: Duration::from_secs(5),
            retention: VmRetention {
                budget_bytes,
                idle: None,
            },
            isolation,
        },
        factory,
        outputs,
        &metrics,
    )
    .map_err(|e| anyhow!("pool: {e}"))
}

/// Writes `plugins/<name>/index.js` and `plugins.toml` in the registry's Directory format;
/// returns the team ids.
fn write_configs(dir: &Path, configs: usize, layout: Layout) -> anyhow::Result<Vec<i64>> {
    let plugins_dir = dir.join("plugins");
    let (plugins, teams) = match layout {
        Layout::Teams => (1, configs),
        Layout::Plugins => (10, configs.div_ceil(10)),
    };
    let mut toml = String::new();
    for p in 0..plugins {
        let folder = plugins_dir.join(format!("small{p}"));
        std::fs::create_dir_all(&folder).context("mkdir")?;
        // Distinct files, so that each plugin is transpiled on its own.
        std::fs::write(
            folder.join("index.js"),
            format!("// plugin {p}\n{SMALL_PLUGIN}\n"),
        )
        .context("write index.js")?;
    }
    let mut team_ids = Vec::with_capacity(teams);
    for t in 0..teams {
        let team_id = t as i64 + 1;
        team_ids.push(team_id);
        for p in 0..plugins {
            toml.push_str(&format!(
                "[[plugin_config]]\nplugin = \"small{p}\"\nteam_id = {team_id}\norder = {p}\nconfig = {{ n = \"{t}\" }}\n\n"
            ));
        }
    }
    std::fs::write(dir.join("plugins.toml"), toml).context("write plugins.toml")?;
    Ok(team_ids)
}

/// What `boot` runs.
#[derive(Debug, Clone)]
struct BootRun {
    configs: usize,
    workers: usize,
    layout: Layout,
    rounds: usize,
    budget_mb: u64,
    isolation: WorkerIsolation,
}

async fn boot(run: BootRun) -> anyhow::Result<()> {
    let dir: PathBuf = std::env::temp_dir().join(format!("plugin-vm-boot-{}", std::process::id()));
    let teams = write_configs(&dir, run.configs, run.layout)?;
    let result = boot_from(&dir, &teams, run).await;
    std::fs::remove_dir_all(&dir).context("remove the temp dir")?;
    result?;
    actix::System::current().stop();
    Ok(())
}

async fn boot_from(dir: &Path, teams: &[i64], run: BootRun) -> anyhow::Result<()> {
    let BootRun {
        workers,
        layout,
        rounds,
        budget_mb,
        isolation,
        ..
    } = run;
    let rss_before = rss_bytes()?;
    let started = Instant::now();
    let mut registry = PluginRegistry::new(RegistrySource::Directory {
        plugins_dir: dir.join("plugins"),
        configs_file: dir.join("plugins.toml"),
        ids: None,
    });
    let (loaded, problems) = registry.load().await.context("registry load")?;
    if !problems.is_empty() {
        bail!(
            "{} configs could not be loaded: {problems:?}",
            problems.len()
        );
    }
    let config_count = loaded.len();
    let plugin_count = loaded
        .iter()
        .map(|c| c.identity.plugin_id)
        .collect::<BTreeSet<_>>()
        .len();
    let registry_loaded = started.elapsed();

    let outputs = Arc::new(Outputs::default());
    let in_processes = matches!(isolation, WorkerIsolation::Process(_));
    let pool = start_pool(workers, budget_mb, isolation, outputs.clone())?;
    pool.set_plugins(PluginSet::new(loaded));
    let pool_started = started.elapsed();

    let event =
        json!({"event": "e", "distinct_id": "d", "properties": {"$current_url": "https://a.b/c"}});
    // When the first 1,000 teams (in the order they were sent) had their event back.
    let first_thousand = Arc::new(std::sync::Mutex::new(None::<Duration>));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut failures = 0;
    let mut first_round_done = None;
    for round in 0..rounds.max(1) {
        let replies = futures::future::join_all(teams.iter().map(|team| {
            let event = event.clone();
            let pool = &pool;
            let done = Arc::clone(&done);
            let first_thousand = Arc::clone(&first_thousand);
            async move {
                let reply = pool
                    .process_events(*team, vec![ChainEvent::from_value(&event)])
                    .await;
                if done.fetch_add(1, Ordering::Relaxed) + 1 == 1000
                    && let Ok(mut at) = first_thousand.lock()
                {
                    *at = Some(started.elapsed());
                }
                reply
            }
        }))
        .await;
        for outcome in replies.iter().flatten() {
            failures += outcome.failures.len();
            let seen = outcome
                .event_value()
                .and_then(|e| e["properties"]["host_seen"].as_str().map(str::to_owned));
            if seen.as_deref() != Some("a.b") {
                bail!(
                    "round {round}: an event came back without host_seen: {:?}",
                    outcome.event
                );
            }
        }
        first_round_done.get_or_insert(started.elapsed());
    }
    let ready = first_round_done.unwrap_or_default();
    let all_done = started.elapsed();
    let stats = pool.stats();
    if failures > 0 || outputs.config_errors.load(Ordering::Relaxed) > 0 {
        bail!("{failures} failures during boot");
    }
    println!(
        "{}",
        json!({
            "measurement": "boot",
            "layout": value_name(layout),
            "configs": config_count,
            "plugins": plugin_count,
            "teams": teams.len(),
            "workers": workers,
            "registry_load_s": round3(registry_loaded.as_secs_f64()),
            "pool_start_s": round3((pool_started - registry_loaded).as_secs_f64()),
            "first_events_s": round3((ready - pool_started).as_secs_f64()),
            "ready_s": round3(ready.as_secs_f64()),
            "rounds": rounds,
            "all_rounds_s": round3(all_done.as_secs_f64()),
            "first_1000_teams_s": first_thousand
                .lock()
                .ok()
                .and_then(|at| at.map(|at| round3(at.as_secs_f64()))),
            "budget_mb": budget_mb,
            "live_vms": stats["vms"],
            "vms_torn_down": stats["vms_torn_down"],
            "rss_delta_mb": round3(rss_bytes()?.saturating_sub(rss_before) as f64 / 1_048_576.0),
            "worker_processes": in_processes,
            // With worker processes, each one's peak added (an upper bound of the whole's).
            "peak_rss_mb": round3(plugin_server_bench::process::tree_peak_rss_kib(std::process::id()).unwrap_or(0) as f64 / 1024.0),
        })
    );
    Ok(())
}

/// The name clap parses for a value (`prelude`).
fn value_name(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}
