//! All integration tests of this crate in one binary (one link instead of one per file).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod api;
mod chain;
mod common;
mod domain;
mod events;
mod hostile;
mod postgres;
mod restart;
mod tls;
