//! Gateway tunnel (tunnel-pool) -> our provider exit, all on loopback.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use ipsx_tunnel_pool::TunnelPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn echo_and_exit_address_through_our_exit() {
    let echo = echo_server("127.0.0.1:0").await;
    let who = whoami_server("127.0.0.1:0").await;
    let p = pair(exit_config("127.0.0.2", &["127.0.0.0/8"])).await;

    let mut s = p.tunnel.connect_tcp(echo).await.unwrap();
    s.write_all(b"hello through wireguard").await.unwrap();
    let mut buf = [0u8; 23];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello through wireguard");
    drop(s);

    let mut s = p.tunnel.connect_tcp(who).await.unwrap();
    assert_eq!(get_body(&mut s).await, "127.0.0.2");
    assert_eq!(get_body(&mut s).await, "127.0.0.2", "keep-alive works");
    drop(s);

    let h = p.tunnel.health();
    assert!(h.healthy, "{h:?}");
    assert!(h.counters.handshakes >= 1);
    assert!(h.last_handshake_age.is_some());
    assert!(h.rtt_ewma.is_some());

    p.tunnel
        .verify_exit(&format!("http://{who}/ip"), "127.0.0.2".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(p.tunnel.health().exit_verified, Some(true));
    let err = p
        .tunnel
        .verify_exit(&format!("http://{who}/ip"), "127.0.0.9".parse().unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("127.0.0.9"), "{err}");
    let h = p.tunnel.health();
    assert!(!h.healthy);
    assert_eq!(h.state, ipsx_tunnel_pool::HealthState::WrongExitAddress);
    p.tunnel.shutdown().await;
    p.exit.shutdown().await;
}

#[tokio::test]
async fn several_exits_in_one_pool_leave_from_their_own_addresses() {
    let who = whoami_server("127.0.0.1:0").await;
    let pool = TunnelPool::new();
    let mut exits = Vec::new();
    for (i, ip) in ["127.0.0.2", "127.0.0.3", "127.0.0.4"].iter().enumerate() {
        let cfg = exit_config(ip, &["127.0.0.0/8"]);
        let exit = ipsx_provider::ProviderExit::start(cfg).await.unwrap();
        let client = ipsx_tunnel_pool::SecretKey::generate();
        exit.add_peer(client.public_key(), "10.77.0.2".parse().unwrap())
            .await
            .unwrap();
        let tcfg = ipsx_tunnel_pool::TunnelConfig::new(
            client,
            exit.public_key(),
            exit.local_addr(),
            Ipv4Addr::new(10, 77, 0, 2),
        );
        pool.add(&format!("exit{i}"), tcfg).await.unwrap();
        exits.push((ip.to_string(), exit));
    }
    assert_eq!(pool.len(), 3);
    let dup = ipsx_tunnel_pool::TunnelConfig::new(
        ipsx_tunnel_pool::SecretKey::generate(),
        [9; 32],
        "127.0.0.1:9".parse().unwrap(),
        Ipv4Addr::new(10, 77, 0, 9),
    );
    assert!(matches!(
        pool.add("exit0", dup).await,
        Err(ipsx_tunnel_pool::TunnelError::DuplicateName(_))
    ));
    let t0 = pool.get("exit0").unwrap();
    assert!(matches!(
        t0.connect_tcp("[2001:db8::1]:80".parse().unwrap()).await,
        Err(ipsx_tunnel_pool::TunnelError::NoIpv6(_))
    ));
    assert!(matches!(
        t0.connect_tcp("0.0.0.0:80".parse().unwrap()).await,
        Err(ipsx_tunnel_pool::TunnelError::BadDestination(_))
    ));
    assert!(
        t0.resolve("x.test").await.is_err(),
        "no DNS server configured"
    );
    for (i, (ip, _)) in exits.iter().enumerate() {
        let t = pool.get(&format!("exit{i}")).unwrap();
        let mut s = t.connect_tcp(who).await.unwrap();
        assert_eq!(&get_body(&mut s).await, ip);
    }
    let listed = pool.list();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|(_, h)| h.healthy));
    assert!(pool.remove("exit1").await);
    assert!(!pool.remove("exit1").await);
    assert!(pool.get("exit1").is_none());
    assert_eq!(pool.healthy(&Default::default()).len(), 2);
    for (_, e) in exits {
        e.shutdown().await;
    }
}

#[tokio::test]
async fn dns_names_resolve_at_the_exit() {
    let who = whoami_server("127.0.0.1:0").await;
    let dns = dns_server(vec![("target.test", Ipv4Addr::new(127, 0, 0, 1))]).await;
    let mut cfg = exit_config("127.0.0.3", &["127.0.0.0/8"]);
    cfg.dns_upstream = Some(dns);
    let p = pair(cfg).await;
    let addrs = p.tunnel.resolve("target.test").await.unwrap();
    assert_eq!(addrs, vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))]);
    // Cached: a second lookup needs no query.
    let before = p.exit.counters().dns_forwarded;
    assert_eq!(p.tunnel.resolve("TARGET.test.").await.unwrap(), addrs);
    assert_eq!(p.exit.counters().dns_forwarded, before);
    let err = p.tunnel.resolve("nothing.test").await.unwrap_err();
    assert!(err.to_string().contains("nothing.test"), "{err}");
    assert!(p.tunnel.resolve("bad name!").await.is_err());
    // And through to the target by name.
    p.tunnel
        .verify_exit(
            &format!("http://target.test:{}/ip", who.port()),
            "127.0.0.3".parse().unwrap(),
        )
        .await
        .unwrap();
    p.exit.shutdown().await;
}

#[tokio::test]
async fn egress_refusals_are_dropped_and_counted() {
    let echo = echo_server("127.0.0.1:0").await;
    // Only 127.0.0.1 is allowed (the test's target); everything else keeps the rules.
    let p = pair(exit_config("127.0.0.2", &["127.0.0.1/32"])).await;
    let refused: [SocketAddr; 6] = [
        "127.0.0.5:80".parse().unwrap(),       // loopback
        "127.0.0.2:80".parse().unwrap(),       // the exit's own address
        "169.254.169.254:80".parse().unwrap(), // metadata
        "10.0.0.1:80".parse().unwrap(),        // own LAN (private)
        "192.168.1.1:443".parse().unwrap(),    // own LAN (private)
        "100.64.0.1:80".parse().unwrap(),      // CGNAT
    ];
    for dst in refused {
        let err = p.tunnel.connect_tcp(dst).await.unwrap_err();
        assert!(
            matches!(err, ipsx_tunnel_pool::TunnelError::Connect { .. }),
            "{dst}: {err}"
        );
    }
    let c = p.exit.counters();
    assert!(c.refused >= 6, "{c:?}");
    assert_eq!(c.flows, 0);
    assert!(p.exit.meter(&p.client_pub).unwrap().refused >= 6);
    // The tunnel still works for an allowed target.
    let mut s = p.tunnel.connect_tcp(echo).await.unwrap();
    s.write_all(b"ok").await.unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await.unwrap();
    p.exit.shutdown().await;
}

#[tokio::test]
async fn metering_and_log_hash_chain() {
    let sink = sink_server("127.0.0.1:0").await;
    let p = pair(exit_config("127.0.0.2", &["127.0.0.0/8"])).await;
    let payload = vec![0x5a; 300_000];
    let mut s = p.tunnel.connect_tcp(sink).await.unwrap();
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await.unwrap();
    assert_eq!(u64::from_be_bytes(n), payload.len() as u64);
    drop(s);
    // The relay appends the log entry when both sides are closed.
    let mut log = Vec::new();
    for _ in 0..200 {
        log = p.exit.log(&p.client_pub).unwrap();
        if !log.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].dst, sink);
    assert_eq!(log[0].bytes_up, payload.len() as u64);
    assert_eq!(log[0].bytes_down, 8);
    let m = p.exit.meter(&p.client_pub).unwrap();
    assert_eq!(m.bytes_up, payload.len() as u64);
    assert_eq!(m.flows, 1);
    assert!(m.seconds_active >= 1);
    let mut h = ipsx_provider::meter::genesis(&p.client_pub);
    for e in &log {
        h = ipsx_provider::meter::chain(&h, e);
    }
    assert_eq!(Some(h), p.exit.log_hash(&p.client_pub));
    // Removing the peer stops service but keeps the meter for settlement.
    assert!(p.exit.remove_peer(&p.client_pub).await);
    assert!(p.exit.meter(&p.client_pub).is_some());
    p.exit.shutdown().await;
}

#[tokio::test]
async fn bulk_both_ways_is_intact() {
    let echo = echo_server("127.0.0.1:0").await;
    let p = pair(exit_config("127.0.0.2", &["127.0.0.0/8"])).await;
    let s = p.tunnel.connect_tcp(echo).await.unwrap();
    let (mut r, mut w) = tokio::io::split(s);
    let total = 8 * 1024 * 1024usize;
    let writer = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        while sent < total {
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        w.shutdown().await.unwrap();
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 65536];
    let mut ok = true;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            ok &= *b == (((got + i) % 65536) as u32 % 251) as u8;
        }
        got += n;
    }
    writer.await.unwrap();
    assert_eq!(got, total);
    assert!(ok, "bytes corrupted");
    p.exit.shutdown().await;
}
