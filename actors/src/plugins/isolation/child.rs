//! The plugin worker process: one `VmWorker` on its main thread, answering the server's
//! requests in order over a Unix socket, with its host services served by the server.
//!
//! Two more threads: one reads the socket (requests queue for the worker; host replies go to
//! the call waiting for them), and a watchdog that tells the server when the worker thread is
//! stopped for good (its memory budget ran out, or one call ran past twice TASK_TIMEOUT in code
//! the deadline cannot interrupt). The server then kills the process, which gives the memory
//! back and stops the CPU, and starts another.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use serde_json::Value;

use super::protocol::{
    ConfigOnWire, FrameError, FromWorker, HostCall, HostReply, ReplyValue, Request, StuckReport,
    ToWorker, WorkerReport, WorkerSettings, decode, read_frame, read_frame_into, write_message,
};
use crate::plugins::LoadedConfig;
use crate::plugins::host_services::HostServiceError;
use crate::plugins::runtime::VmIdentity;
use crate::plugins::runtime::natives::{
    self, CacheOp, FetchReply, FetchRequest, Heartbeat, JobRequest, PluginHost, StorageOp,
    WorkerInstruments, WorkerLoad,
};
use crate::plugins::worker::{
    Answer, BudgetShare, FlushExports, Inspect, ProcessEvents, Retire, RunAsync, RunJob,
    RunScheduled, Sweep, TeardownAll, VmWorker,
};

/// How often the watchdog looks at the worker thread.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// After reporting itself stuck, the process waits this long for the server to end it, then
/// exits on its own.
const EXIT_AFTER_STUCK: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WorkerProcessError {
    #[error("stdin is not the server's socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the server's first frame was not its settings")]
    NoSettings,
    #[error("the server referred to plugin config {0}, which it never sent")]
    UnknownConfig(i64),
    #[error("the server sent a host reply nobody asked for")]
    UnexpectedHostReply,
}

/// The socket's writing end and the buffer frames are encoded in.
struct FrameWriter {
    stream: UnixStream,
    scratch: Vec<u8>,
}

type Writer = Arc<Mutex<FrameWriter>>;

/// Runs a worker process until the server closes the socket, which is the process's stdin.
/// Call it from the process's main thread: the VMs live there.
pub fn run() -> Result<(), WorkerProcessError> {
    let stream = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(UnixStream::from)
        .map_err(WorkerProcessError::Socket)?;
    let mut reader = stream.try_clone().map_err(FrameError::from)?;
    let writer: Writer = Arc::new(Mutex::new(FrameWriter {
        stream,
        scratch: Vec::new(),
    }));
    let settings = match read_frame(&mut reader)? {
        Some(body) => match decode::<ToWorker>(&body)? {
            ToWorker::Start(settings) => settings,
            _ => return Err(WorkerProcessError::NoSettings),
        },
        None => return Ok(()),
    };
    // Started: the server no longer holds back restarting this worker.
    send(&writer, &FromWorker::Ready)?;

    let (requests, queued) = channel();
    let (host_replies, host_reply) = channel();
    std::thread::Builder::new()
        .name("plugin-worker-reader".into())
        .spawn(move || read_socket(reader, requests, host_replies))
        .map_err(FrameError::from)?;

    let heartbeat = Arc::new(Heartbeat::default());
    let load = Arc::new(WorkerLoad::default());
    spawn_watchdog(
        Arc::clone(&heartbeat),
        Arc::clone(&writer),
        settings.limits.task_timeout * 2,
    )?;
    let mut answering = Answering::new(&settings, heartbeat, load, &writer, host_reply)?;
    while let Ok((id, held, body)) = queued.recv() {
        answering.share_held(&held);
        send(&writer, &FromWorker::Began { id })?;
        let (value, side) = answering.answer(id, body)?;
        let report = answering.report();
        send(
            &writer,
            &FromWorker::Reply {
                id,
                value,
                side,
                report,
            },
        )?;
    }
    Ok(())
}

type Queued = (u64, Vec<i64>, Request);

/// Hands requests to the worker thread and host replies to the call awaiting them. When the
/// server goes away there is nothing left to do: the process ends.
fn read_socket(mut reader: UnixStream, requests: Sender<Queued>, host_replies: Sender<HostReply>) {
    let mut frame = Vec::new();
    loop {
        match read_frame_into(&mut reader, &mut frame) {
            Ok(true) => {}
            Ok(false) => std::process::exit(0),
            Err(error) => {
                tracing::error!(%error, "plugin worker process: the server's socket failed");
                std::process::exit(1);
            }
        }
        let sent = match decode::<ToWorker>(&frame) {
            Ok(ToWorker::Request { id, held, body }) => requests.send((id, held, body)).is_ok(),
            Ok(ToWorker::Host(reply)) => host_replies.send(reply).is_ok(),
            Ok(ToWorker::Start(_)) => true,
            Err(error) => {
                tracing::error!(%error, "plugin worker process: unreadable frame from the server");
                std::process::exit(1);
            }
        };
        if !sent {
            // The worker thread ended (its error is logged there).
            std::process::exit(1);
        }
    }
}

fn spawn_watchdog(
    heartbeat: Arc<Heartbeat>,
    writer: Writer,
    limit: Duration,
) -> Result<(), WorkerProcessError> {
    let stopped_before = plugin_server_alloc::threads_stopped();
    std::thread::Builder::new()
        .name("plugin-worker-watchdog".into())
        .spawn(move || {
            loop {
                std::thread::sleep(WATCH_EVERY);
                let (busy, plugin_config_id) = heartbeat.busy().unwrap_or_default();
                let out_of_memory = plugin_server_alloc::threads_stopped() > stopped_before;
                if !out_of_memory && busy < limit {
                    continue;
                }
                let report = StuckReport {
                    request_id: heartbeat.request(),
                    plugin_config_id,
                    busy,
                    out_of_memory,
                };
                // The worker thread never writes again: it is parked in the allocator or in
                // the call. It may be parked holding the writer mid-frame; then the process
                // just ends, and the server, finding the socket closed without a report,
                // replaces it all the same.
                if let Some(mut writer) = lock_within(&writer, Duration::from_secs(1)) {
                    let FrameWriter { stream, scratch } = &mut *writer;
                    let _ = write_message(stream, scratch, &FromWorker::Stuck(report));
                    drop(writer);
                    std::thread::sleep(EXIT_AFTER_STUCK);
                }
                std::process::exit(75);
            }
        })
        .map_err(FrameError::from)?;
    Ok(())
}

fn lock_within(writer: &Writer, wait: Duration) -> Option<std::sync::MutexGuard<'_, FrameWriter>> {
    let give_up = std::time::Instant::now() + wait;
    loop {
        match writer.try_lock() {
            Ok(guard) => return Some(guard),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => return Some(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if std::time::Instant::now() < give_up => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

fn send(writer: &Writer, message: &FromWorker) -> Result<(), FrameError> {
    let mut writer = writer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let FrameWriter { stream, scratch } = &mut *writer;
    write_message(stream, scratch, message)
}

/// The worker and what it knows of the server's side: configs sent so far, the pool's
/// budget shares, the metrics not yet reported.
struct Answering {
    worker: VmWorker,
    configs: HashMap<i64, Arc<LoadedConfig>>,
    held: Arc<[AtomicI64]>,
    index: usize,
    load: Arc<WorkerLoad>,
    torn_down: IntCounterVec,
    torn_down_reported: HashMap<String, u64>,
}

impl Answering {
    fn new(
        settings: &WorkerSettings,
        heartbeat: Arc<Heartbeat>,
        load: Arc<WorkerLoad>,
        writer: &Writer,
        host_reply: Receiver<HostReply>,
    ) -> Result<Self, WorkerProcessError> {
        // The process's own instruments: durations are kept for the replies instead (see
        // `natives::keep_call_durations`), teardowns are read back off this counter.
        let durations = HistogramVec::new(
            HistogramOpts::new("plugin_method_duration_seconds", "kept for the server"),
            &["method"],
        )
        .map_err(|error| FrameError::Io(std::io::Error::other(error)))?;
        let torn_down = IntCounterVec::new(
            Opts::new("plugin_vms_torn_down_total", "reported to the server"),
            &["reason"],
        )
        .map_err(|error| FrameError::Io(std::io::Error::other(error)))?;
        let held: Arc<[AtomicI64]> = (0..settings.workers.max(settings.index + 1))
            .map(|_| AtomicI64::new(0))
            .collect();
        let host = Rc::new(ServerHost {
            writer: Arc::clone(writer),
            replies: host_reply,
        });
        let worker = VmWorker::new(
            host,
            settings.limits.clone(),
            settings.setup_retry_base,
            settings.retention,
            BudgetShare {
                index: settings.index,
                held: Arc::clone(&held),
            },
            WorkerInstruments {
                heartbeat,
                load: Arc::clone(&load),
                durations,
                evictions: torn_down.clone(),
            },
        );
        natives::keep_call_durations();
        Ok(Self {
            worker,
            configs: HashMap::new(),
            held,
            index: settings.index,
            load,
            torn_down,
            torn_down_reported: HashMap::new(),
        })
    }

    /// The other workers' holdings as the server last saw them; this worker's own is its own.
    fn share_held(&self, held: &[i64]) {
        for (index, (slot, value)) in self.held.iter().zip(held).enumerate() {
            if index != self.index {
                slot.store(*value, Ordering::Relaxed);
            }
        }
    }

    fn config(&mut self, config: ConfigOnWire) -> Result<Arc<LoadedConfig>, WorkerProcessError> {
        match config {
            ConfigOnWire::Full(config) => {
                self.configs
                    .insert(config.identity.plugin_config_id, Arc::clone(&config));
                Ok(config)
            }
            ConfigOnWire::Known(id) => self
                .configs
                .get(&id)
                .cloned()
                .ok_or(WorkerProcessError::UnknownConfig(id)),
        }
    }

    fn chain(
        &mut self,
        chain: Vec<ConfigOnWire>,
    ) -> Result<Arc<[Arc<LoadedConfig>]>, WorkerProcessError> {
        chain
            .into_iter()
            .map(|config| self.config(config))
            .collect()
    }

    fn answer(
        &mut self,
        request_id: u64,
        body: Request,
    ) -> Result<(ReplyValue, crate::plugins::worker::SideEffects), WorkerProcessError> {
        Ok(match body {
            Request::ProcessEvents { chain, events } => {
                let chain = self.chain(chain)?;
                let reply = self.worker.answer(ProcessEvents {
                    request_id,
                    chain,
                    events,
                });
                (ReplyValue::Outcomes(reply.value), reply.side)
            }
            Request::RunAsync {
                chain,
                events,
                target,
            } => {
                let chain = self.chain(chain)?;
                let reply = self.worker.answer(RunAsync {
                    request_id,
                    chain,
                    events,
                    target,
                });
                (ReplyValue::Done, reply.side)
            }
            Request::RunScheduled { chain, method } => {
                let chain = self.chain(chain)?;
                let reply = self.worker.answer(RunScheduled {
                    request_id,
                    chain,
                    method,
                });
                (ReplyValue::Done, reply.side)
            }
            Request::RunJob {
                config,
                job_name,
                payload,
            } => {
                let config = self.config(config)?;
                let reply = self.worker.answer(RunJob {
                    request_id,
                    config,
                    job_name,
                    payload,
                });
                (ReplyValue::Job(reply.value), reply.side)
            }
            Request::Inspect { config } => {
                let config = self.config(config)?;
                let reply = self.worker.answer(Inspect { request_id, config });
                (ReplyValue::Inspected(reply.value), reply.side)
            }
            Request::FlushExports { all } => {
                let reply = self.worker.answer(FlushExports { request_id, all });
                (ReplyValue::Done, reply.side)
            }
            Request::Retire { current } => {
                // Configs that are gone or changed are not needed again; a new version comes
                // in full.
                self.configs
                    .retain(|id, config| current.get(id) == Some(&config.version));
                let reply = self.worker.answer(Retire {
                    request_id,
                    current,
                });
                (ReplyValue::Done, reply.side)
            }
            Request::TeardownAll => (ReplyValue::Done, self.worker.answer(TeardownAll).side),
            Request::Sweep => (
                ReplyValue::Done,
                self.worker.answer(Sweep { request_id }).side,
            ),
        })
    }

    fn report(&mut self) -> WorkerReport {
        let mut torn_down = Vec::new();
        for reason in ["budget", "idle"] {
            let total = self
                .torn_down
                .get_metric_with_label_values(&[reason])
                .map(|counter| counter.get())
                .unwrap_or(0);
            let reported = self
                .torn_down_reported
                .entry(reason.to_owned())
                .or_default();
            if total > *reported {
                torn_down.push((reason.to_owned(), total - *reported));
                *reported = total;
            }
        }
        WorkerReport {
            vms: self.load.vms.load(Ordering::Relaxed),
            vm_heap_bytes_at_load: self.load.vm_heap_bytes_at_load.load(Ordering::Relaxed),
            evicted: self.load.evicted.load(Ordering::Relaxed),
            durations: natives::take_call_durations()
                .into_iter()
                .map(|(method, samples)| (method.to_owned(), samples))
                .collect(),
            torn_down,
        }
    }
}

/// The server's host services, one blocking call at a time, as the worker thread's calls were.
struct ServerHost {
    writer: Writer,
    replies: Receiver<HostReply>,
}

impl ServerHost {
    fn call(&self, call: HostCall) -> Result<HostReply, HostServiceError> {
        send(&self.writer, &FromWorker::Host(call))
            .map_err(|error| HostServiceError::InServer(format!("the server is gone: {error}")))?;
        self.replies
            .recv()
            .map_err(|_| HostServiceError::InServer("the server is gone".into()))
    }

    fn value(&self, call: HostCall) -> Result<Value, HostServiceError> {
        match self.call(call)? {
            HostReply::Value(reply) => reply.map_err(HostServiceError::InServer),
            HostReply::Fetched(_) => Err(HostServiceError::InServer(
                WorkerProcessError::UnexpectedHostReply.to_string(),
            )),
        }
    }
}

impl PluginHost for ServerHost {
    fn fetch(&self, request: FetchRequest) -> Result<FetchReply, HostServiceError> {
        match self.call(HostCall::Fetch(request))? {
            HostReply::Fetched(reply) => reply.map_err(HostServiceError::InServer),
            HostReply::Value(_) => Err(HostServiceError::InServer(
                WorkerProcessError::UnexpectedHostReply.to_string(),
            )),
        }
    }

    fn cache(&self, identity: &VmIdentity, op: CacheOp) -> Result<Value, HostServiceError> {
        self.value(HostCall::Cache(identity.clone(), op))
    }

    fn storage(&self, identity: &VmIdentity, op: StorageOp) -> Result<Value, HostServiceError> {
        self.value(HostCall::Storage(identity.clone(), op))
    }

    fn geoip(&self, ip: &str) -> Value {
        self.value(HostCall::Geoip(ip.to_owned()))
            .unwrap_or(Value::Null)
    }

    fn enqueue_job(
        &self,
        identity: &VmIdentity,
        job: JobRequest,
    ) -> Result<Value, HostServiceError> {
        self.value(HostCall::EnqueueJob(identity.clone(), job))
    }

    fn api(&self, identity: &VmIdentity, with_keys: bool) -> Result<Value, HostServiceError> {
        self.value(HostCall::Api(identity.clone(), with_keys))
    }
}
