//! The plugin runtime: PostHog plugins (JavaScript or TypeScript) run unmodified on boa.

pub mod api_keys;
pub mod chain;
pub mod filters;
pub mod host_services;
pub mod isolation;
pub mod job_queue;
pub mod jobs;
pub mod outputs;
pub mod pool;
pub mod post_ingestion;
pub mod post_ingestion_messages;
pub mod registry;
pub mod reloader;
pub mod runtime;
pub mod scheduler;
pub mod telemetry;
#[cfg(test)]
mod test_pool;
pub mod worker;

use serde_json::Value;

use runtime::{Attachment, VmIdentity, VmSource};
pub use runtime::{LogLevel, LogSource, PluginLogEntry};

/// A plugin config ready for a VM: its plugin transpiled, its settings and attachments.
/// Shared by every worker that serves its team.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoadedConfig {
    pub identity: VmIdentity,
    pub source: VmSource,
    /// `meta.config`.
    pub config: Value,
    pub attachments: Vec<Attachment>,
    /// Position in the team's chain (ascending).
    pub order: i32,
    /// Changes whenever the config or its plugin changes; a VM built from another version is
    /// torn down and rebuilt (PostHog compares both `updated_at`s).
    pub version: String,
    /// PostHog's `plugin.log_level`: 0 keeps all, 1 drops LOG, 2 drops LOG and INFO, 3 keeps
    /// only ERROR. SYSTEM entries are always kept.
    pub log_level: u8,
    /// `pluginConfig.filters`: which stored events reach `composeWebhook` (None: all).
    pub webhook_filters: Option<filters::WebhookFilters>,
}

impl LoadedConfig {
    /// Whether a log entry survives this config's log_level (spec 2.6).
    pub fn keeps(&self, entry: &PluginLogEntry) -> bool {
        if entry.source == LogSource::System {
            return true;
        }
        match self.log_level {
            0 => true,
            1 => entry.level != LogLevel::Log,
            2 => !matches!(entry.level, LogLevel::Log | LogLevel::Info),
            _ => entry.level == LogLevel::Error,
        }
    }
}

#[cfg(test)]
mod tests;
