//! The server on the cluster profile's Redis: it starts, and says so.

use crate::common;

#[test]
fn the_server_starts_on_redis_and_reports_its_instance() {
    let redis_url = std::env::var("REDIS_URL").expect("REDIS_URL: run functional_tests/run.sh");
    let server = common::ServerProcess::start(&[("REDIS_URL", redis_url)]);
    let started = server.started.clone();
    drop(server);
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
