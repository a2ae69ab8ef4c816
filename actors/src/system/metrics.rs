//! The Prometheus registry served on `/_metrics`, and the metric families every actor shares.
//!
//! Names follow `<subsystem>_<name>_<unit>[_total]`. Actors get their labelled children once, at
//! registration (see `stats`), so the hot path never looks a label up.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets for message handling and pipeline steps: 50 µs to 30 s.
const DURATION_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot register metric: {0}")]
    Register(#[from] prometheus::Error),
}

/// Per-actor families, labelled by `actor`.
#[derive(Clone)]
pub struct ActorMetricFamilies {
    pub messages_handled: IntCounterVec,
    pub errors: IntCounterVec,
    pub restarts: IntCounterVec,
    pub mailbox_messages: IntGaugeVec,
    pub message_duration: HistogramVec,
}

/// The registry and the shared families. Cheap to clone (everything inside is an `Arc`).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub actors: ActorMetricFamilies,
    /// Time spent in each ingestion pipeline step (spec 1.3), labelled by `step`.
    pub pipeline_step_duration: HistogramVec,
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let actors = ActorMetricFamilies {
            messages_handled: IntCounterVec::new(
                Opts::new(
                    "actor_messages_handled_total",
                    "Messages an actor has finished handling.",
                ),
                &["actor"],
            )?,
            errors: IntCounterVec::new(
                Opts::new("actor_errors_total", "Errors an actor has reported."),
                &["actor"],
            )?,
            restarts: IntCounterVec::new(
                Opts::new(
                    "actor_restarts_total",
                    "Times the supervisor restarted an actor after it stopped or panicked.",
                ),
                &["actor"],
            )?,
            mailbox_messages: IntGaugeVec::new(
                Opts::new(
                    "actor_mailbox_messages",
                    "Messages sent to an actor that it has not started handling yet.",
                ),
                &["actor"],
            )?,
            message_duration: HistogramVec::new(
                HistogramOpts::new(
                    "actor_message_duration_seconds",
                    "Time an actor spends handling one message.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["actor"],
            )?,
        };
        let pipeline_step_duration = HistogramVec::new(
            HistogramOpts::new(
                "ingestion_pipeline_step_duration_seconds",
                "Time spent in one step of the ingestion pipeline.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["step"],
        )?;
        registry.register(Box::new(actors.messages_handled.clone()))?;
        registry.register(Box::new(actors.errors.clone()))?;
        registry.register(Box::new(actors.restarts.clone()))?;
        registry.register(Box::new(actors.mailbox_messages.clone()))?;
        registry.register(Box::new(actors.message_duration.clone()))?;
        registry.register(Box::new(pipeline_step_duration.clone()))?;
        // CPU seconds, resident memory and open fds: what the "fraction of the CPU and memory"
        // promise is checked against in production.
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            actors,
            pipeline_step_duration,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything registered, in the Prometheus text format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|error| format!("# metrics could not be encoded: {error}\n"))
    }
}
