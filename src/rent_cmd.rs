//! `ipsx rent`: rents one exit on the exchange with the gateway's requester core
//! (`ipsx_market::PoolManager::start_rent`), writes a wg-quick file for it (mode 0600),
//! keeps paying while it runs, prints one line per event (JSON lines with `--json`),
//! and on Ctrl-C (or SIGTERM, or the lease's end) ends the deal and settles.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipsx_market::{PoolManager, RentSpec, WgExport};
use ipsx_rotation::{CountryCode, Filter};
use serde_json::{Value, json};

/// How long Ctrl-C waits for the provider's closing claim before leaving the rest to
/// the next start (the state file keeps it).
const SETTLE_WAIT: Duration = Duration::from_secs(30);

/// The options of `ipsx rent`.
#[derive(Debug, clap::Args)]
pub(crate) struct RentArgs {
    /// A gateway config file whose `[market]` section names the exchange, the chain
    /// and the wallet (its demand groups are ignored).
    #[arg(long, short)]
    config: PathBuf,
    /// The exit's country (ISO 3166 alpha-2, e.g. `de`).
    #[arg(long)]
    country: String,
    /// The exit's city.
    #[arg(long)]
    city: Option<String>,
    /// The lease (`30m`, `1h`, `2d`); the deal is not extended.
    #[arg(long)]
    duration: String,
    /// Where to write the wg-quick file.
    #[arg(long = "wg-quick")]
    wg_quick: PathBuf,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
}

struct Printer {
    json: bool,
}

impl Printer {
    fn event(&self, event: &str, text: String, fields: Value) {
        let line = if self.json {
            let mut v = fields;
            if let Some(o) = v.as_object_mut() {
                o.insert("event".into(), json!(event));
            }
            v.to_string()
        } else {
            format!("{event}: {text}")
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Writes `text` to `path`, readable by the owner only (it holds a private key).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode through open(): set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// The rent spec from the flags; errors name the flag.
fn spec_of(args: &RentArgs) -> Result<RentSpec, String> {
    let duration = humantime::parse_duration(args.duration.trim())
        .map_err(|e| format!("--duration `{}`: {e}", args.duration))?;
    let country: CountryCode = args
        .country
        .parse()
        .map_err(|e| format!("--country `{}`: {e}", args.country))?;
    let city = args
        .city
        .as_deref()
        .map(|c| ipsx_rotation::parse_place("city", c))
        .transpose()
        .map_err(|e| format!("--city: {e}"))?;
    Ok(RentSpec {
        filter: Filter {
            country: Some(country),
            city,
            ..Filter::default()
        },
        duration,
    })
}

/// `ipsx rent ...` until Ctrl-C/SIGTERM or the lease's end.
pub(crate) async fn run(
    args: RentArgs,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let spec = spec_of(&args)?;
    let config = ipsx_config::load_gateway(&args.config).map_err(|e| e.to_string())?;
    let market = config.market.clone().ok_or_else(|| {
        format!(
            "{}: no [market] section (exchange_url, rpc_url, deployment, private_key)",
            args.config.display()
        )
    })?;
    let base_dir = config.base_dir.clone();
    let out = Printer { json: args.json };
    out.event(
        "renting",
        format!(
            "one exit matching `{}` for {}",
            spec.filter,
            humantime::format_duration(spec.duration)
        ),
        json!({"filter": spec.filter.to_string(), "duration_s": spec.duration.as_secs()}),
    );
    // The runtime's shared parts want a gateway; this one is never served.
    let gw = ipsx_gateway::Gateway::new(config, None);
    let pm = PoolManager::start_rent(gw, market, &base_dir, spec)
        .await
        .map_err(|e| e.to_string())?;
    out.event(
        "wallet",
        format!("{:#x}", pm.wallet()),
        json!({"wallet": format!("{:#x}", pm.wallet())}),
    );
    let followed = follow(&pm, &args, &out, stop).await;
    out.event(
        "ending",
        if followed == Ok(true) {
            "the lease is over; settling".into()
        } else {
            "ending the deal and settling".into()
        },
        json!({}),
    );
    pm.shutdown(SETTLE_WAIT).await;
    let st = pm.status();
    out.event(
        "settled",
        format!(
            "paid {} base units in total; {} channel(s) still open",
            st.paid_total, st.channels_open
        ),
        json!({"paid_total": st.paid_total, "spent_total": st.spent_total, "channels_open": st.channels_open}),
    );
    followed.map(|_| ())
}

/// Prints progress until `stop` resolves (false) or the rented deal ends (true); an
/// error if the wg-quick file cannot be written.
async fn follow(
    pm: &PoolManager,
    args: &RentArgs,
    out: &Printer,
    stop: impl std::future::Future<Output = ()>,
) -> Result<bool, String> {
    tokio::pin!(stop);
    let mut phases: std::collections::HashMap<u64, String> = Default::default();
    let mut written: Option<u64> = None;
    let mut paid = String::from("0");
    let mut refusal: Option<String> = None;
    // Bounded: a 30-day lease at two looks a second.
    for _ in 0..(31u64 * 24 * 3600 * 2) {
        tokio::select! {
            () = &mut stop => return Ok(false),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let st = pm.status();
        for d in st.deals.iter().rev() {
            let (Some(id), Some(phase)) = (d["deal"].as_u64(), d["phase"].as_str()) else {
                continue;
            };
            if phases.get(&id).map(String::as_str) != Some(phase) {
                phases.insert(id, phase.to_owned());
                out.event(
                    "deal",
                    format!(
                        "{id} {phase} (exit {} {}, {})",
                        d["exit_address"].as_str().unwrap_or("?"),
                        d["country"].as_str().unwrap_or("?"),
                        d["note"].as_str().unwrap_or("")
                    ),
                    d.clone(),
                );
            }
        }
        let r = st
            .groups
            .first()
            .and_then(|g| g["refusal"].as_str().map(str::to_owned));
        if r != refusal {
            if let Some(r) = &r {
                out.event("refused", r.clone(), json!({"reason": r}));
            }
            refusal = r;
        }
        if written.is_none()
            && let Some(x) = pm.rented().first()
        {
            match write_private(&args.wg_quick, &x.wg_quick()) {
                Ok(()) => out.event(
                    "wg_quick",
                    format!(
                        "{} written: deal {}, endpoint {}, exit {} ({}), path {}, keepalive {}",
                        args.wg_quick.display(),
                        x.deal,
                        x.endpoint,
                        x.exit_address,
                        x.country,
                        x.path.as_deref().unwrap_or("unknown"),
                        x.keepalive().map_or("none".into(), |k| format!("{k}s"))
                    ),
                    export_json(x, &args.wg_quick),
                ),
                Err(e) => {
                    // Nobody can use the exit: do not pay for it.
                    out.event(
                        "error",
                        format!("{}: {e}", args.wg_quick.display()),
                        json!({"file": args.wg_quick.display().to_string(), "error": e.to_string()}),
                    );
                    return Err(format!("--wg-quick {}: {e}", args.wg_quick.display()));
                }
            }
            written = Some(x.deal);
        }
        if st.paid_total != paid {
            paid = st.paid_total.clone();
            out.event(
                "paid",
                format!(
                    "{} base units (committed {})",
                    st.paid_total, st.spent_total
                ),
                json!({"paid_total": st.paid_total, "spent_total": st.spent_total}),
            );
        }
        if let Some(id) = written
            && phases.get(&id).map(String::as_str) == Some("ended")
        {
            return Ok(true);
        }
    }
    Ok(true)
}

fn export_json(x: &WgExport, file: &Path) -> Value {
    let mut v = serde_json::to_value(x).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        // The key is in the file, not on stdout.
        o.remove("private_key");
        o.insert("file".into(), json!(file.display().to_string()));
        o.insert("keepalive".into(), json!(x.keepalive()));
    }
    v
}
