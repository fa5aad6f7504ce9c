//! Benchmark tooling for ipsx. The load generator (`ipsx-loadgen`) drives the same
//! traffic through ipsx and through peer implementations (squid, dante) so that the
//! scripts under `benches/*/run.sh` can print side-by-side ratios from one run;
//! `ipsx-udpgen` does the same for UDP echo, straight or through SOCKS5 UDP ASSOCIATE.

/// The single-threaded runtime every load generator runs on (one core of load, so the
/// proxy under test keeps the others); exits with status 2 when it cannot be built.
pub fn current_thread_runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(2);
        }
    }
}
