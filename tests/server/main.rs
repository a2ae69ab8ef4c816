//! The server without external services: the binary as a user runs it, and its HTTP endpoints
//! in-process. One test binary for both, since each links the whole server.

mod cli;
mod http;
