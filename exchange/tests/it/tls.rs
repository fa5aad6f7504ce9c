//! HTTPS: the node serves the same API over rustls when `tls` is configured.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::sync::Arc;

use ipsx_exchange::ExchangeConfig;
use ipsx_exchange::config::TlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_served_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    // A throw-away CA and a leaf for 127.0.0.1 / localhost signed by it.
    let d = dir.path();
    let ca = d.join("ca.pem");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(d)
            .args(args)
            .output()
            .expect("openssl (scripts/install-base.sh)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "1",
                "-subj",
                "/CN=test ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    let mut cfg = ExchangeConfig::for_tests(
        format!("sqlite://{}/j.db", dir.path().display()),
        Default::default(),
    );
    cfg.tls = Some(TlsConfig {
        cert: cert.clone(),
        key: key.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(ipsx_exchange::serve(listener, cfg, async {
        let _ = stopped.await;
    }));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let mut body = String::new();
    for _ in 0..100 {
        let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let r = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await;
        if task.is_finished() {
            break;
        }
        let Ok(mut tls) = r else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        tls.write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        tls.read_to_string(&mut body).await.unwrap();
        break;
    }
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.ends_with("ok"), "{body}");
    // Plain HTTP on the TLS port is not served.
    let plain = reqwest::get(format!("http://{addr}/v1/health")).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    // A missing key file is a config error naming the key.
    let mut bad = ExchangeConfig::for_tests(
        format!("sqlite://{}/k.db", dir.path().display()),
        Default::default(),
    );
    bad.tls = Some(TlsConfig {
        cert,
        key: dir.path().join("nope.pem"),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = ipsx_exchange::serve(listener, bad, async {})
        .await
        .unwrap_err();
    assert!(e.to_string().contains("tls.key"), "{e}");
}
