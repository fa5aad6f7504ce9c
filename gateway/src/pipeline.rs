//! The part of handling a request every protocol shares: turn targeting and config
//! rules into a plan, pick an exit under the rate limits, and dial with retries.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ipsx_config::{LimitsConfig, OnLimit};
use ipsx_rotation::{
    ExitId, Filter, LimitScope, LimitSet, Policy, SelectError, SelectRequest, SessionSpec,
};
use tokio::time::Instant;

use crate::auth::Authed;
use crate::error::ProxyError;
use crate::exit::{DialError, ExitRuntime, ExitStream};
use crate::http1::Host;
use crate::targeting::{Rotate, Targeting};
use crate::{Gateway, Runtime};

/// What one request will do, resolved from targeting, the matching rule and defaults.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub filter: Filter,
    pub policy: Policy,
    pub session: Option<SessionSpec>,
    pub domain: String,
    pub limit_set: LimitSet,
    pub limits: LimitsConfig,
    pub token: String,
    /// The configured account whose limit applies, if any.
    pub account: Option<String>,
    /// Sessions and per-request memory are kept apart per token and account: two
    /// accounts using the same session id get two sessions.
    pub session_scope: String,
    /// The account the username names (configured or not), for the request log.
    pub user_account: String,
    /// The destination port; 0 for a UDP association, whose datagrams' ports are
    /// checked against its exit one by one.
    pub port: u16,
}

impl Plan {
    /// Targeting (explicit) first, then the first rule matching the host, then defaults.
    pub(crate) fn new(
        rt: &Runtime,
        authed: &Authed<'_>,
        targeting: &Targeting,
        host: &Host,
        port: u16,
    ) -> Self {
        let domain = host.to_header();
        let rule = rt.config.rule_for(&domain);
        let filter = match rule {
            Some(r) => targeting.filter.clone().or(&r.target),
            None => targeting.filter.clone(),
        };
        let policy = match (targeting.rotate, &targeting.session) {
            (Some(Rotate::Request), _) => Policy::PerRequest,
            (_, Some(_)) => Policy::Sticky,
            _ => rule
                .and_then(|r| r.policy)
                .unwrap_or(rt.config.rotation.policy),
        };
        let session = match (&targeting.session, policy) {
            (Some(id), Policy::Sticky) => Some(SessionSpec {
                id: id.clone(),
                ttl: targeting
                    .session_ttl
                    .unwrap_or(rt.config.rotation.session_ttl),
                allow_replacement: rt.config.rotation.session_replacement,
            }),
            _ => None,
        };
        let limits = rule
            .and_then(|r| r.limits.clone())
            .unwrap_or_else(|| rt.config.limits.clone());
        let limit_set = LimitSet {
            per_exit: limits.per_exit,
            per_exit_domain: limits.per_exit_domain,
            per_token: authed.token.and_then(|t| t.rate),
            per_account: authed.account.and_then(|a| a.rate),
        };
        Self {
            filter,
            policy,
            session,
            domain,
            limit_set,
            limits,
            token: authed.token_name().to_owned(),
            account: authed.account.map(|a| a.name.clone()),
            session_scope: if authed.user.account.is_empty() {
                authed.token_name().to_owned()
            } else {
                // U+001F cannot appear in a token name from the config by accident.
                format!("{}\u{1f}{}", authed.token_name(), authed.user.account)
            },
            user_account: authed.user.account.clone(),
            port,
        }
    }
}

/// Picks an exit for `plan`, skipping `tried`, honouring rate limits (wait or reject).
pub(crate) async fn choose_exit(
    gw: &Gateway,
    rt: &Runtime,
    plan: &Plan,
    tried: &[ExitId],
) -> Result<Arc<ExitRuntime>, ProxyError> {
    let started = Instant::now();
    loop {
        let selection = gw.rotator.select(&SelectRequest {
            token: &plan.session_scope,
            filter: &plan.filter,
            policy: plan.policy,
            session: plan.session.as_ref(),
            domain: &plan.domain,
        });
        let selection = match selection {
            Ok(s) => s,
            Err(SelectError::NoExitMatches { filter }) => {
                let Some(demand) = gw.demand.get() else {
                    return Err(ProxyError::NoExit(format!("no live exit matches {filter}")));
                };
                // Nothing live matches: ask the market to rent, and wait (bounded) for it.
                let note = demand.want(&filter).map_err(ProxyError::NoExit)?;
                if started.elapsed() >= demand.wait() {
                    return Err(ProxyError::NoExit(format!(
                        "no live exit matches {filter}; {note}; retry shortly"
                    )));
                }
                gw.exits_changed(demand.wait().saturating_sub(started.elapsed()))
                    .await;
                continue;
            }
            Err(e) => return Err(select_error(e, plan)),
        };
        let mut candidates: Vec<ExitId> = std::iter::once(selection.primary)
            .chain(selection.fallbacks)
            .collect();
        if plan.session.is_some() {
            // A sticky session never silently moves to another exit.
            candidates.truncate(1);
        }
        let candidates: Vec<Arc<ExitRuntime>> = candidates
            .iter()
            .filter(|id| !tried.contains(id))
            .filter_map(|id| gw.exit(rt, id))
            .collect();
        let with_port: Vec<&Arc<ExitRuntime>> = candidates
            .iter()
            .filter(|e| plan.port == 0 || e.config.allows_port(plan.port))
            .collect();
        if with_port.is_empty() {
            if candidates.is_empty() {
                return Err(ProxyError::NoExit(format!(
                    "no other exit matches {} for {} (tried {})",
                    plan.filter,
                    plan.domain,
                    tried.len()
                )));
            }
            return Err(ProxyError::Forbidden(format!(
                "port {} is not carried by the exits matching {}",
                plan.port, plan.filter
            )));
        }
        let mut wait = Duration::MAX;
        let mut scope = "exit";
        for exit in with_port {
            let checked = match &plan.account {
                Some(account) => gw.limiter.check_account(
                    &plan.limit_set,
                    &plan.token,
                    account,
                    &exit.id,
                    &plan.domain,
                ),
                None => gw
                    .limiter
                    .check(&plan.limit_set, &plan.token, &exit.id, &plan.domain),
            };
            match checked {
                Ok(()) => return Ok(exit.clone()),
                Err(limited) => {
                    if limited.retry_after < wait {
                        wait = limited.retry_after;
                        scope = scope_name(limited.scope);
                    }
                    if matches!(limited.scope, LimitScope::Token | LimitScope::Account) {
                        break;
                    }
                }
            }
        }
        metrics::counter!("ipsx_rate_limited_total", "scope" => scope).increment(1);
        let limited = ProxyError::RateLimited {
            scope,
            retry_after: wait,
        };
        if plan.limits.on_limit == OnLimit::Reject
            || started.elapsed() + wait > plan.limits.max_wait
        {
            return Err(limited);
        }
        if gw.waiters.fetch_add(1, Ordering::AcqRel) >= plan.limits.max_waiters {
            gw.waiters.fetch_sub(1, Ordering::AcqRel);
            return Err(limited);
        }
        tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        gw.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

fn scope_name(scope: LimitScope) -> &'static str {
    match scope {
        LimitScope::Exit => "exit",
        LimitScope::ExitDomain => "exit_domain",
        LimitScope::Token => "token",
        LimitScope::Account => "account",
    }
}

fn select_error(e: SelectError, plan: &Plan) -> ProxyError {
    match e {
        SelectError::SessionExitGone { session, exit } => ProxyError::SessionGone(format!(
            "session `{session}`: its exit `{exit}` is gone; start a new session (or enable rotation.session_replacement)"
        )),
        SelectError::AllCoolingDown { retry_after, .. } => ProxyError::CoolingDown {
            message: format!(
                "every exit matching {} is cooling down for {}; retry in {}s",
                plan.filter,
                plan.domain,
                retry_after.as_secs().max(1)
            ),
            retry_after,
        },
        SelectError::NoExitMatches { filter } => {
            ProxyError::NoExit(format!("no live exit matches {filter}"))
        }
        other => ProxyError::NoExit(other.to_string()),
    }
}

/// Dials `host:port` through an exit chosen for `plan`, moving on to another exit after
/// a connect failure as [`dial_failed`] decides.
pub(crate) async fn dial_with_retries(
    gw: &Gateway,
    rt: &Runtime,
    plan: &Plan,
    host: &Host,
) -> Result<(Arc<ExitRuntime>, ExitStream), ProxyError> {
    let mut tried: Vec<ExitId> = Vec::new();
    loop {
        let exit = choose_exit(gw, rt, plan, &tried).await?;
        let _in_flight = gw.rotator.begin(&exit.id);
        match dial(gw, &exit, host, plan.port).await {
            Ok(stream) => return Ok((exit, stream)),
            Err(source) => dial_failed(gw, rt, plan, &exit.id, source, &mut tried)?,
        }
    }
}

/// Dials through one exit, feeding a success to the rotator's statistics.
async fn dial(
    gw: &Gateway,
    exit: &ExitRuntime,
    host: &Host,
    port: u16,
) -> Result<ExitStream, DialError> {
    let started = Instant::now();
    let stream = exit.dial(host, port).await?;
    gw.rotator.record_success(&exit.id, started.elapsed());
    Ok(stream)
}

/// The one retry rule after a failed dial, for every protocol: the failure counts
/// against the exit (and feeds the ban rules) unless the destination itself was
/// refused; another exit is tried (nothing was sent, so it is always safe) unless the
/// destination was refused, the tunnel said not to, the request is in a sticky session,
/// or `max_retries` exits were tried. `Ok(())`: try another exit; `Err`: answer with it.
pub(crate) fn dial_failed(
    gw: &Gateway,
    rt: &Runtime,
    plan: &Plan,
    exit: &ExitId,
    source: DialError,
    tried: &mut Vec<ExitId>,
) -> Result<(), ProxyError> {
    let refused = matches!(source, DialError::Refused { .. });
    let elsewhere = match &source {
        DialError::Refused { .. } => false,
        DialError::Tunnel {
            retry_elsewhere, ..
        } => *retry_elsewhere,
        _ => true,
    };
    if !refused {
        gw.rotator.record_failure(exit);
        apply_ban(gw, rt, exit, &plan.domain, &connect_outcome(&source));
    }
    let err = ProxyError::Dial {
        exit: exit.to_string(),
        source,
    };
    tried.push(exit.clone());
    if !elsewhere || !may_retry(rt, plan, tried) {
        return Err(err);
    }
    tracing::debug!(error = %err, "retrying on another exit");
    Ok(())
}

/// Whether another exit may be tried after `tried` failed: never in a sticky session,
/// and at most `max_retries` times.
pub(crate) fn may_retry(rt: &Runtime, plan: &Plan, tried: &[ExitId]) -> bool {
    plan.session.is_none() && tried.len() <= rt.config.rotation.max_retries
}

/// The ban-rule outcome of a dial failure.
pub(crate) fn connect_outcome(e: &DialError) -> ipsx_rotation::Outcome<'static> {
    if e.is_timeout() {
        ipsx_rotation::Outcome::ConnectTimeout
    } else {
        ipsx_rotation::Outcome::ConnectError
    }
}

/// Applies the first matching ban rule, if any; returns true when the exit was banned.
pub(crate) fn apply_ban(
    gw: &Gateway,
    rt: &Runtime,
    exit: &ExitId,
    domain: &str,
    outcome: &ipsx_rotation::Outcome<'_>,
) -> bool {
    match ipsx_rotation::classify(&rt.config.bans, outcome) {
        Some((scope, cooldown)) => {
            let scope = match scope {
                ipsx_rotation::BanScopeKind::Global => ipsx_rotation::BanScope::Global,
                _ => ipsx_rotation::BanScope::Domain(domain.to_owned()),
            };
            tracing::info!(exit = %exit, ?scope, ?cooldown, "exit banned");
            metrics::counter!("ipsx_exit_bans_total", "exit" => exit.to_string()).increment(1);
            gw.rotator.ban(exit, scope, cooldown);
            true
        }
        None => false,
    }
}
