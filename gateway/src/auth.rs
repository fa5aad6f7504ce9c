//! Proxy authentication: `Proxy-Authorization: Basic` (HTTP) and RFC 1929 (SOCKS5).
//!
//! The password carries the access token: the whole password, or (IPRoyal's form)
//! the token, `_`, then targeting (`TOKEN_country-de_session-s1`). The username
//! carries the account and targeting in any dialect of [`crate::dialect`]. Which
//! part is compared with the token is the same for every dialect: the password up to
//! the `_` that follows a configured token, or all of it. Each configured token is
//! compared in constant time, and every token is compared, so timing does not reveal
//! which matched.
//!
//! Also here: the per-connection slots of tokens and accounts (`max_connections`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine;
use ipsx_config::{AccountConfig, TokenConfig};
use subtle::ConstantTimeEq;

use crate::Runtime;
use crate::dialect::ProxyUser;
use crate::error::ProxyError;

/// Metrics label of an account not in the config (the label set stays bounded).
pub(crate) const UNLISTED_ACCOUNT: &str = "-";

/// A client that passed authentication.
#[derive(Debug, Clone)]
pub(crate) struct Authed<'a> {
    /// The matching token; `None` when the config has no tokens (open proxy).
    pub token: Option<&'a TokenConfig>,
    /// The configured account the username names, if it is configured.
    pub account: Option<&'a AccountConfig>,
    /// Account and targeting from the username (and password).
    pub user: ProxyUser,
}

impl Authed<'_> {
    /// Name used for logs, metrics and rate-limit keys.
    pub(crate) fn token_name(&self) -> &str {
        self.token.map_or("anonymous", |t| t.name.as_str())
    }

    /// The account for metrics labels: its name when configured, else `-`.
    pub(crate) fn account_label(&self) -> &str {
        self.account.map_or(UNLISTED_ACCOUNT, |a| a.name.as_str())
    }
}

/// Where the secret ends in `password` if it is `secret` or `secret_...`: the length
/// of the secret. Constant time in the secret's bytes.
fn secret_match(secret: &[u8], password: &[u8]) -> Option<usize> {
    let n = secret.len();
    let fits = password.len() == n || (password.len() > n && password[n] == b'_');
    let head = password.get(..n).unwrap_or_default();
    let equal: bool = secret.ct_eq(head).into();
    (fits && equal).then_some(n)
}

/// Checks a username/password pair, then parses the username (and the targeting in
/// the password) in its dialect: wrong credentials are a 407, bad targeting a 400
/// naming the key, an account bound to another token a 407.
pub(crate) fn check_credentials<'a>(
    rt: &'a Runtime,
    username: &str,
    password: &str,
) -> Result<Authed<'a>, ProxyError> {
    let max_ttl = rt.config.rotation.max_session_ttl;
    let (token, user) = login(&rt.config.tokens, username, password, max_ttl)?;
    let a = authed(rt, token, user);
    let Some(token) = token else {
        return Ok(a);
    };
    if let Some(bound) = a.account.and_then(|acc| acc.token.as_deref())
        && bound != token.name
    {
        tracing::info!(account = %a.account_label(), token = %token.name, "account used with another token");
        return Err(ProxyError::Auth);
    }
    Ok(a)
}

/// The sans-IO part of [`check_credentials`]: which token the password carries (none
/// when no tokens are configured), and the username (and password targeting) parsed.
fn login<'t>(
    tokens: &'t [TokenConfig],
    username: &str,
    password: &str,
    max_ttl: std::time::Duration,
) -> Result<(Option<&'t TokenConfig>, ProxyUser), ProxyError> {
    if tokens.is_empty() {
        return Ok((None, ProxyUser::parse(username, None, max_ttl)?));
    }
    // The longest matching secret wins (a whole-password match is the longest).
    let mut found: Option<(&TokenConfig, usize)> = None;
    for token in tokens {
        if let Some(n) = secret_match(token.secret.expose().as_bytes(), password.as_bytes())
            && found.is_none_or(|(_, m)| n > m)
        {
            found = Some((token, n));
        }
    }
    let Some((token, n)) = found else {
        return Err(ProxyError::Auth);
    };
    let targeting = password.get(n + 1..).filter(|t| !t.is_empty());
    Ok((Some(token), ProxyUser::parse(username, targeting, max_ttl)?))
}

fn authed<'a>(rt: &'a Runtime, token: Option<&'a TokenConfig>, user: ProxyUser) -> Authed<'a> {
    let account = rt.config.account(&user.account);
    let a = Authed {
        token,
        account,
        user,
    };
    metrics::counter!("ipsx_account_requests_total", "account" => a.account_label().to_owned())
        .increment(1);
    tracing::debug!(
        token = %a.token_name(),
        account = ?a.user.account,
        dialect = a.user.dialect.as_str(),
        "authenticated"
    );
    a
}

/// Checks a `Proxy-Authorization` header value (`Basic base64(user:pass)`).
pub(crate) fn check_basic<'a>(
    rt: &'a Runtime,
    header: Option<&[u8]>,
) -> Result<Authed<'a>, ProxyError> {
    let Some(value) = header else {
        return check_credentials(rt, "", "").map_err(|_| ProxyError::Auth);
    };
    let text = std::str::from_utf8(value)
        .map_err(|_| ProxyError::Auth)?
        .trim();
    let (scheme, encoded) = text.split_once(' ').ok_or(ProxyError::Auth)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(ProxyError::Auth);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| ProxyError::Auth)?;
    let decoded = String::from_utf8(decoded).map_err(|_| ProxyError::Auth)?;
    let (user, pass) = decoded.split_once(':').ok_or(ProxyError::Auth)?;
    check_credentials(rt, user, pass)
}

// === connection slots ===

/// Gives a connection slot back when dropped.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The token and account slots one client connection holds. Every request takes the
/// slots of its own token and account: a keep-alive connection whose next request
/// names another token (or account) gives back the old slots and takes the new ones,
/// or is refused.
#[derive(Debug, Default)]
pub(crate) struct ConnSlots {
    /// (token, account) the held slots belong to.
    owner: Option<(String, String)>,
    held: Vec<Slot>,
}

impl ConnSlots {
    /// Takes the slots `authed` needs, unless this connection already holds them.
    pub(crate) fn take(&mut self, rt: &Runtime, authed: &Authed<'_>) -> Result<(), ProxyError> {
        let owner = (
            authed.token_name().to_owned(),
            authed.account_label().to_owned(),
        );
        if self.owner.as_ref() == Some(&owner) {
            return Ok(());
        }
        self.owner = None;
        self.held.clear();
        if let Some(t) = authed.token {
            take_one(
                &mut self.held,
                rt.token_conns.get(&t.name),
                t.max_connections,
                || format!("token `{}`", t.name),
            )?;
        }
        if let Some(a) = authed.account {
            take_one(
                &mut self.held,
                rt.account_conns.get(&a.name),
                a.max_connections,
                || format!("account `{}`", a.name),
            )?;
        }
        self.owner = Some(owner);
        Ok(())
    }
}

fn take_one(
    held: &mut Vec<Slot>,
    counter: Option<&Arc<AtomicUsize>>,
    max: Option<usize>,
    what: impl Fn() -> String,
) -> Result<(), ProxyError> {
    let Some(counter) = counter else {
        return Ok(());
    };
    let now = counter.fetch_add(1, Ordering::AcqRel) + 1;
    let slot = Slot(counter.clone());
    if let Some(max) = max
        && now > max
    {
        drop(slot);
        held.clear();
        return Err(ProxyError::Overloaded(format!(
            "{} is at its limit of {max} connections",
            what()
        )));
    }
    held.push(slot);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use ipsx_config::{Secret, TokenConfig};

    use super::{login, secret_match};
    use crate::error::ProxyError;
    use crate::socks5;

    const DAY: Duration = Duration::from_secs(86_400);

    fn tokens() -> Vec<TokenConfig> {
        ["test-token-1", "test-token-1_long", "other-secret"]
            .iter()
            .enumerate()
            .map(|(i, s)| TokenConfig {
                name: format!("t{i}"),
                secret: Secret::new(*s),
                rate: None,
                max_connections: None,
            })
            .collect()
    }

    #[test]
    fn each_dialect_logs_in_with_its_documented_form() {
        let tokens = tokens();
        let cases = [
            (
                "brd-customer-hl_1234-zone-residential-country-de",
                "test-token-1",
                "t0",
                "hl_1234/residential",
            ),
            ("customer-USER-cc-DE", "test-token-1", "t0", "USER"),
            ("user-USER-country-de", "other-secret", "t2", "USER"),
            (
                "USER",
                "test-token-1_country-de_session-AbCd1234_lifetime-30m",
                "t0",
                "USER",
            ),
            // A secret that is another's plus `_...`: the longest match wins.
            ("acme-country-de", "test-token-1_long", "t1", "acme"),
            ("acme", "test-token-1_long_country-de", "t1", "acme"),
        ];
        for (user, pass, token, account) in cases {
            let (t, u) = login(&tokens, user, pass, DAY).unwrap_or_else(|e| panic!("{user}: {e}"));
            assert_eq!(t.map(|t| t.name.as_str()), Some(token), "{user} {pass}");
            assert_eq!(u.account, account);
            assert!(u.targeting.filter.country.is_some(), "{user} {pass}");
        }
        for pass in [
            "test-token-2",
            "test-token-1x_country-de",
            "",
            "_country-de",
        ] {
            assert!(
                matches!(login(&tokens, "u", pass, DAY), Err(ProxyError::Auth)),
                "{pass}"
            );
        }
        // Bad targeting after a good token is a 400 naming the key, not a 407.
        let err = login(&tokens, "u", "test-token-1_zip-10115", DAY).unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(err.to_string().contains("`zip`"), "{err}");
    }

    #[test]
    fn the_secret_is_the_password_or_its_part_before_targeting() {
        assert_eq!(secret_match(b"tok_en12", b"tok_en12"), Some(8));
        assert_eq!(
            secret_match(b"tok_en12", b"tok_en12_country-de_session-s1"),
            Some(8)
        );
        assert_eq!(secret_match(b"tok_en12", b"tok_en123"), None);
        assert_eq!(secret_match(b"tok_en12", b"tok_en1"), None);
        assert_eq!(secret_match(b"tok_en12", b"tok_en13_country-de"), None);
        assert_eq!(secret_match(b"tok_en12", b""), None);
    }

    /// Any bytes (mostly not UTF-8) or any UTF-8 text, up to 255 bytes.
    fn bytes_or_text() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::strategy::Strategy;
        proptest::prop_oneof![
            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=255),
            ".{0,120}".prop_map(String::into_bytes),
            "[a-zA-Z0-9_-]{0,200}".prop_map(String::into_bytes),
        ]
    }

    proptest::proptest! {
        /// QUALITY case 26: RFC 1929 usernames and passwords of any bytes, up to 255,
        /// in any dialect: a result, a 407 or a 400 naming the key; never a panic.
        #[test]
        fn any_socks_credentials_log_in_or_are_refused(
            user in bytes_or_text(),
            pass in bytes_or_text(),
            prefix in proptest::sample::select(vec!["", "brd-customer-c-zone-z-", "customer-u-", "user-u-", "acct-"]),
            pass_prefix in proptest::sample::select(vec!["", "test-token-1", "test-token-1_"]),
        ) {
            let mut user_bytes = prefix.as_bytes().to_vec();
            user_bytes.extend_from_slice(&user);
            user_bytes.truncate(255);
            let mut pass_bytes = pass_prefix.as_bytes().to_vec();
            pass_bytes.extend_from_slice(&pass);
            pass_bytes.truncate(255);
            let mut msg = vec![1, user_bytes.len() as u8];
            msg.extend_from_slice(&user_bytes);
            msg.push(pass_bytes.len() as u8);
            msg.extend_from_slice(&pass_bytes);
            let tokens = tokens();
            if let Ok(Some((creds, _))) = socks5::parse_auth(&msg) {
                for ts in [&tokens[..], &[]] {
                    match login(ts, &creds.username, &creds.password, DAY) {
                        Ok(_) | Err(ProxyError::Auth) => {}
                        Err(e) => {
                            proptest::prop_assert_eq!(e.status(), 400);
                            proptest::prop_assert!(e.to_string().contains('`'), "{}", e);
                        }
                    }
                }
            }
        }

        #[test]
        fn secret_match_is_exact(secret in proptest::collection::vec(proptest::prelude::any::<u8>(), 8..40),
                                 password in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..255)) {
            match secret_match(&secret, &password) {
                Some(n) => {
                    proptest::prop_assert_eq!(&password[..n], &secret[..]);
                    proptest::prop_assert!(password.len() == n || password[n] == b'_');
                }
                None => proptest::prop_assert!(!(password.starts_with(&secret) && (password.len() == secret.len() || password[secret.len()] == b'_'))),
            }
            let mut with = secret.clone();
            with.push(b'_');
            with.extend_from_slice(&password);
            proptest::prop_assert_eq!(secret_match(&secret, &with), Some(secret.len()));
        }
    }
}
