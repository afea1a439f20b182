//! The tonic edge: the only module that sees generated types and `Status`.

mod convert;
mod error;
mod queue;
mod scheduler;
mod status;

pub use queue::QueueApi;
pub use scheduler::{MAX_BATCH, SchedulerApi};
pub use status::StatusApi;
