//! Worker processes, as they are deployed: three `kairos-worker` binaries
//! with the webhook handler share a queue's global concurrency, and one
//! killed with SIGKILL mid-task leaves its task to another after the run timeout.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kairos_client::{NewTask, QueueChange, TaskState};
use kairos_tests::http::Receiver;
use kairos_tests::stack::{client, wait_all_succeeded, wait_for_state};
use kairos_tests::{Backend, ServerHandle, Stack, backend_tests};
use tokio::process::{Child, Command};

/// The `kairos-worker` binary `scripts/test.sh` builds.
fn worker_binary() -> PathBuf {
    kairos_tests::program(
        "KAIROS_WORKER_BIN",
        "target/debug/kairos-worker",
        "cargo build -p kairos-worker",
    )
}

/// Starts a webhook worker process for `queue` posting to `url`.
fn webhook_worker(stack: &Stack, server: &ServerHandle, queue: &str, url: &str) -> Child {
    Command::new(worker_binary())
        .args(["--server", &server.url, "--nats-url", &stack.nats.url()])
        .args([
            "--queue",
            queue,
            "--handler",
            "webhook",
            "--concurrency",
            "8",
        ])
        .args(["--webhook-url", url, "--webhook-timeout", "120s"])
        .env("KAIROS_WEBHOOK_SECRET", "s3cret")
        .env("KAIROS_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start kairos-worker")
}

/// Three worker processes with 8 slots each on a queue with max_concurrency
/// 2: twenty one-second charges never overlap more than 2 at the gateway and
/// take about 10 s. Then a worker killed with SIGKILL mid-charge: the charge
/// is delivered again after the 2 s run timeout and completes elsewhere.
async fn worker_processes_share_the_limit_and_survive_sigkill(backend: Backend) {
    let stack = Stack::start(backend).await;
    let server = stack.server().await;
    let mut client = client(&server).await;
    client
        .create_queue(
            "billing",
            QueueChange::new()
                .max_concurrency(2)
                .run_timeout(Duration::from_secs(2)),
        )
        .await
        .expect("queue");
    let gateway = Receiver::start(|path, earlier| match (path, earlier) {
        ("/hang", 0) => ("200 OK", "too late", Duration::from_secs(60)),
        ("/hang", _) => ("200 OK", "charged", Duration::ZERO),
        _ => ("200 OK", "charged", Duration::from_secs(1)),
    })
    .await;
    let charge_url = format!("{}/charge", gateway.url);
    let mut workers: Vec<Child> = (0..3)
        .map(|_| webhook_worker(&stack, &server, "billing", &charge_url))
        .collect();

    let started = Instant::now();
    let batch = (0..20)
        .map(|i| NewTask::new("billing").payload(format!("renewal {i}")))
        .collect();
    let ids: Vec<String> = client
        .schedule_batch(batch)
        .await
        .expect("book")
        .into_iter()
        .map(|r| r.expect("booked").id)
        .collect();
    wait_all_succeeded(&mut client, &ids, Duration::from_secs(60)).await;
    let took = started.elapsed();
    assert_eq!(gateway.requests().len(), 20, "each charged once");
    assert_eq!(
        gateway.peak(),
        2,
        "never more than 2 at the gateway, and both used"
    );
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "20 one-second charges two at a time took {took:?}"
    );

    // One worker left; it takes a charge that hangs, and dies.
    for worker in workers.iter_mut().skip(1) {
        worker.kill().await.expect("stop worker");
    }
    let stuck = client
        .schedule(
            NewTask::new("billing")
                .payload("renewal hang")
                .header("webhook-url", format!("{}/hang", gateway.url)),
        )
        .await
        .expect("book");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gateway.requests().iter().any(|r| r.path == "/hang") {
        assert!(
            Instant::now() < deadline,
            "the hanging charge never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    workers[0].start_kill().expect("SIGKILL");
    workers[0].wait().await.expect("reaped");
    let killed_at = Instant::now();
    let _replacement = webhook_worker(&stack, &server, "billing", &charge_url);
    let done = wait_for_state(
        &mut client,
        &stuck.id,
        TaskState::Succeeded,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done.attempts, 2, "delivered again once, after the kill");
    assert!(
        killed_at.elapsed() >= Duration::from_millis(1000),
        "not before the run timeout"
    );
    let hangs = gateway
        .requests()
        .iter()
        .filter(|r| r.path == "/hang")
        .count();
    assert_eq!(hangs, 2);
}

backend_tests!(worker_processes_share_the_limit_and_survive_sigkill);
