//! The test command itself (issue 22): `functional_tests/run.sh` stops at once, naming the port,
//! when a service cannot start, and `docker/services.sh start` reuses services already running.
//! Both run the real scripts, on this run's services, with a throwaway `SVC_DIR`.

use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn repository() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

fn run_script(script: &str, args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let started = Instant::now();
    let output = Command::new("bash")
        .arg(script)
        .args(args)
        .current_dir(repository())
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|error| panic!("{script} runs: {error}"));
    (output, started.elapsed())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_sh_stops_within_seconds_naming_a_postgres_port_held_by_something_else() {
    // A listener that is not PostgreSQL: it accepts and never answers.
    let foreign = TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = foreign.local_addr().expect("address").port().to_string();
    let services = tempfile::tempdir().expect("tempdir");
    let services_dir = services.path().to_str().expect("utf-8 path");

    let (output, took) = run_script(
        "functional_tests/run.sh",
        &[],
        &[("PG_PORT", &port), ("SVC_DIR", services_dir)],
    );
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "run.sh went on: {stderr}");
    assert!(
        took < Duration::from_secs(60),
        "run.sh took {took:?} to give up"
    );
    assert!(
        stderr.contains(&format!(
            "127.0.0.1:{port} is held by something that is not PostgreSQL"
        )) && stderr.contains("PG_PORT=<port>"),
        "the error names the port, the service and the variable: {stderr}"
    );
    assert!(stderr.contains("no test ran"), "{stderr}");
    // Nothing was started or written for the other services.
    assert!(
        !services.path().join("pg").exists() && !services.path().join("ch").exists(),
        "nothing started after the failure"
    );
    drop(foreign);
}

#[test]
fn services_sh_reuses_the_services_this_run_started() {
    // Another SVC_DIR, as a second checkout would have: the ports already answer as the right
    // services, so each is reused instead of a second instance failing to bind.
    let services = tempfile::tempdir().expect("tempdir");
    let services_dir = services.path().to_str().expect("utf-8 path");
    let (output, _) = run_script(
        "docker/services.sh",
        &["start"],
        &[("SVC_DIR", services_dir)],
    );
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for service in ["PostgreSQL", "Redis", "ClickHouse", "Kafka broker"] {
        assert!(
            stderr.contains(&format!("reusing the {service} already on")),
            "{service} not reused: {stderr}"
        );
    }
    let stdout = text(&output.stdout);
    let database_url = std::env::var("DATABASE_URL").expect("DATABASE_URL: run run.sh");
    assert!(
        stdout.contains(&format!("export DATABASE_URL={database_url}")),
        "the same services' env: {stdout}"
    );
    assert!(
        !services.path().join("pg").exists(),
        "no second Postgres data directory"
    );
}
