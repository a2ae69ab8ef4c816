//! Stores of a test's own, for the chaos tests that restart them: Redis, Postgres or ClickHouse
//! started as a child process on free ports, with its data in a temporary directory, so that a
//! test can SIGKILL it (no shutdown, no flush) and start it again on the same data while the
//! shared services of the other tests keep running.
//!
//! They use the binaries `docker/services.sh start` installed: `redis-server`,
//! `clickhouse-server` and PostgreSQL 15 under `PG_BIN` (default `/usr/lib/postgresql/15/bin`).
//! Postgres refuses to run as root, so under root it runs as the `postgres` user, as the shared
//! one does.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// With an append-only file fsynced on every write, as a deployment that must not lose
    /// queued messages runs it.
    Redis,
    Postgres,
    ClickHouse,
}

pub struct PrivateStore {
    kind: StoreKind,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// The user the process runs as (Postgres under root).
    user: Option<(u32, u32)>,
    /// ClickHouse's HTTPS port, when it serves one.
    https_port: Option<u16>,
}

/// How long a store may take to answer after a (re)start: Postgres replays its WAL after a
/// SIGKILL, Redis its append-only file.
const START_TIMEOUT: Duration = Duration::from_secs(60);

impl PrivateStore {
    /// Prepares the data directory and starts the store; returns once it answers.
    pub async fn start(kind: StoreKind) -> Self {
        let mut store = Self::prepare(kind);
        store.restart().await;
        store
    }

    fn prepare(kind: StoreKind) -> Self {
        plugin_server::telemetry::install_tls_provider();
        let dir = tempfile::Builder::new()
            .prefix("ps-private-store-")
            .tempdir()
            .expect("tempdir");
        let mut store = Self {
            kind,
            port: free_port(),
            user: None,
            dir,
            child: None,
            https_port: None,
        };
        match kind {
            StoreKind::Redis => {}
            StoreKind::Postgres => store.init_postgres(),
            StoreKind::ClickHouse => store.write_clickhouse_config(),
        }
        store
    }

    /// A ClickHouse that also serves HTTPS with the certificate and key of `tls`.
    pub async fn start_clickhouse_https(tls: &TestCertificates) -> Self {
        let mut store = Self::prepare(StoreKind::ClickHouse);
        let port = free_port();
        let config_d = store.dir.path().join("config.d");
        std::fs::create_dir_all(&config_d).expect("config.d");
        // The packaged config names a Diffie-Hellman file that does not exist, which leaves
        // the HTTPS port silently closed: removed.
        std::fs::write(
            config_d.join("tls.xml"),
            format!(
                "<?xml version=\"1.0\"?>\n<yandex>\n  <https_port>{port}</https_port>\n  \
                 <openSSL><server>\n    <certificateFile>{}</certificateFile>\n    \
                 <privateKeyFile>{}</privateKeyFile>\n    <dhParamsFile remove=\"1\"/>\n    \
                 <verificationMode>none</verificationMode>\n    \
                 <loadDefaultCAFile>false</loadDefaultCAFile>\n  </server></openSSL>\n</yandex>\n",
                tls.server_certificate.display(),
                tls.server_key.display()
            ),
        )
        .expect("tls.xml");
        store.https_port = Some(port);
        store.restart().await;
        store
    }

    /// ClickHouse's `https://127.0.0.1:<port>`, with `start_clickhouse_https`.
    pub fn https_url(&self) -> String {
        format!(
            "https://127.0.0.1:{}",
            self.https_port.expect("started with HTTPS")
        )
    }

    /// Where clients reach it: `redis://…`, `postgres://postgres@…` (no database) or
    /// ClickHouse's `http://…`.
    pub fn url(&self) -> String {
        match self.kind {
            StoreKind::Redis => format!("redis://127.0.0.1:{}", self.port),
            StoreKind::Postgres => format!("postgres://postgres@127.0.0.1:{}", self.port),
            StoreKind::ClickHouse => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// SIGKILL: the process gets no chance to flush or close anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process on the same data and port; returns once it answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "{:?} is running", self.kind);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.command().spawn().expect("store binary runs");
            self.child = Some(child);
            while Instant::now() < deadline {
                if self.answers().await {
                    return;
                }
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    // Postgres exits at once while the backends of the killed postmaster still
                    // hold its shared memory; they go within moments, so try again.
                    eprintln!("{:?} exited with {status} while starting; again", self.kind);
                    self.child = None;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(
                Instant::now() < deadline,
                "{:?} did not answer within {START_TIMEOUT:?}; see {}",
                self.kind,
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn command(&self) -> Command {
        let dir = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("store.log"))
            .expect("log file");
        let mut command = match self.kind {
            StoreKind::Redis => {
                let mut command = Command::new("redis-server");
                command.args(["--bind", "127.0.0.1", "--port", &self.port.to_string()]);
                command.args(["--dir", dir.to_str().expect("utf-8 path")]);
                command.args([
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--save",
                    "",
                ]);
                command
            }
            StoreKind::Postgres => {
                let mut command = Command::new(pg_bin().join("postgres"));
                command
                    .arg("-D")
                    .arg(dir.join("pg"))
                    .args(["-p", &self.port.to_string()])
                    .arg("-k")
                    .arg(dir)
                    .args(["-c", "listen_addresses=127.0.0.1"])
                    .args(["-c", "fsync=off", "-c", "max_connections=100"]);
                if let Some((uid, gid)) = self.user {
                    command.uid(uid).gid(gid);
                }
                command
            }
            StoreKind::ClickHouse => {
                let mut command = Command::new("clickhouse-server");
                command.arg(format!(
                    "--config-file={}",
                    dir.join("config.xml").display()
                ));
                command
            }
        };
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        command
    }

    async fn answers(&self) -> bool {
        match self.kind {
            StoreKind::Redis => redis_ping(self.port).await,
            StoreKind::Postgres => {
                tokio_postgres::connect(&format!("{}/postgres", self.url()), tokio_postgres::NoTls)
                    .await
                    .is_ok()
            }
            StoreKind::ClickHouse => {
                let http = reqwest::get(format!("{}/ping", self.url()))
                    .await
                    .is_ok_and(|response| response.status().is_success());
                // The HTTPS port opens with the others, or never (see the config).
                http && self
                    .https_port
                    .is_none_or(|port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
            }
        }
    }

    fn init_postgres(&mut self) {
        let dir = self.dir.path();
        if running_as_root() {
            let uid = id_of("-u");
            let gid = id_of("-g");
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown");
            self.user = Some((uid, gid));
        }
        let mut initdb = Command::new(pg_bin().join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.join("pg"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null());
        if let Some((uid, gid)) = self.user {
            initdb.uid(uid).gid(gid);
        }
        let output = initdb.output().expect("initdb runs");
        assert!(
            output.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The packaged config with the state under this store's directory, IPv4 loopback only
    /// and free ports (as `docker/services.sh` writes the shared one).
    fn write_clickhouse_config(&self) {
        let dir = self.dir.path();
        let packaged = std::fs::read_to_string("/etc/clickhouse-server/config.xml")
            .expect("clickhouse-server's packaged config");
        let state = format!("{}/", dir.join("data").display());
        let logs = format!("{}/", dir.join("log").display());
        let config = packaged
            .replace("/var/lib/clickhouse/", &state)
            .replace("/var/log/clickhouse-server/", &logs)
            .replace("<listen_host>::1</listen_host>", "")
            .replace("<http_port>8123<", &format!("<http_port>{}<", self.port))
            .replace("<tcp_port>9000<", &format!("<tcp_port>{}<", free_port()))
            .replace(
                "<interserver_http_port>9009<",
                &format!("<interserver_http_port>{}<", free_port()),
            );
        std::fs::create_dir_all(dir.join("log")).expect("log dir");
        std::fs::write(dir.join("config.xml"), config).expect("config");
        std::fs::copy("/etc/clickhouse-server/users.xml", dir.join("users.xml"))
            .expect("users.xml");
    }
}

impl Drop for PrivateStore {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pg_bin() -> PathBuf {
    std::env::var_os("PG_BIN").map_or_else(
        || PathBuf::from("/usr/lib/postgresql/15/bin"),
        PathBuf::from,
    )
}

fn running_as_root() -> bool {
    id_text(&["-u"]) == "0"
}

/// The `postgres` user's uid (`-u`) or gid (`-g`).
fn id_of(flag: &str) -> u32 {
    id_text(&[flag, "postgres"])
        .parse()
        .expect("the postgres user exists (docker/services.sh installs it)")
}

fn id_text(args: &[&str]) -> String {
    let output = Command::new("id").args(args).output().expect("id runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// PONG, not LOADING: Redis answers errors while it replays its append-only file.
async fn redis_ping(port: u16) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    matches!(stream.read(&mut reply).await, Ok(n) if reply[..n].starts_with(b"+PONG"))
}

/// A Kafka-compatible broker of a test's own (tansu, memory storage, `TANSU_BIN` from
/// `docker/services.sh env`) that clients reach only through a TCP proxy the test can cut. The
/// broker advertises the proxy's address, so every connection librdkafka opens, the ones it
/// makes after reading metadata included, passes the proxy. tansu keeps its topics in memory,
/// so an outage is made by cutting the proxy rather than by killing the broker.
pub struct ProxiedBroker {
    _dir: tempfile::TempDir,
    broker: Child,
    proxy_port: u16,
    proxy: tokio::task::JoinHandle<()>,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl ProxiedBroker {
    pub async fn start() -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};

        let binary = std::env::var("TANSU_BIN").expect("TANSU_BIN: run functional_tests/run.sh");
        assert!(
            std::path::Path::new(&binary).is_file(),
            "no broker binary at TANSU_BIN={binary}: run docker/services.sh start"
        );
        let dir = tempfile::Builder::new()
            .prefix("ps-private-broker-")
            .tempdir()
            .expect("tempdir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy port");
        let proxy_port = listener.local_addr().expect("proxy address").port();
        let broker_port = free_port();
        let log = std::fs::File::create(dir.path().join("broker.log")).expect("log file");
        let broker = Command::new(&binary)
            .arg("broker")
            .args(["--listener-url", &format!("tcp://127.0.0.1:{broker_port}")])
            .args([
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{proxy_port}"),
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("broker binary runs");
        let deadline = Instant::now() + START_TIMEOUT;
        while tokio::net::TcpStream::connect(("127.0.0.1", broker_port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the private broker did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let open = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let proxy = tokio::spawn({
            let (open, connections) = (Arc::clone(&open), Arc::clone(&connections));
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        // Cut: the connection is closed at once, as by a broker that is gone.
                        continue;
                    }
                    let Ok(mut upstream) =
                        tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await
                    else {
                        continue;
                    };
                    let relay = tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    });
                    let mut live = connections.lock().expect("connections");
                    live.retain(|handle: &tokio::task::AbortHandle| !handle.is_finished());
                    live.push(relay.abort_handle());
                }
            }
        });
        Self {
            _dir: dir,
            broker,
            proxy_port,
            proxy,
            open,
            connections,
        }
    }

    /// `KAFKA_HOSTS` for clients: the proxy.
    pub fn hosts(&self) -> String {
        format!("127.0.0.1:{}", self.proxy_port)
    }

    /// Unreachable: open connections are closed and new ones closed on arrival.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for relay in self.connections.lock().expect("connections").drain(..) {
            relay.abort();
        }
    }

    /// Reachable again.
    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for ProxiedBroker {
    fn drop(&mut self) {
        self.proxy.abort();
        self.cut();
        let _ = self.broker.kill();
        let _ = self.broker.wait();
    }
}

/// A certificate authority of a test's own and a server certificate it signed for 127.0.0.1
/// and localhost (rustls wants the names as subject alternative names, and refuses a
/// self-signed server certificate used as its own CA), made with the `openssl` command.
pub struct TestCertificates {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_certificate: PathBuf,
    pub server_key: PathBuf,
}

impl TestCertificates {
    pub fn create() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ps-test-tls-")
            .tempdir()
            .expect("tempdir");
        let path = |name: &str| dir.path().join(name);
        let openssl = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl runs (docker/services.sh installs it)");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-sha256",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=plugin-server test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            path("server.ext"),
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\n\
             subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("server.ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-sha256",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ]);
        Self {
            ca: path("ca.pem"),
            server_certificate: path("server.crt"),
            server_key: path("server.key"),
            _dir: dir,
        }
    }
}
