//! `ipsx wallet` and `ipsx chain` run as library functions against a real anvil.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use alloy::primitives::{Address, B256, U256};
use ipsx_chain::cli::{
    ChainArgs, ChainCommand, CliError, DeployArgs, KeyArgs, NetArgs, WalletArgs, WalletCommand,
    run_chain_to, run_wallet_to,
};
use ipsx_chain::testing::Anvil;
use ipsx_chain::{ChainClient, ChainError, Deployment, parse_tokens};

struct Env {
    dir: tempfile::TempDir,
    anvil: Anvil,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw.txt"), "correct horse\n").unwrap();
        std::fs::write(dir.path().join("bad-pw.txt"), "wrong\n").unwrap();
        Self {
            dir,
            anvil: Anvil::spawn().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn key(&self, keystore: &str) -> KeyArgs {
        KeyArgs {
            keystore: self.path(keystore),
            password_file: Some(self.path("pw.txt")),
            password_env: "IPSX_TEST_PASSWORD_NEVER_SET".into(),
            private_key_env: None,
        }
    }

    fn net(&self) -> NetArgs {
        NetArgs {
            rpc_url: self.anvil.endpoint().to_owned(),
            deployment: self.path("deployment.json"),
            tx_timeout: 60,
            quiet: true,
        }
    }

    async fn wallet_with(
        &self,
        key: KeyArgs,
        net: NetArgs,
        command: WalletCommand,
    ) -> Result<String, CliError> {
        let mut out = Vec::new();
        run_wallet_to(WalletArgs { key, net, command }, &mut out).await?;
        Ok(String::from_utf8(out).unwrap())
    }

    async fn wallet(&self, keystore: &str, command: WalletCommand) -> Result<String, CliError> {
        self.wallet_with(self.key(keystore), self.net(), command)
            .await
    }

    /// Imports anvil dev key `i` into `keystore`.
    async fn import(&self, i: usize, keystore: &str) -> String {
        let key_file = self.path(&format!("key{i}.txt"));
        std::fs::write(
            &key_file,
            format!("0x{}\n", hex(&self.anvil.key(i).to_bytes().0)),
        )
        .unwrap();
        self.wallet(
            keystore,
            WalletCommand::Import {
                private_key_file: key_file,
            },
        )
        .await
        .unwrap()
    }

    fn deploy_args(&self, keystore: &str) -> DeployArgs {
        DeployArgs {
            key: self.key(keystore),
            rpc_url: self.anvil.endpoint().to_owned(),
            out: self.path("deployment.json"),
            force: false,
            funding: None,
            incentives: None,
            bounty: None,
            team: None,
            owner: None,
            treasury: None,
            fee_bps: 100,
            challenge_period: 600,
            quiet: true,
        }
    }

    async fn deploy(&self, keystore: &str) -> Result<String, CliError> {
        let mut out = Vec::new();
        let args = ChainArgs {
            command: ChainCommand::Deploy(self.deploy_args(keystore)),
        };
        run_chain_to(args, &mut out).await?;
        Ok(String::from_utf8(out).unwrap())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn tokens(s: &str) -> U256 {
    parse_tokens(s).unwrap()
}

fn amount_of(out: &str, label: &str) -> String {
    let line = out
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("{label} in {out}"));
    line.split_whitespace().nth(1).unwrap().to_owned()
}

#[tokio::test]
async fn keystore_create_import_and_address_never_print_the_key() {
    let env = Env::new();
    let out = env.wallet("new.json", WalletCommand::Create).await.unwrap();
    let addr: Address = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let shown = env
        .wallet("new.json", WalletCommand::Address)
        .await
        .unwrap();
    assert_eq!(shown.trim().parse::<Address>().unwrap(), addr);
    // Never overwritten.
    let err = env
        .wallet("new.json", WalletCommand::Create)
        .await
        .unwrap_err();
    assert!(matches!(err, CliError::KeystoreExists { .. }), "{err}");

    let out = env.import(3, "dev3.json").await;
    let key_hex = hex(&env.anvil.key(3).to_bytes().0);
    assert!(out.contains(&env.anvil.key(3).address().to_string()));
    assert!(!out.contains(&key_hex));
    let file = std::fs::read_to_string(env.path("dev3.json")).unwrap();
    assert!(
        !file.to_lowercase().contains(&key_hex),
        "keystore holds the key in clear"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(env.path("dev3.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keystore readable by others: {mode:o}");
    }

    // Wrong password, no password, missing keystore: each named.
    let mut k = env.key("dev3.json");
    k.password_file = Some(env.path("bad-pw.txt"));
    let err = env
        .wallet_with(k, env.net(), WalletCommand::Address)
        .await
        .unwrap_err();
    assert!(matches!(err, CliError::KeystoreDecrypt { .. }), "{err}");
    assert!(err.to_string().contains("dev3.json"));
    let mut k = env.key("dev3.json");
    k.password_file = None;
    let err = env
        .wallet_with(k, env.net(), WalletCommand::Address)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("IPSX_TEST_PASSWORD_NEVER_SET"),
        "{err}"
    );
    let err = env
        .wallet("missing.json", WalletCommand::Address)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("missing.json") && err.to_string().contains("wallet create"),
        "{err}"
    );

    // Hostile keystores: huge file, absurd scrypt cost, not JSON.
    std::fs::write(env.path("huge.json"), vec![b' '; 100_000]).unwrap();
    let err = env
        .wallet("huge.json", WalletCommand::Address)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a keystore"), "{err}");
    let hostile = file.replace("\"n\":8192", "\"n\":1073741824");
    assert_ne!(hostile, file, "keystore format changed: {file}");
    std::fs::write(env.path("hostile.json"), hostile).unwrap();
    let err = env
        .wallet("hostile.json", WalletCommand::Address)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("scrypt n"), "{err}");
    std::fs::write(env.path("garbage.json"), "{{{").unwrap();
    let err = env
        .wallet("garbage.json", WalletCommand::Address)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not JSON"), "{err}");

    // Bad private-key files.
    std::fs::write(env.path("badkey.txt"), "0x1234").unwrap();
    let err = env
        .wallet(
            "other.json",
            WalletCommand::Import {
                private_key_file: env.path("badkey.txt"),
            },
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("badkey.txt") && err.to_string().contains("64 hex digits"),
        "{err}"
    );
    assert!(!env.path("other.json").exists());
}

#[tokio::test]
async fn deploy_then_deposit_withdraw_list_and_close() {
    let env = Env::new();
    env.import(0, "deployer.json").await;
    let out = env.deploy("deployer.json").await.unwrap();
    assert!(
        out.contains("Centralizer") && out.contains("wrote"),
        "{out}"
    );
    let d = Deployment::load(&env.path("deployment.json")).unwrap();
    assert_eq!(d.chain_id, env.anvil.chain_id());
    assert_eq!(d.challenge_period_secs, 600);
    // The file is not silently replaced.
    let err = env.deploy("deployer.json").await.unwrap_err();
    assert!(matches!(err, CliError::DeploymentExists { .. }), "{err}");

    let owner = ChainClient::connect(env.anvil.endpoint(), d, env.anvil.key(0))
        .await
        .unwrap();
    env.import(1, "user.json").await;
    let user = env.anvil.key(1).address();
    owner.transfer_tokens(user, tokens("500")).await.unwrap();

    let out = env
        .wallet(
            "user.json",
            WalletCommand::Deposit {
                amount: tokens("100"),
                approve: false,
            },
        )
        .await
        .unwrap();
    assert!(
        out.contains("deposited 100 IPSX") && out.contains("balance 100 IPSX"),
        "{out}"
    );
    let out = env
        .wallet(
            "user.json",
            WalletCommand::Deposit {
                amount: tokens("0.5"),
                approve: true,
            },
        )
        .await
        .unwrap();
    assert!(out.contains("balance 100.5 IPSX"), "{out}");

    // Withdrawing too much names the wallet and both amounts.
    let err = env
        .wallet(
            "user.json",
            WalletCommand::Withdraw {
                amount: tokens("1000"),
            },
        )
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("insufficient balance") && msg.contains("100.5") && msg.contains("1000"),
        "{msg}"
    );
    // Depositing more tokens than the wallet holds names that too.
    let err = env
        .wallet(
            "user.json",
            WalletCommand::Deposit {
                amount: tokens("1000"),
                approve: true,
            },
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("insufficient token balance"),
        "{err}"
    );
    env.wallet(
        "user.json",
        WalletCommand::Withdraw {
            amount: tokens("20.5"),
        },
    )
    .await
    .unwrap();

    let out = env
        .wallet("user.json", WalletCommand::Balances { of: None })
        .await
        .unwrap();
    assert_eq!(amount_of(&out, "token"), "420");
    assert_eq!(amount_of(&out, "balance"), "80");
    assert_eq!(amount_of(&out, "reserved"), "0");

    // A channel opened by the user shows up in both wallets' lists.
    let user_client = ChainClient::connect(env.anvil.endpoint(), d, env.anvil.key(1))
        .await
        .unwrap();
    let provider = env.anvil.key(2).address();
    let (id, _) = user_client
        .open_channel(provider, tokens("30"))
        .await
        .unwrap();
    let out = env
        .wallet("user.json", WalletCommand::Channels)
        .await
        .unwrap();
    assert!(
        out.contains(&id.to_string()) && out.contains(" out ") && out.contains("open"),
        "{out}"
    );
    env.import(2, "provider.json").await;
    let out = env
        .wallet("provider.json", WalletCommand::Channels)
        .await
        .unwrap();
    assert!(out.contains(" in ") && out.contains("deposit 30"), "{out}");
    // The provider cannot close from the CLI (it needs the requester's proof).
    let err = env
        .wallet(
            "provider.json",
            WalletCommand::Close {
                channel: id,
                amount: None,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, CliError::ProviderClose { .. }), "{err}");
    // A third wallet is told it has nothing to do with the channel.
    env.import(3, "stranger.json").await;
    let err = env
        .wallet(
            "stranger.json",
            WalletCommand::Close {
                channel: id,
                amount: None,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, CliError::NotYourChannel { .. }), "{err}");

    // Close: start, refused settle inside the challenge period, settle after it.
    let out = env
        .wallet(
            "user.json",
            WalletCommand::Close {
                channel: id,
                amount: Some(tokens("1")),
            },
        )
        .await
        .unwrap();
    assert!(out.contains("close started"), "{out}");
    let err = env
        .wallet(
            "user.json",
            WalletCommand::Close {
                channel: id,
                amount: None,
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("challenge period"), "{err}");
    env.anvil.advance_time(601).await.unwrap();
    let out = env
        .wallet(
            "user.json",
            WalletCommand::Close {
                channel: id,
                amount: None,
            },
        )
        .await
        .unwrap();
    assert!(out.contains("settled") && out.contains("29 IPSX"), "{out}");
    let out = env
        .wallet("user.json", WalletCommand::Channels)
        .await
        .unwrap();
    assert!(out.contains(&format!("{id} closed")), "{out}");
    let err = env
        .wallet(
            "user.json",
            WalletCommand::Close {
                channel: id,
                amount: None,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, CliError::ChannelNotFound { .. }), "{err}");
    let out = env
        .wallet("user.json", WalletCommand::Balances { of: None })
        .await
        .unwrap();
    assert_eq!(amount_of(&out, "balance"), "79");

    // A permit deposit follows the chain's clock, even two days ahead of ours.
    env.anvil.advance_time(2 * 86_400).await.unwrap();
    let out = env
        .wallet(
            "user.json",
            WalletCommand::Deposit {
                amount: tokens("1"),
                approve: false,
            },
        )
        .await
        .unwrap();
    assert!(out.contains("balance 80 IPSX"), "{out}");

    // chain info reads the same deployment.
    let mut out = Vec::new();
    run_chain_to(
        ChainArgs {
            command: ChainCommand::Info { net: env.net() },
        },
        &mut out,
    )
    .await
    .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("fee               100 bps") && out.contains(&d.centralizer.to_string()),
        "{out}"
    );
}

fn write_deployment(path: &Path, d: &Deployment) {
    d.save(path).unwrap();
}

#[tokio::test]
async fn errors_name_the_chain_the_contract_and_the_endpoint() {
    let env = Env::new();
    env.import(0, "deployer.json").await;
    env.deploy("deployer.json").await.unwrap();
    let real = Deployment::load(&env.path("deployment.json")).unwrap();

    // Wrong chain id.
    let mut net = env.net();
    net.deployment = env.path("other-chain.json");
    write_deployment(
        &net.deployment,
        &Deployment {
            chain_id: real.chain_id + 1,
            ..real
        },
    );
    let err = env
        .wallet_with(
            env.key("deployer.json"),
            net,
            WalletCommand::Balances { of: None },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, CliError::Chain(ChainError::WrongChainId { expected, actual }) if expected == real.chain_id + 1 && actual == real.chain_id),
        "{err}"
    );
    assert!(err.to_string().contains("wrong chain id"));

    // No contract at the address.
    let mut net = env.net();
    net.deployment = env.path("nowhere.json");
    let nowhere = Address::repeat_byte(0x5a);
    write_deployment(
        &net.deployment,
        &Deployment {
            centralizer: nowhere,
            ..real
        },
    );
    let err = env
        .wallet_with(
            env.key("deployer.json"),
            net,
            WalletCommand::Balances { of: None },
        )
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("Centralizer not deployed at") && msg.contains(&nowhere.to_string()),
        "{msg}"
    );

    // Nothing listening at the RPC URL (a port we just had and released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut net = env.net();
    net.rpc_url = format!("http://127.0.0.1:{port}");
    let err = env
        .wallet_with(
            env.key("deployer.json"),
            net,
            WalletCommand::Balances { of: None },
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );

    // Not an http URL.
    let mut net = env.net();
    net.rpc_url = "ftp://127.0.0.1/".into();
    let err = env
        .wallet_with(
            env.key("deployer.json"),
            net,
            WalletCommand::Balances { of: None },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid RPC URL"), "{err}");

    // A broken deployment file names the field.
    let mut net = env.net();
    net.deployment = env.path("broken.json");
    std::fs::write(&net.deployment, r#"{"chain_id":1,"token":"0x12"}"#).unwrap();
    let err = env
        .wallet_with(
            env.key("deployer.json"),
            net,
            WalletCommand::Balances { of: None },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("broken.json"), "{err}");

    // Deploy parameters are checked before anything is sent.
    let mut args = env.deploy_args("deployer.json");
    args.force = true;
    args.fee_bps = 1001;
    let mut out = Vec::new();
    let err = run_chain_to(
        ChainArgs {
            command: ChainCommand::Deploy(args),
        },
        &mut out,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("`fee_bps`"), "{err}");
    let mut args = env.deploy_args("deployer.json");
    args.force = true;
    args.treasury = Some(Address::ZERO);
    let err = run_chain_to(
        ChainArgs {
            command: ChainCommand::Deploy(args),
        },
        &mut out,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("`treasury`"), "{err}");

    // A wallet with no gas money cannot deposit: the RPC error is reported, not hidden.
    env.wallet("poor.json", WalletCommand::Create)
        .await
        .unwrap();
    let err = env
        .wallet(
            "poor.json",
            WalletCommand::Deposit {
                amount: tokens("1"),
                approve: true,
            },
        )
        .await
        .unwrap_err();
    assert!(!err.to_string().is_empty());
    let _ = B256::ZERO;
}
