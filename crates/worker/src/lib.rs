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
//! - `hold`: tasks released ahead, held until their due time without a run slot.
//! - `reporter`: the long-lived `StatusService/Report` stream to the server.
//! - [`webhook`]: the built-in handler that POSTs tasks to an HTTP endpoint.
#![warn(missing_docs)]

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
