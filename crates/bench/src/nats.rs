//! The durable scenario's crash check: kill -9 of nats-server, a restart on
//! the same data, and a look for every acknowledged task in the stream.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use prost::Message as _;

/// Kills nats-server with SIGKILL (no chance to flush), starts it again with
/// the same config, rewrites the pid file, and waits until it serves JetStream.
pub(crate) async fn kill9_and_restart(
    conf: &Path,
    pid_file: &Path,
    url: &str,
) -> anyhow::Result<()> {
    let pid = std::fs::read_to_string(pid_file)
        .with_context(|| format!("cannot read {}", pid_file.display()))?
        .trim()
        .to_owned();
    let status = Command::new("kill").args(["-9", &pid]).status()?;
    anyhow::ensure!(status.success(), "kill -9 {pid} failed");
    // The port is free once the process is gone.
    let port = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .context("nats url has no port")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        anyhow::ensure!(Instant::now() < deadline, "nats-server did not die");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = conf.with_file_name("nats.log");
    let child = Command::new("nats-server")
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&log)?,
        )
        .spawn()
        .context("cannot start nats-server")?;
    std::fs::write(pid_file, child.id().to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = async_nats::connect(url).await {
            let js = async_nats::jetstream::new(client);
            if js
                .get_stream(kairos_proto::wire::TASKS_STREAM)
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "nats-server did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Returns how many of `ids` have no message in the tasks stream.
pub(crate) async fn missing_tasks(
    js: &async_nats::jetstream::Context,
    ids: &[String],
) -> anyhow::Result<usize> {
    let mut stream = js.get_stream(kairos_proto::wire::TASKS_STREAM).await?;
    let info = stream.info().await?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    // A work-queue stream admits no second consumer over the same subjects,
    // so read message by message, many at once.
    let found: std::collections::HashSet<String> = futures::stream::iter(first..=last)
        .map(|seq| {
            let stream = stream.clone();
            async move { stream.get_raw_message(seq).await.ok() }
        })
        .buffer_unordered(256)
        .filter_map(|msg| async move {
            let msg = msg?;
            // Booked with headers or, by default, only the envelope tells.
            match msg.headers.get(kairos_proto::wire::TASK_ID_HEADER) {
                Some(id) => Some(id.as_str().to_owned()),
                None => kairos_proto::v1::TaskEnvelope::decode(msg.payload)
                    .ok()
                    .map(|envelope| envelope.id),
            }
        })
        .collect()
        .await;
    Ok(ids.iter().filter(|id| !found.contains(*id)).count())
}
