//! What the server and a plugin worker process say to each other over their socket: frames of
//! a 4-byte big-endian length and a MessagePack body (events travel as the JSON text they are
//! in the chain, so a binary format keeps them as they are instead of escaping them again).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::plugins::LoadedConfig;
use crate::plugins::chain::{ChainEvent, ChainOutcome};
use crate::plugins::pool::JobRunError;
use crate::plugins::post_ingestion_messages::{AsyncTarget, StoredEvents};
use crate::plugins::runtime::VmIdentity;
use crate::plugins::runtime::natives::{CacheOp, FetchReply, FetchRequest, JobRequest, StorageOp};
use crate::plugins::runtime::vm::{Method, VmLimits};
use crate::plugins::worker::{NotReady, SideEffects, VmRetention};

/// A frame larger than this is refused rather than allocated: it can only be a bug or a
/// corrupt stream (a batch of 25,000 events of 16 KiB is 400 MB; the consumer's byte cap keeps
/// batches at 16 MiB).
pub const MAX_FRAME_BYTES: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the socket failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("a frame of {0} bytes is over the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("a frame could not be encoded: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("a frame could not be decoded: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

/// A frame buffer kept above this is given back after use rather than kept for the next one.
pub const KEEP_BUFFER_BYTES: usize = 64 << 20;

/// Encodes `message` as a frame, length first, into `frame` (cleared first). Frames are
/// encoded into, and read into, buffers that are used again: a batch's frame is megabytes,
/// and a fresh allocation of that size is fresh pages the kernel zeroes each time.
pub fn encode_into<T: Serialize>(frame: &mut Vec<u8>, message: &T) -> Result<(), FrameError> {
    frame.clear();
    frame.extend_from_slice(&[0; 4]);
    rmp_serde::encode::write_named(frame, message)?;
    let length = frame.len() - 4;
    let length = u32::try_from(length)
        .ok()
        .filter(|&length| length as usize <= MAX_FRAME_BYTES)
        .ok_or(FrameError::TooLarge(length))?;
    frame[..4].copy_from_slice(&length.to_be_bytes());
    Ok(())
}

/// Reads one frame's body into `body`; `false` at a clean end of the stream.
pub fn read_frame_into(reader: &mut impl Read, body: &mut Vec<u8>) -> Result<bool, FrameError> {
    let mut length = [0; 4];
    match reader.read_exact(&mut length) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(error) => return Err(error.into()),
    }
    let length = frame_length(length)?;
    reuse(body, length);
    reader.read_exact(body)?;
    Ok(true)
}

/// Reads one frame's body; `None` at a clean end of the stream.
pub fn read_frame(reader: &mut impl Read) -> Result<Option<Vec<u8>>, FrameError> {
    let mut body = Vec::new();
    Ok(read_frame_into(reader, &mut body)?.then_some(body))
}

/// The length a frame's first four bytes give, if it is within the limit.
pub fn frame_length(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let length = u32::from_be_bytes(prefix) as usize;
    if length > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(length));
    }
    Ok(length)
}

/// Sizes `buffer` to `length` bytes for a frame's body, keeping its allocation unless it grew
/// past [`KEEP_BUFFER_BYTES`] for a larger frame before.
pub fn reuse(buffer: &mut Vec<u8>, length: usize) {
    if buffer.capacity() > KEEP_BUFFER_BYTES && length <= KEEP_BUFFER_BYTES {
        *buffer = Vec::new();
    }
    buffer.clear();
    buffer.resize(length, 0);
}

pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    Ok(rmp_serde::from_slice(body)?)
}

/// Writes `message` as one frame, encoded in `scratch`.
pub fn write_message<T: Serialize>(
    writer: &mut impl Write,
    scratch: &mut Vec<u8>,
    message: &T,
) -> Result<(), FrameError> {
    encode_into(scratch, message)?;
    writer.write_all(scratch)?;
    writer.flush()?;
    if scratch.capacity() > KEEP_BUFFER_BYTES {
        *scratch = Vec::new();
    }
    Ok(())
}

/// Server to worker process.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    /// The first frame: how the worker is to run.
    Start(WorkerSettings),
    Request {
        id: u64,
        /// What each worker of the pool holds, for the pool's one VM budget (`BudgetShare`).
        held: Vec<i64>,
        body: Request,
    },
    /// The answer to the worker's last [`FromWorker::Host`] call.
    Host(HostReply),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSettings {
    pub limits: VmLimits,
    pub setup_retry_base: Duration,
    pub retention: VmRetention,
    /// This worker's place in the pool, and how many workers it has.
    pub index: usize,
    pub workers: usize,
}

/// A plugin config in a request: in full the first time the worker process gets it (or a new
/// version of it), by id after that.
#[derive(Debug, Serialize, Deserialize)]
pub enum ConfigOnWire {
    Full(Arc<LoadedConfig>),
    Known(i64),
}

/// The pool's messages to a worker, as they cross to a worker process.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    ProcessEvents {
        chain: Vec<ConfigOnWire>,
        events: Arc<Vec<ChainEvent>>,
    },
    RunAsync {
        chain: Vec<ConfigOnWire>,
        events: Arc<StoredEvents>,
        target: Option<AsyncTarget>,
    },
    RunScheduled {
        chain: Vec<ConfigOnWire>,
        method: Method,
    },
    RunJob {
        config: ConfigOnWire,
        job_name: String,
        payload: Value,
    },
    Inspect {
        config: ConfigOnWire,
    },
    FlushExports {
        all: bool,
    },
    Retire {
        current: Arc<HashMap<i64, String>>,
    },
    TeardownAll,
    Sweep,
}

/// The value of a worker's reply, per request kind.
#[derive(Debug, Serialize, Deserialize)]
pub enum ReplyValue {
    Outcomes(Vec<ChainOutcome>),
    Done,
    Job(Result<(), JobRunError>),
    Inspected(Result<(), NotReady>),
}

/// Worker process to server.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromWorker {
    /// The process read its settings and is ready for requests.
    Ready,
    /// The worker started on this request (for `/_actors`' `busy_ms`).
    Began { id: u64 },
    Reply {
        id: u64,
        value: ReplyValue,
        side: SideEffects,
        report: WorkerReport,
    },
    /// A host service the plugin called; the worker waits for its [`ToWorker::Host`].
    Host(HostCall),
    /// The worker's own watchdog found its plugin thread stopped: by its memory budget, or
    /// still in one call past twice TASK_TIMEOUT. The server ends the process.
    Stuck(StuckReport),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StuckReport {
    pub request_id: u64,
    pub plugin_config_id: i64,
    pub busy: Duration,
    /// Stopped by the memory budget rather than by time.
    pub out_of_memory: bool,
}

/// What the server's `/_actors` and `/_metrics` would have read off a worker thread.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    pub vms: i64,
    pub vm_heap_bytes_at_load: i64,
    pub evicted: u64,
    /// `plugin_method_duration_seconds{method}`: the calls' durations since the last reply.
    pub durations: Vec<(String, Vec<f64>)>,
    /// `plugin_vms_torn_down_total{reason}` since the last reply.
    pub torn_down: Vec<(String, u64)>,
}

/// A `PluginHost` call made in a worker process, served by the server's host.
#[derive(Debug, Serialize, Deserialize)]
pub enum HostCall {
    Fetch(FetchRequest),
    Cache(VmIdentity, CacheOp),
    Storage(VmIdentity, StorageOp),
    Api(VmIdentity, bool),
    Geoip(String),
    EnqueueJob(VmIdentity, JobRequest),
}

/// The answer to a [`HostCall`]; an error is its text, which is all the plugin sees of it.
#[derive(Debug, Serialize, Deserialize)]
pub enum HostReply {
    Fetched(Result<FetchReply, String>),
    Value(Result<Value, String>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let event = ChainEvent {
            json: r#"{"event":"$pageview","properties":{"a":"\"quoted\""}}"#.into(),
            distinct_id: "d1".into(),
            team_id: Some(Value::from(2)),
            ran: vec!["p (1)".into()],
            answer_with_changes: false,
        };
        let message = ToWorker::Request {
            id: 7,
            held: vec![1, 2],
            body: Request::ProcessEvents {
                chain: vec![ConfigOnWire::Known(3)],
                events: Arc::new(vec![event.clone()]),
            },
        };
        let mut stream = Vec::new();
        let mut scratch = Vec::new();
        write_message(&mut stream, &mut scratch, &message).expect("write");
        write_message(
            &mut stream,
            &mut scratch,
            &ToWorker::Host(HostReply::Value(Err("no".into()))),
        )
        .expect("write");
        let mut reader = stream.as_slice();
        let first = read_frame(&mut reader).expect("read").expect("a frame");
        match decode::<ToWorker>(&first).expect("decode") {
            ToWorker::Request { id, held, body } => {
                assert_eq!((id, held), (7, vec![1, 2]));
                let Request::ProcessEvents { chain, events } = body else {
                    panic!("not ProcessEvents")
                };
                assert!(matches!(chain[..], [ConfigOnWire::Known(3)]));
                assert_eq!(events.as_slice(), &[event]);
            }
            other => panic!("unexpected {other:?}"),
        }
        let second = read_frame(&mut reader).expect("read").expect("a frame");
        assert!(matches!(
            decode::<ToWorker>(&second).expect("decode"),
            ToWorker::Host(HostReply::Value(Err(text))) if text == "no"
        ));
        assert!(read_frame(&mut reader).expect("clean end").is_none());
    }

    #[test]
    fn an_oversized_length_is_refused_before_allocating() {
        let mut stream = (u32::MAX).to_be_bytes().to_vec();
        stream.extend_from_slice(b"abc");
        assert!(matches!(
            read_frame(&mut stream.as_slice()),
            Err(FrameError::TooLarge(_))
        ));
    }
}
