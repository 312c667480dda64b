//! Secrets (passwords, tokens, private keys): a type that never prints its text, and the reading
//! of secret files, so a swapped or empty file is named at start-up.

use std::path::Path;

use crate::config::ConfigError;

/// A value that must never be printed: a password, a token, a private key. Its `Debug` and
/// `Display` say `<redacted>`; [`Secret::expose`] is the one way to the text.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// The secret text, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Secret(text)
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Self {
        Secret(text.to_string())
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Secret(text.to_string()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Reads a token, password or key from `path`; surrounding whitespace (a trailing newline) is
/// not part of it.
pub(crate) fn read_secret(setting: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(setting, format!("cannot read {}: {e}", path.display())))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(ConfigError::new(
            setting,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(Secret(text.to_string()))
}

/// Reads a PEM file and checks it holds what `what` names (`CERTIFICATE`, `PRIVATE KEY`), so a
/// swapped or empty file is named at start-up rather than failing every connection later.
pub(crate) fn read_pem(setting: &str, path: &Path, what: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(setting, format!("cannot read {}: {e}", path.display())))?;
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.ends_with(&format!("{what}-----")));
    if !found {
        return Err(ConfigError::new(
            setting,
            format!("{} holds no PEM {what}", path.display()),
        ));
    }
    Ok(text)
}
