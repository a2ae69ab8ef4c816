//! Logging and error reporting.
//!
//! Logs go to stderr through `tracing`, filtered by `LOG_LEVEL` (or `RUST_LOG` when set, for
//! debugging one module), as text or JSON lines (`LOG_FORMAT`). With `SENTRY_DSN` set, every
//! `error!` event (panics included, through the hook below) is also sent to Sentry, and
//! warnings ride along as breadcrumbs.

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::settings::Settings;

/// Keeps Sentry's client alive; dropping it flushes the events still queued (bounded wait).
pub struct TelemetryGuard {
    _sentry: Option<sentry::ClientInitGuard>,
}

/// Installs the global subscriber and, with `SENTRY_DSN`, the Sentry client. Safe to call
/// twice (tests): the second call changes nothing.
pub fn init(settings: &Settings) -> TelemetryGuard {
    install_tls_provider();
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| {
            // The level was validated with the settings; "info" is unreachable in practice.
            EnvFilter::new(settings.log_filter().unwrap_or("info"))
        });
    let format = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let format = if settings.log_format == "json" {
        format.json().boxed()
    } else {
        format.boxed()
    };
    let sentry = (!settings.sentry_dsn.is_empty()).then(|| {
        sentry::init(
            sentry::ClientOptions::new()
                .dsn(&settings.sentry_dsn)
                .release(concat!("plugin-server@", env!("CARGO_PKG_VERSION")))
                .attach_stacktrace(true),
        )
    });
    let sentry_layers = sentry.as_ref().map(|_| {
        use sentry::integrations::tracing::{BreadcrumbLayer, ErrorLayer};
        ErrorLayer::new()
            .with_filter(LevelFilter::ERROR)
            .and_then(BreadcrumbLayer::new().with_filter(LevelFilter::WARN))
    });
    let installed = tracing_subscriber::registry()
        .with(format.with_filter(filter))
        .with(sentry_layers)
        .try_init();
    if installed.is_ok() {
        install_panic_hook();
    }
    TelemetryGuard { _sentry: sentry }
}

/// rustls needs one process-wide crypto provider; everything here uses ring. Idempotent.
pub fn install_tls_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Logs panics through `tracing`, so they reach the same place (and Sentry) as everything else.
/// Supervised actors are restarted after their panic is logged here.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = plugin_server_actors::system::supervisor::panic_message(info.payload());
        let location = info
            .location()
            .map(|location| format!("{}:{}", location.file(), location.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(
            panic = message,
            location = %location,
            thread = thread.name().unwrap_or("unnamed"),
            "panic"
        );
    }));
}
