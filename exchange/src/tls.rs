//! HTTPS for the API: rustls (ring provider) in front of the same axum router, with the
//! same graceful shutdown as the plain listener.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::error::ExchangeError;

fn cfg_err(key: &str, e: impl std::fmt::Display) -> ExchangeError {
    ExchangeError::Config {
        key: key.into(),
        reason: e.to_string(),
    }
}

/// Builds the rustls server config from the PEM files.
pub fn server_config(tls: &TlsConfig) -> Result<rustls::ServerConfig, ExchangeError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| cfg_err("tls.cert", e))?
        .collect::<Result<_, _>>()
        .map_err(|e| cfg_err("tls.cert", e))?;
    if certs.is_empty() {
        return Err(cfg_err("tls.cert", "no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| cfg_err("tls.key", e))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| cfg_err("tls", e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| cfg_err("tls.key", e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Serves `app` over TLS on `listener` until `shutdown`, then lets connections finish
/// (at most 10 s).
pub(crate) async fn serve_tls(
    listener: TcpListener,
    app: Router,
    tls: &TlsConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ExchangeError> {
    let acceptor = TlsAcceptor::from(Arc::new(server_config(tls)?));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((tcp, peer)) = accepted else { continue };
                // The client address, for the per-address rate limit (as axum::serve's
                // connect info does on plain HTTP).
                let app = app.clone().layer(axum::Extension(axum::extract::ConnectInfo(peer)));
                let (acceptor, mut stop) = (acceptor.clone(), stop_rx.clone());
                tasks.spawn(async move {
                    let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await else {
                        return;
                    };
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(
                        TokioIo::new(stream),
                        TowerToHyperService::new(app),
                    );
                    let mut conn = std::pin::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = stop.changed() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        }
        while tasks.try_join_next().is_some() {}
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}
