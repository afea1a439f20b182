//! The tonic edge: the only module that sees generated types and `Status`.

mod convert;
mod error;
mod scheduler;
mod status;

pub use scheduler::{MAX_BATCH, SchedulerApi};
pub use status::StatusApi;
