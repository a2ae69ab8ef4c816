use std::time::Duration;

use super::*;

fn key(distinct_id: &str) -> OrderKey {
    OrderKey::new(1, distinct_id)
}

/// Whether `future` is still pending after the runtime had every chance to run it.
async fn stays_pending(future: impl std::future::Future<Output = ()>) -> bool {
    tokio::time::timeout(Duration::from_millis(50), future)
        .await
        .is_err()
}

#[tokio::test]
async fn a_later_batch_waits_for_the_earlier_holder_of_its_key() {
    let order = KeyOrder::new();
    let first = order.next_turn();
    let second = order.next_turn();
    first.claim([key("a")]).await;
    assert!(stays_pending(second.claim([key("a")])).await);
    drop(first);
    second.claim([key("a")]).await;
}

/// A batch whose changes are final releases its keys before it ends (it is still being
/// written): the later batch goes on, and the released batch's end changes nothing.
#[tokio::test]
async fn a_released_claim_lets_the_later_batch_go_on_before_the_end() {
    let order = KeyOrder::new();
    let first = order.next_turn();
    let second = order.next_turn();
    first.claim([key("a"), key("b")]).await;
    assert!(stays_pending(second.claim([key("a")])).await);
    first.keep(Arc::new(7_u32));
    first.release();
    second.claim([key("a")]).await;
    assert_eq!(order.held_keys(), 1, "b is free, a is the second batch's");
    assert_eq!(first.kept::<u32>().as_deref(), Some(&7));
    assert!(first.kept::<String>().is_none(), "kept as another type");
    drop(first);
    assert_eq!(
        order.held_keys(),
        1,
        "the first batch's end leaves the second's key"
    );
    let third = order.next_turn();
    assert!(stays_pending(third.claim([key("a")])).await);
    drop(second);
    third.claim([key("a")]).await;
}

#[tokio::test]
async fn batches_of_different_ids_do_not_wait_for_each_other() {
    let order = KeyOrder::new();
    let first = order.next_turn();
    let second = order.next_turn();
    first.claim([key("a")]).await;
    second.claim([key("b"), key("c")]).await;
    assert_eq!(order.held_keys(), 3);
    drop((first, second));
    assert_eq!(order.held_keys(), 0);
}

#[tokio::test]
async fn claims_are_made_in_turn_order() {
    let order = KeyOrder::new();
    let first = order.next_turn();
    let second = order.next_turn();
    // The second batch reached its person step first: it must not get ahead of the first,
    // which may hold the same ids once it claims.
    let second_claim = second.claim([key("a")]);
    tokio::pin!(second_claim);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut second_claim)
            .await
            .is_err()
    );
    first.claim([key("a")]).await;
    // Now the second has claimed, behind the first.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut second_claim)
            .await
            .is_err()
    );
    drop(first);
    second_claim.await;
}

#[tokio::test]
async fn a_batch_that_ends_without_claiming_does_not_hold_up_the_next() {
    let order = KeyOrder::new();
    let first = order.next_turn();
    let second = order.next_turn();
    let third = order.next_turn();
    // Ended out of order, neither having claimed (e.g. wholly rerouted to overflow).
    drop(second);
    drop(first);
    third.claim([key("a")]).await;
}

#[tokio::test]
async fn a_retry_keeps_its_claims_and_does_not_wait_again() {
    let order = KeyOrder::new();
    let first = order.next_turn();
    let second = order.next_turn();
    first.claim([key("a")]).await;
    let waiting = tokio::spawn({
        let second = Arc::new(second);
        async move {
            second.claim([key("a")]).await;
            second
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The first batch's attempt failed after its person step; its retry claims again and still
    // comes first.
    first.claim([key("a"), key("new")]).await;
    assert!(!waiting.is_finished());
    drop(first);
    let second = waiting.await.expect("claimed");
    // The retry's new key went with the first batch.
    assert_eq!(order.held_keys(), 1);
    drop(second);
    assert_eq!(order.held_keys(), 0);
}

#[tokio::test]
async fn a_key_waits_for_the_latest_holder_only() {
    let order = KeyOrder::new();
    let turns: Vec<BatchTurn> = (0..3).map(|_| order.next_turn()).collect();
    let mut turns = turns.into_iter();
    let (first, second, third) = (
        turns.next().expect("turn"),
        turns.next().expect("turn"),
        turns.next().expect("turn"),
    );
    first.claim([key("a")]).await;
    let second = Arc::new(second);
    let second_claim = tokio::spawn({
        let second = Arc::clone(&second);
        async move { second.claim([key("a")]).await }
    });
    let third = Arc::new(third);
    let third_claim = tokio::spawn({
        let third = Arc::clone(&third);
        async move { third.claim([key("a")]).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(first);
    second_claim.await.expect("second claimed");
    // The third comes after the second, not merely after the first.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!third_claim.is_finished());
    drop(second);
    third_claim.await.expect("third claimed");
}

#[tokio::test]
async fn a_claim_cut_short_and_made_again_still_waits_for_the_earlier_holder() {
    let order = KeyOrder::new();
    let first = order.next_turn();
    let second = order.next_turn();
    first.claim([key("a")]).await;
    // The second batch's claim registers, then its wait is dropped (the pipeline restarted).
    assert!(stays_pending(second.claim([key("a")])).await);
    // Its retry must not overtake the first batch.
    assert!(stays_pending(second.claim([key("a")])).await);
    drop(first);
    second.claim([key("a")]).await;
}
