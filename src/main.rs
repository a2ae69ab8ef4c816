//! The `plugin-server` command: runs the server, or `--migrate`, or `--healthcheck`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use plugin_server::settings::{LoadOptions, Settings};
use plugin_server::{ServerError, telemetry};
use plugin_server_actors::migrations;
use plugin_server_actors::plugins::isolation;

/// The pipeline allocates many small strings and maps per event: with glibc malloc, allocation
/// and free took a quarter of the pipeline's CPU in a perf profile of `bench`'s `pipeline_cpu`.
/// Wrapped so that one plugin call cannot take more than its memory budget (see the alloc crate).
#[global_allocator]
static ALLOCATOR: plugin_server_alloc::BudgetedAllocator<plugin_server_alloc::MiMalloc> =
    plugin_server_alloc::BudgetedAllocator(plugin_server_alloc::MiMalloc);

/// Exit code for settings that cannot be loaded (as `EX_CONFIG` in sysexits).
const EXIT_BAD_SETTINGS: u8 = 78;
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// PostHog's plugin server, in Rust. Settings come from config/default.toml, an optional
/// profile or file, then PostHog's env vars (DATABASE_URL, KAFKA_HOSTS, ...).
#[derive(Debug, Parser)]
#[command(name = "plugin-server", version, disable_version_flag = true)]
struct Cli {
    /// Print the version and exit.
    #[arg(short = 'v', long = "version", action = clap::ArgAction::Version)]
    version: Option<bool>,

    /// Run the Postgres and ClickHouse migrations this server needs, then exit.
    #[arg(long, conflicts_with = "healthcheck")]
    migrate: bool,

    /// Exit 0 if the instance running on this machine answers /_health with 200, else 1.
    #[arg(long)]
    healthcheck: bool,

    /// A TOML settings file layered over the defaults and profile (env vars still win).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// A settings profile: config/NAME.toml, or a built-in one (cluster, test).
    #[arg(long, value_name = "NAME", env = "PLUGIN_SERVER_PROFILE")]
    profile: Option<String>,

    /// Run as one of the server's plugin worker processes (PLUGIN_WORKER_ISOLATION=process):
    /// the server starts these itself.
    #[arg(long, hide = true)]
    plugin_worker: bool,
}

/// A plugin worker process: its VMs on this thread, its socket to the server on stdin, its
/// logs on stderr at the server's LOG_LEVEL and LOG_FORMAT.
fn plugin_worker() -> ExitCode {
    // The server's own logging (the server passes its LOG_LEVEL and LOG_FORMAT down).
    let settings = Settings::load(&LoadOptions::default()).ok();
    let _telemetry = settings.as_ref().map(telemetry::init);
    if std::env::var_os(isolation::WORKER_ENV).is_none() {
        eprintln!(
            "plugin-server: --plugin-worker is started by the server itself ({} is not set)",
            isolation::WORKER_ENV
        );
        return ExitCode::from(EXIT_BAD_SETTINGS);
    }
    match isolation::run_worker_process() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "plugin worker process failed");
            eprintln!("plugin-server --plugin-worker: {error}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    // Before the pipeline's first batch touches memory (see the functions for why).
    let huge_pages_off = plugin_server_alloc::disable_transparent_huge_pages();
    let cli = Cli::parse();
    if cli.plugin_worker {
        // A worker's memory comes and goes with its calls, on its own thread, so mimalloc's
        // own purge delay suits it; a longer one only held freed memory longer (peak RSS).
        return plugin_worker();
    }
    plugin_server_alloc::set_purge_delay();
    let settings = match Settings::load(&LoadOptions {
        profile: cli.profile.clone(),
        config_file: cli.config.clone(),
        env: None,
    }) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("plugin-server: {error}");
            return ExitCode::from(EXIT_BAD_SETTINGS);
        }
    };
    // Held to the end of main: dropping it flushes queued error reports.
    let _telemetry = telemetry::init(&settings);
    if let Err(error) = huge_pages_off {
        tracing::info!(%error, "transparent huge pages stay on for this process");
    }

    if cli.healthcheck {
        return healthcheck(&settings);
    }
    let system = actix::System::new();
    let outcome = if cli.migrate {
        system.block_on(migrate(&settings))
    } else {
        system.block_on(serve(settings))
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let error = plugin_server::error::with_causes(&error);
            tracing::error!(%error, "plugin server failed");
            eprintln!("plugin-server: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> Result<(), ServerError> {
    let signals = plugin_server::ShutdownSignals::install()?;
    plugin_server::start(settings)
        .await?
        .run_until(signals)
        .await
}

/// Runs the migrations of every store that is configured. The embedded stores need none.
async fn migrate(settings: &Settings) -> Result<(), ServerError> {
    let mut migrated = false;
    if let Some(url) = settings.database_url() {
        let report = migrations::migrate_postgres(&url).await?;
        tracing::info!(applied = ?report.applied, already_applied = ?report.already_applied, "postgres is up to date");
        migrated = true;
    }
    if let Some(target) = plugin_server::topology::clickhouse_target(settings)? {
        let report = migrations::migrate_clickhouse(&target).await?;
        tracing::info!(applied = ?report.applied, already_applied = ?report.already_applied, "clickhouse is up to date");
        migrated = true;
    }
    if !migrated {
        tracing::info!(
            "nothing to migrate: DATABASE_URL and CLICKHOUSE_HOST are unset, so the embedded \
             stores are used"
        );
    }
    Ok(())
}

/// Asks the local instance's `/_health`; for container and orchestrator probes.
fn healthcheck(settings: &Settings) -> ExitCode {
    let port = settings.http_server_port;
    // A server listening on every interface is reached through loopback.
    let host = match settings.http_listen_addr() {
        Ok(addr) if !addr.ip().is_unspecified() => addr.ip().to_string(),
        _ => "127.0.0.1".to_owned(),
    };
    let url = format!("http://{host}:{port}/_health");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("plugin-server: cannot start the health check: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(HEALTHCHECK_TIMEOUT)
            .build()?;
        let response = client.get(&url).send().await?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        Ok::<_, reqwest::Error>((status, body))
    });
    match outcome {
        Ok((status, _)) if status.is_success() => ExitCode::SUCCESS,
        Ok((status, body)) => {
            eprintln!("plugin-server: unhealthy: {url} answered {status}: {body}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("plugin-server: unhealthy: {url}: {error}");
            ExitCode::FAILURE
        }
    }
}
