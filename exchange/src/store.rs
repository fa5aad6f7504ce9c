//! The journal: every accepted command, in order, in SQLite (default) or PostgreSQL.
//!
//! The engine is deterministic, so the journal is the whole state: on start the node
//! replays it. An answer is only sent once the command's row is committed (group commit:
//! one transaction per batch of concurrent commands), so a crash, even `kill -9`, loses
//! nothing that was acknowledged. SQLite runs in WAL mode with `synchronous = FULL`.

use std::str::FromStr;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::error::ExchangeError;

/// A journal backend.
#[derive(Debug, Clone)]
pub enum Store {
    /// An SQLite file.
    Sqlite(SqlitePool),
    /// A PostgreSQL database.
    Postgres(PgPool),
}

fn storage(what: &str) -> impl Fn(sqlx::Error) -> ExchangeError + '_ {
    move |e| ExchangeError::Storage(format!("{what}: {e}"))
}

impl Store {
    /// Opens (and creates if needed) the journal at `url`: `sqlite://PATH` or
    /// `postgres://...`.
    pub async fn open(url: &str) -> Result<Self, ExchangeError> {
        if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(storage("database url"))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full);
            // One writer connection: the journal is written by one task anyway.
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(opts)
                .await
                .map_err(storage("open sqlite"))?;
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, body TEXT NOT NULL)",
            )
            .execute(&pool)
            .await
            .map_err(storage("create table"))?;
            Ok(Self::Sqlite(pool))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .connect(url)
                .await
                .map_err(storage("open postgres"))?;
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS journal (seq BIGINT PRIMARY KEY, body TEXT NOT NULL)",
            )
            .execute(&pool)
            .await
            .map_err(storage("create table"))?;
            Ok(Self::Postgres(pool))
        } else {
            Err(ExchangeError::Config {
                key: "database".into(),
                reason: "expected sqlite://PATH or postgres://...".into(),
            })
        }
    }

    /// Every journal row, in order.
    pub async fn load(&self) -> Result<Vec<(i64, String)>, ExchangeError> {
        let q = "SELECT seq, body FROM journal ORDER BY seq";
        match self {
            Self::Sqlite(p) => sqlx::query_as(q).fetch_all(p).await,
            Self::Postgres(p) => sqlx::query_as(q).fetch_all(p).await,
        }
        .map_err(storage("load journal"))
    }

    /// Appends rows in one transaction.
    pub async fn append(&self, rows: &[(i64, String)]) -> Result<(), ExchangeError> {
        match self {
            Self::Sqlite(p) => {
                let mut tx = p.begin().await.map_err(storage("begin"))?;
                for (seq, body) in rows {
                    sqlx::query("INSERT INTO journal (seq, body) VALUES (?, ?)")
                        .bind(seq)
                        .bind(body)
                        .execute(&mut *tx)
                        .await
                        .map_err(storage("insert"))?;
                }
                tx.commit().await.map_err(storage("commit"))
            }
            Self::Postgres(p) => {
                let seqs: Vec<i64> = rows.iter().map(|(s, _)| *s).collect();
                let bodies: Vec<&str> = rows.iter().map(|(_, b)| b.as_str()).collect();
                sqlx::query(
                    "INSERT INTO journal (seq, body) SELECT * FROM UNNEST($1::bigint[], $2::text[])",
                )
                .bind(&seqs)
                .bind(&bodies)
                .execute(p)
                .await
                .map(|_| ())
                .map_err(storage("insert"))
            }
        }
    }

    /// Closes the pool.
    pub async fn close(&self) {
        match self {
            Self::Sqlite(p) => p.close().await,
            Self::Postgres(p) => p.close().await,
        }
    }
}
