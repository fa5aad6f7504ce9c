//! EIP-712 signatures: every order and report is signed by the wallet key, and the
//! recovered signer is the identity.
//!
//! Exchange messages use the domain `("IPSX Exchange", "1", chainId, centralizer)`: the
//! `verifyingContract` is the Centralizer the exchange node settles against, so an order
//! signed for one exchange node is refused by a node of another Centralizer on the same
//! chain (no cross-exchange replay). A node advertises its chain id and Centralizer at
//! `GET /v1/info`; the node's OpenAPI document publishes the typed-data definitions. Balance
//! proofs are the Centralizer's own `BalanceProof(bytes32 channelId,uint256 cumulativeAmount)`
//! under the domain `("IPSX Centralizer", "1", chainId, centralizer)`, hashed by the one
//! implementation in `ipsx_chain::proof` ([`crate::types::BalanceProof::digest`]) and checked
//! with the contract's rules (65 bytes, v 27/28, low s), so a stored proof is one the
//! provider can claim on chain.

use alloy_primitives::{Address, B256, Signature, U256, hex};
use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use alloy_sol_types::{Eip712Domain, SolStruct, eip712_domain};

use crate::error::ExchangeError;
use crate::types::{
    Cancel, EndpointReport, Extend, Offer, Preferences, Rating, Request, StatusReport,
};

/// The typed structs as signed (EIP-712 type names and field names).
#[allow(missing_docs, unreachable_pub)]
pub mod typed {
    alloy_sol_types::sol! {
        /// An offer order. Optional text is "" when absent, optional ASN 0.
        struct Offer {
            address provider;
            string exitAddress;
            string country;
            string region;
            string city;
            uint32 asn;
            string exitType;
            string[] protocols;
            uint256 pricePerIpSecond;
            uint64 minDurationS;
            uint64 maxDurationS;
            uint32 capacity;
            string wgEndpoint;
            bytes32 wgPublicKey;
            uint64 expiry;
            uint64 nonce;
        }
        /// A request order.
        struct Request {
            address requester;
            uint32 count;
            string[] countries;
            string[] regions;
            string[] cities;
            uint32[] asns;
            string[] types;
            string[] protocols;
            uint16 minRating;
            string diversity;
            address[] excludeProviders;
            uint64 durationS;
            uint256 maxPricePerIpSecond;
            bytes32 wgPublicKey;
            uint64 expiry;
            uint64 nonce;
        }
        /// Proposes a deal's new end.
        struct Extend {
            address wallet;
            uint64 dealId;
            uint64 newEnd;
            uint64 expiry;
            uint64 nonce;
        }
        /// Cancels an order.
        struct Cancel {
            address wallet;
            uint64 orderId;
            uint64 expiry;
            uint64 nonce;
        }
        /// A side's status for a deal.
        struct StatusReport {
            address wallet;
            uint64 dealId;
            string status;
            string reason;
            uint64 expiry;
            uint64 nonce;
        }
        /// A side's WireGuard endpoint for a deal (NAT traversal).
        struct EndpointReport {
            address wallet;
            uint64 dealId;
            string endpoint;
            string path;
            uint64 expiry;
            uint64 nonce;
        }
        /// A rating after a deal.
        struct Rating {
            address wallet;
            uint64 dealId;
            uint8 score;
            uint64 expiry;
            uint64 nonce;
        }
        /// Matching preferences.
        struct Preferences {
            address wallet;
            uint16 minCounterpartyRating;
            uint64 expiry;
            uint64 nonce;
        }
    }
}

/// EIP-712 domain name of exchange messages.
pub const DOMAIN_NAME: &str = "IPSX Exchange";
/// EIP-712 domain version of exchange messages.
pub const DOMAIN_VERSION: &str = "1";

/// The domain of exchange messages of the node settling against `centralizer` on
/// `chain_id`.
pub fn exchange_domain(chain_id: u64, centralizer: Address) -> Eip712Domain {
    eip712_domain! {
        name: DOMAIN_NAME,
        version: DOMAIN_VERSION,
        chain_id: chain_id,
        verifying_contract: centralizer,
    }
}

/// A message the exchange accepts signed: how to hash it and whose key must sign it.
pub trait Signed {
    /// The EIP-712 signing hash under `domain`.
    fn signing_hash(&self, domain: &Eip712Domain) -> B256;
    /// The wallet the payload names as its author (must equal the signer).
    fn author(&self) -> Address;
    /// The JSON name of the author field (for errors).
    fn author_field(&self) -> &'static str;
}

/// An offer as the typed struct it is signed as.
pub fn typed_offer(o: &Offer) -> typed::Offer {
    typed::Offer {
        provider: o.provider,
        exitAddress: o.exit_address.to_string(),
        country: o.country.to_string(),
        region: o.region.clone().unwrap_or_default(),
        city: o.city.clone().unwrap_or_default(),
        asn: o.asn.unwrap_or(0),
        exitType: o.kind.as_str().to_owned(),
        protocols: o.protocols.iter().map(|p| p.as_str().to_owned()).collect(),
        pricePerIpSecond: U256::from(o.price_per_ip_second),
        minDurationS: o.min_duration_s,
        maxDurationS: o.max_duration_s,
        capacity: o.capacity,
        wgEndpoint: o.wg_endpoint.to_string(),
        wgPublicKey: B256::from(o.wg_public_key.0),
        expiry: o.expiry,
        nonce: o.nonce,
    }
}

impl Signed for Offer {
    fn signing_hash(&self, domain: &Eip712Domain) -> B256 {
        typed_offer(self).eip712_signing_hash(domain)
    }
    fn author(&self) -> Address {
        self.provider
    }
    fn author_field(&self) -> &'static str {
        "provider"
    }
}

impl Signed for Request {
    fn signing_hash(&self, domain: &Eip712Domain) -> B256 {
        typed::Request {
            requester: self.requester,
            count: self.count,
            countries: self.countries.iter().map(|c| c.to_string()).collect(),
            regions: self.regions.clone(),
            cities: self.cities.clone(),
            asns: self.asns.clone(),
            types: self.types.iter().map(|t| t.as_str().to_owned()).collect(),
            protocols: self
                .protocols
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect(),
            minRating: self.min_rating,
            diversity: self.diversity.as_str().to_owned(),
            excludeProviders: self.exclude_providers.clone(),
            durationS: self.duration_s,
            maxPricePerIpSecond: U256::from(self.max_price_per_ip_second),
            wgPublicKey: B256::from(self.wg_public_key.0),
            expiry: self.expiry,
            nonce: self.nonce,
        }
        .eip712_signing_hash(domain)
    }
    fn author(&self) -> Address {
        self.requester
    }
    fn author_field(&self) -> &'static str {
        "requester"
    }
}

impl Signed for Extend {
    fn signing_hash(&self, domain: &Eip712Domain) -> B256 {
        typed::Extend {
            wallet: self.wallet,
            dealId: self.deal_id,
            newEnd: self.new_end,
            expiry: self.expiry,
            nonce: self.nonce,
        }
        .eip712_signing_hash(domain)
    }
    fn author(&self) -> Address {
        self.wallet
    }
    fn author_field(&self) -> &'static str {
        "wallet"
    }
}

impl Signed for Cancel {
    fn signing_hash(&self, domain: &Eip712Domain) -> B256 {
        typed::Cancel {
            wallet: self.wallet,
            orderId: self.order_id,
            expiry: self.expiry,
            nonce: self.nonce,
        }
        .eip712_signing_hash(domain)
    }
    fn author(&self) -> Address {
        self.wallet
    }
    fn author_field(&self) -> &'static str {
        "wallet"
    }
}

impl Signed for StatusReport {
    fn signing_hash(&self, domain: &Eip712Domain) -> B256 {
        typed::StatusReport {
            wallet: self.wallet,
            dealId: self.deal_id,
            status: self.status.as_str().to_owned(),
            reason: self.reason.clone(),
            expiry: self.expiry,
            nonce: self.nonce,
        }
        .eip712_signing_hash(domain)
    }
    fn author(&self) -> Address {
        self.wallet
    }
    fn author_field(&self) -> &'static str {
        "wallet"
    }
}

impl Signed for EndpointReport {
    fn signing_hash(&self, domain: &Eip712Domain) -> B256 {
        typed::EndpointReport {
            wallet: self.wallet,
            dealId: self.deal_id,
            endpoint: self.endpoint.to_string(),
            path: self.path.as_str().to_owned(),
            expiry: self.expiry,
            nonce: self.nonce,
        }
        .eip712_signing_hash(domain)
    }
    fn author(&self) -> Address {
        self.wallet
    }
    fn author_field(&self) -> &'static str {
        "wallet"
    }
}

impl Signed for Rating {
    fn signing_hash(&self, domain: &Eip712Domain) -> B256 {
        typed::Rating {
            wallet: self.wallet,
            dealId: self.deal_id,
            score: self.score,
            expiry: self.expiry,
            nonce: self.nonce,
        }
        .eip712_signing_hash(domain)
    }
    fn author(&self) -> Address {
        self.wallet
    }
    fn author_field(&self) -> &'static str {
        "wallet"
    }
}

impl Signed for Preferences {
    fn signing_hash(&self, domain: &Eip712Domain) -> B256 {
        typed::Preferences {
            wallet: self.wallet,
            minCounterpartyRating: self.min_counterparty_rating,
            expiry: self.expiry,
            nonce: self.nonce,
        }
        .eip712_signing_hash(domain)
    }
    fn author(&self) -> Address {
        self.wallet
    }
    fn author_field(&self) -> &'static str {
        "wallet"
    }
}

/// secp256k1 group order; signatures with `s > n/2` are refused (malleable).
const SECP256K1_N: U256 = U256::from_be_bytes([
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
    0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36, 0x41, 0x41,
]);

fn bad(reason: impl Into<String>) -> ExchangeError {
    ExchangeError::BadSignature {
        reason: reason.into(),
    }
}

/// Recovers the signer of `hash` from a 0x-hex `r || s || v` signature: exactly 65
/// bytes, v in {27, 28} (or {0, 1} when `allow_raw_v`), 0 < r < n, 0 < s <= n/2.
pub fn recover(hash: &B256, signature: &str, allow_raw_v: bool) -> Result<Address, ExchangeError> {
    if signature.len() > 2 + 2 * 65 + 2 {
        return Err(bad("longer than 65 bytes"));
    }
    let bytes = hex::decode(signature).map_err(|e| bad(format!("not hex: {e}")))?;
    let raw: [u8; 65] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| bad(format!("{} bytes, expected 65 (r, s, v)", bytes.len())))?;
    let r = U256::from_be_slice(&raw[..32]);
    let s = U256::from_be_slice(&raw[32..64]);
    let parity = match raw[64] {
        27 => false,
        28 => true,
        0 if allow_raw_v => false,
        1 if allow_raw_v => true,
        v => return Err(bad(format!("v byte {v}, expected 27 or 28"))),
    };
    if s > SECP256K1_N >> 1 {
        return Err(bad("high s value (s > n/2)"));
    }
    if r.is_zero() || s.is_zero() || r >= SECP256K1_N {
        return Err(bad("r or s out of range"));
    }
    recover_fast(hash, &raw, parity)
        .or_else(|| {
            Signature::new(r, s, parity)
                .recover_address_from_prehash(hash)
                .ok()
        })
        .ok_or_else(|| bad("no public key recovers from it"))
}

/// Recovery with libsecp256k1 (several times faster than the pure-Rust path, which is
/// the API's throughput limit); `None` when it refuses, and the caller falls back.
fn recover_fast(hash: &B256, raw: &[u8; 65], parity: bool) -> Option<Address> {
    use secp256k1::ecdsa::{RecoverableSignature, RecoveryId};
    let id = RecoveryId::try_from(i32::from(parity)).ok()?;
    let compact: &[u8; 64] = raw.first_chunk()?;
    let sig = RecoverableSignature::from_compact(compact, id).ok()?;
    let msg = secp256k1::Message::from_digest(hash.0);
    let key = secp256k1::SECP256K1.recover_ecdsa(msg, &sig).ok()?;
    let uncompressed = key.serialize_uncompressed();
    let digest = alloy_primitives::keccak256(uncompressed.get(1..)?);
    Some(Address::from_slice(digest.get(12..)?))
}

/// Checks that `signature` over `msg` under `domain` is by the wallet the payload names.
pub fn verify<T: Signed>(
    msg: &T,
    signature: &str,
    domain: &Eip712Domain,
) -> Result<Address, ExchangeError> {
    let signer = recover(&msg.signing_hash(domain), signature, true)?;
    if signer != msg.author() {
        // A valid signature under another domain recovers some other address: say which
        // domain this node expects, the usual cause being another node or chain.
        return Err(bad(format!(
            "signed by {signer}, but `{}` is {}; this node verifies under the EIP-712 domain (\"{}\", \"{}\", chainId {}, verifyingContract {}) — was it signed for another exchange node or chain? (GET /v1/info)",
            msg.author_field(),
            msg.author(),
            domain.name.as_deref().unwrap_or(""),
            domain.version.as_deref().unwrap_or(""),
            domain.chain_id.unwrap_or_default(),
            domain.verifying_contract.unwrap_or_default(),
        )));
    }
    Ok(signer)
}

/// Signs `hash` with `key`; returns 0x-hex `r || s || v` with v 27/28 and low s.
pub fn sign_hash(key: &PrivateKeySigner, hash: &B256) -> Result<String, ExchangeError> {
    let sig = key
        .sign_hash_sync(hash)
        .map_err(|e| bad(format!("signing failed: {e}")))?;
    Ok(hex::encode_prefixed(sig.normalized_s().as_bytes()))
}

/// Signs an exchange message with `key` under `domain`.
pub fn sign<T: Signed>(
    msg: &T,
    key: &PrivateKeySigner,
    domain: &Eip712Domain,
) -> Result<String, ExchangeError> {
    sign_hash(key, &msg.signing_hash(domain))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sign_then_verify_and_tampering_fails() {
        let key = PrivateKeySigner::random();
        let d = exchange_domain(31337, Address::ZERO);
        let c = Cancel {
            wallet: key.address(),
            order_id: 5,
            expiry: 10,
            nonce: 1,
        };
        let sig = sign(&c, &key, &d).unwrap();
        assert_eq!(verify(&c, &sig, &d).unwrap(), key.address());
        let mut other = c.clone();
        other.order_id = 6;
        assert!(verify(&other, &sig, &d).is_err());
        assert!(
            verify(&c, &sig, &exchange_domain(1, Address::ZERO)).is_err(),
            "other chain"
        );
        assert!(
            verify(&c, &sig, &exchange_domain(31337, Address::repeat_byte(1))).is_err(),
            "other exchange (Centralizer) on the same chain"
        );
        for bad in ["", "0x", "zz", "0x00", &"0x".repeat(500)] {
            let e = verify(&c, bad, &d).unwrap_err();
            assert!(e.to_string().contains("signature"), "{e}");
        }
        // High-s twin of a valid signature is refused.
        let raw = hex::decode(&sig).unwrap();
        let s = U256::from_be_slice(&raw[32..64]);
        let mut twin = raw.clone();
        twin[32..64].copy_from_slice(&(SECP256K1_N - s).to_be_bytes::<32>());
        twin[64] = if raw[64] == 27 { 28 } else { 27 };
        let e = verify(&c, &hex::encode_prefixed(&twin), &d).unwrap_err();
        assert!(e.to_string().contains("high s"), "{e}");
    }

    #[test]
    fn libsecp256k1_and_k256_recover_the_same_signer() {
        for i in 0..50u8 {
            let key = PrivateKeySigner::random();
            let hash = alloy_primitives::keccak256([i]);
            let sig = sign_hash(&key, &hash).unwrap();
            let raw: [u8; 65] = hex::decode(&sig).unwrap().try_into().unwrap();
            let parity = raw[64] == 28;
            let slow = Signature::from_raw(&raw)
                .unwrap()
                .recover_address_from_prehash(&hash)
                .unwrap();
            assert_eq!(recover_fast(&hash, &raw, parity), Some(slow));
            assert_eq!(slow, key.address());
        }
    }

    #[test]
    fn eip712_type_strings_are_the_documented_ones() {
        assert_eq!(
            typed::Cancel::eip712_encode_type(),
            "Cancel(address wallet,uint64 orderId,uint64 expiry,uint64 nonce)"
        );
    }
}
