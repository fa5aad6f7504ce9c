//! Test harness: an exchange node in-process on 127.0.0.1:0 with a real journal and an
//! in-memory balance table, wallets, and order builders.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod pg;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use alloy_primitives::{Address, U256};
use alloy_signer_local::PrivateKeySigner;
use ipsx_exchange::EngineConfig;
use ipsx_exchange::server::{serve_with, unix_now};
use ipsx_exchange::store::Store;
use ipsx_exchange::{
    Client, Diversity, ExchangeConfig, MemoryBalances, Offer, Protocol, Request, WgKey,
};
use ipsx_rotation::ExitKind;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Node {
    pub addr: SocketAddr,
    /// The Centralizer in the node's config (its EIP-712 verifyingContract).
    pub centralizer: Address,
    pub url: String,
    pub database: String,
    pub balances: MemoryBalances,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl Node {
    /// A node on a fresh SQLite file.
    pub async fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}/journal.db", dir.path().display());
        let mut n = Node::start_on(&db, MemoryBalances::new()).await;
        n._dir = Some(dir);
        n
    }

    /// A node on the given database URL and balances.
    pub async fn start_on(database: &str, balances: MemoryBalances) -> Node {
        Node::start_with(database, balances, EngineConfig::default()).await
    }

    /// A node with engine rules.
    pub async fn start_with(
        database: &str,
        balances: MemoryBalances,
        engine: EngineConfig,
    ) -> Node {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Node::start_full(listener, database, balances, engine, |_| {}).await
    }

    /// A node on a fresh SQLite file whose config `configure` adjusts (limits,
    /// centralizer, GeoIP databases, ...).
    pub async fn start_configured(configure: impl FnOnce(&mut ExchangeConfig)) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}/journal.db", dir.path().display());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut n = Node::start_full(
            listener,
            &db,
            MemoryBalances::new(),
            EngineConfig::default(),
            configure,
        )
        .await;
        n._dir = Some(dir);
        n
    }

    /// A node on an already bound listener.
    pub async fn start_on_listener(
        listener: tokio::net::TcpListener,
        database: &str,
        balances: MemoryBalances,
    ) -> Node {
        Node::start_full(
            listener,
            database,
            balances,
            EngineConfig::default(),
            |_| {},
        )
        .await
    }

    async fn start_full(
        listener: tokio::net::TcpListener,
        database: &str,
        balances: MemoryBalances,
        engine: EngineConfig,
        configure: impl FnOnce(&mut ExchangeConfig),
    ) -> Node {
        let addr = listener.local_addr().unwrap();
        let mut cfg = ExchangeConfig::for_tests(database, Default::default());
        cfg.engine = engine;
        configure(&mut cfg);
        let centralizer = cfg.centralizer;
        let (stop, stopped) = oneshot::channel::<()>();
        let b: Arc<dyn ipsx_exchange::BalanceSource> = Arc::new(balances.clone());
        let task = tokio::spawn(async move {
            serve_with(listener, cfg, b, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        let url = format!("http://{addr}");
        // Ready when health answers (bounded wait).
        let c = reqwest::Client::new();
        for _ in 0..200 {
            if c.get(format!("{url}/v1/health")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        Node {
            addr,
            centralizer,
            url,
            database: database.to_owned(),
            balances,
            stop: Some(stop),
            task: Some(task),
            _dir: None,
        }
    }

    pub fn client(&self, key: &PrivateKeySigner) -> Client {
        Client::new(&self.url, 31337, self.centralizer)
            .unwrap()
            .with_key(key.clone())
    }

    pub fn anonymous(&self) -> Client {
        Client::new(&self.url, 31337, Address::ZERO).unwrap()
    }

    pub fn fund(&self, w: Address, amount: u128) {
        self.balances.set(w, U256::from(amount));
    }

    /// Number of journal rows (opens a second connection to the same database).
    pub async fn journal_rows(&self) -> usize {
        let s = Store::open(&self.database).await.unwrap();
        let n = s.load().await.unwrap().len();
        s.close().await;
        n
    }

    /// Graceful stop; returns the temp dir so the database survives for a restart.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
        self._dir.take()
    }
}

pub fn nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::SeqCst)
}

pub fn offer(provider: Address, last: u8, country: &str, price: u128, capacity: u32) -> Offer {
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, last / 8 + 1, last));
    Offer {
        provider,
        exit_address: ip,
        country: country.parse().unwrap(),
        region: None,
        city: Some("Berlin".into()),
        asn: Some(3320),
        kind: ExitKind::Residential,
        protocols: vec![Protocol::Http, Protocol::Https],
        price_per_ip_second: price,
        min_duration_s: 5,
        max_duration_s: 86_400,
        capacity,
        wg_endpoint: SocketAddr::new(ip, 51820),
        wg_public_key: WgKey([7; 32]),
        expiry: unix_now() + 3600,
        nonce: nonce(),
    }
}

pub fn request(
    requester: Address,
    count: u32,
    country: &str,
    max_price: u128,
    duration_s: u64,
) -> Request {
    Request {
        requester,
        count,
        countries: vec![country.parse().unwrap()],
        regions: vec![],
        cities: vec![],
        asns: vec![],
        types: vec![],
        protocols: vec![Protocol::Http],
        min_rating: 0,
        diversity: Diversity::None,
        exclude_providers: Vec::new(),
        duration_s,
        max_price_per_ip_second: max_price,
        wg_public_key: WgKey([9; 32]),
        expiry: unix_now() + 600,
        nonce: nonce(),
    }
}
