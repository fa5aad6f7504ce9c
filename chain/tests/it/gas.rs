//! Gas used by each operation, measured from receipts on anvil, printed as a table
//! (`cargo test -p ipsx-exchange-client --test gas -- --nocapture`).

#![allow(clippy::unwrap_used)]

use crate::common;

use alloy::primitives::{B256, U256};
use common::{World, tokens};
use ipsx_chain::{BalanceProof, CloseConsent};

#[tokio::test]
async fn gas_table() {
    let w = World::new(2, 100, tokens("1000"), U256::ZERO).await;
    let (req, prov) = (&w.users[0], &w.users[1]);
    let mut rows: Vec<(&str, u64)> = vec![
        ("deploy IPSXToken", w.report.token_tx.gas_used),
        ("deploy Centralizer", w.report.centralizer_tx.gas_used),
    ];
    rows.push((
        "deposit (first, after approve)",
        req.deposit(tokens("500")).await.unwrap().gas_used,
    ));
    rows.push((
        "deposit (again)",
        req.deposit(tokens("100")).await.unwrap().gas_used,
    ));
    let permit = prov
        .deposit_with_permit(tokens("10"), U256::MAX)
        .await
        .unwrap();
    rows.push(("depositWithPermit (first)", permit.gas_used));
    rows.push((
        "withdraw",
        req.withdraw(tokens("1")).await.unwrap().gas_used,
    ));
    let (id, open) = req
        .open_channel(prov.address(), tokens("100"))
        .await
        .unwrap();
    rows.push(("openChannel (first)", open.gas_used));
    rows.push((
        "topUp",
        req.top_up(id, tokens("10")).await.unwrap().gas_used,
    ));
    let claim = |cum: U256, close: bool| {
        let sig = req.sign_balance_proof(id, cum).unwrap();
        async move {
            let p = BalanceProof {
                channel_id: id,
                cumulative_amount: cum,
            };
            prov.claim(&p, sig, B256::repeat_byte(1), close)
                .await
                .unwrap()
                .gas_used
        }
    };
    rows.push(("claim (first)", claim(tokens("1"), false).await));
    rows.push(("claim (next)", claim(tokens("2"), false).await));
    rows.push(("claim + close", claim(tokens("3"), true).await));

    let (id2, open2) = req
        .open_channel(prov.address(), tokens("10"))
        .await
        .unwrap();
    rows.push(("openChannel (next)", open2.gas_used));
    let consent = CloseConsent {
        channel_id: id2,
        cumulative_amount: tokens("4"),
        log_hash: B256::repeat_byte(2),
    };
    let sig = prov
        .sign_close_consent(id2, consent.cumulative_amount, consent.log_hash)
        .unwrap();
    rows.push((
        "cooperativeClose",
        req.cooperative_close(&consent, sig).await.unwrap().gas_used,
    ));

    let (id3, _) = req
        .open_channel(prov.address(), tokens("10"))
        .await
        .unwrap();
    rows.push((
        "startClose (pays 5)",
        req.start_close(id3, tokens("5")).await.unwrap().gas_used,
    ));
    w.anvil.advance_time(601).await.unwrap();
    rows.push(("settle", req.settle(id3).await.unwrap().gas_used));

    println!("| operation | gas |\n|---|---:|");
    for (op, gas) in &rows {
        println!("| {op} | {gas} |");
        assert!(*gas > 21_000, "{op}: {gas}");
        let cap = if op.starts_with("deploy") {
            3_000_000
        } else {
            200_000
        };
        assert!(*gas < cap, "{op} uses {gas} gas, above {cap}");
    }
}
