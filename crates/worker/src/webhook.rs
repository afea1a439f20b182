//! The built-in `webhook` handler: POSTs each task's payload to an HTTP
//! endpoint, signed, so producers in any language can run tasks without a
//! Rust worker.
//!
//! | response | outcome |
//! |---|---|
//! | 2xx | succeeded |
//! | 429, 5xx, timeout, connection error | retried (`Retry-After` is honoured) |
//! | any other status (3xx, 4xx) | dead at once |
//!
//! Each request carries `Content-Type` (the task's, or
//! `application/octet-stream`), `Kairos-Task-Id`, `Kairos-Queue`,
//! `Kairos-Attempt`, `Kairos-Timestamp` (Unix seconds) and
//! `Kairos-Signature: v1=<hex>`, the HMAC-SHA256 with the shared secret of
//! `<timestamp>.<task id>.<attempt>.` followed by the body. A receiver
//! recomputes it, compares in constant time, and may refuse old timestamps.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::handler::{Handler, HandlerError, TaskContext};

/// Task header that names another URL for one task.
pub const URL_HEADER: &str = "webhook-url";
/// Header with the signature.
pub const SIGNATURE_HEADER: &str = "Kairos-Signature";
/// Longest part of a response body kept in an attempt's error.
const EXCERPT_BYTES: usize = 512;

/// Signs a webhook body as receivers verify it: hex HMAC-SHA256 of
/// `<timestamp>.<task id>.<attempt>.<body>` with the shared secret.
pub fn signature(
    secret: &[u8],
    timestamp: i64,
    task_id: &str,
    attempt: u32,
    body: &[u8],
) -> String {
    // Any key length is valid for HMAC, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{timestamp}.{task_id}.{attempt}.").as_bytes());
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Errors building a webhook handler.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The URL does not parse or is not http(s).
    #[error("bad webhook url `{0}`: must be an absolute http or https URL")]
    Url(String),
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Client(String),
}

/// POSTs each task to a URL; see the module docs for the contract.
#[derive(Debug, Clone)]
pub struct WebhookHandler {
    client: reqwest::Client,
    url: Option<reqwest::Url>,
    secret: Vec<u8>,
}

fn parse_url(url: &str) -> Result<reqwest::Url, WebhookError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| WebhookError::Url(url.to_owned()))?;
    if matches!(parsed.scheme(), "http" | "https") {
        Ok(parsed)
    } else {
        Err(WebhookError::Url(url.to_owned()))
    }
}

impl WebhookHandler {
    /// Creates the handler: `url` is the default endpoint (a task's
    /// `webhook-url` header overrides it), `secret` signs every request,
    /// `timeout` bounds each request.
    pub fn new(url: Option<&str>, secret: &[u8], timeout: Duration) -> Result<Self, WebhookError> {
        // One TLS stack in the process: rustls with ring, as NATS uses.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            // A redirect would resend a signed body elsewhere: report it instead.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("kairos-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        Ok(Self {
            client,
            url: url.map(parse_url).transpose()?,
            secret: secret.to_vec(),
        })
    }
}

/// Returns at most [`EXCERPT_BYTES`] of a body, as text.
fn excerpt(body: &[u8]) -> String {
    let cut = &body[..body.len().min(EXCERPT_BYTES)];
    let text = String::from_utf8_lossy(cut).replace(['\n', '\r'], " ");
    if body.len() > EXCERPT_BYTES {
        format!("{text}…")
    } else {
        text
    }
}

/// Reads `Retry-After` given in seconds.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(3600)))
}

impl Handler for WebhookHandler {
    async fn handle(&self, task: TaskContext) -> Result<(), HandlerError> {
        let url = match task.headers().get(URL_HEADER) {
            Some(url) => parse_url(url).map_err(HandlerError::terminal)?,
            None => self.url.clone().ok_or_else(|| {
                HandlerError::terminal(format!(
                    "no webhook url: start the worker with --webhook-url or set the `{URL_HEADER}` task header"
                ))
            })?,
        };
        let timestamp = chrono::Utc::now().timestamp();
        let body = task.payload().clone();
        let signature = signature(&self.secret, timestamp, task.id(), task.attempt(), &body);
        let content_type = if task.content_type().is_empty() {
            "application/octet-stream"
        } else {
            task.content_type()
        };
        let sent = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header("Kairos-Task-Id", task.id())
            .header("Kairos-Queue", task.queue())
            .header("Kairos-Attempt", task.attempt().to_string())
            .header("Kairos-Timestamp", timestamp.to_string())
            .header(SIGNATURE_HEADER, format!("v1={signature}"))
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(err) if err.is_timeout() => {
                return Err(HandlerError::retryable(format!("webhook timed out: {err}")));
            }
            Err(err) => {
                return Err(HandlerError::retryable(format!(
                    "webhook unreachable: {err}"
                )));
            }
        };
        let status = response.status();
        let wait = retry_after(response.headers());
        let body = response.bytes().await.unwrap_or_default();
        let message = format!(
            "webhook answered HTTP {}: {}",
            status.as_u16(),
            excerpt(&body)
        );
        // The run log keeps what the receiver answered, success or not.
        task.note(message.clone());
        if status.is_success() {
            return Ok(());
        }
        if status.as_u16() == 429 || status.is_server_error() {
            Err(match wait {
                Some(delay) => HandlerError::retry_after(message, delay),
                None => HandlerError::retryable(message),
            })
        } else {
            Err(HandlerError::terminal(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_id_attempt_and_body() {
        // Known answer, computed independently:
        // printf '1700000000.t-1.2.hello' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            signature(b"secret", 1_700_000_000, "t-1", 2, b"hello"),
            "2c2965836ecd40ed7d52531c50595b728dbdbd1712dc71b404f45d5495c91390"
        );
    }

    #[test]
    fn excerpts_are_bounded() {
        assert_eq!(excerpt(b"short\nbody"), "short body");
        let long = vec![b'x'; 2000];
        assert_eq!(excerpt(&long).chars().count(), EXCERPT_BYTES + 1);
    }

    #[test]
    fn only_http_urls_are_taken() {
        assert!(parse_url("https://example.com/hook").is_ok());
        assert!(parse_url("ftp://example.com").is_err());
        assert!(parse_url("not a url").is_err());
    }
}
