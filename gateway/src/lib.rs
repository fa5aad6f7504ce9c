//! ipsx gateway (being written).
