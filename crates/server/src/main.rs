//! The `kairos-server` binary: parse, log, handle signals, run.

use anyhow::Context as _;
use clap::Parser as _;
use kairos_server::{ServerConfig, run, shutdown, telemetry};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ServerConfig::parse();
    telemetry::init();
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("failed to bind {}", config.listen))?;
    let shutdown = shutdown::install_signal_handlers();
    run(config, listener, shutdown).await
}
