//! The `ipsx` binary: thin; parses options and calls the role crates.

fn main() {
    println!("ipsx: see `ipsx --help`");
}
