//! The `plugin-server` binary, run as a user runs it: flags, exit codes, startup errors, and a
//! server that starts with nothing configured, answers its probes and stops on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_plugin-server");

/// The binary with an empty environment, so settings of the machine (or of the functional
/// test run) cannot leak in.
fn command(env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    command.env_clear().envs(env.iter().copied());
    command
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(env).args(args).output().expect("binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_the_flags() {
    let output = run(&["--help"], &[]);
    assert!(output.status.success());
    let help = text(&output.stdout);
    for flag in [
        "--migrate",
        "--healthcheck",
        "--config",
        "--profile",
        "-v, --version",
        "-h, --help",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(run(&["-h"], &[]).status.success());
}

#[test]
fn version_flags_print_the_version() {
    for flag in ["-v", "--version"] {
        let output = run(&[flag], &[]);
        assert!(output.status.success());
        assert_eq!(
            text(&output.stdout).trim(),
            format!("plugin-server {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn an_unknown_flag_is_a_usage_error() {
    let output = run(&["--frobnicate"], &[]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn a_bad_value_stops_startup_with_one_line_naming_the_variable() {
    let cases = [
        ("WORKER_CONCURRENCY", "many", "invalid WORKER_CONCURRENCY: "),
        ("DISABLE_MMDB", "perhaps", "invalid DISABLE_MMDB: "),
        ("DATABASE_URL", "mysql://x/y", "invalid DATABASE_URL: "),
        ("HTTP_SERVER_PORT", "99999", "invalid HTTP_SERVER_PORT: "),
    ];
    for (var, value, expected) in cases {
        let output = run(&[], &[(var, value)]);
        assert_eq!(output.status.code(), Some(78), "{var}={value}");
        let stderr = text(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with(&format!("plugin-server: {expected}")),
            "{stderr}"
        );
    }
}

#[test]
fn an_unknown_mode_lists_the_valid_ones() {
    let output = run(&[], &[("PLUGIN_SERVER_MODE", "turbo")]);
    assert_eq!(output.status.code(), Some(78));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("valid modes: ingestion,"), "{stderr}");
    assert!(stderr.contains("scheduler"), "{stderr}");
}

#[test]
fn recordings_ingestion_is_refused_as_not_supported() {
    let output = run(&[], &[("PLUGIN_SERVER_MODE", "recordings-ingestion")]);
    assert_eq!(output.status.code(), Some(78));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("not supported yet"), "{stderr}");
}

/// Each mode runs PostHog's capabilities for it (spec 5.3), which `/_actors` lists, and starts
/// only the plugin runners they need. The embedded profile has no Kafka, so the ingestion
/// consumers are named but have nothing to consume.
#[test]
fn each_mode_starts_its_capabilities() {
    let cases: [(&str, &[&str]); 8] = [
        (
            "",
            &[
                "mmdb",
                "ingestion",
                "ingestionOverflow",
                "pluginScheduledTasks",
                "processPluginJobs",
                "processAsyncHandlers",
                "http",
            ],
        ),
        ("ingestion", &["mmdb", "ingestion", "http"]),
        ("ingestion-overflow", &["mmdb", "ingestionOverflow", "http"]),
        ("analytics-ingestion", &["mmdb", "ingestion", "http"]),
        (
            "async",
            &[
                "mmdb",
                "pluginScheduledTasks",
                "processPluginJobs",
                "processAsyncHandlers",
                "http",
            ],
        ),
        ("exports", &["mmdb", "processAsyncHandlers", "http"]),
        ("jobs", &["mmdb", "processPluginJobs", "http"]),
        ("scheduler", &["mmdb", "pluginScheduledTasks", "http"]),
    ];
    for (mode, expected) in cases {
        let server = start_server(&[], &[("PLUGIN_SERVER_MODE", mode)]);
        let (status, body) = http_get(server.port, "/_actors");
        assert_eq!(status, 200);
        let actors: serde_json::Value = serde_json::from_str(&body).expect("json");
        let capabilities: Vec<&str> = actors["capabilities"]
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        assert_eq!(capabilities, expected, "mode {mode:?}");
        let runs = |capability: &str| expected.contains(&capability);
        assert_eq!(
            actors["plugin_scheduler"].is_object(),
            runs("pluginScheduledTasks"),
            "mode {mode:?}: {actors}"
        );
        assert_eq!(
            actors["plugin_job_queue"].is_object(),
            runs("processPluginJobs"),
            "mode {mode:?}: {actors}"
        );
        let expected_mode = if mode.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::Value::from(mode)
        };
        assert_eq!(actors["mode"], expected_mode);
    }
}

#[test]
fn a_bad_config_file_is_refused() {
    let output = run(&["--config", "/no/such/file.toml"], &[]);
    assert_eq!(output.status.code(), Some(78));
    assert!(text(&output.stderr).contains("/no/such/file.toml"));
}

#[test]
fn migrate_with_nothing_configured_has_nothing_to_do() {
    let output = run(&["--migrate"], &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("nothing to migrate"));
}

#[test]
fn healthcheck_fails_when_nothing_runs() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port()
        .to_string();
    let output = run(&["--healthcheck"], &[("HTTP_SERVER_PORT", &port)]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("unhealthy"));
}

/// A server started from the binary; killed if the test fails before it stops.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on port 0 with JSON logs, and reads the bound port from the start line.
fn start_server(args: &[&str], env: &[(&str, &str)]) -> Server {
    let base_dir = std::env::temp_dir().join(format!("plugin-server-cli-{}", std::process::id()));
    std::fs::create_dir_all(&base_dir).expect("base dir");
    let base_dir = base_dir.display().to_string();
    let mut all_env = vec![
        ("HTTP_SERVER_HOST", "127.0.0.1"),
        ("HTTP_SERVER_PORT", "0"),
        ("LOG_FORMAT", "json"),
        ("BASE_DIR", base_dir.as_str()),
    ];
    all_env.extend_from_slice(env);
    let mut child = command(&all_env)
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("server starts");
    let stderr = child.stderr.take().expect("piped");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let started = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .filter(|log| log["fields"]["message"] == "plugin server started")
                .and_then(|log| log["fields"]["local_addr"].as_str().map(str::to_owned));
            if let Some(addr) = started {
                let _ = sender.send(addr);
            }
        }
    });
    let addr = receiver
        .recv_timeout(Duration::from_secs(30))
        .expect("the server logs its address");
    let port = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    Server { child, port }
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connects");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

#[test]
fn the_embedded_server_answers_its_probes_and_stops_on_sigterm() {
    let mut server = start_server(&[], &[]);
    assert_eq!(
        http_get(server.port, "/_health"),
        (
            200,
            r#"{"status":"ok","checks":{"event_writer":"idle"}}"#.to_owned()
        )
    );
    assert_eq!(
        http_get(server.port, "/_ready"),
        (200, r#"{"status":"ok"}"#.to_owned())
    );

    let port = server.port.to_string();
    let healthy = run(&["--healthcheck"], &[("HTTP_SERVER_PORT", &port)]);
    assert!(healthy.status.success(), "{}", text(&healthy.stderr));

    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("waitable") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");

    let after = run(&["--healthcheck"], &[("HTTP_SERVER_PORT", &port)]);
    assert_eq!(after.status.code(), Some(1), "nothing answers any more");
}

#[test]
fn sigint_stops_the_server_too() {
    let mut server = start_server(&[], &[]);
    Command::new("kill")
        .args(["-INT", &server.child.id().to_string()])
        .status()
        .expect("kill runs");
    let status = server.child.wait().expect("exits");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_config_file_and_a_profile_are_read() {
    let dir = std::env::temp_dir().join(format!("plugin-server-cfg-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("config")).expect("dir");
    let file = dir.join("settings.toml");
    std::fs::write(&file, "plugin_server_mode = \"from-file\"\n").expect("write");
    let output = run(&["--config", &file.display().to_string()], &[]);
    assert_eq!(output.status.code(), Some(78));
    assert!(
        text(&output.stderr).contains("\"from-file\""),
        "the file was read"
    );

    std::fs::write(
        dir.join("config/custom.toml"),
        "plugin_server_mode = \"from-profile\"\n",
    )
    .expect("write");
    let output = command(&[])
        .current_dir(&dir)
        .args(["--profile", "custom"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(78));
    assert!(
        text(&output.stderr).contains("\"from-profile\""),
        "config/custom.toml was read"
    );

    let output = run(&["--profile", "no-such-profile"], &[]);
    assert_eq!(output.status.code(), Some(78));
    assert!(text(&output.stderr).contains("unknown profile"));

    // Built-in profiles work from any directory; env vars still win over them.
    let server = start_server(&["--profile", "test"], &[]);
    assert_eq!(http_get(server.port, "/_ready").0, 200);
}

/// A stand-in for Sentry's ingest endpoint: records the body of every request it gets.
fn fake_sentry() -> (u16, mpsc::Receiver<(String, String)>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut content_length = 0;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    content_length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; content_length];
            let _ = reader.read_exact(&mut body);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
            let _ = sender.send((request_line, String::from_utf8_lossy(&body).into_owned()));
        }
    });
    (port, receiver)
}

#[test]
fn errors_are_reported_to_sentry_when_a_dsn_is_set() {
    let (port, requests) = fake_sentry();
    let dsn = format!("http://publickey@127.0.0.1:{port}/42");
    let output = run(
        &["--migrate"],
        &[
            ("SENTRY_DSN", &dsn),
            ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none"),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let (request_line, body) = requests
        .recv_timeout(Duration::from_secs(10))
        .expect("an error report reached the DSN");
    assert!(
        request_line.starts_with("POST /api/42/envelope/"),
        "{request_line}"
    );
    assert!(body.contains("plugin server failed"), "{body}");
    assert!(body.contains("DATABASE_URL"), "{body}");
}

#[test]
fn an_unreachable_redis_stops_startup_naming_redis_url() {
    let output = run(
        &[],
        &[
            ("REDIS_URL", "redis://127.0.0.1:1"),
            ("HTTP_SERVER_PORT", "0"),
            ("HTTP_SERVER_HOST", "127.0.0.1"),
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("check REDIS_URL"), "{stderr}");
}
