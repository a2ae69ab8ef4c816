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
    Embedded(#[from] plugin_server_actors::sqlite::SqliteError),
    #[error(transparent)]
    EmbeddedTeams(#[from] plugin_server_actors::ingest::teams::sqlite::NamedTeamsError),
    #[error(transparent)]
    ClickHouseTls(#[from] plugin_server_actors::clickhouse_client::ClickHouseTlsError),
    #[error(transparent)]
    Sink(#[from] plugin_server_actors::ingest::sinks::SinkError),
    #[error(transparent)]
    Kafka(#[from] plugin_server_actors::kafka::KafkaSetupError),
    #[error(transparent)]
    Actions(#[from] plugin_server_actors::actions::ActionHooksError),
    #[error("cannot load the plugins: {0}")]
    Plugins(#[from] plugin_server_actors::plugins::registry::RegistryError),
    #[error(
        "cannot find this executable to start plugin worker processes (PLUGIN_WORKER_ISOLATION=process): {0}"
    )]
    WorkerExecutable(#[source] std::io::Error),
    #[error("cannot install the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// The error and every cause under it, for the one line a failed start prints: a wrapped
/// client error such as "client error (Connect)" hides its reason ("invalid peer certificate:
/// UnknownIssuer") in its sources. A cause whose text is already in the line is not repeated.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(source) = cause {
        let text = source.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = source.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("invalid peer certificate: UnknownIssuer")]
        Certificate,
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("client error (Connect)")]
        Hidden(#[source] Inner),
        #[error("shown: {0}")]
        Shown(#[source] Inner),
    }

    #[test]
    fn causes_are_appended_once() {
        assert_eq!(
            with_causes(&Outer::Hidden(Inner::Certificate)),
            "client error (Connect): invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(
            with_causes(&Outer::Shown(Inner::Certificate)),
            "shown: invalid peer certificate: UnknownIssuer"
        );
    }
}
