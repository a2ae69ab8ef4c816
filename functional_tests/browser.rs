//! A real browser SDK against the embedded default (issue 26): headless Chromium loads a page
//! with posthog-js (`POSTHOG_JS`, the pinned npm bundle `docker/fetch_browser.sh` fetches)
//! pointed at the server, clicks a button and navigates. The SDK loads its remote config from
//! the server (which turns autocapture on), compresses as it likes, and every event it sends
//! is stored under the token's team: both `$pageview`s, the `$autocapture` of the click with
//! its `elements_chain`, the custom event, and `$pageleave`.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::ServerProcess;

const TOKEN: &str = "phc_browser_test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posthog_js_in_chromium_is_stored_pageviews_autocapture_and_all() {
    let chromium = std::env::var("CHROMIUM").expect("CHROMIUM: run functional_tests/run.sh");
    let bundle = std::env::var("POSTHOG_JS").expect("POSTHOG_JS: run functional_tests/run.sh");
    let base = tempfile::tempdir().expect("tempdir");
    let server =
        ServerProcess::start(&[("BASE_DIR", base.path().to_str().expect("utf-8").to_owned())]);
    let api_host = format!("http://{}", server.addr());

    // The SDK is told nothing but where to send: what it does after is the remote config's
    // doing. The button is clicked once the config has had time to arrive (autocapture starts
    // with it), then the page navigates, which sends `$pageleave` and a second `$pageview`.
    // Both are timed from the SDK's `loaded`, not from the page's: on a busy machine the SDK
    // once loaded too late for a click timed from the page (CI, stop 22).
    let init = |loaded: &str| {
        format!(
            "posthog.init({TOKEN:?}, {{ api_host: {api_host:?}, opt_out_useragent_filter: true, \
             disable_session_recording: true, persistence: 'memory'{loaded} }})"
        )
    };
    let index = format!(
        "<!doctype html><html><head><title>shop</title><script src=\"/array.js\"></script>\
         <script>{init}</script></head><body>\
         <div class=\"products\"><button id=\"buy\" class=\"cta primary\">Buy now</button></div>\
         </body></html>",
        init = init(
            ", loaded: () => { \
             setTimeout(() => { document.getElementById('buy').click(); \
             posthog.capture('checkout started', { plan: 'pro' }) }, 1500); \
             setTimeout(() => { location.href = '/thanks.html' }, 4000) }"
        )
    );
    let thanks = format!(
        "<!doctype html><html><head><title>thanks</title><script src=\"/array.js\"></script>\
         <script>{init}</script></head><body>Thanks</body></html>",
        init = init("")
    );
    let site = StaticSite::start(HashMap::from([
        ("/index.html", ("text/html", index.into_bytes())),
        ("/thanks.html", ("text/html", thanks.into_bytes())),
        (
            "/array.js",
            (
                "application/javascript",
                std::fs::read(&bundle).expect("the posthog-js bundle"),
            ),
        ),
    ]))
    .await;

    let profile = tempfile::tempdir().expect("browser profile");
    let _browser = Browser::open(
        &chromium,
        profile.path(),
        &format!("{}/index.html", site.url),
    );

    let wanted = [
        "$pageview",
        "$autocapture",
        "checkout started",
        "$pageleave",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let events = loop {
        let events = stored_events(base.path());
        let pageviews = events.iter().filter(|e| e["event"] == "$pageview").count();
        if pageviews >= 2
            && wanted
                .iter()
                .all(|w| events.iter().any(|e| e["event"] == *w))
        {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "not every event arrived within 60 s: {:#?}",
            events.iter().map(|e| &e["event"]).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    let team = events[0]["team_id"].clone();
    assert!(team.as_i64().is_some_and(|id| id > 0), "{team}");
    for event in &events {
        assert_eq!(event["team_id"], team, "one team for the token: {event}");
        assert_eq!(event["properties"]["$lib"], "web", "{event}");
    }
    let click = events
        .iter()
        .find(|e| e["event"] == "$autocapture")
        .expect("autocapture");
    let chain = click["elements_chain"].as_str().expect("elements_chain");
    assert!(
        chain.starts_with("button") && chain.contains("Buy now") && chain.contains("cta"),
        "{chain}"
    );
    // Stored as a column, not kept in the properties.
    assert!(click["properties"].get("$elements").is_none(), "{click}");
    assert!(
        click["properties"].get("$elements_chain").is_none(),
        "{click}"
    );
    let custom = events
        .iter()
        .find(|e| e["event"] == "checkout started")
        .expect("custom event");
    assert_eq!(custom["properties"]["plan"], "pro");
    let urls: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "$pageview")
        .filter_map(|e| e["properties"]["$current_url"].as_str())
        .collect();
    assert!(
        urls.iter().any(|url| url.ends_with("/index.html")),
        "{urls:?}"
    );
    assert!(
        urls.iter().any(|url| url.ends_with("/thanks.html")),
        "{urls:?}"
    );
}

/// The stored event rows, skipping a line still being written.
fn stored_events(base_dir: &Path) -> Vec<Value> {
    let Ok(entries) = std::fs::read_dir(base_dir.join("data")) else {
        return Vec::new();
    };
    let mut events = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let is_events = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("events-"));
        if !is_events {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines() {
            let Ok(mut row) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if let Some(properties) = row["properties"].as_str() {
                row["properties"] = serde_json::from_str(properties).unwrap_or(Value::Null);
            }
            events.push(row);
        }
    }
    events
}

/// Headless Chromium on one page, killed when dropped.
struct Browser(Child);

impl Browser {
    fn open(binary: &str, profile: &Path, url: &str) -> Self {
        let child = Command::new(binary)
            .args(["--headless=new", "--no-sandbox", "--disable-gpu"])
            .args(["--no-first-run", "--disable-extensions"])
            // A fresh profile: the SDK remembers a remote config between visits.
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium runs");
        Self(child)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The page's own origin: serves a few files, each with its content type.
struct StaticSite {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl StaticSite {
    async fn start(files: HashMap<&'static str, (&'static str, Vec<u8>)>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let files = std::sync::Arc::new(files);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let files = std::sync::Arc::clone(&files);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head);
                    let path = head.split(' ').nth(1).unwrap_or("/");
                    let path = path.split('?').next().unwrap_or(path);
                    let response = match files.get(path) {
                        Some((content_type, body)) => {
                            let mut response = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n\
                                 content-length: {}\r\nconnection: close\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            response.extend_from_slice(body);
                            response
                        }
                        None => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            .to_vec(),
                    };
                    let _ = stream.write_all(&response).await;
                });
            }
        });
        Self { url, task }
    }
}

impl Drop for StaticSite {
    fn drop(&mut self) {
        self.task.abort();
    }
}
