//! Shared helpers for the black-box functional tests: where the real services are, fresh
//! databases per test, and running the built binary.
//!
//! The services come from `docker/services.sh start`; `functional_tests/run.sh` exports their
//! addresses as PostHog's env vars before running the tests.

#![allow(dead_code)]

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub const BIN: &str = env!("CARGO_BIN_EXE_plugin-server");

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the functional tests with `bash functional_tests/run.sh`")
    })
}

/// `postgres://...` of the server, without a database name.
pub fn postgres_server_url() -> String {
    let url = required_env("DATABASE_URL");
    match url.rsplit_once('/') {
        Some((server, _database)) if server.contains("://") && !server.ends_with('/') => {
            server.to_owned()
        }
        _ => url,
    }
}

/// The ClickHouse HTTP endpoint, `http://host:port`.
pub fn clickhouse_http_url() -> String {
    let host = required_env("CLICKHOUSE_HOST");
    if host.contains("://") {
        host
    } else {
        format!("http://{host}")
    }
}

/// A name no other test (or earlier run) uses.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A Postgres database created for one test and dropped at the end of it.
pub struct FreshPostgres {
    pub name: String,
    pub url: String,
    /// The server's URL without a database.
    server: String,
}

impl FreshPostgres {
    /// On the test run's Postgres.
    pub async fn create() -> Self {
        Self::create_on(&postgres_server_url()).await
    }

    /// On the server at `server` (a URL without a database).
    pub async fn create_on(server: &str) -> Self {
        let name = unique_name("ps_test");
        let admin = connect(&format!("{server}/postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let url = format!("{server}/{name}");
        Self {
            name,
            url,
            server: server.to_owned(),
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    pub async fn drop_database(self) {
        let admin = connect(&format!("{}/postgres", self.server)).await;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .expect("drop database");
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|error| panic!("connect to {url}: {error}"));
    tokio::spawn(connection);
    client
}

/// Runs a ClickHouse query over HTTP and returns the body; panics on an error status.
pub async fn clickhouse_query(sql: &str) -> String {
    clickhouse_query_at(&clickhouse_http_url(), sql).await
}

/// [`clickhouse_query`] on the ClickHouse at `url`.
pub async fn clickhouse_query_at(url: &str, sql: &str) -> String {
    plugin_server::telemetry::install_tls_provider();
    let response = reqwest::Client::new()
        .post(url)
        .body(sql.to_owned())
        .send()
        .await
        .expect("clickhouse reachable");
    let status = response.status();
    let body = response.text().await.expect("body");
    assert!(status.is_success(), "{sql}: {status}: {body}");
    body
}

/// Runs the binary with only the given env vars (plus PATH), waiting for it to exit.
pub fn run_binary(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("binary runs")
}

/// `--migrate` with only `env`; panics with the binary's stderr if it fails.
pub fn migrate(env: &[(&str, &str)]) {
    let migrated = run_binary(&["--migrate"], env);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
}

/// A `source` plugin in PostHog's tables: organization 1, team `team_id` with `token`, plugin 1
/// named `name` whose one file is `file_name`, enabled for the team as config 10 with `config`
/// and `filters` (`posthog_pluginconfig.filters`, NULL when `None`).
pub struct SourcePlugin<'a> {
    pub team_id: i32,
    pub token: &'a str,
    pub name: &'a str,
    pub file_name: &'a str,
    pub source: &'a str,
    pub config: serde_json::Value,
    pub filters: Option<serde_json::Value>,
}

impl SourcePlugin<'_> {
    pub async fn insert(&self, client: &tokio_postgres::Client) {
        const ORG: &str = "00000000-0000-0000-0000-000000000001";
        client
            .execute(
                "INSERT INTO posthog_organization (id, name) VALUES ($1::text::uuid, 'org')",
                &[&ORG],
            )
            .await
            .expect("organization");
        client
            .execute(
                "INSERT INTO posthog_team (id, organization_id, api_token) VALUES ($1, $2::text::uuid, $3)",
                &[&self.team_id, &ORG, &self.token],
            )
            .await
            .expect("team");
        client
            .execute(
                "INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, updated_at)
                 VALUES (1, $1::text::uuid, 'source', $2, now())",
                &[&ORG, &self.name],
            )
            .await
            .expect("plugin");
        client
            .execute(
                "INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, \"order\", config, filters)
                 VALUES (10, $1, 1, true, 1, $2, $3)",
                &[&self.team_id, &self.config, &self.filters],
            )
            .await
            .expect("plugin config");
        client
            .execute(
                "INSERT INTO posthog_pluginsourcefile (plugin_id, filename, source) VALUES (1, $1, $2)",
                &[&self.file_name, &self.source],
            )
            .await
            .expect("source file");
    }
}

/// The server binary running as a child process with JSON logs; killed (SIGKILL) when dropped,
/// so a failing test never leaves it behind.
pub struct ServerProcess {
    pub child: std::process::Child,
    /// The fields of its "plugin server started" log line (local_addr, profile, instance, ...).
    pub started: serde_json::Value,
}

impl ServerProcess {
    /// Starts the binary with only `env` (plus JSON logs on an ephemeral local port unless
    /// `env` says otherwise) and waits up to 60 s for its start. Warnings and errors it logs
    /// are copied to the test's output.
    pub fn start(env: &[(&str, String)]) -> Self {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;

        let defaults = [
            ("HTTP_SERVER_HOST", "127.0.0.1"),
            ("HTTP_SERVER_PORT", "0"),
            ("LOG_FORMAT", "json"),
            // Not the repository's config/plugins.toml (the first run's sample plugin): a test
            // that wants plugin configs names its own file.
            ("PLUGINS_CONFIG_FILE", "/nonexistent/plugins.toml"),
        ];
        let mut child = Command::new(BIN)
            .env_clear()
            .envs(defaults)
            .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
            .stderr(Stdio::piped())
            .spawn()
            .expect("the server binary starts");
        let stderr = child.stderr.take().expect("piped");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(log) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if log["fields"]["message"] == "plugin server started" {
                    let _ = sender.send(log["fields"].clone());
                }
                if log["level"] == "ERROR" || log["level"] == "WARN" {
                    eprintln!("server: {line}");
                }
            }
        });
        let Ok(started) = receiver.recv_timeout(std::time::Duration::from_secs(60)) else {
            // Not left running behind the failed test.
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not log its start within 60 s (its warnings are above)");
        };
        Self { child, started }
    }

    /// `host:port` of its HTTP server.
    pub fn addr(&self) -> String {
        self.started["local_addr"]
            .as_str()
            .expect("local_addr logged")
            .to_owned()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server's `/_actors` JSON.
pub async fn actors(addr: &str) -> serde_json::Value {
    reqwest::get(format!("http://{addr}/_actors"))
        .await
        .expect("GET /_actors")
        .json()
        .await
        .expect("/_actors is JSON")
}

/// The server's `/_metrics` scrape.
pub async fn scrape_metrics(addr: &str) -> String {
    reqwest::get(format!("http://{addr}/_metrics"))
        .await
        .expect("metrics answered")
        .text()
        .await
        .expect("metrics text")
}

/// The value of the first sample of `name` whose labels contain every one of `labels`
/// (`key="value"` strings).
pub fn metric_value(scrape: &str, name: &str, labels: &[&str]) -> Option<f64> {
    scrape
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit_once(' '))
        .and_then(|(_, value)| value.trim().parse().ok())
}

/// Every row the embedded profile's JSON-lines sink wrote under `BASE_DIR/data`, with each
/// row's `properties` string parsed.
pub fn read_event_rows(base_dir: &std::path::Path) -> Vec<serde_json::Value> {
    read_rows(base_dir, "events")
}

/// The rows of one kind (`events`, `groups`, ...) the embedded profile wrote under `BASE_DIR`,
/// with a `properties` string parsed.
pub fn read_rows(base_dir: &std::path::Path, kind: &str) -> Vec<serde_json::Value> {
    let prefix = format!("{kind}-");
    let mut rows = Vec::new();
    let Ok(entries) = std::fs::read_dir(base_dir.join("data")) else {
        return rows;
    };
    for entry in entries {
        let path = entry.expect("entry").path();
        let is_events = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with(&prefix));
        if is_events {
            let text = std::fs::read_to_string(&path).expect("read");
            for line in text.lines() {
                let mut row: serde_json::Value = serde_json::from_str(line).expect("json");
                if let Some(properties) = row["properties"].as_str() {
                    row["properties"] = serde_json::from_str(properties).expect("properties json");
                }
                rows.push(row);
            }
        }
    }
    rows
}

/// A local HTTP destination for plugins' fetches and webhooks: answers 200 to everything and
/// hands each request over as (method, path, body), or whole with `next_request`.
pub struct HttpRecorder {
    pub url: String,
    requests: tokio::sync::mpsc::UnboundedReceiver<RecordedRequest>,
}

#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Header names lowercased.
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: String,
}

impl HttpRecorder {
    pub async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (sender, requests) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let sender = sender.clone();
                tokio::spawn(async move {
                    let mut data = Vec::new();
                    let mut chunk = [0u8; 8192];
                    // Headers, then as much body as Content-Length says.
                    let (head_end, length) = loop {
                        let Ok(n) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        data.extend_from_slice(&chunk[..n]);
                        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (end + 4, length);
                        }
                    };
                    while data.len() < head_end + length {
                        let Ok(n) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            break;
                        }
                        data.extend_from_slice(&chunk[..n]);
                    }
                    let head = String::from_utf8_lossy(&data[..head_end]).to_string();
                    let mut lines = head.lines();
                    let mut first = lines.next().unwrap_or("").split(' ');
                    let method = first.next().unwrap_or("").to_owned();
                    let path = first.next().unwrap_or("").to_owned();
                    let headers = lines
                        .filter_map(|line| line.split_once(':'))
                        .map(|(name, value)| (name.to_lowercase(), value.trim().to_owned()))
                        .collect();
                    let body = String::from_utf8_lossy(&data[head_end..]).to_string();
                    let _ = sender.send(RecordedRequest {
                        method,
                        path,
                        headers,
                        body,
                    });
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                });
            }
        });
        Self { url, requests }
    }

    /// Waits up to `within` for the next request: (method, path, body).
    pub async fn next(&mut self, within: std::time::Duration) -> Option<(String, String, String)> {
        self.next_request(within)
            .await
            .map(|request| (request.method, request.path, request.body))
    }

    /// Waits up to `within` for the next request.
    pub async fn next_request(&mut self, within: std::time::Duration) -> Option<RecordedRequest> {
        tokio::time::timeout(within, self.requests.recv())
            .await
            .ok()
            .flatten()
    }
}

/// Posts `batch` to the server's `/batch` as posthog-python does, with `token`.
pub async fn post_batch(addr: &str, token: &str, batch: serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{addr}/batch"))
        .json(&serde_json::json!({"api_key": token, "batch": batch}))
        .send()
        .await
        .expect("capture answered")
}

/// The fields of `/proc/<pid>/stat` after the command's closing parenthesis (state first).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The process `pid` and its children (the server's plugin worker processes), from `/proc`.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut tree = vec![pid];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return tree;
    };
    tree.extend(
        entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&child| {
                let parent =
                    stat_fields(child).and_then(|fields| fields.get(1)?.parse::<u32>().ok());
                parent == Some(pid)
            }),
    );
    tree
}

/// Resident memory of `pid` and its children, in KiB.
pub fn tree_rss_kib(pid: u32) -> u64 {
    process_tree(pid)
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| {
                    value
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .sum()
}

/// CPU time (user and system, in clock ticks) used so far by `pid` and its live children.
pub fn tree_cpu_ticks(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(stat_fields)
        .filter_map(|fields| {
            // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command.
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}
