//! A batch's message payloads, back to back in one buffer.
//!
//! The consumer reads 25,000 messages into a batch. As one `Vec<u8>` each, every message cost
//! an allocation on the consumer's thread and a free on whichever thread dropped the batch
//! (mimalloc's slower cross-thread path), and the parse step read them from all over the heap.
//! Here a batch is two allocations, and the parse reads its messages in order.

use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payloads {
    bytes: Vec<u8>,
    /// Where each message ends in `bytes`; the first starts at 0, each next where the last ends.
    ends: Vec<usize>,
}

impl Payloads {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, payload: &[u8]) {
        self.bytes.extend_from_slice(payload);
        self.ends.push(self.bytes.len());
    }

    /// Empties it, keeping its buffers' capacity.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// How many messages.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The payloads' bytes together.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    pub fn get(&self, index: usize) -> Option<&[u8]> {
        self.bytes.get(self.range(index)?)
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        (0..self.len()).map(|index| {
            // Every index below `len` has a range within `bytes`.
            self.get(index).unwrap_or_default()
        })
    }

    fn range(&self, index: usize) -> Option<Range<usize>> {
        let end = *self.ends.get(index)?;
        let start = match index {
            0 => 0,
            _ => self.ends[index - 1],
        };
        Some(start..end)
    }
}

/// The buffers of batches that are done, kept for the next batches.
///
/// A backlog's batch is megabytes of payloads. In a fresh buffer, every page is faulted in as
/// the consumer writes it, and the buffer is copied each time it doubles: 2.3 % of the
/// server's CPU on the `baseline` benchmark. A kept buffer is already the size a batch needs,
/// and its pages are mapped.
#[derive(Debug, Clone)]
pub struct PayloadBuffers {
    spare: Arc<Mutex<Vec<Payloads>>>,
    /// The most kept at once: the batches the consumer can hold at a time.
    keep: usize,
}

impl PayloadBuffers {
    pub fn new(keep: usize) -> Self {
        Self {
            spare: Arc::default(),
            keep,
        }
    }

    /// An empty batch, in kept buffers when there are some.
    pub fn take(&self) -> Payloads {
        self.lock().pop().unwrap_or_default()
    }

    /// Keeps `payloads`' buffers, emptied, for a later batch (while fewer than `keep` are),
    /// unless the batch filled less than half of them: a backlog's buffer stays only while
    /// batches are as large, so that a smaller stream after a backlog does not keep its memory.
    pub fn give(&self, mut payloads: Payloads) {
        if payloads.bytes.len().saturating_mul(2) < payloads.bytes.capacity() {
            return;
        }
        payloads.clear();
        let mut spare = self.lock();
        if spare.len() < self.keep {
            spare.push(payloads);
        }
    }

    /// Lets every kept buffer go, so that an idle consumer gives back what a backlog took.
    pub fn release(&self) {
        // Freed after the lock is let go.
        let released = std::mem::take(&mut *self.lock());
        drop(released);
    }

    /// How many buffers are kept.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Payloads>> {
        self.spare.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: AsRef<[u8]>> FromIterator<T> for Payloads {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut payloads = Self::new();
        for payload in iter {
            payloads.push(payload.as_ref());
        }
        payloads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_comes_back_empty_with_its_capacity_up_to_the_limit() {
        let buffers = PayloadBuffers::new(2);
        assert_eq!(buffers.take(), Payloads::new());
        let mut batch = buffers.take();
        for _ in 0..1000 {
            batch.push(b"an event's payload");
        }
        let capacity = (batch.bytes.capacity(), batch.ends.capacity());
        buffers.give(batch);
        let again = buffers.take();
        assert!(again.is_empty());
        assert_eq!(again.byte_len(), 0);
        assert_eq!((again.bytes.capacity(), again.ends.capacity()), capacity);
        // A batch that filled less than half of its buffer gives it up.
        let mut small = again;
        small.push(b"one small event");
        buffers.give(small);
        assert_eq!(buffers.kept(), 0);
        // Only `keep` are kept; the rest are dropped.
        for _ in 0..3 {
            buffers.give(Payloads::from_iter([b"a payload"]));
        }
        assert_eq!(buffers.kept(), 2);
        buffers.release();
        assert_eq!(buffers.kept(), 0);
        assert_eq!(buffers.take().bytes.capacity(), 0);
    }

    #[test]
    fn payloads_come_back_in_order_empty_ones_included() {
        let payloads: Payloads = [&b"one"[..], b"", b"three"].into_iter().collect();
        assert_eq!(payloads.len(), 3);
        assert_eq!(payloads.byte_len(), 8);
        assert_eq!(
            payloads.iter().collect::<Vec<_>>(),
            [&b"one"[..], b"", b"three"]
        );
        assert_eq!(payloads.get(2), Some(&b"three"[..]));
        assert_eq!(payloads.get(3), None);
        assert!(Payloads::new().iter().next().is_none());
    }
}
