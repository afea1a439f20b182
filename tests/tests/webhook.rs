//! The webhook handler against a local HTTP server: signed requests, 5xx and
//! timeouts retried, other 4xx dead at once.

use std::time::Duration;

use kairos_client::{NewTask, QueueChange, TaskState};
use kairos_tests::http::Receiver;
use kairos_tests::stack::{client, wait_for_state};
use kairos_tests::{Backend, Stack, backend_tests};
use kairos_worker::WebhookHandler;
use kairos_worker::webhook::{SIGNATURE_HEADER, URL_HEADER, signature};

const SECRET: &[u8] = b"s3cret";

/// The receiver: `/ok` answers 200; `/flaky` 503 the first time, then 200;
/// `/gone` 404; `/slow` stalls past the client's timeout the first time, then 200.
async fn receiver() -> Receiver {
    Receiver::start(|path, earlier| match (path, earlier) {
        ("/flaky", 0) => (
            "503 Service Unavailable",
            "gateway warming up",
            Duration::ZERO,
        ),
        ("/gone", _) => ("404 Not Found", "no such hook", Duration::ZERO),
        ("/slow", 0) => ("200 OK", "late", Duration::from_secs(5)),
        _ => ("200 OK", "ok", Duration::ZERO),
    })
    .await
}

/// Signed requests; 503 retried then 200; 404 dead at once; a timeout retried.
async fn webhook_signs_retries_and_gives_up_as_http_says(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    client
        .create_queue(
            "hooks",
            QueueChange::new().max_attempts(3).backoff(
                Duration::from_millis(200),
                Duration::from_secs(1),
                2.0,
                0.0,
            ),
        )
        .await
        .expect("queue");
    let receiver = receiver().await;
    let base = receiver.url.clone();
    let handler = WebhookHandler::new(Some(&format!("{base}/ok")), SECRET, Duration::from_secs(1))
        .expect("handler");
    let _worker = stack.worker(&server, "hooks", 4, handler);

    let book = |path: Option<&str>, payload: &str| {
        let mut task = NewTask::new("hooks")
            .payload(payload.to_owned())
            .content_type("application/json");
        if let Some(path) = path {
            task = task.header(URL_HEADER, format!("{base}{path}"));
        }
        task
    };
    let ok = client.schedule(book(None, r#"{"n":1}"#)).await.expect("ok");
    let flaky = client
        .schedule(book(Some("/flaky"), r#"{"n":2}"#))
        .await
        .expect("flaky");
    let gone = client
        .schedule(book(Some("/gone"), r#"{"n":3}"#))
        .await
        .expect("gone");
    let slow = client
        .schedule(book(Some("/slow"), r#"{"n":4}"#))
        .await
        .expect("slow");

    let wait = Duration::from_secs(30);
    let ok_done = wait_for_state(&mut client, &ok.id, TaskState::Succeeded, wait).await;
    assert_eq!(ok_done.attempts, 1);
    let flaky_done = wait_for_state(&mut client, &flaky.id, TaskState::Succeeded, wait).await;
    assert_eq!(flaky_done.attempts, 2, "503 retried, then 200");
    let gone_done = wait_for_state(&mut client, &gone.id, TaskState::Dead, wait).await;
    assert_eq!(gone_done.attempts, 1, "404 is dead at once");
    let slow_done = wait_for_state(&mut client, &slow.id, TaskState::Succeeded, wait).await;
    assert_eq!(slow_done.attempts, 2, "a timeout is retried");

    let (_, attempts) = client.get_task(&flaky.id).await.expect("get");
    let first = attempts[0].error.clone().unwrap_or_default();
    assert!(
        first.contains("HTTP 503") && first.contains("gateway warming up"),
        "{first}"
    );
    let (_, attempts) = client.get_task(&gone.id).await.expect("get");
    let error = attempts[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("HTTP 404") && error.contains("no such hook"),
        "{error}"
    );
    let (_, attempts) = client.get_task(&slow.id).await.expect("get");
    let error = attempts[0].error.clone().unwrap_or_default();
    assert!(error.contains("timed out"), "{error}");

    // Every request verifies with the shared secret, and none with another.
    let seen = receiver.requests();
    assert_eq!(seen.len(), 1 + 2 + 1 + 2);
    for request in &seen {
        let header = |name: &str| request.headers.get(name).cloned().unwrap_or_default();
        let timestamp: i64 = header("kairos-timestamp").parse().expect("timestamp");
        let attempt: u32 = header("kairos-attempt").parse().expect("attempt");
        let task_id = header("kairos-task-id");
        let expected = format!(
            "v1={}",
            signature(SECRET, timestamp, &task_id, attempt, &request.body)
        );
        assert_eq!(header(&SIGNATURE_HEADER.to_ascii_lowercase()), expected);
        let forged = format!(
            "v1={}",
            signature(b"wrong", timestamp, &task_id, attempt, &request.body)
        );
        assert_ne!(header(&SIGNATURE_HEADER.to_ascii_lowercase()), forged);
        assert_eq!(header("content-type"), "application/json");
        assert_eq!(header("kairos-queue"), "hooks");
    }
    let (_, attempts) = client.get_task(&ok.id).await.expect("get");
    assert_eq!(
        attempts[0].detail.as_deref(),
        Some("webhook answered HTTP 200: ok"),
        "the answer is in the run log"
    );
    let ok_request = seen.iter().find(|r| r.path == "/ok").expect("ok request");
    assert_eq!(ok_request.body, br#"{"n":1}"#);
    assert_eq!(ok_request.headers["kairos-task-id"], ok.id);
}

backend_tests!(webhook_signs_retries_and_gives_up_as_http_says);
