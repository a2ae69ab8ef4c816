//! The HTTP endpoints of a server started in-process on port 0, with its real actors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, ActorContext, ActorFutureExt, Context, Handler, Message, Supervised};
use plugin_server::{LoadOptions, RunningServer, Settings};
use plugin_server_actors::Shutdown;
use plugin_server_actors::system::health::{GetReadiness, ProgressReporter};
use plugin_server_actors::system::stats::ActorStats;
use plugin_server_actors::system::supervisor::{SpawnOptions, spawn_supervised};
use serde_json::Value;

async fn start_server() -> RunningServer {
    let env = HashMap::from([
        ("HTTP_SERVER_HOST".to_owned(), "127.0.0.1".to_owned()),
        ("HTTP_SERVER_PORT".to_owned(), "0".to_owned()),
        // The test binary is not the server's: it cannot be a plugin worker process.
        ("PLUGIN_WORKER_ISOLATION".to_owned(), "thread".to_owned()),
    ]);
    let settings = Settings::load(&LoadOptions {
        env: Some(env),
        ..LoadOptions::default()
    })
    .expect("settings");
    plugin_server::start(settings).await.expect("server starts")
}

async fn get(server: &RunningServer, path: &str) -> (u16, String) {
    let url = format!("http://{}{path}", server.local_addr());
    let response = reqwest::get(&url).await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

async fn get_json(server: &RunningServer, path: &str) -> (u16, Value) {
    let (status, body) = get(server, path).await;
    (status, serde_json::from_str(&body).expect("json body"))
}

#[actix::test]
async fn health_ready_metrics_actors_and_404() {
    let server = start_server().await;
    assert_ne!(server.local_addr().port(), 0, "port 0 picks a real port");

    let (status, body) = get_json(&server, "/_health").await;
    assert_eq!(status, 200);
    // The embedded profile names what it checks before any traffic.
    assert_eq!(
        body,
        serde_json::json!({"status": "ok", "checks": {"event_writer": "idle"}})
    );

    let (status, body) = get_json(&server, "/_ready").await;
    assert_eq!(status, 200);
    assert_eq!(body, serde_json::json!({"status": "ok"}));

    let (status, text) = get(&server, "/_metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains("actor_messages_handled_total{actor=\"health\"}"),
        "{text}"
    );
    assert!(text.contains("actor_message_duration_seconds_bucket{actor=\"health\""));
    assert!(text.contains("process_resident_memory_bytes"), "{text}");

    let (status, body) = get_json(&server, "/_actors").await;
    assert_eq!(status, 200);
    let health = &body["actors"][0];
    assert_eq!(health["name"], "health");
    assert!(health["messages_handled"].as_u64().expect("a number") >= 2);
    for field in ["mailbox_len", "errors", "restarts", "last_progress_unix_ms"] {
        assert!(health.get(field).is_some(), "{field} in {health}");
    }
    // The design's actors that the embedded default runs, each supervised and listed.
    let names: Vec<&str> = body["actors"]
        .as_array()
        .expect("actors")
        .iter()
        .filter_map(|actor| actor["name"].as_str())
        .collect();
    for actor in ["health", "scheduler", "job_queue", "pubsub", "event_writer"] {
        assert!(names.contains(&actor), "{actor} in {names:?}");
    }

    let (status, _) = get(&server, "/nope").await;
    assert_eq!(status, 404);
    let (status, _) = get(&server, "/_healthz").await;
    assert_eq!(status, 404);
    server.shutdown().await;
}

/// Reports progress on `Work`, panics on `Crash`.
/// Short, so that the stale test waits for it in real time: a paused clock would also jump
/// ahead over the server's own timers (the writer's flush interval) whenever the test waits on
/// a socket, making the elapsed time unpredictable.
const WORKER_DEADLINE: Duration = Duration::from_secs(1);

struct Worker {
    stats: Arc<ActorStats>,
    reporter: ProgressReporter,
}

impl Actor for Worker {
    type Context = Context<Self>;
}

impl Supervised for Worker {}

#[derive(Message)]
#[rtype(result = "()")]
struct Work;

#[derive(Message)]
#[rtype(result = "()")]
struct Crash;

impl Handler<Work> for Worker {
    type Result = ();
    fn handle(&mut self, _: Work, _: &mut Context<Self>) {
        let _timer = self.stats.message_received();
        self.reporter.report(WORKER_DEADLINE);
    }
}

impl Handler<Crash> for Worker {
    type Result = ();
    fn handle(&mut self, _: Crash, _: &mut Context<Self>) {
        let _timer = self.stats.message_received();
        panic!("worker crashed on purpose");
    }
}

fn spawn_worker(
    server: &RunningServer,
) -> plugin_server_actors::system::stats::ObservedAddr<Worker> {
    let topology = server.topology();
    let health = topology.health.addr().clone();
    spawn_supervised(
        &topology.registry,
        SpawnOptions::new("worker"),
        move |stats| Worker {
            reporter: ProgressReporter::new("worker", &health, Arc::clone(&stats)),
            stats,
        },
    )
}

#[actix::test]
async fn a_panicking_actor_is_restarted_and_the_restart_shows_in_actors() {
    let server = start_server().await;
    let worker = spawn_worker(&server);
    worker.send(Work).await.expect("works");
    assert!(
        worker.send(Crash).await.is_err(),
        "the crashing message is lost"
    );
    worker.send(Work).await.expect("restarted and working");

    let (_, body) = get_json(&server, "/_actors").await;
    let listed = body["actors"]
        .as_array()
        .expect("a list")
        .iter()
        .find(|actor| actor["name"] == "worker")
        .expect("the worker is listed")
        .clone();
    assert_eq!(listed["restarts"], 1, "{listed}");
    assert_eq!(listed["errors"], 1, "{listed}");
    assert_eq!(listed["messages_handled"], 3, "{listed}");
    assert!(
        listed["last_progress_unix_ms"].as_u64().is_some(),
        "{listed}"
    );

    let (_, metrics) = get(&server, "/_metrics").await;
    assert!(
        metrics.contains("actor_restarts_total{actor=\"worker\"} 1"),
        "{metrics}"
    );
    server.shutdown().await;
}

#[actix::test]
async fn health_turns_503_when_an_actor_with_work_stops_reporting() {
    let server = start_server().await;
    let worker = spawn_worker(&server);
    worker.send(Work).await.expect("works");
    let (status, body) = get_json(&server, "/_health").await;
    assert_eq!(
        (status, &body["checks"]["worker"]),
        (200, &Value::from("ok"))
    );

    tokio::time::sleep(WORKER_DEADLINE + Duration::from_millis(300)).await;
    let (status, body) = get_json(&server, "/_health").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "error");
    let check = body["checks"]["worker"].as_str().expect("named");
    assert_eq!(check, "stale: no progress for 1s (deadline 1s)");

    worker.send(Work).await.expect("works again");
    let (status, _) = get_json(&server, "/_health").await;
    assert_eq!(status, 200, "progress makes it healthy again");
    server.shutdown().await;
}

/// Records the order in which it is drained, and the readiness it saw meanwhile.
struct Drainable {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
    health: actix::Addr<plugin_server_actors::system::health::Health>,
}

impl Actor for Drainable {
    type Context = Context<Self>;
}

impl Handler<Shutdown> for Drainable {
    type Result = actix::ResponseActFuture<Self, ()>;
    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        use actix::WrapFuture;
        let health = self.health.clone();
        let log = Arc::clone(&self.log);
        let name = self.name;
        Box::pin(
            async move {
                let readiness = health.send(GetReadiness).await.expect("health answers");
                log.lock()
                    .expect("lock")
                    .push(format!("{name}:{readiness:?}"));
            }
            .into_actor(self)
            .map(|_, _, ctx: &mut Context<Self>| ctx.stop()),
        )
    }
}

#[actix::test]
async fn shutdown_turns_readiness_off_then_drains_in_reverse_start_order() {
    let mut server = start_server().await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let health = server.topology().health.addr().clone();
    for name in ["writer", "pipeline", "consumer"] {
        let addr = Drainable {
            name,
            log: Arc::clone(&log),
            health: health.clone(),
        }
        .start();
        server
            .topology_mut()
            .drain_on_shutdown(name, addr.recipient());
    }
    let url = format!("http://{}/_ready", server.local_addr());
    server.shutdown().await;
    assert_eq!(
        *log.lock().expect("lock"),
        vec![
            "consumer:ShuttingDown".to_owned(),
            "pipeline:ShuttingDown".to_owned(),
            "writer:ShuttingDown".to_owned(),
        ]
    );
    assert!(
        reqwest::get(&url).await.is_err(),
        "the listener is closed after shutdown"
    );
}
