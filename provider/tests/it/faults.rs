//! QUALITY.md cases 16-18 against real sockets: replays, handshake floods, garbage
//! datagrams, a silent exit. A UDP relay sits between the tunnel and the exit so the
//! test can record, replay and inject datagrams on the real path.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ipsx_tunnel_pool::{HealthSettings, HealthState, SecretKey, Tunnel, TunnelConfig};
use proptest::strategy::{Strategy, ValueTree};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

/// Forwards datagrams between one tunnel and one exit, keeping a copy of every
/// datagram the tunnel sent.
struct Relay {
    front: Arc<UdpSocket>,
    back: Arc<UdpSocket>,
    client: Arc<Mutex<Option<SocketAddr>>>,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn new(exit: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(exit).await.unwrap();
        let client = Arc::new(Mutex::new(None));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let t1 = tokio::spawn({
            let (front, back, client, seen) =
                (front.clone(), back.clone(), client.clone(), seen.clone());
            async move {
                let mut buf = vec![0u8; 4096];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().unwrap() = Some(from);
                    seen.lock().unwrap().push(buf[..n].to_vec());
                    let _ = back.send(&buf[..n]).await;
                }
            }
        });
        let t2 = tokio::spawn({
            let (front, back, client) = (front.clone(), back.clone(), client.clone());
            async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = back.recv(&mut buf).await {
                    let to = *client.lock().unwrap();
                    if let Some(to) = to {
                        let _ = front.send_to(&buf[..n], to).await;
                    }
                }
            }
        });
        Self {
            front,
            back,
            client,
            seen,
            tasks: vec![t1, t2],
        }
    }

    fn addr(&self) -> SocketAddr {
        self.front.local_addr().unwrap()
    }

    /// Sends raw bytes to the exit, from the relay's (the client's) address.
    async fn to_exit(&self, data: &[u8]) {
        self.back.send(data).await.unwrap();
    }

    /// Sends raw bytes to the tunnel, from its endpoint's address.
    async fn to_tunnel(&self, data: &[u8]) {
        let to = self.client.lock().unwrap().unwrap();
        self.front.send_to(data, to).await.unwrap();
    }

    fn first(&self, pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find(|d| pred(d))
            .unwrap()
            .clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn tunnel_via(
    relay: &Relay,
    exit: &ipsx_provider::ProviderHandle,
    health: HealthSettings,
) -> Tunnel {
    let client = SecretKey::generate();
    exit.add_peer(client.public_key(), "10.77.0.2".parse().unwrap())
        .await
        .unwrap();
    let mut cfg = TunnelConfig::new(
        client,
        exit.public_key(),
        relay.addr(),
        Ipv4Addr::new(10, 77, 0, 2),
    );
    cfg.health = health;
    Tunnel::start(cfg).await.unwrap()
}

async fn echo_once(t: &Tunnel, echo: SocketAddr, msg: &[u8]) {
    let mut s = t.connect_tcp(echo).await.unwrap();
    s.write_all(msg).await.unwrap();
    let mut b = vec![0u8; msg.len()];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(b, msg);
}

#[tokio::test]
async fn replayed_data_and_handshake_are_refused_and_the_tunnel_keeps_working() {
    let echo = echo_server("127.0.0.1:0").await;
    let exit = ipsx_provider::ProviderExit::start(exit_config("127.0.0.2", &["127.0.0.0/8"]))
        .await
        .unwrap();
    let relay = Relay::new(exit.local_addr()).await;
    let t = tunnel_via(&relay, &exit, HealthSettings::default()).await;
    echo_once(&t, echo, b"before").await;

    let data = relay.first(|d| d[0] == 4 && d.len() > 32);
    let init = relay.first(|d| d[0] == 1);
    let before = exit.counters();
    for _ in 0..5 {
        relay.to_exit(&data).await;
    }
    relay.to_exit(&init).await;
    // Wait (bounded) for the exit to count them.
    let mut after = exit.counters();
    for _ in 0..100 {
        after = exit.counters();
        if after.datagrams_invalid >= before.datagrams_invalid + 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        after.datagrams_invalid >= before.datagrams_invalid + 6,
        "{before:?} -> {after:?}"
    );
    assert_eq!(
        after.handshakes, before.handshakes,
        "a replayed initiation makes no session"
    );
    echo_once(&t, echo, b"after replays").await;
    exit.shutdown().await;
}

#[tokio::test]
async fn handshake_flood_gets_cookies_and_bounded_work() {
    let echo = echo_server("127.0.0.1:0").await;
    let mut cfg = exit_config("127.0.0.2", &["127.0.0.0/8"]);
    cfg.handshake_rate_limit = 10;
    let exit = ipsx_provider::ProviderExit::start(cfg).await.unwrap();
    let relay = Relay::new(exit.local_addr()).await;
    let t = tunnel_via(&relay, &exit, HealthSettings::default()).await;
    echo_once(&t, echo, b"up").await;

    // A flood of valid-MAC1 initiations from keys the exit does not know.
    let flooder = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let started = std::time::Instant::now();
    let mut cookies = 0u32;
    let mut buf = vec![0u8; 256];
    for _ in 0..400 {
        let rogue = SecretKey::generate();
        let mut tunn = ipsx_tunnel_pool::boringtun::noise::Tunn::new(
            ipsx_tunnel_pool::boringtun::x25519::StaticSecret::from(rogue.0),
            ipsx_tunnel_pool::boringtun::x25519::PublicKey::from(exit.public_key()),
            None,
            None,
            1,
            None,
        );
        let mut out = vec![0u8; 256];
        if let ipsx_tunnel_pool::boringtun::noise::TunnResult::WriteToNetwork(p) =
            tunn.format_handshake_initiation(&mut out, false)
        {
            flooder.send_to(p, exit.local_addr()).await.unwrap();
        }
        while let Ok((n, _)) = flooder.try_recv_from(&mut buf) {
            if n == 64 && buf[0] == 3 {
                cookies += 1;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok((n, _)) = flooder.try_recv_from(&mut buf) {
        if n == 64 && buf[0] == 3 {
            cookies += 1;
        }
    }
    let elapsed = started.elapsed().as_secs() + 2;
    let c = exit.counters();
    assert!(
        cookies > 0 && c.cookies_sent > 0,
        "no cookie replies under load: {c:?}"
    );
    // Diffie-Hellman work is bounded by the rate limit, whatever the flood size.
    assert!(c.handshake_dh <= 10 * elapsed + 10, "{c:?} over {elapsed}s");
    assert!(c.unknown_peer >= 1);
    // The established tunnel is unaffected (data packets are never rate limited).
    echo_once(&t, echo, b"still up").await;
    exit.shutdown().await;
}

#[tokio::test]
async fn garbage_datagrams_both_ways_do_not_hurt() {
    let echo = echo_server("127.0.0.1:0").await;
    let exit = ipsx_provider::ProviderExit::start(exit_config("127.0.0.2", &["127.0.0.0/8"]))
        .await
        .unwrap();
    let relay = Relay::new(exit.local_addr()).await;
    let t = tunnel_via(&relay, &exit, HealthSettings::default()).await;
    echo_once(&t, echo, b"before").await;
    let valid = relay.first(|d| d[0] == 4 && d.len() > 32);

    // Random datagrams of 0..2000 bytes, some starting with a real message type, and
    // truncated or bit-flipped copies of a real data packet.
    let random = proptest::collection::vec(proptest::num::u8::ANY, 0..2000usize);
    let typed = (
        1u8..=4,
        proptest::collection::vec(proptest::num::u8::ANY, 0..2000usize),
    )
        .prop_map(|(ty, mut v)| {
            if v.len() >= 4 {
                v[0] = ty;
                v[1] = 0;
                v[2] = 0;
                v[3] = 0;
            }
            v
        });
    let mutated = (0usize..2000, proptest::num::u8::ANY, 0usize..200).prop_map({
        let valid = valid.clone();
        move |(i, b, cut)| {
            let mut v = valid.clone();
            let i = i % v.len();
            v[i] ^= b.max(1);
            v.truncate(v.len().saturating_sub(cut));
            v
        }
    });
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut sent = 0u64;
    for _ in 0..150 {
        for strat in [
            random.clone().boxed(),
            typed.clone().boxed(),
            mutated.clone().boxed(),
        ] {
            let d = strat.new_tree(&mut runner).unwrap().current();
            relay.to_exit(&d).await;
            relay.to_tunnel(&d).await;
            sent += 1;
        }
    }
    let mut c = exit.counters();
    let mut h = t.health();
    for _ in 0..100 {
        c = exit.counters();
        h = t.health();
        if c.datagrams_invalid + c.unknown_peer >= sent / 2
            && h.counters.datagrams_invalid >= sent / 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        c.datagrams_invalid + c.unknown_peer >= sent / 2,
        "exit: {c:?} of {sent}"
    );
    assert!(
        h.counters.datagrams_invalid >= sent / 2,
        "tunnel: {h:?} of {sent}"
    );
    echo_once(&t, echo, b"after the garbage").await;
    assert!(t.health().healthy);
    exit.shutdown().await;
}

#[tokio::test]
async fn an_exit_that_stops_answering_is_marked_unhealthy() {
    let echo = echo_server("127.0.0.1:0").await;
    let exit = ipsx_provider::ProviderExit::start(exit_config("127.0.0.2", &["127.0.0.0/8"]))
        .await
        .unwrap();
    let relay = Relay::new(exit.local_addr()).await;
    // Short timings so the test is quick; the rule is the same as the defaults'
    // (unhealthy at most probe_after + dead_after after the last sign of life).
    let settings = HealthSettings {
        probe_after: Duration::from_millis(500),
        busy_probe_after: Duration::from_millis(250),
        dead_after: Duration::from_secs(1),
        handshake_deadline: Duration::from_secs(2),
    };
    let t = tunnel_via(&relay, &exit, settings).await;
    echo_once(&t, echo, b"alive").await;
    assert!(t.health().healthy);
    exit.shutdown().await;
    let mut state = t.health().state;
    for _ in 0..200 {
        state = t.health().state;
        if state == HealthState::Silent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state, HealthState::Silent);
    // New streams fail cleanly (refused/timeout), never hang forever.
    let r = tokio::time::timeout(Duration::from_secs(15), t.connect_tcp(echo)).await;
    assert!(matches!(r, Ok(Err(_))), "{r:?}");
}

#[tokio::test]
async fn no_handshake_means_unhealthy() {
    // An endpoint where nothing answers.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = TunnelConfig::new(
        SecretKey::generate(),
        SecretKey::generate().public_key(),
        silent.local_addr().unwrap(),
        Ipv4Addr::new(10, 77, 0, 2),
    );
    cfg.health.handshake_deadline = Duration::from_millis(300);
    let t = Tunnel::start(cfg).await.unwrap();
    assert_eq!(t.health().state, HealthState::Connecting);
    let mut state = t.health().state;
    for _ in 0..100 {
        state = t.health().state;
        if state != HealthState::Connecting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        matches!(state, HealthState::NoHandshake | HealthState::Silent),
        "{state:?}"
    );
    t.shutdown().await;
    assert_eq!(t.health().state, HealthState::Closed);
    assert!(matches!(
        t.connect_tcp("127.0.0.1:9".parse().unwrap()).await,
        Err(ipsx_tunnel_pool::TunnelError::Closed)
    ));
}
