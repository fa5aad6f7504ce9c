//! The web pages of ipsx: the gateway's operator dashboard and the provider's earnings
//! page. Their sources are in `dashboard/web` (plain JS, bundled by esbuild); the built
//! files in `dashboard/web/dist` are embedded at compile time, so the binary serves
//! them with no network access and no files beside it.
//!
//! Owns: asset lookup by request path and content types, and the token check both
//! listeners share ([`authorized`]: a bearer token, or a browser's Basic login). Does
//! not own: routes (the gateway's admin listener and the provider's status listener).

use base64::Engine as _;
use subtle::ConstantTimeEq;

/// True when a request may use a listener guarded by `token`: none is configured, or
/// its `Authorization` is `Bearer <token>`, or `Basic` with `<token>` as the password
/// and any user name (what a browser's login prompt sends). Compared in constant time.
pub fn authorized(token: Option<&str>, authorization: Option<&[u8]>) -> bool {
    let Some(expected) = token else {
        return true;
    };
    let Some(value) = authorization else {
        return false;
    };
    let Some(i) = value.iter().position(|b| *b == b' ') else {
        return false;
    };
    let (scheme, rest) = (&value[..i], value[i + 1..].trim_ascii());
    if scheme.eq_ignore_ascii_case(b"basic") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|b| *b == b':') else {
            return false;
        };
        return bool::from(expected.as_bytes().ct_eq(&decoded[colon + 1..]));
    }
    scheme.eq_ignore_ascii_case(b"bearer") && bool::from(expected.as_bytes().ct_eq(rest))
}

mod generated {
    include!(concat!(env!("OUT_DIR"), "/assets.rs"));
}

/// One embedded file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// Its bytes.
    pub body: &'static [u8],
    /// Its `Content-Type`.
    pub content_type: &'static str,
}

/// Why no asset answers a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// The assets were not built into this binary: [`NOT_BUILT_PAGE`] says how to.
    NotBuilt,
    /// No such file (including any path that is not a plain file name).
    NotFound,
}

/// The HTML answered (with `503`) when the binary was compiled before the dashboard
/// was built.
pub const NOT_BUILT_PAGE: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ipsx: dashboard not built</title></head><body><h1>The dashboard was not built into this binary</h1><p>Build it with <code>bash scripts/install-dashboard.sh</code> (npm ci and npm run build in <code>dashboard/web</code>; <code>make up</code> and <code>make test</code> run it), then rebuild ipsx. The JSON API under <code>/api/</code> works without it.</p></body></html>\n";

/// Whether the pages were built into this binary.
pub fn built() -> bool {
    generated::ASSETS
        .iter()
        .any(|(name, _)| *name == "index.html")
}

/// The embedded file a request path names, relative to where the pages are mounted:
/// `""` or `"/"` is `index.html` (the gateway dashboard), `"provider"` is
/// `provider.html`. Only single file names made of `[A-Za-z0-9._-]`, not starting with
/// a dot, are looked up, so no path can leave the asset set.
pub fn asset(path: &str) -> Result<Asset, Missing> {
    let name = path.trim_start_matches('/');
    let name = match name {
        "" | "index.html" => "index.html",
        "provider" | "provider.html" => "provider.html",
        other => other,
    };
    if !is_plain_name(name) {
        return Err(Missing::NotFound);
    }
    if !built() {
        return Err(Missing::NotBuilt);
    }
    generated::ASSETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, body)| Asset {
            body,
            content_type: content_type(n),
        })
        .ok_or(Missing::NotFound)
}

/// The provider's earnings page on the provider's status listener: `/` is
/// `provider.html`, and its script and style by name. `None` for any other path (the
/// listener answers those itself).
pub fn provider_page(path: &str) -> Option<Result<Asset, Missing>> {
    match path {
        "/" | "/provider.html" => Some(asset("provider.html")),
        "/provider.js" | "/style.css" => Some(asset(path)),
        _ => None,
    }
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The `Content-Type` of an asset by its extension.
pub fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn index_and_provider_pages_resolve_when_built() {
        if built() {
            assert_eq!(asset("/").unwrap().content_type, "text/html; charset=utf-8");
            assert!(asset("/provider").is_ok());
            assert!(asset("/app.js").is_ok());
        } else {
            assert_eq!(asset("/"), Err(Missing::NotBuilt));
        }
        assert_eq!(
            asset("/nope.js"),
            Err(if built() {
                Missing::NotFound
            } else {
                Missing::NotBuilt
            })
        );
    }

    #[test]
    fn provider_page_serves_only_its_own_files() {
        assert!(provider_page("/api/status").is_none());
        assert!(provider_page("/app.js").is_none());
        assert!(provider_page("/../x").is_none());
        let page = provider_page("/").unwrap();
        if built() {
            assert!(String::from_utf8_lossy(page.unwrap().body).contains("provider.js"));
        } else {
            assert_eq!(page, Err(Missing::NotBuilt));
        }
    }

    #[test]
    fn traversal_and_odd_names_are_not_found() {
        for p in [
            "/../Cargo.toml",
            "/..",
            "/.env",
            "/a/b.js",
            "/%2e%2e/x",
            "/app.js%00",
            "//etc/passwd",
            "/\\x",
        ] {
            assert_eq!(asset(p), Err(Missing::NotFound), "{p}");
        }
    }

    proptest! {
        #[test]
        fn only_embedded_names_ever_resolve(path in "\\PC{0,80}") {
            if let Ok(a) = asset(&path) {
                prop_assert!(generated::ASSETS.iter().any(|(_, b)| std::ptr::eq(*b, a.body)));
                let name = path.trim_start_matches('/');
                prop_assert!(!name.contains('/') && !name.contains(".."));
            }
        }
    }
}
