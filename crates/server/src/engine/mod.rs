//! Background loops of a replica.

pub mod dispatcher;
pub mod materializer;
