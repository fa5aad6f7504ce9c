//! A pool of named tunnels in one process, each an exit with attributes.
//!
//! Peers are added and removed at runtime (the exchange hands new ones over as deals
//! are made); the gateway picks among [`TunnelPool::healthy`] with its rotation policy.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use ipsx_rotation::{ExitAttributes, Filter};

use crate::{Tunnel, TunnelConfig, TunnelError, TunnelHealth};

/// One exit of the pool.
#[derive(Debug, Clone)]
pub struct PoolEntry {
    /// The name it was added under.
    pub name: String,
    /// The tunnel.
    pub tunnel: Tunnel,
    /// What the exit is (country, kind ...), for targeting.
    pub attrs: ExitAttributes,
}

/// Named tunnels, shared (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct TunnelPool {
    inner: Arc<RwLock<HashMap<String, PoolEntry>>>,
}

impl TunnelPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a tunnel and adds it under `name` with no attributes.
    pub async fn add(&self, name: &str, cfg: TunnelConfig) -> Result<Tunnel, TunnelError> {
        self.add_with_attrs(name, cfg, ExitAttributes::default())
            .await
    }

    /// Starts a tunnel and adds it under `name`.
    pub async fn add_with_attrs(
        &self,
        name: &str,
        cfg: TunnelConfig,
        attrs: ExitAttributes,
    ) -> Result<Tunnel, TunnelError> {
        if self.get(name).is_some() {
            return Err(TunnelError::DuplicateName(name.to_owned()));
        }
        let tunnel = Tunnel::start(cfg).await?;
        let duplicate = {
            let mut map = self.inner.write().unwrap_or_else(PoisonError::into_inner);
            if map.contains_key(name) {
                true
            } else {
                map.insert(
                    name.to_owned(),
                    PoolEntry {
                        name: name.to_owned(),
                        tunnel: tunnel.clone(),
                        attrs,
                    },
                );
                false
            }
        };
        if duplicate {
            tunnel.shutdown().await;
            return Err(TunnelError::DuplicateName(name.to_owned()));
        }
        Ok(tunnel)
    }

    /// Removes and shuts down the tunnel `name`; false if there was none.
    pub async fn remove(&self, name: &str) -> bool {
        let entry = self
            .inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        match entry {
            Some(e) => {
                e.tunnel.shutdown().await;
                true
            }
            None => false,
        }
    }

    /// The tunnel named `name`.
    pub fn get(&self, name: &str) -> Option<Tunnel> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map(|e| e.tunnel.clone())
    }

    /// Every entry with its health, sorted by name.
    pub fn list(&self) -> Vec<(PoolEntry, TunnelHealth)> {
        let map = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<_> = map
            .values()
            .map(|e| (e.clone(), e.tunnel.health()))
            .collect();
        v.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        v
    }

    /// Healthy entries whose attributes match `filter`, sorted by name.
    pub fn healthy(&self, filter: &Filter) -> Vec<PoolEntry> {
        self.list()
            .into_iter()
            .filter(|(e, h)| h.healthy && filter.matches(&e.attrs))
            .map(|(e, _)| e)
            .collect()
    }

    /// Number of tunnels.
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
