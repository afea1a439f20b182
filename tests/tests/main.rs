//! Kairos's integration tests, one module per area, in one binary so the
//! workspace links it once.

mod claims;
mod cli;
mod faults;
mod one_off;
mod polyglot;
mod processes;
mod queues;
mod recurring;
mod schedules;
mod store;
mod subscribe;
mod webhook;
