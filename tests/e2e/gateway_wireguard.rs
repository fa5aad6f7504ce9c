//! The gateway over WireGuard exits: our userspace tunnels to our provider exits on
//! loopback (wg-quick files in the gateway config), rotation across them, names
//! resolved at the exit, exit-address verification, and a dead exit avoided.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;
use crate::provider_common;

use std::collections::HashSet;
use std::net::Ipv4Addr;

use common::*;
use ipsx_tunnel_pool::{SecretKey, key_to_base64};

struct Exit {
    handle: ipsx_provider::ProviderHandle,
    conf_path: std::path::PathBuf,
}

/// Starts one of our provider exits leaving from `exit_ip`, and writes the wg-quick
/// file a gateway uses to reach it.
async fn provider(
    dir: &std::path::Path,
    name: &str,
    exit_ip: &str,
    dns: std::net::SocketAddr,
) -> Exit {
    let mut cfg = provider_common::exit_config(exit_ip, &["127.0.0.0/8"]);
    cfg.dns_upstream = Some(dns);
    let handle = ipsx_provider::ProviderExit::start(cfg).await.unwrap();
    let client = SecretKey::generate();
    handle
        .add_peer(client.public_key(), "10.77.0.2".parse().unwrap())
        .await
        .unwrap();
    let conf = format!(
        "[Interface]\nPrivateKey = {}\nAddress = 10.77.0.2/32\nDNS = 10.77.0.1\n\n[Peer]\nPublicKey = {}\nEndpoint = {}\nAllowedIPs = 0.0.0.0/0\nPersistentKeepalive = 25\n",
        key_to_base64(&client.0),
        key_to_base64(&handle.public_key()),
        handle.local_addr(),
    );
    let conf_path = dir.join(format!("{name}.conf"));
    std::fs::write(&conf_path, conf).unwrap();
    Exit { handle, conf_path }
}

fn tempdir() -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("ipsx-wg-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_wireguard_exits_sees_each_provider_address() {
    let echo = Echo::start().await;
    let dns = provider_common::dns_server(vec![("echo.test", Ipv4Addr::new(127, 0, 0, 1))]).await;
    let dir = tempdir();
    let de = provider(&dir, "de", "127.0.0.2", dns).await;
    let us = provider(&dir, "us", "127.0.0.4", dns).await;
    let fr = provider(&dir, "fr", "127.0.0.6", dns).await;
    let mut cfg = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nallow_destinations = [\"127.0.0.0/8\"]\nconnect_timeout = \"3s\"\nverify_url = \"http://echo.test:{}/ip.txt\"\n\n[[token]]\nname = \"t\"\nsecret = \"{TOKEN}\"\n\n",
        echo.addr.port()
    );
    for (name, exit, ip) in [
        ("de", &de, "127.0.0.2"),
        ("us", &us, "127.0.0.4"),
        ("fr", &fr, "127.0.0.6"),
    ] {
        cfg.push_str(&format!(
            "[[exit]]\nname = \"wg-{name}\"\nwireguard = \"{}\"\nexit_ip = \"{ip}\"\ncountry = \"{name}\"\n\n",
            exit.conf_path.display()
        ));
    }
    let gw = TestGateway::start(&cfg).await;
    gw.gateway.check_exits().await;

    // Rotation across the three tunnels; each answer shows the provider's exit address.
    let url = format!("http://echo.test:{}/ip", echo.addr.port());
    let mut args = vec![
        "--proxy".to_owned(),
        gw.socks("acct"),
        "-H".into(),
        "Connection: close".into(),
    ];
    args.extend((0..30).map(|_| url.clone()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = curl(&refs).await;
    let ips = echo_ips(&out.stdout);
    assert_eq!(ips.len(), 30, "{}", String::from_utf8_lossy(&out.stderr));
    let distinct: HashSet<&String> = ips.iter().collect();
    assert_eq!(distinct.len(), 3, "{distinct:?}");
    // Plain HTTP with targeting: the name `echo.test` only exists at the exit's resolver.
    let out = curl(&["-x", &gw.proxy("acct-country-us"), &url, &url]).await;
    assert_eq!(
        echo_ips(&out.stdout),
        vec!["127.0.0.4".to_owned(); 2],
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The exits were verified to leave from the addresses they promised.
    for exit in gw.gateway.rotator().exits() {
        assert!(exit.healthy, "{exit:?}");
    }

    // A provider stops: requests keep working on the others (a dial into the dead tunnel
    // times out and moves on, and health takes the exit out of rotation).
    de.handle.shutdown().await;
    let out = curl(&["-x", &gw.proxy("acct"), &url, &url, &url, &url]).await;
    let ips = echo_ips(&out.stdout);
    assert_eq!(ips.len(), 4, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(ips.iter().all(|ip| ip != "127.0.0.2"), "{ips:?}");
    us.handle.shutdown().await;
    fr.handle.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_exit_is_marked_unhealthy() {
    let echo = Echo::start().await;
    let dns = provider_common::dns_server(vec![("echo.test", Ipv4Addr::new(127, 0, 0, 1))]).await;
    let dir = tempdir();
    let liar = provider(&dir, "liar", "127.0.0.3", dns).await;
    let cfg = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nallow_destinations = [\"127.0.0.0/8\"]\nverify_url = \"http://echo.test:{}/ip.txt\"\n\n[[exit]]\nname = \"liar\"\nwireguard = \"{}\"\nexit_ip = \"127.0.0.9\"\n",
        echo.addr.port(),
        liar.conf_path.display()
    );
    let gw = TestGateway::start(&cfg).await;
    gw.gateway.check_exits().await;
    let exits = gw.gateway.rotator().exits();
    assert!(
        !exits[0].healthy,
        "exit promised 127.0.0.9 but leaves from 127.0.0.3"
    );
    let out = curl(&["-i", "-x", &format!("http://{}", gw.addr), &echo.url()]).await;
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("HTTP/1.1 503"));
    liar.handle.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wireguard_exit_config_errors_name_the_file_line_and_key() {
    let dir = tempdir();
    let conf = dir.join("bad.conf");
    std::fs::write(&conf, "[Interface]\nPrivateKey = nope\n").unwrap();
    let text = format!(
        "[[exit]]\nname = \"x\"\nwireguard = \"{}\"\n",
        conf.display()
    );
    let err = ipsx_config::GatewayConfig::from_toml(&text, "gw.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gw.toml:3:")
            && err.contains("exit[0].wireguard")
            && err.contains("PrivateKey"),
        "{err}"
    );
    let both = format!(
        "[[exit]]\nname = \"x\"\nbind = \"127.0.0.2\"\nwireguard = \"{}\"\n",
        conf.display()
    );
    let err = ipsx_config::GatewayConfig::from_toml(&both, "gw.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not both"), "{err}");
    let missing = "[[exit]]\nname = \"x\"\nwireguard = \"/nonexistent/x.conf\"\n";
    let err = ipsx_config::GatewayConfig::from_toml(missing, "gw.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/x.conf"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A DNS query (A, recursion desired) for `name`, with id 0x4242.
fn dns_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x42, 0x42, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_udp_through_a_wireguard_exit() {
    use crate::gateway_hostile::{udp_answer, udp_associate, udp_datagram};
    let dns = provider_common::dns_server(vec![("echo.test", Ipv4Addr::new(127, 0, 0, 1))]).await;
    let dir = tempdir();
    let de = provider(&dir, "de", "127.0.0.2", dns).await;
    let cfg = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nallow_destinations = [\"127.0.0.0/8\"]\nconnect_timeout = \"3s\"\n\n[[token]]\nname = \"t\"\nsecret = \"{TOKEN}\"\n\n[[exit]]\nname = \"wg-de\"\nwireguard = \"{}\"\ncountry = \"de\"\n",
        de.conf_path.display()
    );
    let gw = TestGateway::start(&cfg).await;
    // Until the tunnel's first handshake, health keeps the exit out of rotation.
    for _ in 0..100 {
        gw.gateway.check_exits().await;
        if gw.gateway.rotator().exits().iter().all(|e| e.healthy) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (_control, code, relay) =
        udp_associate(gw.addr, "acct-country-de", &[1, 0, 0, 0, 0, 0, 0]).await;
    assert_eq!(code, 0);
    let relay = relay.unwrap();
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // A DNS query over UDP through the tunnel: the provider's resolver answers it (it
    // serves port 53 of any destination when it has an upstream), and the answer comes
    // back in a SOCKS header naming the address the client sent to.
    let resolver: std::net::SocketAddr = "127.0.0.53:53".parse().unwrap();
    client
        .send_to(&udp_datagram(resolver, &dns_query("echo.test")), relay)
        .await
        .unwrap();
    let (src, answer) = udp_answer(&client).await.expect("a DNS answer");
    assert_eq!(src, resolver);
    assert_eq!(&answer[..2], &[0x42, 0x42], "same query id");
    assert_eq!(&answer[answer.len() - 4..], &[127, 0, 0, 1], "{answer:?}");
    // Any UDP: the provider relays it out of its exit address, and the answers come
    // back through the tunnel.
    let echo = crate::gateway_clients::UdpEcho::start().await;
    for i in 0..5 {
        let payload = format!("ping-{i}");
        client
            .send_to(&udp_datagram(echo.addr, payload.as_bytes()), relay)
            .await
            .unwrap();
        let (src, answer) = udp_answer(&client).await.expect("the echo answered");
        assert_eq!(src, echo.addr);
        let answer = String::from_utf8(answer).unwrap();
        let (seen, echoed) = answer.split_once('|').unwrap();
        assert_eq!(echoed, payload);
        let seen: std::net::SocketAddr = seen.parse().unwrap();
        assert_eq!(
            seen.ip().to_string(),
            "127.0.0.2",
            "left from the provider's exit address"
        );
    }
    assert_eq!(echo.received(), 5);
    // A payload larger than one datagram inside the tunnel is dropped, not cut.
    let before = gw.gateway.udp_stats();
    client
        .send_to(&udp_datagram(resolver, &vec![0u8; 1500]), relay)
        .await
        .unwrap();
    let oversize = ipsx_gateway::udp::Dropped::Oversize;
    let counted = crate::gateway_hostile::eventually(|| {
        gw.gateway.udp_stats().dropped(oversize) > before.dropped(oversize)
    })
    .await;
    assert!(counted, "{:?}", gw.gateway.udp_stats());
    de.handle.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
