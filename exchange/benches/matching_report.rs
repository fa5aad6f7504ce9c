//! Reporting bench: requests matched per second and p99 latency on one core, against a
//! book of 10^5 offers over 50 countries with 1-4 filters per request, side by side with
//! a naive scan of the book. Prints a small table with the ratio.
#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::time::{Duration, Instant};

use ipsx_exchange::book::NoProfiles;
use ipsx_exchange::{Command, Outcome};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn run(name: &str, n: usize, mut f: impl FnMut(usize)) -> (f64, Duration, Duration) {
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        f(i);
        lat.push(t.elapsed());
    }
    let total = start.elapsed();
    lat.sort_unstable();
    let rate = n as f64 / total.as_secs_f64();
    let (p50, p99) = (pct(&lat, 0.50), pct(&lat, 0.99));
    println!(
        "{name:<32} {rate:>12.0} req/s   p50 {p50:>10.2?}   p99 {p99:>10.2?}   ({n} requests)"
    );
    (rate, p50, p99)
}

fn main() {
    // `cargo bench` passes `--bench`; a plain `cargo test` run of benches passes nothing
    // useful: keep that run short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let n = if quick { 2_000 } else { 200_000 };
    let n_naive = if quick { 50 } else { 2_000 };
    let t = Instant::now();
    let mut ex = common::book();
    println!(
        "book: {} offers over 50 countries built in {:?}",
        ex.offers().len(),
        t.elapsed()
    );
    let reqs = common::requests(n * 5, 11);
    // MATCHING_ONLY=engine|select runs one part only (for profiling).
    let only = std::env::var("MATCHING_ONLY").unwrap_or_default();
    let (n_sel, n_naive, n_engine) = match only.as_str() {
        "engine" => (1, 1, n),
        "select" => (n * 5, 1, 1),
        _ => (n, n_naive, n),
    };
    let (fast, _, _) = run("select (indexed)", n_sel, |i| {
        let r = &reqs[i];
        std::hint::black_box(
            ex.offers()
                .select(r, &[], r.count, common::NOW, &NoProfiles),
        );
    });
    let (slow, _, _) = run("select (naive scan)", n_naive, |i| {
        let r = &reqs[i];
        std::hint::black_box(
            ex.offers()
                .select_naive(r, &[], r.count, common::NOW, &NoProfiles),
        );
    });
    let mut filled = 0u64;
    let (full, _, _) = run("post request (engine, deals made)", n_engine, |i| {
        let out = ex
            .apply(&Command::PostRequest {
                request: reqs[i].clone(),
                balance: u128::MAX,
                now: common::NOW,
            })
            .unwrap();
        if let Outcome::RequestPosted { filled: f, .. } = out {
            filled += u64::from(f);
        }
    });
    println!("IPs filled: {filled}, deals in book: {}", ex.deal_count());
    println!("ratio indexed / naive scan: {:.0}x", fast / slow);
    println!(
        "engine path vs target 250000 req/s: {:.2}x",
        full / 250_000.0
    );
}
