//! Balance-proof throughput: how many proofs a provider can check per second (each
//! payment message carries one), and what signing costs the requester.

#![allow(missing_docs, clippy::unwrap_used)]

use alloy::primitives::{Address, B256, U256};
use alloy::signers::local::PrivateKeySigner;
use criterion::{Criterion, criterion_group, criterion_main};
use ipsx_chain::{
    BalanceProof, ChannelDomain, fee_split, sign_balance_proof, verify_balance_proof,
};

fn bench(c: &mut Criterion) {
    let key = PrivateKeySigner::from_bytes(&B256::repeat_byte(1)).unwrap();
    let domain = ChannelDomain {
        chain_id: 31337,
        centralizer: Address::repeat_byte(0x42),
    };
    let proof = BalanceProof {
        channel_id: B256::repeat_byte(7),
        cumulative_amount: U256::from(123_456_789u64),
    };
    let sig = sign_balance_proof(&key, &domain, &proof).unwrap();

    c.bench_function("balance_proof_digest", |b| {
        b.iter(|| std::hint::black_box(&proof).digest(&domain))
    });
    c.bench_function("sign_balance_proof", |b| {
        b.iter(|| sign_balance_proof(&key, &domain, std::hint::black_box(&proof)).unwrap())
    });
    c.bench_function("verify_balance_proof", |b| {
        b.iter(|| {
            verify_balance_proof(&domain, std::hint::black_box(&proof), &sig, key.address())
                .unwrap()
        })
    });
    c.bench_function("fee_split", |b| {
        b.iter(|| fee_split(std::hint::black_box(U256::from(987_654_321_123u64)), 175).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
