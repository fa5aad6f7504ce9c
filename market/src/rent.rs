//! `ipsx rent`: one exit rented for a fixed time and handed to a standard WireGuard
//! client, with the same [`Core`](crate::core::Core) and runtime as the gateway's pool
//! manager. Only two things differ from the gateway's renting:
//! - demand is one group of one exit ([`RentSpec`]), leases last the asked duration;
//! - a live deal brings no tunnel up here: its WireGuard parameters are kept as a
//!   [`WgExport`] (our key, the deal's inner address, the provider's key and endpoint,
//!   the NAT path) for the caller to write as a wg-quick file, and the deal counts as
//!   live at once (the external client's traffic is the provider's business; we pay
//!   for the time as the gateway does).
//!
//! Once the exit is live, renting stops (`Input::Shutdown`: no replacement, no
//! extension) while payments go on; [`PoolManager::shutdown`] ends the deal and
//! settles, exactly as when the gateway stops.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipsx_config::MarketConfig;
use ipsx_exchange_client::market::{EXIT_INNER_ADDR, inner_ip_for_deal};
use ipsx_gateway::Gateway;
use ipsx_rotation::Filter;
use serde::Serialize;

use super::{MarketError, PoolManager};
use crate::core::{Input, Phase};

/// What to rent: one exit matching `filter` for `duration`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RentSpec {
    /// Country, city ... the exit must match.
    pub filter: Filter,
    /// The lease: the deal's length (not extended).
    pub duration: Duration,
}

/// PersistentKeepalive for exits reached through a NAT (punched or relayed), seconds.
pub const NAT_KEEPALIVE_S: u16 = 25;

/// A rented exit's WireGuard parameters, for a standard client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WgExport {
    /// The deal.
    pub deal: u64,
    /// Our WireGuard private key (base64), the one the deal names.
    pub private_key: String,
    /// Our address inside the tunnel.
    pub address: Ipv4Addr,
    /// The DNS server inside the tunnel (the exit forwards queries to its resolver).
    pub dns: Ipv4Addr,
    /// The provider's WireGuard public key (base64).
    pub public_key: String,
    /// The provider's WireGuard endpoint.
    pub endpoint: SocketAddr,
    /// How the exit is reached (`direct`, `punched`, `relayed`), if it said.
    pub path: Option<String>,
    /// The address traffic leaves from.
    pub exit_address: IpAddr,
    /// The exit's country.
    pub country: String,
    /// When the lease ends, unix seconds.
    pub end: u64,
}

impl WgExport {
    /// PersistentKeepalive: none for a direct path (the client always sends first),
    /// [`NAT_KEEPALIVE_S`] when the exit is behind a NAT or the path is unknown (the
    /// mapping must stay open both ways).
    pub fn keepalive(&self) -> Option<u16> {
        match self.path.as_deref() {
            Some("direct") => None,
            _ => Some(NAT_KEEPALIVE_S),
        }
    }

    /// The wg-quick file (`wg-quick up FILE`; `wg-quick strip FILE` for `wg setconf`).
    /// The tunnel carries IPv4 only, so AllowedIPs is `0.0.0.0/0`.
    pub fn wg_quick(&self) -> String {
        let mut s = format!(
            "# ipsx rent: deal {deal}, exit {exit} ({country}), lease ends at unix {end}, path {path}\n\
             [Interface]\nPrivateKey = {key}\nAddress = {addr}/32\nDNS = {dns}\n\n\
             [Peer]\nPublicKey = {peer}\nEndpoint = {ep}\nAllowedIPs = 0.0.0.0/0\n",
            deal = self.deal,
            exit = self.exit_address,
            country = self.country,
            end = self.end,
            path = self.path.as_deref().unwrap_or("unknown"),
            key = self.private_key,
            addr = self.address,
            dns = self.dns,
            peer = self.public_key,
            ep = self.endpoint,
        );
        if let Some(k) = self.keepalive() {
            s.push_str(&format!("PersistentKeepalive = {k}\n"));
        }
        s
    }
}

/// The rented exits' parameters, by deal.
#[derive(Debug, Default)]
pub(crate) struct RentState {
    exports: Mutex<HashMap<u64, WgExport>>,
}

impl PoolManager {
    /// Starts renting one exit as `spec` says, for a standard WireGuard client (`ipsx
    /// rent`): `cfg` is the gateway's `[market]` (its `[[market.demand]]` and
    /// on-demand renting are ignored), `gw` a gateway that is never served (the
    /// runtime's shared parts want one). Follow [`PoolManager::rented`] and
    /// [`PoolManager::status`]; end with [`PoolManager::shutdown`].
    pub async fn start_rent(
        gw: Arc<Gateway>,
        mut cfg: MarketConfig,
        base_dir: &Path,
        spec: RentSpec,
    ) -> Result<Self, MarketError> {
        if spec.duration.as_secs() < 1 || spec.duration.as_secs() > crate::core::MAX_LEASE_S {
            return Err(MarketError::Config {
                key: "duration",
                message: "between 1s and 30 days".into(),
            });
        }
        cfg.deal_duration = spec.duration;
        cfg.rent_on_demand = false;
        cfg.demand.clear();
        Self::start_with(gw, cfg, base_dir, None, Some(spec)).await
    }

    /// The rented exits' WireGuard parameters (live deals only), oldest first.
    pub fn rented(&self) -> Vec<WgExport> {
        let Some(rent) = &self.inner.rent else {
            return Vec::new();
        };
        let live: Vec<u64> = self
            .core()
            .deals()
            .values()
            .filter(|d| d.phase != Phase::Ended)
            .map(|d| d.id)
            .collect();
        let map = rent.exports.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<WgExport> = live.iter().filter_map(|id| map.get(id).cloned()).collect();
        v.sort_by_key(|e| e.deal);
        v
    }

    /// `connect` for `ipsx rent`: records the deal's WireGuard parameters instead of
    /// bringing a tunnel up, and stops renting more.
    pub(super) async fn connect_rented(
        &self,
        id: u64,
        terms: ipsx_exchange_client::api::DealTerms,
        rent: &RentState,
    ) -> Input {
        if let Some(reason) = self.misplaced(&terms) {
            return Input::ExitMisplaced { deal: id, reason };
        }
        // The provider reports its path when it adds our key; wait a moment for it.
        let mut path = None;
        for _ in 0..20 {
            path = self
                .inner
                .paths
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
                .map(|p| p.as_str().to_owned());
            if path.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let export = WgExport {
            deal: id,
            private_key: ipsx_tunnel_pool::key_to_base64(&self.inner.wg_key.0),
            address: inner_ip_for_deal(id),
            dns: EXIT_INNER_ADDR,
            public_key: ipsx_tunnel_pool::key_to_base64(&terms.provider_wg_key.0),
            endpoint: terms.wg_endpoint,
            path,
            exit_address: terms.exit_address,
            country: terms.country.to_string(),
            end: terms.end,
        };
        rent.exports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, export);
        tracing::info!(deal = id, exit = %terms.exit_address, "rented exit live");
        // One exit: nothing more is rented or extended; payments go on.
        let actions = self.step(Input::Shutdown).await;
        self.spawn_all(actions);
        Input::ExitLive { deal: id }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn export(path: Option<&str>) -> WgExport {
        WgExport {
            deal: 7,
            private_key: "a".repeat(43) + "=",
            address: inner_ip_for_deal(7),
            dns: EXIT_INNER_ADDR,
            public_key: "b".repeat(43) + "=",
            endpoint: "203.0.113.5:51820".parse().unwrap(),
            path: path.map(str::to_owned),
            exit_address: "203.0.113.5".parse().unwrap(),
            country: "de".into(),
            end: 1_800_000_000,
        }
    }

    #[test]
    fn wg_quick_file_has_every_key_and_the_keepalive_follows_the_path() {
        let f = export(Some("direct")).wg_quick();
        for want in [
            "[Interface]\n",
            "PrivateKey = aaaa",
            "Address = 10.77.0.9/32\n",
            "DNS = 10.77.0.1\n",
            "[Peer]\n",
            "PublicKey = bbbb",
            "Endpoint = 203.0.113.5:51820\n",
            "AllowedIPs = 0.0.0.0/0\n",
        ] {
            assert!(f.contains(want), "{want:?} missing in\n{f}");
        }
        assert!(!f.contains("PersistentKeepalive"), "{f}");
        for p in [Some("punched"), Some("relayed"), None] {
            assert!(
                export(p).wg_quick().contains("PersistentKeepalive = 25\n"),
                "{p:?}"
            );
        }
        // Each key once, every line `Key = value`, a section header or a comment.
        for line in f.lines().filter(|l| !l.is_empty()) {
            assert!(
                line.starts_with('#') || line.starts_with('[') || line.contains(" = "),
                "{line}"
            );
        }
    }
}
