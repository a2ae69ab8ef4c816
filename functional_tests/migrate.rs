//! `--migrate` against the real Postgres and ClickHouse: creates what is missing, is idempotent,
//! and tolerates concurrent runs.

use crate::common::{
    FreshPostgres, clickhouse_http_url, clickhouse_query, run_binary, unique_name,
};
use plugin_server_actors::migrations::{CLICKHOUSE_MIGRATIONS, POSTGRES_MIGRATIONS};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn postgres_tables(database: &FreshPostgres) -> Vec<String> {
    database
        .client()
        .await
        .query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = 'public' ORDER BY 1",
            &[],
        )
        .await
        .expect("list tables")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn clickhouse_tables(database: &str) -> Vec<String> {
    clickhouse_query(&format!(
        "SELECT name FROM system.tables WHERE database = '{database}' ORDER BY name"
    ))
    .await
    .lines()
    .map(str::to_owned)
    .collect()
}

#[tokio::test]
async fn migrate_twice_in_a_row_succeeds_against_postgres_and_clickhouse() {
    let postgres = FreshPostgres::create().await;
    let clickhouse_database = unique_name("ps_test");
    let clickhouse_host = clickhouse_http_url();
    let env = [
        ("DATABASE_URL", postgres.url.as_str()),
        ("CLICKHOUSE_HOST", clickhouse_host.as_str()),
        ("CLICKHOUSE_DATABASE", clickhouse_database.as_str()),
    ];

    let first = run_binary(&["--migrate"], &env);
    assert!(first.status.success(), "first run: {}", text(&first.stderr));
    let log = text(&first.stderr);
    assert!(log.contains("applied postgres migration"), "{log}");
    assert!(log.contains("applied clickhouse migration"), "{log}");

    let tables = postgres_tables(&postgres).await;
    for table in [
        "posthog_organization",
        "posthog_team",
        "posthog_plugin",
        "posthog_pluginconfig",
        "posthog_pluginsourcefile",
        "posthog_pluginattachment",
        "posthog_pluginstorage",
        "posthog_person",
        "posthog_persondistinctid",
        "posthog_grouptypemapping",
        "posthog_group",
        "posthog_eventdefinition",
        "posthog_propertydefinition",
        "posthog_eventproperty",
        "posthog_action",
        "posthog_actionstep",
        "posthog_user",
        "posthog_organizationmembership",
        "posthog_personalapikey",
        "plugin_server_jobs",
        "plugin_server_jobs_dead_letter",
        "plugin_server_migrations",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing from {tables:?}"
        );
    }
    let tables = clickhouse_tables(&clickhouse_database).await;
    for table in [
        "events",
        "events_dead_letter_queue",
        "person",
        "person_distinct_id",
        "groups",
        "plugin_log_entries",
        "app_metrics",
        "ingestion_warnings",
        "plugin_server_migrations",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing from {tables:?}"
        );
    }

    let second = run_binary(&["--migrate"], &env);
    assert!(
        second.status.success(),
        "second run: {}",
        text(&second.stderr)
    );
    let log = text(&second.stderr);
    assert!(
        !log.contains("applied postgres migration"),
        "nothing re-applied: {log}"
    );
    assert!(
        !log.contains("applied clickhouse migration"),
        "nothing re-applied: {log}"
    );
    assert!(log.contains("postgres is up to date"), "{log}");
    assert!(log.contains("clickhouse is up to date"), "{log}");

    let recorded: i64 = postgres
        .client()
        .await
        .query_one("SELECT count(*) FROM plugin_server_migrations", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        recorded,
        POSTGRES_MIGRATIONS.len() as i64,
        "each postgres migration recorded once"
    );
    let recorded = clickhouse_query(&format!(
        "SELECT count(DISTINCT version) FROM {clickhouse_database}.plugin_server_migrations"
    ))
    .await;
    assert_eq!(
        recorded.trim(),
        CLICKHOUSE_MIGRATIONS.len().to_string(),
        "each clickhouse migration recorded"
    );

    // A run that added a column but stopped before its bookkeeping: applying everything again
    // (ClickHouse 18.16 has no ADD COLUMN IF NOT EXISTS) still succeeds.
    clickhouse_query(&format!(
        "DROP TABLE {clickhouse_database}.plugin_server_migrations"
    ))
    .await;
    let third = run_binary(&["--migrate"], &env);
    assert!(third.status.success(), "third run: {}", text(&third.stderr));
    let columns = clickhouse_query(&format!(
        "SELECT name FROM system.columns WHERE database = '{clickhouse_database}' AND table = 'events' FORMAT TSV"
    ))
    .await;
    assert!(columns.lines().any(|c| c == "person_mode"), "{columns}");

    // A replayed event collapses: the events table is keyed so that the same uuid is one row.
    let insert = format!(
        "INSERT INTO {clickhouse_database}.events (uuid, event, properties, timestamp, team_id, \
         distinct_id, elements_chain, created_at, _timestamp, _offset) VALUES \
         ('5f1c6e6a-8c2e-4a57-9c49-0d4f7e0b8a11', 'x', '{{}}', now(), 1, 'd', '', now(), now(), 1)"
    );
    clickhouse_query(&insert).await;
    clickhouse_query(&insert).await;
    let rows = clickhouse_query(&format!(
        "SELECT count() FROM {clickhouse_database}.events FINAL"
    ))
    .await;
    assert_eq!(rows.trim(), "1");

    clickhouse_query(&format!("DROP DATABASE {clickhouse_database}")).await;
    postgres.drop_database().await;
}

#[tokio::test]
async fn concurrent_migrations_do_not_trip_over_each_other() {
    let postgres = FreshPostgres::create().await;
    let url = postgres.url.clone();
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || run_binary(&["--migrate"], &[("DATABASE_URL", &url)]))
        })
        .collect();
    for run in runs {
        let output = run.join().expect("thread");
        assert!(output.status.success(), "{}", text(&output.stderr));
    }
    let recorded: i64 = postgres
        .client()
        .await
        .query_one("SELECT count(*) FROM plugin_server_migrations", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(recorded, POSTGRES_MIGRATIONS.len() as i64);
    postgres.drop_database().await;
}

#[tokio::test]
async fn a_database_without_the_tables_fails_at_start_naming_one_and_the_command() {
    let database = FreshPostgres::create().await;
    let started = std::time::Instant::now();
    let output = run_binary(
        &[],
        &[
            ("DATABASE_URL", database.url.as_str()),
            ("HTTP_SERVER_PORT", "0"),
            ("BASE_DIR", std::env::temp_dir().to_str().expect("utf-8")),
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "has no table posthog_organization (and {} others)",
            plugin_server_actors::postgres::REQUIRED_TABLES.len() - 1
        )) && stderr.contains("run `plugin-server --migrate`"),
        "{stderr}"
    );

    // After --migrate the same settings start.
    crate::common::migrate(&[("DATABASE_URL", database.url.as_str())]);
    let client = database.client().await;
    client
        .batch_execute("DROP TABLE plugin_server_jobs_dead_letter")
        .await
        .expect("drop one table");
    let output = run_binary(
        &[],
        &[
            ("DATABASE_URL", database.url.as_str()),
            ("HTTP_SERVER_PORT", "0"),
        ],
    );
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("has no table plugin_server_jobs_dead_letter: run"),
        "{stderr}"
    );
    drop(client);
    database.drop_database().await;
}

#[tokio::test]
async fn an_unreachable_database_fails_naming_the_variable() {
    let output = run_binary(
        &["--migrate"],
        &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");

    let output = run_binary(&["--migrate"], &[("CLICKHOUSE_HOST", "127.0.0.1:1")]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("CLICKHOUSE_HOST"), "{stderr}");
}
