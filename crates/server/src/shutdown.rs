//! SIGINT/SIGTERM become a cancellation token; a second signal exits at once.

use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Returns a token cancelled on the first SIGINT or SIGTERM.
pub fn install_signal_handlers() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        warn!("shutdown requested; a second signal exits at once");
        cancel.cancel();
        wait_for_signal().await;
        std::process::exit(1);
    });
    token
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
