//! A real local chain for tests: [`Anvil`] starts the `anvil` binary on a free loopback
//! port and kills it when dropped, also when the test panics. Other crates' tests
//! (exchange, provider, end to end) reuse it through the `testing` feature.
//!
//! The binary is found through, in order: the `IPSX_ANVIL` environment variable, the npm
//! package installed by `scripts/install-chain.sh`
//! (`contracts/node_modules/@foundry-rs/anvil-linux-<arch>/bin/anvil`, searched upwards
//! from the current directory and from this crate), then `anvil` on `PATH`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use alloy::primitives::U256;
use alloy::providers::{DynProvider, Provider};
use alloy::signers::local::PrivateKeySigner;

use super::client::{ChainClient, DeployParams, DeployReport, deploy, http_provider};
use super::deployment::Deployment;
use super::error::ChainError;

/// How long anvil may take to print its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many banner lines are read before giving up.
const MAX_BANNER_LINES: usize = 500;

/// What anvil printed before listening: its dev keys, chain id and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnvilBanner {
    /// Private keys of the funded dev accounts, in order.
    pub private_keys: Vec<String>,
    /// The chain id.
    pub chain_id: u64,
    /// `host:port` it listens on.
    pub listen: String,
}

/// Parses anvil's start-up banner (sans-IO, so it is unit-tested). Returns `None` until
/// the "Listening on" line has been seen.
pub fn parse_banner<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<AnvilBanner> {
    #[derive(PartialEq)]
    enum Section {
        Other,
        Keys,
        ChainId,
    }
    let mut section = Section::Other;
    let mut private_keys = Vec::new();
    let mut chain_id = None;
    for line in lines {
        let line = line.trim();
        if line == "Private Keys" {
            section = Section::Keys;
            continue;
        }
        if line == "Chain ID" {
            section = Section::ChainId;
            continue;
        }
        if let Some(addr) = line.strip_prefix("Listening on ") {
            return Some(AnvilBanner {
                private_keys,
                chain_id: chain_id.unwrap_or(31_337),
                listen: addr.trim().to_owned(),
            });
        }
        if line.is_empty() || line.starts_with("==") {
            continue;
        }
        match section {
            Section::Keys => match line.split_once(") ") {
                Some((_, key)) if key.starts_with("0x") => private_keys.push(key.trim().to_owned()),
                _ => section = Section::Other,
            },
            Section::ChainId => {
                chain_id = line.parse().ok();
                section = Section::Other;
            }
            Section::Other => {}
        }
    }
    None
}

/// Where the anvil binary is, or every place that was searched.
pub fn find_anvil() -> Result<PathBuf, ChainError> {
    let mut searched = Vec::new();
    if let Some(p) = std::env::var_os("IPSX_ANVIL") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        searched.push(p);
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let rel = PathBuf::from(format!(
        "contracts/node_modules/@foundry-rs/anvil-{}-{arch}/bin/anvil",
        std::env::consts::OS
    ));
    let mut starts = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR"))];
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    for start in starts {
        for dir in start.ancestors().take(8) {
            let candidate = dir.join(&rel);
            if candidate.is_file() {
                return Ok(candidate);
            }
            searched.push(candidate);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("anvil");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        searched.push(PathBuf::from("$PATH/anvil"));
    }
    Err(ChainError::AnvilNotFound { searched })
}

/// A running anvil, killed on drop.
#[derive(Debug)]
pub struct Anvil {
    child: Child,
    endpoint: String,
    chain_id: u64,
    keys: Vec<PrivateKeySigner>,
}

impl Anvil {
    /// Starts anvil with 10 funded dev accounts and instant mining.
    pub fn spawn() -> Result<Self, ChainError> {
        Self::spawn_with_args(&[])
    }

    /// Starts anvil with extra command-line arguments (e.g. `["--chain-id", "5"]`).
    pub fn spawn_with_args(extra: &[&str]) -> Result<Self, ChainError> {
        let bin = find_anvil()?;
        Self::spawn_binary(&bin, extra)
    }

    /// Starts the given anvil binary.
    pub fn spawn_binary(bin: &Path, extra: &[&str]) -> Result<Self, ChainError> {
        // Its own process group: a terminal's Ctrl-C goes to the whole foreground group,
        // and the chain must outlive its owner's shutdown (channels settle on it); the
        // owner kills it on drop.
        let mut child = std::os::unix::process::CommandExt::process_group(
            Command::new(bin)
                .args(["--host", "127.0.0.1", "--port", "0"])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
            0,
        )
        .spawn()
        .map_err(|e| ChainError::AnvilStart {
            reason: format!("{}: {e}", bin.display()),
        })?;
        // From here on, `guard` kills the child on every early return.
        let stdout = child.stdout.take();
        let mut guard = Self {
            child,
            endpoint: String::new(),
            chain_id: 0,
            keys: Vec::new(),
        };
        let Some(stdout) = stdout else {
            return Err(ChainError::AnvilStart {
                reason: "no stdout pipe".into(),
            });
        };
        let (tx, rx) = mpsc::channel::<Option<AnvilBanner>>();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut reader = BufReader::new(stdout);
            let mut sent = false;
            let mut buf = String::new();
            loop {
                buf.clear();
                match reader.read_line(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if sent {
                    continue; // keep draining so anvil never blocks on a full pipe
                }
                lines.push(buf.clone());
                if let Some(b) = parse_banner(lines.iter().map(String::as_str)) {
                    sent = true;
                    let _ = tx.send(Some(b));
                } else if lines.len() > MAX_BANNER_LINES {
                    sent = true;
                    let _ = tx.send(None);
                }
            }
            if !sent {
                let _ = tx.send(None);
            }
        });
        let banner = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(b)) => b,
            Ok(None) => {
                let status = guard.child.try_wait().ok().flatten();
                return Err(ChainError::AnvilStart {
                    reason: format!("no \"Listening on\" line (exit status {status:?})"),
                });
            }
            Err(_) => {
                return Err(ChainError::AnvilStart {
                    reason: format!("not listening after {START_TIMEOUT:?}"),
                });
            }
        };
        guard.keys = banner
            .private_keys
            .iter()
            .map(|k| k.parse::<PrivateKeySigner>())
            .collect::<Result<_, _>>()
            .map_err(|e| ChainError::AnvilStart {
                reason: format!("bad dev key: {e}"),
            })?;
        guard.endpoint = format!("http://{}", banner.listen);
        guard.chain_id = banner.chain_id;
        Ok(guard)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The chain id.
    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// The process id (for tests that want to check it is gone).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The funded dev accounts' keys (10 unless `--accounts` said otherwise).
    pub fn keys(&self) -> &[PrivateKeySigner] {
        &self.keys
    }

    /// Dev key `i`. Panics if there is no such account: test helper.
    #[allow(clippy::panic)]
    pub fn key(&self, i: usize) -> PrivateKeySigner {
        match self.keys.get(i) {
            Some(k) => k.clone(),
            None => panic!("anvil has {} dev accounts, asked for #{i}", self.keys.len()),
        }
    }

    /// A read-only provider to this node.
    pub fn provider(&self) -> Result<DynProvider, ChainError> {
        http_provider(&self.endpoint, None)
    }

    /// A provider that signs with dev key `i` (nonces fetched per transaction, so a
    /// reverted gas estimate leaves no nonce gap).
    pub fn wallet_provider(&self, i: usize) -> Result<DynProvider, ChainError> {
        http_provider(&self.endpoint, Some(self.key(i)))
    }

    /// Moves the chain's clock forward by `secs` and mines a block.
    pub async fn advance_time(&self, secs: u64) -> Result<(), ChainError> {
        let p = self.provider()?;
        let rpc = |action: &str| {
            let action = action.to_owned();
            move |source| ChainError::rpc(action, source)
        };
        let _: U256 = p
            .raw_request("evm_increaseTime".into(), (U256::from(secs),))
            .await
            .map_err(rpc("evm_increaseTime"))?;
        let _: String = p
            .raw_request("evm_mine".into(), ())
            .await
            .map_err(rpc("evm_mine"))?;
        Ok(())
    }

    /// Deploys the token and the Centralizer with dev key 0 and [`DeployParams::all_to`]
    /// that key (so it holds the whole supply, owns the Centralizer and is the treasury).
    pub async fn deploy_default(&self) -> Result<DeployReport, ChainError> {
        let deployer = self.key(0);
        let params = DeployParams::all_to(deployer.address());
        deploy(&self.endpoint, deployer, &params).await
    }

    /// As [`Anvil::deploy_default`], but dev key `treasury` receives the platform fees,
    /// so a test (or `ipsx up`) can watch the fees arrive on their own.
    pub async fn deploy_with_treasury(&self, treasury: usize) -> Result<DeployReport, ChainError> {
        let deployer = self.key(0);
        let params = DeployParams {
            treasury: self.key(treasury).address(),
            ..DeployParams::all_to(deployer.address())
        };
        deploy(&self.endpoint, deployer, &params).await
    }

    /// Sends `tokens` from dev key 0 (the supply holder after a default deploy) to dev
    /// key `who`, which approves and deposits `deposit` of them into the Centralizer.
    pub async fn fund_and_deposit(
        &self,
        deployment: Deployment,
        who: usize,
        tokens: U256,
        deposit: U256,
    ) -> Result<(), ChainError> {
        let supplier = ChainClient::connect(&self.endpoint, deployment, self.key(0)).await?;
        supplier
            .transfer_tokens(self.key(who).address(), tokens)
            .await?;
        let wallet = ChainClient::connect(&self.endpoint, deployment, self.key(who)).await?;
        wallet.approve(deposit).await?;
        wallet.deposit(deposit).await?;
        Ok(())
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BANNER: &str = "\n  banner art\nAvailable Accounts\n==================\n\n(0) 0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266 (10000.000000000000000000 ETH)\n\nPrivate Keys\n==================\n\n(0) 0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80\n(1) 0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d\n\nWallet\n==================\nMnemonic:          test test test test test test test test test test test junk\n\nChain ID\n==================\n\n31337\n\nBase Fee\n==================\n\n1000000000\n\nListening on 127.0.0.1:35179\n";

    #[test]
    fn parses_the_banner() {
        let b = parse_banner(BANNER.lines()).unwrap();
        assert_eq!(b.private_keys.len(), 2);
        assert_eq!(b.chain_id, 31337);
        assert_eq!(b.listen, "127.0.0.1:35179");
        let signer: PrivateKeySigner = b.private_keys[0].parse().unwrap();
        assert_eq!(
            signer.address().to_string(),
            "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
        );
    }

    #[test]
    fn incomplete_or_garbage_banner_is_none() {
        let cut = BANNER.replace("Listening on 127.0.0.1:35179", "");
        assert_eq!(parse_banner(cut.lines()), None);
        assert_eq!(
            parse_banner(["\u{0}\u{ffff}", "(0) nope", "Chain ID", "x"]),
            None
        );
    }
}
