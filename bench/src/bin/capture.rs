//! The embedded default's path, end to end: events posted to `/batch` as posthog-python sends
//! them (100 events per request, gzip, `Content-Encoding: gzip`) by a few concurrent clients,
//! every event `$set`ting its person, against a fresh `BASE_DIR` per server binary. A 200 means
//! the events and the state they changed are on disk, so this measures durable ingestion.
//!
//!   capture --server A,B [--events 100000] [--per-request 100] [--clients 4] [--users 10000]
//!
//! Reports per binary: events/s, server CPU per event, request latency p50/p99 and peak RSS.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use plugin_server_bench::process::{
    clock_ticks_per_second, load_average, stop_gracefully, tree_peak_rss_kib, tree_ticks,
};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
struct Args {
    /// The server binaries (release builds), comma-separated, run one after the other.
    #[arg(long, value_delimiter = ',')]
    server: Vec<PathBuf>,
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Events per request (posthog-python's batch size).
    #[arg(long, default_value_t = 100)]
    per_request: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Distinct ids the events are spread over.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
}

struct Server {
    child: Child,
    pid: u32,
    addr: String,
}

impl Server {
    fn start(binary: &Path, base_dir: &Path) -> Result<Self> {
        let mut child = Command::new(binary)
            .env_clear()
            .env("BASE_DIR", base_dir)
            .env("HTTP_SERVER_HOST", "127.0.0.1")
            .env("HTTP_SERVER_PORT", "0")
            .env("LOG_FORMAT", "json")
            .env("PLUGINS_CONFIG_FILE", "/nonexistent/plugins.toml")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| binary.display().to_string())?;
        let stderr = child.stderr.take().context("server stderr")?;
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(log) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if log["fields"]["message"] == "plugin server started" {
                    let addr = log["fields"]["local_addr"].as_str().unwrap_or_default();
                    let _ = sender.send(addr.to_owned());
                } else if log["level"] == "ERROR" {
                    eprintln!("server: {line}");
                }
            }
        });
        let addr = receiver
            .recv_timeout(Duration::from_secs(60))
            .context("the server did not start within 60 s")?;
        let pid = child.id();
        Ok(Self { child, pid, addr })
    }

    fn stop(mut self) -> Result<()> {
        if !stop_gracefully(&mut self.child)? {
            bail!("the server did not stop within 30 s");
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The requests' gzip bodies, made before the clock starts.
fn bodies(args: &Args) -> Result<Vec<Vec<u8>>> {
    let mut bodies = Vec::new();
    let mut index = 0;
    while index < args.events {
        let batch: Vec<Value> = (index..(index + args.per_request).min(args.events))
            .map(|i| {
                json!({
                    "event": "$pageview",
                    "distinct_id": format!("user-{}", i % args.users),
                    "properties": {
                        "$current_url": format!("https://example.com/p/{}", i % 100),
                        "i": i,
                        "$set": {"last_i": i},
                    },
                })
            })
            .collect();
        index += batch.len();
        let body = json!({"api_key": "phc_capture_bench", "batch": batch}).to_string();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(body.as_bytes())?;
        bodies.push(encoder.finish()?);
    }
    Ok(bodies)
}

struct Outcome {
    events_per_second: f64,
    cpu_us_per_event: f64,
    p50_ms: f64,
    p99_ms: f64,
    peak_rss_mib: f64,
}

async fn run(binary: &Path, args: &Args, bodies: Arc<Vec<Vec<u8>>>) -> Result<Outcome> {
    let base = tempfile::tempdir()?;
    let server = Server::start(binary, base.path())?;
    let url = format!("http://{}/batch", server.addr);
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let ticks_before = tree_ticks(server.pid).context("server CPU")?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let (client, url, next, bodies) = (
            client.clone(),
            url.clone(),
            Arc::clone(&next),
            Arc::clone(&bodies),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(index) else {
                    return Ok::<_, anyhow::Error>(latencies);
                };
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .header("Content-Encoding", "gzip")
                    .header("Content-Type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!("request {index}: {}", response.status());
                }
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ticks = tree_ticks(server.pid).context("server CPU")? - ticks_before;
    let peak = tree_peak_rss_kib(server.pid).unwrap_or(0);
    server.stop()?;
    latencies.sort_by(f64::total_cmp);
    let percentile = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok(Outcome {
        events_per_second: args.events as f64 / elapsed,
        cpu_us_per_event: ticks as f64 / clock_ticks_per_second() * 1e6 / args.events as f64,
        p50_ms: percentile(0.5),
        p99_ms: percentile(0.99),
        peak_rss_mib: peak as f64 / 1024.0,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if args.server.is_empty() {
        bail!("--server: at least one binary");
    }
    println!(
        "machine: nproc={} load={}",
        std::thread::available_parallelism().map_or(0, usize::from),
        load_average()
    );
    println!(
        "{} events, {} per gzip request, {} clients, {} users, each event $sets its person",
        args.events, args.per_request, args.clients, args.users
    );
    let bodies = Arc::new(bodies(&args)?);
    println!(
        "| server | events/s | server CPU µs / event | request p50 ms | request p99 ms | peak RSS MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for binary in &args.server {
        let outcome = run(binary, &args, Arc::clone(&bodies)).await?;
        let name = binary.file_name().map_or_else(
            || binary.display().to_string(),
            |name| name.to_string_lossy().into_owned(),
        );
        println!(
            "| {name} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
            outcome.events_per_second,
            outcome.cpu_us_per_event,
            outcome.p50_ms,
            outcome.p99_ms,
            outcome.peak_rss_mib
        );
    }
    Ok(())
}
