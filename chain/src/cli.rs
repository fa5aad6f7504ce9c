//! `ipsx wallet …` and `ipsx chain …`: clap-derive arguments and the functions that run
//! them. The binary only adds `Wallet(WalletArgs)` and `Chain(ChainArgs)` subcommands
//! calling [`run_wallet`] and [`run_chain`].
//!
//! Keys live in an encrypted keystore file (Web3 Secret Storage, scrypt); the private key
//! and the password are never printed. The password comes from `--password-file` or from
//! the environment variable named by `--password-env` (default `IPSX_WALLET_PASSWORD`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use alloy::signers::local::PrivateKeySigner;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::units::AmountError;
use crate::{
    ChainClient, ChainError, DeployParams, Deployment, deploy, format_tokens, parse_tokens,
};

/// Largest keystore file accepted (real ones are under 1 KiB).
const MAX_KEYSTORE_BYTES: u64 = 64 * 1024;
/// Largest scrypt `n` accepted when decrypting (the usual values are 2^13 and 2^18).
const MAX_SCRYPT_N: u64 = 1 << 18;
/// Largest password or private-key file accepted.
const MAX_SECRET_FILE_BYTES: u64 = 4 * 1024;

/// Errors of the CLI; each names the file, argument or channel at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// A chain operation failed (wrong chain id, contract not deployed, revert…).
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// `wallet create`/`import` would overwrite a keystore.
    #[error("keystore {path} already exists; refusing to overwrite it")]
    KeystoreExists {
        /// The file.
        path: PathBuf,
    },
    /// The keystore file is missing or unreadable.
    #[error("keystore {path}: {reason} (create one with `ipsx wallet create`)")]
    KeystoreRead {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The keystore does not decrypt.
    #[error("keystore {path} does not decrypt: wrong password or corrupt file")]
    KeystoreDecrypt {
        /// The file.
        path: PathBuf,
    },
    /// Writing the keystore failed.
    #[error("cannot write keystore {path}: {reason}")]
    KeystoreWrite {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No password source.
    #[error("no keystore password: pass --password-file or set the environment variable {var}")]
    NoPassword {
        /// The variable looked at.
        var: String,
    },
    /// A password or key file could not be used.
    #[error("{what} file {path}: {reason}")]
    SecretFile {
        /// "password" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why (never the content).
        reason: String,
    },
    /// A private key given through the environment is invalid.
    #[error("environment variable {var}: {reason}")]
    PrivateKeyEnv {
        /// The variable.
        var: String,
        /// Why (never the content).
        reason: String,
    },
    /// The deployment file exists and `--force` was not given.
    #[error("deployment file {path} already exists; pass --force to overwrite it")]
    DeploymentExists {
        /// The file.
        path: PathBuf,
    },
    /// The channel does not exist or is already closed.
    #[error("channel {channel} does not exist or is already closed")]
    ChannelNotFound {
        /// The channel.
        channel: B256,
    },
    /// The wallet is neither side of the channel.
    #[error("wallet {wallet} is neither the requester nor the provider of channel {channel}")]
    NotYourChannel {
        /// The channel.
        channel: B256,
        /// This wallet.
        wallet: Address,
    },
    /// A provider cannot close without the requester's latest proof.
    #[error(
        "wallet {wallet} is the provider of channel {channel}: providers close by claiming the requester's latest balance proof (the provider agent does it)"
    )]
    ProviderClose {
        /// The channel.
        channel: B256,
        /// This wallet.
        wallet: Address,
    },
    /// Writing the command's output failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

fn parse_amount(s: &str) -> Result<U256, AmountError> {
    parse_tokens(s)
}

/// Where the wallet key comes from.
#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    /// Encrypted keystore file (Web3 Secret Storage v3).
    #[arg(long, env = "IPSX_KEYSTORE", default_value = "ipsx-wallet.json")]
    pub keystore: PathBuf,
    /// File whose first line is the keystore password.
    #[arg(long, env = "IPSX_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the keystore password (when no --password-file).
    #[arg(long, default_value = "IPSX_WALLET_PASSWORD")]
    pub password_env: String,
    /// Use the hex private key in this environment variable instead of the keystore
    /// (automation, local chains).
    #[arg(long)]
    pub private_key_env: Option<String>,
}

/// Which chain and deployment to talk to.
#[derive(Debug, Clone, Args)]
pub struct NetArgs {
    /// JSON-RPC endpoint of the chain.
    #[arg(long, env = "IPSX_RPC_URL", default_value = "http://127.0.0.1:8545")]
    pub rpc_url: String,
    /// Deployment file written by `ipsx chain deploy`.
    #[arg(long, env = "IPSX_DEPLOYMENT", default_value = "ipsx-deployment.json")]
    pub deployment: PathBuf,
    /// Seconds to wait for each transaction to be mined.
    #[arg(long, default_value_t = 120)]
    pub tx_timeout: u64,
    /// No progress indicator.
    #[arg(long)]
    pub quiet: bool,
}

/// `ipsx wallet`: keys, balances, deposits, withdrawals and channels.
#[derive(Debug, Clone, Args)]
pub struct WalletArgs {
    /// The key.
    #[command(flatten)]
    pub key: KeyArgs,
    /// The chain.
    #[command(flatten)]
    pub net: NetArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: WalletCommand,
}

/// The `ipsx wallet` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum WalletCommand {
    /// Creates a new random key in the keystore file (prints only the address).
    Create,
    /// Imports a hex private key from a file into the keystore file.
    Import {
        /// File holding the hex private key (0x optional).
        #[arg(long)]
        private_key_file: PathBuf,
    },
    /// Prints the wallet's address.
    Address,
    /// Prints token, Centralizer balance and reserved amounts.
    Balances {
        /// Another address to look at (default: this wallet).
        #[arg(long)]
        of: Option<Address>,
    },
    /// Moves tokens from the wallet into its Centralizer balance.
    Deposit {
        /// Amount in IPSX, e.g. 12.5.
        #[arg(value_parser = parse_amount)]
        amount: U256,
        /// Use approve + deposit (two transactions) instead of one permit deposit.
        #[arg(long)]
        approve: bool,
    },
    /// Moves tokens from the Centralizer balance back to the wallet.
    Withdraw {
        /// Amount in IPSX.
        #[arg(value_parser = parse_amount)]
        amount: U256,
    },
    /// Lists the channels this wallet opened or receives.
    Channels,
    /// Closes a channel this wallet opened: starts the uncooperative close (paying
    /// `--amount`, default what was already claimed), or settles it once the challenge
    /// period is over.
    Close {
        /// Channel id (0x + 64 hex digits).
        channel: B256,
        /// Cumulative amount owed to the provider, in IPSX.
        #[arg(long, value_parser = parse_amount)]
        amount: Option<U256>,
    },
}

/// `ipsx chain`: deployment of the contracts.
#[derive(Debug, Clone, Args)]
pub struct ChainArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ChainCommand,
}

/// The `ipsx chain` subcommands.
#[derive(Debug, Clone, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process; size is irrelevant
pub enum ChainCommand {
    /// Deploys the IPSX token and the Centralizer and writes the deployment file.
    Deploy(DeployArgs),
    /// Prints the deployment and the Centralizer's parameters.
    Info {
        /// The chain.
        #[command(flatten)]
        net: NetArgs,
    },
}

/// Arguments of `ipsx chain deploy`.
#[derive(Debug, Clone, Args)]
pub struct DeployArgs {
    /// The deployer's key (pays the gas; default receiver of everything).
    #[command(flatten)]
    pub key: KeyArgs,
    /// JSON-RPC endpoint of the chain.
    #[arg(long, env = "IPSX_RPC_URL", default_value = "http://127.0.0.1:8545")]
    pub rpc_url: String,
    /// Where to write the deployment file.
    #[arg(long, default_value = "ipsx-deployment.json")]
    pub out: PathBuf,
    /// Overwrite an existing deployment file.
    #[arg(long)]
    pub force: bool,
    /// Receiver of the 50 % funding-participants allocation (default: deployer).
    #[arg(long)]
    pub funding: Option<Address>,
    /// Receiver of the 27.5 % incentives and partners allocation (default: deployer).
    #[arg(long)]
    pub incentives: Option<Address>,
    /// Receiver of the 2.5 % bounty allocation (default: deployer).
    #[arg(long)]
    pub bounty: Option<Address>,
    /// Receiver of the 20 % team allocation (default: deployer).
    #[arg(long)]
    pub team: Option<Address>,
    /// Owner of the Centralizer (sets fee and treasury; default: deployer).
    #[arg(long)]
    pub owner: Option<Address>,
    /// Treasury credited with the platform fee (default: deployer).
    #[arg(long)]
    pub treasury: Option<Address>,
    /// Platform fee in basis points (at most 1000 = 10 %).
    #[arg(long, default_value_t = 100)]
    pub fee_bps: u16,
    /// Challenge period of uncooperative closes, in seconds (1 .. 2592000).
    #[arg(long, default_value_t = 3600)]
    pub challenge_period: u64,
    /// No progress indicator.
    #[arg(long)]
    pub quiet: bool,
}

// === secrets ===

fn read_secret_file(what: &'static str, path: &Path) -> Result<String, CliError> {
    let err = |reason: String| CliError::SecretFile {
        what,
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_SECRET_FILE_BYTES {
        return Err(err(format!(
            "{} bytes, at most {MAX_SECRET_FILE_BYTES} allowed",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let first = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end_matches('\r')
        .to_owned();
    if first.is_empty() {
        return Err(err("is empty".into()));
    }
    Ok(first)
}

fn password(key: &KeyArgs) -> Result<String, CliError> {
    if let Some(path) = &key.password_file {
        return read_secret_file("password", path);
    }
    match std::env::var(&key.password_env) {
        Ok(p) if !p.is_empty() => Ok(p),
        _ => Err(CliError::NoPassword {
            var: key.password_env.clone(),
        }),
    }
}

fn parse_private_key(text: &str) -> Result<PrivateKeySigner, String> {
    let hex = text.trim();
    let hex = hex.strip_prefix("0x").unwrap_or(hex);
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "expected 64 hex digits, found {} characters",
            hex.len()
        ));
    }
    hex.parse::<PrivateKeySigner>()
        .map_err(|_| "not a valid secp256k1 private key".to_owned())
}

/// Loads the wallet key: `--private-key-env` if given, else the keystore.
pub fn load_signer(key: &KeyArgs) -> Result<PrivateKeySigner, CliError> {
    if let Some(var) = &key.private_key_env {
        let text = std::env::var(var).map_err(|_| CliError::PrivateKeyEnv {
            var: var.clone(),
            reason: "not set".into(),
        })?;
        return parse_private_key(&text).map_err(|reason| CliError::PrivateKeyEnv {
            var: var.clone(),
            reason,
        });
    }
    let path = &key.keystore;
    let read_err = |reason: String| CliError::KeystoreRead {
        path: path.clone(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| read_err(e.to_string()))?;
    if meta.len() > MAX_KEYSTORE_BYTES {
        return Err(read_err(format!("{} bytes, not a keystore", meta.len())));
    }
    let text = std::fs::read_to_string(path).map_err(|e| read_err(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| read_err(format!("not JSON: {e}")))?;
    // Refuse absurd scrypt parameters before deriving (a hostile file could ask for
    // gigabytes of memory).
    let crypto = json.get("crypto").or_else(|| json.get("Crypto"));
    let n = crypto
        .and_then(|c| c.get("kdfparams"))
        .and_then(|k| k.get("n"))
        .and_then(|n| n.as_u64());
    if let Some(n) = n
        && n > MAX_SCRYPT_N
    {
        return Err(read_err(format!("scrypt n = {n} is above {MAX_SCRYPT_N}")));
    }
    let pw = password(key)?;
    PrivateKeySigner::decrypt_keystore(path, pw)
        .map_err(|_| CliError::KeystoreDecrypt { path: path.clone() })
}

fn write_keystore(key: &KeyArgs, signer: &PrivateKeySigner) -> Result<(), CliError> {
    let path = &key.keystore;
    if path.exists() {
        return Err(CliError::KeystoreExists { path: path.clone() });
    }
    let pw = password(key)?;
    let werr = |reason: String| CliError::KeystoreWrite {
        path: path.clone(),
        reason,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| werr("not a file name".into()))?;
    let tmp_name = format!(".{name}.tmp");
    let secret = signer.to_bytes();
    PrivateKeySigner::encrypt_keystore(&dir, &mut rand::thread_rng(), secret, pw, Some(&tmp_name))
        .map_err(|e| werr(e.to_string()))?;
    let tmp = dir.join(&tmp_name);
    restrict_permissions(&tmp).map_err(|e| werr(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| werr(e.to_string()))
}

fn restrict_permissions(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

// === progress ===

/// Runs `fut` under a spinner saying `msg` (hidden with `quiet` or without a terminal).
async fn with_progress<T, F: std::future::Future<Output = T>>(quiet: bool, msg: &str, fut: F) -> T {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar.set_message(msg.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    let out = fut.await;
    bar.finish_and_clear();
    out
}

async fn connect(key: &KeyArgs, net: &NetArgs) -> Result<ChainClient, CliError> {
    let signer = load_signer(key)?;
    let deployment = Deployment::load(&net.deployment)?;
    let client = with_progress(
        net.quiet,
        "connecting",
        ChainClient::connect(&net.rpc_url, deployment, signer),
    )
    .await?;
    Ok(client.with_tx_timeout(Duration::from_secs(net.tx_timeout)))
}

// === wallet ===

/// Runs `ipsx wallet …`, printing to stdout.
pub async fn run_wallet(args: WalletArgs) -> Result<(), CliError> {
    let mut out = std::io::stdout();
    run_wallet_to(args, &mut out).await
}

/// Runs `ipsx wallet …`, printing to `out` (tests read it).
pub async fn run_wallet_to<W: Write>(args: WalletArgs, out: &mut W) -> Result<(), CliError> {
    let WalletArgs { key, net, command } = args;
    let q = net.quiet;
    match command {
        WalletCommand::Create => {
            let signer = PrivateKeySigner::random();
            write_keystore(&key, &signer)?;
            writeln!(
                out,
                "created {} in {}",
                signer.address(),
                key.keystore.display()
            )?;
        }
        WalletCommand::Import { private_key_file } => {
            let text = read_secret_file("private key", &private_key_file)?;
            let signer = parse_private_key(&text).map_err(|reason| CliError::SecretFile {
                what: "private key",
                path: private_key_file.clone(),
                reason,
            })?;
            write_keystore(&key, &signer)?;
            writeln!(
                out,
                "imported {} into {}",
                signer.address(),
                key.keystore.display()
            )?;
        }
        WalletCommand::Address => {
            writeln!(out, "{}", load_signer(&key)?.address())?;
        }
        WalletCommand::Balances { of } => {
            let c = connect(&key, &net).await?;
            let who = of.unwrap_or_else(|| c.address());
            let b = c.wallet_balances(who).await?;
            writeln!(out, "address  {who}")?;
            writeln!(out, "token    {} IPSX", format_tokens(b.token))?;
            writeln!(out, "balance  {} IPSX", format_tokens(b.balance))?;
            writeln!(out, "reserved {} IPSX", format_tokens(b.reserved))?;
        }
        WalletCommand::Deposit { amount, approve } => {
            let c = connect(&key, &net).await?;
            let o = if approve {
                with_progress(q, "approving", c.approve(amount)).await?;
                with_progress(q, "depositing", c.deposit(amount)).await?
            } else {
                // The permit's deadline is checked against the chain's clock, not ours.
                let deadline = U256::from(c.latest_timestamp().await?.saturating_add(3_600));
                with_progress(
                    q,
                    "depositing with permit",
                    c.deposit_with_permit(amount, deadline),
                )
                .await?
            };
            let bal = c.balance(c.address()).await?;
            writeln!(
                out,
                "deposited {} IPSX (tx {}, block {}); balance {} IPSX",
                format_tokens(amount),
                o.tx_hash,
                o.block_number,
                format_tokens(bal)
            )?;
        }
        WalletCommand::Withdraw { amount } => {
            let c = connect(&key, &net).await?;
            let o = with_progress(q, "withdrawing", c.withdraw(amount)).await?;
            let bal = c.balance(c.address()).await?;
            writeln!(
                out,
                "withdrew {} IPSX (tx {}, block {}); balance {} IPSX",
                format_tokens(amount),
                o.tx_hash,
                o.block_number,
                format_tokens(bal)
            )?;
        }
        WalletCommand::Channels => {
            let c = connect(&key, &net).await?;
            let me = c.address();
            let ids = with_progress(q, "reading channel events", c.channel_ids_of(me)).await?;
            if ids.is_empty() {
                writeln!(out, "no channels")?;
            }
            for id in ids {
                match c.channel(id).await? {
                    None => writeln!(out, "{id} closed")?,
                    Some(ch) => {
                        let (role, peer) = if ch.requester == me {
                            ("out", ch.provider)
                        } else {
                            ("in", ch.requester)
                        };
                        let status = match ch.settle_after {
                            None => "open".to_owned(),
                            Some(t) => format!("closing (settle from {t})"),
                        };
                        writeln!(
                            out,
                            "{id} {role} peer {peer} deposit {} claimed {} {status}",
                            format_tokens(ch.deposit),
                            format_tokens(ch.claimed)
                        )?;
                    }
                }
            }
        }
        WalletCommand::Close { channel, amount } => {
            let c = connect(&key, &net).await?;
            let me = c.address();
            let ch = c
                .channel(channel)
                .await?
                .ok_or(CliError::ChannelNotFound { channel })?;
            if ch.requester != me && ch.provider != me {
                return Err(CliError::NotYourChannel {
                    channel,
                    wallet: me,
                });
            }
            match ch.settle_after {
                None if ch.requester == me => {
                    let owed = amount.unwrap_or(ch.claimed);
                    let o =
                        with_progress(q, "starting close", c.start_close(channel, owed)).await?;
                    let after = c
                        .channel(channel)
                        .await?
                        .and_then(|s| s.settle_after)
                        .unwrap_or_default();
                    writeln!(
                        out,
                        "close started for {channel} (tx {}); provider paid up to {} IPSX; settle from timestamp {after}",
                        o.tx_hash,
                        format_tokens(owed)
                    )?;
                }
                None => {
                    return Err(CliError::ProviderClose {
                        channel,
                        wallet: me,
                    });
                }
                Some(_) => {
                    let o = with_progress(q, "settling", c.settle(channel)).await?;
                    writeln!(
                        out,
                        "settled {channel} (tx {}); {} IPSX back to the requester",
                        o.tx_hash,
                        format_tokens(ch.remaining())
                    )?;
                }
            }
        }
    }
    Ok(())
}

// === chain ===

/// Runs `ipsx chain …`, printing to stdout.
pub async fn run_chain(args: ChainArgs) -> Result<(), CliError> {
    let mut out = std::io::stdout();
    run_chain_to(args, &mut out).await
}

/// Runs `ipsx chain …`, printing to `out`.
pub async fn run_chain_to<W: Write>(args: ChainArgs, out: &mut W) -> Result<(), CliError> {
    match args.command {
        ChainCommand::Deploy(a) => {
            if a.out.exists() && !a.force {
                return Err(CliError::DeploymentExists {
                    path: a.out.clone(),
                });
            }
            let signer = load_signer(&a.key)?;
            let me = signer.address();
            let params = DeployParams {
                funding: a.funding.unwrap_or(me),
                incentives: a.incentives.unwrap_or(me),
                bounty: a.bounty.unwrap_or(me),
                team: a.team.unwrap_or(me),
                owner: a.owner.unwrap_or(me),
                treasury: a.treasury.unwrap_or(me),
                fee_bps: a.fee_bps,
                challenge_period_secs: a.challenge_period,
            };
            let r = with_progress(
                a.quiet,
                "deploying IPSXToken and Centralizer",
                deploy(&a.rpc_url, signer, &params),
            )
            .await?;
            r.deployment.save(&a.out)?;
            let d = r.deployment;
            writeln!(out, "chain id     {}", d.chain_id)?;
            writeln!(
                out,
                "IPSXToken    {} (gas {})",
                d.token, r.token_tx.gas_used
            )?;
            writeln!(
                out,
                "Centralizer  {} (gas {})",
                d.centralizer, r.centralizer_tx.gas_used
            )?;
            writeln!(out, "deploy block {}", d.deploy_block)?;
            writeln!(out, "wrote {}", a.out.display())?;
        }
        ChainCommand::Info { net } => {
            let d = Deployment::load(&net.deployment)?;
            let c = ChainClient::connect_read_only(&net.rpc_url, d).await?;
            let held = c.token_balance(d.centralizer).await?;
            writeln!(out, "chain id          {}", d.chain_id)?;
            writeln!(out, "IPSXToken         {}", d.token)?;
            writeln!(out, "Centralizer       {}", d.centralizer)?;
            writeln!(out, "deploy block      {}", d.deploy_block)?;
            writeln!(out, "challenge period  {} s", d.challenge_period_secs)?;
            writeln!(out, "fee               {} bps", c.fee_bps().await?)?;
            writeln!(out, "treasury          {}", c.treasury().await?)?;
            writeln!(out, "tokens held       {} IPSX", format_tokens(held))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Debug, Subcommand)]
    enum Cmd {
        Wallet(WalletArgs),
        Chain(ChainArgs),
    }

    #[test]
    fn clap_definitions_are_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_wallet_commands_and_names_bad_arguments() {
        let c = Cli::try_parse_from(["ipsx", "wallet", "deposit", "12.5", "--approve"]).unwrap();
        match c.cmd {
            Cmd::Wallet(WalletArgs {
                command: WalletCommand::Deposit { amount, approve },
                ..
            }) => {
                assert_eq!(amount, parse_tokens("12.5").unwrap());
                assert!(approve);
            }
            other => panic!("{other:?}"),
        }
        let err = Cli::try_parse_from(["ipsx", "wallet", "deposit", "-3"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("AMOUNT") || err.contains("-3"), "{err}");
        let err = Cli::try_parse_from(["ipsx", "wallet", "withdraw", "1e5"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unexpected character 'e'"), "{err}");
        let err = Cli::try_parse_from(["ipsx", "wallet", "close", "0x12"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("CHANNEL"), "{err}");
        let err = Cli::try_parse_from(["ipsx", "wallet", "balances", "--of", "nope"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--of"), "{err}");
        let err = Cli::try_parse_from(["ipsx", "chain", "deploy", "--fee-bps", "70000"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--fee-bps"), "{err}");
    }

    #[test]
    fn private_keys_are_checked_without_echoing_them() {
        let secret = "zz".repeat(32);
        let err = parse_private_key(&secret).unwrap_err();
        assert!(!err.contains(&secret));
        assert!(parse_private_key("0x12").is_err());
        assert!(parse_private_key(&"0".repeat(64)).is_err()); // zero is not a valid key
        let k =
            parse_private_key("0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80")
                .unwrap();
        assert_eq!(
            k.address().to_string(),
            "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
        );
    }
}
