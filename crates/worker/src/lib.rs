//! kairos-worker: run Kairos tasks in your own process.
//!
//! Implement [`Handler`] for the work of one queue, build a [`Worker`] with the
//! server and NATS addresses, and run it until shutdown:
//!
//! ```no_run
//! use kairos_worker::{Handler, HandlerError, TaskContext, Worker};
//!
//! struct SendPush;
//!
//! impl Handler for SendPush {
//!     async fn handle(&self, task: TaskContext) -> Result<(), HandlerError> {
//!         println!("push {} (attempt {})", task.id(), task.attempt());
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> Result<(), kairos_worker::WorkerError> {
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! Worker::builder()
//!     .server("http://127.0.0.1:50051")
//!     .nats("nats://127.0.0.1:4222")
//!     .queue("push", SendPush)
//!     .concurrency(8)
//!     .build()?
//!     .run(shutdown)
//!     .await
//! # }
//! ```
//!
//! # Layout
//! - [`handler`]: the [`Handler`] trait, [`HandlerError`] and [`TaskContext`].
//! - [`runtime`]: [`Worker`] and its builder: pulling, acknowledging, retrying.
//! - `acker`: acknowledgements of settled deliveries, sent together.
//! - `hold`: tasks released ahead, held until their due time without a run slot.
//! - `reporter`: the long-lived `StatusService/Report` stream to the server.
//! - [`webhook`]: the built-in handler that POSTs tasks to an HTTP endpoint.
#![warn(missing_docs)]

mod acker;
pub mod handler;
mod hold;
mod reporter;
pub mod runtime;
pub mod webhook;

pub use handler::{
    BoxError, FnHandler, Handler, HandlerError, TaskContext, TerminalExt, handler_fn,
};
pub use runtime::{Worker, WorkerBuilder, WorkerError};
pub use webhook::WebhookHandler;

/// Keeps this process off transparent huge pages; call it early in `main`
/// of a worker process that uses mimalloc (as `kairos-worker` does).
///
/// mimalloc v3 advises huge pages for its arenas, and the kernel then
/// zeroes (and may compact for) a whole 2 MiB page at a first touch, in the
/// thread that touches it. In a burst that was about 6 % of the machine's
/// CPU, and the drain went about a sixth faster without (BENCHMARKS item
/// 48). The flag is the process's and holds for memory mapped before it is
/// set; elsewhere than on Linux this does nothing.
pub fn small_pages() {
    #[cfg(target_os = "linux")]
    if let Err(err) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(error = %err, "transparent huge pages stay on");
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn small_pages_turns_transparent_huge_pages_off_for_the_process() {
        super::small_pages();
        assert_eq!(
            rustix::thread::transparent_huge_pages_are_disabled().ok(),
            Some(true)
        );
    }
}
