//! Order per `team:distinct_id` across the batches in flight.
//!
//! The Kafka consumer keeps several batches in flight, so that the next one is parsed and runs
//! its plugins while the last one is written. Without more, two batches holding events of the
//! same distinct id then race through the person step, and the later event's `$set` can land
//! first and be overwritten by the earlier one (issue 23: a third of persons ended stale under
//! sustained load). PostHog avoids the race by running one partition's batches strictly one
//! after another; here only the distinct ids two batches share wait for each other, so batches
//! of different users still overlap.
//!
//! Each batch takes a [`BatchTurn`] from the consumer's [`KeyOrder`] when it is read, in read
//! order. Before its person step the batch claims the keys its events touch
//! ([`BatchTurn::claim`]). Claims are made in turn order, and a claim then waits for every
//! earlier batch that claimed one of the same keys to end. A batch ends when its turn is
//! dropped, once it is stored or given up: a failed attempt keeps its claims, so its retry
//! still comes before any later batch of the same users, and a retried batch never reapplies
//! an old `$set` over a newer one.
//!
//! A batch may end its claim sooner, with [`BatchTurn::release`], once its person changes are
//! final: the pipeline keeps the person step's answers in the turn ([`BatchTurn::keep`]) and a
//! retry reuses them instead of applying the changes again, so the later batches need not wait
//! for its write.
//!
//! Waits only ever point at earlier turns, so they cannot form a cycle.

use std::any::Any;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What is ordered: a team and one of its distinct ids, as a hash of the two.
///
/// A batch claims one key per event, 25,000 at a time: a hash spares it copying every distinct
/// id into the holders' map. Two ids whose hashes collide only make their batches wait for
/// each other, which costs some overlap and never an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrderKey(u64);

impl OrderKey {
    pub fn new(team_id: i64, distinct_id: &str) -> Self {
        use std::hash::BuildHasher;
        // Fixed, so that a key is the same in every batch of the process.
        Self(
            foldhash::fast::FixedState::with_seed(0x6f72_6465_725f_6b65)
                .hash_one((team_id, distinct_id)),
        )
    }
}

/// The turns of one consumer's batches.
pub struct KeyOrder {
    state: Mutex<State>,
    /// The next turn allowed to claim; claims wait on it.
    next_claim: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    /// Turns handed out so far.
    issued: u64,
    /// The next turn allowed to claim (mirrored in `KeyOrder::next_claim`).
    next_claim: u64,
    /// Turns that ended before claiming, ahead of `next_claim`: skipped when it gets there.
    ended_unclaimed: BTreeSet<u64>,
    /// The last turn to claim each key.
    holders: HashMap<OrderKey, u64, foldhash::fast::RandomState>,
    /// The end signal of each turn that holds keys, for later claimants to wait on.
    ends: HashMap<u64, CancellationToken>,
}

impl State {
    /// Drops what `turn` holds. Keys a later batch has claimed since stay with it.
    fn forget(&mut self, turn: u64) {
        self.holders.retain(|_, holder| *holder != turn);
        self.ends.remove(&turn);
    }

    /// Moves `next_claim` past `turn` and past every turn after it that already ended.
    fn advance_past(&mut self, turn: u64) {
        if self.next_claim != turn {
            return;
        }
        self.next_claim = turn + 1;
        while self.ended_unclaimed.remove(&self.next_claim) {
            self.next_claim += 1;
        }
    }
}

impl KeyOrder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            next_claim: watch::Sender::new(0),
        })
    }

    /// The next batch's turn. Call in the order the batches were read.
    pub fn next_turn(self: &Arc<Self>) -> BatchTurn {
        let mut state = self.lock();
        let turn = state.issued;
        state.issued += 1;
        BatchTurn {
            order: Arc::clone(self),
            turn,
            ended: CancellationToken::new(),
            claimed: Mutex::new(None),
            kept: OnceLock::new(),
        }
    }

    /// Keys held by batches that have not ended.
    #[cfg(test)]
    fn held_keys(&self) -> usize {
        self.lock().holders.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, next_claim: u64) {
        self.next_claim.send_replace(next_claim);
    }
}

/// One batch's place in its consumer's order; dropping it ends the batch.
pub struct BatchTurn {
    order: Arc<KeyOrder>,
    turn: u64,
    /// Cancelled when the batch ends; later claimants of its keys wait for it.
    ended: CancellationToken,
    /// What the first claim took, once it is made.
    claimed: Mutex<Option<Claimed>>,
    /// What the batch's first attempt kept for its retries (see [`BatchTurn::keep`]).
    kept: OnceLock<Arc<dyn Any + Send + Sync>>,
}

/// The keys a batch claimed are the `holders` entries carrying its turn; what is kept here is
/// only what those entries no longer say.
struct Claimed {
    /// The ends of the earlier batches that held one of the keys: a claim made again after the
    /// first was cut short (the pipeline restarted mid-wait) still waits for them.
    earlier: Vec<CancellationToken>,
}

impl std::fmt::Debug for BatchTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchTurn")
            .field("turn", &self.turn)
            .finish_non_exhaustive()
    }
}

impl BatchTurn {
    /// Claims `keys` for this batch and waits until no earlier batch holds any of them.
    ///
    /// A retry of the batch claims again: what it claimed before is still its own, behind the
    /// same earlier batches. A key the retry names for the first time (a plugin that answers
    /// differently) is taken if free and left to its holder otherwise, since waiting for a later
    /// batch could wait forever.
    pub async fn claim(&self, keys: impl IntoIterator<Item = OrderKey>) {
        let mut keys = keys.into_iter();
        if let Some(earlier) = self.claim_again(&mut keys) {
            for ended in earlier {
                ended.cancelled().await;
            }
            return;
        }
        let mut next_claim = self.order.next_claim.subscribe();
        // The sender lives in `order`, which this turn keeps alive, so this cannot fail.
        let _ = next_claim.wait_for(|next| *next >= self.turn).await;
        let (earlier, next) = {
            // Always `claimed` before `state`, as in `claim_again`.
            let mut claimed = self.claimed.lock().unwrap_or_else(PoisonError::into_inner);
            let mut state = self.order.lock();
            // The earlier turns are the few batches in flight; the keys are thousands.
            let mut earlier_turns = BTreeSet::new();
            for key in keys {
                let previous = state.holders.insert(key, self.turn);
                // A key named twice in the batch finds its own turn the second time.
                if let Some(turn) = previous
                    && turn < self.turn
                {
                    earlier_turns.insert(turn);
                }
            }
            state.ends.insert(self.turn, self.ended.clone());
            // A turn in `holders` has not ended, so its signal is there.
            let earlier: Vec<CancellationToken> = earlier_turns
                .iter()
                .filter_map(|turn| state.ends.get(turn).cloned())
                .collect();
            *claimed = Some(Claimed {
                earlier: earlier.clone(),
            });
            state.advance_past(self.turn);
            (earlier, state.next_claim)
        };
        self.order.publish(next);
        for ended in earlier {
            ended.cancelled().await;
        }
    }

    /// A later claim of a batch that already claimed: the earlier batches it still waits for;
    /// `None` when it had not claimed.
    fn claim_again(&self, keys: impl Iterator<Item = OrderKey>) -> Option<Vec<CancellationToken>> {
        let mut claimed = self.claimed.lock().unwrap_or_else(PoisonError::into_inner);
        let Claimed { earlier } = claimed.as_mut()?;
        let mut state = self.order.lock();
        for key in keys {
            // Taken only if free: a held key is this batch's own or a later batch's.
            state.holders.entry(key).or_insert(self.turn);
        }
        earlier.retain(|ended| !ended.is_cancelled());
        Some(earlier.clone())
    }
}

impl BatchTurn {
    /// Keeps `value` for the batch's later attempts (the first value kept stays).
    pub fn keep<T: Any + Send + Sync>(&self, value: Arc<T>) {
        let _ = self.kept.set(value);
    }

    /// What an earlier attempt of the batch kept, if it was a `T`.
    pub fn kept<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        Arc::clone(self.kept.get()?).downcast::<T>().ok()
    }

    /// Ends the batch's claim before the batch ends: the later batches holding the same keys
    /// go on. Only for a batch whose changes to those keys are final (its retries reuse what it
    /// [kept](Self::keep) rather than changing them again).
    pub fn release(&self) {
        let claimed = self.claimed.lock().unwrap_or_else(PoisonError::into_inner);
        if claimed.is_some() {
            self.order.lock().forget(self.turn);
        }
        drop(claimed);
        self.ended.cancel();
    }
}

impl Drop for BatchTurn {
    fn drop(&mut self) {
        let claimed = self
            .claimed
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let next = {
            let mut state = self.order.lock();
            match claimed {
                // Keys a later batch has claimed since stay with it.
                Some(_) => state.forget(self.turn),
                None if state.next_claim == self.turn => state.advance_past(self.turn),
                None => {
                    state.ended_unclaimed.insert(self.turn);
                }
            }
            state.next_claim
        };
        self.ended.cancel();
        self.order.publish(next);
    }
}

#[cfg(test)]
mod tests;
