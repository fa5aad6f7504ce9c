//! Interop with wireguard-go (an implementation nobody here wrote), inside network
//! namespaces the tests create. Needs root, `ip netns`, wireguard-go and wg
//! (scripts/install-tunnel.sh); without them the tests fail, they do not skip.
#![allow(clippy::unwrap_used)]

use crate::common;
use crate::natlab;

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

// === NAT traversal (issue 11): namespaces with NAT routers, coturn, real tunnels ===

mod nat {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use super::common::{exit_config, get_body, whoami_server};
    use super::natlab::{Host, Lab, Nat, TURN_PASSWORD, TURN_USER};
    use ipsx_provider::ProviderExit;
    use ipsx_provider::config::NatSection;
    use ipsx_tunnel_pool::{NatPath, RelayMode, SecretKey, Tunnel, TunnelConfig};

    /// One lab setup: an exit in the provider's namespace, a tunnel to it in the
    /// requester's, the echo target and a bulk origin on the public side.
    struct Setup {
        exit: ipsx_provider::ProviderHandle,
        tunnel: Tunnel,
        who: SocketAddr,
        bulk: SocketAddr,
    }

    /// Starts coturn, the echo target (public side), an exit in `prov` and a tunnel in
    /// `req`; both learn their mappings from coturn and the requester's endpoint is
    /// given to the exit (as a deal carries it). Checks the paths found: `want` for the
    /// exit, `want_req` for the requester.
    async fn setup(
        lab: &mut Lab,
        prov: &Host,
        req: &Host,
        want: NatPath,
        want_req: NatPath,
    ) -> Setup {
        lab.start_turnserver();
        let public = lab.public_ns.clone();
        let pub_rt = lab.runtime(&public);
        let target = lab.target_ip();
        let who = pub_rt
            .spawn(async move { whoami_server(&format!("{target}:0")).await })
            .await
            .unwrap();
        let bulk = pub_rt
            .spawn(async move { bulk_server(SocketAddr::new(IpAddr::V4(target), 0)).await })
            .await
            .unwrap();

        let mut cfg = exit_config(&prov.ip.to_string(), &[&format!("{target}/32")]);
        cfg.listen = "0.0.0.0:0".parse().unwrap();
        cfg.nat = NatSection {
            stun: vec![lab.turn_addr(), lab.stun2_addr()],
            turn: Some(lab.turn_addr()),
            turn_username: TURN_USER.into(),
            turn_password: TURN_PASSWORD.into(),
            relay: Some("auto".into()),
            timeout_s: Some(3),
        };
        let prov_rt = lab.runtime(&prov.ns);
        let exit = prov_rt
            .spawn(ProviderExit::start(cfg))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.nat_path(), want, "exit's path");
        let ep = exit
            .public_endpoint()
            .expect("exit found no public endpoint");
        match want {
            NatPath::Relayed => assert_eq!(ep.ip(), lab.turn_addr().ip(), "relayed address"),
            _ => assert_eq!(ep.ip(), IpAddr::V4(prov.public_ip), "exit's mapping"),
        }

        let client = SecretKey::generate();
        let client_pub = client.public_key();
        let mut tcfg =
            TunnelConfig::new(client, exit.public_key(), ep, Ipv4Addr::new(10, 77, 0, 2));
        tcfg.nat = lab.nat_settings();
        tcfg.nat.relay = RelayMode::Never;
        let req_rt = lab.runtime(&req.ns);
        let tunnel = req_rt.spawn(Tunnel::start(tcfg)).await.unwrap().unwrap();
        assert_eq!(tunnel.nat_path(), want_req, "requester's path");
        let req_ep = tunnel
            .public_endpoint()
            .expect("requester found no mapping");
        assert_eq!(
            req_ep.ip(),
            IpAddr::V4(req.public_ip),
            "requester's mapping"
        );

        // The deal hands the requester's endpoint to the exit, which sends first.
        exit.add_peer_at(client_pub, "10.77.0.2".parse().unwrap(), Some(req_ep))
            .await
            .unwrap();
        Setup {
            exit,
            tunnel,
            who: SocketAddr::new(IpAddr::V4(target), who.port()),
            bulk,
        }
    }

    /// A GET through the tunnel must reach the target from the provider's public (NAT)
    /// address.
    async fn through(lab: &mut Lab, prov: &Host, req: &Host, want: NatPath, want_req: NatPath) {
        let Setup {
            exit, tunnel, who, ..
        } = setup(lab, prov, req, want, want_req).await;
        let mut s = tokio::time::timeout(Duration::from_secs(25), tunnel.connect_tcp(who))
            .await
            .expect("no connection through the tunnel")
            .unwrap_or_else(|e| {
                panic!(
                    "connect: {e}; tunnel {:?}; exit {:?}",
                    tunnel.health(),
                    exit.counters()
                )
            });
        let body = tokio::time::timeout(Duration::from_secs(25), get_body(&mut s))
            .await
            .expect("no answer through the tunnel");
        assert_eq!(
            body,
            prov.public_ip.to_string(),
            "the target saw the NAT address"
        );
        drop(s);
        assert!(tunnel.health().counters.handshakes >= 1);
        tunnel.shutdown().await;
        exit.shutdown().await;
    }

    /// Serves `GET /N` with N bytes (keep-alive); returns its address.
    async fn bulk_server(bind: SocketAddr) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = 0;
                    let chunk = vec![7u8; 64 * 1024];
                    loop {
                        let Ok(n) = s.read(&mut buf[have..]).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        have += n;
                        let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n")
                        else {
                            if have == buf.len() {
                                return;
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        let len: usize = head
                            .split_whitespace()
                            .nth(1)
                            .and_then(|p| p.trim_start_matches('/').parse().ok())
                            .unwrap_or(0)
                            .min(1 << 30);
                        let hdr = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                        if s.write_all(hdr.as_bytes()).await.is_err() {
                            return;
                        }
                        let mut left = len;
                        while left > 0 {
                            let n = left.min(chunk.len());
                            if s.write_all(&chunk[..n]).await.is_err() {
                                return;
                            }
                            left -= n;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                });
            }
        });
        addr
    }

    /// GET `/len` on `s` and read the whole body; returns the body length.
    async fn fetch(s: &mut ipsx_tunnel_pool::TunnelStream, len: usize) -> usize {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(format!("GET /{len} HTTP/1.1\r\nHost: b\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut head = Vec::new();
        let mut body = 0usize;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed mid-response");
            if head.is_empty() || !head.ends_with(b"\r\n\r\n") {
                head.extend_from_slice(&buf[..n]);
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    body = head.len() - end - 4;
                    head.truncate(end + 4);
                }
            } else {
                body += n;
            }
            if head.ends_with(b"\r\n\r\n") && body >= len {
                return body;
            }
        }
    }

    /// `benches/nat/run.sh`: requests per second and MB/s through each path, one run.
    /// Ignored by default (it measures, it does not check).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark: run by benches/nat/run.sh"]
    async fn bench_paths() {
        let requests: usize = std::env::var("IPSX_BENCH_REQUESTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        let mib: usize = std::env::var("IPSX_BENCH_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(32);
        let mut rows: Vec<(NatPath, f64, f64)> = Vec::new();
        for path in NatPath::ALL {
            let mut lab = Lab::new();
            let (prov, req, want_req) = match path {
                NatPath::Direct => (lab.public_host(), lab.public_host(), NatPath::Direct),
                NatPath::Punched => (
                    lab.host_behind(Nat::Cone),
                    lab.host_behind(Nat::Cone),
                    NatPath::Punched,
                ),
                NatPath::Relayed => (
                    lab.host_behind(Nat::Symmetric),
                    lab.public_host(),
                    NatPath::Direct,
                ),
            };
            let st = setup(&mut lab, &prov, &req, path, want_req).await;
            let mut s =
                tokio::time::timeout(Duration::from_secs(25), st.tunnel.connect_tcp(st.bulk))
                    .await
                    .expect("no connection")
                    .unwrap();
            fetch(&mut s, 1).await; // warm up
            let t0 = std::time::Instant::now();
            for _ in 0..requests {
                fetch(&mut s, 100).await;
            }
            let rps = requests as f64 / t0.elapsed().as_secs_f64();
            let t0 = std::time::Instant::now();
            let got = fetch(&mut s, mib << 20).await;
            let mbps = got as f64 / (1024.0 * 1024.0) / t0.elapsed().as_secs_f64();
            rows.push((path, rps, mbps));
            drop(s);
            st.tunnel.shutdown().await;
            st.exit.shutdown().await;
        }
        let (_, drps, dmbps) = rows[0];
        println!("path       req/s   x direct     MB/s   x direct");
        for (p, rps, mbps) in rows {
            println!(
                "{:<8} {:>8.0} {:>9.2} {:>9.1} {:>9.2}",
                p.as_str(),
                rps,
                rps / drps,
                mbps,
                mbps / dmbps
            );
        }
    }

    /// (a) Provider behind a port-restricted cone NAT, requester public: the exit
    /// advertises its STUN mapping and opens it by sending the first handshake.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provider_behind_cone_nat() {
        let mut lab = Lab::new();
        let prov = lab.host_behind(Nat::Cone);
        let req = lab.public_host();
        through(&mut lab, &prov, &req, NatPath::Punched, NatPath::Direct).await;
    }

    /// (b) Both behind cone NATs: both learn their mappings, both send first (hole
    /// punching).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_behind_cone_nats() {
        let mut lab = Lab::new();
        let prov = lab.host_behind(Nat::Cone);
        let req = lab.host_behind(Nat::Cone);
        through(&mut lab, &prov, &req, NatPath::Punched, NatPath::Punched).await;
    }

    /// (c) Provider behind a symmetric NAT (`--random-fully`): STUN sees two mappings,
    /// the exit relays through a TURN allocation on coturn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provider_behind_symmetric_nat_relays() {
        let mut lab = Lab::new();
        let prov = lab.host_behind(Nat::Symmetric);
        let req = lab.public_host();
        through(&mut lab, &prov, &req, NatPath::Relayed, NatPath::Direct).await;
    }
}
