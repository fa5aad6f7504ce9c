//! Benchmark tooling for ipsx. The load generator (`ipsx-loadgen`) drives the same
//! traffic through ipsx and through peer implementations (squid, dante) so that the
//! scripts under `benches/*/run.sh` can print side-by-side ratios from one run.
