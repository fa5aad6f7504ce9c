//! All integration tests of this crate in one binary (one link instead of one per file).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod agent;
mod common;
mod faults;
mod health;
mod interop;
mod loopback;
mod udp;
use common::natlab;
