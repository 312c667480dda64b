//! Rendered files (`--render`, or `[[render]]` tables in the file): which mirrored directory goes
//! to which file, in which format, with which permission, and what tells the app it changed; all
//! checked with the other settings, so a bad template or a missing directory stops the start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{directory_of, ConfigError, Prefixes};

/// A file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The `/v1/tree` JSON of the prefix.
    Json,
    /// The same tree as YAML.
    Yaml,
    /// `KEY='value'` lines: the key's path under the prefix, segments joined by `_`,
    /// upper-cased, other characters `_`.
    Env,
    /// `dotted.key=value` lines with Java's escaping.
    Properties,
    /// A template rendered with the tree ([`RenderTarget::template`]).
    Template,
}

impl Format {
    /// The format a file name's extension names.
    pub fn from_path(path: &Path) -> Option<Format> {
        Format::named(path.extension()?.to_str()?)
    }

    /// The format called `name` (an extension, or `format =` in a table).
    fn named(name: &str) -> Option<Format> {
        match name {
            "json" => Some(Format::Json),
            "yaml" | "yml" => Some(Format::Yaml),
            "env" => Some(Format::Env),
            "properties" => Some(Format::Properties),
            _ => None,
        }
    }
}

/// A template file, read and checked at start.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// Where it was read from, for messages.
    pub path: PathBuf,
    /// Its text (MiniJinja, Jinja2's syntax).
    pub source: String,
}

/// What tells the app that its file changed. It runs after the new file is in place.
#[derive(Debug, Clone, PartialEq)]
pub enum OnChange {
    /// A command run without a shell; its output is logged, a non-zero exit is a failure.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// How long it may run before it is killed (and counted as failed).
        timeout: Duration,
    },
    /// A signal to the process whose pid the file holds (read each time: the app may restart).
    Signal {
        /// The signal's name without `SIG` (`HUP`).
        signal: String,
        /// The file holding the pid.
        pid_file: PathBuf,
    },
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
    /// The template, when the format is [`Format::Template`].
    pub template: Option<Template>,
    /// Its permission bits.
    pub mode: u32,
    /// What runs after it changed.
    pub on_change: Option<OnChange>,
}

/// The permission of a rendered file: the app beside the sidecar may run as another user.
pub const DEFAULT_RENDER_MODE: u32 = 0o644;

/// How long an `on_change` command may run unless its table says otherwise.
pub const DEFAULT_ON_CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The signals `on_change` may send: the ones apps take as "reload" or "reopen".
pub const SIGNALS: [&str; 6] = ["HUP", "USR1", "USR2", "INT", "TERM", "WINCH"];

/// A `[[render]]` table, or the JSON object a `--render` value may be.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    prefix: String,
    path: PathBuf,
    format: Option<String>,
    template: Option<PathBuf>,
    mode: Option<ModeValue>,
    on_change: Option<OnChangeTable>,
}

/// `mode = 0o640` (a TOML integer) or `mode = "0640"` (octal text).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ModeValue {
    Bits(u32),
    Octal(String),
}

/// `on_change = { command = [...], timeout = "10s" }` or `{ signal = "HUP", pid_file = "..." }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnChangeTable {
    command: Option<Vec<String>>,
    timeout: Option<String>,
    signal: Option<String>,
    pid_file: Option<PathBuf>,
}

/// Reads `--render` values (`PREFIX=PATH` or a JSON table) against the mirrored `prefixes`.
pub(crate) fn read_targets(
    given: &[String],
    prefixes: &Prefixes,
) -> Result<Vec<RenderTarget>, ConfigError> {
    let mut targets: Vec<RenderTarget> = Vec::new();
    for text in given {
        let table = if text.trim_start().starts_with('{') {
            serde_json::from_str::<Table>(text).map_err(|e| fail(format!("{text}: {e}")))?
        } else {
            let Some((prefix, path)) = text.split_once('=') else {
                return Err(fail(format!("{text:?} is not PREFIX=PATH")));
            };
            Table {
                prefix: prefix.trim().to_string(),
                path: PathBuf::from(path.trim()),
                format: None,
                template: None,
                mode: None,
                on_change: None,
            }
        };
        let target = target(table, prefixes)?;
        if targets.iter().any(|t| t.path == target.path) {
            return Err(fail(format!("{} is rendered twice", target.path.display())));
        }
        targets.push(target);
    }
    Ok(targets)
}

/// A refused render setting.
fn fail(reason: String) -> ConfigError {
    ConfigError::new("--render", reason)
}

/// One table checked.
fn target(table: Table, prefixes: &Prefixes) -> Result<RenderTarget, ConfigError> {
    let mut prefix = table.prefix;
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
    let path = table.path;
    let shown = path.display().to_string();
    let at = |reason: String| fail(format!("{shown}: {reason}"));
    let dir = directory_of(&path);
    if !dir.is_dir() {
        return Err(at(format!("directory {} does not exist", dir.display())));
    }
    let (format, template) = match (table.template, table.format) {
        (Some(_), Some(_)) => return Err(at("give a template or a format, not both".into())),
        (Some(template), None) => (
            Format::Template,
            Some(read_template(&template).map_err(at)?),
        ),
        (None, Some(name)) => (
            Format::named(&name).ok_or_else(|| {
                at(format!(
                    "format {name:?} is not json, yaml, env or properties"
                ))
            })?,
            None,
        ),
        (None, None) => (
            Format::from_path(&path).ok_or_else(|| {
                at(
                    "the format comes from the extension (.json, .yaml, .yml, .env, .properties) \
                    unless a format or template is given"
                        .into(),
                )
            })?,
            None,
        ),
    };
    let mode = match table.mode {
        None => DEFAULT_RENDER_MODE,
        Some(ModeValue::Bits(bits)) => bits,
        Some(ModeValue::Octal(text)) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
            .map_err(|_| at(format!("mode {text:?} is not octal, such as \"0640\"")))?,
    };
    if mode > 0o777 {
        return Err(at(format!(
            "mode {mode:o} (octal) is not a permission: write it as 0o640 or \"0640\""
        )));
    }
    let on_change = table.on_change.map(on_change).transpose().map_err(at)?;
    Ok(RenderTarget {
        prefix,
        path,
        format,
        template,
        mode,
        on_change,
    })
}

/// Reads a template and checks its syntax, so a mistake stops the start rather than every render.
fn read_template(path: &Path) -> Result<Template, String> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read template {}: {e}", path.display()))?;
    minijinja::Environment::new()
        .template_from_str(&source)
        .map_err(|e| format!("template {}: {e}", path.display()))?;
    Ok(Template {
        path: path.to_path_buf(),
        source,
    })
}

/// An `on_change` table checked: exactly one of a command and a signal.
fn on_change(table: OnChangeTable) -> Result<OnChange, String> {
    match table {
        OnChangeTable {
            command: Some(argv),
            timeout,
            signal: None,
            pid_file: None,
        } => {
            if argv.first().is_none_or(|program| program.is_empty()) {
                return Err("on_change: command names no program".into());
            }
            let timeout = match timeout {
                None => DEFAULT_ON_CHANGE_TIMEOUT,
                Some(text) => humantime::parse_duration(&text)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        format!("on_change: timeout {text:?} is not a duration such as 10s")
                    })?,
            };
            Ok(OnChange::Command { argv, timeout })
        }
        OnChangeTable {
            command: None,
            timeout: None,
            signal: Some(signal),
            pid_file: Some(pid_file),
        } => {
            let signal = signal.trim_start_matches("SIG").to_string();
            if !SIGNALS.contains(&signal.as_str()) {
                return Err(format!(
                    "on_change: signal {signal:?} is not one of {SIGNALS:?}"
                ));
            }
            Ok(OnChange::Signal { signal, pid_file })
        }
        _ => Err(
            "on_change takes command (and timeout), or signal and pid_file: one of the two".into(),
        ),
    }
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
        assert_eq!(t[0].on_change, None);
        assert_eq!(
            read(&format!("/app/={d}/a.env")).unwrap()[0].format,
            Format::Env
        );
        assert_eq!(
            read(&format!("/app/={d}/a.yml")).unwrap()[0].format,
            Format::Yaml
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

    #[test]
    fn tables_give_format_template_mode_and_actions() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let template = dir.path().join("site.conf.j2");
        std::fs::write(&template, "return 200 {{ tree.greeting }};").unwrap();
        let prefixes = Prefixes::new(vec!["/app/".into()]);
        let read = |v: serde_json::Value| {
            read_targets(&[v.to_string()], &prefixes).map_err(|e| e.to_string())
        };
        let t = read(serde_json::json!({
            "prefix": "/app/web", "path": format!("{d}/site.conf"),
            "template": template, "mode": "0640",
            "on_change": { "command": ["nginx", "-s", "reload"], "timeout": "5s" },
        }))
        .unwrap()
        .remove(0);
        assert_eq!(t.format, Format::Template);
        assert_eq!(
            t.template.unwrap().source,
            "return 200 {{ tree.greeting }};"
        );
        assert_eq!(t.mode, 0o640);
        assert_eq!(
            t.on_change,
            Some(OnChange::Command {
                argv: vec!["nginx".into(), "-s".into(), "reload".into()],
                timeout: Duration::from_secs(5)
            })
        );
        let t = read(serde_json::json!({
            "prefix": "/app/", "path": format!("{d}/conf"), "format": "yaml", "mode": 0o600,
            "on_change": { "signal": "SIGHUP", "pid_file": "/run/app.pid" },
        }))
        .unwrap()
        .remove(0);
        assert_eq!((t.format, t.mode), (Format::Yaml, 0o600));
        assert_eq!(
            t.on_change,
            Some(OnChange::Signal {
                signal: "HUP".into(),
                pid_file: "/run/app.pid".into()
            })
        );

        std::fs::write(&template, "{{ unclosed").unwrap();
        let path = format!("{d}/x");
        for (bad, says) in [
            (
                serde_json::json!({"prefix": "/app/", "path": path, "template": template}),
                "template",
            ),
            (
                serde_json::json!({"prefix": "/app/", "path": path, "format": "xml"}),
                "is not json",
            ),
            (
                serde_json::json!({"prefix": "/app/", "path": path, "format": "json", "mode": 640}),
                "not a permission",
            ),
            (
                serde_json::json!({"prefix": "/app/", "path": path, "format": "json", "mode": "9"}),
                "not octal",
            ),
            (
                serde_json::json!({"prefix": "/app/", "path": path, "format": "json", "owner": "x"}),
                "unknown field",
            ),
            (
                serde_json::json!({"prefix": "/app/", "path": path, "format": "json",
                "on_change": {"command": ["x"], "signal": "HUP"}}),
                "one of the two",
            ),
            (
                serde_json::json!({"prefix": "/app/", "path": path, "format": "json",
                "on_change": {"signal": "KILL", "pid_file": "/p"}}),
                "is not one of",
            ),
            (
                serde_json::json!({"prefix": "/app/", "path": path, "format": "json",
                "on_change": {"command": []}}),
                "no program",
            ),
        ] {
            let e = read(bad.clone()).unwrap_err();
            assert!(e.contains("--render") && e.contains(says), "{bad}: {e}");
        }
    }
}
