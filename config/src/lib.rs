//! ipsx config (being written).
