//! Checking a requester's balance proof before serving on it (sans-IO): the channel
//! exists on chain and is not closing, it runs from the deal's requester to us, its
//! deposit covers the amount, and the signature is the requester's for this chain and
//! this Centralizer, under exactly the contract's rules (so what we accept we can claim).

use alloy_primitives::{Address, U256, hex};
use ipsx_chain::{BalanceProof, ChannelDomain, verify_balance_proof};
use ipsx_exchange_client::BalanceProof as StoredProof;

use super::core::{ChannelFacts, VerifiedProof};

/// Longest signature text accepted (`0x` + 130 hex digits, with room for nothing else).
const MAX_SIGNATURE_TEXT: usize = 132;

/// Checks `proof` for deal `deal_id` paid by `requester` to `us`, against `channel` as
/// read from the chain (`None`: no such channel). The error says what is wrong.
pub fn check_proof(
    domain: &ChannelDomain,
    us: Address,
    requester: Address,
    deal_id: u64,
    proof: &StoredProof,
    channel: Option<ChannelFacts>,
) -> Result<VerifiedProof, String> {
    if proof.deal_id != deal_id {
        return Err(format!(
            "proof is for deal {}, not {deal_id}",
            proof.deal_id
        ));
    }
    if proof.signature.len() > MAX_SIGNATURE_TEXT {
        return Err("signature: too long".into());
    }
    let signature = hex::decode(proof.signature.trim_start_matches("0x"))
        .map_err(|e| format!("signature: not hex ({e})"))?;
    let Some(channel) = channel else {
        return Err(format!(
            "channel {} does not exist on chain (or is closed)",
            proof.channel_id
        ));
    };
    if channel.id != proof.channel_id {
        return Err(format!(
            "channel {} was read for {}",
            channel.id, proof.channel_id
        ));
    }
    if channel.requester != requester {
        return Err(format!(
            "channel {} is opened by {}, not the deal's requester {requester}",
            channel.id, channel.requester
        ));
    }
    if channel.provider != us {
        return Err(format!(
            "channel {} pays {}, not us ({us})",
            channel.id, channel.provider
        ));
    }
    if channel.closing {
        return Err(format!("channel {} is closing", channel.id));
    }
    if channel.deposit < proof.cumulative_amount {
        return Err(format!(
            "channel {} holds {}, less than the proof's {}",
            channel.id, channel.deposit, proof.cumulative_amount
        ));
    }
    if proof.cumulative_amount < channel.claimed {
        return Err(format!(
            "proof of {} is below the {} already claimed",
            proof.cumulative_amount, channel.claimed
        ));
    }
    let bp = BalanceProof {
        channel_id: proof.channel_id,
        cumulative_amount: U256::from(proof.cumulative_amount),
    };
    verify_balance_proof(domain, &bp, &signature, requester)
        .map_err(|e| format!("signature: {e}"))?;
    Ok(VerifiedProof {
        channel,
        amount: proof.cumulative_amount,
        signature,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use alloy_primitives::B256;
    use alloy_signer_local::PrivateKeySigner;
    use ipsx_chain::sign_balance_proof;

    fn setup() -> (ChannelDomain, PrivateKeySigner, Address, ChannelFacts) {
        let domain = ChannelDomain {
            chain_id: 31337,
            centralizer: Address::repeat_byte(0x42),
        };
        let requester = PrivateKeySigner::random();
        let us = Address::repeat_byte(0xbb);
        let ch = ChannelFacts {
            id: B256::repeat_byte(7),
            requester: requester.address(),
            provider: us,
            deposit: 1000,
            claimed: 0,
            closing: false,
        };
        (domain, requester, us, ch)
    }

    fn signed(
        domain: &ChannelDomain,
        key: &PrivateKeySigner,
        ch: B256,
        amount: u128,
    ) -> StoredProof {
        let sig = sign_balance_proof(
            key,
            domain,
            &BalanceProof {
                channel_id: ch,
                cumulative_amount: U256::from(amount),
            },
        )
        .unwrap();
        StoredProof {
            deal_id: 3,
            channel_id: ch,
            cumulative_amount: amount,
            signature: format!("0x{}", hex::encode(&sig)),
        }
    }

    #[test]
    fn a_good_proof_passes() {
        let (d, k, us, ch) = setup();
        let p = signed(&d, &k, ch.id, 500);
        let v = check_proof(&d, us, k.address(), 3, &p, Some(ch.clone())).unwrap();
        assert_eq!(v.amount, 500);
        assert_eq!(v.channel, ch);
        assert_eq!(v.signature.len(), 65);
    }

    #[test]
    fn every_bad_proof_is_refused_with_its_reason() {
        let (d, k, us, ch) = setup();
        let good = signed(&d, &k, ch.id, 500);
        let req = k.address();
        let check = |p: &StoredProof, c: Option<ChannelFacts>| {
            check_proof(&d, us, req, 3, p, c).unwrap_err()
        };

        assert!(check(&good, None).contains("does not exist"));
        let other = PrivateKeySigner::random();
        assert!(check(&signed(&d, &other, ch.id, 500), Some(ch.clone())).contains("signature"));
        let foreign = ChannelDomain {
            chain_id: 1,
            centralizer: d.centralizer,
        };
        assert!(check(&signed(&foreign, &k, ch.id, 500), Some(ch.clone())).contains("signature"));
        let mut c = ch.clone();
        c.provider = Address::repeat_byte(1);
        assert!(check(&good, Some(c)).contains("not us"));
        let mut c = ch.clone();
        c.requester = Address::repeat_byte(1);
        assert!(check(&good, Some(c)).contains("not the deal's requester"));
        let mut c = ch.clone();
        c.deposit = 499;
        assert!(check(&good, Some(c)).contains("less than"));
        let mut c = ch.clone();
        c.closing = true;
        assert!(check(&good, Some(c)).contains("closing"));
        let mut c = ch.clone();
        c.claimed = 600;
        assert!(check(&good, Some(c)).contains("already claimed"));
        let mut c = ch.clone();
        c.id = B256::repeat_byte(8);
        assert!(check(&good, Some(c)).contains("was read for"));
        let mut p = good.clone();
        p.deal_id = 4;
        assert!(check(&p, Some(ch.clone())).contains("deal 4"));
        for bad in [
            "",
            "0x",
            "zz",
            "0x1234",
            &"ab".repeat(65),
            &"0".repeat(4000),
        ] {
            let mut p = good.clone();
            p.signature = bad.to_owned();
            assert!(
                check(&p, Some(ch.clone())).contains("signature"),
                "{bad:.20}"
            );
        }
        // A tampered amount no longer matches the signature.
        let mut p = good.clone();
        p.cumulative_amount = 501;
        assert!(check(&p, Some(ch.clone())).contains("signature"));
    }
}
