//! Ingestion: events in from Kafka (or HTTP capture), through the pipeline's steps, out to the
//! sinks.
//!
//! - [`consumer`]: the `KafkaConsumer` actor; [`order`] keeps one distinct id's events in order
//!   across the batches it has in flight;
//! - [`pipeline`]: the `IngestionPipeline` actor, spec 1.3's steps in PostHog's order;
//! - [`writer`] and [`sinks`]: the `EventWriter` actor and where rows go (ClickHouse, Kafka
//!   topics, JSON lines);
//! - [`teams`]: how an event finds its team (cached, Postgres or embedded);
//! - [`timestamp`] and [`prepare`]: pure steps on one event, unit tested exhaustively;
//! - [`payloads`]: a batch's messages in one buffer.

pub mod consumer;
pub mod order;
pub mod payloads;
pub mod pipeline;
pub mod prepare;
pub mod sinks;
pub mod teams;
pub mod timestamp;
pub mod writer;
