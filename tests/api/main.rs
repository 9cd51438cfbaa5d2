//! Black-box API tests over real TLS: one test binary, each test with its
//! own server, database and SoftHSM token, on SQLite and PostgreSQL and in
//! both crypto modes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod support;

mod audit;
mod charges;
mod cli;
mod endpoints;
mod hosted;
mod http_processor;
mod isolation;
mod leaks;
mod payment_leaks;
mod process;
mod report;
mod rotation;
mod validation;
mod webhooks;
