//! The black-box functional tests against real Postgres, Redis, ClickHouse and Kafka (see
//! `run.sh`), in one test binary: each module starts the built `plugin-server` binary or its
//! actors against fresh databases and topics of its own, so the modules run side by side.

mod browser;
mod chaos;
mod clickhouse_tls;
mod common;
mod embedded;
mod ingestion;
mod jobs;
mod migrate;
mod persons;
mod plugins;
mod posthog_suite;
mod private_stores;
mod server_on_redis;
mod services_script;
