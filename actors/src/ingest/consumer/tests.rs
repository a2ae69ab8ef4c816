use super::*;

fn spans(entries: &[(i32, i64)]) -> Vec<(i32, i64, Option<i64>)> {
    entries.iter().map(|&(p, o)| (p, o, Some(o * 10))).collect()
}

#[test]
fn a_batch_keeps_each_partitions_last_offset() {
    let mut batch = Batch::default();
    for (partition, offset) in [(0, 1), (0, 2), (1, 7), (0, 3), (1, 8), (2, 4)] {
        batch.note(partition, offset, Some(offset * 10));
    }
    assert_eq!(
        batch.spans,
        vec![(0, 3, Some(30)), (1, 8, Some(80)), (2, 4, Some(40))]
    );
}

#[test]
fn offsets_are_released_in_order_per_partition() {
    let mut tracker = Tracker::default();
    let first = tracker.register(&spans(&[(0, 10), (1, 5)]));
    let second = tracker.register(&spans(&[(0, 20)]));
    let third = tracker.register(&spans(&[(1, 9)]));
    assert_eq!(tracker.in_flight, 3);

    // The second batch is stored first: partition 0 must wait for the first batch.
    assert!(tracker.complete(second).is_empty());
    let mut ready = tracker.complete(first);
    ready.sort_unstable();
    assert_eq!(ready, vec![(0, 20, Some(200)), (1, 5, Some(50))]);
    assert_eq!(tracker.complete(third), vec![(1, 9, Some(90))]);
    assert_eq!(tracker.in_flight, 0);
}

#[test]
fn revoked_partitions_are_forgotten() {
    let mut tracker = Tracker::default();
    let first = tracker.register(&spans(&[(0, 10), (1, 5)]));
    tracker.forget(&[0]);
    assert_eq!(tracker.complete(first), vec![(1, 5, Some(50))]);
}

#[tokio::test]
async fn only_a_full_batch_takes_a_backlog_slot() {
    use std::time::Duration;
    async fn pending<T>(future: impl std::future::Future<Output = T>) -> bool {
        tokio::time::timeout(Duration::from_millis(50), future)
            .await
            .is_err()
    }
    let slots = Slots::new(1, 1);
    let first = slots.take(false).await.expect("a regular slot");
    assert!(
        pending(slots.take(false)).await,
        "the regular slot is taken"
    );
    let backlog = slots
        .take(true)
        .await
        .expect("the backlog slot, for a full batch");
    assert!(pending(slots.take(true)).await, "both slots are taken");
    assert!(pending(slots.all_free()).await);
    drop(first);
    let again = slots
        .take(false)
        .await
        .expect("the regular slot, free again");
    drop((again, backlog));
    slots.all_free().await;
}
