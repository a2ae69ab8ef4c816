//! The whole benchmark in one run, written up: every ingestion scenario of `ingest` (no
//! plugins, one plugin, ten plugins per team, persons written, reload under load) next to the
//! naive peer, and the plugin runtime's boot of 1,000 configs and memory per config from
//! `plugin_vm`, into a Markdown report with the machine, commit and build profile, and an SVG
//! plot of throughput and p99 latency per scenario.
//!
//!     bash bench/report.sh            # builds, starts the services, runs this
//!
//! Every figure in the report is measured in this run; nothing is carried over.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(about = "Runs every benchmark and writes bench/results/report.md and report.svg")]
struct Args {
    /// Events in each scenario's backlog.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// The server binary (a release build).
    #[arg(long, default_value = "target/release/plugin-server")]
    server: PathBuf,
    /// Where report.md and report.svg go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Seconds of steady production per scenario for the latency figures.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Boot runs of 1,000 configs (the median is reported).
    #[arg(long, default_value_t = 3)]
    boot_runs: usize,
    #[arg(long)]
    skip_peer: bool,
}

const SCENARIOS: &str = "baseline,plugin,plugins10,persons,reload";

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.server.exists(),
        "{} not found: cargo build --release -p plugin-server",
        args.server.display()
    );
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("the binary's directory")?
        .to_path_buf();
    let machine = Machine::read()?;
    println!("{}", machine.lines().join("\n"));

    let ingest_json =
        std::env::temp_dir().join(format!("report-ingest-{}.json", std::process::id()));
    let mut ingest = Command::new(bin_dir.join("ingest"));
    ingest
        .arg("--events")
        .arg(args.events.to_string())
        .arg("--batch-sizes")
        .arg("900000")
        .arg("--server")
        .arg(&args.server)
        .arg("--scenarios")
        .arg(SCENARIOS)
        .arg("--latency-seconds")
        .arg(args.latency_seconds.to_string())
        .arg("--json")
        .arg(&ingest_json);
    if args.skip_peer {
        ingest.arg("--skip-peer");
    }
    run_streaming(&mut ingest)?;
    let ingestion: Value = serde_json::from_str(
        &std::fs::read_to_string(&ingest_json).context("the ingest results")?,
    )?;
    let _ = std::fs::remove_file(&ingest_json);

    let plugin_vm = bin_dir.join("plugin_vm");
    let workers = machine.nproc.to_string();
    let mut boots = Vec::new();
    for _ in 0..args.boot_runs {
        boots.push(last_json_line(Command::new(&plugin_vm).args([
            "boot",
            "--configs",
            "1000",
            "--workers",
            &workers,
            "--layout",
            "teams",
        ]))?);
    }
    let memory = last_json_line_matching(
        Command::new(&plugin_vm).args(["memory", "--vms", "1000", "--variant", "plugin"]),
        "memory",
    )?;

    let rows = scenario_rows(&ingestion)?;
    let peer = ingestion["peer_events_per_second"].as_f64();
    std::fs::create_dir_all(&args.out)?;
    let svg = plot(&rows, peer);
    std::fs::write(args.out.join("report.svg"), svg)?;
    let markdown = report(&args, &machine, &rows, peer, &boots, &memory);
    std::fs::write(args.out.join("report.md"), &markdown)?;
    println!("\n{markdown}");
    println!(
        "written: {} and {}",
        args.out.join("report.md").display(),
        args.out.join("report.svg").display()
    );
    Ok(())
}

/// Runs a child with its output passed through, failing on a non-zero exit.
fn run_streaming(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("start {command:?}"))?;
    ensure!(status.success(), "{command:?} failed: {status}");
    Ok(())
}

fn last_json_line(command: &mut Command) -> Result<Value> {
    last_json_line_matching(command, "")
}

/// The last JSON line of the child's stdout whose `measurement` is `measurement` (any when
/// empty).
fn last_json_line_matching(command: &mut Command, measurement: &str) -> Result<Value> {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {command:?}"))?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut found = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Ok(value) = serde_json::from_str::<Value>(&line)
            && (measurement.is_empty() || value["measurement"] == measurement)
        {
            found = Some(value);
        }
    }
    let status = child.wait()?;
    ensure!(status.success(), "{command:?} failed: {status}");
    found.with_context(|| format!("{command:?} printed no {measurement} result"))
}

struct Machine {
    nproc: usize,
    cpu: String,
    memory: String,
    kernel: String,
    load: String,
    rustc: String,
    commit: String,
    dirty: bool,
    date: String,
}

impl Machine {
    fn read() -> Result<Self> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |text: &str, name: &str| {
            text.lines()
                .find(|line| line.starts_with(name))
                .and_then(|line| line.split_once(':'))
                .map(|(_, value)| value.trim().to_owned())
                .unwrap_or_default()
        };
        let output = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .output()
                .ok()
                .filter(|out| out.status.success())
                .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        let commit = output("git", &["rev-parse", "--short=12", "HEAD"]);
        if commit.is_empty() {
            bail!("not in a git checkout: the report names the commit it measured");
        }
        Ok(Self {
            nproc: std::thread::available_parallelism().map_or(1, usize::from),
            cpu: field(&cpuinfo, "model name"),
            memory: field(&meminfo, "MemTotal"),
            kernel: output("uname", &["-r"]),
            load: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            rustc: output("rustc", &["--version"]),
            dirty: !output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty(),
            commit,
            date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        })
    }

    fn lines(&self) -> Vec<String> {
        vec![
            format!("- Date: {}", self.date),
            format!(
                "- Commit: `{}`{}",
                self.commit,
                if self.dirty {
                    " plus uncommitted changes"
                } else {
                    ""
                }
            ),
            format!(
                "- Machine: {} cores ({}), {} memory, Linux {}; load average at the start {}",
                self.nproc, self.cpu, self.memory, self.kernel, self.load
            ),
            format!(
                "- Build: release profile of the workspace (`cargo build --release`), {}",
                self.rustc
            ),
        ]
    }
}

/// One scenario's figures, from `ingest --json`.
struct Row {
    scenario: String,
    events_per_second: f64,
    cpu_per_1000: f64,
    peak_rss_mib: f64,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    seen: String,
    reloads: Option<u64>,
}

fn scenario_rows(ingestion: &Value) -> Result<Vec<Row>> {
    let results = ingestion["results"]
        .as_array()
        .context("no results in the ingest output")?;
    let number = |value: &Value| value.as_f64().unwrap_or(f64::NAN);
    Ok(results
        .iter()
        .map(|result| {
            let latency = &result["latency"];
            Row {
                scenario: result["scenario"].as_str().unwrap_or("?").to_owned(),
                events_per_second: number(&result["events_per_second"]),
                cpu_per_1000: number(&result["server_cpu_seconds_per_1000"]),
                peak_rss_mib: number(&result["peak_rss_mib"]),
                rate: number(&latency["rate"]),
                p50_ms: number(&latency["p50_ms"]),
                p99_ms: number(&latency["p99_ms"]),
                seen: format!("{}/{}", latency["seen"], latency["markers"]),
                reloads: latency["reloads"].as_u64(),
            }
        })
        .collect())
}

fn describe(scenario: &str) -> &'static str {
    match scenario {
        "baseline" => "no plugins; persons looked up",
        "plugin" => "one small processEvent plugin",
        "plugins10" => "ten plugins in the team's chain",
        "persons" => "no plugins; every event `$set`s its person",
        "reload" => "one plugin, changed and reloaded every second",
        _ => "",
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn report(
    args: &Args,
    machine: &Machine,
    rows: &[Row],
    peer: Option<f64>,
    boots: &[Value],
    memory: &Value,
) -> String {
    let mut out = String::new();
    out.push_str("# Benchmark report\n\n");
    out.push_str(
        "Written by `bash bench/report.sh` (the `report` binary): every figure below was measured \
         in this one run. The machine is shared and noisy; compare within the run.\n\n",
    );
    for line in machine.lines() {
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!(
        "- Command: `bash bench/report.sh` (`report --events {} --latency-seconds {} --boot-runs {}`)\n\n",
        args.events, args.latency_seconds, args.boot_runs
    ));
    out.push_str("![throughput and p99 latency per scenario](report.svg)\n\n");
    out.push_str("## Ingestion: Kafka backlog → plugin-server → ClickHouse\n\n");
    out.push_str(&format!(
        "Each scenario is a fresh deployment (Postgres and ClickHouse databases, topic) with a \
         backlog of {} events, `KAFKA_MAX_MESSAGE_BATCH_SIZE` 900000, all other settings \
         PostHog's defaults. Throughput is from the consumer's partition assignment to the last \
         row in ClickHouse. Latency is produce-to-stored of marker events at a steady rate of at \
         most half the scenario's throughput (20,000 events/s at most) for {} s.\n\n",
        args.events, args.latency_seconds
    ));
    out.push_str(
        "| scenario | what | events/s | × naive peer | server CPU s / 1000 events | peak RSS MiB | latency rate ev/s | p50 ms | p99 ms | markers seen | reloads |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let ratio = peer.map_or("n/a".to_owned(), |peer| {
            format!("{:.2}", row.events_per_second / peer)
        });
        out.push_str(&format!(
            "| {} | {} | {:.0} | {} | {:.3} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |\n",
            row.scenario,
            describe(&row.scenario),
            row.events_per_second,
            ratio,
            row.cpu_per_1000,
            row.peak_rss_mib,
            row.rate,
            row.p50_ms,
            row.p99_ms,
            row.seen,
            row.reloads.map_or(String::new(), |n| n.to_string()),
        ));
    }
    match peer {
        Some(peer) => out.push_str(&format!(
            "| naive peer | Python: consume, merge, insert (`shared/bench/naive_pipeline.py`) | {peer:.0} | 1.00 | | | | | | | |\n"
        )),
        None => out.push_str("\nThe naive peer was skipped in this run (`--skip-peer`).\n"),
    }
    let readies: Vec<f64> = boots
        .iter()
        .filter_map(|boot| boot["ready_s"].as_f64())
        .collect();
    out.push_str("\n## Plugin runtime\n\n");
    out.push_str(&format!(
        "- Boot with 1,000 plugin configs (1,000 teams × 1 config, {} worker threads; registry \
         load, pool start, then one event per team until every VM is built, set up and has \
         answered): median **{:.2} s** of {} runs ({}).\n",
        machine.nproc,
        median(readies.clone()),
        readies.len(),
        readies
            .iter()
            .map(|s| format!("{s:.2} s"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out.push_str(&format!(
        "- Resident memory per plugin config with 1,000 loaded (each called once, after GC): \
         **{} MB**; creating one VM: {} ms.\n",
        memory["rss_mb_per_vm"], memory["create_ms_per_vm"]
    ));
    out.push_str(
        "\nThe vm2 peer for the plugin runtime is run by hand (see `bench/results/plugins.md`), \
         since it needs Node and vm2 installed.\n",
    );
    out
}

/// Two horizontal bar charts, one under the other: events/s and p99 ms per scenario.
fn plot(rows: &[Row], peer: Option<f64>) -> String {
    let mut throughput: Vec<(String, f64)> = rows
        .iter()
        .map(|row| (row.scenario.clone(), row.events_per_second))
        .collect();
    if let Some(peer) = peer {
        throughput.push(("naive peer".to_owned(), peer));
    }
    let latency: Vec<(String, f64)> = rows
        .iter()
        .map(|row| (row.scenario.clone(), row.p99_ms))
        .collect();
    let row_height = 26.0;
    let panel = |title: &str, bars: &[(String, f64)], unit: &str, top: f64, color: &str| {
        let max = bars
            .iter()
            .map(|(_, value)| *value)
            .filter(|value| value.is_finite())
            .fold(0.0_f64, f64::max)
            .max(1.0);
        let mut svg = format!(
            r#"<text x="10" y="{:.0}" font-size="15" font-weight="bold">{}</text>"#,
            top + 18.0,
            escape(title)
        );
        for (index, (label, value)) in bars.iter().enumerate() {
            let y = top + 30.0 + index as f64 * row_height;
            let width = if value.is_finite() {
                value / max * 560.0
            } else {
                0.0
            };
            svg.push_str(&format!(
                r#"<text x="150" y="{:.0}" font-size="13" text-anchor="end">{}</text><rect x="160" y="{:.0}" width="{width:.1}" height="18" fill="{color}"/><text x="{:.0}" y="{:.0}" font-size="12">{} {unit}</text>"#,
                y + 14.0,
                escape(label),
                y,
                160.0 + width + 6.0,
                y + 14.0,
                if value.is_finite() { format!("{value:.0}") } else { "n/a".to_owned() },
            ));
        }
        (svg, 30.0 + bars.len() as f64 * row_height + 20.0)
    };
    let (first, first_height) = panel(
        "Throughput (events/s, higher is better)",
        &throughput,
        "ev/s",
        0.0,
        "#1d4aff",
    );
    let (second, second_height) = panel(
        "p99 produce-to-stored latency at a steady rate (ms, lower is better)",
        &latency,
        "ms",
        first_height,
        "#f54e00",
    );
    let height = first_height + second_height;
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="860" height="{height:.0}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>{first}{second}</svg>
"#
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
