//! The `kairos-server` binary: parse, log, handle signals, run.

use anyhow::Context as _;
use clap::Parser as _;
use kairos_server::{ServerConfig, run, shutdown, telemetry};
use tokio::net::TcpListener;

// glibc malloc showed up at ~10 % of CPU in a burst profile (malloc, free,
// unlink_chunk, malloc_consolidate); mimalloc is faster for many small,
// short-lived allocations and fragments less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ServerConfig::parse();
    telemetry::init();
    small_pages();
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("failed to bind {}", config.listen))?;
    let shutdown = shutdown::install_signal_handlers();
    run(config, listener, shutdown).await
}

/// Keeps this process off transparent huge pages, as
/// `kairos_worker::small_pages` does for workers (the reasons are there).
fn small_pages() {
    #[cfg(target_os = "linux")]
    if let Err(err) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(error = %err, "transparent huge pages stay on");
    }
}
