//! What the dispatcher keeps of a message pulled from a bucket. A million of
//! these may wait in one replica, so every byte of them is chosen.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use async_nats::jetstream;
use kairos_proto::wire;

use crate::domain::TaskId;

/// A task message pulled from a bucket, kept in memory until due. Small on
/// purpose: the id as 16 bytes, the queue name and the ack subject's prefix
/// shared, and the body copied to its exact size so the NATS read buffer it
/// arrived in is freed.
#[derive(Debug)]
pub struct BucketMessage {
    /// Task id.
    pub task_id: TaskId,
    /// Queue to release it to.
    pub queue: Arc<str>,
    /// Due instant (ms since epoch).
    pub due_ms: i64,
    /// Start deadline (ms since epoch), 0 when none.
    pub expire_at_ms: i64,
    /// Bucket that holds its claim (from the subject).
    pub bucket_ms: i64,
    /// Stream sequence, to order ties; also a token of the ack subject.
    pub seq: u64,
    /// The encoded envelope, released as-is; `None` when pulled headers-only
    /// (a bucket far from due holds no bodies, see `DispatchSettings::body_prefetch`).
    /// A boxed slice: 16 bytes less than `Bytes`, per held task.
    pub body: Option<Box<[u8]>>,
    /// Where to acknowledge the bucket message once the release is durable.
    pub ack: AckSubject,
}

impl BucketMessage {
    /// The subject that acknowledges (or terminates) this message.
    pub fn ack_subject(&self) -> String {
        self.ack.rebuild(self.seq)
    }

    /// When the task was booked (its publish to the bucket stream, as the ack
    /// subject tells), ms since the epoch; `None` when the subject did not say.
    pub fn booked_ms(&self) -> Option<i64> {
        (self.ack.delivered != 0).then_some(self.ack.published_ns / 1_000_000)
    }
}

/// A bucket message's ack subject, `<prefix>.<delivered>.<stream seq>.<consumer
/// seq>.<published ns>.<pending>`, kept as its consumer's shared prefix and the
/// numbers after it (the stream sequence is `BucketMessage::seq`). The whole
/// subject would cost a held task about 100 bytes of heap more; that was a
/// third of the idle replica's memory.
#[derive(Debug)]
pub struct AckSubject {
    prefix: Arc<str>,
    /// Zero when `prefix` is the whole subject: it did not have the shape
    /// above, so it is kept as received (nats-server never delivers zero times).
    delivered: u32,
    consumer_seq: u64,
    published_ns: i64,
    pending: u64,
}

impl AckSubject {
    /// Splits `reply` into its shared prefix and numbers, with the stream
    /// sequence it carries; a subject that would not be rebuilt byte for byte
    /// is kept whole, with the sequence as nats-server reported it.
    fn parse(
        reply: &str,
        prefixes: &mut Interner,
        reported_seq: impl FnOnce() -> u64,
    ) -> (Self, u64) {
        if let Some(split) = Self::split(reply, prefixes) {
            return split;
        }
        let whole = Self {
            prefix: Arc::from(reply),
            delivered: 0,
            consumer_seq: 0,
            published_ns: 0,
            pending: 0,
        };
        (whole, reported_seq())
    }

    fn split(reply: &str, prefixes: &mut Interner) -> Option<(Self, u64)> {
        let mut tokens = reply.rsplitn(6, '.');
        let pending = tokens.next()?.parse().ok()?;
        let published_ns = tokens.next()?.parse().ok()?;
        let consumer_seq = tokens.next()?.parse().ok()?;
        let stream_seq = tokens.next()?.parse().ok()?;
        let delivered = tokens.next()?.parse().ok().filter(|&d| d > 0)?;
        let prefix = tokens.next()?;
        let ack = Self {
            prefix: prefixes.get(prefix),
            delivered,
            consumer_seq,
            published_ns,
            pending,
        };
        // "+1" or "01" parse, but would not come back the same.
        (ack.rebuild(stream_seq) == reply).then_some((ack, stream_seq))
    }

    fn rebuild(&self, stream_seq: u64) -> String {
        if self.delivered == 0 {
            return self.prefix.to_string();
        }
        let mut subject = String::with_capacity(self.prefix.len() + 64);
        let _ = write!(
            subject,
            "{}.{}.{}.{}.{}.{}",
            self.prefix,
            self.delivered,
            stream_seq,
            self.consumer_seq,
            self.published_ns,
            self.pending
        );
        subject
    }
}

/// Interns the strings a million held tasks share: queue names and ack-subject
/// prefixes (one per bucket consumer).
#[derive(Debug, Default)]
pub struct Interner(HashMap<Box<str>, Arc<str>>);

impl Interner {
    fn get(&mut self, text: &str) -> Arc<str> {
        if let Some(shared) = self.0.get(text) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = Arc::from(text);
        self.0.insert(Box::from(text), Arc::clone(&shared));
        shared
    }
}

/// Reads a bucket message's headers into what the dispatcher holds in memory.
/// A message that is not a Kairos task comes back as an error with its reply
/// subject, so the caller can terminate it rather than let it block the bucket.
pub fn decode_bucket_message(
    msg: jetstream::Message,
    shared: &mut Interner,
    headers_only: bool,
) -> Result<BucketMessage, (&'static str, Option<Box<str>>)> {
    // Asked only for a subject kept whole: the split reads the same number.
    let reported_seq = || msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    let msg = &msg.message;
    let Some(reply) = msg.reply.as_ref().map(|r| r.as_str()) else {
        return Err(("message without reply subject", None));
    };
    let Some(headers) = msg.headers.as_ref() else {
        return Err(("message without headers", Some(reply.into())));
    };
    let get = |name: &str| headers.get(name).map(|v| v.as_str());
    let task_id = get(wire::TASK_ID_HEADER).and_then(|v| v.parse::<TaskId>().ok());
    let due_ms = get(wire::DUE_HEADER).and_then(|v| v.parse().ok());
    let (Some(task_id), Some(queue), Some(due_ms)) = (task_id, get(wire::QUEUE_HEADER), due_ms)
    else {
        return Err((
            "missing or bad task id, queue or due header",
            Some(reply.into()),
        ));
    };
    let expire_at_ms = get(wire::EXPIRE_HEADER)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bucket_ms = msg
        .subject
        .as_str()
        .rsplit('.')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (ack, seq) = AckSubject::parse(reply, shared, reported_seq);
    Ok(BucketMessage {
        task_id,
        queue: shared.get(queue),
        due_ms,
        expire_at_ms,
        bucket_ms,
        seq,
        body: (!headers_only).then(|| Box::from(&msg.payload[..])),
        ack,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_subject_comes_back_byte_for_byte() {
        let mut shared = Interner::default();
        let reply =
            "$JS.ACK.KAIROS_TASKS.kairos-bucket-1764300000000.1.42.7.1764300001234567890.99";
        let (ack, seq) = AckSubject::parse(reply, &mut shared, || 0);
        assert_eq!(seq, 42);
        assert_eq!(ack.rebuild(seq), reply);
        // The prefix is shared with the next message of the same consumer.
        let next = "$JS.ACK.KAIROS_TASKS.kairos-bucket-1764300000000.2.43.8.1764300001234567891.98";
        let (other, seq) = AckSubject::parse(next, &mut shared, || 0);
        assert!(Arc::ptr_eq(&ack.prefix, &other.prefix));
        assert_eq!(other.rebuild(seq), next);
    }

    #[test]
    fn an_ack_subject_of_another_shape_is_kept_whole() {
        let mut shared = Interner::default();
        for reply in [
            // ADR-15's v2 shape with a trailing token that is not a number.
            "$JS.ACK.hub.ACCHASH.KAIROS_TASKS.c.1.42.7.1764300001234567890.99.x3Yz",
            // Numbers that parse but print differently.
            "$JS.ACK.KAIROS_TASKS.c.01.42.7.1764300001234567890.99",
            "$JS.ACK.KAIROS_TASKS.c.0.42.7.1764300001234567890.99",
            "_INBOX.short",
        ] {
            let (ack, seq) = AckSubject::parse(reply, &mut shared, || 42);
            assert_eq!(seq, 42, "{reply}");
            assert_eq!(ack.rebuild(seq), reply);
        }
    }
}
