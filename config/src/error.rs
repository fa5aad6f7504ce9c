//! Config errors: every one says which file, which line and which key.

use std::fmt;

/// Where in a config file something is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// File name as given.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl Location {
    /// Turns a byte offset into `file:line:column`.
    pub fn at(file: &str, text: &str, offset: usize) -> Self {
        let offset = offset.min(text.len());
        let before = &text.as_bytes()[..offset];
        let line = before.iter().filter(|b| **b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |p| p + 1);
        Self {
            file: file.to_owned(),
            line,
            column: offset - line_start + 1,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Adds the key of the `key = value` line at byte `offset` to a value error that does
/// not name it yet (serde's value errors do not know their key). Only the key is
/// quoted, never the value: it may be a secret.
pub(crate) fn with_key(message: &str, text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    let Some((key, _)) = line.split_once('=') else {
        return message.to_owned();
    };
    let key = key.trim();
    let bare = !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if bare && !message.contains(&format!("`{key}`")) {
        format!("key `{key}`: {message}")
    } else {
        message.to_owned()
    }
}

/// Why a config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {message}")]
    Io {
        /// The path as given.
        path: String,
        /// The OS error.
        message: String,
    },
    /// TOML syntax, an unknown key or a value of the wrong type or form.
    #[error("{location}: {message}")]
    Parse {
        /// Where the parser stopped.
        location: Location,
        /// What it said (names the key).
        message: String,
    },
    /// A value that parsed but does not make sense with the rest.
    #[error("{location}: key `{key}`: {message}")]
    Invalid {
        /// Where the offending value is.
        location: Location,
        /// Dotted path of the key (`exit[2].name`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// The dotted key this error is about, when known.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_key;

    #[test]
    fn value_errors_gain_their_key_but_never_the_value() {
        let text = "[[token]]\nname = \"t\"\nsecret = 12345678\n";
        let at = text.find("12345678").unwrap_or(0);
        let m = with_key("invalid type: integer, expected a string", text, at);
        assert_eq!(m, "key `secret`: invalid type: integer, expected a string");
        assert!(!m.contains("12345678"));
        // Already named, or not a key line: unchanged.
        assert_eq!(with_key("key `secret` bad", text, at), "key `secret` bad");
        assert_eq!(
            with_key("unclosed table", "[gateway\n", 3),
            "unclosed table"
        );
        assert_eq!(with_key("x", "", 99), "x");
    }
}
