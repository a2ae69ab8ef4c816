//! Worker processes in this crate's tests are this test binary, running only
//! [`worker_process_entry`]. The pool's own tests run again with processes in
//! `pool::tests::in_processes`.

use super::{WORKER_ENV, WorkerCommand, run_worker_process};

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
    if std::env::var_os(WORKER_ENV).is_some() {
        run_worker_process().expect("the worker process runs");
    }
}
