//! A realistic book for the matching benches: 10^5 offers over 50 countries, requests
//! with 1-4 filters (country, type, city, ASN), a deterministic generator.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use alloy_primitives::Address;
use ipsx_exchange::{Command, Diversity, EngineConfig, Exchange, Offer, Protocol, Request, WgKey};
use ipsx_rotation::{CountryCode, ExitKind};

pub const NOW: u64 = 1_700_000_000;
pub const OFFERS: usize = 100_000;

const CC: &str = "ad ae af ag al am ao ar at au az ba bb bd be bf bg bh bi bj bn bo br bs bt bw by bz ca cd cf cg ch ci cl cm cn co cr cu cv cy cz de dk dm do dz ec ee";

pub fn countries() -> Vec<CountryCode> {
    CC.split(' ').map(|c| c.parse().unwrap()).collect()
}

/// xorshift: deterministic and cheap.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const KINDS: [ExitKind; 3] = [
    ExitKind::Residential,
    ExitKind::Mobile,
    ExitKind::Datacenter,
];

pub fn offer(i: usize, rng: &mut Rng, cc: &[CountryCode]) -> Offer {
    let c = rng.below(50) as usize;
    let ip = Ipv4Addr::from(0x0a00_0000u32 + i as u32);
    Offer {
        provider: Address::with_last_byte((i % 200) as u8 + 1),
        exit_address: IpAddr::V4(ip),
        country: cc[c],
        region: None,
        city: Some(format!("city{}", rng.below(10))),
        asn: Some(1000 * (c as u32 + 1) + rng.below(20) as u32),
        kind: KINDS[rng.below(3) as usize],
        protocols: vec![Protocol::Any],
        price_per_ip_second: 1 + u128::from(rng.below(1000)),
        min_duration_s: 5,
        max_duration_s: 86_400,
        capacity: 100_000,
        wg_endpoint: SocketAddr::new(IpAddr::V4(ip), 51820),
        wg_public_key: WgKey([1; 32]),
        expiry: NOW + 30 * 86_400,
        nonce: i as u64,
    }
}

pub fn request(n: u64, rng: &mut Rng, cc: &[CountryCode]) -> Request {
    let c = rng.below(50) as usize;
    let nfilters = 1 + rng.below(4);
    // Pick nfilters of the four dimensions, country first most of the time.
    let mut dims = [0u8, 1, 2, 3];
    for i in (1..4).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        dims.swap(i, j);
    }
    let mut r = Request {
        requester: Address::repeat_byte(0xee),
        count: 1 + rng.below(3) as u32,
        countries: vec![],
        regions: vec![],
        cities: vec![],
        asns: vec![],
        types: vec![],
        protocols: vec![Protocol::Http],
        min_rating: 0,
        diversity: Diversity::None,
        exclude_providers: Vec::new(),
        duration_s: 60,
        max_price_per_ip_second: 500 + u128::from(rng.below(500)),
        wg_public_key: WgKey([2; 32]),
        expiry: NOW + 3600,
        nonce: n,
    };
    for d in &dims[..nfilters as usize] {
        match d {
            0 => {
                r.countries.push(cc[c]);
                if rng.below(4) == 0 {
                    r.countries.push(cc[(c + 1) % 50]);
                }
            }
            1 => r.types.push(KINDS[rng.below(3) as usize]),
            2 => r.cities.push(format!("city{}", rng.below(10))),
            _ => r.asns.push(1000 * (c as u32 + 1) + rng.below(20) as u32),
        }
    }
    r
}

pub fn book() -> Exchange {
    let cc = countries();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut ex = Exchange::new(EngineConfig::default());
    for i in 0..OFFERS {
        ex.apply(&Command::PostOffer {
            offer: offer(i, &mut rng, &cc),
            now: NOW,
        })
        .unwrap();
    }
    ex
}

pub fn requests(n: usize, seed: u64) -> Vec<Request> {
    let cc = countries();
    let mut rng = Rng(seed | 1);
    (0..n)
        .map(|i| request(i as u64 + 1_000_000 * seed, &mut rng, &cc))
        .collect()
}
