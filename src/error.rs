//! Errors that end the server, each naming what to fix.

use crate::settings::SettingsError;
use plugin_server_actors::migrations::MigrationError;
use plugin_server_actors::system::metrics::MetricsError;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error("cannot listen on {addr} (check HTTP_SERVER_HOST and HTTP_SERVER_PORT): {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach Redis (check REDIS_URL): {0}")]
    Redis(#[source] plugin_server_actors::cluster::ClusterError),
    #[error(transparent)]
    Postgres(#[from] plugin_server_actors::postgres::PostgresError),
    #[error("cannot reach ClickHouse (check CLICKHOUSE_HOST and CLICKHOUSE_USER): {0}")]
    ClickHouse(#[source] clickhouse::error::Error),
    #[error(transparent)]
    Sink(#[from] plugin_server_actors::ingest::sinks::SinkError),
    #[error(transparent)]
    Kafka(#[from] plugin_server_actors::kafka::KafkaSetupError),
    #[error(transparent)]
    Actions(#[from] plugin_server_actors::actions::ActionHooksError),
    #[error("cannot load the plugins: {0}")]
    Plugins(#[from] plugin_server_actors::plugins::registry::RegistryError),
    #[error("cannot install the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}
