//! Sync messages: tell every other instance that shared state changed, but only once the
//! Postgres transaction that changed it has committed.
//!
//! Publishing inside the transaction would let another instance react (and re-read) before
//! the change is visible, or after it was rolled back. So messages are collected in a
//! `PendingSync` while the transaction runs and published by `commit_and_publish` after a
//! successful commit; a rollback, a failed commit or a dropped transaction publishes nothing
//! (NocoBase instead waits 50 s for a commit that never comes). Messages go out with
//! `skip_self`: the instance that made the change already knows.
//!
//! Channels are `sync.<name>` on the deployment's pub/sub. There is no catch-up for an instance
//! that was disconnected when a message went out; the users (plugin reload) also poll.

use async_trait::async_trait;
use serde_json::Value;

use super::ClusterError;
use super::pubsub::{PubSub, PublishOptions, SubscribeOptions, Subscription};

const CHANNEL_PREFIX: &str = "sync.";

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("transaction did not commit; nothing was published: {0}")]
    Commit(#[source] tokio_postgres::Error),
    /// The change is committed; only the notice failed. Other instances catch up by polling.
    #[error("committed, but publishing the sync message failed: {0}")]
    Publish(#[source] ClusterError),
}

/// A transaction that can be committed: tokio-postgres' own, or deadpool's wrapper.
#[async_trait]
pub trait Commit: Send {
    async fn commit(self) -> Result<(), tokio_postgres::Error>;
}

#[async_trait]
impl Commit for tokio_postgres::Transaction<'_> {
    async fn commit(self) -> Result<(), tokio_postgres::Error> {
        tokio_postgres::Transaction::commit(self).await
    }
}

#[async_trait]
impl Commit for deadpool_postgres::Transaction<'_> {
    async fn commit(self) -> Result<(), tokio_postgres::Error> {
        deadpool_postgres::Transaction::commit(self).await
    }
}

/// Messages waiting for their transaction to commit.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PendingSync {
    messages: Vec<(String, Value)>,
}

impl PendingSync {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, channel: impl Into<String>, payload: Value) {
        self.messages.push((channel.into(), payload));
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// Sync messages over one instance's pub/sub.
#[derive(Clone)]
pub struct SyncMessages {
    pubsub: PubSub,
}

impl SyncMessages {
    pub fn new(pubsub: PubSub) -> Self {
        Self { pubsub }
    }

    /// Commits, then publishes every pending message in order.
    pub async fn commit_and_publish<T: Commit>(
        &self,
        transaction: T,
        pending: PendingSync,
    ) -> Result<(), SyncError> {
        transaction.commit().await.map_err(SyncError::Commit)?;
        for (channel, payload) in &pending.messages {
            self.publish(channel, payload)
                .await
                .map_err(SyncError::Publish)?;
        }
        Ok(())
    }

    /// Publishes a change that was not made in a transaction (or is already committed).
    pub async fn publish(&self, channel: &str, payload: &Value) -> Result<(), ClusterError> {
        self.pubsub
            .publish(
                &format!("{CHANNEL_PREFIX}{channel}"),
                payload,
                PublishOptions::default(),
            )
            .await
    }

    /// Messages other instances publish on `channel`.
    pub async fn subscribe(
        &self,
        channel: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, ClusterError> {
        self.pubsub
            .subscribe(&format!("{CHANNEL_PREFIX}{channel}"), options)
            .await
    }
}
