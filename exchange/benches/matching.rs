//! Criterion bench: matching requests against a book of 10^5 offers over 50 countries,
//! with the index and with a naive scan of the whole book.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use criterion::{Criterion, criterion_group, criterion_main};
use ipsx_exchange::Command;
use ipsx_exchange::book::NoProfiles;

fn matching(c: &mut Criterion) {
    let mut ex = common::book();
    let reqs = common::requests(1 << 16, 7);
    let mut g = c.benchmark_group("matching_1e5_offers");
    let mut i = 0usize;
    g.bench_function("select_indexed", |b| {
        b.iter(|| {
            let r = &reqs[i % reqs.len()];
            i += 1;
            ex.offers()
                .select(r, &[], r.count, common::NOW, &NoProfiles)
        })
    });
    g.bench_function("select_naive_scan", |b| {
        b.iter(|| {
            let r = &reqs[i % reqs.len()];
            i += 1;
            ex.offers()
                .select_naive(r, &[], r.count, common::NOW, &NoProfiles)
        })
    });
    let mut n = 0u64;
    g.bench_function("post_request_full_engine", |b| {
        b.iter(|| {
            let mut r = reqs[(n as usize) % reqs.len()].clone();
            r.nonce = n;
            n += 1;
            ex.apply(&Command::PostRequest {
                request: r,
                balance: u128::MAX,
                now: common::NOW,
            })
            .unwrap()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = matching
}
criterion_main!(benches);
