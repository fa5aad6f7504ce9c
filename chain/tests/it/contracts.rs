//! The contracts on a real anvil: every case of QUALITY.md #22 and the channel rules.

#![allow(clippy::unwrap_used)]

use crate::common;

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider as _;
use alloy::sol_types::SolCall;
use common::{World, centralizer_err, tokens};
use ipsx_chain::bindings::Centralizer::{self, CentralizerErrors as E};
use ipsx_chain::bindings::IPSXToken;
use reentrant::ReentrantToken;

use ipsx_chain::{
    BalanceProof, ChainClient, ChannelDomain, CloseConsent, DeployParams, ProofError, Revert,
    channel_id_for, deploy, fee_split, sign_balance_proof, verify_balance_proof,
};

/// Hostile ERC20 that re-enters a target during transfers (the reentrancy tests), bound
/// here rather than in the library so the crates using the chain client do not compile it.
mod reentrant {
    #![allow(missing_docs, unreachable_pub, clippy::too_many_arguments)]
    alloy::sol!(
        #[sol(rpc, all_derives)]
        ReentrantToken,
        "../contracts/artifacts/ReentrantToken.json"
    );
}

fn proof(id: B256, amount: U256) -> BalanceProof {
    BalanceProof {
        channel_id: id,
        cumulative_amount: amount,
    }
}

#[tokio::test]
async fn token_has_fixed_supply_and_whitepaper_allocation() {
    let anvil = ipsx_chain::testing::Anvil::spawn().unwrap();
    let deployer = anvil.key(0);
    let mut p = DeployParams::all_to(deployer.address());
    p.funding = anvil.key(1).address();
    p.incentives = anvil.key(2).address();
    p.bounty = anvil.key(3).address();
    p.team = anvil.key(4).address();
    let r = deploy(anvil.endpoint(), deployer.clone(), &p)
        .await
        .unwrap();
    let c = ChainClient::connect(anvil.endpoint(), r.deployment, deployer)
        .await
        .unwrap();
    let token = c.token();
    assert_eq!(
        token.totalSupply().call().await.unwrap(),
        tokens("1800000000")
    );
    assert_eq!(token.decimals().call().await.unwrap(), 18);
    assert_eq!(token.symbol().call().await.unwrap(), "IPSX");
    for (who, amount) in [
        (p.funding, "900000000"),
        (p.incentives, "495000000"),
        (p.bounty, "45000000"),
        (p.team, "360000000"),
        (p.owner, "0"),
    ] {
        assert_eq!(
            c.token_balance(who).await.unwrap(),
            tokens(amount),
            "allocation of {who}"
        );
    }
    // No mint function exists after deployment.
    let artifact = include_str!("../../../contracts/artifacts/IPSXToken.json");
    let abi: serde_json::Value = serde_json::from_str(artifact).unwrap();
    let names: Vec<&str> = abi["abi"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert!(names.contains(&"transfer") && names.contains(&"permit"));
    assert!(
        !names.iter().any(|n| n.to_lowercase().contains("mint")),
        "{names:?}"
    );
    // A zero allocation address is refused by the constructor.
    let provider = anvil.wallet_provider(0).unwrap();
    let err = IPSXToken::deploy(&provider, p.funding, p.incentives, Address::ZERO, p.team)
        .await
        .unwrap_err();
    let decoded = err
        .as_decoded_interface_error::<IPSXToken::IPSXTokenErrors>()
        .unwrap();
    assert!(
        matches!(decoded, IPSXToken::IPSXTokenErrors::ZeroAllocationAddress(ref e) if e.index == U256::from(2)),
        "{decoded:?}"
    );
}

#[tokio::test]
async fn deposit_and_withdraw_and_their_refusals() {
    let w = World::new(2, 100, tokens("1000"), U256::ZERO).await;
    let u = &w.users[0];
    u.deposit(tokens("400")).await.unwrap();
    assert_eq!(u.balance(u.address()).await.unwrap(), tokens("400"));
    assert_eq!(u.token_balance(u.address()).await.unwrap(), tokens("600"));
    u.withdraw(tokens("150")).await.unwrap();
    assert_eq!(u.balance(u.address()).await.unwrap(), tokens("250"));
    assert_eq!(u.token_balance(u.address()).await.unwrap(), tokens("750"));
    w.assert_invariant().await;

    // Withdraw more than `balance` reverts and names wallet, available and requested.
    let err = u
        .withdraw(tokens("250.000000000000000001"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("insufficient balance"), "{err}");
    match err.centralizer_error().unwrap() {
        E::InsufficientBalance(e) => {
            assert_eq!(e.wallet, u.address());
            assert_eq!(e.available, tokens("250"));
            assert_eq!(e.requested, tokens("250.000000000000000001"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        centralizer_err(u.withdraw(U256::ZERO).await),
        E::ZeroAmount(_)
    ));
    assert!(matches!(
        centralizer_err(u.deposit(U256::ZERO).await),
        E::ZeroAmount(_)
    ));
    // Deposit beyond the wallet's tokens: the token's error comes back decoded.
    let err = u.deposit(tokens("751")).await.unwrap_err();
    assert!(matches!(err.revert(), Some(Revert::Token(_))), "{err}");
    assert!(
        err.to_string().contains("insufficient token balance"),
        "{err}"
    );
    // Deposit without allowance.
    let v = &w.users[1];
    v.approve(U256::ZERO).await.unwrap();
    let err = v.deposit(tokens("1")).await.unwrap_err();
    assert!(err.to_string().contains("insufficient allowance"), "{err}");
    // Withdraw from a wallet that never deposited.
    let err = w.treasury.withdraw(U256::from(1)).await.unwrap_err();
    assert!(matches!(
        err.centralizer_error(),
        Some(E::InsufficientBalance(_))
    ));
    w.assert_invariant().await;
}

#[tokio::test]
async fn permit_deposit_works_and_bad_permits_are_refused() {
    let w = World::new(2, 100, U256::ZERO, U256::ZERO).await;
    let u = &w.users[0];
    w.owner
        .transfer_tokens(u.address(), tokens("50"))
        .await
        .unwrap();
    let deadline = U256::from(u64::MAX);
    u.deposit_with_permit(tokens("20"), deadline).await.unwrap();
    assert_eq!(u.balance(u.address()).await.unwrap(), tokens("20"));
    assert_eq!(u.token_balance(u.address()).await.unwrap(), tokens("30"));
    // The permit's allowance was used up exactly; the nonce moved on.
    let token = u.token();
    assert_eq!(
        token
            .allowance(u.address(), w.deployment().centralizer)
            .call()
            .await
            .unwrap(),
        U256::ZERO
    );
    assert_eq!(
        token.nonces(u.address()).call().await.unwrap(),
        U256::from(1)
    );
    u.deposit_with_permit(tokens("5"), deadline).await.unwrap();
    assert_eq!(u.balance(u.address()).await.unwrap(), tokens("25"));

    // Expired permit.
    let err = u
        .deposit_with_permit(tokens("1"), U256::from(1))
        .await
        .unwrap_err();
    assert!(
        matches!(err.centralizer_error(), Some(E::PermitFailed(_))),
        "{err}"
    );
    // A permit signed by someone else (v's key) for u's tokens.
    let v_key = w.key(2);
    let sig = u
        .sign_permit(&v_key, tokens("1"), U256::from(2), deadline)
        .unwrap();
    let c = u.centralizer();
    let call = c.depositWithPermit(
        tokens("1"),
        deadline,
        if sig.v() { 28 } else { 27 },
        sig.r().into(),
        sig.s().into(),
    );
    let err = call.send().await.unwrap_err();
    let decoded = err.as_decoded_interface_error::<E>().unwrap();
    assert!(matches!(decoded, E::PermitFailed(_)), "{decoded:?}");
    assert_eq!(u.balance(u.address()).await.unwrap(), tokens("25"));
    w.assert_invariant().await;
}

#[tokio::test]
async fn rust_digests_and_ids_match_the_contract_bit_for_bit() {
    let w = World::new(2, 100, tokens("10"), tokens("10")).await;
    let c = w.owner.centralizer();
    let domain = w.deployment().domain();
    assert_eq!(
        c.domainSeparator().call().await.unwrap(),
        domain.separator()
    );
    let d = c.eip712Domain().call().await.unwrap();
    assert_eq!(d.name, "IPSX Centralizer");
    assert_eq!(d.version, "1");
    assert_eq!(d.chainId, U256::from(w.anvil.chain_id()));
    assert_eq!(d.verifyingContract, w.deployment().centralizer);
    for (i, amount) in [U256::ZERO, U256::from(1), tokens("12.345"), U256::MAX]
        .into_iter()
        .enumerate()
    {
        let id = B256::repeat_byte(i as u8 * 37 + 1);
        let p = proof(id, amount);
        assert_eq!(
            c.balanceProofDigest(id, amount).call().await.unwrap(),
            p.digest(&domain)
        );
        let consent = CloseConsent {
            channel_id: id,
            cumulative_amount: amount,
            log_hash: B256::repeat_byte(9),
        };
        assert_eq!(
            c.closeConsentDigest(id, amount, consent.log_hash)
                .call()
                .await
                .unwrap(),
            consent.digest(&domain)
        );
    }
    let (a, b) = (w.users[0].address(), w.users[1].address());
    let (id, _) = w.users[0].open_channel(b, tokens("1")).await.unwrap();
    assert_eq!(id, channel_id_for(&domain, a, b, U256::ZERO));
    assert_eq!(
        c.channelIdFor(a, b, U256::from(7)).call().await.unwrap(),
        channel_id_for(&domain, a, b, U256::from(7))
    );
}

#[tokio::test]
async fn proofs_for_another_chain_or_contract_revert() {
    let w = World::new(2, 100, tokens("100"), tokens("100")).await;
    let (req, prov) = (&w.users[0], &w.users[1]);
    let (id, _) = req
        .open_channel(prov.address(), tokens("10"))
        .await
        .unwrap();
    let amount = tokens("1");
    let req_key = w.key(1);
    let d = w.deployment().domain();

    let other_chain = ChannelDomain {
        chain_id: d.chain_id + 1,
        ..d
    };
    // A second, real Centralizer on the same chain.
    let mut p = DeployParams::all_to(w.key(0).address());
    p.challenge_period_secs = 600;
    let second = deploy(w.anvil.endpoint(), w.key(0), &p)
        .await
        .unwrap()
        .deployment;
    let other_contract = second.domain();
    for domain in [other_chain, other_contract] {
        let sig = sign_balance_proof(&req_key, &domain, &proof(id, amount)).unwrap();
        // Rust verification agrees with the contract.
        assert!(matches!(
            verify_balance_proof(&d, &proof(id, amount), &sig, req.address()),
            Err(ProofError::WrongSigner { .. })
        ));
        let err = prov
            .claim(&proof(id, amount), sig, B256::ZERO, false)
            .await
            .unwrap_err();
        match err.centralizer_error().unwrap() {
            E::WrongSigner(e) => assert_eq!(e.expected, req.address()),
            other => panic!("{other:?}"),
        }
    }
    // Signed by the wrong key (the provider itself).
    let sig = sign_balance_proof(&w.key(2), &d, &proof(id, amount)).unwrap();
    assert!(matches!(
        centralizer_err(prov.claim(&proof(id, amount), sig, B256::ZERO, false).await),
        E::WrongSigner(_)
    ));
    // The right proof works, and only for the provider.
    let sig = req.sign_balance_proof(id, amount).unwrap();
    let err = w.users[0]
        .claim(&proof(id, amount), sig.clone(), B256::ZERO, false)
        .await
        .unwrap_err();
    assert!(
        matches!(err.centralizer_error(), Some(E::NotProvider(_))),
        "{err}"
    );
    prov.claim(&proof(id, amount), sig, B256::ZERO, false)
        .await
        .unwrap();
    w.assert_invariant().await;
}

#[tokio::test]
async fn malformed_and_high_s_signatures_revert() {
    let w = World::new(2, 100, tokens("100"), tokens("100")).await;
    let (req, prov) = (&w.users[0], &w.users[1]);
    let (id, _) = req
        .open_channel(prov.address(), tokens("10"))
        .await
        .unwrap();
    let p = proof(id, tokens("1"));
    let good = req
        .sign_balance_proof(id, p.cumulative_amount)
        .unwrap()
        .to_vec();
    let n = U256::from_str_radix(
        "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",
        16,
    )
    .unwrap();

    let mut high_s = good.clone();
    let s = U256::from_be_slice(&good[32..64]);
    high_s[32..64].copy_from_slice(&(n - s).to_be_bytes::<32>());
    high_s[64] = if good[64] == 27 { 28 } else { 27 };
    let mut bad_v = good.clone();
    bad_v[64] = 29;
    let mut zero_r = good.clone();
    zero_r[..32].fill(0);
    let mut v01 = good.clone();
    v01[64] -= 27; // 0/1 parity instead of 27/28

    let cases: Vec<(Vec<u8>, u8)> = vec![
        (high_s, 3),
        (good[..64].to_vec(), 2),
        ([good.clone(), vec![0]].concat(), 2),
        (Vec::new(), 2),
        (vec![0xab; 10_000], 2),
        (bad_v, 1),
        (v01, 1),
        (zero_r, 1),
    ];
    for (sig, reason) in cases {
        let rust = verify_balance_proof(&w.deployment().domain(), &p, &sig, req.address());
        assert!(
            rust.is_err(),
            "Rust accepted a signature the contract refuses"
        );
        let err = prov
            .claim(&p, Bytes::from(sig.clone()), B256::ZERO, false)
            .await
            .unwrap_err();
        match err.centralizer_error().unwrap() {
            E::MalformedSignature(e) => {
                assert_eq!(e.reason, reason, "signature {}", Bytes::from(sig))
            }
            other => panic!("{other:?}"),
        }
    }
    // Random 65-byte strings never pass.
    for i in 0u8..5 {
        let mut sig = vec![i.wrapping_mul(91).wrapping_add(3); 65];
        sig[64] = 27 + (i % 2);
        sig[32] = 0x10; // keep s low
        let err = prov
            .claim(&p, Bytes::from(sig), B256::ZERO, false)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err.centralizer_error(),
                Some(E::WrongSigner(_) | E::MalformedSignature(_))
            ),
            "{err}"
        );
    }
    assert_eq!(req.reserved(req.address()).await.unwrap(), tokens("10"));
    prov.claim(&p, Bytes::from(good), B256::ZERO, false)
        .await
        .unwrap();
}

#[tokio::test]
async fn reentrancy_reverts() {
    let anvil = ipsx_chain::testing::Anvil::spawn().unwrap();
    let key = anvil.key(0);
    let provider = anvil.wallet_provider(0).unwrap();
    let supply = tokens("1000");
    let token = ReentrantToken::deploy(&provider, supply).await.unwrap();
    let c = Centralizer::deploy(
        &provider,
        *token.address(),
        key.address(),
        key.address(),
        0u16,
        600u64,
    )
    .await
    .unwrap();
    token
        .approve(*c.address(), U256::MAX)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    c.deposit(tokens("100"))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();

    // During withdraw's token transfer, the token calls withdraw again.
    let inner = Centralizer::withdrawCall {
        amount: tokens("10"),
    }
    .abi_encode();
    token
        .arm(*c.address(), inner.clone().into())
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let err = c.withdraw(tokens("10")).send().await.unwrap_err();
    let decoded = err.as_decoded_interface_error::<E>().unwrap();
    assert!(
        matches!(decoded, E::ReentrancyGuardReentrantCall(_)),
        "{decoded:?}"
    );

    // During deposit's transferFrom, the token calls openChannel.
    let inner = Centralizer::openChannelCall {
        provider: anvil.key(1).address(),
        amount: tokens("1"),
    }
    .abi_encode();
    token
        .arm(*c.address(), inner.into())
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let err = c.deposit(tokens("10")).send().await.unwrap_err();
    let decoded = err.as_decoded_interface_error::<E>().unwrap();
    assert!(
        matches!(decoded, E::ReentrancyGuardReentrantCall(_)),
        "{decoded:?}"
    );

    // Nothing moved.
    assert_eq!(
        c.balance(key.address()).call().await.unwrap(),
        tokens("100")
    );
    assert_eq!(
        token.balanceOf(*c.address()).call().await.unwrap(),
        tokens("100")
    );
}

#[tokio::test]
async fn claims_pay_with_fee_and_refuse_stale_or_excessive_proofs() {
    let w = World::new(2, 250, tokens("1000"), tokens("1000")).await;
    let (req, prov) = (&w.users[0], &w.users[1]);
    let (id, _) = req
        .open_channel(prov.address(), tokens("100"))
        .await
        .unwrap();
    assert_eq!(req.balance(req.address()).await.unwrap(), tokens("900"));
    assert_eq!(req.reserved(req.address()).await.unwrap(), tokens("100"));
    let log1 = B256::repeat_byte(0x11);

    let p40 = proof(id, tokens("40"));
    let s40 = req.sign_balance_proof(id, p40.cumulative_amount).unwrap();
    prov.claim(&p40, s40.clone(), log1, false).await.unwrap();
    let fee40 = fee_split(tokens("40"), 250).unwrap();
    assert_eq!(
        prov.balance(prov.address()).await.unwrap(),
        tokens("1000") + fee40.provider
    );
    assert_eq!(
        w.owner.balance(w.treasury.address()).await.unwrap(),
        fee40.fee
    );
    let ch = req.channel(id).await.unwrap().unwrap();
    assert_eq!(
        (ch.claimed, ch.log_hash, ch.settle_after),
        (tokens("40"), log1, None)
    );

    // Replaying the same proof, or an older one, reverts.
    assert!(matches!(
        centralizer_err(prov.claim(&p40, s40, log1, false).await),
        E::StaleProof(_)
    ));
    let p30 = proof(id, tokens("30"));
    let s30 = req.sign_balance_proof(id, p30.cumulative_amount).unwrap();
    match centralizer_err(prov.claim(&p30, s30.clone(), log1, true).await) {
        E::StaleProof(e) => assert_eq!(
            (e.claimed, e.cumulativeAmount),
            (tokens("40"), tokens("30"))
        ),
        other => panic!("{other:?}"),
    }
    // More than the deposit reverts, even with a valid signature.
    let p101 = proof(id, tokens("100.000000000000000001"));
    let s101 = req.sign_balance_proof(id, p101.cumulative_amount).unwrap();
    match centralizer_err(prov.claim(&p101, s101.clone(), log1, false).await) {
        E::ClaimExceedsDeposit(e) => assert_eq!(e.deposit, tokens("100")),
        other => panic!("{other:?}"),
    }
    // After a top-up the same proof is fine.
    req.top_up(id, tokens("1")).await.unwrap();
    assert!(matches!(
        centralizer_err(prov.top_up(id, tokens("1")).await),
        E::NotRequester(_)
    ));
    assert!(matches!(
        centralizer_err(req.top_up(id, U256::ZERO).await),
        E::ZeroAmount(_)
    ));
    assert!(matches!(
        centralizer_err(req.top_up(id, tokens("900")).await),
        E::InsufficientBalance(_)
    ));
    let log2 = B256::repeat_byte(0x22);
    prov.claim(&p101, s101, log2, true).await.unwrap();
    // Closed: the rest of the deposit (0.999999999999999999) is back in the requester's balance.
    assert_eq!(req.channel(id).await.unwrap(), None);
    assert_eq!(req.reserved(req.address()).await.unwrap(), U256::ZERO);
    assert_eq!(
        req.balance(req.address()).await.unwrap(),
        tokens("899") + tokens("0.999999999999999999")
    );
    let total = fee_split(tokens("40"), 250).unwrap().fee
        + fee_split(tokens("60.000000000000000001"), 250).unwrap().fee;
    assert_eq!(w.owner.balance(w.treasury.address()).await.unwrap(), total);
    // The channel is gone for every operation.
    assert!(matches!(
        centralizer_err(prov.claim(&p30, s30, log1, false).await),
        E::ChannelNotFound(_)
    ));
    assert!(matches!(
        centralizer_err(req.top_up(id, tokens("1")).await),
        E::ChannelNotFound(_)
    ));
    assert!(matches!(
        centralizer_err(req.start_close(id, U256::ZERO).await),
        E::ChannelNotFound(_)
    ));
    w.assert_invariant().await;
}

#[tokio::test]
async fn claim_events_carry_the_log_hash() {
    let w = World::new(2, 100, tokens("10"), tokens("10")).await;
    let (req, prov) = (&w.users[0], &w.users[1]);
    let (id, _) = req.open_channel(prov.address(), tokens("5")).await.unwrap();
    let log = B256::repeat_byte(0x5a);
    let sig = req.sign_balance_proof(id, tokens("2")).unwrap();
    let out = prov
        .claim(&proof(id, tokens("2")), sig, log, true)
        .await
        .unwrap();
    let receipt = w
        .anvil
        .provider()
        .unwrap()
        .get_transaction_receipt(out.tx_hash)
        .await
        .unwrap()
        .unwrap();
    let claimed = receipt
        .decoded_log::<Centralizer::ChannelClaimed>()
        .unwrap();
    assert_eq!(
        (claimed.channelId, claimed.logHash, claimed.paid),
        (id, log, tokens("2"))
    );
    assert_eq!(claimed.fee, fee_split(tokens("2"), 100).unwrap().fee);
    let closed = receipt.decoded_log::<Centralizer::ChannelClosed>().unwrap();
    assert_eq!(
        (closed.logHash, closed.refund, closed.claimed),
        (log, tokens("3"), tokens("2"))
    );
}

#[tokio::test]
async fn stale_uncooperative_close_loses_to_a_newer_proof_and_settle_once() {
    let w = World::new(2, 100, tokens("1000"), tokens("1000")).await;
    let (req, prov) = (&w.users[0], &w.users[1]);
    let (id, _) = req
        .open_channel(prov.address(), tokens("100"))
        .await
        .unwrap();
    let s60 = req.sign_balance_proof(id, tokens("60")).unwrap();

    // The requester closes claiming it owes only 30 (stale).
    req.start_close(id, tokens("30")).await.unwrap();
    let ch = req.channel(id).await.unwrap().unwrap();
    assert_eq!(ch.claimed, tokens("30"));
    let settle_after = ch.settle_after.unwrap();
    assert!(matches!(
        centralizer_err(req.top_up(id, tokens("1")).await),
        E::ChannelClosing(_)
    ));
    assert!(matches!(
        centralizer_err(req.start_close(id, tokens("30")).await),
        E::ChannelClosing(_)
    ));
    assert!(matches!(
        centralizer_err(prov.start_close(id, tokens("30")).await),
        E::NotRequester(_)
    ));
    match centralizer_err(req.settle(id).await) {
        E::ChallengePeriodActive(e) => assert_eq!(e.settleAfter, settle_after),
        other => panic!("{other:?}"),
    }
    // The provider answers inside the challenge period with the newer proof.
    w.anvil.advance_time(300).await.unwrap();
    let log = B256::repeat_byte(0x77);
    prov.claim(&proof(id, tokens("60")), s60, log, false)
        .await
        .unwrap();
    assert_eq!(
        req.channel(id).await.unwrap().unwrap().claimed,
        tokens("60")
    );
    // After the period, claims are over and settle works, exactly once.
    w.anvil.advance_time(301).await.unwrap();
    let s70 = req.sign_balance_proof(id, tokens("70")).unwrap();
    assert!(matches!(
        centralizer_err(prov.claim(&proof(id, tokens("70")), s70, log, false).await),
        E::ChallengePeriodOver(_)
    ));
    w.users[1].settle(id).await.unwrap(); // anyone may settle
    match centralizer_err(req.settle(id).await) {
        E::ChannelNotFound(e) => assert_eq!(e.channelId, id),
        other => panic!("{other:?}"),
    }
    let paid = fee_split(tokens("30"), 100).unwrap().provider
        + fee_split(tokens("30"), 100).unwrap().provider;
    assert_eq!(
        prov.balance(prov.address()).await.unwrap(),
        tokens("1000") + paid
    );
    assert_eq!(req.balance(req.address()).await.unwrap(), tokens("940"));
    assert_eq!(req.reserved(req.address()).await.unwrap(), U256::ZERO);
    // Settling a channel that is open (not closing) is refused too.
    let (id2, _) = req.open_channel(prov.address(), tokens("1")).await.unwrap();
    assert!(matches!(
        centralizer_err(req.settle(id2).await),
        E::ChannelNotClosing(_)
    ));
    w.assert_invariant().await;
}

#[tokio::test]
async fn cooperative_close_needs_the_providers_consent() {
    let w = World::new(3, 1000, tokens("100"), tokens("100")).await;
    let (req, prov, other) = (&w.users[0], &w.users[1], &w.users[2]);
    let (id, _) = req
        .open_channel(prov.address(), tokens("10"))
        .await
        .unwrap();
    let consent = CloseConsent {
        channel_id: id,
        cumulative_amount: tokens("3"),
        log_hash: B256::repeat_byte(3),
    };
    let by_other = other
        .sign_close_consent(id, consent.cumulative_amount, consent.log_hash)
        .unwrap();
    assert!(matches!(
        centralizer_err(req.cooperative_close(&consent, by_other).await),
        E::WrongSigner(_)
    ));
    let sig = prov
        .sign_close_consent(id, consent.cumulative_amount, consent.log_hash)
        .unwrap();
    // Consent for another log hash does not verify.
    let tampered = CloseConsent {
        log_hash: B256::repeat_byte(4),
        ..consent
    };
    assert!(matches!(
        centralizer_err(req.cooperative_close(&tampered, sig.clone()).await),
        E::WrongSigner(_)
    ));
    assert!(matches!(
        centralizer_err(prov.cooperative_close(&consent, sig.clone()).await),
        E::NotRequester(_)
    ));
    req.cooperative_close(&consent, sig).await.unwrap();
    assert_eq!(req.channel(id).await.unwrap(), None);
    assert_eq!(req.balance(req.address()).await.unwrap(), tokens("97"));
    assert_eq!(prov.balance(prov.address()).await.unwrap(), tokens("102.7"));
    assert_eq!(
        w.owner.balance(w.treasury.address()).await.unwrap(),
        tokens("0.3")
    );
    w.assert_invariant().await;
}

#[tokio::test]
async fn open_channel_checks_its_arguments() {
    let w = World::new(2, 100, tokens("10"), tokens("10")).await;
    let (req, prov) = (&w.users[0], &w.users[1]);
    assert!(matches!(
        centralizer_err(req.open_channel(Address::ZERO, tokens("1")).await),
        E::InvalidProvider(_)
    ));
    assert!(matches!(
        centralizer_err(req.open_channel(req.address(), tokens("1")).await),
        E::InvalidProvider(_)
    ));
    assert!(matches!(
        centralizer_err(req.open_channel(prov.address(), U256::ZERO).await),
        E::ZeroAmount(_)
    ));
    assert!(matches!(
        centralizer_err(req.open_channel(prov.address(), tokens("10.1")).await),
        E::InsufficientBalance(_)
    ));
    assert!(matches!(
        centralizer_err(req.open_channel(prov.address(), U256::MAX).await),
        E::AmountTooLarge(_)
    ));
    assert!(matches!(
        centralizer_err(req.top_up(B256::repeat_byte(1), tokens("1")).await),
        E::ChannelNotFound(_)
    ));
    assert_eq!(req.channel(B256::repeat_byte(1)).await.unwrap(), None);
    let (id1, _) = req.open_channel(prov.address(), tokens("4")).await.unwrap();
    let (id2, _) = req.open_channel(prov.address(), tokens("6")).await.unwrap();
    assert_ne!(id1, id2);
    assert_eq!(req.balance(req.address()).await.unwrap(), U256::ZERO);
    assert_eq!(
        req.channel_ids_of(req.address()).await.unwrap(),
        vec![id1, id2]
    );
    assert_eq!(
        prov.channel_ids_of(prov.address()).await.unwrap(),
        vec![id1, id2]
    );
    assert!(
        w.owner
            .channel_ids_of(w.owner.address())
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn owner_sets_fee_within_the_cap() {
    let w = World::new(2, 0, tokens("100"), tokens("100")).await;
    assert!(matches!(
        centralizer_err(w.owner.set_fee(1001).await),
        E::InvalidParameter(_)
    ));
    assert!(matches!(
        centralizer_err(w.users[0].set_fee(10).await),
        E::OwnableUnauthorizedAccount(_)
    ));
    assert!(matches!(
        centralizer_err(w.owner.set_treasury(Address::ZERO).await),
        E::InvalidParameter(_)
    ));
    assert!(matches!(
        centralizer_err(w.users[0].set_treasury(w.users[0].address()).await),
        E::OwnableUnauthorizedAccount(_)
    ));
    w.owner.set_fee(1000).await.unwrap();
    assert_eq!(w.owner.fee_bps().await.unwrap(), 1000);
    let (req, prov) = (&w.users[0], &w.users[1]);
    let (id, _) = req
        .open_channel(prov.address(), tokens("10"))
        .await
        .unwrap();
    let sig = req.sign_balance_proof(id, tokens("10")).unwrap();
    prov.claim(&proof(id, tokens("10")), sig, B256::ZERO, false)
        .await
        .unwrap();
    assert_eq!(
        w.owner.balance(w.treasury.address()).await.unwrap(),
        tokens("1")
    );
    // The treasury withdraws its fees like any wallet.
    w.treasury.withdraw(tokens("1")).await.unwrap();
    assert_eq!(
        w.owner.token_balance(w.treasury.address()).await.unwrap(),
        tokens("1")
    );
    w.assert_invariant().await;

    // Constructor arguments are checked.
    let provider = w.anvil.wallet_provider(0).unwrap();
    let token = w.deployment().token;
    let me = w.key(0).address();
    for (args, field) in [
        ((me, me, me, 100u16, 600u64), "token"),
        ((token, me, Address::ZERO, 100, 600), "treasury"),
        ((token, me, me, 1001, 600), "feeBps"),
        ((token, me, me, 100, 0), "challengePeriod"),
        ((token, me, me, 100, 30 * 86_400 + 1), "challengePeriod"),
    ] {
        let err = Centralizer::deploy(&provider, args.0, args.1, args.2, args.3, args.4)
            .await
            .unwrap_err();
        match err.as_decoded_interface_error::<E>() {
            Some(E::InvalidParameter(e)) => assert_eq!(e.field, field),
            other => panic!("{field}: {other:?}"),
        }
    }
}
