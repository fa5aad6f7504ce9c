//! Chain.
pub mod bindings;
