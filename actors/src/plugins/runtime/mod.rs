//! The plugin runtime: PostHog plugins, transpiled ([`transpile`]) and run unmodified on boa
//! ([`vm`]) behind the prelude's `meta`/`posthog`/`console` objects ([`prelude`]), whose
//! native functions ([`natives`]) reach the server through the `PluginHost` trait.
//!
//! This module holds what a VM and its natives share, so that the two do not import each other
//! both ways: who a VM is, what it runs, and what a call produced besides its value.

pub mod natives;
pub mod plain;
pub mod prelude;
pub mod transpile;
pub mod vm;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who a VM belongs to; log entries and captured events carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIdentity {
    pub plugin_config_id: i64,
    pub plugin_id: i64,
    pub team_id: i64,
    pub plugin_name: String,
}

/// The plugin as the VM needs it: already transpiled to CommonJS script form.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSource {
    pub file_name: String,
    /// Shared by every config of the plugin.
    pub code: std::sync::Arc<str>,
}

/// A `meta.attachments` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub key: String,
    pub content_type: String,
    pub file_name: String,
    pub contents: Vec<u8>,
}

/// What a call produced besides its value: console output and `posthog.capture` events.
#[derive(Debug, Default)]
pub struct CallEffects {
    pub logs: Vec<PluginLogEntry>,
    pub captures: Vec<CapturedByPlugin>,
}

/// An event a plugin sent with `posthog.capture`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapturedByPlugin {
    pub event: String,
    pub properties: Value,
}

/// Log levels of plugin log entries, in PostHog's order (its `log_level` filter drops from the
/// bottom: 1 drops LOG, 2 drops LOG and INFO, 3 keeps only ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginLogEntry {
    pub plugin_config_id: i64,
    pub plugin_id: i64,
    pub team_id: i64,
    pub timestamp: DateTime<Utc>,
    pub source: LogSource,
    pub level: LogLevel,
    pub message: String,
}

/// What `console.*` levels mean to the log_level filter.
pub(crate) fn parse_level(level: &str) -> LogLevel {
    match level {
        "DEBUG" => LogLevel::Debug,
        "INFO" => LogLevel::Info,
        "WARN" => LogLevel::Warn,
        "ERROR" => LogLevel::Error,
        _ => LogLevel::Log,
    }
}
