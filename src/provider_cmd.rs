//! `ipsx provider`, `ipsx provider status` and `ipsx keygen`.

use std::path::Path;

use ipsx_provider::{ProviderConfig, ProviderExit};
use ipsx_tunnel_pool::{SecretKey, key_to_base64};
use tokio::signal::unix::{SignalKind, signal};

/// `ipsx provider --config FILE [--check]`.
pub(crate) async fn run(path: &Path, check: bool) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // With an [exchange] section this is the agent: offers, deals, payments, claims.
    if text.lines().any(|l| l.trim() == "[exchange]") {
        let config = ipsx_provider::agent::AgentConfig::from_toml(&text)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if check {
            println!(
                "{}: ok (provider agent, {} exits)",
                path.display(),
                config.exits.len()
            );
            return Ok(());
        }
        return ipsx_provider::agent::run_agent(config, crate::gateway_cmd::terminated())
            .await
            .map_err(|e| e.to_string());
    }
    let config =
        ProviderConfig::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if check {
        println!("{}: ok ({} peers)", path.display(), config.peers.len());
        return Ok(());
    }
    let handle = ProviderExit::start(config)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "provider exit listening on {} (udp), public key {}",
        handle.local_addr(),
        key_to_base64(&handle.public_key())
    );
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    handle.shutdown().await;
    Ok(())
}

/// `ipsx provider status [--config F | --url U] [--json]`: reads the agent's status
/// listener and prints a table (or the JSON).
pub(crate) async fn status(
    config: Option<&Path>,
    url: Option<String>,
    json: bool,
) -> Result<(), String> {
    let mut token = std::env::var("IPSX_STATUS_TOKEN").ok();
    let base = match (config, url) {
        (_, Some(u)) => u,
        (Some(path), None) => {
            let cfg = ipsx_provider::agent::AgentConfig::load(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let section = cfg.status.unwrap_or_default();
            if !section.enabled {
                return Err(format!(
                    "{}: the status listener is disabled (status.enabled = false)",
                    path.display()
                ));
            }
            if let Some(t) = section.token {
                token = Some(t.0);
            }
            let mut addr = section.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            if addr.port() == 0 {
                return Err(format!(
                    "{}: status.listen has port 0 (any free port); give --url",
                    path.display()
                ));
            }
            format!("http://{addr}")
        }
        (None, None) => format!(
            "http://{}",
            ipsx_provider::agent::config::DEFAULT_STATUS_LISTEN
        ),
    };
    let status = ipsx_provider::status::fetch(&base, token.as_deref()).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", ipsx_provider::status::render(&status));
    }
    Ok(())
}

/// `ipsx keygen`: a fresh key pair, base64 as WireGuard writes them.
pub(crate) fn keygen() {
    let key = SecretKey::generate();
    println!("private_key = {}", key_to_base64(&key.0));
    println!("public_key  = {}", key_to_base64(&key.public_key()));
}
