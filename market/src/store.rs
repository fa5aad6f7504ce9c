//! The requester's local store: deals, their channels and the latest proofs, and the
//! last exchange event seen, in one SQLite file, so a gateway killed with SIGKILL and
//! started again resumes its live deals and closes every channel it opened.
//!
//! Each deal is one row holding the core's [`Deal`] as JSON, written after every step
//! of the core that changed it (WAL, `synchronous = FULL`). The file belongs to one
//! wallet: opening it with another wallet is refused, naming `market.state_file`.

use std::path::Path;

use alloy::primitives::Address;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::core::Deal;

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed.
    #[error("market.state_file: {0}")]
    Sqlite(String),
    /// The file belongs to another wallet.
    #[error("market.state_file belongs to wallet {found}, not {wallet}")]
    OtherWallet {
        /// This gateway's wallet.
        wallet: String,
        /// The file's.
        found: String,
    },
    /// A row could not be read back.
    #[error("market.state_file: deal {id} is unreadable: {reason}")]
    Corrupt {
        /// Deal id.
        id: i64,
        /// Why.
        reason: String,
    },
}

fn sqlite(e: sqlx::Error) -> StoreError {
    StoreError::Sqlite(e.to_string())
}

/// The open store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the store at `path` for `wallet`.
    pub async fn open(path: &Path, wallet: Address) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .map_err(sqlite)?;
        for ddl in [
            "CREATE TABLE IF NOT EXISTS deals (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ] {
            sqlx::query(ddl).execute(&pool).await.map_err(sqlite)?;
        }
        let store = Self { pool };
        let me = format!("{wallet:#x}");
        match store.meta("wallet").await? {
            Some(found) if found != me => {
                return Err(StoreError::OtherWallet { wallet: me, found });
            }
            Some(_) => {}
            None => store.set_meta("wallet", &me).await?,
        }
        Ok(store)
    }

    async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT value FROM meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(sqlite)?;
        Ok(row.map(|r| r.0))
    }

    async fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await
            .map_err(sqlite)?;
        Ok(())
    }

    /// Every stored deal.
    pub async fn load(&self) -> Result<Vec<Deal>, StoreError> {
        let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, body FROM deals ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(sqlite)?;
        rows.into_iter()
            .map(|(id, body)| {
                serde_json::from_str(&body).map_err(|e| StoreError::Corrupt {
                    id,
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// Writes these deals (one transaction).
    pub async fn save(&self, deals: &[Deal]) -> Result<(), StoreError> {
        if deals.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(sqlite)?;
        for d in deals {
            let body = serde_json::to_string(d).map_err(|e| StoreError::Sqlite(e.to_string()))?;
            let id = i64::try_from(d.id).map_err(|_| StoreError::Corrupt {
                id: -1,
                reason: format!("deal id {} out of range", d.id),
            })?;
            sqlx::query("INSERT INTO deals (id, body) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET body = excluded.body")
                .bind(id)
                .bind(body)
                .execute(&mut *tx)
                .await
                .map_err(sqlite)?;
        }
        tx.commit().await.map_err(sqlite)
    }

    /// Forgets these deals (finished and settled).
    pub async fn delete(&self, ids: &[u64]) -> Result<(), StoreError> {
        for id in ids {
            let id = i64::try_from(*id).unwrap_or(-1);
            sqlx::query("DELETE FROM deals WHERE id = ?")
                .bind(id)
                .execute(&self.pool)
                .await
                .map_err(sqlite)?;
        }
        Ok(())
    }

    /// The last exchange event applied (0 at first start).
    pub async fn last_event(&self) -> Result<u64, StoreError> {
        Ok(self
            .meta("last_event")
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// Records the last exchange event applied.
    pub async fn set_last_event(&self, id: u64) -> Result<(), StoreError> {
        self.set_meta("last_event", &id.to_string()).await
    }
}
