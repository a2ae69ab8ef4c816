//! The embedded profile's group store: group types and groups in process memory, with the
//! same answers as Postgres gives (lowest free index, `$set` merge, earliest `created_at`).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::store::{
    Group, GroupKey, GroupStore, GroupStoreError, MAX_GROUP_TYPES, Upserted, apply_upsert,
};

#[derive(Default)]
pub struct MemoryGroupStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    types: HashMap<i64, HashMap<String, u8>>,
    groups: HashMap<GroupKey, Group>,
}

impl MemoryGroupStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl GroupStore for MemoryGroupStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn group_types(&self, team_id: i64) -> Result<HashMap<String, u8>, GroupStoreError> {
        Ok(self
            .state()
            .types
            .get(&team_id)
            .cloned()
            .unwrap_or_default())
    }

    async fn add_group_type(
        &self,
        team_id: i64,
        group_type: &str,
    ) -> Result<Option<u8>, GroupStoreError> {
        let mut state = self.state();
        let types = state.types.entry(team_id).or_default();
        if let Some(index) = types.get(group_type) {
            return Ok(Some(*index));
        }
        let free = (0..MAX_GROUP_TYPES).find(|index| !types.values().any(|taken| taken == index));
        if let Some(index) = free {
            types.insert(group_type.to_owned(), index);
        }
        Ok(free)
    }

    async fn groups(&self, keys: &[GroupKey]) -> Result<HashMap<GroupKey, Group>, GroupStoreError> {
        let state = self.state();
        Ok(keys
            .iter()
            .filter_map(|key| Some((key.clone(), state.groups.get(key)?.clone())))
            .collect())
    }

    async fn upsert(
        &self,
        key: &GroupKey,
        set: &Map<String, Value>,
        timestamp: DateTime<Utc>,
    ) -> Result<Upserted, GroupStoreError> {
        let mut state = self.state();
        let upserted = apply_upsert(state.groups.get(key).cloned(), key, set, timestamp);
        if upserted.written {
            state.groups.insert(key.clone(), upserted.group.clone());
        }
        Ok(upserted)
    }
}
