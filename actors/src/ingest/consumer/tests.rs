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
