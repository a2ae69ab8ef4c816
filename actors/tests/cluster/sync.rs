//! Sync messages against the real Postgres: published after commit, never on rollback or a
//! failed commit, and only to the other instances.
#![cfg(feature = "integration-tests")]

use crate::common;

use std::time::Duration;

use plugin_server_actors::cluster::InstanceId;
use plugin_server_actors::cluster::pubsub::{InProcessBus, PubSub, SubscribeOptions};
use plugin_server_actors::cluster::sync::{PendingSync, SyncError, SyncMessages};
use serde_json::json;

async fn connect() -> tokio_postgres::Client {
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL is not set: run the suite with `bash functional_tests/run.sh`");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("postgres");
    tokio::spawn(connection);
    client
}

fn two_instances() -> (SyncMessages, SyncMessages) {
    let bus = InProcessBus::new();
    let prefix = common::unique_prefix("sync");
    let make = |name: &str| {
        let (transport, inbound) = bus.transport();
        SyncMessages::new(PubSub::new(
            InstanceId::new(name),
            prefix.clone(),
            transport,
            inbound,
        ))
    };
    (make("writer"), make("reader"))
}

struct Table {
    name: String,
}

impl Table {
    async fn create(client: &tokio_postgres::Client) -> Self {
        let name = format!("sync_test_{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!(
                "CREATE TABLE {name} (id int PRIMARY KEY, other int UNIQUE DEFERRABLE INITIALLY DEFERRED)"
            ))
            .await
            .expect("create");
        Self { name }
    }

    async fn drop(self, client: &tokio_postgres::Client) {
        client
            .batch_execute(&format!("DROP TABLE {}", self.name))
            .await
            .expect("drop");
    }
}

#[tokio::test]
async fn a_message_goes_out_after_commit_and_sees_the_change() {
    let mut writer_db = connect().await;
    let reader_db = connect().await;
    let table = Table::create(&writer_db).await;
    let (writer, reader) = two_instances();
    let mut at_reader = reader
        .subscribe("plugins", SubscribeOptions::default())
        .await
        .expect("subscribed");
    let mut at_writer = writer
        .subscribe("plugins", SubscribeOptions::default())
        .await
        .expect("subscribed");

    let transaction = writer_db.transaction().await.expect("begin");
    transaction
        .execute(&format!("INSERT INTO {} (id) VALUES (1)", table.name), &[])
        .await
        .expect("insert");
    let mut pending = PendingSync::new();
    pending.push("plugins", json!({"id": 1}));
    writer
        .commit_and_publish(transaction, pending)
        .await
        .expect("committed and published");

    let message = tokio::time::timeout(Duration::from_secs(5), at_reader.recv())
        .await
        .expect("delivered")
        .expect("open");
    assert_eq!(message.payload, json!({"id": 1}));
    let visible: i64 = reader_db
        .query_one(&format!("SELECT count(*) FROM {}", table.name), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(visible, 1, "the change is visible when the message arrives");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), at_writer.recv())
            .await
            .is_err(),
        "the writer does not hear itself"
    );
    table.drop(&writer_db).await;
}

#[tokio::test]
async fn nothing_goes_out_on_rollback_or_a_failed_commit() {
    let mut db = connect().await;
    let table = Table::create(&db).await;
    let (writer, reader) = two_instances();
    let mut at_reader = reader
        .subscribe("plugins", SubscribeOptions::default())
        .await
        .expect("subscribed");

    // Rolled back: the messages collected meanwhile are simply never published.
    let transaction = db.transaction().await.expect("begin");
    transaction
        .execute(&format!("INSERT INTO {} (id) VALUES (1)", table.name), &[])
        .await
        .expect("insert");
    let mut pending = PendingSync::new();
    pending.push("plugins", json!("rolled back"));
    transaction.rollback().await.expect("rollback");
    drop(pending);

    // The commit itself fails: a deferred unique constraint is checked at COMMIT.
    let transaction = db.transaction().await.expect("begin");
    transaction
        .execute(
            &format!(
                "INSERT INTO {} (id, other) VALUES (2, 7), (3, 7)",
                table.name
            ),
            &[],
        )
        .await
        .expect("accepted until commit");
    let mut pending = PendingSync::new();
    pending.push("plugins", json!("failed commit"));
    let result = writer.commit_and_publish(transaction, pending).await;
    assert!(matches!(result, Err(SyncError::Commit(_))), "{result:?}");

    assert!(
        tokio::time::timeout(Duration::from_millis(500), at_reader.recv())
            .await
            .is_err(),
        "nothing was published"
    );
    table.drop(&db).await;
}
