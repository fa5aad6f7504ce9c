//! The deployment file: where the token and the Centralizer live. `ipsx chain deploy`
//! writes it; the exchange, the providers, the gateway and `ipsx wallet` read it.

use std::path::Path;

use alloy::primitives::Address;
use serde::{Deserialize, Serialize};

use super::error::ChainError;
use super::proof::ChannelDomain;

/// Addresses and facts of one deployment (JSON, `deny_unknown_fields`):
///
/// ```json
/// { "chain_id": 31337, "token": "0x…", "centralizer": "0x…",
///   "deploy_block": 1, "challenge_period_secs": 3600 }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// EIP-155 chain id the contracts live on.
    pub chain_id: u64,
    /// The IPSX token.
    pub token: Address,
    /// The Centralizer.
    pub centralizer: Address,
    /// Block of the first deployment transaction (where event scans start).
    pub deploy_block: u64,
    /// The Centralizer's challenge period (immutable), in seconds.
    pub challenge_period_secs: u64,
}

impl Deployment {
    /// The EIP-712 domain of balance proofs for this deployment.
    pub fn domain(&self) -> ChannelDomain {
        ChannelDomain {
            chain_id: self.chain_id,
            centralizer: self.centralizer,
        }
    }

    /// Reads and checks a deployment file.
    pub fn load(path: &Path) -> Result<Self, ChainError> {
        let text = std::fs::read_to_string(path).map_err(|source| ChainError::DeploymentIo {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and checks deployment JSON; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ChainError> {
        let d: Self = serde_json::from_str(text).map_err(|source| ChainError::DeploymentParse {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |field, reason: &str| ChainError::DeploymentInvalid {
            path: path.to_owned(),
            field,
            reason: reason.to_owned(),
        };
        if d.chain_id == 0 {
            return Err(invalid("chain_id", "must not be 0"));
        }
        if d.token.is_zero() {
            return Err(invalid("token", "must not be the zero address"));
        }
        if d.centralizer.is_zero() {
            return Err(invalid("centralizer", "must not be the zero address"));
        }
        if d.token == d.centralizer {
            return Err(invalid("centralizer", "must differ from token"));
        }
        if d.challenge_period_secs == 0 {
            return Err(invalid("challenge_period_secs", "must be positive"));
        }
        Ok(d)
    }

    /// Writes the file (through a temporary file and a rename, so readers never see
    /// half a file).
    pub fn save(&self, path: &Path) -> Result<(), ChainError> {
        let io = |source| ChainError::DeploymentIo {
            path: path.to_owned(),
            source,
        };
        let mut text =
            serde_json::to_string_pretty(self).map_err(|source| ChainError::DeploymentParse {
                path: path.to_owned(),
                source,
            })?;
        text.push('\n');
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GOOD: &str = r#"{"chain_id":31337,
        "token":"0x5FbDB2315678afecb367f032d93F642f64180aa3",
        "centralizer":"0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512",
        "deploy_block":1,"challenge_period_secs":3600}"#;

    fn err(text: &str) -> String {
        Deployment::parse(Path::new("d.json"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_and_round_trips() {
        let d = Deployment::parse(Path::new("d.json"), GOOD).unwrap();
        assert_eq!(d.chain_id, 31337);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("deployment.json");
        d.save(&p).unwrap();
        assert_eq!(Deployment::load(&p).unwrap(), d);
    }

    #[test]
    fn bad_files_name_the_field() {
        assert!(err(&GOOD.replace("31337", "0")).contains("`chain_id`"));
        assert!(err(&GOOD.replace("31337", "-1")).contains("line"));
        assert!(err(&GOOD.replace(r#""deploy_block":1,"#, "")).contains("deploy_block"));
        assert!(err(&GOOD.replace("}", r#","extra":true}"#)).contains("extra"));
        assert!(
            err(&GOOD.replace("0x5FbDB2315678afecb367f032d93F642f64180aa3", "0x12"))
                .contains("line")
        );
        let same = GOOD.replace(
            "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512",
            "0x5FbDB2315678afecb367f032d93F642f64180aa3",
        );
        assert!(err(&same).contains("`centralizer` must differ"));
        let zero = GOOD.replace(
            "0x5FbDB2315678afecb367f032d93F642f64180aa3",
            "0x0000000000000000000000000000000000000000",
        );
        assert!(err(&zero).contains("`token`"));
        assert!(err(&GOOD.replace("3600", "0")).contains("`challenge_period_secs`"));
        assert!(err("").contains("d.json"));
        assert!(err(&"[".repeat(100_000)).contains("d.json"));
        let missing = Deployment::load(Path::new("/nonexistent/ipsx.json")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/ipsx.json"));
    }
}
