//! Ban rules: a sans-IO classifier from "what happened on this exit" to "cool it down
//! for this domain, or everywhere, for this long".
//!
//! The gateway feeds each outcome (status and the first bytes of the body, or a connect
//! failure) to [`classify`] and, on a match, calls
//! [`Rotator::ban`](crate::Rotator::ban) and retries on another exit when the request is
//! safe to retry.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{ParseError, truncate};
use crate::rotator::BanScope;

/// Most body patterns one rule may carry, and the longest pattern: a rule is matched
/// against every response, so its cost stays bounded.
pub const MAX_BODY_PATTERNS: usize = 32;
/// Longest body pattern, in bytes.
pub const MAX_PATTERN_LEN: usize = 256;
/// Longest cool-down a rule may ask for (30 days).
pub const MAX_COOLDOWN: Duration = Duration::from_secs(30 * 24 * 3600);

/// Where a ban applies, as written in a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BanScopeKind {
    /// Only for the target domain of the request that triggered it.
    #[default]
    Domain,
    /// For every target.
    Global,
}

impl BanScopeKind {
    /// The runtime scope for a request to `domain`.
    pub fn for_domain(self, domain: &str) -> BanScope {
        match self {
            Self::Domain => BanScope::Domain(domain.to_owned()),
            Self::Global => BanScope::Global,
        }
    }
}

/// One ban rule, as embedded in the TOML config:
///
/// ```toml
/// [[ban_rules]]
/// statuses = [403, 429]
/// body_contains = ["captcha"]
/// scope = "domain"
/// cooldown = "5m"
/// ```
///
/// A response matches when every list that is set matches (its status is in
/// `statuses`, and its body prefix contains one of `body_contains`, ASCII
/// case-insensitively); a rule with neither list never matches a response. Connect
/// failures match through `on_connect_timeout` / `on_connect_error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawBanRule")]
pub struct BanRule {
    /// HTTP statuses that trigger the rule (100..=599).
    pub statuses: Vec<u16>,
    /// Byte strings looked for in the body prefix, ASCII case-insensitively.
    pub body_contains: Vec<String>,
    /// A connect timeout to the target through this exit triggers the rule.
    pub on_connect_timeout: bool,
    /// A connect error (refused, reset, unreachable) through this exit triggers it.
    pub on_connect_error: bool,
    /// Ban for the request's domain only, or globally.
    pub scope: BanScopeKind,
    /// How long the exit cools down.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
}

/// The rule as written, before [`BanRule::validate`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBanRule {
    #[serde(default)]
    statuses: Vec<u16>,
    #[serde(default)]
    body_contains: Vec<String>,
    #[serde(default)]
    on_connect_timeout: bool,
    #[serde(default)]
    on_connect_error: bool,
    #[serde(default)]
    scope: BanScopeKind,
    #[serde(with = "humantime_serde")]
    cooldown: Duration,
}

impl TryFrom<RawBanRule> for BanRule {
    type Error = ParseError;
    fn try_from(raw: RawBanRule) -> Result<Self, Self::Error> {
        let rule = BanRule {
            statuses: raw.statuses,
            body_contains: raw.body_contains,
            on_connect_timeout: raw.on_connect_timeout,
            on_connect_error: raw.on_connect_error,
            scope: raw.scope,
            cooldown: raw.cooldown,
        };
        rule.validate()?;
        Ok(rule)
    }
}

impl BanRule {
    /// Checks that the rule can trigger and that its values are sane; the error names
    /// the field at fault.
    pub fn validate(&self) -> Result<(), ParseError> {
        let bad = |field, reason: String| Err(ParseError::BadBanRule { field, reason });
        if let Some(s) = self.statuses.iter().find(|s| !(100..=599).contains(*s)) {
            return bad("statuses", format!("{s} is not an HTTP status (100-599)"));
        }
        if self.body_contains.len() > MAX_BODY_PATTERNS {
            return bad(
                "body_contains",
                format!(
                    "{} patterns, at most {MAX_BODY_PATTERNS}",
                    self.body_contains.len()
                ),
            );
        }
        for p in &self.body_contains {
            if p.is_empty() {
                return bad(
                    "body_contains",
                    "an empty pattern matches every body".into(),
                );
            }
            if p.len() > MAX_PATTERN_LEN {
                return bad(
                    "body_contains",
                    format!(
                        "pattern `{}...` longer than {MAX_PATTERN_LEN} bytes",
                        truncate(p)
                    ),
                );
            }
        }
        if self.statuses.is_empty()
            && self.body_contains.is_empty()
            && !self.on_connect_timeout
            && !self.on_connect_error
        {
            return bad(
                "statuses",
                "the rule can never trigger: set statuses, body_contains, on_connect_timeout or on_connect_error".into(),
            );
        }
        if self.cooldown.is_zero() || self.cooldown > MAX_COOLDOWN {
            return bad(
                "cooldown",
                format!(
                    "{} is outside 1ns..30days",
                    humantime::format_duration(self.cooldown)
                ),
            );
        }
        Ok(())
    }

    /// True when this rule matches `outcome`.
    pub fn matches(&self, outcome: &Outcome<'_>) -> bool {
        match outcome {
            Outcome::ConnectTimeout => self.on_connect_timeout,
            Outcome::ConnectError => self.on_connect_error,
            Outcome::Response {
                status,
                body_prefix,
            } => {
                if self.statuses.is_empty() && self.body_contains.is_empty() {
                    return false;
                }
                let status_ok = self.statuses.is_empty() || self.statuses.contains(status);
                status_ok
                    && (self.body_contains.is_empty()
                        || self
                            .body_contains
                            .iter()
                            .any(|p| contains_ignore_ascii_case(body_prefix, p.as_bytes())))
            }
        }
    }
}

/// What happened when a request went out through an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// The target answered. `body_prefix` is however much of the body the gateway
    /// buffered (a few KiB is plenty for block pages).
    Response {
        /// HTTP status code.
        status: u16,
        /// The first bytes of the (decoded) body.
        body_prefix: &'a [u8],
    },
    /// Connecting to the target through the exit timed out.
    ConnectTimeout,
    /// Connecting to the target through the exit failed.
    ConnectError,
}

/// The scope and cool-down of the first rule that matches `outcome`, if any.
pub fn classify(rules: &[BanRule], outcome: &Outcome<'_>) -> Option<(BanScopeKind, Duration)> {
    rules
        .iter()
        .find(|r| r.matches(outcome))
        .map(|r| (r.scope, r.cooldown))
}

fn contains_ignore_ascii_case(haystack: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    if needle.len() > haystack.len() {
        return false;
    }
    let first = needle[0].to_ascii_lowercase();
    haystack
        .windows(needle.len())
        .any(|w| w[0].to_ascii_lowercase() == first && w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rule(statuses: &[u16], body: &[&str], scope: BanScopeKind, secs: u64) -> BanRule {
        BanRule {
            statuses: statuses.to_vec(),
            body_contains: body.iter().map(|s| s.to_string()).collect(),
            on_connect_timeout: false,
            on_connect_error: false,
            scope,
            cooldown: Duration::from_secs(secs),
        }
    }

    fn resp(status: u16, body: &[u8]) -> Outcome<'_> {
        Outcome::Response {
            status,
            body_prefix: body,
        }
    }

    #[test]
    fn first_matching_rule_wins() {
        let rules = vec![
            rule(&[403], &["captcha"], BanScopeKind::Domain, 300),
            rule(&[429], &[], BanScopeKind::Domain, 60),
            rule(&[], &["access denied"], BanScopeKind::Global, 900),
            BanRule {
                on_connect_timeout: true,
                ..rule(&[], &[], BanScopeKind::Global, 30)
            },
        ];
        let five_min = Some((BanScopeKind::Domain, Duration::from_secs(300)));
        assert_eq!(
            classify(&rules, &resp(403, b"<h1>Please solve the CAPTCHA</h1>")),
            five_min
        );
        assert_eq!(
            classify(&rules, &resp(403, b"forbidden")),
            None,
            "both lists must match"
        );
        assert_eq!(
            classify(&rules, &resp(429, b"")),
            Some((BanScopeKind::Domain, Duration::from_secs(60)))
        );
        assert_eq!(
            classify(&rules, &resp(200, b"xx Access Denied xx")),
            Some((BanScopeKind::Global, Duration::from_secs(900)))
        );
        assert_eq!(
            classify(&rules, &Outcome::ConnectTimeout),
            Some((BanScopeKind::Global, Duration::from_secs(30)))
        );
        assert_eq!(classify(&rules, &Outcome::ConnectError), None);
        assert_eq!(classify(&rules, &resp(200, b"hello")), None);
        assert_eq!(classify(&[], &resp(403, b"captcha")), None);
    }

    #[test]
    fn scope_kinds_become_runtime_scopes() {
        assert_eq!(
            BanScopeKind::Domain.for_domain("a.com"),
            BanScope::Domain("a.com".into())
        );
        assert_eq!(BanScopeKind::Global.for_domain("a.com"), BanScope::Global);
    }

    #[test]
    fn body_matching_handles_edges() {
        assert!(contains_ignore_ascii_case(b"abc", b"ABC"));
        assert!(contains_ignore_ascii_case(b"xxabc", b"bc"));
        assert!(!contains_ignore_ascii_case(b"ab", b"abc"));
        assert!(!contains_ignore_ascii_case(b"", b"a"));
        assert!(!contains_ignore_ascii_case(&[0xff, 0xfe, 0x00], b"a"));
        // A megabyte of near-misses: bounded work, no match.
        let big = vec![b'c'; 1 << 20];
        let r = rule(&[], &["captchx"], BanScopeKind::Domain, 1);
        assert!(!r.matches(&resp(200, &big)));
    }

    #[test]
    fn toml_rules_deserialize_with_humantime_cooldowns() {
        #[derive(Deserialize)]
        struct Cfg {
            ban_rules: Vec<BanRule>,
        }
        let cfg: Cfg = toml::from_str(
            r#"
            [[ban_rules]]
            statuses = [403, 429]
            body_contains = ["captcha"]
            cooldown = "5m"

            [[ban_rules]]
            on_connect_timeout = true
            on_connect_error = true
            scope = "global"
            cooldown = "30s"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.ban_rules[0].cooldown, Duration::from_secs(300));
        assert_eq!(cfg.ban_rules[0].scope, BanScopeKind::Domain);
        assert_eq!(cfg.ban_rules[1].scope, BanScopeKind::Global);
        assert!(cfg.ban_rules[1].on_connect_error);
        // Round trip through serde.
        let json = serde_json::to_string(&cfg.ban_rules[0]).unwrap();
        let back: BanRule = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg.ban_rules[0]);
    }

    #[test]
    fn bad_rules_are_refused_naming_the_field() {
        let cases = [
            ("statuses = [42]\ncooldown = \"1m\"", "statuses"),
            ("statuses = [600]\ncooldown = \"1m\"", "statuses"),
            ("statuses = [70000]\ncooldown = \"1m\"", "statuses"),
            ("statuses = [-1]\ncooldown = \"1m\"", "statuses"),
            ("cooldown = \"1m\"", "never trigger"),
            ("body_contains = [\"\"]\ncooldown = \"1m\"", "body_contains"),
            ("statuses = [403]\ncooldown = \"0s\"", "cooldown"),
            ("statuses = [403]\ncooldown = \"400days\"", "cooldown"),
            ("statuses = [403]\ncooldown = \"soon\"", "cooldown"),
            ("statuses = [403]", "cooldown"),
            (
                "statuses = [403]\ncooldown = \"1m\"\nscope = \"planet\"",
                "scope",
            ),
            ("statuses = [403]\ncooldown = \"1m\"\nbogus = 1", "bogus"),
            ("statuses = \"403\"\ncooldown = \"1m\"", "statuses"),
        ];
        for (text, needle) in cases {
            let err = toml::from_str::<BanRule>(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?} -> {err}");
        }
        let many = (0..33)
            .map(|i| format!("\"p{i}\""))
            .collect::<Vec<_>>()
            .join(",");
        let err =
            toml::from_str::<BanRule>(&format!("body_contains = [{many}]\ncooldown = \"1m\""))
                .unwrap_err()
                .to_string();
        assert!(err.contains("body_contains"), "{err}");
        let long = "a".repeat(MAX_PATTERN_LEN + 1);
        let err =
            toml::from_str::<BanRule>(&format!("body_contains = [\"{long}\"]\ncooldown = \"1m\""))
                .unwrap_err()
                .to_string();
        assert!(err.contains("body_contains") && err.len() < 400, "{err}");
    }
}
