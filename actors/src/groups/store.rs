//! Where groups live: `posthog_grouptypemapping` and `posthog_group` in Postgres, or the
//! embedded profile's in-process store. Both give the same answers, so the rules of
//! [`super::manager`] hold for both.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// A team has at most this many group types: the `events` table has five group columns.
pub const MAX_GROUP_TYPES: u8 = 5;

/// Which group: a team's group of one type (by its index) and key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub team_id: i64,
    pub group_type_index: u8,
    pub group_key: String,
}

/// A `posthog_group` row as ingestion reads and writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub key: GroupKey,
    pub properties: Map<String, Value>,
    pub created_at: DateTime<Utc>,
    /// 1 when created, bumped on every change.
    pub version: i64,
}

/// What an upsert left behind.
#[derive(Debug, Clone, PartialEq)]
pub struct Upserted {
    pub group: Group,
    /// Whether this upsert wrote a new version (a new group, a changed property, an earlier
    /// creation time); only then does ClickHouse get a row.
    pub written: bool,
}

/// One group's `$groupidentify`s of a batch, combined: their `$group_set`s merged in event
/// order (a later value wins, as upserting each in turn would leave it) and the earliest of
/// their timestamps.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupUpsert {
    pub key: GroupKey,
    pub set: Map<String, Value>,
    pub timestamp: DateTime<Utc>,
}

/// What [`GroupStore::upsert_batch`] did to one group: `Ok(Some(group))` wrote a new version,
/// `Ok(None)` changed nothing, `Err` refused this group (or could not reach the store).
pub type BatchUpserted = Result<Option<Group>, GroupStoreError>;

#[derive(Debug, thiserror::Error)]
pub enum GroupStoreError {
    /// The store cannot answer; the batch is retried later rather than its events stored
    /// with wrong group columns.
    #[error("cannot reach the group store (check DATABASE_URL): {0}")]
    Unavailable(String),
    /// The store refused this event's data (a group key longer than its column, a `\u0000`
    /// in a property). Only this event is affected: it is dead-lettered.
    #[error("the group store refused the event: {0}")]
    Rejected(String),
}

/// Group types and groups.
#[async_trait]
pub trait GroupStore: Send + Sync + 'static {
    /// For logs: `postgres` or `memory`.
    fn name(&self) -> &'static str;

    /// The team's group types and their indexes.
    async fn group_types(&self, team_id: i64) -> Result<HashMap<String, u8>, GroupStoreError>;

    /// The index of `group_type`, given the lowest free index if the team does not have it
    /// yet; `None` when the team already has [`MAX_GROUP_TYPES`] other types. Two callers
    /// adding the same type at once get the same index.
    async fn add_group_type(
        &self,
        team_id: i64,
        group_type: &str,
    ) -> Result<Option<u8>, GroupStoreError>;

    /// The groups of these keys that exist, read in one go.
    async fn groups(&self, keys: &[GroupKey]) -> Result<HashMap<GroupKey, Group>, GroupStoreError>;

    /// Merges `set` into the group's properties as `$set` would (a key is overwritten when
    /// missing or different), creating the group if needed, and makes its `created_at` the
    /// earlier of the stored one and `timestamp`. Atomic: concurrent upserts of one group
    /// from several instances each see the other's properties.
    async fn upsert(
        &self,
        key: &GroupKey,
        set: &Map<String, Value>,
        timestamp: DateTime<Utc>,
    ) -> Result<Upserted, GroupStoreError>;

    /// [`Self::upsert`] for several groups (each key at most once), answering per group in
    /// the order given. A store that can should write them in one go: a batch's
    /// `$groupidentify`s then cost one round trip, not one each. The outer error means
    /// nothing can be said about any of them. By default, one upsert per group.
    async fn upsert_batch(
        &self,
        upserts: &[GroupUpsert],
    ) -> Result<Vec<BatchUpserted>, GroupStoreError> {
        upsert_one_by_one(self, upserts).await
    }
}

/// [`GroupStore::upsert_batch`] as one [`GroupStore::upsert`] per group: the default, and
/// how a store that refused a whole batch finds out which groups it refuses.
pub async fn upsert_one_by_one<S: GroupStore + ?Sized>(
    store: &S,
    upserts: &[GroupUpsert],
) -> Result<Vec<BatchUpserted>, GroupStoreError> {
    let mut answers = Vec::with_capacity(upserts.len());
    for upsert in upserts {
        let answer = match store
            .upsert(&upsert.key, &upsert.set, upsert.timestamp)
            .await
        {
            Ok(upserted) => Ok(upserted.written.then_some(upserted.group)),
            Err(error @ GroupStoreError::Rejected(_)) => Err(error),
            Err(error @ GroupStoreError::Unavailable(_)) => return Err(error),
        };
        answers.push(answer);
    }
    Ok(answers)
}

/// A store shared by the pipeline's tasks.
pub type SharedGroupStore = Arc<dyn GroupStore>;

/// `$group_set` applied to `properties`: each key overwritten when missing or different.
/// Returns whether anything changed. (PostHog compares with JS `!=`, so an object value
/// always counts as changed; here equal JSON is unchanged and writes no new version.)
pub fn merge_group_set(properties: &mut Map<String, Value>, set: &Map<String, Value>) -> bool {
    let mut changed = false;
    for (key, value) in set {
        if properties.get(key) != Some(value) {
            properties.insert(key.clone(), value.clone());
            changed = true;
        }
    }
    changed
}

/// What upserting `set` at `timestamp` makes of `group` (`None`: no such group yet): `$set`
/// merged, the earlier `created_at`, and the version bumped only when that changed something.
pub fn apply_upsert(
    group: Option<Group>,
    key: &GroupKey,
    set: &Map<String, Value>,
    timestamp: DateTime<Utc>,
) -> Upserted {
    let Some(mut group) = group else {
        return Upserted {
            group: Group {
                key: key.clone(),
                properties: set.clone(),
                created_at: timestamp,
                version: 1,
            },
            written: true,
        };
    };
    let mut written = merge_group_set(&mut group.properties, set);
    if timestamp < group.created_at {
        group.created_at = timestamp;
        written = true;
    }
    if written {
        group.version += 1;
    }
    Upserted { group, written }
}

/// A row of ClickHouse's `groups` table (topic `clickhouse_groups`).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRow {
    pub team_id: i64,
    pub group_type_index: u8,
    pub group_key: String,
    /// The properties object, serialized as JSON.
    pub properties: String,
    pub created_at: DateTime<Utc>,
    pub version: i64,
}

impl GroupRow {
    pub fn of(group: &Group) -> Self {
        Self {
            team_id: group.key.team_id,
            group_type_index: group.key.group_type_index,
            group_key: group.key.group_key.clone(),
            properties: crate::persons::rows::properties_json(&group.properties),
            created_at: group.created_at,
            version: group.version,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn map(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn group_set_overwrites_missing_and_different_keys_only() {
        let mut properties = map(json!({"a": 1, "b": {"x": 1}}));
        assert!(!merge_group_set(
            &mut properties,
            &map(json!({"a": 1, "b": {"x": 1}}))
        ));
        assert!(merge_group_set(
            &mut properties,
            &map(json!({"a": 2, "c": null}))
        ));
        assert_eq!(
            Value::Object(properties),
            json!({"a": 2, "b": {"x": 1}, "c": null})
        );
    }

    #[test]
    fn an_empty_group_set_changes_nothing() {
        let mut properties = map(json!({"a": 1}));
        assert!(!merge_group_set(&mut properties, &Map::new()));
        assert_eq!(Value::Object(properties), json!({"a": 1}));
    }
}
