//! Gateway tunnel (tunnel-pool) -> our provider exit, all on loopback.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use ipsx_provider::ProviderHandle;
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
        assert_refused(&p.tunnel, dst).await;
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

// === bounded per-requester load (issue 11 part 2) ===

/// Waits (bounded) until `pred` holds for the exit's counters.
pub(crate) async fn counters_until(
    exit: &ipsx_provider::ProviderHandle,
    pred: impl Fn(&ipsx_provider::ExitCounters) -> bool,
) -> ipsx_provider::ExitCounters {
    for _ in 0..500 {
        let c = exit.counters();
        if pred(&c) {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    exit.counters()
}

#[tokio::test]
async fn the_flow_cap_resets_the_syn_over_it_and_frees_a_place_when_a_flow_ends() {
    let echo = echo_server("127.0.0.1:0").await;
    let mut cfg = exit_config("127.0.0.2", &["127.0.0.0/8"]);
    cfg.limits.max_flows_per_peer = 3;
    let p = pair(cfg).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = p.tunnel.connect_tcp(echo).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    assert_refused(&p.tunnel, echo).await;
    let c = p.exit.counters();
    assert_eq!(c.flows_live, 3, "{c:?}");
    assert!(c.limited >= 1, "{c:?}");
    let m = p.exit.meter(&p.client_pub).unwrap();
    assert_eq!((m.flows_live, m.flows), (3, 3));
    assert!(m.limited >= 1);
    // One flow ends: its place is given back.
    drop(held.pop());
    let c = counters_until(&p.exit, |c| c.flows_live == 2).await;
    assert_eq!(c.flows_live, 2, "{c:?}");
    let mut s = p.tunnel.connect_tcp(echo).await.unwrap();
    s.write_all(b"y").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"y");
    p.exit.shutdown().await;
}

#[tokio::test]
async fn the_flow_rate_resets_syns_beyond_it() {
    let echo = echo_server("127.0.0.1:0").await;
    let mut cfg = exit_config("127.0.0.2", &["127.0.0.0/8"]);
    cfg.limits.new_flows_per_second = 5;
    let p = pair(cfg).await;
    let t0 = std::time::Instant::now();
    let (mut ok, mut refused) = (0u64, 0u64);
    for _ in 0..30 {
        match p.tunnel.connect_tcp(echo).await {
            Ok(s) => {
                ok += 1;
                drop(s);
            }
            Err(ipsx_tunnel_pool::TunnelError::Connect { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    let secs = t0.elapsed().as_secs();
    // A full bucket of 5, then 5 per second: the bound holds whatever the pace was.
    assert!(ok <= 5 + 5 * (secs + 1), "{ok} flows in {secs} s");
    assert!(refused >= 30 - (5 + 5 * (secs + 1)), "{refused} refused");
    let c = p.exit.counters();
    assert_eq!(c.rate_limited, refused, "{c:?}");
    assert_eq!(c.flows, ok);
    p.exit.shutdown().await;
}

#[tokio::test]
async fn an_idle_flow_is_reset_and_a_busy_one_is_not() {
    let echo = echo_server("127.0.0.1:0").await;
    let mut cfg = exit_config("127.0.0.2", &["127.0.0.0/8"]);
    cfg.limits.idle_timeout = Duration::from_secs(1);
    let p = pair(cfg).await;
    let mut idle = p.tunnel.connect_tcp(echo).await.unwrap();
    let mut busy = p.tunnel.connect_tcp(echo).await.unwrap();
    idle.write_all(b"hi").await.unwrap();
    let mut b = [0u8; 2];
    idle.read_exact(&mut b).await.unwrap();
    // The busy flow moves a byte every 200 ms for 3 s (three idle timeouts).
    for i in 0..15u8 {
        busy.write_all(&[i]).await.unwrap();
        let mut one = [0u8; 1];
        busy.read_exact(&mut one).await.unwrap();
        assert_eq!(one[0], i);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The idle one was reset: reading ends (EOF or an error), within a bounded wait.
    let mut rest = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(20), idle.read(&mut rest))
        .await
        .expect("the idle flow is still open");
    assert!(!matches!(r, Ok(n) if n > 0), "{r:?}");
    let c = p.exit.counters();
    assert_eq!(c.idle_closed, 1, "{c:?}");
    assert_eq!(p.exit.meter(&p.client_pub).unwrap().idle_closed, 1);
    p.exit.shutdown().await;
}

#[tokio::test]
async fn the_bandwidth_cap_limits_bytes_per_second() {
    const RATE: u64 = 64 * 1024;
    let source = source_server("127.0.0.1:0", 4 << 20).await;
    let mut cfg = exit_config("127.0.0.2", &["127.0.0.0/8"]);
    cfg.limits.bandwidth_per_deal = Some(RATE);
    let p = pair(cfg).await;
    let t0 = std::time::Instant::now();
    let mut s = p.tunnel.connect_tcp(source).await.unwrap();
    let mut got = 0u64;
    let mut buf = vec![0u8; 65536];
    // Read for about two seconds (bounded by the loop), then compare bytes with the cap.
    for _ in 0..10_000 {
        if t0.elapsed() >= Duration::from_secs(2) {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => got += n as u64,
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => {}
        }
    }
    let elapsed_ms = t0.elapsed().as_millis() as u64;
    // Burst (one second's worth) + the rate over the time taken + one relay chunk.
    let bound = RATE + RATE * elapsed_ms / 1000 + ipsx_provider::limits::RELAY_BUFFER as u64;
    println!("bandwidth cap {RATE} B/s: {got} bytes in {elapsed_ms} ms (bound {bound})");
    assert!(got > 0);
    assert!(
        got <= bound,
        "{got} bytes in {elapsed_ms} ms, bound {bound}"
    );
    assert!(
        bound < 4 << 20,
        "the transfer is larger than the cap allows"
    );
    drop(s);
    p.exit.shutdown().await;
}

/// Datagrams the kernel dropped at the UDP socket bound to `port` (127.0.0.1), from
/// `/proc/net/udp` (its `drops` column): what never reached the exit's queues.
fn udp_drops(port: u16) -> u64 {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/udp")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

fn pct(mut v: Vec<Duration>, p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

/// A connection to `dst` through `t` is refused (the exit answered the SYN with a RST).
async fn assert_refused(t: &ipsx_tunnel_pool::Tunnel, dst: SocketAddr) {
    let err = t.connect_tcp(dst).await.unwrap_err();
    assert!(
        matches!(err, ipsx_tunnel_pool::TunnelError::Connect { .. }),
        "{dst}: {err}"
    );
}

/// One request on a new connection through the tunnel; its latency.
async fn timed_get(t: &ipsx_tunnel_pool::Tunnel, who: SocketAddr) -> Duration {
    let t0 = std::time::Instant::now();
    let mut s = t.connect_tcp(who).await.unwrap();
    assert_eq!(get_body(&mut s).await, "127.0.0.2");
    t0.elapsed()
}

/// How often the other peer starts a request, before and during the flood alike (about
/// 80 new flows a second, under its own `new_flows_per_second`).
const SAMPLE_EVERY: Duration = Duration::from_millis(12);
/// How long the other peer is sampled before the flood, and how long the flooder sends
/// (at least 50,000 SYNs, as fast as its CPU and the loopback allow).
const FLOOD_WINDOW: Duration = Duration::from_secs(3);

/// The CPUs the calling thread may run on.
fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{CpuSet, sched_getaffinity};
    let Ok(set) = sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// Pins the calling thread, and the threads it starts from now on, to `cpu`.
fn pin_thread(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

/// One peer floods the exit with at least 50,000 SYNs while another peer makes requests.
///
/// The flooder is a remote machine in the real world: here it runs on a CPU of its own
/// (when the machine has two), and the exit, the other peer and the target share the
/// other CPU, before and during the flood alike. The other peer's latency is reported
/// for requests started before the flood and while the flooder was sending.
#[test]
fn one_peer_opening_50000_flows_stays_bounded_and_another_peer_is_served() {
    let cpus = allowed_cpus();
    let flooder_cpu = (cpus.len() >= 2).then(|| {
        pin_thread(cpus[0]);
        cpus[1]
    });
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(flood_and_measure(flooder_cpu, workers));
}

/// The other peer's requests, each with when it started, one every [`SAMPLE_EVERY`]
/// until `stop` is set (bounded); it samples the exit's live flows and the flooder's too.
async fn sample_requests(
    tunnel: ipsx_tunnel_pool::Tunnel,
    who: SocketAddr,
    exit: ProviderHandle,
    flooder: Option<[u8; 32]>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<(std::time::Instant, Duration)>, u64, u64) {
    let mut lat = Vec::new();
    let (mut max_live, mut max_flooder) = (0u64, 0u64);
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..100_000 {
        tick.tick().await;
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let t0 = std::time::Instant::now();
        lat.push((t0, timed_get(&tunnel, who).await));
        max_live = max_live.max(exit.counters().flows_live);
        if let Some(f) = flooder {
            max_flooder = max_flooder.max(exit.meter(&f).unwrap().flows_live);
        }
    }
    (lat, max_live, max_flooder)
}

/// p50, p99 and the largest of `lat`, and how many.
fn summary(lat: &[Duration]) -> String {
    if lat.is_empty() {
        return "none".into();
    }
    let mut v = lat.to_vec();
    v.sort();
    format!(
        "p50 {:?} p99 {:?} max {:?} ({} requests)",
        pct(v.clone(), 50),
        pct(v.clone(), 99),
        v[v.len() - 1],
        v.len()
    )
}

async fn flood_and_measure(flooder_cpu: Option<usize>, workers: usize) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let who = whoami_server("127.0.0.1:0").await;
    let cfg = exit_config("127.0.0.2", &["127.0.0.0/8"]);
    let limits = cfg.limits;
    let good = pair(cfg).await;
    let exit = good.exit.clone();
    let flood = RawPeer::connect(&exit, Ipv4Addr::new(10, 77, 0, 3)).await;
    let flooder_key = flood.public;
    let target = match who {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!(),
    };
    for _ in 0..20 {
        timed_get(&good.tunnel, who).await; // warm up
    }

    // Before: the same pacing as during the flood, for as long.
    let stop = Arc::new(AtomicBool::new(false));
    let before = {
        let s = tokio::spawn(sample_requests(
            good.tunnel.clone(),
            who,
            exit.clone(),
            None,
            stop.clone(),
        ));
        tokio::time::sleep(FLOOD_WINDOW).await;
        stop.store(true, Ordering::Relaxed);
        s.await.unwrap().0
    };

    let rss_before = rss_bytes();
    let drops_before = udp_drops(exit.local_addr().port());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample_requests(
        good.tunnel.clone(),
        who,
        exit.clone(),
        Some(flooder_key),
        stop.clone(),
    ));
    // The flooder: a thread (and runtime) of its own on its own CPU. Each SYN is a new
    // flow (its own source port, or destination address once the ports run out).
    let flooder = {
        let exit = exit.clone();
        std::thread::spawn(move || {
            if let Some(cpu) = flooder_cpu {
                pin_thread(cpu);
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut flood = flood;
                let t0 = std::time::Instant::now();
                let (mut max_live, mut max_filtered) = (0u64, 0u64);
                let mut sent = 0u32;
                while sent < 2_000_000 && (sent < 50_000 || t0.elapsed() < FLOOD_WINDOW) {
                    let dst = std::net::SocketAddrV4::new(
                        Ipv4Addr::new(127, 0, 0, 1 + (sent / 64_000 % 250) as u8),
                        target.port(),
                    );
                    let sport = 1024 + (sent % 64_000) as u16;
                    flood.send_ip(&tcp_syn(flood.inner, sport, dst)).await;
                    sent += 1;
                    if sent.is_multiple_of(256) {
                        flood.drain();
                        let c = exit.counters();
                        max_live = max_live.max(c.flows_live);
                        max_filtered = max_filtered.max(c.peers_filtered);
                        tokio::task::yield_now().await;
                    }
                }
                (flood, max_live, max_filtered, sent, t0, t0.elapsed())
            })
        })
    };
    let (mut flood, mut max_live, max_filtered, sent, flood_start, flood_took) =
        tokio::task::spawn_blocking(move || flooder.join().unwrap())
            .await
            .unwrap();
    let flood_end = flood_start + flood_took;
    // Let the exit work through what it received: until every SYN sent is accounted
    // for (dropped by the kernel, gated, shed, refused or a flow), or a bounded wait.
    let accounted = || {
        let c = exit.counters();
        let m = exit.meter(&flooder_key).unwrap();
        udp_drops(exit.local_addr().port()) - drops_before
            + c.datagrams_gated
            + c.datagrams_shed
            + m.limited
            + m.flows
    };
    for _ in 0..100 {
        flood.drain();
        max_live = max_live.max(exit.counters().flows_live);
        if accounted() >= u64::from(sent) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settled = std::time::Instant::now();
    let rss_during = rss_bytes();
    let drops = udp_drops(exit.local_addr().port()) - drops_before;
    stop.store(true, Ordering::Relaxed);
    let (samples, max_live_sampled, max_flooder) = sampler.await.unwrap();
    let c = exit.counters();
    let m = exit.meter(&flooder_key).unwrap();
    let before: Vec<Duration> = before.iter().map(|(_, d)| *d).collect();
    let during: Vec<Duration> = samples
        .iter()
        .filter(|(t, _)| *t >= flood_start && *t < flood_end)
        .map(|(_, d)| *d)
        .collect();
    let after: Vec<Duration> = samples
        .iter()
        .filter(|(t, _)| *t >= flood_end && *t < settled)
        .map(|(_, d)| *d)
        .collect();
    println!(
        "flood: {sent} SYNs in {flood_took:?} from one peer ({}), exit on {workers} worker(s); \
         accounted {} (kernel drops {drops}); exit counters {c:?}; flooder meter {m:?}; \
         max live flows {} (flooder {max_flooder}); rss before {} MiB, after {} MiB",
        match flooder_cpu {
            Some(cpu) => format!("flooder on CPU {cpu}, the rest on another"),
            None => "one CPU for all".into(),
        },
        accounted(),
        max_live.max(max_live_sampled),
        rss_before >> 20,
        rss_during >> 20,
    );
    println!(
        "flood: other peer before: {}; during: {}; after, while the exit drained: {}",
        summary(&before),
        summary(&during),
        summary(&after),
    );
    // Where the tail is: the slowest requests during the flood, with when they
    // started (the first ones meet the flood's first moment, before the gate closes).
    let mut slow: Vec<_> = samples
        .iter()
        .filter(|(t, _)| *t >= flood_start && *t < flood_end)
        .map(|(t, d)| (*d, t.duration_since(flood_start)))
        .collect();
    slow.sort();
    slow.reverse();
    slow.truncate(5);
    println!("flood: slowest during (latency, started after the flood began): {slow:?}");
    if !before.is_empty() && !during.is_empty() {
        println!(
            "flood: other peer p99 during / before = {:.2}, p50 = {:.2}",
            pct(during.clone(), 99).as_secs_f64() / pct(before.clone(), 99).as_secs_f64(),
            pct(during.clone(), 50).as_secs_f64() / pct(before.clone(), 50).as_secs_f64(),
        );
    }
    // Bounded: the flooder never held more than its SYN backlog (it never completes a
    // handshake), the exit never more than its cap.
    assert!(sent >= 50_000);
    assert!(
        max_flooder <= u64::from(limits.max_half_open_per_peer),
        "{max_flooder}"
    );
    assert!(
        max_live.max(max_live_sampled) <= u64::from(limits.max_flows_total),
        "{max_live}"
    );
    assert!(
        m.flows
            <= u64::from(limits.max_flows_per_peer) + u64::from(limits.new_flows_per_second) * 60
    );
    // Every SYN of the flood is accounted for: dropped by the kernel (its filter, or a
    // full buffer), gated, shed from the flooder's own queue, refused or a flow.
    assert!(accounted() >= u64::from(sent), "{c:?}");
    assert!(drops > 0 && c.datagrams_gated > 0, "{c:?}");
    assert!(c.limited + c.rate_limited > 0, "{c:?}");
    assert_eq!(m.limited, c.limited + c.rate_limited);
    // Memory: live flows times their bound, far below what 50,000 sockets would take.
    assert!(
        c.flows_live * limits.bytes_per_flow() <= limits.memory_bound(2),
        "{c:?}"
    );
    assert!(
        rss_during.saturating_sub(rss_before) < 256 << 20,
        "rss grew from {rss_before} to {rss_during}"
    );
    // The other peer kept being served throughout: every request succeeded (a failure
    // panics in `timed_get`), and some were made while the flood was sent.
    assert!(!during.is_empty());

    // The flooder went behind the kernel's filter while it flooded, and comes out of it
    // (and of its gate) once it stops: its next SYN is answered again.
    assert_eq!(max_filtered, 1, "the flooder, and only it, was filtered");
    for _ in 0..60 {
        if exit.counters().peers_filtered == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(exit.counters().peers_filtered, 0, "filter lifted");
    let mut answered = false;
    for sport in 65_000..65_020u16 {
        flood.drain();
        flood.send_ip(&tcp_syn(flood.inner, sport, target)).await;
        while let Some(p) = flood.recv_ip(Duration::from_millis(500)).await {
            // A SYN-ACK to this SYN (the backlog may still refuse with a RST).
            if p.len() >= 40 && p[22..24] == sport.to_be_bytes() && p[33] & 0x12 == 0x12 {
                answered = true;
                break;
            }
        }
        if answered {
            break;
        }
    }
    assert!(answered, "the flooder is served again after its flood");
    exit.shutdown().await;
}

/// The inner service map: a flow to the exit's inner address on the connection-log
/// port reaches the local listener the agent gave (loopback, normally refused), is
/// not logged as a relayed connection; every other way to that listener, or to
/// another port of the inner address, stays refused.
#[tokio::test]
async fn the_inner_service_port_reaches_its_local_listener_and_nothing_else_does() {
    let echo = echo_server("127.0.0.1:0").await;
    // No loopback allowed: only the mapped pair may reach 127.0.0.1.
    let mut cfg = exit_config("127.0.0.2", &[]);
    cfg.inner_services = ipsx_provider::inner_service::InnerServices::connlog(echo);
    let inner = IpAddr::V4(cfg.inner_address);
    let p = pair(cfg).await;
    let service = SocketAddr::new(inner, ipsx_provider::inner_service::CONNLOG_PORT);
    let mut s = p.tunnel.connect_tcp(service).await.unwrap();
    s.write_all(b"log please").await.unwrap();
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"log please");
    drop(s);
    for dst in [
        echo,                                // the listener itself
        SocketAddr::new(inner, 81),          // another port of the inner address
        SocketAddr::new(inner, echo.port()), // the listener's port on the inner address
        "127.0.0.1:80".parse().unwrap(),     // loopback on the service port
    ] {
        assert_refused(&p.tunnel, dst).await;
    }
    let c = p.exit.counters();
    assert!(c.refused >= 4, "{c:?}");
    assert_eq!(c.flows, 1, "{c:?}");
    // The service flow is not in the peer's connection log (a relay appends its
    // entry before it gives its place back).
    for _ in 0..250 {
        if p.exit.counters().flows_live == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(p.exit.counters().flows_live, 0);
    assert!(p.exit.log(&p.client_pub).unwrap().is_empty());
    p.exit.shutdown().await;
}
