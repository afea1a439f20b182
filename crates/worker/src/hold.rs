//! The hold: tasks a worker took from its queue's ahead lane, waiting for
//! their due time without a run slot. One starter hands them run slots in
//! due order, so a burst due at one instant wakes one task per free slot,
//! not every task held at once.

use std::cell::Cell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use kairos_proto::v1 as pb;
use prost::Message as _;
use tokio::sync::{Notify, OwnedSemaphorePermit};

/// A delivery from the ahead lane, waiting for its due time.
pub(crate) struct Held {
    /// Due time in µs since the epoch; 0 when the body is not a task
    /// envelope (it is settled, and reported, at once).
    pub(crate) due_us: i64,
    seq: u64,
    pub(crate) msg: Arc<jetstream::Message>,
    /// The envelope, decoded once here rather than again when it starts;
    /// boxed, since the heap moves entries on every push and pop.
    pub(crate) envelope: Option<Box<pb::TaskEnvelope>>,
    /// Its place in the hold, given back once its handler returned.
    pub(crate) room: OwnedSemaphorePermit,
    /// When JetStream last heard it is being worked on (delivered, or kept alive).
    kept: Cell<Instant>,
}

impl Held {
    fn key(&self) -> (i64, u64) {
        (self.due_us, self.seq)
    }
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

/// The held deliveries of one worker, earliest due first.
#[derive(Default)]
pub(crate) struct Hold {
    heap: Mutex<(BinaryHeap<Reverse<Held>>, u64)>,
    /// Wakes the starter: a delivery came in, maybe due before the one it
    /// sleeps for.
    added: Notify,
}

impl Hold {
    fn heap(&self) -> MutexGuard<'_, (BinaryHeap<Reverse<Held>>, u64)> {
        self.heap.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds a delivery until its due time.
    pub(crate) fn push(&self, msg: jetstream::Message, room: OwnedSemaphorePermit) {
        let envelope = pb::TaskEnvelope::decode(msg.payload.clone())
            .ok()
            .map(Box::new);
        let due_us = envelope
            .as_ref()
            .map_or(0, |e| e.due_at_ms.saturating_mul(1000));
        {
            let mut heap = self.heap();
            let seq = heap.1;
            heap.1 += 1;
            heap.0.push(Reverse(Held {
                due_us,
                seq,
                msg: Arc::new(msg),
                envelope,
                room,
                kept: Cell::new(Instant::now()),
            }));
        }
        self.added.notify_one();
    }

    /// The earliest due time held, in µs since the epoch.
    pub(crate) fn next_due(&self) -> Option<i64> {
        self.heap().0.peek().map(|Reverse(h)| h.due_us)
    }

    /// Takes the delivery due first, if it is due by `now_us`.
    pub(crate) fn pop_due(&self, now_us: i64) -> Option<Held> {
        let mut heap = self.heap();
        match heap.0.peek() {
            Some(Reverse(h)) if h.due_us <= now_us => heap.0.pop().map(|Reverse(h)| h),
            _ => None,
        }
    }

    /// Takes every delivery held (at shutdown).
    pub(crate) fn take_all(&self) -> Vec<Held> {
        std::mem::take(&mut self.heap().0)
            .into_iter()
            .map(|Reverse(h)| h)
            .collect()
    }

    /// Returns the deliveries not kept alive for `every`, and counts them
    /// as kept alive now: the caller tells JetStream so.
    pub(crate) fn stale(&self, every: Duration) -> Vec<Arc<jetstream::Message>> {
        let now = Instant::now();
        self.heap()
            .0
            .iter()
            .filter(|Reverse(h)| now.duration_since(h.kept.get()) >= every)
            .map(|Reverse(h)| {
                h.kept.set(now);
                h.msg.clone()
            })
            .collect()
    }

    /// Waits until a delivery is added (or was, since the last wait).
    pub(crate) async fn added(&self) {
        self.added.notified().await;
    }
}
