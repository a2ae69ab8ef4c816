//! The server on the cluster profile's Redis: it starts, and says so.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn the_server_starts_on_redis_and_reports_its_instance() {
    let redis_url = std::env::var("REDIS_URL").expect("REDIS_URL: run functional_tests/run.sh");
    let mut child = Command::new(common::BIN)
        .env_clear()
        .envs([
            ("REDIS_URL", redis_url.as_str()),
            ("HTTP_SERVER_HOST", "127.0.0.1"),
            ("HTTP_SERVER_PORT", "0"),
            ("LOG_FORMAT", "json"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let stderr = child.stderr.take().expect("piped");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(log) = serde_json::from_str::<serde_json::Value>(&line)
                && log["fields"]["message"] == "plugin server started"
            {
                let _ = sender.send(log["fields"].clone());
            }
        }
    });
    let started = receiver
        .recv_timeout(Duration::from_secs(30))
        .expect("the server started");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        started["profile"]
            .as_str()
            .unwrap_or_default()
            .contains("redis"),
        "{started}"
    );
    assert!(
        started["instance"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{started}"
    );
}
