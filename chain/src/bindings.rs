//! alloy bindings generated from the committed artifacts in `contracts/artifacts/`
//! (ABI and creation bytecode, so each binding also has a `deploy` function).

#![allow(missing_docs, unreachable_pub, clippy::too_many_arguments)]

use alloy::sol;

sol!(
    #[sol(rpc, all_derives)]
    IPSXToken,
    "../contracts/artifacts/IPSXToken.json"
);

sol!(
    #[sol(rpc, all_derives)]
    Centralizer,
    "../contracts/artifacts/Centralizer.json"
);
