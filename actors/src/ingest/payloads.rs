//! A batch's message payloads, back to back in one buffer.
//!
//! The consumer reads 25,000 messages into a batch. As one `Vec<u8>` each, every message cost
//! an allocation on the consumer's thread and a free on whichever thread dropped the batch
//! (mimalloc's slower cross-thread path), and the parse step read them from all over the heap.
//! Here a batch is two allocations, and the parse reads its messages in order.

use std::ops::Range;

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
