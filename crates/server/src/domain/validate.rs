//! Validation of a schedule request against the server's limits. Runs before
//! anything is stored; every error names the field.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use kairos_proto::wire;

use super::task::{Backoff, NewTask, TaskId, ceil_ms, content_hash};

/// Limits a request is checked against (from the server config).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest payload in bytes.
    pub max_payload_bytes: usize,
    /// Furthest due time from now.
    pub max_horizon: Duration,
    /// Attempts when the request does not say.
    pub default_max_attempts: u32,
    /// Most attempts a request may ask for.
    pub max_attempts_limit: u32,
}

/// A schedule request as the producer sent it, before validation.
#[derive(Debug, Clone, Default)]
pub struct ScheduleSpec {
    /// Queue name.
    pub queue: String,
    /// Payload.
    pub payload: Bytes,
    /// Media type.
    pub content_type: String,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// Absolute due time, if given.
    pub run_at: Option<DateTime<Utc>>,
    /// Relative due time in ms (may be negative: rejected), if given.
    pub delay_ms: Option<i64>,
    /// Idempotency key, if given.
    pub idempotency_key: Option<String>,
    /// Start deadline after the due time in ms, if given.
    pub expire_after_ms: Option<i64>,
    /// Attempts, if given.
    pub max_attempts: Option<u32>,
    /// Own retry delays, if given.
    pub backoff: Option<Backoff>,
}

/// Whether a request is malformed or merely too large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidationKind {
    /// Malformed: INVALID_ARGUMENT.
    Invalid,
    /// Over a size limit: RESOURCE_EXHAUSTED.
    TooLarge,
}

/// Why a request was rejected, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// The offending field.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
    /// Which status it maps to.
    pub kind: ValidationKind,
}

impl ValidationError {
    /// Returns an INVALID_ARGUMENT error for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
            kind: ValidationKind::Invalid,
        }
    }

    fn too_large(field: &str, reason: String) -> Self {
        Self {
            field: field.to_owned(),
            reason,
            kind: ValidationKind::TooLarge,
        }
    }
}

const MAX_HEADERS: usize = 64;
const MAX_HEADER_NAME: usize = 128;
const MAX_HEADER_VALUE: usize = 4096;
const MAX_KEY_LEN: usize = 256;
const MAX_CONTENT_TYPE: usize = 256;

/// Checks a request and turns it into a task due at an absolute instant.
pub fn validate(
    spec: ScheduleSpec,
    now: DateTime<Utc>,
    limits: &Limits,
) -> Result<NewTask, ValidationError> {
    if spec.queue.is_empty() {
        return Err(ValidationError::invalid("queue", "must not be empty"));
    }
    if !wire::is_valid_queue(&spec.queue) {
        return Err(ValidationError::invalid(
            "queue",
            format!(
                "must be 1 to {} characters of A-Z, a-z, 0-9, '_' and '-'",
                wire::MAX_QUEUE_LEN
            ),
        ));
    }
    if spec.payload.len() > limits.max_payload_bytes {
        return Err(ValidationError::too_large(
            "payload",
            format!(
                "is {} bytes, over the limit of {} bytes",
                spec.payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    if spec.content_type.len() > MAX_CONTENT_TYPE || spec.content_type.chars().any(char::is_control)
    {
        return Err(ValidationError::invalid(
            "content_type",
            format!("must be at most {MAX_CONTENT_TYPE} printable characters"),
        ));
    }
    validate_headers(&spec.headers)?;
    let due_at = match (spec.run_at, spec.delay_ms) {
        (None, None) => {
            return Err(ValidationError::invalid(
                "run_at",
                "one of run_at and delay is required",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(ValidationError::invalid(
                "delay",
                "only one of run_at and delay may be set",
            ));
        }
        (Some(at), None) => at,
        (None, Some(ms)) if ms < 0 => {
            return Err(ValidationError::invalid("delay", "must not be negative"));
        }
        (None, Some(ms)) => now + chrono::Duration::milliseconds(ms),
    };
    let due_at = ceil_ms(due_at);
    let horizon = chrono::Duration::from_std(limits.max_horizon).unwrap_or(chrono::Duration::MAX);
    if due_at > now + horizon {
        let field = if spec.run_at.is_some() {
            "run_at"
        } else {
            "delay"
        };
        return Err(ValidationError::invalid(
            field,
            format!(
                "is more than {} ahead",
                humantime::format_duration(limits.max_horizon)
            ),
        ));
    }
    let expire_at = match spec.expire_after_ms {
        None => None,
        Some(ms) if ms <= 0 => {
            return Err(ValidationError::invalid(
                "expire_after",
                "must be positive when set",
            ));
        }
        Some(ms) => Some(due_at + chrono::Duration::milliseconds(ms)),
    };
    let max_attempts = match spec.max_attempts {
        None => limits.default_max_attempts,
        Some(0) => {
            return Err(ValidationError::invalid(
                "max_attempts",
                "must be at least 1",
            ));
        }
        Some(n) if n > limits.max_attempts_limit => {
            return Err(ValidationError::invalid(
                "max_attempts",
                format!("must be at most {}", limits.max_attempts_limit),
            ));
        }
        Some(n) => n,
    };
    if let Some(key) = &spec.idempotency_key
        && (key.is_empty() || key.len() > MAX_KEY_LEN || key.chars().any(char::is_control))
    {
        return Err(ValidationError::invalid(
            "idempotency_key",
            format!("must be 1 to {MAX_KEY_LEN} printable characters"),
        ));
    }
    if let Some(backoff) = &spec.backoff {
        validate_backoff(backoff)?;
    }
    let content_hash = if spec.idempotency_key.is_some() {
        fingerprint(&spec)
    } else {
        String::new()
    };
    Ok(NewTask {
        id: TaskId::new(),
        queue: spec.queue,
        payload: spec.payload,
        content_type: spec.content_type,
        headers: spec.headers,
        due_at,
        expire_at,
        max_attempts,
        idempotency_key: spec.idempotency_key,
        content_hash,
        created_at: now,
        occurrence: None,
        backoff: spec.backoff,
    })
}

/// The fingerprint a repeated idempotency key is checked against.
fn fingerprint(spec: &ScheduleSpec) -> String {
    let mut when = match (spec.run_at, spec.delay_ms) {
        (Some(at), _) => format!("at:{}", at.timestamp_millis()),
        (_, Some(ms)) => format!("in:{ms}"),
        _ => String::new(),
    };
    // Only when set, so the fingerprints of tasks without one stay as they were.
    if let Some(backoff) = &spec.backoff {
        when.push('|');
        when.push_str(&backoff.fingerprint());
    }
    content_hash(
        &spec.queue,
        &spec.payload,
        &spec.content_type,
        &spec.headers,
        &when,
        spec.expire_after_ms,
        spec.max_attempts,
    )
}

/// Checks a task's own retry delays, as a queue's are checked.
fn validate_backoff(b: &Backoff) -> Result<(), ValidationError> {
    if b.initial_ms.is_some_and(|ms| ms < 0) {
        return Err(ValidationError::invalid(
            "backoff.initial",
            "must not be negative",
        ));
    }
    if let (Some(initial), Some(max)) = (b.initial_ms, b.max_ms)
        && max < initial
    {
        return Err(ValidationError::invalid(
            "backoff.max",
            "must not be below initial",
        ));
    }
    if b.max_ms.is_some_and(|ms| ms < 0) {
        return Err(ValidationError::invalid(
            "backoff.max",
            "must not be negative",
        ));
    }
    if b.multiplier.is_some_and(|m| !(1.0..=10.0).contains(&m)) {
        return Err(ValidationError::invalid(
            "backoff.multiplier",
            "must be 1 to 10",
        ));
    }
    if b.jitter.is_some_and(|j| !(0.0..=1.0).contains(&j)) {
        return Err(ValidationError::invalid("backoff.jitter", "must be 0 to 1"));
    }
    Ok(())
}

fn validate_headers(headers: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if headers.len() > MAX_HEADERS {
        return Err(ValidationError::invalid(
            "headers",
            format!("at most {MAX_HEADERS} headers are allowed"),
        ));
    }
    for (name, value) in headers {
        let name_ok = !name.is_empty()
            && name.len() <= MAX_HEADER_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            return Err(ValidationError::invalid(
                format!("headers[{name}]"),
                format!(
                    "header names must be 1 to {MAX_HEADER_NAME} of A-Z, a-z, 0-9, '-', '_' and '.'"
                ),
            ));
        }
        if value.len() > MAX_HEADER_VALUE || value.chars().any(char::is_control) {
            return Err(ValidationError::invalid(
                format!("headers[{name}]"),
                format!(
                    "header values must be at most {MAX_HEADER_VALUE} bytes with no control characters"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_payload_bytes: 16,
            max_horizon: Duration::from_secs(3600),
            default_max_attempts: 3,
            max_attempts_limit: 100,
        }
    }

    fn spec() -> ScheduleSpec {
        ScheduleSpec {
            queue: "default".into(),
            delay_ms: Some(1000),
            ..ScheduleSpec::default()
        }
    }

    fn field_of(spec: ScheduleSpec) -> String {
        validate(spec, Utc::now(), &limits()).unwrap_err().field
    }

    #[test]
    fn accepts_a_minimal_request() {
        let now = Utc::now();
        let task = validate(spec(), now, &limits()).unwrap();
        assert_eq!(task.due_at, ceil_ms(now + chrono::Duration::seconds(1)));
        assert_eq!(task.max_attempts, 3);
    }

    #[test]
    fn rejects_each_bad_field_by_name() {
        assert_eq!(
            field_of(ScheduleSpec {
                queue: "".into(),
                ..spec()
            }),
            "queue"
        );
        assert_eq!(
            field_of(ScheduleSpec {
                queue: "a.b".into(),
                ..spec()
            }),
            "queue"
        );
        assert_eq!(
            field_of(ScheduleSpec {
                delay_ms: None,
                ..spec()
            }),
            "run_at"
        );
        assert_eq!(
            field_of(ScheduleSpec {
                run_at: Some(Utc::now()),
                ..spec()
            }),
            "delay"
        );
        assert_eq!(
            field_of(ScheduleSpec {
                delay_ms: Some(-1),
                ..spec()
            }),
            "delay"
        );
        assert_eq!(
            field_of(ScheduleSpec {
                delay_ms: Some(3_600_001),
                ..spec()
            }),
            "delay"
        );
        assert_eq!(
            field_of(ScheduleSpec {
                max_attempts: Some(0),
                ..spec()
            }),
            "max_attempts"
        );
        assert_eq!(
            field_of(ScheduleSpec {
                max_attempts: Some(101),
                ..spec()
            }),
            "max_attempts"
        );
        let mut headers = BTreeMap::new();
        headers.insert("bad name".into(), "v".into());
        assert_eq!(
            field_of(ScheduleSpec { headers, ..spec() }),
            "headers[bad name]"
        );
    }

    #[test]
    fn oversized_payload_is_resource_exhausted() {
        let err = validate(
            ScheduleSpec {
                payload: Bytes::from(vec![0; 17]),
                ..spec()
            },
            Utc::now(),
            &limits(),
        )
        .unwrap_err();
        assert_eq!(err.kind, ValidationKind::TooLarge);
        assert_eq!(err.field, "payload");
    }
}
