//! What a handler implements, what it gets, and how it fails.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

/// Any error a handler may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The work of one queue. `handle` may be written as an `async fn`.
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt of a task.
    fn handle(&self, task: TaskContext) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Why an attempt failed: retry later, or never.
///
/// Any error converts into the retryable kind with `?`; code that knows an
/// error is permanent writes `.terminal()?`. Like `anyhow::Error`, this type
/// does not implement `std::error::Error`, which is what makes that blanket
/// conversion possible.
#[derive(Debug)]
pub enum HandlerError {
    /// Try again, after `retry_after` or the worker's backoff.
    Retryable {
        /// The cause.
        source: BoxError,
        /// Delay wanted before the next attempt, overriding the backoff.
        retry_after: Option<Duration>,
    },
    /// Never try again: the task becomes DEAD.
    Terminal {
        /// The cause.
        source: BoxError,
    },
}

impl HandlerError {
    /// Returns a retryable error.
    pub fn retryable(source: impl Into<BoxError>) -> Self {
        Self::Retryable {
            source: source.into(),
            retry_after: None,
        }
    }

    /// Returns a retryable error that asks for a given delay.
    pub fn retry_after(source: impl Into<BoxError>, delay: Duration) -> Self {
        Self::Retryable {
            source: source.into(),
            retry_after: Some(delay),
        }
    }

    /// Returns an error that is never retried.
    pub fn terminal(source: impl Into<BoxError>) -> Self {
        Self::Terminal {
            source: source.into(),
        }
    }

    /// Tells whether another attempt may follow.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }

    /// Returns the error text recorded in the run log.
    pub fn message(&self) -> String {
        match self {
            Self::Retryable { source, .. } | Self::Terminal { source } => source.to_string(),
        }
    }
}

impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(err: E) -> Self {
        Self::retryable(err)
    }
}

/// Marks the error of a `Result` as permanent.
pub trait TerminalExt<T> {
    /// Turns an error into [`HandlerError::Terminal`].
    fn terminal(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> TerminalExt<T> for Result<T, E> {
    fn terminal(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::terminal)
    }
}

/// One attempt of a task, as a handler sees it.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub(crate) id: String,
    pub(crate) queue: String,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) payload: Bytes,
    pub(crate) content_type: String,
    pub(crate) headers: HashMap<String, String>,
    pub(crate) due_at: DateTime<Utc>,
    pub(crate) worker_id: String,
    pub(crate) cancelled: CancellationToken,
    /// What the handler says about the attempt, for the run log.
    pub(crate) note: Arc<std::sync::Mutex<Option<String>>>,
}

impl TaskContext {
    /// Returns the task id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Returns the queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Returns the attempt number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Returns the attempts allowed in all.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Tells whether this is the last attempt allowed.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }

    /// Returns the payload bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Returns the payload's media type (may be empty).
    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    /// Returns the producer's headers.
    pub fn headers(&self) -> &HashMap<String, String> {
        &self.headers
    }

    /// Returns the instant the task was due.
    pub fn due_at(&self) -> DateTime<Utc> {
        self.due_at
    }

    /// Returns the identity of the worker running it.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Decodes a JSON payload; a payload that does not decode is a terminal error.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.payload).terminal()
    }

    /// Records a short note about this attempt in the run log (GetTask
    /// shows it as the attempt's `detail`), such as what a remote service
    /// answered; the last note wins, cut to 1,024 characters.
    pub fn note(&self, text: impl Into<String>) {
        let text: String = text.into().chars().take(1024).collect();
        *self
            .note
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(text);
    }

    /// Returns the note recorded so far, if any.
    pub fn noted(&self) -> Option<String> {
        self.note
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Returns a token cancelled when the worker shuts down.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancelled
    }

    /// Returns a context for calling a handler outside a worker, e.g. in unit tests.
    pub fn for_test(id: &str, queue: &str, attempt: u32, payload: impl Into<Bytes>) -> Self {
        Self {
            id: id.to_owned(),
            queue: queue.to_owned(),
            attempt,
            max_attempts: 3,
            payload: payload.into(),
            content_type: String::new(),
            headers: HashMap::new(),
            due_at: Utc::now(),
            worker_id: "test".into(),
            cancelled: CancellationToken::new(),
            note: Arc::default(),
        }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'static>>;

/// A handler with its type erased, so the runtime can spawn its futures.
pub(crate) trait ErasedHandler: Send + Sync + 'static {
    fn call(&self, task: TaskContext) -> BoxFuture;
}

pub(crate) struct Erased<H>(pub(crate) Arc<H>);

impl<H: Handler> ErasedHandler for Erased<H> {
    fn call(&self, task: TaskContext) -> BoxFuture {
        let handler = Arc::clone(&self.0);
        Box::pin(async move { handler.handle(task).await })
    }
}

/// A handler made from an async closure; see [`handler_fn`].
#[derive(Debug, Clone)]
pub struct FnHandler<F>(F);

/// Wraps an async closure `Fn(TaskContext) -> Future<Output = Result<(), HandlerError>>`
/// as a [`Handler`].
pub fn handler_fn<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    FnHandler(f)
}

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn handle(&self, task: TaskContext) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (self.0)(task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_mark_errors_are_retryable_and_terminal_ext_is_not() {
        fn parse(s: &str) -> Result<i32, HandlerError> {
            Ok(s.parse::<i32>()?)
        }
        fn parse_terminal(s: &str) -> Result<i32, HandlerError> {
            s.parse::<i32>().terminal()
        }
        assert!(parse("x").unwrap_err().is_retryable());
        assert!(!parse_terminal("x").unwrap_err().is_retryable());
    }

    #[tokio::test]
    async fn json_payload_that_does_not_decode_is_terminal() {
        let ctx = TaskContext::for_test("t", "q", 1, "not json");
        let err = ctx.json::<Vec<u8>>().unwrap_err();
        assert!(!err.is_retryable());
    }
}
