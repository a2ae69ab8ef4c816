//! What the ingestion pipeline moves around, and the pure steps it runs on each event.
//!
//! The actors (`kafka_consumer`, `ingestion_pipeline`, `event_writer`) live beside this
//! module; everything here is synchronous and side-effect free so that it can be unit tested
//! exhaustively and benchmarked without services.

pub mod dead_letter;
pub mod elements;
pub mod envelope;
pub mod event;
pub mod intake;
pub mod js;
pub mod order;
pub mod prepare;
pub mod team;
pub mod timestamp;

pub use dead_letter::{DeadLetter, DropReason};
pub use event::{EventRow, IngestionWarning, PipelineEvent, PluginEvent, Properties};
pub use team::{Team, TeamManager};
