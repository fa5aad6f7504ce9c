//! The order book: the Offer Orders List with its indexes, and the Request Orders List.
//!
//! Offers are kept in ordered sets keyed by (price, better rating first, older first),
//! one set per value of each attribute (country, region, city, ASN, type) plus one for
//! the whole book. A request walks the merged sets of its most selective filter in key
//! order, so the first acceptable offers it meets are the ones the rules choose, and it
//! stops at its price limit. [`OfferBook::select_naive`] is the plain scan the index must
//! agree with (property-tested, and benchmarked side by side).

use std::cmp::Reverse;
use std::collections::btree_set;
use std::collections::{BTreeMap, BTreeSet};

use alloy_primitives::map::{HashMap, HashSet};
use std::hash::Hash;
use std::iter::Peekable;
use std::net::IpAddr;

use alloy_primitives::Address;
use ipsx_rotation::{CountryCode, ExitKind};
use serde::Serialize;

use crate::types::{Diversity, Offer, Request, subnet_of};

/// Sort key of an offer: cheapest, then higher provider rating, then older (lower id);
/// the last field is the offer's slot in the compact attribute array (not an order).
pub type OfferKey = (u128, Reverse<u16>, u64, u32);

/// What matching reads of an offer, packed (about 80 bytes) in one dense array so a walk
/// over candidates touches little memory and no hash table.
#[derive(Debug, Clone, Copy)]
struct Hot {
    expiry: u64,
    asn: u32,
    region_id: u32,
    city_id: u32,
    min_duration_s: u64,
    max_duration_s: u64,
    country: CountryCode,
    kind: ExitKind,
    protocols: u8,
    provider: Address,
    exit: IpAddr,
}

fn protocol_mask(ps: &[crate::types::Protocol]) -> u8 {
    use crate::types::Protocol;
    ps.iter().fold(0, |m, p| {
        m | match p {
            Protocol::Http => 1,
            Protocol::Https => 2,
            Protocol::Smtp => 4,
            Protocol::Any => 8,
        }
    })
}

/// An offer in the book with what is left of its capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BookOffer {
    /// Order id.
    pub id: u64,
    /// The offer as accepted.
    pub offer: Offer,
    /// Capacity not taken by running deals.
    pub remaining: u32,
    /// The provider rating the offer is currently sorted by.
    pub rating: u16,
    /// When the offer entered the book (unix seconds).
    pub created: u64,
    /// Interned region (0: none), so matching compares integers, not strings.
    #[serde(skip)]
    region_id: u32,
    /// Interned city (0: none).
    #[serde(skip)]
    city_id: u32,
    /// Index in the compact attribute array.
    #[serde(skip)]
    slot: u32,
}

impl BookOffer {
    fn key(&self) -> OfferKey {
        (
            self.offer.price_per_ip_second,
            Reverse(self.rating),
            self.id,
            self.slot,
        )
    }
}

/// What the matcher needs to know about wallets besides the offers themselves.
pub trait Counterparties {
    /// The requester's rating, hundredths of a star (0 when unrated).
    fn rating(&self, wallet: &Address) -> u16;
    /// The lowest requester rating this provider accepts (0: anyone).
    fn min_counterparty_rating(&self, provider: &Address) -> u16;
}

/// A [`Counterparties`] where nobody has a rating or a preference.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProfiles;

impl Counterparties for NoProfiles {
    fn rating(&self, _: &Address) -> u16 {
        0
    }
    fn min_counterparty_rating(&self, _: &Address) -> u16 {
        0
    }
}

/// The Offer Orders List, indexed.
#[derive(Debug, Default)]
pub struct OfferBook {
    offers: HashMap<u64, BookOffer>,
    all: BTreeSet<OfferKey>,
    by_country: HashMap<CountryCode, BTreeSet<OfferKey>>,
    by_region: HashMap<String, BTreeSet<OfferKey>>,
    by_city: HashMap<String, BTreeSet<OfferKey>>,
    by_asn: HashMap<u32, BTreeSet<OfferKey>>,
    by_kind: HashMap<ExitKind, BTreeSet<OfferKey>>,
    by_provider: HashMap<Address, HashSet<u64>>,
    /// Region and city names -> small integers (1, 2, ...).
    places: HashMap<String, u32>,
    /// Compact attributes by slot; `free` lists slots of removed offers.
    hot: Vec<Hot>,
    free: Vec<u32>,
}

/// A request's region and city filters as interned ids.
struct PlaceIds {
    regions: Vec<u32>,
    cities: Vec<u32>,
}

fn index_insert<K: Hash + Eq>(map: &mut HashMap<K, BTreeSet<OfferKey>>, k: K, key: OfferKey) {
    map.entry(k).or_default().insert(key);
}

fn index_remove<K: Hash + Eq>(map: &mut HashMap<K, BTreeSet<OfferKey>>, k: &K, key: &OfferKey) {
    if let Some(set) = map.get_mut(k) {
        set.remove(key);
        if set.is_empty() {
            map.remove(k);
        }
    }
}

/// Walks several disjoint key-ordered sets in overall key order.
struct Merge<'a> {
    heads: Vec<Peekable<btree_set::Range<'a, OfferKey>>>,
}

impl Iterator for Merge<'_> {
    type Item = OfferKey;
    fn next(&mut self) -> Option<OfferKey> {
        let mut best: Option<(usize, OfferKey)> = None;
        for (i, it) in self.heads.iter_mut().enumerate() {
            if let Some(k) = it.peek()
                && best.is_none_or(|(_, b)| **k < b)
            {
                best = Some((i, **k));
            }
        }
        let (i, k) = best?;
        self.heads.get_mut(i)?.next();
        Some(k)
    }
}

impl OfferBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of offers in the book (with or without remaining capacity).
    pub fn len(&self) -> usize {
        self.offers.len()
    }

    /// True when no offer is in the book.
    pub fn is_empty(&self) -> bool {
        self.offers.is_empty()
    }

    /// The offer with that id.
    pub fn get(&self, id: u64) -> Option<&BookOffer> {
        self.offers.get(&id)
    }

    /// Every offer, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &BookOffer> {
        self.offers.values()
    }

    /// Ids of a provider's offers.
    pub fn ids_of(&self, provider: &Address) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .by_provider
            .get(provider)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    /// How many offers a provider has in the book (O(1)).
    pub fn count_of(&self, provider: &Address) -> usize {
        self.by_provider.get(provider).map_or(0, HashSet::len)
    }

    fn index(&mut self, o: &BookOffer) {
        let key = o.key();
        self.all.insert(key);
        index_insert(&mut self.by_country, o.offer.country, key);
        if let Some(r) = &o.offer.region {
            index_insert(&mut self.by_region, r.clone(), key);
        }
        if let Some(c) = &o.offer.city {
            index_insert(&mut self.by_city, c.clone(), key);
        }
        if let Some(a) = o.offer.asn {
            index_insert(&mut self.by_asn, a, key);
        }
        index_insert(&mut self.by_kind, o.offer.kind, key);
    }

    fn unindex(&mut self, o: &BookOffer) {
        let key = o.key();
        self.all.remove(&key);
        index_remove(&mut self.by_country, &o.offer.country, &key);
        if let Some(r) = &o.offer.region {
            index_remove(&mut self.by_region, r, &key);
        }
        if let Some(c) = &o.offer.city {
            index_remove(&mut self.by_city, c, &key);
        }
        if let Some(a) = &o.offer.asn {
            index_remove(&mut self.by_asn, a, &key);
        }
        index_remove(&mut self.by_kind, &o.offer.kind, &key);
    }

    /// Adds an offer (capacity fully available).
    pub fn insert(&mut self, id: u64, offer: Offer, rating: u16, created: u64) {
        let region_id = offer.region.as_deref().map_or(0, |r| self.intern(r));
        let city_id = offer.city.as_deref().map_or(0, |c| self.intern(c));
        let hot = Hot {
            expiry: offer.expiry,
            asn: offer.asn.unwrap_or(0),
            region_id,
            city_id,
            min_duration_s: offer.min_duration_s,
            max_duration_s: offer.max_duration_s,
            country: offer.country,
            kind: offer.kind,
            protocols: protocol_mask(&offer.protocols),
            provider: offer.provider,
            exit: offer.exit_address,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                if let Some(h) = self.hot.get_mut(s as usize) {
                    *h = hot;
                }
                s
            }
            None => {
                self.hot.push(hot);
                u32::try_from(self.hot.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let o = BookOffer {
            slot,
            id,
            remaining: offer.capacity,
            offer,
            rating,
            created,
            region_id,
            city_id,
        };
        self.by_provider
            .entry(o.offer.provider)
            .or_default()
            .insert(id);
        if o.remaining > 0 {
            self.index(&o);
        }
        self.offers.insert(id, o);
    }

    fn intern(&mut self, name: &str) -> u32 {
        if let Some(id) = self.places.get(name) {
            return *id;
        }
        let id = u32::try_from(self.places.len() + 1).unwrap_or(u32::MAX);
        self.places.insert(name.to_owned(), id);
        id
    }

    /// The request's place filters as ids; `None` when a non-empty list names no place
    /// any offer ever had (nothing can match).
    fn place_ids(&self, req: &Request) -> Option<PlaceIds> {
        let ids = |names: &[String]| -> Option<Vec<u32>> {
            let v: Vec<u32> = names
                .iter()
                .filter_map(|n| self.places.get(n.as_str()).copied())
                .collect();
            if v.is_empty() && !names.is_empty() {
                None
            } else {
                Some(v)
            }
        };
        Some(PlaceIds {
            regions: ids(&req.regions)?,
            cities: ids(&req.cities)?,
        })
    }

    /// [`OfferBook::acceptable`] for the indexed path, on the compact attributes:
    /// integers instead of strings, the cheapest checks first. The property test holds
    /// it to the same answers as the scan.
    #[allow(clippy::too_many_arguments)]
    fn acceptable_fast(
        h: &Hot,
        rating: u16,
        req: &Request,
        wanted: u8,
        places: &PlaceIds,
        chosen: &[(Address, IpAddr)],
        now: u64,
        requester_rating: u16,
        profiles: &impl Counterparties,
    ) -> bool {
        h.expiry > now
            && rating >= req.min_rating
            && (req.countries.is_empty() || req.countries.contains(&h.country))
            && (req.types.is_empty() || req.types.contains(&h.kind))
            && (req.asns.is_empty() || (h.asn != 0 && req.asns.contains(&h.asn)))
            && (req.cities.is_empty() || (h.city_id != 0 && places.cities.contains(&h.city_id)))
            && (req.regions.is_empty()
                || (h.region_id != 0 && places.regions.contains(&h.region_id)))
            && (h.min_duration_s..=h.max_duration_s).contains(&req.duration_s)
            && (h.protocols & 8 != 0 || h.protocols & wanted == wanted)
            && h.provider != req.requester
            && !req.excludes(&h.provider)
            && requester_rating >= profiles.min_counterparty_rating(&h.provider)
            && diverse_exit(req.diversity, h.provider, h.exit, chosen)
    }

    /// Removes an offer from the book; returns it.
    pub fn remove(&mut self, id: u64) -> Option<BookOffer> {
        let o = self.offers.remove(&id)?;
        self.free.push(o.slot);
        if o.remaining > 0 {
            self.unindex(&o);
        }
        if let Some(set) = self.by_provider.get_mut(&o.offer.provider) {
            set.remove(&id);
            if set.is_empty() {
                self.by_provider.remove(&o.offer.provider);
            }
        }
        Some(o)
    }

    /// Takes one unit of capacity; the offer leaves the indexes when none is left.
    /// Returns false if the offer is unknown or exhausted.
    pub fn take(&mut self, id: u64) -> bool {
        let Some(o) = self.offers.get(&id) else {
            return false;
        };
        if o.remaining == 0 {
            return false;
        }
        let o = o.clone();
        if o.remaining == 1 {
            self.unindex(&o);
        }
        if let Some(m) = self.offers.get_mut(&id) {
            m.remaining -= 1;
        }
        true
    }

    /// Gives one unit of capacity back (a deal on the offer ended).
    pub fn give_back(&mut self, id: u64) {
        let Some(o) = self.offers.get(&id) else {
            return;
        };
        if o.remaining >= o.offer.capacity {
            return;
        }
        let was_empty = o.remaining == 0;
        if let Some(m) = self.offers.get_mut(&id) {
            m.remaining += 1;
        }
        if was_empty && let Some(o) = self.offers.get(&id).cloned() {
            self.index(&o);
        }
    }

    /// Re-sorts a provider's offers under a new rating.
    pub fn set_rating(&mut self, provider: &Address, rating: u16) {
        for id in self.ids_of(provider) {
            let Some(o) = self.offers.get(&id).cloned() else {
                continue;
            };
            if o.rating == rating {
                continue;
            }
            if o.remaining > 0 {
                self.unindex(&o);
            }
            if let Some(m) = self.offers.get_mut(&id) {
                m.rating = rating;
            }
            if o.remaining > 0
                && let Some(o) = self.offers.get(&id).cloned()
            {
                self.index(&o);
            }
        }
    }

    /// Whether offer `id` may serve one more IP of `req`, whose exits so far are
    /// `chosen` (used when a new offer meets resting requests).
    pub fn fits(
        &self,
        id: u64,
        req: &Request,
        chosen: &[(Address, IpAddr)],
        now: u64,
        profiles: &impl Counterparties,
    ) -> bool {
        self.offers.get(&id).is_some_and(|o| {
            Self::acceptable(
                o,
                req,
                chosen,
                now,
                profiles.rating(&req.requester),
                profiles,
            )
        })
    }

    /// Offers with capacity left, in matching order (cheapest, best rated, oldest),
    /// optionally only in one country, of one type, at or below a price; at most `limit`.
    pub fn list(
        &self,
        country: Option<CountryCode>,
        kind: Option<ExitKind>,
        max_price: Option<u128>,
        limit: usize,
    ) -> Vec<&BookOffer> {
        let set = match country {
            Some(c) => match self.by_country.get(&c) {
                Some(s) => s,
                None => return Vec::new(),
            },
            None => &self.all,
        };
        let hi: OfferKey = (
            max_price.unwrap_or(u128::MAX),
            Reverse(0),
            u64::MAX,
            u32::MAX,
        );
        set.range(..=hi)
            .filter_map(|(_, _, id, _)| self.offers.get(id))
            .filter(|o| kind.is_none_or(|k| o.offer.kind == k))
            .take(limit)
            .collect()
    }

    /// The candidate sets of the request's most selective filter (the any-of list
    /// whose sets hold the fewest offers), or the whole book when it has no filter.
    fn candidate_sets(&self, req: &Request) -> Vec<&BTreeSet<OfferKey>> {
        fn size<K: Hash + Eq>(map: &HashMap<K, BTreeSet<OfferKey>>, values: &[K]) -> usize {
            values
                .iter()
                .filter_map(|v| map.get(v))
                .map(BTreeSet::len)
                .sum()
        }
        fn sets<'a, K: Hash + Eq>(
            map: &'a HashMap<K, BTreeSet<OfferKey>>,
            values: &[K],
        ) -> Vec<&'a BTreeSet<OfferKey>> {
            values.iter().filter_map(|v| map.get(v)).collect()
        }
        let mut best: Option<(usize, u8)> = None;
        let mut consider = |dim: u8, n: usize, empty: bool| {
            if !empty && best.is_none_or(|(b, _)| n < b) {
                best = Some((n, dim));
            }
        };
        consider(
            0,
            size(&self.by_country, &req.countries),
            req.countries.is_empty(),
        );
        consider(
            1,
            size(&self.by_region, &req.regions),
            req.regions.is_empty(),
        );
        consider(2, size(&self.by_city, &req.cities), req.cities.is_empty());
        consider(3, size(&self.by_asn, &req.asns), req.asns.is_empty());
        consider(4, size(&self.by_kind, &req.types), req.types.is_empty());
        match best.map(|(_, d)| d) {
            Some(0) => sets(&self.by_country, &req.countries),
            Some(1) => sets(&self.by_region, &req.regions),
            Some(2) => sets(&self.by_city, &req.cities),
            Some(3) => sets(&self.by_asn, &req.asns),
            Some(_) => sets(&self.by_kind, &req.types),
            None => vec![&self.all],
        }
    }

    /// Whether offer `o` may serve one more IP of `req` (everything but order).
    #[allow(clippy::too_many_arguments)]
    fn acceptable(
        o: &BookOffer,
        req: &Request,
        chosen: &[(Address, IpAddr)],
        now: u64,
        requester_rating: u16,
        profiles: &impl Counterparties,
    ) -> bool {
        o.remaining > 0
            && o.offer.expiry > now
            && o.offer.provider != req.requester
            && o.offer.price_per_ip_second <= req.max_price_per_ip_second
            && o.rating >= req.min_rating
            && req.accepts_attributes(&o.offer)
            && requester_rating >= profiles.min_counterparty_rating(&o.offer.provider)
            && diverse(req.diversity, &o.offer, chosen)
    }

    /// The offers (ids, in fill order) that `req` takes now, at most `want` of them,
    /// given the exits it already holds in `already`. Does not change the book.
    pub fn select(
        &self,
        req: &Request,
        already: &[(Address, IpAddr)],
        want: u32,
        now: u64,
        profiles: &impl Counterparties,
    ) -> Vec<u64> {
        let mut out = Vec::new();
        if want == 0 {
            return out;
        }
        let hi: OfferKey = (req.max_price_per_ip_second, Reverse(0), u64::MAX, u32::MAX);
        let sets = self.candidate_sets(req);
        match sets.as_slice() {
            [] => {}
            [one] => self.pick(
                one.range(..=hi),
                req,
                already,
                want,
                now,
                profiles,
                &mut out,
            ),
            many => {
                let merge = Merge {
                    heads: many.iter().map(|s| s.range(..=hi).peekable()).collect(),
                };
                self.pick(merge, req, already, want, now, profiles, &mut out);
            }
        }
        out
    }

    /// Takes acceptable offers from `keys` (in key order) until `want` are chosen.
    #[allow(clippy::too_many_arguments)]
    fn pick(
        &self,
        keys: impl Iterator<Item = impl std::borrow::Borrow<OfferKey>>,
        req: &Request,
        already: &[(Address, IpAddr)],
        want: u32,
        now: u64,
        profiles: &impl Counterparties,
        out: &mut Vec<u64>,
    ) {
        let Some(places) = self.place_ids(req) else {
            return;
        };
        let requester_rating = profiles.rating(&req.requester);
        let wanted = protocol_mask(&req.protocols);
        let mut chosen = already.to_vec();
        for key in keys {
            let &(price, Reverse(rating), id, slot) = key.borrow();
            let Some(h) = self.hot.get(slot as usize) else {
                continue;
            };
            if price <= req.max_price_per_ip_second
                && Self::acceptable_fast(
                    h,
                    rating,
                    req,
                    wanted,
                    &places,
                    &chosen,
                    now,
                    requester_rating,
                    profiles,
                )
            {
                out.push(id);
                chosen.push((h.provider, h.exit));
                if out.len() as u64 >= u64::from(want) {
                    break;
                }
            }
        }
    }

    /// The same choice as [`OfferBook::select`] by scanning and sorting the whole book:
    /// the reference the index is checked against, and the benchmark's baseline.
    pub fn select_naive(
        &self,
        req: &Request,
        already: &[(Address, IpAddr)],
        want: u32,
        now: u64,
        profiles: &impl Counterparties,
    ) -> Vec<u64> {
        let requester_rating = profiles.rating(&req.requester);
        let mut fitting: Vec<&BookOffer> = self
            .offers
            .values()
            .filter(|o| Self::acceptable(o, req, &[], now, requester_rating, profiles))
            .collect();
        fitting.sort_unstable_by_key(|o| o.key());
        let mut chosen = already.to_vec();
        let mut out = Vec::new();
        for o in fitting {
            if out.len() as u64 >= u64::from(want) {
                break;
            }
            if diverse(req.diversity, &o.offer, &chosen) {
                out.push(o.id);
                chosen.push((o.offer.provider, o.offer.exit_address));
            }
        }
        out
    }
}

/// Whether `offer` keeps the request's exits as spread out as it asks. Exit addresses
/// are always distinct: two deals on one address would be one IP counted twice.
fn diverse(d: Diversity, offer: &Offer, chosen: &[(Address, IpAddr)]) -> bool {
    diverse_exit(d, offer.provider, offer.exit_address, chosen)
}

fn diverse_exit(
    d: Diversity,
    provider: Address,
    exit: IpAddr,
    chosen: &[(Address, IpAddr)],
) -> bool {
    chosen.iter().all(|(p, ip)| {
        *ip != exit
            && match d {
                Diversity::None => true,
                Diversity::DistinctProvider => *p != provider,
                Diversity::DistinctSubnet => subnet_of(*ip) != subnet_of(exit),
            }
    })
}

/// A request resting in the book with its unfilled part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BookRequest {
    /// Order id.
    pub id: u64,
    /// The request as accepted.
    pub request: Request,
    /// IPs still wanted.
    pub remaining: u32,
    /// (provider, exit) of every fill so far, for diversity.
    pub filled: Vec<(Address, IpAddr)>,
    /// When the request entered the book (unix seconds).
    pub created: u64,
}

/// The Request Orders List: requests with an unfilled part, oldest first, indexed by
/// country so a new offer only looks at requests it could serve.
#[derive(Debug, Default)]
pub struct RequestBook {
    requests: BTreeMap<u64, BookRequest>,
    by_country: HashMap<CountryCode, BTreeSet<u64>>,
    any_country: BTreeSet<u64>,
    by_requester: HashMap<Address, usize>,
}

impl RequestBook {
    /// Number of resting requests.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    /// True when no request rests in the book.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// The resting request with that id.
    pub fn get(&self, id: u64) -> Option<&BookRequest> {
        self.requests.get(&id)
    }

    /// Mutable access for fills.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut BookRequest> {
        self.requests.get_mut(&id)
    }

    /// Every resting request, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &BookRequest> {
        self.requests.values()
    }

    /// How many requests a wallet has resting in the book.
    pub fn count_of(&self, requester: &Address) -> usize {
        self.by_requester.get(requester).copied().unwrap_or(0)
    }

    /// Puts a request in the book.
    pub fn insert(&mut self, r: BookRequest) {
        // Re-inserting an id replaces it (keeps the per-wallet count exact).
        self.remove(r.id);
        *self.by_requester.entry(r.request.requester).or_default() += 1;
        if r.request.countries.is_empty() {
            self.any_country.insert(r.id);
        } else {
            for c in &r.request.countries {
                self.by_country.entry(*c).or_default().insert(r.id);
            }
        }
        self.requests.insert(r.id, r);
    }

    /// Takes a request out of the book.
    pub fn remove(&mut self, id: u64) -> Option<BookRequest> {
        let r = self.requests.remove(&id)?;
        if let Some(n) = self.by_requester.get_mut(&r.request.requester) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_requester.remove(&r.request.requester);
            }
        }
        self.any_country.remove(&id);
        for c in &r.request.countries {
            if let Some(s) = self.by_country.get_mut(c) {
                s.remove(&id);
                if s.is_empty() {
                    self.by_country.remove(c);
                }
            }
        }
        Some(r)
    }

    /// Ids of the requests a new offer in `country` could serve, oldest first.
    pub fn candidates(&self, country: &CountryCode) -> Vec<u64> {
        let mut ids: Vec<u64> = self.any_country.iter().copied().collect();
        if let Some(s) = self.by_country.get(country) {
            ids.extend(s.iter().copied());
        }
        ids.sort_unstable();
        ids
    }
}
