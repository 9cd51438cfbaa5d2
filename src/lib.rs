//! cardvault: a self-hosted card-data vault.
//!
//! Layout (dependencies point downwards only):
//! - [`server`]: composition root, TLS listener, start-up wiring.
//! - [`api`]: HTTP routing, middleware, DTOs, error bodies.
//! - [`service`]: use cases (merchants, customers, cards, reveal), tenancy,
//!   audit records.
//! - [`crypto`]: keyring of data keys, envelope/HSM sealing, fingerprints.
//!   The only module that touches key bytes; the HSM itself is reached through
//!   the `cardvault-hsm` crate.
//! - [`processor`]: the `Processor` trait and its sandbox and HTTP
//!   implementations.
//! - [`storage`]: per-aggregate storage traits with SQLite and PostgreSQL
//!   implementations.
//! - [`domain`]: pure types (`Pan`, `Brand`, `Expiry`, ids); no IO.
//! - [`config`]: TOML + environment configuration, validated at start-up.
//! - [`report`]: the PCI DSS evidence report of `cardvault audit report`.

pub mod api;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod processor;
pub mod report;
pub mod server;
pub mod service;
pub mod storage;
#[doc(hidden)]
pub mod testkit;
