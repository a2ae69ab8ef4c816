//! Helpers for this crate's tests against the real Postgres of the test run
//! (`functional_tests/run.sh` exports DATABASE_URL).

/// A new database on the test run's Postgres, migrated like production, and a pool on it.
/// `prefix` names the database so that a leftover one tells which test made it.
pub async fn fresh_postgres(prefix: &str) -> (deadpool_postgres::Pool, String) {
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL: run the suite with `bash functional_tests/run.sh`");
    let server = url
        .rsplit_once('/')
        .map_or(url.as_str(), |(server, _)| server);
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let (admin, connection) =
        tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect");
    tokio::spawn(connection);
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let database_url = format!("{server}/{name}");
    crate::migrations::migrate_postgres(&database_url)
        .await
        .expect("migrate");
    let pool = crate::postgres::connect(&database_url, 8)
        .await
        .expect("pool");
    (pool, database_url)
}

/// An organization and teams with these ids (tokens `token<id>`) on a fresh database.
pub async fn insert_teams(pool: &deadpool_postgres::Pool, ids: &[i32]) {
    let client = pool.get().await.expect("connection");
    client
        .execute(
            "INSERT INTO posthog_organization (id, name) VALUES (gen_random_uuid(), 'Org')",
            &[],
        )
        .await
        .expect("organization");
    client
        .execute(
            "INSERT INTO posthog_team (id, organization_id, api_token, name) \
             SELECT id, (SELECT id FROM posthog_organization LIMIT 1), 'token' || id, 'Team' \
             FROM unnest($1::int4[]) AS id",
            &[&ids],
        )
        .await
        .expect("teams");
}
