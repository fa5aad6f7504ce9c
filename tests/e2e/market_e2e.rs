//! The product end to end, from cold: `ipsx up` starts a chain, the contracts, the
//! exchange, provider agents and the gateway; the gateway rents its exits itself; curl
//! goes through them; the chain shows the money moving.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Up {
    child: Child,
    state: serde_json::Value,
    dir: std::path::PathBuf,
    /// Everything `ipsx up` printed after "ipsx is up."
    output: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Up {
    /// Ctrl-C as a terminal sends it: SIGINT to the whole process group (`ipsx up` runs
    /// in its own), then waits up to 90 s for it to settle and exit; returns its output.
    fn interrupt_like_a_terminal(&mut self) -> String {
        let pgid = self.child.id();
        let _ = Command::new("kill")
            .args(["-INT", "--", &format!("-{pgid}")])
            .status();
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(200));
        self.output.lock().unwrap().join("\n")
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // SIGKILL: the test is over either way; anvil and the rest are its children or
        // its tasks, and anvil is killed by its own guard when the process dies... so
        // ask nicely first, then make sure.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // If `ipsx up` had to be killed, its anvil outlived it: end it by its PID.
        if let Some(pid) = self.state["anvil_pid"].as_u64() {
            let _ = Command::new("kill")
                .arg(pid.to_string())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_up() -> Up {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("ipsx-e2e-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state_path = dir.join("state.json");
    // Its own process group, as a shell job in a terminal is.
    let mut child = std::os::unix::process::CommandExt::process_group(
        Command::new(env!("CARGO_BIN_EXE_ipsx"))
            .args(["up", "--port", "0", "--state"])
            .arg(&state_path)
            .env("IPSX_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
        0,
    )
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        match lines.next() {
            Some(Ok(line)) => {
                let done = line.starts_with("ipsx is up.");
                seen.push(line);
                if done {
                    break;
                }
            }
            _ => {
                let _ = child.kill();
                panic!("ipsx up stopped before it was up:\n{}", seen.join("\n"));
            }
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = output.clone();
    std::thread::spawn(move || {
        for line in lines.by_ref().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    Up {
        child,
        state,
        dir,
        output,
    }
}

fn proxy_with(up: &Up, user: &str) -> String {
    up.state["proxy"]
        .as_str()
        .unwrap()
        .replace("http://demo:", &format!("http://{user}:"))
}

async fn chain_view(up: &Up) -> ipsx_chain::ChainClient {
    let deployment = ipsx_chain::Deployment::load(std::path::Path::new(
        up.state["deployment"].as_str().unwrap(),
    ))
    .unwrap();
    ipsx_chain::ChainClient::connect_read_only(up.state["rpc_url"].as_str().unwrap(), deployment)
        .await
        .unwrap()
}

fn addr(s: &serde_json::Value) -> alloy::primitives::Address {
    s.as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_rents_its_exits_and_pays_for_them() {
    let up = start_up();
    let echo = up.state["echo"].as_str().unwrap().to_owned();
    let chain = chain_view(&up).await;
    let requester = addr(&up.state["requester"]);
    let treasury = addr(&up.state["treasury"]);
    let reserved_before = chain.reserved(requester).await.unwrap();
    assert!(
        reserved_before > alloy::primitives::U256::ZERO,
        "channels opened: requester tokens reserved"
    );

    // country-de leaves through a DE provider's exit, the same one for the session.
    let proxy = proxy_with(&up, "demo-country-de-session-s1");
    let mut args = vec!["-x".to_owned(), proxy];
    args.extend((0..10).map(|_| echo.clone()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = curl(&refs).await;
    let ips = echo_ips(&out.stdout);
    assert_eq!(ips.len(), 10, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        ips.iter().collect::<HashSet<_>>().len(),
        1,
        "one exit for the session: {ips:?}"
    );
    assert!(
        ["127.0.0.2", "127.0.0.3"].contains(&ips[0].as_str()),
        "a DE exit: {ips:?}"
    );

    // /api/exits shows each rented exit's NAT path as its deal recorded it (on one
    // machine every provider is reached directly).
    let admin = up.state["admin"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    let paths = loop {
        let out = curl(&["-s", "--max-time", "5", &format!("{admin}/api/exits")]).await;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let paths: Vec<String> = v["exits"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["id"].as_str().is_some_and(|id| id.starts_with("deal-")))
            .map(|x| x["path"].as_str().unwrap_or("none").to_owned())
            .collect();
        if (paths.len() >= 4 && paths.iter().all(|p| p == "direct")) || Instant::now() > deadline {
            break paths;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        paths.len() >= 4 && paths.iter().all(|p| p == "direct"),
        "rented exits and their paths: {paths:?}"
    );

    // Without a session, requests rotate across the rented exits (4 countries live).
    let socks = proxy_with(&up, "demo").replace("http://", "socks5h://");
    let mut args = vec![
        "--proxy".to_owned(),
        socks,
        "-H".into(),
        "Connection: close".into(),
    ];
    args.extend((0..24).map(|_| echo.clone()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let ips = echo_ips(&curl(&refs).await.stdout);
    assert_eq!(ips.len(), 24);
    assert!(ips.iter().collect::<HashSet<_>>().len() >= 3, "{ips:?}");

    // Providers claim periodically with the latest proof: their Centralizer balance
    // grows by the claimed amount minus the fee, and the treasury gets the fee.
    let providers: Vec<_> = up.state["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(addr)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut paid, mut fee) = (false, false);
    while Instant::now() < deadline && !(paid && fee) {
        let mut any = false;
        for p in &providers {
            any |= chain.balance(*p).await.unwrap() > alloy::primitives::U256::ZERO;
        }
        paid = any;
        fee = chain.balance(treasury).await.unwrap() > alloy::primitives::U256::ZERO;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(paid, "a provider was paid on chain");
    assert!(fee, "the treasury got the platform fee");

    // Ctrl-C in a terminal reaches the whole process group: the chain and the STUN
    // server must outlive it long enough for every channel to settle.
    let mut up = up;
    let out = up.interrupt_like_a_terminal();
    assert!(
        out.contains("settled: requester paid") && out.contains(" 0 left open"),
        "after Ctrl-C to the process group:\n{out}"
    );
}
