//! `ProcessWorker`: the server's end of a plugin worker process. It starts the process, sends
//! it the pool's requests in order, answers its host calls on a thread of its own (built by the
//! pool's host factory, as a worker thread's host is), and passes its reports on to the pool's
//! metrics and `/_actors`. When the process reports itself stuck, it is killed; when it is
//! gone for any reason, every request still waiting gets no answer and the pool's watchdog
//! starts another.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{HistogramVec, IntCounterVec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::protocol::{
    ConfigOnWire, FrameError, FromWorker, HostCall, HostReply, KEEP_BUFFER_BYTES, ReplyValue,
    Request, StuckReport, ToWorker, WorkerReport, WorkerSettings, decode, encode_into,
    frame_length, reuse,
};
use super::{WORKER_ENV, WorkerCommand};
use crate::plugins::LoadedConfig;
use crate::plugins::pool::HostFactory;
use crate::plugins::runtime::natives::{PluginHost, WorkerLoad};
use crate::plugins::worker::SideEffects;

/// See [`Connection::failed_to_start`].
const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// The pool's metrics that a worker process's reports go to.
#[derive(Clone)]
pub struct ProcessInstruments {
    pub load: Arc<WorkerLoad>,
    /// Per worker: the heap its live VMs took to load (the pool's `BudgetShare::held`).
    pub held: Arc<[AtomicI64]>,
    pub durations: HistogramVec,
    pub torn_down: IntCounterVec,
}

/// A reply from the process.
#[derive(Debug)]
pub struct Replied {
    pub value: ReplyValue,
    pub side: SideEffects,
}

/// A handle to one worker process; cloned handles share it, and the process is killed when
/// the last one drops.
#[derive(Clone)]
pub struct ProcessWorker {
    shared: Arc<Shared>,
}

struct Shared {
    sending: Mutex<Sending>,
    /// Cancelled once the process is gone.
    exited: CancellationToken,
    /// Cancelled when the last handle drops: the process is then killed.
    shutdown: CancellationToken,
    stuck: Mutex<Option<StuckReport>>,
    /// The request the process is answering, and since when.
    running: Mutex<Option<(u64, Instant)>>,
    held: Arc<[AtomicI64]>,
    pid: AtomicU64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What keeps requests in the order the process reads them: frames are queued under one lock,
/// with the record of which configs the process already has.
struct Sending {
    frames: mpsc::UnboundedSender<ToWorker>,
    waiting: HashMap<u64, oneshot::Sender<Replied>>,
    /// Per config id, the version the process has.
    configs: HashMap<i64, String>,
}

impl Sending {
    fn config(&mut self, config: &Arc<LoadedConfig>) -> ConfigOnWire {
        let id = config.identity.plugin_config_id;
        if self.configs.get(&id) == Some(&config.version) {
            return ConfigOnWire::Known(id);
        }
        self.configs.insert(id, config.version.clone());
        ConfigOnWire::Full(Arc::clone(config))
    }
}

/// Builds a request's body, turning the configs it carries into what crosses the socket.
pub struct RequestBuilder<'a> {
    sending: &'a mut Sending,
}

impl RequestBuilder<'_> {
    pub fn config(&mut self, config: &Arc<LoadedConfig>) -> ConfigOnWire {
        self.sending.config(config)
    }

    pub fn chain(&mut self, chain: &[Arc<LoadedConfig>]) -> Vec<ConfigOnWire> {
        chain
            .iter()
            .map(|config| self.sending.config(config))
            .collect()
    }

    /// After a reload the process forgets the configs that are gone or changed; so does this
    /// record of them.
    pub fn retire(&mut self, current: &HashMap<i64, String>) {
        self.sending
            .configs
            .retain(|id, version| current.get(id) == Some(version));
    }
}

impl ProcessWorker {
    /// Starts the process in the background; requests queue until it connects. Must run
    /// inside an actix system.
    pub fn spawn(
        command: &WorkerCommand,
        settings: WorkerSettings,
        host_factory: HostFactory,
        instruments: ProcessInstruments,
    ) -> Self {
        let (frames, outgoing) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            sending: Mutex::new(Sending {
                frames: frames.clone(),
                waiting: HashMap::new(),
                configs: HashMap::new(),
            }),
            exited: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            stuck: Mutex::new(None),
            running: Mutex::new(None),
            held: Arc::clone(&instruments.held),
            pid: AtomicU64::new(0),
        });
        let connection = Connection {
            command: command.clone(),
            settings,
            host_factory,
            instruments,
            frames,
            shared: Arc::downgrade(&shared),
            exited: shared.exited.clone(),
            shutdown: shared.shutdown.clone(),
        };
        actix::spawn(connection.run(outgoing));
        Self { shared }
    }

    /// Sends a request and waits for its reply; `None` if the process is gone first.
    pub async fn request(
        &self,
        id: u64,
        build: impl FnOnce(&mut RequestBuilder<'_>) -> Request,
    ) -> Option<Replied> {
        let reply = {
            let mut sending = self.shared.sending.lock().ok()?;
            let body = build(&mut RequestBuilder {
                sending: &mut sending,
            });
            let held = self
                .shared
                .held
                .iter()
                .map(|held| held.load(Ordering::Relaxed))
                .collect();
            let (reply, receive) = oneshot::channel();
            sending.waiting.insert(id, reply);
            sending
                .frames
                .send(ToWorker::Request { id, held, body })
                .ok()?;
            receive
        };
        tokio::select! {
            reply = reply => reply.ok(),
            () = self.shared.exited.cancelled() => None,
        }
    }

    /// Whether the process is gone (it reported itself stuck, crashed or was killed).
    pub fn exited(&self) -> bool {
        self.shared.exited.is_cancelled()
    }

    /// What the process said before it was ended, if it said anything.
    pub fn stuck_report(&self) -> Option<StuckReport> {
        self.shared
            .stuck
            .lock()
            .ok()
            .and_then(|stuck| stuck.clone())
    }

    /// How long the process has been answering its current request, if it is.
    pub fn busy(&self) -> Option<Duration> {
        let running = self.shared.running.lock().ok()?;
        running.map(|(_, since)| since.elapsed())
    }

    /// The request the process was answering (it said it began it and never replied): the
    /// one to blame when the process dies without a word, as on a native stack overflow.
    pub fn running_request(&self) -> Option<u64> {
        let running = self.shared.running.lock().ok()?;
        running.map(|(id, _)| id)
    }

    /// The process id, 0 until it started.
    pub fn pid(&self) -> u32 {
        self.shared.pid.load(Ordering::Relaxed) as u32
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("could not make the socket pair for a worker process: {0}")]
    Socket(#[source] std::io::Error),
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the worker process could not start its host thread: {0}")]
    HostThread(#[source] std::io::Error),
}

struct Connection {
    command: WorkerCommand,
    settings: WorkerSettings,
    host_factory: HostFactory,
    instruments: ProcessInstruments,
    frames: mpsc::UnboundedSender<ToWorker>,
    shared: std::sync::Weak<Shared>,
    exited: CancellationToken,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(self, outgoing: mpsc::UnboundedReceiver<ToWorker>) {
        let index = self.settings.index;
        if let Err(error) = self.serve(outgoing).await {
            tracing::error!(worker = index, %error, "plugin worker process failed");
        }
    }

    async fn serve(
        &self,
        mut outgoing: mpsc::UnboundedReceiver<ToWorker>,
    ) -> Result<(), ConnectionError> {
        // The socket is one end of a pair, the process's stdin the other: nothing on the file
        // system to clean up or to guard (the plugins' code and configs, API keys among
        // them, cross it), and no writable TMPDIR needed.
        let pair = std::os::unix::net::UnixStream::pair().and_then(|(ours, theirs)| {
            ours.set_nonblocking(true)?;
            Ok((tokio::net::UnixStream::from_std(ours)?, theirs))
        });
        let (stream, theirs) = match pair {
            Ok(pair) => pair,
            Err(source) => {
                self.failed_to_start().await;
                return Err(ConnectionError::Socket(source));
            }
        };
        let spawned = tokio::process::Command::new(&self.command.program)
            .args(&self.command.args)
            .envs(self.command.env.iter().map(|(key, value)| (key, value)))
            .env(WORKER_ENV, "1")
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            // Its logs are the server's (stderr); what a test harness prints is not.
            .stdout(Stdio::null())
            // A group of its own: a terminal's Ctrl-C reaches the server only, which then
            // tears the plugins down in their processes before it ends them.
            .process_group(0)
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(source) => {
                self.failed_to_start().await;
                return Err(ConnectionError::Spawn {
                    program: self.command.program.display().to_string(),
                    source,
                });
            }
        };
        if let Some(shared) = self.shared.upgrade() {
            shared
                .pid
                .store(u64::from(child.id().unwrap_or(0)), Ordering::Relaxed);
        }
        let (mut read, mut write) = stream.into_split();
        let start = ToWorker::Start(self.settings.clone());
        let writer = async move {
            let mut frame = Vec::new();
            encode_into(&mut frame, &start)?;
            write.write_all(&frame).await.map_err(FrameError::from)?;
            while let Some(message) = outgoing.recv().await {
                encode_into(&mut frame, &message)?;
                write.write_all(&frame).await.map_err(FrameError::from)?;
                if frame.capacity() > KEEP_BUFFER_BYTES {
                    frame = Vec::new();
                }
            }
            Ok::<(), FrameError>(())
        };
        let host_calls = self.spawn_host_thread()?;
        // Whether the process got as far as its settings: one that ends before is not
        // started again at once (see `failed_to_start`).
        let mut ready = false;
        let reader = async {
            let mut frame = Vec::new();
            loop {
                if !read_frame_into(&mut read, &mut frame).await? {
                    return Ok::<(), ConnectionError>(());
                }
                match decode::<FromWorker>(&frame)? {
                    FromWorker::Ready => ready = true,
                    FromWorker::Began { id } => {
                        if let Some(shared) = self.shared.upgrade()
                            && let Ok(mut running) = shared.running.lock()
                        {
                            *running = Some((id, Instant::now()));
                        }
                    }
                    FromWorker::Reply {
                        id,
                        value,
                        side,
                        report,
                    } => {
                        self.record(report);
                        if let Some(shared) = self.shared.upgrade()
                            && let Ok(mut running) = shared.running.lock()
                            && running.is_some_and(|(running, _)| running == id)
                        {
                            *running = None;
                        }
                        let waiting = self
                            .shared
                            .upgrade()
                            .and_then(|shared| shared.sending.lock().ok()?.waiting.remove(&id));
                        if let Some(waiting) = waiting {
                            let _ = waiting.send(Replied { value, side });
                        }
                    }
                    FromWorker::Host(call) => {
                        if host_calls.send(call).is_err() {
                            return Ok(());
                        }
                    }
                    // The pool's watchdog logs it when it replaces the process.
                    FromWorker::Stuck(report) => {
                        if let Some(shared) = self.shared.upgrade()
                            && let Ok(mut stuck) = shared.stuck.lock()
                        {
                            *stuck = Some(report);
                        }
                        return Ok(());
                    }
                }
            }
        };
        let outcome = tokio::select! {
            outcome = reader => outcome,
            written = writer => written.map_err(ConnectionError::Frame),
            () = self.shutdown.cancelled() => Ok(()),
        };
        let never_started = !ready && !self.shutdown.is_cancelled();
        self.end(&mut child, never_started).await;
        outcome
    }

    /// A process that never got to serve is replaced no sooner than this, so that a command
    /// that cannot start does not start again many times a second.
    async fn failed_to_start(&self) {
        self.finish(true).await;
    }

    /// Kills the process and reaps it, then lets every waiting request go; after a pause
    /// if it `never_started` (see `failed_to_start`).
    async fn end(&self, child: &mut tokio::process::Child, never_started: bool) {
        let _ = child.start_kill();
        let _ = child.wait().await;
        self.finish(never_started).await;
    }

    /// Lets every waiting request go and says the process has exited, after a pause first
    /// when it never started.
    async fn finish(&self, pause: bool) {
        if pause {
            tokio::time::sleep(RESTART_BACKOFF).await;
        }
        if let Some(shared) = self.shared.upgrade()
            && let Ok(mut sending) = shared.sending.lock()
        {
            sending.waiting.clear();
        }
        self.exited.cancel();
    }

    fn record(&self, report: WorkerReport) {
        let instruments = &self.instruments;
        instruments.load.vms.store(report.vms, Ordering::Relaxed);
        instruments
            .load
            .vm_heap_bytes_at_load
            .store(report.vm_heap_bytes_at_load, Ordering::Relaxed);
        instruments
            .load
            .evicted
            .store(report.evicted, Ordering::Relaxed);
        if let Some(held) = instruments.held.get(self.settings.index) {
            held.store(report.vm_heap_bytes_at_load, Ordering::Relaxed);
        }
        for (method, samples) in report.durations {
            let histogram = instruments.durations.with_label_values(&[method.as_str()]);
            for seconds in samples {
                histogram.observe(seconds);
            }
        }
        for (reason, count) in report.torn_down {
            instruments
                .torn_down
                .with_label_values(&[reason.as_str()])
                .inc_by(count);
        }
    }

    /// The host of this process's calls: a thread of its own, so that a slow fetch waits there
    /// and not on the server's runtime; the process makes one call at a time.
    fn spawn_host_thread(&self) -> Result<std::sync::mpsc::Sender<HostCall>, ConnectionError> {
        let (calls, received) = std::sync::mpsc::channel::<HostCall>();
        let factory = Arc::clone(&self.host_factory);
        let frames = self.frames.clone();
        std::thread::Builder::new()
            .name(format!("plugin-host-{}", self.settings.index))
            .spawn(move || {
                let host = factory();
                while let Ok(call) = received.recv() {
                    let reply = serve_host_call(host.as_ref(), call);
                    if frames.send(ToWorker::Host(reply)).is_err() {
                        return;
                    }
                }
            })
            .map_err(ConnectionError::HostThread)?;
        Ok(calls)
    }
}

fn serve_host_call(host: &dyn PluginHost, call: HostCall) -> HostReply {
    let text = |error: crate::plugins::host_services::HostServiceError| error.to_string();
    match call {
        HostCall::Fetch(request) => HostReply::Fetched(host.fetch(request).map_err(text)),
        HostCall::Cache(identity, op) => HostReply::Value(host.cache(&identity, op).map_err(text)),
        HostCall::Storage(identity, op) => {
            HostReply::Value(host.storage(&identity, op).map_err(text))
        }
        HostCall::Api(identity, with_keys) => {
            HostReply::Value(host.api(&identity, with_keys).map_err(text))
        }
        HostCall::Geoip(ip) => HostReply::Value(Ok(host.geoip(&ip))),
        HostCall::EnqueueJob(identity, job) => {
            HostReply::Value(host.enqueue_job(&identity, job).map_err(text))
        }
    }
}

/// [`super::protocol::read_frame_into`] on the server's runtime.
async fn read_frame_into(
    read: &mut tokio::net::unix::OwnedReadHalf,
    body: &mut Vec<u8>,
) -> Result<bool, ConnectionError> {
    let mut length = [0; 4];
    match read.read_exact(&mut length).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(error) => return Err(ConnectionError::Frame(error.into())),
    }
    reuse(body, frame_length(length)?);
    read.read_exact(body)
        .await
        .map_err(|error| ConnectionError::Frame(error.into()))?;
    Ok(true)
}
