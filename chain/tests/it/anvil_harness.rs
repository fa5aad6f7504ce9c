//! The anvil harness: a free port each time, a working chain, and no process left
//! behind, even when the test panics.

#![allow(clippy::unwrap_used)]

use alloy::providers::Provider as _;
use ipsx_chain::testing::Anvil;

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn anvil_is_killed_when_the_test_panics() {
    let mut pid = 0;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let anvil = Anvil::spawn().unwrap();
        pid = anvil.pid();
        assert!(alive(pid));
        panic!("test failure while anvil runs");
    }));
    assert!(result.is_err());
    assert_ne!(pid, 0);
    assert!(!alive(pid), "anvil {pid} survived the panic");
}

#[tokio::test]
async fn two_nodes_get_distinct_loopback_ports_and_work() {
    let a = Anvil::spawn().unwrap();
    let b = Anvil::spawn_with_args(&["--chain-id", "4242", "--accounts", "3"]).unwrap();
    assert_ne!(a.endpoint(), b.endpoint());
    assert!(a.endpoint().starts_with("http://127.0.0.1:"));
    assert_eq!(b.chain_id(), 4242);
    assert_eq!(b.keys().len(), 3);
    assert_eq!(a.keys().len(), 10);
    let p = b.provider().unwrap();
    assert_eq!(p.get_chain_id().await.unwrap(), 4242);
    let t0 = p
        .get_block_by_number(Default::default())
        .await
        .unwrap()
        .unwrap()
        .header
        .timestamp;
    b.advance_time(1_000).await.unwrap();
    let t1 = p
        .get_block_by_number(Default::default())
        .await
        .unwrap()
        .unwrap()
        .header
        .timestamp;
    assert!(t1 >= t0 + 1_000, "{t0} -> {t1}");
    let pid = b.pid();
    drop(b);
    assert!(!alive(pid));
}

#[test]
fn a_missing_binary_is_reported_with_its_path() {
    let err = Anvil::spawn_binary(std::path::Path::new("/nonexistent/anvil"), &[]).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/anvil"), "{err}");
    // A binary that exits at once without printing a banner.
    let err = Anvil::spawn_binary(std::path::Path::new("/bin/true"), &[]).unwrap_err();
    assert!(err.to_string().contains("Listening on"), "{err}");
}
