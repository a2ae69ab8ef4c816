//! End-to-end ingestion benchmark: a Kafka backlog through the release `plugin-server` into
//! ClickHouse, next to the naive Python peer (`/work/shared/bench/naive_pipeline.py`) run on
//! the same services in the same run.
//!
//!     cargo build --release -p plugin-server -p plugin-server-bench
//!     eval "$(bash docker/services.sh env)"
//!     target/release/ingest --events 500000 --batch-sizes 900000,16000000 --out /tmp/ingest-bench
//!
//! For each `KAFKA_MAX_MESSAGE_BATCH_SIZE` it deploys a fresh server (Postgres database with
//! team 2, ClickHouse database, topic prefix), produces N events shaped exactly like the peer's
//! (same JSON bytes) as a backlog, starts the server and measures:
//! - throughput: N / (consumer's partitions assigned → all N rows in ClickHouse). The peer's
//!   clock starts at its first consumed batch, so ours also counts the first fetch;
//! - CPU seconds per 1,000 events (server, and ClickHouse and the broker next to it) and peak
//!   RSS (VmHWM) over that window;
//! - produce-to-stored latency at a steady rate, from marker events polled in ClickHouse.
//!
//! Everything it creates (databases, topics, the server) is removed at the end, also on error.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use plugin_server_bench::process::{
    clock_ticks_per_second, load_average, process_ticks, signal, stop_gracefully,
    tree_peak_rss_kib, tree_ticks,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use serde_json::Value;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(about = "End-to-end ingestion benchmark against the local services")]
struct Args {
    /// Events in the backlog (the peer gets the same number).
    #[arg(long, default_value_t = 500_000)]
    events: usize,
    /// KAFKA_MAX_MESSAGE_BATCH_SIZE values to run, one fresh deployment each.
    #[arg(long, value_delimiter = ',', default_value = "900000,16000000")]
    batch_sizes: Vec<u64>,
    /// The server binaries (release builds), comma-separated; each runs every batch size, so
    /// two builds (e.g. before and after a change) are compared within one run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "target/release/plugin-server"
    )]
    server: Vec<PathBuf>,
    /// Events per second in the latency phase (every 100th is a marker).
    #[arg(long, default_value_t = 20_000)]
    latency_rate: u64,
    /// Seconds of steady production in the latency phase (0 skips it).
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Milliseconds between ClickHouse polls for markers.
    #[arg(long, default_value_t = 20)]
    poll_ms: u64,
    #[arg(long, default_value = "/work/shared/bench/naive_pipeline.py")]
    peer: PathBuf,
    #[arg(long)]
    skip_peer: bool,
    /// Record a `perf` profile of the server during the backlog into this directory. Perf
    /// costs CPU, so use it in a separate run from the one whose numbers are reported.
    #[arg(long)]
    perf: Option<PathBuf>,
    /// Sampling options for `perf record`. DWARF unwinding works from .eh_frame, which
    /// release builds keep (panic = unwind), so call stacks come out without debug info;
    /// use e.g. "-F 1999" for a cheaper flat profile with more samples.
    #[arg(
        long,
        default_value = "-F 199 --call-graph dwarf,16384",
        allow_hyphen_values = true
    )]
    perf_args: String,
    /// Directory for the server logs and the raw `/_metrics` scrapes.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Extra server env, KEY=VALUE (repeatable), e.g. KAFKA_FLUSH_FREQUENCY_MS=100.
    #[arg(long = "env")]
    extra_env: Vec<String>,
    /// What each deployment runs: baseline, plugin, plugins10, persons, reload (each runs for
    /// every server and batch size).
    #[arg(long, value_delimiter = ',', default_value = "baseline")]
    scenarios: Vec<Scenario>,
    /// Also write every result (and the peer's) as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Properties to add to each event the servers get, as a web SDK's events carry 30 to 40
    /// (`w0`..). The peer's events stay as they are: with this, compare servers only.
    #[arg(long, default_value_t = 0)]
    wide: usize,
}

/// What a deployment runs besides the backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    /// No plugins; events set no person properties (persons are looked up, rarely written).
    Baseline,
    /// The vm2 peer's small processEvent plugin for the team.
    Plugin,
    /// Ten configs of that plugin in the team's chain.
    Plugins10,
    /// No plugins; every event `$set`s a property, so each one updates its person.
    Persons,
    /// As `plugin`, and during the latency phase the plugin changes and `reload-plugins` is
    /// published every second (the server gets REDIS_URL for it).
    Reload,
}

impl Scenario {
    fn plugin_configs(self) -> i32 {
        match self {
            Self::Plugin | Self::Reload => 1,
            Self::Plugins10 => 10,
            Self::Baseline | Self::Persons => 0,
        }
    }

    fn sets_persons(self) -> bool {
        self == Self::Persons
    }

    fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map_or_else(String::new, |value| value.get_name().to_owned())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    // reqwest is built without a default TLS provider (the workspace's rustls-no-provider);
    // only plain HTTP is used here, but building a client still needs one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    for server in &args.server {
        ensure!(
            server.exists(),
            "{} not found: cargo build --release -p plugin-server",
            server.display()
        );
    }
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    }
    if let Some(perf) = &args.perf {
        std::fs::create_dir_all(perf).with_context(|| format!("create {}", perf.display()))?;
    }
    let services = Services::from_env()?;
    let clock_ticks = clock_ticks_per_second();
    println!(
        "machine: nproc={} load={}",
        std::thread::available_parallelism().map_or(0, usize::from),
        load_average()
    );

    let peer = if args.skip_peer {
        None
    } else {
        Some(run_peer(&args, &services).await?)
    };
    if let Some(peer) = &peer {
        println!("peer: {peer}");
    }

    let mut results = Vec::new();
    for &scenario in &args.scenarios {
        for server in &args.server {
            for &batch_size in &args.batch_sizes {
                println!(
                    "\n== {} {} KAFKA_MAX_MESSAGE_BATCH_SIZE={batch_size} ==",
                    scenario.name(),
                    server.display()
                );
                let deployment = Deployment::create(&services, server, scenario).await?;
                let result = run_scenario(
                    &services,
                    &args,
                    server,
                    &deployment,
                    batch_size,
                    clock_ticks,
                )
                .await;
                deployment.remove(&services).await;
                let result = result?;
                println!("{}", serde_json::to_string_pretty(&result)?);
                results.push(result);
            }
        }
    }

    println!("\nload after: {}", load_average());
    print_table(&results, peer.as_ref());
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "machine": {
                "nproc": std::thread::available_parallelism().map_or(0, usize::from),
            },
            "peer_events_per_second": peer.as_ref().map(|peer| peer.events_per_second),
            "results": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| path.display().to_string())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Services and deployments

struct Services {
    /// `postgres://user@host:port`, without a database.
    postgres_server: String,
    clickhouse: String,
    kafka: String,
    /// For the reload scenario.
    redis: Option<String>,
    http: reqwest::Client,
}

impl Services {
    fn from_env() -> Result<Self> {
        let var = |name: &str| {
            std::env::var(name)
                .with_context(|| format!("{name} unset: eval \"$(bash docker/services.sh env)\""))
        };
        let database_url = var("DATABASE_URL")?;
        let postgres_server = match database_url.rsplit_once('/') {
            Some((server, _)) if server.contains("://") && !server.ends_with('/') => {
                server.to_owned()
            }
            _ => database_url,
        };
        let host = var("CLICKHOUSE_HOST")?;
        let clickhouse = if host.contains("://") {
            host
        } else {
            format!("http://{host}")
        };
        Ok(Self {
            postgres_server,
            clickhouse,
            kafka: var("KAFKA_HOSTS")?,
            redis: std::env::var("REDIS_URL").ok(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
        })
    }

    async fn clickhouse(&self, sql: &str) -> Result<String> {
        let response = self
            .http
            .post(&self.clickhouse)
            .body(sql.to_owned())
            .send()
            .await
            .with_context(|| format!("ClickHouse: {sql}"))?;
        let status = response.status();
        let body = response.text().await?;
        ensure!(status.is_success(), "ClickHouse: {sql}: {status}: {body}");
        Ok(body)
    }

    async fn postgres(&self, database: &str) -> Result<tokio_postgres::Client> {
        let url = format!("{}/{database}", self.postgres_server);
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connect to {url}"))?;
        tokio::spawn(connection);
        Ok(client)
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &self.kafka)
            .create()?)
    }

    async fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        let results = self
            .admin()?
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await?;
        for result in results {
            result.map_err(|(topic, code)| anyhow::anyhow!("create topic {topic}: {code}"))?;
        }
        Ok(())
    }

    /// Deleting matters on this broker: tansu keeps every message in memory.
    async fn delete_topics(&self, topics: &[&str]) {
        if topics.is_empty() {
            return;
        }
        let deleted = match self.admin() {
            Ok(admin) => admin.delete_topics(topics, &AdminOptions::new()).await,
            Err(error) => {
                eprintln!("cleanup: no admin client: {error}");
                return;
            }
        };
        if let Err(error) = deleted {
            eprintln!("cleanup: delete topics {topics:?}: {error}");
        }
    }

    fn topic_names(&self) -> Result<HashSet<String>> {
        let admin = self.admin()?;
        let metadata = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))?;
        Ok(metadata
            .topics()
            .iter()
            .map(|topic| topic.name().to_owned())
            .collect())
    }
}

/// One fresh server deployment: its own Postgres database, ClickHouse database and topics.
struct Deployment {
    name: String,
    prefix: String,
    topic: String,
    scenario: Scenario,
}

impl Deployment {
    const TEAM_ID: i32 = 2;

    async fn create(services: &Services, server: &Path, scenario: Scenario) -> Result<Self> {
        let id = Uuid::new_v4().simple().to_string();
        let name = format!("bench_{}", &id[..12]);
        let prefix = format!("{name}_");
        let deployment = Self {
            topic: format!("{prefix}events_plugin_ingestion"),
            name,
            prefix,
            scenario,
        };
        // Everything below is undone by `remove`, which tolerates a half-made deployment.
        if let Err(error) = deployment.set_up(services, server).await {
            deployment.remove(services).await;
            return Err(error);
        }
        Ok(deployment)
    }

    async fn set_up(&self, services: &Services, server: &Path) -> Result<()> {
        services
            .postgres("postgres")
            .await?
            .batch_execute(&format!("CREATE DATABASE {}", self.name))
            .await
            .context("create the Postgres database")?;
        let migrated = Command::new(server)
            .env_clear()
            .envs(self.base_env(services))
            .arg("--migrate")
            .output()
            .context("run --migrate")?;
        ensure!(
            migrated.status.success(),
            "--migrate failed: {}",
            String::from_utf8_lossy(&migrated.stderr)
        );
        let client = services.postgres(&self.name).await?;
        let organization: Uuid = client
            .query_one(
                "INSERT INTO posthog_organization (id, name) VALUES (gen_random_uuid(), 'Bench') RETURNING id",
                &[],
            )
            .await?
            .get(0);
        // The peer's events carry `team_id: 2` and no token, so the team must have id 2.
        client
            .execute(
                "INSERT INTO posthog_team (id, organization_id, api_token, name) VALUES ($1, $2, $3, 'Bench')",
                &[&Self::TEAM_ID, &organization, &format!("phc_{}", self.name)],
            )
            .await
            .context("insert team 2")?;
        let configs = self.scenario.plugin_configs();
        if configs > 0 {
            client
                .execute(
                    "INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, updated_at)
                     VALUES (1, $1, 'source', 'bench', now())",
                    &[&organization],
                )
                .await
                .context("insert the plugin")?;
            client
                .execute(
                    "INSERT INTO posthog_pluginsourcefile (plugin_id, filename, source) VALUES (1, 'index.js', $1)",
                    &[&plugin_server_bench::BENCH_PLUGIN],
                )
                .await
                .context("insert the plugin's source")?;
            // An empty suffix keeps the event names, which the latency markers are found by.
            for order in 1..=configs {
                client
                    .execute(
                        "INSERT INTO posthog_pluginconfig (team_id, plugin_id, enabled, \"order\", config)
                         VALUES ($1, 1, true, $2, '{\"suffix\": \"\"}')",
                        &[&Self::TEAM_ID, &order],
                    )
                    .await
                    .context("insert a plugin config")?;
            }
        }
        services.create_topic(&self.topic, 2).await
    }

    fn base_env(&self, services: &Services) -> Vec<(String, String)> {
        vec![
            (
                "DATABASE_URL".to_owned(),
                format!("{}/{}", services.postgres_server, self.name),
            ),
            ("CLICKHOUSE_HOST".to_owned(), services.clickhouse.clone()),
            ("CLICKHOUSE_DATABASE".to_owned(), self.name.clone()),
        ]
    }

    fn server_env(
        &self,
        services: &Services,
        batch_size: u64,
        extra: &[String],
    ) -> Result<Vec<(String, String)>> {
        let mut env = self.base_env(services);
        env.extend(
            [
                ("KAFKA_HOSTS", services.kafka.as_str()),
                ("KAFKA_PREFIX", self.prefix.as_str()),
                // Fast group joins on tansu; no effect on the steady state.
                ("KAFKA_SESSION_TIMEOUT_MS", "1000"),
                ("HTTP_SERVER_HOST", "127.0.0.1"),
                ("HTTP_SERVER_PORT", "0"),
                ("LOG_FORMAT", "json"),
            ]
            .map(|(key, value)| (key.to_owned(), value.to_owned())),
        );
        env.push((
            "KAFKA_MAX_MESSAGE_BATCH_SIZE".to_owned(),
            batch_size.to_string(),
        ));
        if self.scenario == Scenario::Reload {
            let redis = services
                .redis
                .clone()
                .context("the reload scenario needs REDIS_URL")?;
            env.push(("REDIS_URL".to_owned(), redis));
            // Its own reload channel, so that nothing else on this Redis reloads it.
            env.push(("CLUSTER_PREFIX".to_owned(), format!("{}:", self.name)));
        }
        for pair in extra {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("--env {pair}: expected KEY=VALUE"))?;
            env.push((key.to_owned(), value.to_owned()));
        }
        Ok(env)
    }

    /// Best effort: a failure is printed, never hides the benchmark's own error.
    async fn remove(&self, services: &Services) {
        // The server creates its output topics (dead letters, ...) under the same prefix.
        let mut topics = services
            .topic_names()
            .unwrap_or_default()
            .into_iter()
            .filter(|topic| topic.starts_with(&self.prefix))
            .collect::<Vec<_>>();
        if !topics.contains(&self.topic) {
            topics.push(self.topic.clone());
        }
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        services.delete_topics(&topics).await;
        if let Err(error) = services
            .clickhouse(&format!("DROP DATABASE IF EXISTS {}", self.name))
            .await
        {
            eprintln!("cleanup: {error:#}");
        }
        let dropped = async {
            services
                .postgres("postgres")
                .await?
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await?;
            anyhow::Ok(())
        };
        if let Err(error) = dropped.await {
            eprintln!("cleanup: drop Postgres database {}: {error:#}", self.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Producing the peer's events

/// Counts failed deliveries, so that a lost message fails the run instead of hanging it.
#[derive(Default)]
struct DeliveryLog {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

struct Counting(Arc<DeliveryLog>);

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.0.failed.fetch_add(1, Ordering::Relaxed);
            self.0
                .first_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert_with(|| error.to_string());
        }
    }
}

struct EventProducer {
    producer: ThreadedProducer<Counting>,
    log: Arc<DeliveryLog>,
    topic: String,
}

impl EventProducer {
    fn new(kafka: &str, topic: &str) -> Result<Self> {
        let log = Arc::new(DeliveryLog::default());
        // The peer's producer settings (linger 5 ms); a larger queue so the backlog is
        // produced without stalling on QueueFull.
        let producer = ClientConfig::new()
            .set("bootstrap.servers", kafka)
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .create_with_context(Counting(Arc::clone(&log)))?;
        Ok(Self {
            producer,
            log,
            topic: topic.to_owned(),
        })
    }

    fn send(&self, key: &str, payload: &[u8]) -> Result<()> {
        let mut record = BaseRecord::to(&self.topic).key(key).payload(payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }

    fn flush(&self) -> Result<()> {
        self.producer.flush(Duration::from_secs(120))?;
        let failed = self.log.failed.load(Ordering::Relaxed);
        if failed > 0 {
            let first = self
                .log
                .first_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            bail!("{failed} messages not delivered, first: {first:?}");
        }
        Ok(())
    }
}

/// The peer's message `i`, byte for byte what its `json.dumps` produces (", " and ": "
/// separators), so both pipelines parse the same input.
/// The peer's event `i`; with `set_person`, it also `$set`s a property of its person.
fn peer_message(
    i: usize,
    event: &str,
    uuid: &Uuid,
    now: &str,
    set_person: bool,
    wide: usize,
) -> Result<(String, Vec<u8>)> {
    let mut extra = if set_person {
        format!(r#", "$set": {{"last_i": {i}}}"#)
    } else {
        String::new()
    };
    for n in 0..wide {
        extra.push_str(&format!(r#", "w{n}": "value {n} of {}""#, i % 97));
    }
    let data = format!(
        r#"{{"event": "{event}", "properties": {{"i": {i}, "$current_url": "https://example.com/p?q=1", "blob": "{blob}"{extra}}}, "timestamp": "{now}"}}"#,
        blob = "x".repeat(i % 300),
    );
    let payload = format!(
        r#"{{"uuid": "{uuid}", "distinct_id": "user-{user}", "ip": "10.1.2.3", "team_id": 2, "now": "{now}", "sent_at": "{now}", "data": {data}}}"#,
        user = i % 10_000,
        data = serde_json::to_string(&data)?,
    );
    Ok(((i % 10_000).to_string(), payload.into_bytes()))
}

/// The peer's `now`: UTC to the second, ISO 8601 with `Z`.
fn peer_now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn produce_backlog(
    kafka: &str,
    topic: &str,
    events: usize,
    set_person: bool,
    wide: usize,
) -> Result<Duration> {
    let started = Instant::now();
    let producer = EventProducer::new(kafka, topic)?;
    let now = peer_now();
    for i in 0..events {
        let name = format!("e{}", i % 7);
        let (key, payload) = peer_message(i, &name, &Uuid::new_v4(), &now, set_person, wide)?;
        producer.send(&key, &payload)?;
    }
    producer.flush()?;
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------------------------
// The server process

enum LogEvent {
    Started(String),
    Assigned(Instant),
}

/// The running server; killed when dropped, so an error never leaves it behind.
struct Server {
    child: Child,
    pid: u32,
}

impl Server {
    fn spawn(
        binary: &Path,
        env: Vec<(String, String)>,
        log_file: Option<PathBuf>,
    ) -> Result<(Self, tokio::sync::mpsc::UnboundedReceiver<LogEvent>)> {
        let mut child = Command::new(binary)
            .env_clear()
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start the server")?;
        let stderr = child.stderr.take().context("server stderr")?;
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let mut file = match log_file {
            Some(path) => {
                Some(std::fs::File::create(&path).with_context(|| path.display().to_string())?)
            }
            None => None,
        };
        // A thread, not a task: the instant of "partitions assigned" starts the clock, so it is
        // taken as soon as the line is read rather than when the runtime gets to it.
        std::thread::spawn(move || {
            let mut warnings = 0usize;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(file) = file.as_mut() {
                    let _ = writeln!(file, "{line}");
                }
                let Ok(log) = serde_json::from_str::<Value>(&line) else {
                    eprintln!("server: {line}");
                    continue;
                };
                let message = log["fields"]["message"].as_str().unwrap_or_default();
                if message == "plugin server started" {
                    let addr = log["fields"]["local_addr"].as_str().unwrap_or_default();
                    let _ = sender.send(LogEvent::Started(addr.to_owned()));
                } else if message == "partitions assigned" {
                    let _ = sender.send(LogEvent::Assigned(Instant::now()));
                }
                if (log["level"] == "ERROR" || log["level"] == "WARN") && warnings < 20 {
                    warnings += 1;
                    eprintln!("server: {line}");
                }
            }
        });
        let pid = child.id();
        Ok((Self { child, pid }, receiver))
    }

    /// SIGTERM (a graceful drain), then SIGKILL if it has not exited within 30 s.
    fn stop(mut self) -> Result<()> {
        if !stop_gracefully(&mut self.child)? {
            eprintln!("server did not stop within 30 s; killing it");
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

// ---------------------------------------------------------------------------------------------
// CPU of the services from /proc (the server's own: `plugin_server_bench::process`)

/// The first process whose `comm` is exactly `name` (the services run one of each).
fn find_process(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == name).then_some(pid)
        })
}

/// utime + stime summed over every process whose `comm` is `name` (Postgres runs one process
/// per connection); `None` when there is none.
fn all_processes_ticks(name: &str) -> Option<u64> {
    let ticks: Vec<u64> = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == name).then(|| process_ticks(pid)).flatten()
        })
        .collect();
    (!ticks.is_empty()).then(|| ticks.iter().sum())
}

/// Busy and total jiffies of the whole machine, from the `cpu` line of /proc/stat.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|value| value.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    let idle = values.get(3)? + values.get(4)?;
    Some((total - idle, total))
}

#[derive(Clone, Copy)]
struct CpuSample {
    server: u64,
    clickhouse: Option<u64>,
    broker: Option<u64>,
    postgres: Option<u64>,
    machine: Option<(u64, u64)>,
}

struct Watched {
    server: u32,
    clickhouse: Option<u32>,
    broker: Option<u32>,
}

impl Watched {
    fn sample(&self) -> CpuSample {
        CpuSample {
            // With plugin worker processes, theirs too.
            server: tree_ticks(self.server).unwrap_or_default(),
            clickhouse: self.clickhouse.and_then(process_ticks),
            broker: self.broker.and_then(process_ticks),
            postgres: all_processes_ticks("postgres"),
            machine: machine_ticks(),
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct CpuUse {
    server_seconds: f64,
    clickhouse_seconds: Option<f64>,
    broker_seconds: Option<f64>,
    /// Every `postgres` process (the server and its connections' backends) that is alive at
    /// both ends of the window: a backend that exits in between loses its share.
    postgres_seconds: Option<f64>,
    /// Share of both cores busy (anything on the machine) over the window.
    machine_busy_percent: Option<f64>,
}

fn cpu_between(start: CpuSample, end: CpuSample, ticks: f64) -> CpuUse {
    let seconds = |a: Option<u64>, b: Option<u64>| Some((b? - a?) as f64 / ticks);
    CpuUse {
        server_seconds: (end.server - start.server) as f64 / ticks,
        clickhouse_seconds: seconds(start.clickhouse, end.clickhouse),
        broker_seconds: seconds(start.broker, end.broker),
        postgres_seconds: seconds(start.postgres, end.postgres),
        machine_busy_percent: match (start.machine, end.machine) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                Some(100.0 * (busy1 - busy0) as f64 / (total1 - total0) as f64)
            }
            _ => None,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// One scenario

#[derive(Debug, serde::Serialize)]
struct ScenarioResult {
    scenario: Scenario,
    /// The binary's file name.
    server: String,
    batch_size: u64,
    events: usize,
    produce_seconds: f64,
    /// Server start → consumer assigned its partitions (not counted in the throughput).
    startup_seconds: f64,
    /// Partitions assigned → every event in ClickHouse.
    drain_seconds: f64,
    events_per_second: f64,
    /// Partitions assigned → first rows visible (the first batch's trip).
    first_rows_seconds: f64,
    /// Rate between the first rows visible and the last: the steady state.
    steady_events_per_second: f64,
    cpu: CpuUse,
    server_cpu_seconds_per_1000: f64,
    peak_rss_mib: f64,
    /// Transactions committed or rolled back in the deployment's database during the drain
    /// (`pg_stat_database`): every statement the server ran outside an explicit transaction
    /// is one, so this counts its round trips that did work, all steps together (persons,
    /// groups, definitions, team lookups, job-queue polls).
    postgres_transactions: i64,
    postgres_transactions_per_batch: Option<f64>,
    metrics: Vec<(String, String)>,
    latency: Option<LatencyResult>,
}

async fn run_scenario(
    services: &Services,
    args: &Args,
    server_binary: &Path,
    deployment: &Deployment,
    batch_size: u64,
    ticks: f64,
) -> Result<ScenarioResult> {
    let events = args.events;
    let produce = {
        let topic = deployment.topic.clone();
        let kafka = services.kafka.clone();
        let set_person = deployment.scenario.sets_persons();
        let wide = args.wide;
        tokio::task::spawn_blocking(move || {
            produce_backlog(&kafka, &topic, events, set_person, wide)
        })
        .await??
    };
    println!("produced {events} events in {:.1} s", produce.as_secs_f64());

    // The scenario too: several scenarios of one server must not overwrite each other's files.
    let label = format!(
        "{}-{}-batch{batch_size}",
        server_binary
            .file_name()
            .map_or_else(String::new, |name| name.to_string_lossy().into_owned()),
        deployment.scenario.name(),
    );
    let log_file = args
        .out
        .as_ref()
        .map(|out| out.join(format!("server-{label}.log")));
    let env = deployment.server_env(services, batch_size, &args.extra_env)?;
    let spawned_at = Instant::now();
    let (server, mut logs) = Server::spawn(server_binary, env, log_file)?;
    let watched = Watched {
        server: server.pid,
        clickhouse: find_process("clickhouse-serv"),
        broker: find_process("tansu"),
    };

    let mut addr = None;
    let assigned_at = loop {
        let event = tokio::time::timeout(Duration::from_secs(60), logs.recv())
            .await
            .context("the server did not start consuming within 60 s")?
            .context("the server exited")?;
        match event {
            LogEvent::Started(local) => addr = Some(local),
            LogEvent::Assigned(at) => break at,
        }
    };
    let start_sample = watched.sample();
    let start_transactions = postgres_transactions(services, &deployment.name).await?;
    let addr = addr.context("no local_addr before the assignment")?;
    let perf = match &args.perf {
        Some(dir) => Some(start_perf(
            server.pid,
            &args.perf_args,
            &dir.join(format!("perf-{label}.data")),
        )?),
        None => None,
    };

    // Rows of the active parts: a metadata read, so polling does not load ClickHouse (on
    // 18.16 a bare count() reads a column).
    let rows_sql = format!(
        "SELECT sum(rows) FROM system.parts WHERE database = '{}' AND table = 'events' AND active FORMAT TSV",
        deployment.name
    );
    let mut first_rows: Option<(Instant, u64)> = None;
    let mut last_progress = (Instant::now(), 0u64);
    let drained_at = loop {
        let rows: u64 = services
            .clickhouse(&rows_sql)
            .await?
            .trim()
            .parse()
            .unwrap_or(0);
        let now = Instant::now();
        if rows > 0 && first_rows.is_none() {
            first_rows = Some((now, rows));
        }
        if rows >= events as u64 {
            break now;
        }
        if rows > last_progress.1 {
            last_progress = (now, rows);
        }
        ensure!(
            now.duration_since(last_progress.0) < Duration::from_secs(60),
            "no progress for 60 s at {rows} of {events} rows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let end_sample = watched.sample();
    let peak_rss = tree_peak_rss_kib(server.pid).unwrap_or_default();
    // Postgres publishes a backend's counters within a second of its transactions.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let transactions =
        postgres_transactions(services, &deployment.name).await? - start_transactions;
    if let Some(perf) = perf {
        stop_perf(perf)?;
    }
    let scrape = scrape_metrics(services, &addr).await?;
    if let Some(out) = &args.out {
        std::fs::write(out.join(format!("metrics-{label}.txt")), &scrape)?;
    }

    let check = services
        .clickhouse(&format!(
            "SELECT count(), uniqExact(uuid) FROM {}.events WHERE team_id = 2 FORMAT TSV",
            deployment.name
        ))
        .await?;
    let letters = services
        .clickhouse(&format!(
            "SELECT count() FROM {}.events_dead_letter_queue FORMAT TSV",
            deployment.name
        ))
        .await?;
    let expected = format!("{events}\t{events}");
    ensure!(
        check.trim() == expected,
        "stored (count, distinct uuids) = {}, expected {expected}",
        check.trim()
    );
    ensure!(letters.trim() == "0", "{} dead letters", letters.trim());

    let drain = drained_at.duration_since(assigned_at).as_secs_f64();
    // A steady rate the deployment can keep up with: at most half of what it just drained.
    let rate = args
        .latency_rate
        .min((events as f64 / drain / 2.0) as u64)
        .max(100);
    let latency = if args.latency_seconds > 0 {
        Some(run_latency(services, args, rate, deployment, &watched, ticks).await?)
    } else {
        None
    };
    server.stop()?;

    let (first_at, first_count) = first_rows.unwrap_or((drained_at, 0));
    let steady = drained_at.duration_since(first_at).as_secs_f64();
    let cpu = cpu_between(start_sample, end_sample, ticks);
    let batches = scrape
        .lines()
        .find_map(|line| line.strip_prefix("kafka_consumer_batches_total "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    Ok(ScenarioResult {
        scenario: deployment.scenario,
        server: server_binary
            .file_name()
            .map_or_else(String::new, |name| name.to_string_lossy().into_owned()),
        batch_size,
        events,
        produce_seconds: produce.as_secs_f64(),
        startup_seconds: assigned_at.duration_since(spawned_at).as_secs_f64(),
        drain_seconds: drain,
        events_per_second: events as f64 / drain,
        first_rows_seconds: first_at.duration_since(assigned_at).as_secs_f64(),
        steady_events_per_second: if steady > 0.0 {
            (events as u64 - first_count) as f64 / steady
        } else {
            f64::NAN
        },
        server_cpu_seconds_per_1000: cpu.server_seconds * 1000.0 / events as f64,
        cpu,
        peak_rss_mib: peak_rss as f64 / 1024.0,
        postgres_transactions: transactions,
        postgres_transactions_per_batch: (batches > 0.0).then(|| transactions as f64 / batches),
        metrics: summarize_metrics(&scrape),
        latency,
    })
}

fn start_perf(pid: u32, options: &str, output: &Path) -> Result<Child> {
    Command::new("perf")
        .arg("record")
        .args(options.split_whitespace())
        .arg("-p")
        .arg(pid.to_string())
        .arg("-o")
        .arg(output)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start perf")
}

fn stop_perf(mut perf: Child) -> Result<()> {
    signal(perf.id(), "INT")?;
    perf.wait()?;
    Ok(())
}

async fn scrape_metrics(services: &Services, addr: &str) -> Result<String> {
    Ok(services
        .http
        .get(format!("http://{addr}/_metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// Histogram means and the counters that explain the run, from the Prometheus text.
async fn postgres_transactions(services: &Services, database: &str) -> Result<i64> {
    let row = services
        .postgres("postgres")
        .await?
        .query_one(
            "SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database WHERE datname = $1",
            &[&database],
        )
        .await
        .context("read pg_stat_database")?;
    Ok(row.get(0))
}

fn summarize_metrics(scrape: &str) -> Vec<(String, String)> {
    let mut sums: HashMap<String, (f64, f64)> = HashMap::new();
    let mut out = Vec::new();
    for line in scrape.lines().filter(|line| !line.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        for histogram in [
            "ingestion_pipeline_step_duration_seconds",
            "event_writer_flush_duration_seconds",
            "kafka_consumer_batch_duration_seconds",
        ] {
            if let Some(rest) = name.strip_prefix(histogram) {
                if let Some(labels) = rest.strip_prefix("_sum") {
                    sums.entry(format!("{histogram}{labels}")).or_default().0 = value;
                } else if let Some(labels) = rest.strip_prefix("_count") {
                    sums.entry(format!("{histogram}{labels}")).or_default().1 = value;
                }
            }
        }
        if [
            "kafka_consumer_batches_total",
            "kafka_consumer_messages_total",
            "event_writer_rows_written_total",
            "event_writer_write_failures_total",
            "process_cpu_seconds_total",
        ]
        .iter()
        .any(|counter| name.starts_with(counter))
        {
            out.push((name.to_owned(), value.to_string()));
        }
    }
    let mut histograms: Vec<_> = sums.into_iter().collect();
    histograms.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, (sum, count)) in histograms {
        let mean_ms = if count > 0.0 {
            sum / count * 1000.0
        } else {
            0.0
        };
        out.push((
            name,
            format!("count {count}, total {sum:.3} s, mean {mean_ms:.1} ms"),
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Latency at a steady rate

#[derive(Debug, serde::Serialize)]
struct LatencyResult {
    rate: u64,
    seconds: u64,
    /// Reloads published during the phase (reload scenario).
    reloads: Option<u32>,
    markers: usize,
    seen: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Mean time between the starts of two ClickHouse polls: the resolution of the numbers.
    mean_poll_interval_ms: f64,
    cpu: CpuUse,
    server_cpu_seconds_per_1000: f64,
}

async fn run_latency(
    services: &Services,
    args: &Args,
    rate: u64,
    deployment: &Deployment,
    watched: &Watched,
    ticks: f64,
) -> Result<LatencyResult> {
    // Events go out in whole numbers per 10 ms tick, so the rate is a multiple of 100; the
    // marker count below (every 100th event) must match exactly, or the wait runs to its limit.
    let rate = (rate / 100).max(1) * 100;
    let seconds = args.latency_seconds;
    let set_person = deployment.scenario.sets_persons();
    let wide = args.wide;
    let reloads = if deployment.scenario == Scenario::Reload {
        Some(start_reloads(services, deployment).await?)
    } else {
        None
    };
    let producer = EventProducer::new(&services.kafka, &deployment.topic)?;
    let start_sample = watched.sample();
    // Produced on its own thread on a 10 ms grid, so polling ClickHouse cannot delay it.
    let producing = std::thread::spawn(move || -> Result<Vec<(Uuid, Instant)>> {
        let now = peer_now();
        let per_tick = (rate / 100).max(1) as usize;
        let started = Instant::now();
        let mut markers = Vec::new();
        let mut i = 0usize;
        for tick in 0..seconds * 100 {
            let due = started + Duration::from_millis(tick * 10);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            for _ in 0..per_tick {
                let uuid = Uuid::new_v4();
                let marker = i.is_multiple_of(100);
                let name = if marker {
                    "bench_marker".to_owned()
                } else {
                    format!("e{}", i % 7)
                };
                let (key, payload) = peer_message(i, &name, &uuid, &now, set_person, wide)?;
                if marker {
                    markers.push((uuid, Instant::now()));
                }
                producer.send(&key, &payload)?;
                i += 1;
            }
        }
        producer.flush()?;
        Ok(markers)
    });

    let sql = format!(
        "SELECT toString(uuid) FROM {}.events WHERE team_id = 2 AND event = 'bench_marker' FORMAT TSV",
        deployment.name
    );
    let expected = (seconds * rate / 100) as usize;
    let mut seen: HashMap<Uuid, Instant> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(seconds + 60);
    let mut polls = 0u32;
    let first_poll = Instant::now();
    let mut last_poll = first_poll;
    while seen.len() < expected && Instant::now() < deadline {
        last_poll = Instant::now();
        polls += 1;
        let body = services.clickhouse(&sql).await?;
        // The response time, not the request time: an upper bound on when the row appeared.
        let answered = Instant::now();
        for line in body.lines() {
            if let Ok(uuid) = line.trim().parse::<Uuid>() {
                seen.entry(uuid).or_insert(answered);
            }
        }
        tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
    }
    let end_sample = watched.sample();
    let reloads = match reloads {
        Some(reloads) => {
            reloads.stop.cancel();
            Some(reloads.task.await??)
        }
        None => None,
    };
    let markers = tokio::task::spawn_blocking(move || producing.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the latency producer panicked"))??;
    let mut latencies: Vec<f64> = markers
        .iter()
        .filter_map(|(uuid, produced)| {
            let stored = seen.get(uuid)?;
            Some(stored.saturating_duration_since(*produced).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let cpu = cpu_between(start_sample, end_sample, ticks);
    let produced = (seconds * rate) as f64;
    Ok(LatencyResult {
        rate,
        seconds,
        reloads,
        markers: markers.len(),
        seen: latencies.len(),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        mean_poll_interval_ms: if polls > 1 {
            last_poll.duration_since(first_poll).as_secs_f64() * 1000.0 / f64::from(polls - 1)
        } else {
            f64::NAN
        },
        server_cpu_seconds_per_1000: cpu.server_seconds * 1000.0 / produced,
        cpu,
    })
}

struct Reloads {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<u32>>,
}

/// Every second until stopped: change the plugin, then publish `reload-plugins` on the
/// deployment's prefixed channel, as PostHog's app does after an edit.
async fn start_reloads(services: &Services, deployment: &Deployment) -> Result<Reloads> {
    let url = services
        .redis
        .clone()
        .context("the reload scenario needs REDIS_URL")?;
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let channel = format!("{}:reload-plugins", deployment.name);
    let database = services.postgres(&deployment.name).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let mut published = 0u32;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = stopped.cancelled() => return Ok(published),
                _ = tick.tick() => {}
            }
            database
                .execute(
                    "UPDATE posthog_plugin SET updated_at = now() WHERE id = 1",
                    &[],
                )
                .await
                .context("touch the plugin")?;
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg("")
                .query_async::<i64>(&mut connection)
                .await
                .context("publish reload-plugins")?;
            published += 1;
        }
    });
    Ok(Reloads { stop, task })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// The peer

#[derive(Debug)]
struct PeerResult {
    events_per_second: f64,
    seconds: f64,
    raw: String,
}

impl std::fmt::Display for PeerResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.raw)
    }
}

async fn run_peer(args: &Args, services: &Services) -> Result<PeerResult> {
    println!(
        "running the peer: python3 {} {}",
        args.peer.display(),
        args.events
    );
    let before = services.topic_names()?;
    let output = tokio::process::Command::new("python3")
        .arg(&args.peer)
        .arg(args.events.to_string())
        .output()
        .await
        .context("run the peer")?;
    // The peer leaves its topic (and its events, in the broker's memory) behind: remove the
    // naive_* topics that appeared while it ran.
    let after = services.topic_names()?;
    let new_topics: Vec<&str> = after
        .difference(&before)
        .filter(|topic| topic.starts_with("naive_"))
        .map(String::as_str)
        .collect();
    services.delete_topics(&new_topics).await;
    ensure!(
        output.status.success(),
        "the peer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let raw = stdout
        .lines()
        .last()
        .context("the peer printed nothing")?
        .to_owned();
    let parsed: Value = serde_json::from_str(&raw).with_context(|| format!("peer output {raw}"))?;
    Ok(PeerResult {
        events_per_second: parsed["events_per_s"].as_f64().context("events_per_s")?,
        seconds: parsed["seconds"].as_f64().context("seconds")?,
        raw,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

fn print_table(results: &[ScenarioResult], peer: Option<&PeerResult>) {
    println!(
        "\n| scenario | server | KAFKA_MAX_MESSAGE_BATCH_SIZE | events/s | × peer | drain s | steady events/s | server CPU s / 1000 | ClickHouse CPU s / 1000 | broker CPU s / 1000 | Postgres CPU s / 1000 | Postgres transactions / batch | machine busy | peak RSS MiB | p50 ms | p99 ms |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let per_1000 = |seconds: Option<f64>, events: usize| {
        seconds.map_or("n/a".to_owned(), |s| {
            format!("{:.4}", s * 1000.0 / events as f64)
        })
    };
    for result in results {
        let ratio = peer.map_or("n/a".to_owned(), |peer| {
            format!("{:.2}", result.events_per_second / peer.events_per_second)
        });
        let (p50, p99) =
            result
                .latency
                .as_ref()
                .map_or(("n/a".to_owned(), "n/a".to_owned()), |latency| {
                    (
                        format!("{:.0}", latency.p50_ms),
                        format!("{:.0}", latency.p99_ms),
                    )
                });
        println!(
            "| {} | {} | {} | {:.0} | {} | {:.2} | {:.0} | {:.4} | {} | {} | {} | {} | {} | {:.1} | {} | {} |",
            result.scenario.name(),
            result.server,
            result.batch_size,
            result.events_per_second,
            ratio,
            result.drain_seconds,
            result.steady_events_per_second,
            result.server_cpu_seconds_per_1000,
            per_1000(result.cpu.clickhouse_seconds, result.events),
            per_1000(result.cpu.broker_seconds, result.events),
            per_1000(result.cpu.postgres_seconds, result.events),
            result
                .postgres_transactions_per_batch
                .map_or("n/a".to_owned(), |per_batch| format!("{per_batch:.1}")),
            result
                .cpu
                .machine_busy_percent
                .map_or("n/a".to_owned(), |busy| format!("{busy:.0} %")),
            result.peak_rss_mib,
            p50,
            p99,
        );
    }
    if let Some(peer) = peer {
        println!(
            "| naive peer | | | {:.0} | 1.00 | {:.2} | | | | | | | | | | |",
            peer.events_per_second, peer.seconds
        );
    }
}
