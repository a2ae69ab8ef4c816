//! The plugin runtime: PostHog plugins (JavaScript or TypeScript) run unmodified on boa.

pub mod chain;
pub mod delivery;
pub mod filters;
pub mod host;
pub mod outputs;
pub mod prelude;
pub mod registry;
pub mod server_host;
pub mod telemetry;
pub mod transpile;
pub mod vm;
pub mod worker;

use chrono::{DateTime, Utc};
use serde_json::Value;

use vm::{Attachment, VmIdentity, VmSource};

/// A plugin config ready for a VM: its plugin transpiled, its settings and attachments.
/// Shared by every worker that serves its team.
#[derive(Debug, Clone)]
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

/// Log levels of plugin log entries, in PostHog's order (its `log_level` filter drops from the
/// bottom: 1 drops LOG, 2 drops LOG and INFO, 3 keeps only ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Debug,
    Log,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Debug => "DEBUG",
            Self::Log => "LOG",
            Self::Info => "INFO",
            Self::Warn => "WARN",
            Self::Error => "ERROR",
        }
    }
}

/// Where a log entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    /// The server itself (setup failed, config disabled, ...): always kept.
    System,
    Plugin,
    /// The plugin's `console.*`.
    Console,
}

impl LogSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "SYSTEM",
            Self::Plugin => "PLUGIN",
            Self::Console => "CONSOLE",
        }
    }
}

/// A row of `plugin_log_entries`.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginLogEntry {
    pub plugin_config_id: i64,
    pub plugin_id: i64,
    pub team_id: i64,
    pub timestamp: DateTime<Utc>,
    pub source: LogSource,
    pub level: LogLevel,
    pub message: String,
}

#[cfg(test)]
mod tests;
