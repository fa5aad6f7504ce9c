//! `ipsx-exchange --config FILE [--listen ADDR]`: runs the exchange node alone (the
//! integrated binary's `ipsx exchange` does the same). Prints `listening on ADDR` once
//! the journal is replayed and the socket is bound; stops on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use ipsx_exchange::ExchangeConfig;

fn usage() -> ExitCode {
    eprintln!("usage: ipsx-exchange --config FILE [--listen ADDR (default 127.0.0.1:8700)]");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut config = None;
    let mut listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8700));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--config", Some(v)) => config = Some(PathBuf::from(v)),
            ("--listen", Some(v)) => match v.parse() {
                Ok(l) => listen = l,
                Err(_) => return usage(),
            },
            _ => return usage(),
        }
    }
    let Some(path) = config else { return usage() };
    let cfg = match ExchangeConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ipsx-exchange: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ipsx-exchange: bind {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().map_or(listen, |a| a);
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    eprintln!("ipsx-exchange: starting on {addr}");
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ipsx_exchange::server::serve_ready(
        listener, cfg, shutdown, ready_tx,
    ));
    if ready_rx.await.is_ok() {
        println!("listening on {addr}");
    }
    match server.await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("ipsx-exchange: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("ipsx-exchange: {e}");
            ExitCode::FAILURE
        }
    }
}
