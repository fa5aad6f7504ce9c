//! `ipsx exchange`: the exchange node.

use std::net::SocketAddr;
use std::path::Path;

use tokio::signal::unix::{SignalKind, signal};

/// Runs the exchange until SIGINT or SIGTERM.
pub(crate) async fn run(path: &Path, listen: SocketAddr) -> Result<(), String> {
    let config = ipsx_exchange::ExchangeConfig::load(path).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("exchange: cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("exchange listening on http://{addr}");
    let shutdown = async {
        let mut term = match signal(SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    ipsx_exchange::serve(listener, config, shutdown)
        .await
        .map_err(|e| e.to_string())
}
