//! `ipsx gateway` and the local demo behind `ipsx up`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipsx_config::GatewayConfig;
use ipsx_gateway::Gateway;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

/// `ipsx gateway --config FILE [--check]`.
pub(crate) async fn run(path: &Path, check: bool) -> Result<(), String> {
    let config = ipsx_config::load_gateway(path).map_err(|e| e.to_string())?;
    if check {
        let market = config
            .market
            .as_ref()
            .map(|m| format!(", market: {} demand groups", m.demand.len()))
            .unwrap_or_default();
        println!(
            "{}: ok ({} exits, {} tokens, {} rules, {} ban rules{market})",
            path.display(),
            config.exits.len(),
            config.tokens.len(),
            config.rules.len(),
            config.bans.len()
        );
        return Ok(());
    }
    serve(config, Some(path.to_path_buf()), terminated()).await
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn terminated() {
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => None } } => {}
    }
}

/// Runs a gateway (and its pool manager, with `[market]`) until `stop` resolves; then
/// drains, and ends every rented deal so providers settle.
pub(crate) async fn serve(
    config: GatewayConfig,
    path: Option<std::path::PathBuf>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let (tx, _rx) = tokio::sync::watch::channel(None);
    serve_reporting(config, path, stop, tx).await
}

/// As [`serve`]; sends the bound proxy and admin addresses once listening.
pub(crate) async fn serve_reporting(
    config: GatewayConfig,
    path: Option<std::path::PathBuf>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    bound: tokio::sync::watch::Sender<Option<(SocketAddr, SocketAddr)>>,
) -> Result<(), String> {
    let listen = config.listener.listen;
    let admin = config.listener.admin_listen;
    let poll = config.listener.reload_poll;
    let market = config.market.clone();
    let base_dir = config.base_dir.clone();
    let verify_url = config.listener.verify_url.clone();
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("gateway.listen: cannot listen on {listen}: {e}"))?;
    let proxy_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let gateway = Gateway::new(config, path.clone());
    let _ = ipsx_gateway::admin::prometheus();
    let pool = match market {
        Some(m) => {
            let pm = ipsx_market::PoolManager::start(gateway.clone(), m, &base_dir, verify_url)
                .await
                .map_err(|e| e.to_string())?;
            let status = pm.clone();
            gateway.set_market_status(std::sync::Arc::new(move || {
                serde_json::to_value(status.status()).unwrap_or_default()
            }));
            println!("renting exits as wallet {:#x}", pm.wallet());
            Some(pm)
        }
        None => None,
    };
    if let Some(admin) = admin {
        let admin_listener = TcpListener::bind(admin)
            .await
            .map_err(|e| format!("gateway.admin_listen: cannot listen on {admin}: {e}"))?;
        let addr = admin_listener.local_addr().map_err(|e| e.to_string())?;
        println!("admin listening on http://{addr}");
        let _ = bound.send(Some((proxy_addr, addr)));
        tokio::spawn(ipsx_gateway::admin::serve_admin(
            admin_listener,
            gateway.clone(),
            std::future::pending(),
        ));
    }
    if let Some(path) = path {
        tokio::spawn(watch_config(gateway.clone(), path, poll));
    }
    println!("proxy listening on {proxy_addr} (HTTP and SOCKS5)");
    let gw = gateway.clone();
    let renting = pool.clone();
    let shutdown = async move {
        stop.await;
        tracing::info!("shutdown requested");
        // Renting stops before anything else: nothing is rented while draining.
        if let Some(pm) = &renting {
            pm.stop_renting().await;
        }
        gw.begin_shutdown();
    };
    ipsx_gateway::serve(listener, gateway, shutdown).await;
    if let Some(pm) = pool {
        // Report every deal completed so providers claim and close their channels.
        pm.shutdown(Duration::from_secs(15)).await;
    }
    Ok(())
}

/// Reloads on SIGHUP and whenever the file's modification time changes.
async fn watch_config(gateway: Arc<Gateway>, path: std::path::PathBuf, poll: Duration) {
    let mut hup = signal(SignalKind::hangup()).ok();
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = mtime(&path);
    let period = if poll.is_zero() {
        Duration::from_secs(3600)
    } else {
        poll
    };
    let mut tick = tokio::time::interval(period);
    loop {
        let by_signal = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
        };
        let now = mtime(&path);
        if by_signal || (!poll.is_zero() && now != seen) {
            seen = now;
            match gateway.reload().await {
                Ok(generation) => tracing::info!(generation, "config reloaded"),
                Err(e) => {
                    tracing::warn!(error = %e, "config reload failed; still running the previous config")
                }
            }
        }
    }
}

/// `ipsx up` (local exits for now): an echo target and a gateway with exits on
/// 127.0.0.2..=127.0.0.9 across four demo countries.
pub(crate) async fn up(port: u16) -> Result<(), String> {
    let demo: [(u8, &str, &str); 8] = [
        (2, "de", "berlin"),
        (3, "de", "munich"),
        (4, "us", "new_york"),
        (5, "us", "chicago"),
        (6, "fr", "paris"),
        (7, "fr", "lyon"),
        (8, "jp", "tokyo"),
        (9, "jp", "osaka"),
    ];
    let echo = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("echo: {e}"))?;
    let echo_addr = echo.local_addr().map_err(|e| e.to_string())?;
    let countries: HashMap<IpAddr, String> = demo
        .iter()
        .map(|(last, cc, _)| {
            (
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, *last)),
                (*cc).to_owned(),
            )
        })
        .collect();
    tokio::spawn(ipsx_gateway::echo::serve_echo(echo, countries));
    let mut toml = format!(
        "[gateway]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{}\"\nallow_destinations = [\"127.0.0.0/8\"]\n\n[[token]]\nname = \"demo\"\nsecret = \"demo-token\"\n\n",
        port.saturating_add(1)
    );
    for (last, cc, city) in demo {
        toml.push_str(&format!(
            "[[exit]]\nname = \"{cc}-{city}\"\nbind = \"127.0.0.{last}\"\ncountry = \"{cc}\"\ncity = \"{city}\"\ntype = \"datacenter\"\n\n"
        ));
    }
    let dir = std::env::temp_dir().join(format!("ipsx-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let path = dir.join("gateway.toml");
    std::fs::write(&path, &toml).map_err(|e| e.to_string())?;
    let config =
        GatewayConfig::from_toml(&toml, &path.display().to_string()).map_err(|e| e.to_string())?;
    let echo_url = format!("http://{echo_addr}/ip");
    let proxy = SocketAddr::from(([127, 0, 0, 1], port));
    println!("ipsx is up.");
    println!("  proxy URL:   http://demo:demo-token@{proxy}   (HTTP and SOCKS5 on one port)");
    println!("  echo target: {echo_url}");
    println!("  config:      {}", path.display());
    println!("try:");
    println!("  curl -x http://demo-country-de-session-s1:demo-token@{proxy} {echo_url}");
    println!("  curl --socks5-hostname demo-country-us:demo-token@{proxy} {echo_url}");
    serve(config, Some(path), terminated()).await
}
