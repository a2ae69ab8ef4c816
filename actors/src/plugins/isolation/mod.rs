//! Plugin workers in processes of their own (`PLUGIN_WORKER_ISOLATION=process`).
//!
//! A worker thread cannot be stopped from outside: a call parked by its memory budget keeps
//! what it allocated (up to the budget, 512 MiB), and a call spinning in code the deadline
//! cannot interrupt (a catastrophic regular expression, a loop in a native callback) keeps a
//! core busy until the server restarts. The pool can only abandon such a thread. A worker
//! process can be killed: its memory goes back to the system and its CPU goes idle, and the
//! pool starts another in its place as it would a thread.
//!
//! The process is the server's own executable (`plugin-server --plugin-worker`, its stdin one
//! end of a socket pair whose other end the server keeps), so it runs
//! the same `VmWorker` with the same limits; its host services (`fetch`, `meta.cache`,
//! `meta.storage`, jobs, geoip, `posthog.api`) are served by the server over the socket, so
//! both profiles behave the same whichever process the VM is in.

mod child;
mod process_worker;
pub mod protocol;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use child::{WorkerProcessError, run as run_worker_process};
pub use process_worker::{ProcessInstruments, ProcessWorker, Replied, RequestBuilder};

use protocol::{ReplyValue, Request};

use super::chain::ChainOutcome;
use super::pool::JobRunError;
use super::worker::{
    FlushExports, Inspect, NotReady, ProcessEvents, Retire, RunAsync, RunJob, RunScheduled,
    SideEffects, Sweep, TeardownAll, WorkerReply,
};

/// Set (to 1) for a worker process, whose stdin is then its socket to the server.
pub const WORKER_ENV: &str = "PLUGIN_SERVER_WORKER";

/// Where the pool's plugin workers run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum WorkerIsolation {
    /// Threads of the server: nothing crosses a socket, but a stopped call keeps its memory
    /// and a runaway native loop its core.
    #[default]
    Thread,
    /// A process per worker, started with this command.
    Process(WorkerCommand),
}

/// How to start a worker process: the program, its arguments and variables besides the
/// server's own; the socket is its stdin, and [`WORKER_ENV`] is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl WorkerCommand {
    /// This executable with `--plugin-worker`, as the server starts its workers. On Linux
    /// that is `/proc/self/exe`, the very file the server runs even once an upgrade replaced
    /// it at its path: a worker from another version would not speak the same frames.
    pub fn this_executable(env: Vec<(String, String)>) -> std::io::Result<Self> {
        let running = Path::new("/proc/self/exe");
        let program = if running.exists() {
            running.to_path_buf()
        } else {
            std::env::current_exe()?
        };
        Ok(Self {
            program,
            args: vec!["--plugin-worker".into()],
            env,
        })
    }
}

/// A pool message that can be sent to a worker process.
pub trait ToProcess: actix::Message {
    fn to_request(&self, builder: &mut RequestBuilder<'_>) -> Request;
    /// The message's result from the process's reply; `None` if the reply is of another kind
    /// (a bug, treated as a lost worker).
    fn from_reply(value: ReplyValue, side: SideEffects) -> Option<Self::Result>;
}

fn done(value: ReplyValue, side: SideEffects) -> Option<WorkerReply<()>> {
    matches!(value, ReplyValue::Done).then_some(WorkerReply { value: (), side })
}

impl ToProcess for ProcessEvents {
    fn to_request(&self, builder: &mut RequestBuilder<'_>) -> Request {
        Request::ProcessEvents {
            chain: builder.chain(&self.chain),
            events: Arc::clone(&self.events),
        }
    }

    fn from_reply(value: ReplyValue, side: SideEffects) -> Option<WorkerReply<Vec<ChainOutcome>>> {
        match value {
            ReplyValue::Outcomes(value) => Some(WorkerReply { value, side }),
            _ => None,
        }
    }
}

impl ToProcess for RunAsync {
    fn to_request(&self, builder: &mut RequestBuilder<'_>) -> Request {
        Request::RunAsync {
            chain: builder.chain(&self.chain),
            events: Arc::clone(&self.events),
            target: self.target,
        }
    }

    fn from_reply(value: ReplyValue, side: SideEffects) -> Option<WorkerReply<()>> {
        done(value, side)
    }
}

impl ToProcess for RunScheduled {
    fn to_request(&self, builder: &mut RequestBuilder<'_>) -> Request {
        Request::RunScheduled {
            chain: builder.chain(&self.chain),
            method: self.method,
        }
    }

    fn from_reply(value: ReplyValue, side: SideEffects) -> Option<WorkerReply<()>> {
        done(value, side)
    }
}

impl ToProcess for RunJob {
    fn to_request(&self, builder: &mut RequestBuilder<'_>) -> Request {
        Request::RunJob {
            config: builder.config(&self.config),
            job_name: self.job_name.clone(),
            payload: self.payload.clone(),
        }
    }

    fn from_reply(
        value: ReplyValue,
        side: SideEffects,
    ) -> Option<WorkerReply<Result<(), JobRunError>>> {
        match value {
            ReplyValue::Job(value) => Some(WorkerReply { value, side }),
            _ => None,
        }
    }
}

impl ToProcess for Inspect {
    fn to_request(&self, builder: &mut RequestBuilder<'_>) -> Request {
        Request::Inspect {
            config: builder.config(&self.config),
        }
    }

    fn from_reply(
        value: ReplyValue,
        side: SideEffects,
    ) -> Option<WorkerReply<Result<(), NotReady>>> {
        match value {
            ReplyValue::Inspected(value) => Some(WorkerReply { value, side }),
            _ => None,
        }
    }
}

impl ToProcess for FlushExports {
    fn to_request(&self, _: &mut RequestBuilder<'_>) -> Request {
        Request::FlushExports { all: self.all }
    }

    fn from_reply(value: ReplyValue, side: SideEffects) -> Option<WorkerReply<()>> {
        done(value, side)
    }
}

impl ToProcess for Retire {
    fn to_request(&self, builder: &mut RequestBuilder<'_>) -> Request {
        builder.retire(&self.current);
        Request::Retire {
            current: Arc::clone(&self.current),
        }
    }

    fn from_reply(value: ReplyValue, side: SideEffects) -> Option<WorkerReply<()>> {
        done(value, side)
    }
}

impl ToProcess for TeardownAll {
    fn to_request(&self, _: &mut RequestBuilder<'_>) -> Request {
        Request::TeardownAll
    }

    fn from_reply(value: ReplyValue, side: SideEffects) -> Option<WorkerReply<()>> {
        done(value, side)
    }
}

impl ToProcess for Sweep {
    fn to_request(&self, _: &mut RequestBuilder<'_>) -> Request {
        Request::Sweep
    }

    fn from_reply(value: ReplyValue, side: SideEffects) -> Option<WorkerReply<()>> {
        done(value, side)
    }
}

#[cfg(test)]
pub(crate) mod tests;
