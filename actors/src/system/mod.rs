//! What every actor stands on: supervision (restart on panic, counted), per-actor stats for
//! `/_actors`, Prometheus metrics, and health. The bottom layer with `crate::event`.

pub mod health;
pub mod metrics;
pub mod stats;
pub mod supervisor;
