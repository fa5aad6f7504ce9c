//! API bench: placeholder until the server lands.
fn main() {}
