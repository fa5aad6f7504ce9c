//! A NAT lab made of network namespaces the test creates: a "public" namespace with a
//! bridge (coturn as STUN/TURN server on two addresses, the echo target), NAT routers
//! joined to it (iptables MASQUERADE: plain = port-restricted cone, `--random-fully` =
//! symmetric) with a host namespace behind each, and hosts on the bridge itself.
//! In-process components run in a namespace through [`Lab::runtime`] (a tokio runtime
//! whose worker threads entered it). Everything is removed on drop, also on panic.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub, missing_docs)]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// STUN/TURN port of the lab's coturn (the namespace is ours: any port is free).
pub const TURN_PORT: u16 = 3478;
pub const TURN_USER: &str = "ipsx";
pub const TURN_PASSWORD: &str = "lab-secret";

/// Runs a command; its stdout (the test fails if it cannot run or fails).
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {args:?}: {e} (install with scripts/install-tunnel.sh)")
        });
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How a router translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// MASQUERADE: keeps the port per source, filters by address and port.
    Cone,
    /// MASQUERADE --random-fully: a new port per destination.
    Symmetric,
}

/// A host of the lab: its namespace and the address others see.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    /// Its own address.
    pub ip: Ipv4Addr,
    /// The address the public side sees (the router's for a host behind NAT).
    pub public_ip: Ipv4Addr,
}

pub struct Lab {
    id: u32,
    pub public_ns: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    files: Vec<std::path::PathBuf>,
    runtimes: Vec<tokio::runtime::Runtime>,
    next_router: u32,
    next_host: u32,
}

impl Lab {
    /// The public namespace with its bridge (10.202.ID.0/24, .1 and .5 for servers).
    pub fn new() -> Self {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() * 7 + k) % 250 + 1;
        let tag = format!("{}x{k}", std::process::id() % 100_000);
        let public_ns = format!("nlp{tag}");
        let _ = Command::new("ip")
            .args(["netns", "del", &public_ns])
            .output();
        run(&["ip", "netns", "add", &public_ns]);
        let me = Self {
            id,
            public_ns: public_ns.clone(),
            namespaces: vec![public_ns.clone()],
            children: Vec::new(),
            files: Vec::new(),
            runtimes: Vec::new(),
            next_router: 0,
            next_host: 0,
        };
        let p = ["ip", "-n", public_ns.as_str()];
        run(&[p[0], p[1], p[2], "link", "set", "lo", "up"]);
        run(&[p[0], p[1], p[2], "link", "add", "br0", "type", "bridge"]);
        run(&[p[0], p[1], p[2], "link", "set", "br0", "up"]);
        for last in [1, 5] {
            let a = format!("{}/24", me.public_ip(last));
            run(&[p[0], p[1], p[2], "addr", "add", &a, "dev", "br0"]);
        }
        me
    }

    fn public_ip(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 202, self.id as u8, last)
    }

    /// The first STUN/TURN address.
    pub fn turn_addr(&self) -> SocketAddr {
        SocketAddr::new(self.public_ip(1).into(), TURN_PORT)
    }

    /// The second STUN address (same server, other IP: a symmetric NAT maps it apart).
    pub fn stun2_addr(&self) -> SocketAddr {
        SocketAddr::new(self.public_ip(5).into(), TURN_PORT)
    }

    /// The echo target's address.
    pub fn target_ip(&self) -> Ipv4Addr {
        self.public_ip(5)
    }

    fn new_ns(&mut self, role: &str) -> String {
        let name = format!("{}{role}{}", self.public_ns, self.namespaces.len());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        self.namespaces.push(name.clone());
        name
    }

    /// Joins `ns` to the bridge with public address `.last`; returns it.
    fn plug(&mut self, ns: &str, last: u8) -> Ipv4Addr {
        let i = self.namespaces.len();
        let (a, b) = (format!("nb{}x{i}", self.id), format!("nu{}x{i}", self.id));
        run(&[
            "ip",
            "-n",
            &self.public_ns,
            "link",
            "add",
            &a,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            ns,
        ]);
        run(&[
            "ip",
            "-n",
            &self.public_ns,
            "link",
            "set",
            &a,
            "master",
            "br0",
        ]);
        run(&["ip", "-n", &self.public_ns, "link", "set", &a, "up"]);
        let ip = self.public_ip(last);
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &b,
        ]);
        run(&["ip", "-n", ns, "link", "set", &b, "up"]);
        ip
    }

    /// A host on the public bridge (no NAT).
    pub fn public_host(&mut self) -> Host {
        let ns = self.new_ns("h");
        self.next_host += 1;
        let ip = self.plug(&ns, 100 + self.next_host as u8);
        Host {
            ns,
            ip,
            public_ip: ip,
        }
    }

    /// A host behind a NAT router of kind `nat`.
    pub fn host_behind(&mut self, nat: Nat) -> Host {
        self.next_router += 1;
        let r = self.next_router as u8;
        let router = self.new_ns("r");
        let public_ip = self.plug(&router, 10 + r);
        let host = self.new_ns("h");
        let i = self.namespaces.len();
        let (a, b) = (format!("ni{}x{i}", self.id), format!("nh{}x{i}", self.id));
        run(&[
            "ip", "-n", &router, "link", "add", &a, "type", "veth", "peer", "name", &b, "netns",
            &host,
        ]);
        let inside_r = Ipv4Addr::new(10, 203, r, 1);
        let ip = Ipv4Addr::new(10, 203, r, 2);
        run(&[
            "ip",
            "-n",
            &router,
            "addr",
            "add",
            &format!("{inside_r}/24"),
            "dev",
            &a,
        ]);
        run(&["ip", "-n", &router, "link", "set", &a, "up"]);
        run(&[
            "ip",
            "-n",
            &host,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &b,
        ]);
        run(&["ip", "-n", &host, "link", "set", &b, "up"]);
        run(&[
            "ip",
            "-n",
            &host,
            "route",
            "add",
            "default",
            "via",
            &inside_r.to_string(),
        ]);
        run(&[
            "ip",
            "netns",
            "exec",
            &router,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ]);
        let uplink = format!("nu{}x{}", self.id, i - 1);
        let mut rule = vec![
            "ip",
            "netns",
            "exec",
            &router,
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            &uplink,
            "-j",
            "MASQUERADE",
        ];
        if nat == Nat::Symmetric {
            rule.push("--random-fully");
        }
        run(&rule);
        // Like a home router, accept nothing new addressed to the router itself: an
        // unsolicited datagram is dropped before conntrack keeps it (a kept one would
        // take the mapping's port and make the NAT pick another for our own send).
        run(&[
            "ip",
            "netns",
            "exec",
            &router,
            "iptables",
            "-A",
            "INPUT",
            "-i",
            &uplink,
            "-m",
            "conntrack",
            "--ctstate",
            "NEW,INVALID",
            "-j",
            "DROP",
        ]);
        Host {
            ns: host,
            ip,
            public_ip,
        }
    }

    /// Starts coturn in the public namespace on both server addresses; waits until it
    /// answers.
    pub fn start_turnserver(&mut self) {
        let dir = std::env::temp_dir().join(format!("{}-turn", self.public_ns));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("turnserver.conf");
        std::fs::write(
            &conf,
            format!(
                "listening-ip={}\nlistening-ip={}\nlistening-port={TURN_PORT}\nrelay-ip={}\n\
                 min-port=49152\nmax-port=49999\nfingerprint\nlt-cred-mech\n\
                 user={TURN_USER}:{TURN_PASSWORD}\nrealm=ipsx.test\nno-tls\nno-dtls\nno-cli\n\
                 no-rfc5780\nlog-file=stdout\nsimple-log\npidfile={}\n",
                self.public_ip(1),
                self.public_ip(5),
                self.public_ip(1),
                dir.join("pid").display(),
            ),
        )
        .unwrap();
        self.files.push(dir);
        let child = Command::new("ip")
            .args(["netns", "exec", &self.public_ns, "turnserver", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnserver not installed: run scripts/install-tunnel.sh");
        self.children.push(child);
        for _ in 0..100 {
            let out = run(&["ip", "netns", "exec", &self.public_ns, "ss", "-Hlun"]);
            if out.contains(&format!("{}:{TURN_PORT}", self.public_ip(5))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("turnserver did not start listening");
    }

    /// The lab's STUN/TURN settings.
    pub fn nat_settings(&self) -> ipsx_tunnel_pool::NatSettings {
        ipsx_tunnel_pool::NatSettings {
            stun: vec![self.turn_addr(), self.stun2_addr()],
            turn: Some(ipsx_tunnel_pool::TurnServer {
                addr: self.turn_addr(),
                username: TURN_USER.into(),
                password: TURN_PASSWORD.into(),
            }),
            relay: ipsx_tunnel_pool::RelayMode::Auto,
            timeout: Duration::from_secs(3),
        }
    }

    /// A tokio runtime whose two worker threads live in namespace `ns`: everything it
    /// runs (sockets included) is inside. Shut down on drop.
    pub fn runtime(&mut self, ns: &str) -> tokio::runtime::Handle {
        let path = format!("/var/run/netns/{ns}");
        let rt = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
        })
        .join()
        .unwrap();
        let h = rt.handle().clone();
        self.runtimes.push(rt);
        h
    }
}

impl Lab {
    /// A TCP forwarder listening on the lab's server address (`.1`, port 0) in the
    /// public namespace to `to` in the test's own namespace (the chain RPC or the
    /// exchange on 127.0.0.1), so hosts of the lab can reach them. Each accepted
    /// connection is dialled from a thread of the test's runtime (`here`).
    pub async fn forward(&mut self, to: SocketAddr) -> SocketAddr {
        let here = tokio::runtime::Handle::current();
        let public = self.public_ns.clone();
        let rt = self.runtime(&public);
        let bind = SocketAddr::new(self.public_ip(1).into(), 0);
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    here.spawn(async move {
                        if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        }
                    });
                }
            });
            addr
        })
        .await
        .unwrap()
    }
}

/// A coturn on 127.0.0.1 (STUN only is used: no NAT on loopback); killed on drop.
pub struct LoopbackStun {
    pub addr: SocketAddr,
    child: Child,
    dir: std::path::PathBuf,
}

impl LoopbackStun {
    pub fn start() -> Self {
        // coturn has no port 0: take a free one and hand it over.
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("ipsx-stun-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("turnserver.conf");
        std::fs::write(
            &conf,
            format!(
                "listening-ip=127.0.0.1\nlistening-port={port}\nrelay-ip=127.0.0.1\n\
                 fingerprint\nlt-cred-mech\nuser={TURN_USER}:{TURN_PASSWORD}\nrealm=ipsx.test\n\
                 no-tls\nno-dtls\nno-cli\nno-rfc5780\nlog-file=stdout\nsimple-log\npidfile={}\n",
                dir.join("pid").display()
            ),
        )
        .unwrap();
        let child = Command::new("turnserver")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnserver not installed: run scripts/install-tunnel.sh");
        let me = Self {
            addr: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            child,
            dir,
        };
        for _ in 0..100 {
            if run(&["ss", "-Hlun"]).contains(&format!("127.0.0.1:{port}")) {
                return me;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("turnserver did not start listening on 127.0.0.1:{port}");
    }
}

impl Drop for LoopbackStun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for rt in self.runtimes.drain(..) {
            rt.shutdown_background();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Routers and hosts first (their veths go with them), the bridge last.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        for f in &self.files {
            let _ = std::fs::remove_dir_all(f);
        }
    }
}
