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
    /// The encoded envelope, released as-is; `None` while its bucket is held
    /// without bodies (far from due, see [`Pull`]).
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

/// How a bucket's consumer is pulled, and what the dispatcher keeps of each
/// message. Far from due a bucket's tasks wait without their payloads (see
/// `DispatchSettings::body_prefetch`); near it they are held whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pull {
    /// Headers only: no payload travels or stays. Reads tasks booked with
    /// headers (`KAIROS_BOOKING_HEADERS`); one booked without them makes
    /// the owner pull the bucket [`Pull::Lean`].
    Headers,
    /// Whole messages, each body dropped once read: a far bucket whose tasks
    /// were booked without headers, so the envelope is what tells them.
    Lean,
    /// Whole messages, kept until released.
    Whole,
}

impl Pull {
    /// Whether the bucket's consumer delivers headers only.
    pub fn headers_only(self) -> bool {
        self == Pull::Headers
    }

    /// Whether the held tasks keep their bodies, ready to release.
    pub fn keeps_bodies(self) -> bool {
        self == Pull::Whole
    }
}

/// Why a bucket message was not read into a [`BucketMessage`].
#[derive(Debug, PartialEq, Eq)]
pub enum Unread {
    /// Not a Kairos task: terminated, when it has a reply subject, rather
    /// than left to block the bucket.
    Malformed(&'static str, Option<Box<str>>),
    /// Booked without headers and delivered headers-only: only its body
    /// tells the task, so the bucket must be pulled with bodies.
    NeedsBody,
}

/// Reads a bucket message into what the dispatcher holds in memory: from its
/// headers where it was booked with them, else from its envelope.
pub fn decode_bucket_message(
    msg: jetstream::Message,
    shared: &mut Interner,
    pull: Pull,
) -> Result<BucketMessage, Unread> {
    // Asked only for a subject kept whole: the split reads the same number.
    let reported_seq = || msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    let msg = &msg.message;
    let Some(reply) = msg.reply.as_ref().map(|r| r.as_str()) else {
        return Err(Unread::Malformed("message without reply subject", None));
    };
    let malformed = |reason| Unread::Malformed(reason, Some(reply.into()));
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str())
    };
    let (task_id, queue, due_ms, expire_at_ms) = match header(wire::TASK_ID_HEADER) {
        Some(id) => {
            let task_id = id.parse::<TaskId>().ok();
            let due_ms = header(wire::DUE_HEADER).and_then(|v| v.parse().ok());
            let (Some(task_id), Some(queue), Some(due_ms)) =
                (task_id, header(wire::QUEUE_HEADER), due_ms)
            else {
                return Err(malformed("missing or bad task id, queue or due header"));
            };
            let expire_at_ms = header(wire::EXPIRE_HEADER)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            (task_id, queue, due_ms, expire_at_ms)
        }
        None if pull.headers_only() => return Err(Unread::NeedsBody),
        None => {
            let fields = EnvelopeFields::read(&msg.payload)
                .ok_or_else(|| malformed("neither task headers nor a task envelope"))?;
            let task_id = fields
                .id
                .parse::<TaskId>()
                .map_err(|_| malformed("bad task id in the envelope"))?;
            (task_id, fields.queue, fields.due_ms, fields.expire_at_ms)
        }
    };
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
        body: pull.keeps_bodies().then(|| Box::from(&msg.payload[..])),
        ack,
    })
}

/// The fields of an encoded `TaskEnvelope` the dispatcher holds, read in
/// place: decoding the whole envelope would copy its payload and headers
/// only to drop them.
#[derive(Debug, PartialEq, Eq)]
struct EnvelopeFields<'a> {
    id: &'a str,
    queue: &'a str,
    due_ms: i64,
    expire_at_ms: i64,
}

impl<'a> EnvelopeFields<'a> {
    // Field numbers of kairos.v1.TaskEnvelope.
    const ID: u64 = 1;
    const QUEUE: u64 = 2;
    const DUE_AT_MS: u64 = 6;
    const EXPIRE_AT_MS: u64 = 7;

    /// Reads the fields; `None` when the bytes are not such an envelope or
    /// lack its id, queue or due time.
    fn read(mut buf: &'a [u8]) -> Option<Self> {
        let (mut id, mut queue, mut due_ms, mut expire_at_ms) = (None, None, None, 0);
        while !buf.is_empty() {
            let key = read_varint(&mut buf)?;
            match key & 7 {
                0 => {
                    // int64 goes as its two's complement bits.
                    let value = read_varint(&mut buf)? as i64;
                    match key >> 3 {
                        Self::DUE_AT_MS => due_ms = Some(value),
                        Self::EXPIRE_AT_MS => expire_at_ms = value,
                        _ => {}
                    }
                }
                1 => buf = buf.get(8..)?,
                2 => {
                    let len = usize::try_from(read_varint(&mut buf)?).ok()?;
                    let (bytes, rest) = buf.split_at_checked(len)?;
                    buf = rest;
                    match key >> 3 {
                        Self::ID => id = Some(std::str::from_utf8(bytes).ok()?),
                        Self::QUEUE => queue = Some(std::str::from_utf8(bytes).ok()?),
                        _ => {}
                    }
                }
                5 => buf = buf.get(4..)?,
                _ => return None,
            }
        }
        Some(Self {
            id: id.filter(|id| !id.is_empty())?,
            queue: queue.filter(|queue| !queue.is_empty())?,
            due_ms: due_ms?,
            expire_at_ms,
        })
    }
}

/// Reads one protobuf varint off the front of `buf`.
fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
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
    fn an_envelope_tells_its_task_without_copying_the_rest() {
        use kairos_proto::v1 as pb;
        use prost::Message as _;
        let mut envelope = pb::TaskEnvelope {
            id: "0190f3a2-7b1c-7d4e-9f00-123456789abc".into(),
            queue: "emails".into(),
            payload: vec![0xff; 300].into(),
            content_type: "application/json".into(),
            headers: [("k".to_owned(), "v".to_owned())].into_iter().collect(),
            due_at_ms: 1_764_300_000_123,
            expire_at_ms: 1_764_300_060_000,
            max_attempts: 3,
            bucket_ms: 1_764_300_000_000,
            attempt_offset: 2,
            backoff: Some(pb::Backoff {
                initial: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                max: None,
                multiplier: Some(2.0),
                jitter: Some(0.25),
            }),
        };
        let bytes = envelope.encode_to_vec();
        assert_eq!(
            EnvelopeFields::read(&bytes),
            Some(EnvelopeFields {
                id: "0190f3a2-7b1c-7d4e-9f00-123456789abc",
                queue: "emails",
                due_ms: 1_764_300_000_123,
                expire_at_ms: 1_764_300_060_000,
            })
        );
        // Cut anywhere, it is read as this task or not at all.
        for len in 0..bytes.len() {
            if let Some(cut) = EnvelopeFields::read(&bytes[..len]) {
                assert_eq!(
                    (cut.id, cut.queue, cut.due_ms),
                    (envelope.id.as_str(), "emails", envelope.due_at_ms),
                    "cut at {len}"
                );
            }
        }
        // No due time, no task; a negative one reads back as such.
        envelope.due_at_ms = 0;
        assert_eq!(EnvelopeFields::read(&envelope.encode_to_vec()), None);
        envelope.due_at_ms = -5;
        envelope.expire_at_ms = 0;
        let fields = envelope.encode_to_vec();
        let fields = EnvelopeFields::read(&fields).expect("read");
        assert_eq!((fields.due_ms, fields.expire_at_ms), (-5, 0));
        assert_eq!(EnvelopeFields::read(b"\xff\xff not protobuf"), None);
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
