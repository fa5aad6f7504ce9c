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
