//! Logging: `tracing` to stderr, filtered by `LOG_LEVEL` (or `RUST_LOG` when set, for
//! debugging one module), as text or JSON lines (`LOG_FORMAT`). Panics are logged too.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::settings::Settings;

/// Installs the global subscriber. Safe to call twice (tests): the second call does nothing.
pub fn init(settings: &Settings) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| {
            // The level was validated with the settings; "info" is unreachable in practice.
            EnvFilter::new(settings.log_filter().unwrap_or("info"))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::NONE);
    let installed = if settings.log_format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    if installed.is_ok() {
        install_panic_hook();
    }
}

/// Logs panics through `tracing`, so they reach the same place (and format) as everything else.
/// Supervised actors are restarted after their panic is logged here.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = plugin_server_actors::supervisor::panic_message(info.payload());
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
