//! The gateway role's config: listeners, access tokens, rotation, limits, bans, rules, exits.
//!
//! ```toml
//! [gateway]
//! listen = "127.0.0.1:8080"
//! admin_listen = "127.0.0.1:8081"
//! allow_destinations = ["127.0.0.0/8"]   # dev/test only: lets loopback targets through
//!
//! [[token]]
//! name = "scraper"
//! secret = "change-me"
//! rate = "50/s"
//!
//! [[exit]]
//! name = "de-1"
//! bind = "127.0.0.2"
//! country = "de"
//! ```

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::Duration;

use ipnet::IpNet;
use ipsx_rotation::{BanRule, CountryCode, ExitAttributes, ExitKind, Filter, Policy, Quota};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::error::{ConfigError, Location};
use crate::secret::Secret;

/// The whole gateway config, validated.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Listener addresses, limits and timeouts.
    pub listener: ListenerConfig,
    /// Access tokens (proxy passwords) and their limits.
    pub tokens: Vec<TokenConfig>,
    /// Accounts (sub-users named in the proxy username) and their limits.
    pub accounts: Vec<AccountConfig>,
    /// Default rotation behaviour.
    pub rotation: RotationConfig,
    /// Default rate limits.
    pub limits: LimitsConfig,
    /// Ban rules, first match wins.
    pub bans: Vec<BanRule>,
    /// Per-host rules, first match wins.
    pub rules: Vec<RuleConfig>,
    /// Configured exits.
    pub exits: Vec<ExitConfig>,
    /// Renting exits on the exchange; off when absent.
    pub market: Option<crate::market::MarketConfig>,
    /// The folder relative paths in this config are read from.
    pub base_dir: std::path::PathBuf,
}

/// `[gateway]`: where to listen and the limits of every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// The proxy port: HTTP and SOCKS5 on one socket.
    pub listen: SocketAddr,
    /// The admin API and `/metrics`; off when absent.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token for the admin API and `/metrics`; required when `admin_listen` is
    /// not loopback.
    #[serde(skip_serializing)]
    pub admin_token: Option<Secret>,
    /// Serve a non-loopback `listen` with no `[[token]]` (anyone may use the proxy).
    pub open_proxy: bool,
    /// Most client connections at once; beyond, new ones are refused (503 / SOCKS 0x01).
    pub max_connections: usize,
    /// From accept to a complete request head (slowloris defence).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A client or CONNECT tunnel with no bytes either way for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Dialling one exit to the target.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// From request sent to response head from the target.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// How long SIGTERM waits for in-flight requests before closing them.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Largest request head in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Most header fields in a request head (431 beyond).
    pub max_headers: usize,
    /// Ranges that are refused by default (loopback, private, ...) but allowed here.
    /// Only for tests and local demos.
    pub allow_destinations: Vec<IpNet>,
    /// How often the config file is checked for changes (0s: never; SIGHUP still works).
    #[serde(with = "humantime_serde")]
    pub reload_poll: Duration,
    /// A "what is my IP" URL fetched through each WireGuard exit that names an
    /// `exit_ip`; an exit leaving from another address is marked unhealthy.
    pub verify_url: Option<String>,
    /// Most SOCKS5 UDP associations open at once (RFC 1928 section 7); beyond, UDP
    /// ASSOCIATE is refused (SOCKS 0x01). 0 turns UDP ASSOCIATE off.
    pub udp_max_associations: usize,
    /// Most distinct destinations (address and port) one UDP association may send to;
    /// datagrams to further ones are dropped.
    pub udp_max_destinations: usize,
    /// Largest UDP payload relayed, either way, in bytes; larger datagrams are dropped.
    pub udp_max_datagram: usize,
    /// A UDP association with no datagram either way for this long is closed.
    #[serde(with = "humantime_serde")]
    pub udp_idle_timeout: Duration,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: None,
            admin_token: None,
            open_proxy: false,
            max_connections: 10_000,
            header_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            allow_destinations: Vec::new(),
            reload_poll: Duration::from_secs(1),
            verify_url: None,
            udp_max_associations: 1024,
            udp_max_destinations: 256,
            udp_max_datagram: 8192,
            udp_idle_timeout: Duration::from_secs(120),
        }
    }
}

/// `[[token]]`: one access token (the proxy password) and its limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A name for logs and metrics (never the secret).
    pub name: String,
    /// The password clients send.
    pub secret: Secret,
    /// Requests per time for this token.
    #[serde(default)]
    pub rate: Option<Quota>,
    /// Most concurrent client connections for this token.
    #[serde(default)]
    pub max_connections: Option<usize>,
}

/// `[[account]]`: one account, the sub-user a client names in its proxy username
/// (`ACCOUNT-...`, Oxylabs `customer-USER`, Decodo `user-USER`, Bright Data
/// `brd-customer-ID-zone-ZONE` as `ID/ZONE`), and its limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// The account as it appears in usernames; also its metrics label.
    pub name: String,
    /// The only `[[token]]` (by name) this account may be used with; any when absent.
    #[serde(default)]
    pub token: Option<String>,
    /// Requests per time for this account.
    #[serde(default)]
    pub rate: Option<Quota>,
    /// Most concurrent client connections for this account.
    #[serde(default)]
    pub max_connections: Option<usize>,
}

/// `[rotation]`: the default policy and session behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotationConfig {
    /// Policy when no rule and no targeting says otherwise.
    pub policy: Policy,
    /// Sticky session lifetime when the client gives no `sesstime`.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Longest session a client may ask for.
    #[serde(with = "humantime_serde")]
    pub max_session_ttl: Duration,
    /// When a session's exit is gone: false -> the request fails loudly (502);
    /// true -> a new exit matching the same filter takes over the session.
    pub session_replacement: bool,
    /// Retries on other exits for idempotent requests after a ban or connect failure.
    pub max_retries: usize,
    /// Most sticky sessions kept.
    pub max_sessions: u64,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            policy: Policy::PerRequest,
            session_ttl: Duration::from_secs(10 * 60),
            max_session_ttl: Duration::from_secs(24 * 3600),
            session_replacement: false,
            max_retries: 2,
            max_sessions: 100_000,
        }
    }
}

/// What to do with a request over a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimit {
    /// Wait for a slot, at most `max_wait`, with at most `max_waiters` waiting.
    Wait,
    /// Refuse at once: 429 / SOCKS 0x01.
    Reject,
}

/// `[limits]` (and the same keys in a rule): rate limits and what happens over them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Requests per time through one exit.
    pub per_exit: Option<Quota>,
    /// Requests per time through one exit to one target host.
    pub per_exit_domain: Option<Quota>,
    /// Wait or reject when over a limit.
    pub on_limit: OnLimit,
    /// Longest wait for a slot.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Most requests waiting for a slot at once; beyond, rejected.
    pub max_waiters: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            per_exit: None,
            per_exit_domain: None,
            on_limit: OnLimit::Wait,
            max_wait: Duration::from_secs(2),
            max_waiters: 1024,
        }
    }
}

/// A target-host pattern: `example.com` (exact) or `*.example.com` (any subdomain, and
/// the domain itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    suffix: String,
    wildcard: bool,
}

impl HostPattern {
    /// Parses a pattern; `*` alone matches every host.
    pub fn parse(text: &str) -> Result<Self, String> {
        let lower = text.trim().to_ascii_lowercase();
        if lower == "*" {
            return Ok(Self {
                suffix: String::new(),
                wildcard: true,
            });
        }
        let (wildcard, rest) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let ok = !rest.is_empty()
            && rest.len() <= 253
            && rest.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !ok && rest.parse::<IpAddr>().is_err() {
            return Err(format!(
                "bad host pattern `{text}` (expected `example.com`, `*.example.com` or `*`)"
            ));
        }
        Ok(Self {
            suffix: rest.to_owned(),
            wildcard,
        })
    }

    /// True when `host` (lower-case, no port) matches.
    pub fn matches(&self, host: &str) -> bool {
        if self.wildcard && self.suffix.is_empty() {
            return true;
        }
        if host.eq_ignore_ascii_case(&self.suffix) {
            return true;
        }
        self.wildcard
            && host.len() > self.suffix.len()
            && host.as_bytes()[host.len() - self.suffix.len() - 1] == b'.'
            && host[host.len() - self.suffix.len()..].eq_ignore_ascii_case(&self.suffix)
    }
}

/// `[[rule]]`: settings for requests to matching target hosts.
#[derive(Debug, Clone)]
pub struct RuleConfig {
    /// Target host patterns; any may match.
    pub hosts: Vec<HostPattern>,
    /// Default targeting for these hosts (explicit targeting overrides it).
    pub target: Filter,
    /// Rotation policy for these hosts.
    pub policy: Option<Policy>,
    /// Rate limits for these hosts (replace the defaults).
    pub limits: Option<LimitsConfig>,
}

pub use ipsx_egress::Protocol;

/// How an exit reaches the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitTransport {
    /// Sockets bound to a local source address (a host with many IPs; 127.0.0.x in tests).
    Local {
        /// The source address.
        bind: IpAddr,
    },
    /// A userspace WireGuard tunnel to an exit (ours, wireguard-go, kernel wg with NAT).
    WireGuard {
        /// The tunnel, from a wg-quick file.
        tunnel: Box<ipsx_tunnel_pool::TunnelConfig>,
        /// The file it came from (for the admin API and logs).
        file: std::path::PathBuf,
        /// The address traffic should leave from; checked through the tunnel against
        /// `gateway.verify_url` when both are set.
        exit_ip: Option<IpAddr>,
    },
}

/// `[[exit]]`: one configured exit.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitConfig {
    /// Unique name.
    pub name: String,
    /// How traffic leaves.
    pub transport: ExitTransport,
    /// Attributes the targeting filter selects by.
    pub attrs: ExitAttributes,
    /// Destination ports this exit carries.
    pub protocols: Vec<Protocol>,
}

impl ExitConfig {
    /// True when this exit carries traffic to `port`.
    pub fn allows_port(&self, port: u16) -> bool {
        self.protocols.iter().any(|p| p.allows(port))
    }
}

// === raw schema ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    #[serde(default)]
    gateway: Option<Spanned<ListenerConfig>>,
    #[serde(default)]
    token: Vec<Spanned<TokenConfig>>,
    #[serde(default)]
    account: Vec<Spanned<AccountConfig>>,
    #[serde(default)]
    rotation: Option<Spanned<RotationConfig>>,
    #[serde(default)]
    limits: LimitsConfig,
    #[serde(default)]
    ban: Vec<BanRule>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    #[serde(default)]
    exit: Vec<Spanned<RawExit>>,
    #[serde(default)]
    market: Option<Spanned<crate::market::MarketConfig>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    hosts: Vec<Spanned<String>>,
    #[serde(default)]
    target: RawTarget,
    #[serde(default)]
    policy: Option<Policy>,
    #[serde(default)]
    limits: Option<LimitsConfig>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    country: Option<CountryCode>,
    region: Option<Spanned<String>>,
    city: Option<Spanned<String>>,
    asn: Option<u32>,
    #[serde(rename = "type")]
    kind: Option<ExitKind>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExit {
    name: Spanned<String>,
    bind: Option<IpAddr>,
    #[serde(default)]
    wireguard: Option<Spanned<String>>,
    #[serde(default)]
    exit_ip: Option<IpAddr>,
    #[serde(default)]
    country: Option<CountryCode>,
    #[serde(default)]
    region: Option<Spanned<String>>,
    #[serde(default)]
    city: Option<Spanned<String>>,
    #[serde(default)]
    asn: Option<u32>,
    #[serde(default, rename = "type")]
    kind: Option<ExitKind>,
    #[serde(default = "default_protocols")]
    protocols: Vec<Protocol>,
}

/// The folder relative paths in a config file are read from: the file's own folder.
fn base_dir(file: &str) -> std::path::PathBuf {
    std::path::Path::new(file)
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Any]
}

struct Checker<'a> {
    file: &'a str,
    text: &'a str,
}

impl Checker<'_> {
    fn invalid(&self, span: Range<usize>, key: String, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            location: Location::at(self.file, self.text, span.start),
            key,
            message: message.into(),
        }
    }

    fn place(
        &self,
        key: String,
        value: &Option<Spanned<String>>,
    ) -> Result<Option<String>, ConfigError> {
        match value {
            None => Ok(None),
            Some(v) => ipsx_rotation::parse_place(&key, v.get_ref())
                .map(Some)
                .map_err(|e| self.invalid(v.span(), key, e.to_string())),
        }
    }
}

impl GatewayConfig {
    /// Parses and validates a gateway config; `file` is used in error messages.
    pub fn from_toml(text: &str, file: &str) -> Result<Self, ConfigError> {
        let raw: RawGateway = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start);
            ConfigError::Parse {
                location: Location::at(file, text, at),
                message: crate::error::with_key(e.message().trim(), text, at),
            }
        })?;
        let check = Checker { file, text };
        let span_of = |t: &Option<Spanned<_>>| t.as_ref().map_or(0..0, |t: &Spanned<_>| t.span());
        let whole = span_of(&raw.gateway);
        let listener: ListenerConfig = raw
            .gateway
            .as_ref()
            .map(|g| g.get_ref().clone())
            .unwrap_or_default();
        let rotation_span = raw.rotation.as_ref().map_or(0..0, |r| r.span());
        let rotation: RotationConfig = raw
            .rotation
            .as_ref()
            .map(|r| r.get_ref().clone())
            .unwrap_or_default();
        let tokens: Vec<TokenConfig> = raw.token.iter().map(|t| t.get_ref().clone()).collect();

        let l = &listener;
        let positive = [
            ("gateway.header_timeout", l.header_timeout),
            ("gateway.idle_timeout", l.idle_timeout),
            ("gateway.connect_timeout", l.connect_timeout),
            ("gateway.response_timeout", l.response_timeout),
            ("gateway.udp_idle_timeout", l.udp_idle_timeout),
        ];
        for (key, value) in positive {
            if value.is_zero() {
                return Err(check.invalid(whole.clone(), key.into(), "must be more than 0s"));
            }
        }
        if l.max_connections == 0 {
            return Err(check.invalid(
                whole.clone(),
                "gateway.max_connections".into(),
                "must be at least 1",
            ));
        }
        if !(1024..=1024 * 1024).contains(&l.max_header_bytes) {
            return Err(check.invalid(
                whole.clone(),
                "gateway.max_header_bytes".into(),
                "must be between 1024 and 1048576",
            ));
        }
        if !(512..=65507).contains(&l.udp_max_datagram) {
            return Err(check.invalid(
                whole.clone(),
                "gateway.udp_max_datagram".into(),
                "must be between 512 and 65507 (the largest UDP payload)",
            ));
        }
        if l.udp_max_destinations == 0 {
            return Err(check.invalid(
                whole.clone(),
                "gateway.udp_max_destinations".into(),
                "must be at least 1",
            ));
        }
        if !(8..=1000).contains(&l.max_headers) {
            return Err(check.invalid(
                whole.clone(),
                "gateway.max_headers".into(),
                "must be between 8 and 1000",
            ));
        }

        let mut token_names = HashSet::new();
        let mut secrets = HashSet::new();
        for (i, spanned) in raw.token.iter().enumerate() {
            let t = spanned.get_ref();
            if t.name.is_empty() || !token_names.insert(t.name.clone()) {
                return Err(check.invalid(
                    spanned.span(),
                    format!("token[{i}].name"),
                    "must be unique and not empty",
                ));
            }
            if t.secret.expose().len() < 8 || !secrets.insert(t.secret.expose().to_owned()) {
                return Err(check.invalid(
                    spanned.span(),
                    format!("token[{i}].secret"),
                    "must be unique and at least 8 characters",
                ));
            }
        }
        let mut account_names = HashSet::new();
        for (i, spanned) in raw.account.iter().enumerate() {
            let a = spanned.get_ref();
            let name_ok =
                !a.name.is_empty() && a.name.len() <= 128 && !a.name.chars().any(char::is_control);
            if !name_ok || !account_names.insert(a.name.clone()) {
                return Err(check.invalid(
                    spanned.span(),
                    format!("account[{i}].name"),
                    "must be unique, 1-128 bytes, no control characters",
                ));
            }
            if let Some(t) = &a.token
                && !token_names.contains(t)
            {
                return Err(check.invalid(
                    spanned.span(),
                    format!("account[{i}].token"),
                    format!("no [[token]] is named `{t}`"),
                ));
            }
            if a.max_connections == Some(0) {
                return Err(check.invalid(
                    spanned.span(),
                    format!("account[{i}].max_connections"),
                    "must be at least 1",
                ));
            }
        }
        if !l.listen.ip().is_loopback() && tokens.is_empty() && !l.open_proxy {
            return Err(check.invalid(
                whole.clone(),
                "gateway.listen".into(),
                "is not loopback and there is no [[token]]: anyone could use the proxy; add a [[token]] or set `gateway.open_proxy = true`",
            ));
        }
        if let Some(admin) = l.admin_listen {
            let token_ok = l
                .admin_token
                .as_ref()
                .is_some_and(|t| t.expose().len() >= 16);
            if !admin.ip().is_loopback() && !token_ok {
                return Err(check.invalid(
                    whole.clone(),
                    "gateway.admin_token".into(),
                    "required (at least 16 characters) when `gateway.admin_listen` is not loopback",
                ));
            }
        }
        if l.admin_token
            .as_ref()
            .is_some_and(|t| t.expose().len() < 16)
        {
            return Err(check.invalid(
                whole.clone(),
                "gateway.admin_token".into(),
                "must be at least 16 characters",
            ));
        }
        if rotation.session_ttl > rotation.max_session_ttl {
            return Err(check.invalid(
                rotation_span.clone(),
                "rotation.session_ttl".into(),
                "is longer than rotation.max_session_ttl",
            ));
        }
        if rotation.max_retries > 10 {
            return Err(check.invalid(
                rotation_span.clone(),
                "rotation.max_retries".into(),
                "must be at most 10",
            ));
        }

        let mut exits = Vec::with_capacity(raw.exit.len());
        let mut names = HashSet::new();
        for (i, spanned) in raw.exit.iter().enumerate() {
            let e = spanned.get_ref();
            let name = e.name.get_ref();
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if !name_ok {
                return Err(check.invalid(
                    e.name.span(),
                    format!("exit[{i}].name"),
                    "1-64 letters, digits, `-`, `_` or `.`",
                ));
            }
            if !names.insert(name.clone()) {
                return Err(check.invalid(
                    e.name.span(),
                    format!("exit[{i}].name"),
                    format!("duplicate exit name `{name}`"),
                ));
            }
            let transport = match (e.bind, &e.wireguard) {
                (Some(bind), None) => ExitTransport::Local { bind },
                (None, Some(path)) => {
                    let key = format!("exit[{i}].wireguard");
                    let file = base_dir(file).join(path.get_ref());
                    let conf_text = std::fs::read_to_string(&file).map_err(|err| {
                        check.invalid(
                            path.span(),
                            key.clone(),
                            format!("{}: {err}", file.display()),
                        )
                    })?;
                    let tunnel = ipsx_tunnel_pool::parse_wg_quick(&conf_text).map_err(|err| {
                        check.invalid(path.span(), key, format!("{}: {err}", file.display()))
                    })?;
                    ExitTransport::WireGuard {
                        tunnel: Box::new(tunnel),
                        file,
                        exit_ip: e.exit_ip,
                    }
                }
                (Some(_), Some(path)) => {
                    return Err(check.invalid(
                        path.span(),
                        format!("exit[{i}].wireguard"),
                        "an exit has either `bind` (local) or `wireguard` (tunnel), not both",
                    ));
                }
                (None, None) => {
                    return Err(check.invalid(
                        spanned.span(),
                        format!("exit[{i}].bind"),
                        "missing: a local exit needs `bind` (the source address), a tunnel exit `wireguard` (a wg-quick file)",
                    ));
                }
            };
            if e.exit_ip.is_some() && e.wireguard.is_none() {
                return Err(check.invalid(
                    spanned.span(),
                    format!("exit[{i}].exit_ip"),
                    "only for `wireguard` exits",
                ));
            }
            if e.protocols.is_empty() {
                return Err(check.invalid(
                    spanned.span(),
                    format!("exit[{i}].protocols"),
                    "must name at least one protocol",
                ));
            }
            let attrs = ExitAttributes {
                country: e.country,
                region: check.place(format!("exit[{i}].region"), &e.region)?,
                city: check.place(format!("exit[{i}].city"), &e.city)?,
                asn: e.asn,
                kind: e.kind,
            };
            exits.push(ExitConfig {
                name: name.clone(),
                transport,
                attrs,
                protocols: e.protocols.clone(),
            });
        }

        let mut rules = Vec::with_capacity(raw.rule.len());
        for (i, spanned) in raw.rule.iter().enumerate() {
            let r = spanned.get_ref();
            if r.hosts.is_empty() {
                return Err(check.invalid(
                    spanned.span(),
                    format!("rule[{i}].hosts"),
                    "must name at least one host pattern",
                ));
            }
            let mut hosts = Vec::with_capacity(r.hosts.len());
            for h in &r.hosts {
                hosts.push(
                    HostPattern::parse(h.get_ref())
                        .map_err(|m| check.invalid(h.span(), format!("rule[{i}].hosts"), m))?,
                );
            }
            let target = Filter {
                country: r.target.country,
                region: check.place(format!("rule[{i}].target.region"), &r.target.region)?,
                city: check.place(format!("rule[{i}].target.city"), &r.target.city)?,
                asn: r.target.asn,
                kind: r.target.kind,
            };
            rules.push(RuleConfig {
                hosts,
                target,
                policy: r.policy,
                limits: r.limits.clone(),
            });
        }

        if let Some(m) = &raw.market {
            let market = m.get_ref();
            if market.payment_window.is_zero()
                || market.proof_interval.is_zero()
                || market.deal_duration < std::time::Duration::from_secs(5)
            {
                return Err(check.invalid(
                    m.span(),
                    "market".into(),
                    "payment_window and proof_interval must be > 0s, deal_duration at least 5s",
                ));
            }
            if market.proof_interval > market.payment_window {
                return Err(check.invalid(m.span(), "market.proof_interval".into(), "must not be longer than market.payment_window (the provider would stop serving)"));
            }
            if let Err((key, why)) = market.check() {
                return Err(check.invalid(m.span(), format!("market.{key}"), why));
            }
            if let Err((key, why)) = market.nat.settings() {
                return Err(check.invalid(m.span(), format!("market.nat.{key}"), why));
            }
            for (i, d) in market.demand.iter().enumerate() {
                if d.count == 0 || d.count > 1000 {
                    return Err(check.invalid(
                        m.span(),
                        format!("market.demand[{i}].count"),
                        "must be 1..=1000",
                    ));
                }
            }
        }
        Ok(Self {
            market: raw.market.map(|m| m.into_inner()),
            base_dir: base_dir(file),
            listener,
            tokens,
            accounts: raw.account.into_iter().map(Spanned::into_inner).collect(),
            rotation,
            limits: raw.limits,
            bans: raw.ban,
            rules,
            exits,
        })
    }

    /// The configured account named `name`.
    pub fn account(&self, name: &str) -> Option<&AccountConfig> {
        self.accounts.iter().find(|a| a.name == name)
    }

    /// The first rule whose host patterns match `host`.
    pub fn rule_for(&self, host: &str) -> Option<&RuleConfig> {
        self.rules
            .iter()
            .find(|r| r.hosts.iter().any(|p| p.matches(host)))
    }
}
