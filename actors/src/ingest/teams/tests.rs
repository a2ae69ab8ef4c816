use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// Counts the lookups that reach the store.
struct CountingStore {
    inner: EmbeddedTeamStore,
    known: Vec<String>,
    lookups: AtomicUsize,
}

#[async_trait]
impl TeamStore for CountingStore {
    async fn by_token(&self, token: &str) -> Result<Option<Team>, TeamStoreError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        if !self.known.iter().any(|known| known == token) {
            return Ok(None);
        }
        self.inner.by_token(token).await
    }

    async fn by_id(&self, id: i64) -> Result<Option<Team>, TeamStoreError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.inner.by_id(id).await
    }
}

fn manager(config: TeamCacheConfig) -> (TeamManager, Arc<CountingStore>) {
    let store = Arc::new(CountingStore {
        inner: EmbeddedTeamStore::new(),
        known: vec!["phc_a".to_owned(), "phc_b".to_owned()],
        lookups: AtomicUsize::new(0),
    });
    (TeamManager::new(store.clone(), config), store)
}

#[tokio::test]
async fn hits_and_misses_are_cached() {
    let (manager, store) = manager(TeamCacheConfig::default());
    for _ in 0..3 {
        let team = manager
            .by_token("phc_a")
            .await
            .expect("store")
            .expect("team");
        assert_eq!(team.api_token, "phc_a");
        assert!(
            manager
                .by_token("phc_unknown")
                .await
                .expect("store")
                .is_none()
        );
    }
    assert_eq!(store.lookups.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn stale_entries_are_fetched_again() {
    let (manager, store) = manager(TeamCacheConfig {
        refresh_after: Duration::ZERO,
        negative_ttl: Duration::ZERO,
        ..TeamCacheConfig::default()
    });
    manager.by_token("phc_a").await.expect("store");
    manager.by_token("phc_a").await.expect("store");
    manager.by_token("phc_nope").await.expect("store");
    manager.by_token("phc_nope").await.expect("store");
    assert_eq!(store.lookups.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn embedded_teams_are_created_per_token_and_found_by_id() {
    let store = EmbeddedTeamStore::new();
    let a = store.by_token("phc_a").await.expect("store").expect("team");
    let b = store.by_token("phc_b").await.expect("store").expect("team");
    let a_again = store.by_token("phc_a").await.expect("store").expect("team");
    assert_eq!((a.id, b.id, a_again.id), (1, 2, 1));
    assert_eq!(store.by_id(2).await.expect("store"), Some(b));
    assert_eq!(store.by_id(3).await.expect("store"), None);
    assert_eq!(store.by_id(0).await.expect("store"), None);
    assert_eq!(store.by_id(-1).await.expect("store"), None);
}
