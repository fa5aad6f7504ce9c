//! Issue 11 part 1 through the whole product: a provider agent process (`ipsx provider`)
//! behind a NAT router, the gateway process (`ipsx gateway` with a `[market]`) on the
//! public side or behind its own NAT, anvil and the exchange, coturn as STUN/TURN server
//! and the echo target on the lab's public bridge (network namespaces the test creates,
//! `provider/tests/it/common/natlab.rs`). curl through the gateway's proxy port must
//! reach the echo target from the provider router's public address, and the gateway's
//! `/api/exits` and `/api/market` must show the deal's NAT path.
//!
//! The chain RPC and the exchange run in the test's own namespace on 127.0.0.1; the lab
//! reaches them through forwarders on its server address. Skipped (with a message) when
//! coturn, iptables or `ip` is missing; the install scripts install them.

use crate::common::market::{ChainAndExchange, REQUESTER, hex_key};
use crate::common::{self, TOKEN, clear_proxy_env};
use crate::provider_common::natlab;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use natlab::{Host, Lab, Nat, TURN_PASSWORD, TURN_USER};

/// A child process killed (and reaped) on drop, also when the test fails.
struct Proc {
    child: Child,
    log: std::path::PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ipsx <args>` in namespace `ns`, stderr to `log`, stdout piped.
fn ipsx_in(ns: &str, args: &[&str], log: &std::path::Path) -> Proc {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ipsx")])
        .args(args)
        .env("IPSX_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap());
    clear_proxy_env(&mut cmd);
    Proc {
        child: cmd.spawn().expect("ip netns exec ipsx"),
        log: log.to_owned(),
    }
}

/// curl in namespace `ns`; stdout.
async fn curl_in(ns: &str, args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", ns, "curl", "-sS", "--max-time", "15"])
        .args(args);
    clear_proxy_env(cmd.as_std_mut());
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("curl finished")
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Why the lab cannot run here, if it cannot.
fn missing_tools() -> Option<String> {
    for (tool, arg) in [
        ("turnserver", "--help"),
        ("iptables", "--version"),
        ("ip", "-V"),
    ] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !ok {
            return Some(format!(
                "{tool} is not installed (scripts/install-tunnel.sh installs it)"
            ));
        }
    }
    None
}

/// The `[market.nat]`/`[exit.nat]` section of the lab's coturn.
fn nat_section(lab: &Lab, table: &str) -> String {
    format!(
        "[{table}]\nstun = [\"{}\", \"{}\"]\nturn = \"{}\"\nturn_username = \"{TURN_USER}\"\nturn_password = \"{TURN_PASSWORD}\"\nrelay = \"auto\"\ntimeout_s = 3\n",
        lab.turn_addr(),
        lab.stun2_addr(),
        lab.turn_addr()
    )
}

/// One case: the provider behind `provider_nat`, the gateway behind a cone NAT when
/// `requester_behind_nat`, else on the public bridge. The deal must record `want`.
async fn case(provider_nat: Nat, requester_behind_nat: bool, want: &str) {
    if let Some(why) = missing_tools() {
        eprintln!("skipped: {why}");
        return;
    }
    let t0 = Instant::now();
    // Dropped last: namespaces and coturn go after the processes below.
    let mut lab = Lab::new();
    lab.start_turnserver();
    let prov: Host = lab.host_behind(provider_nat);
    let req: Host = if requester_behind_nat {
        lab.host_behind(Nat::Cone)
    } else {
        lab.public_host()
    };
    let dir = std::env::temp_dir().join(format!(
        "ipsx-natgw-{}-{}",
        std::process::id(),
        lab.public_ns
    ));
    std::fs::create_dir_all(&dir).unwrap();

    // The echo target on the public side; it reports the caller's address.
    let public = lab.public_ns.clone();
    let pub_rt = lab.runtime(&public);
    let target = lab.target_ip();
    let countries = HashMap::from([(IpAddr::V4(prov.public_ip), "de".to_owned())]);
    let echo = pub_rt
        .spawn(async move {
            let l = tokio::net::TcpListener::bind(SocketAddr::new(target.into(), 0))
                .await
                .unwrap();
            let a = l.local_addr().unwrap();
            tokio::spawn(ipsx_gateway::echo::serve_echo(l, countries));
            a
        })
        .await
        .unwrap();

    // Chain and exchange here, reached from the lab through forwarders.
    let ChainAndExchange {
        anvil,
        deployment_path,
        exchange_addr: exchange_local,
        exchange,
        ..
    } = ChainAndExchange::start(&dir, 3_600).await;
    let rpc = lab
        .forward(
            anvil
                .endpoint()
                .trim_start_matches("http://")
                .parse()
                .unwrap(),
        )
        .await;
    let exchange_addr = lab.forward(exchange_local).await;

    // The provider agent behind its NAT: it sells the router's public address.
    let provider_toml = dir.join("provider.toml");
    std::fs::write(
        &provider_toml,
        format!(
            "[exchange]\nurl = \"http://{exchange_addr}\"\n\n[chain]\nrpc_url = \"http://{rpc}\"\ndeployment = \"{}\"\n\n[wallet]\nprivate_key = \"{}\"\n\n[status]\nlisten = \"127.0.0.1:0\"\n\n[timings]\npoll = \"1s\"\n\n[[exit]]\nexit_address = \"{}\"\nlisten = \"0.0.0.0:0\"\ncountry = \"de\"\ntype = \"residential\"\nprotocols = [\"any\"]\nprice_per_ip_second = \"1000000000000\"\nallow_destinations = [\"{target}/32\"]\n{}",
            deployment_path.display(),
            hex_key(&anvil.key(2)),
            prov.public_ip,
            nat_section(&lab, "exit.nat"),
        ),
    )
    .unwrap();
    let provider = ipsx_in(
        &prov.ns,
        &["provider", "--config", provider_toml.to_str().unwrap()],
        &dir.join("provider.log"),
    );

    // The gateway renting it.
    let gateway_toml = dir.join("gateway.toml");
    std::fs::write(
        &gateway_toml,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nallow_destinations = [\"{target}/32\"]\nconnect_timeout = \"5s\"\nverify_url = \"http://{echo}/ip.txt\"\n\n[[token]]\nname = \"t\"\nsecret = \"{TOKEN}\"\n\n[market]\nexchange_url = \"http://{exchange_addr}\"\nrpc_url = \"http://{rpc}\"\ndeployment = \"{}\"\nprivate_key = \"{}\"\nmax_price_per_ip_second = \"2000000000000\"\nstate_file = \"{}\"\ndeal_duration = \"5m\"\npayment_window = \"30s\"\nproof_interval = \"1s\"\nrent_on_demand = false\n\n[[market.demand]]\nname = \"de\"\ntarget = {{ country = \"de\" }}\ncount = 1\n\n{}",
            deployment_path.display(),
            hex_key(&anvil.key(REQUESTER)),
            dir.join("market-state.db").display(),
            nat_section(&lab, "market.nat"),
        ),
    )
    .unwrap();
    let mut gateway = ipsx_in(
        &req.ns,
        &["gateway", "--config", gateway_toml.to_str().unwrap()],
        &dir.join("gateway.log"),
    );
    let mut out = BufReader::new(gateway.child.stdout.take().unwrap()).lines();
    let addrs = common::gateway_addrs(&mut out);
    let (proxy, admin) = (addrs.map(|a| a.proxy), addrs.and_then(|a| a.admin));
    // Keep reading: a closed pipe would fail the gateway's later prints.
    std::thread::spawn(move || out.for_each(drop));
    let logs = |gw: &Proc| {
        format!(
            "\n--- gateway ---\n{}\n--- provider ---\n{}",
            gw.log(),
            provider.log()
        )
    };
    let (Some(proxy), Some(admin)) = (proxy, admin) else {
        panic!("the gateway printed no addresses{}", logs(&gateway));
    };

    // The deal serves: the market shows it with its path.
    let deadline = Instant::now() + Duration::from_secs(25);
    let deal = loop {
        let m: serde_json::Value =
            serde_json::from_str(&curl_in(&req.ns, &[&format!("http://{admin}/api/market")]).await)
                .unwrap_or_default();
        let serving = m["deals"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["phase"] == "serving").cloned());
        if let Some(d) = serving {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "no deal serving: {m}{}",
            logs(&gateway)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };

    // curl through the gateway reaches the echo target from the provider's NAT address.
    let answer = curl_in(
        &req.ns,
        &[
            "-x",
            &format!("http://acct-country-de:{TOKEN}@{proxy}"),
            &format!("http://{echo}/ip"),
        ],
    )
    .await;
    let ips = crate::common::echo_ips(answer.as_bytes());
    assert_eq!(
        ips,
        vec![prov.public_ip.to_string()],
        "the echo saw the provider router's address: {answer}{}",
        logs(&gateway)
    );
    assert_eq!(deal["path"], want, "/api/market path: {deal}");
    let exits: serde_json::Value =
        serde_json::from_str(&curl_in(&req.ns, &[&format!("http://{admin}/api/exits")]).await)
            .unwrap();
    let rented: Vec<&serde_json::Value> = exits["exits"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e["path"].is_null())
        .collect();
    assert_eq!(rented.len(), 1, "one rented exit: {exits}");
    assert_eq!(rented[0]["path"], want, "/api/exits path: {exits}");
    eprintln!(
        "case provider {provider_nat:?}, gateway {}: path {want}, {:.1} s",
        if requester_behind_nat {
            "behind cone NAT"
        } else {
            "public"
        },
        t0.elapsed().as_secs_f64()
    );

    drop(gateway);
    drop(provider);
    exchange.abort();
    drop(anvil);
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}

/// (a) Provider behind a port-restricted cone NAT, gateway public: punched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_behind_cone_nat_serves_the_gateway() {
    case(Nat::Cone, false, "punched").await;
}

/// (b) Both behind cone NATs: punched from both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_and_gateway_behind_cone_nats() {
    case(Nat::Cone, true, "punched").await;
}

/// (c) Provider behind a symmetric NAT: relayed through coturn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_behind_symmetric_nat_is_relayed() {
    case(Nat::Symmetric, false, "relayed").await;
}
