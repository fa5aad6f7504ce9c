//! Proxy authentication: `Proxy-Authorization: Basic` (HTTP) and RFC 1929 (SOCKS5).
//! The password is an access token from the config; the username carries targeting.

use base64::Engine;
use ipsx_config::TokenConfig;
use subtle::ConstantTimeEq;

use crate::Runtime;
use crate::error::ProxyError;

/// A client that passed authentication.
#[derive(Debug, Clone)]
pub(crate) struct Authed<'a> {
    /// The matching token; `None` when the config has no tokens (open proxy).
    pub token: Option<&'a TokenConfig>,
    /// The username as sent (carries targeting).
    pub username: String,
}

impl Authed<'_> {
    /// Name used for logs, metrics and rate-limit keys.
    pub(crate) fn token_name(&self) -> &str {
        self.token.map_or("anonymous", |t| t.name.as_str())
    }
}

/// Checks a username/password pair. Compares against every token in constant time per
/// token, without stopping at the first match, so timing does not reveal which matched.
pub(crate) fn check_credentials<'a>(
    rt: &'a Runtime,
    username: &str,
    password: &str,
) -> Result<Authed<'a>, ProxyError> {
    if rt.config.tokens.is_empty() {
        return Ok(Authed {
            token: None,
            username: username.to_owned(),
        });
    }
    let mut found = None;
    for token in &rt.config.tokens {
        let hit: bool = token
            .secret
            .expose()
            .as_bytes()
            .ct_eq(password.as_bytes())
            .into();
        if hit && found.is_none() {
            found = Some(token);
        }
    }
    match found {
        Some(token) => Ok(Authed {
            token: Some(token),
            username: username.to_owned(),
        }),
        None => Err(ProxyError::Auth),
    }
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
