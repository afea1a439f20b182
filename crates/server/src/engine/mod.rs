//! Background loops of a replica.

pub mod backlog;
pub mod dispatcher;
pub mod materializer;
