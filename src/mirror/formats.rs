//! What a rendered file holds: a mirrored prefix at one revision in the format an app reads.
//! `.json` is exactly the `/v1/tree` body; `.env` is `KEY='value'` lines a POSIX shell sources;
//! `.properties` is a Java properties file. Each takes a whole snapshot, so a file is always one
//! revision.

use crate::config::Format;
use crate::mirror::render::render_tree;
use crate::mirror::store::Snapshot;

/// Why a prefix cannot be rendered in a format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// Two keys become the same name in the file.
    #[error("keys {0:?} and {1:?} both become {2:?}")]
    Collision(String, String, String),
    /// A value a shell variable cannot hold.
    #[error("the value of {0:?} contains a NUL byte, which no environment variable can hold")]
    Nul(String),
}

/// The bytes of `dir` (a mirrored directory, with its trailing `/`) in `snapshot`, as `format`.
pub fn render(snapshot: &Snapshot, dir: &str, format: Format) -> Result<Vec<u8>, FormatError> {
    match format {
        Format::Json => Ok(render_tree(snapshot, dir).to_vec()),
        Format::Env => lines(snapshot, dir, env_name, env_line),
        Format::Properties => lines(snapshot, dir, properties_key, properties_line),
    }
}

/// One line per key under `dir`, named by `name` (which must not collide) and written by `line`.
fn lines(
    snapshot: &Snapshot,
    dir: &str,
    name: fn(&[&str]) -> String,
    line: fn(&str, &str, &[u8]) -> Result<String, FormatError>,
) -> Result<Vec<u8>, FormatError> {
    let mut out = String::new();
    let mut seen: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for entry in snapshot.scan_prefix(dir.as_bytes()) {
        let key = String::from_utf8_lossy(&entry.key).into_owned();
        let segments: Vec<&str> = key[dir.len()..]
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        if segments.is_empty() {
            continue;
        }
        let named = name(&segments);
        if let Some(other) = seen.insert(named.clone(), key.clone()) {
            return Err(FormatError::Collision(other, key, named));
        }
        out.push_str(&line(&key, &named, entry.value())?);
    }
    Ok(out.into_bytes())
}

/// `db/max-conns` → `DB_MAX_CONNS`; a leading digit gets a `_` before it.
fn env_name(segments: &[&str]) -> String {
    let mut name: String = segments
        .join("_")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    name
}

/// `NAME='value'`, the value single-quoted so a POSIX shell takes it literally (`'` becomes
/// `'\''`).
fn env_line(key: &str, name: &str, value: &[u8]) -> Result<String, FormatError> {
    if value.contains(&0) {
        return Err(FormatError::Nul(key.to_string()));
    }
    let value = String::from_utf8_lossy(value).replace('\'', r"'\''");
    Ok(format!("{name}='{value}'\n"))
}

/// `db/max-conns` → `db.max-conns`.
fn properties_key(segments: &[&str]) -> String {
    segments.join(".")
}

/// `key=value` with Java's `Properties.load` escaping: `\`, line breaks, tabs and form feeds
/// everywhere; `=`, `:`, `#`, `!` and spaces in keys; a leading space in values; anything beyond
/// ASCII as `\uXXXX` (UTF-16), which `load` reads whatever the file's encoding is taken to be.
fn properties_line(_key: &str, name: &str, value: &[u8]) -> Result<String, FormatError> {
    let value = String::from_utf8_lossy(value);
    Ok(format!(
        "{}={}\n",
        java_escape(name, true),
        java_escape(&value, false)
    ))
}

fn java_escape(text: &str, is_key: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, c) in text.chars().enumerate() {
        match c {
            '\\' => out.push_str(r"\\"),
            '\n' => out.push_str(r"\n"),
            '\r' => out.push_str(r"\r"),
            '\t' => out.push_str(r"\t"),
            '\u{c}' => out.push_str(r"\f"),
            '=' | ':' | '#' | '!' if is_key => {
                out.push('\\');
                out.push(c);
            }
            ' ' if is_key || i == 0 => out.push_str(r"\ "),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::store::{Entry, Store};
    use bytes::Bytes;

    fn snapshot(entries: &[(&str, &str)]) -> std::sync::Arc<Snapshot> {
        let store = Store::new();
        let entries = entries
            .iter()
            .map(|(k, v)| Entry::new(Bytes::from(k.to_string()), v.as_bytes(), 2, 2, 1))
            .collect();
        store.replace(2, entries).unwrap();
        store.snapshot()
    }

    #[test]
    fn env_names_are_shell_names_and_values_are_quoted_literally() {
        let s = snapshot(&[
            ("/app/db/max-conns", "10"),
            ("/app/greeting", "it's $HOME `x` \\n"),
            ("/app/9lives", "cat"),
            ("/other/x", "not mine"),
        ]);
        let text = String::from_utf8(render(&s, "/app/", Format::Env).unwrap()).unwrap();
        assert_eq!(
            text,
            "_9LIVES='cat'\nDB_MAX_CONNS='10'\nGREETING='it'\\''s $HOME `x` \\n'\n"
        );
    }

    #[test]
    fn env_refuses_what_it_cannot_say() {
        let s = snapshot(&[("/app/a-b", "1"), ("/app/a_b", "2")]);
        assert!(matches!(
            render(&s, "/app/", Format::Env),
            Err(FormatError::Collision(..))
        ));
        let s = snapshot(&[("/app/nul", "a\0b")]);
        assert_eq!(
            render(&s, "/app/", Format::Env),
            Err(FormatError::Nul("/app/nul".into()))
        );
    }

    #[test]
    fn properties_escape_as_java_reads_them() {
        let s = snapshot(&[
            ("/app/db/url", "jdbc:postgresql://h/db?a=b"),
            ("/app/odd key=1", " leading space\tand tab"),
            ("/app/unicode", "héllo 😀"),
        ]);
        let text = String::from_utf8(render(&s, "/app/", Format::Properties).unwrap()).unwrap();
        assert_eq!(
            text,
            "db.url=jdbc:postgresql://h/db?a=b\n\
             odd\\ key\\=1=\\ leading space\\tand tab\n\
             unicode=h\\u00e9llo \\ud83d\\ude00\n"
        );
    }

    #[test]
    fn json_is_the_tree() {
        let s = snapshot(&[("/app/a", "1"), ("/app/b/c", "\"x\"")]);
        assert_eq!(
            render(&s, "/app/", Format::Json).unwrap(),
            render_tree(&s, "/app/").to_vec()
        );
    }
}
