//! Balance-proof maths, sans-IO: EIP-712 digests, signing and verification of the
//! requester's `BalanceProof` and the provider's `CloseConsent`, channel ids and the fee
//! split. Every rule here mirrors `contracts/src/Centralizer.sol` exactly, so a proof this
//! module accepts is one the contract accepts, and the other way round (tests compare
//! both on a real chain).

use alloy::primitives::{Address, B256, Bytes, U256, keccak256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{Eip712Domain, SolStruct, SolValue, eip712_domain};
use serde::{Deserialize, Serialize};

/// EIP-712 domain name of the Centralizer.
pub const DOMAIN_NAME: &str = "IPSX Centralizer";
/// EIP-712 domain version of the Centralizer.
pub const DOMAIN_VERSION: &str = "1";
/// Basis points in one whole (fees are in basis points).
pub const BPS_DENOMINATOR: u16 = 10_000;
/// The contract's hard cap on the platform fee (10 %).
pub const MAX_FEE_BPS: u16 = 1_000;
/// Length of a signature as the contract takes it: `r (32) || s (32) || v (1)`.
pub const SIGNATURE_LEN: usize = 65;

/// secp256k1 group order `n`; the contract (OpenZeppelin `ECDSA`) refuses `s > n / 2`.
const SECP256K1_N: U256 = U256::from_be_bytes([
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
    0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36, 0x41, 0x41,
]);

mod typed {
    #![allow(missing_docs, unreachable_pub)]
    alloy::sol! {
        struct BalanceProof {
            bytes32 channelId;
            uint256 cumulativeAmount;
        }
        struct CloseConsent {
            bytes32 channelId;
            uint256 cumulativeAmount;
            bytes32 logHash;
        }
    }
}

/// Which Centralizer a proof is for: the EIP-712 domain is
/// `("IPSX Centralizer", "1", chain_id, centralizer)`, so a proof for another chain or
/// another deployment never verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChannelDomain {
    /// EIP-155 chain id.
    pub chain_id: u64,
    /// Address of the Centralizer contract.
    pub centralizer: Address,
}

impl ChannelDomain {
    /// The EIP-712 domain the contract builds for itself.
    pub fn eip712(&self) -> Eip712Domain {
        eip712_domain! {
            name: DOMAIN_NAME,
            version: DOMAIN_VERSION,
            chain_id: self.chain_id,
            verifying_contract: self.centralizer,
        }
    }

    /// The domain separator (`Centralizer.domainSeparator()`).
    pub fn separator(&self) -> B256 {
        self.eip712().hash_struct()
    }
}

/// The requester's promise: the provider may take `cumulative_amount` (base units, 18
/// decimals) in total from channel `channel_id`. Newer proofs carry larger amounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceProof {
    /// Channel id (`bytes32`, see [`channel_id_for`]).
    pub channel_id: B256,
    /// Total owed since the channel opened, in token base units.
    pub cumulative_amount: U256,
}

impl BalanceProof {
    /// The EIP-712 digest the requester signs (`Centralizer.balanceProofDigest`).
    pub fn digest(&self, domain: &ChannelDomain) -> B256 {
        typed::BalanceProof {
            channelId: self.channel_id,
            cumulativeAmount: self.cumulative_amount,
        }
        .eip712_signing_hash(&domain.eip712())
    }
}

/// The provider's consent to close a channel at once, with `cumulative_amount` paid in
/// total and `log_hash` as the head of its connection log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloseConsent {
    /// Channel id.
    pub channel_id: B256,
    /// Total paid to the provider over the channel's life.
    pub cumulative_amount: U256,
    /// Head of the provider's connection-log hash chain.
    pub log_hash: B256,
}

impl CloseConsent {
    /// The EIP-712 digest the provider signs (`Centralizer.closeConsentDigest`).
    pub fn digest(&self, domain: &ChannelDomain) -> B256 {
        typed::CloseConsent {
            channelId: self.channel_id,
            cumulativeAmount: self.cumulative_amount,
            logHash: self.log_hash,
        }
        .eip712_signing_hash(&domain.eip712())
    }
}

/// Why a signature does not verify; mirrors the contract's `MalformedSignature` reasons
/// and `WrongSigner`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// Not exactly 65 bytes (contract reason 2).
    #[error("signature is {len} bytes long, expected 65 (r, s, v)")]
    SignatureLength {
        /// Length given.
        len: usize,
    },
    /// `s` in the upper half of the curve order (malleable; contract reason 3).
    #[error("signature has a high s value (s > n/2), which the contract refuses")]
    HighS,
    /// `v` is not 27 or 28 (contract reason 1).
    #[error("signature v byte is {v}, expected 27 or 28")]
    InvalidV {
        /// The v byte.
        v: u8,
    },
    /// `r` or `s` is zero or not below the curve order, or no key recovers (reason 1).
    #[error("signature does not recover any public key")]
    Unrecoverable,
    /// The signature is valid but by another key.
    #[error("signature is by {recovered}, expected {expected}")]
    WrongSigner {
        /// Whose signature was required.
        expected: Address,
        /// Whose signature it is.
        recovered: Address,
    },
    /// The local signer failed.
    #[error("signing failed: {0}")]
    Signing(String),
}

/// Signs `digest` with `signer`, returning the 65-byte `r || s || v` (v = 27 or 28,
/// low s) the contract takes.
fn sign_digest(signer: &PrivateKeySigner, digest: &B256) -> Result<Bytes, ProofError> {
    let sig = signer
        .sign_hash_sync(digest)
        .map_err(|e| ProofError::Signing(e.to_string()))?;
    // k256 produces low-s signatures already; normalising again costs nothing and keeps
    // the promise even if the backend changes.
    Ok(Bytes::copy_from_slice(&sig.normalized_s().as_bytes()))
}

/// Recovers the signer of `digest` with the contract's acceptance rules: exactly 65
/// bytes, `v` in {27, 28}, `0 < r < n`, `0 < s <= n/2`.
pub fn recover_signer(digest: &B256, signature: &[u8]) -> Result<Address, ProofError> {
    let raw: &[u8; SIGNATURE_LEN] =
        signature
            .try_into()
            .map_err(|_| ProofError::SignatureLength {
                len: signature.len(),
            })?;
    let r = U256::from_be_slice(&raw[..32]);
    let s = U256::from_be_slice(&raw[32..64]);
    let v = raw[64];
    if s > SECP256K1_N >> 1 {
        return Err(ProofError::HighS);
    }
    let parity = match v {
        27 => false,
        28 => true,
        _ => return Err(ProofError::InvalidV { v }),
    };
    if r.is_zero() || s.is_zero() || r >= SECP256K1_N {
        return Err(ProofError::Unrecoverable);
    }
    alloy::primitives::Signature::new(r, s, parity)
        .recover_address_from_prehash(digest)
        .map_err(|_| ProofError::Unrecoverable)
}

fn verify_digest(digest: &B256, signature: &[u8], expected: Address) -> Result<(), ProofError> {
    let recovered = recover_signer(digest, signature)?;
    if recovered == expected {
        Ok(())
    } else {
        Err(ProofError::WrongSigner {
            expected,
            recovered,
        })
    }
}

/// Signs a balance proof as the requester (`signer`). The result is what
/// `Centralizer.claim` takes as `signature`.
pub fn sign_balance_proof(
    signer: &PrivateKeySigner,
    domain: &ChannelDomain,
    proof: &BalanceProof,
) -> Result<Bytes, ProofError> {
    sign_digest(signer, &proof.digest(domain))
}

/// Checks that `signature` is `requester`'s valid signature of `proof` for `domain`,
/// with exactly the rules `Centralizer.claim` applies.
pub fn verify_balance_proof(
    domain: &ChannelDomain,
    proof: &BalanceProof,
    signature: &[u8],
    requester: Address,
) -> Result<(), ProofError> {
    verify_digest(&proof.digest(domain), signature, requester)
}

/// Signs a close consent as the provider (`signer`), for `Centralizer.cooperativeClose`.
pub fn sign_close_consent(
    signer: &PrivateKeySigner,
    domain: &ChannelDomain,
    consent: &CloseConsent,
) -> Result<Bytes, ProofError> {
    sign_digest(signer, &consent.digest(domain))
}

/// Checks that `signature` is `provider`'s valid signature of `consent` for `domain`.
pub fn verify_close_consent(
    domain: &ChannelDomain,
    consent: &CloseConsent,
    signature: &[u8],
    provider: Address,
) -> Result<(), ProofError> {
    verify_digest(&consent.digest(domain), signature, provider)
}

/// The id of the `nonce`-th channel of a Centralizer, opened by `requester` to
/// `provider`: `keccak256(abi.encode(chainId, centralizer, requester, provider, nonce))`.
pub fn channel_id_for(
    domain: &ChannelDomain,
    requester: Address,
    provider: Address,
    nonce: U256,
) -> B256 {
    keccak256(
        (
            U256::from(domain.chain_id),
            domain.centralizer,
            requester,
            provider,
            nonce,
        )
            .abi_encode_params(),
    )
}

/// How a payment to a provider is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeeSplit {
    /// Credited to the provider's `balance`.
    pub provider: U256,
    /// Credited to the treasury's `balance`.
    pub fee: U256,
}

/// The contract's fee rule: `fee = floor(paid * fee_bps / 10_000)`, the provider gets the
/// rest. `None` if `fee_bps` is above 10 000 (the contract caps it at [`MAX_FEE_BPS`]) or
/// the product overflows (impossible for 128-bit amounts, which is all the contract
/// holds).
pub fn fee_split(paid: U256, fee_bps: u16) -> Option<FeeSplit> {
    if fee_bps > BPS_DENOMINATOR {
        return None;
    }
    let fee = paid.checked_mul(U256::from(fee_bps))? / U256::from(BPS_DENOMINATOR);
    Some(FeeSplit {
        provider: paid - fee,
        fee,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn domain() -> ChannelDomain {
        ChannelDomain {
            chain_id: 31337,
            centralizer: Address::repeat_byte(0x42),
        }
    }

    fn key(n: u8) -> PrivateKeySigner {
        PrivateKeySigner::from_bytes(&B256::repeat_byte(n)).unwrap()
    }

    fn proof(amount: u64) -> BalanceProof {
        BalanceProof {
            channel_id: B256::repeat_byte(7),
            cumulative_amount: U256::from(amount),
        }
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let k = key(1);
        let sig = sign_balance_proof(&k, &domain(), &proof(5)).unwrap();
        assert_eq!(sig.len(), 65);
        assert!(matches!(sig[64], 27 | 28));
        verify_balance_proof(&domain(), &proof(5), &sig, k.address()).unwrap();
    }

    #[test]
    fn another_amount_chain_or_contract_does_not_verify() {
        let k = key(1);
        let sig = sign_balance_proof(&k, &domain(), &proof(5)).unwrap();
        let other_chain = ChannelDomain {
            chain_id: 1,
            ..domain()
        };
        let other_contract = ChannelDomain {
            centralizer: Address::repeat_byte(0x43),
            ..domain()
        };
        for (d, p) in [
            (domain(), proof(6)),
            (other_chain, proof(5)),
            (other_contract, proof(5)),
        ] {
            let err = verify_balance_proof(&d, &p, &sig, k.address()).unwrap_err();
            assert!(
                matches!(err, ProofError::WrongSigner { expected, .. } if expected == k.address())
            );
        }
    }

    #[test]
    fn malformed_signatures_are_refused_like_the_contract() {
        let k = key(1);
        let d = domain();
        let p = proof(5);
        let sig = sign_balance_proof(&k, &d, &p).unwrap().to_vec();

        for len in [0, 1, 64, 66, 130, 4096] {
            let mut s = sig.clone();
            s.resize(len, 0);
            let err = verify_balance_proof(&d, &p, &s, k.address()).unwrap_err();
            assert_eq!(err, ProofError::SignatureLength { len });
        }
        for v in [0u8, 1, 26, 29, 37, 255] {
            let mut s = sig.clone();
            s[64] = v;
            assert_eq!(
                verify_balance_proof(&d, &p, &s, k.address()).unwrap_err(),
                ProofError::InvalidV { v }
            );
        }
        // The malleable twin (n - s, flipped v) recovers the same key but is refused.
        let s_val = U256::from_be_slice(&sig[32..64]);
        let mut high = sig.clone();
        high[32..64].copy_from_slice(&(SECP256K1_N - s_val).to_be_bytes::<32>());
        high[64] = if sig[64] == 27 { 28 } else { 27 };
        assert_eq!(
            verify_balance_proof(&d, &p, &high, k.address()).unwrap_err(),
            ProofError::HighS
        );
        // r = 0, s = 0, r >= n.
        let mut zero_r = sig.clone();
        zero_r[..32].fill(0);
        assert_eq!(
            recover_signer(&p.digest(&d), &zero_r).unwrap_err(),
            ProofError::Unrecoverable
        );
        let mut zero_s = sig.clone();
        zero_s[32..64].fill(0);
        assert_eq!(
            recover_signer(&p.digest(&d), &zero_s).unwrap_err(),
            ProofError::Unrecoverable
        );
        let mut big_r = sig.clone();
        big_r[..32].fill(0xff);
        assert_eq!(
            recover_signer(&p.digest(&d), &big_r).unwrap_err(),
            ProofError::Unrecoverable
        );
    }

    #[test]
    fn close_consent_round_trips_and_binds_the_log_hash() {
        let k = key(3);
        let c = CloseConsent {
            channel_id: B256::repeat_byte(1),
            cumulative_amount: U256::from(9),
            log_hash: B256::repeat_byte(2),
        };
        let sig = sign_close_consent(&k, &domain(), &c).unwrap();
        verify_close_consent(&domain(), &c, &sig, k.address()).unwrap();
        let other = CloseConsent {
            log_hash: B256::repeat_byte(3),
            ..c
        };
        assert!(verify_close_consent(&domain(), &other, &sig, k.address()).is_err());
        // A balance proof signature is not a close consent (distinct type hashes).
        let bp = BalanceProof {
            channel_id: c.channel_id,
            cumulative_amount: c.cumulative_amount,
        };
        let bp_sig = sign_balance_proof(&k, &domain(), &bp).unwrap();
        assert!(verify_close_consent(&domain(), &c, &bp_sig, k.address()).is_err());
    }

    #[test]
    fn fee_split_known_values() {
        let s = fee_split(U256::from(10_001u64), 250).unwrap();
        assert_eq!(s.fee, U256::from(250u64)); // 250.025 rounds down
        assert_eq!(s.provider, U256::from(9_751u64));
        assert_eq!(fee_split(U256::from(3u64), 1_000).unwrap().fee, U256::ZERO);
        assert_eq!(fee_split(U256::from(1u64), 10_001), None);
        assert_eq!(fee_split(U256::MAX, 2), None);
    }

    #[test]
    fn balance_proof_json_is_strict() {
        let p = proof(12);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<BalanceProof>(&json).unwrap(), p);
        let extra = json.replace('}', r#","extra":1}"#);
        let err = serde_json::from_str::<BalanceProof>(&extra)
            .unwrap_err()
            .to_string();
        assert!(err.contains("extra"), "{err}");
        let bad = r#"{"channel_id":"0x12","cumulative_amount":"0x1"}"#;
        assert!(serde_json::from_str::<BalanceProof>(bad).is_err());
    }

    proptest! {
        #[test]
        fn fee_split_is_exact(paid in any::<u128>(), bps in 0u16..=10_000) {
            let s = fee_split(U256::from(paid), bps).unwrap();
            prop_assert_eq!(s.fee + s.provider, U256::from(paid));
            // fee = floor(paid * bps / 10^4)  <=>  fee * 10^4 <= paid * bps < (fee + 1) * 10^4
            let lhs = s.fee * U256::from(10_000u64);
            let prod = U256::from(paid) * U256::from(bps);
            prop_assert!(lhs <= prod && prod < lhs + U256::from(10_000u64));
        }

        #[test]
        fn any_signature_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = verify_balance_proof(&domain(), &proof(1), &bytes, Address::ZERO);
        }

        #[test]
        fn proofs_verify_for_any_amount(amount in any::<[u8; 32]>(), id in any::<[u8; 32]>()) {
            let k = key(9);
            let p = BalanceProof { channel_id: B256::from(id), cumulative_amount: U256::from_be_bytes(amount) };
            let sig = sign_balance_proof(&k, &domain(), &p).unwrap();
            prop_assert!(verify_balance_proof(&domain(), &p, &sig, k.address()).is_ok());
        }
    }
}
