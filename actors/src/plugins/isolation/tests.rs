//! Worker processes in this crate's tests are this test binary, running only
//! [`worker_process_entry`]. The pool's own tests run again with processes in
//! `pool::tests::in_processes`.

use std::path::Path;

use super::{SOCKET_ENV, WorkerCommand, run_worker_process};

/// The command that starts a worker process in tests.
pub(crate) fn worker_command() -> WorkerCommand {
    WorkerCommand {
        program: std::env::current_exe().expect("the test binary"),
        args: [
            "plugins::isolation::tests::worker_process_entry",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ]
        .map(String::from)
        .to_vec(),
        env: Vec::new(),
    }
}

#[test]
#[ignore = "not a test: the worker process that the pool's tests in processes start"]
fn worker_process_entry() {
    if let Some(socket) = std::env::var_os(SOCKET_ENV) {
        run_worker_process(Path::new(&socket)).expect("the worker process runs");
    }
}
