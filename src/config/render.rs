//! Rendered files (`--render PREFIX=PATH`): which mirrored directory goes to which file, in
//! which format, checked with the other settings.

use std::path::{Path, PathBuf};

use crate::config::{directory_of, ConfigError, Prefixes};

/// A file format, from the file name's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The `/v1/tree` JSON of the prefix.
    Json,
    /// `KEY='value'` lines: the key's path under the prefix, segments joined by `_`,
    /// upper-cased, other characters `_`.
    Env,
    /// `dotted.key=value` lines with Java's escaping.
    Properties,
}

impl Format {
    /// The format a file name's extension names.
    pub fn from_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "json" => Some(Format::Json),
            "env" => Some(Format::Env),
            "properties" => Some(Format::Properties),
            _ => None,
        }
    }
}

/// One rendered file.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderTarget {
    /// The mirrored directory rendered, ending in `/`.
    pub prefix: String,
    /// The file.
    pub path: PathBuf,
    /// What it holds.
    pub format: Format,
    /// Its permission bits.
    pub mode: u32,
}

/// The permission of a rendered file: the app beside the sidecar may run as another user.
pub const DEFAULT_RENDER_MODE: u32 = 0o644;

/// Reads `--render` values (`PREFIX=PATH`) against the mirrored `prefixes`.
pub(crate) fn read_targets(
    given: &[String],
    prefixes: &Prefixes,
) -> Result<Vec<RenderTarget>, ConfigError> {
    let fail = |reason: String| ConfigError::new("--render", reason);
    let mut targets: Vec<RenderTarget> = Vec::new();
    for text in given {
        let Some((prefix, path)) = text.split_once('=') else {
            return Err(fail(format!("{text:?} is not PREFIX=PATH")));
        };
        let mut prefix = prefix.trim().to_string();
        if !prefix.starts_with('/') {
            return Err(fail(format!("{prefix:?} must start with '/'")));
        }
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        if !prefixes.contains(prefix.as_bytes()) {
            return Err(fail(format!(
                "{prefix:?} is not inside the mirrored prefixes {:?}",
                prefixes.as_slice()
            )));
        }
        let path = PathBuf::from(path.trim());
        let format = Format::from_path(&path).ok_or_else(|| {
            fail(format!(
                "{}: the format comes from the extension: .json, .env or .properties",
                path.display()
            ))
        })?;
        let dir = directory_of(&path);
        if !dir.is_dir() {
            return Err(fail(format!(
                "{}: directory {} does not exist",
                path.display(),
                dir.display()
            )));
        }
        if targets.iter().any(|t| t.path == path) {
            return Err(fail(format!("{} is rendered twice", path.display())));
        }
        targets.push(RenderTarget {
            prefix,
            path,
            format,
            mode: DEFAULT_RENDER_MODE,
        });
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked_against_the_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let prefixes = Prefixes::new(vec!["/app/".into()]);
        let read = |v: &str| read_targets(&[v.to_string()], &prefixes).map_err(|e| e.to_string());
        let t = read(&format!("/app/web={d}/web.json")).unwrap();
        assert_eq!(t[0].prefix, "/app/web/");
        assert_eq!(t[0].format, Format::Json);
        assert_eq!(t[0].mode, 0o644);
        assert_eq!(
            read(&format!("/app/={d}/a.env")).unwrap()[0].format,
            Format::Env
        );
        for (bad, says) in [
            (format!("{d}/x.json"), "PREFIX=PATH"),
            (format!("app/={d}/x.json"), "start with '/'"),
            (format!("/other/={d}/x.json"), "not inside"),
            (format!("/app/={d}/x.txt"), "extension"),
            ("/app/=/no/such/dir/x.json".to_string(), "does not exist"),
        ] {
            let e = read(&bad).unwrap_err();
            assert!(e.contains("--render") && e.contains(says), "{bad}: {e}");
        }
    }
}
