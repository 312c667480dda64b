//! Bundled defaults (`--defaults FILE`): configuration shipped with the app, served when a first
//! start finds etcd unreachable and no usable disk snapshot, as Apollo and Nacos clients fall
//! back to a local copy. A JSON object of full keys to string values, every key inside the
//! mirrored prefixes; checked when the settings are, so a bad file stops the start, named.

use std::path::{Path, PathBuf};

use crate::config::{ConfigError, Prefixes};

/// The largest defaults file read: more is a mistake, not defaults.
pub const MAX_DEFAULTS_BYTES: u64 = 16 << 20;

/// The defaults, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    /// Where they were read from, for logs.
    pub path: PathBuf,
    /// Key and value pairs, keys inside the mirrored prefixes.
    pub entries: Vec<(String, String)>,
}

/// Reads and checks the defaults file at `path` against `prefixes`.
pub(crate) fn read_defaults(path: &Path, prefixes: &Prefixes) -> Result<Defaults, ConfigError> {
    let fail = |reason: String| ConfigError::new("--defaults", reason);
    let size = std::fs::metadata(path)
        .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?
        .len();
    if size > MAX_DEFAULTS_BYTES {
        return Err(fail(format!(
            "{} is {size} bytes, more than {MAX_DEFAULTS_BYTES}",
            path.display()
        )));
    }
    let text =
        std::fs::read(path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| {
            fail(format!(
                "{} is not a JSON object of keys to string values: {e}",
                path.display()
            ))
        })?;
    let mut entries = Vec::with_capacity(object.len());
    for (key, value) in object {
        let serde_json::Value::String(value) = value else {
            return Err(fail(format!(
                "{}: the value of {key:?} is not a string",
                path.display()
            )));
        };
        if !prefixes.contains(key.as_bytes()) {
            return Err(fail(format!(
                "{}: {key:?} is outside the mirrored prefixes {:?}",
                path.display(),
                prefixes.as_slice()
            )));
        }
        entries.push((key, value));
    }
    Ok(Defaults {
        path: path.to_path_buf(),
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Defaults, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("defaults.json");
        std::fs::write(&path, text).unwrap();
        let prefixes = Prefixes::new(vec!["/app/".into()]);
        read_defaults(&path, &prefixes).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_an_object_of_strings_inside_the_prefixes() {
        let d = read(r#"{"/app/db/url": "postgres://localhost", "/app/flag": "on"}"#).unwrap();
        assert_eq!(d.entries.len(), 2);
        for (text, says) in [
            ("not json", "not a JSON object"),
            (r#"["/app/a"]"#, "not a JSON object"),
            (r#"{"/app/a": 1}"#, "is not a string"),
            (r#"{"/other/a": "x"}"#, "outside the mirrored prefixes"),
        ] {
            let e = read(text).unwrap_err();
            assert!(e.contains("--defaults") && e.contains(says), "{text}: {e}");
        }
    }
}
