//! The `ipsx` binary: thin; parses options, loads config, calls the role crates.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: the proxy's hot path allocates per request; glibc malloc showed as ~9 %
/// of the gateway's CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod echo;
mod exchange_cmd;
mod gateway_cmd;
mod provider_cmd;
mod up;

/// ipsx: a data-mining proxy gateway on a peer-to-peer IP Sharing Exchange.
#[derive(Parser)]
#[command(name = "ipsx", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy gateway (HTTP and SOCKS5 on one port).
    Gateway {
        /// The gateway config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Only validate the config and print errors with line and key.
        #[arg(long)]
        check: bool,
    },
    /// Run an echo target that answers with the caller's address (for demos and tests).
    Echo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Country label reported in the answer.
        #[arg(long)]
        country_map: Vec<String>,
        /// Answer every request with this many bytes instead (benchmark origin).
        #[arg(long)]
        fixed_body: Option<usize>,
    },
    /// Run a provider exit: a userspace WireGuard server whose flows leave from the
    /// configured exit address.
    Provider {
        /// What else to do (`status`); without one, run the exit or agent.
        #[command(subcommand)]
        action: Option<ProviderAction>,
        /// The provider config file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only validate the config.
        #[arg(long)]
        check: bool,
    },
    /// Print a new WireGuard private key and its public key.
    Keygen,
    /// Run the exchange node: order book, matching, deal book, agreement protocol.
    Exchange {
        /// The exchange config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8700")]
        listen: std::net::SocketAddr,
    },
    /// Manage a wallet: keys, balances, deposits, withdrawals, channels.
    Wallet(ipsx_chain::cli::WalletArgs),
    /// Deploy and inspect the IPSX contracts.
    Chain(ipsx_chain::cli::ChainArgs),
    /// Bring up the whole system locally: chain, contracts, exchange, providers in four
    /// countries, an echo target, and the gateway renting its exits; prints the proxy URL.
    Up {
        /// Proxy port (the admin API is on the next one; 0: any free ports).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Only the gateway over local exits on 127.0.0.2-9 (no chain, no exchange).
        #[arg(long)]
        local: bool,
        /// Write a JSON description of the running system here.
        #[arg(long)]
        state: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ProviderAction {
    /// Show a running provider agent's offers, deals, bytes served, earnings and NAT
    /// path (from its status listener; token from the config or IPSX_STATUS_TOKEN).
    Status {
        /// The agent's config file: read `[status] listen` and `token` from it.
        #[arg(long, short, conflicts_with = "url")]
        config: Option<PathBuf>,
        /// The status listener's base URL (default http://127.0.0.1:9901).
        #[arg(long)]
        url: Option<String>,
        /// Print the JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IPSX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // IPSX_LOG_FORMAT=json: one JSON object per line, for log collectors.
    if std::env::var("IPSX_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        logs.json().init();
    } else {
        logs.init();
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ipsx: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Gateway { config, check } => gateway_cmd::run(&config, check).await,
            Command::Echo {
                listen,
                country_map,
                fixed_body,
            } => echo::run(listen, country_map, fixed_body).await,
            Command::Provider {
                action: Some(ProviderAction::Status { config, url, json }),
                ..
            } => provider_cmd::status(config.as_deref(), url, json).await,
            Command::Provider {
                config: Some(config),
                check,
                ..
            } => provider_cmd::run(&config, check).await,
            Command::Provider { config: None, .. } => {
                Err("ipsx provider: give --config FILE (or a subcommand: status)".into())
            }
            Command::Exchange { config, listen } => exchange_cmd::run(&config, listen).await,
            Command::Wallet(args) => ipsx_chain::cli::run_wallet(args)
                .await
                .map_err(|e| e.to_string()),
            Command::Chain(args) => ipsx_chain::cli::run_chain(args)
                .await
                .map_err(|e| e.to_string()),
            Command::Keygen => {
                provider_cmd::keygen();
                Ok(())
            }
            Command::Up {
                port, local: true, ..
            } => gateway_cmd::up(port).await,
            Command::Up { port, state, .. } => up::run(port, state).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipsx: {e}");
            ExitCode::FAILURE
        }
    }
}
