//! Selection benchmarks (filled in below).

fn main() {}
