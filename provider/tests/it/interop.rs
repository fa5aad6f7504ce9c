//! Interop with wireguard-go (an implementation nobody here wrote), inside network
//! namespaces the tests create. Needs root, `ip netns`, wireguard-go and wg
//! (scripts/install-tunnel.sh); without them the tests fail, they do not skip.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use common::netns::Netns;
use common::*;
use ipsx_tunnel_pool::{SecretKey, Tunnel, TunnelConfig, key_to_base64};

/// (a) gateway tunnel (ours) -> wireguard-go exit in a namespace hosting the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_tunnel_to_a_wireguard_go_exit() {
    let mut ns = Netns::new();
    let exit_key = SecretKey::generate();
    let ifname = format!("wgx{}", ns.name.trim_start_matches("ipsx"));
    // Any free port: bind, read it, release it, hand it to wireguard-go.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    ns.wireguard_go(&ifname, &exit_key.0, Some(port));
    let client = SecretKey::generate();
    ns.exec(&[
        "wg",
        "set",
        &ifname,
        "peer",
        &key_to_base64(&client.public_key()),
        "allowed-ips",
        "10.99.0.2/32",
    ]);
    ns.exec(&["ip", "addr", "add", "10.99.0.1/24", "dev", &ifname]);
    ns.exec(&["ip", "link", "set", &ifname, "up"]);
    let web = ns.whoami("10.99.0.1");

    let endpoint = SocketAddr::new(IpAddr::V4(ns.ns_ip()), port);
    let cfg = TunnelConfig::new(
        client,
        exit_key.public_key(),
        endpoint,
        Ipv4Addr::new(10, 99, 0, 2),
    );
    let tunnel = Tunnel::start(cfg).await.unwrap();
    let mut s = tunnel
        .connect_tcp(SocketAddr::new("10.99.0.1".parse().unwrap(), web))
        .await
        .unwrap();
    // wireguard-go does no NAT: the target sees our inner address.
    assert_eq!(get_body(&mut s).await, "10.99.0.2");
    assert_eq!(get_body(&mut s).await, "10.99.0.2");
    drop(s);
    let h = tunnel.health();
    assert!(h.healthy, "{h:?}");
    assert!(h.counters.handshakes >= 1);
    let shown = ns.exec(&["wg", "show", &ifname, "latest-handshakes"]);
    assert!(
        shown.contains(&key_to_base64(&tunnel.config().private_key.public_key())),
        "{shown}"
    );
    tunnel.shutdown().await;
}

/// (b) wireguard-go client in a namespace -> our provider exit -> target on the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_go_client_through_our_exit() {
    let mut ns = Netns::new();
    let target_ip = ns.target_ip().to_string();
    let who = whoami_server(&format!("{target_ip}:0")).await;
    // The exit leaves from the host's veth address; the target's address is named in
    // the test allow-list (it is one of this host's own addresses).
    let mut cfg = exit_config(&ns.host_ip().to_string(), &[&format!("{target_ip}/32")]);
    cfg.listen = SocketAddr::new(IpAddr::V4(ns.host_ip()), 0);
    let exit = ipsx_provider::ProviderExit::start(cfg).await.unwrap();
    let client = SecretKey::generate();
    exit.add_peer(client.public_key(), "10.77.0.2".parse().unwrap())
        .await
        .unwrap();

    let ifname = format!("wgc{}", ns.name.trim_start_matches("ipsx"));
    ns.wireguard_go(&ifname, &client.0, None);
    ns.exec(&[
        "wg",
        "set",
        &ifname,
        "peer",
        &key_to_base64(&exit.public_key()),
        "endpoint",
        &exit.local_addr().to_string(),
        "allowed-ips",
        "0.0.0.0/0",
    ]);
    ns.exec(&["ip", "addr", "add", "10.77.0.2/32", "dev", &ifname]);
    ns.exec(&["ip", "link", "set", &ifname, "up"]);
    ns.exec(&[
        "ip",
        "route",
        "add",
        &format!("{target_ip}/32"),
        "dev",
        &ifname,
    ]);

    let url = format!("http://{target_ip}:{}/ip", who.port());
    let body = tokio::task::spawn_blocking({
        let name = ns.name.clone();
        move || {
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &name,
                    "curl",
                    "-s",
                    "--max-time",
                    "20",
                    &url,
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    })
    .await
    .unwrap();
    assert_eq!(
        body,
        ns.host_ip().to_string(),
        "target saw the exit address"
    );
    let c = exit.counters();
    assert!(c.handshakes >= 1 && c.flows >= 1, "{c:?}");
    let m = exit.meter(&client.public_key()).unwrap();
    assert!(m.bytes_up > 0 && m.bytes_down > 0, "{m:?}");

    exit.shutdown().await;
}
