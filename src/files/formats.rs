//! What a rendered file holds: a mirrored prefix at one revision in the format an app reads.
//! `.json` is exactly the `/v1/tree` body; `.yaml` the same tree as YAML; `.env` is
//! `KEY='value'` lines a POSIX shell sources; `.properties` is a Java properties file; a template
//! (MiniJinja) is given the tree and writes anything else. Each takes a whole snapshot, so a file
//! is always one revision.

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::Value;
use yaml_rust2::{Yaml, YamlEmitter};

use crate::config::{Format, RenderTarget};
use crate::mirror::render::{render_tree, tree};
use crate::mirror::snapshot::Snapshot;

/// Why a prefix cannot be rendered in a format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// Two keys become the same name in the file.
    #[error("keys {0:?} and {1:?} both become {2:?}")]
    Collision(String, String, String),
    /// A value a shell variable cannot hold.
    #[error("the value of {0:?} contains a NUL byte, which no environment variable can hold")]
    Nul(String),
    /// The template failed (a missing key, a filter's error), with MiniJinja's reason.
    #[error("template: {0}")]
    Template(String),
}

/// How one target's bytes are made: its format, with its template compiled once.
pub struct Shape {
    /// The format.
    format: Format,
    /// The template's environment (it holds the one template, named [`TEMPLATE`]).
    template: Option<Environment<'static>>,
}

/// The name the template is registered under.
const TEMPLATE: &str = "template";

impl Shape {
    /// The shape of `target`; its template was checked when the configuration was read.
    pub fn new(target: &RenderTarget) -> Result<Shape, FormatError> {
        let template = match &target.template {
            None => None,
            Some(template) => {
                let mut env = Environment::new();
                // A missing key is an error, not an empty string in a server's config: the last
                // good file stays and the render check says why.
                env.set_undefined_behavior(UndefinedBehavior::Strict);
                // Config files, not HTML: whatever the file is called, nothing is escaped.
                env.set_auto_escape_callback(|_| AutoEscape::None);
                // The file ends as the template does (Jinja2 drops a last newline by default).
                env.set_keep_trailing_newline(true);
                env.add_template_owned(TEMPLATE, template.source.clone())
                    .map_err(|e| FormatError::Template(e.to_string()))?;
                Some(env)
            }
        };
        Ok(Shape {
            format: target.format,
            template,
        })
    }

    /// The bytes of `dir` in `snapshot`.
    pub fn render(&self, snapshot: &Snapshot, dir: &str) -> Result<Vec<u8>, FormatError> {
        match &self.template {
            Some(env) => template(env, snapshot, dir),
            None => render(snapshot, dir, self.format),
        }
    }
}

/// The bytes of `dir` (a mirrored directory, with its trailing `/`) in `snapshot`, as `format`
/// (any but [`Format::Template`], which needs its [`Shape`]).
pub fn render(snapshot: &Snapshot, dir: &str, format: Format) -> Result<Vec<u8>, FormatError> {
    match format {
        Format::Json => Ok(render_tree(snapshot, dir).to_vec()),
        Format::Yaml => Ok(yaml(&tree(snapshot, dir))),
        Format::Env => lines(snapshot, dir, env_name, env_line),
        Format::Properties => lines(snapshot, dir, properties_key, properties_line),
        Format::Template => Err(FormatError::Template("no template given".into())),
    }
}

/// The tree as a YAML document. The emitter quotes every string YAML would read as something
/// else (`yes`, `1.0`, `null`, `: `), so the document reads back as the JSON tree.
fn yaml(tree: &Value) -> Vec<u8> {
    let mut out = String::new();
    YamlEmitter::new(&mut out)
        .dump(&yaml_value(tree))
        .expect("writing to a String cannot fail");
    out.push('\n');
    out.into_bytes()
}

fn yaml_value(value: &Value) -> Yaml {
    match value {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None => Yaml::Real(n.to_string()),
        },
        Value::String(s) => Yaml::String(s.clone()),
        Value::Array(items) => Yaml::Array(items.iter().map(yaml_value).collect()),
        Value::Object(members) => Yaml::Hash(
            members
                .iter()
                .map(|(k, v)| (Yaml::String(k.clone()), yaml_value(v)))
                .collect(),
        ),
    }
}

/// The template rendered with `tree` (the `/v1/tree` value), `keys` (each key under `dir`, as
/// its path under it, to its text), `prefix` and `revision`.
fn template(
    env: &Environment<'static>,
    snapshot: &Snapshot,
    dir: &str,
) -> Result<Vec<u8>, FormatError> {
    let keys: std::collections::BTreeMap<String, String> = snapshot
        .scan_prefix(dir.as_bytes())
        .map(|entry| {
            (
                String::from_utf8_lossy(&entry.key[dir.len()..]).into_owned(),
                String::from_utf8_lossy(entry.value()).into_owned(),
            )
        })
        .collect();
    let context = minijinja::context! {
        tree => minijinja::Value::from_serialize(tree(snapshot, dir)),
        keys => keys,
        prefix => dir,
        revision => snapshot.revision,
    };
    let template = env
        .get_template(TEMPLATE)
        .map_err(|e| FormatError::Template(e.to_string()))?;
    template
        .render(context)
        .map(String::into_bytes)
        .map_err(|e| FormatError::Template(e.to_string()))
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
    use crate::mirror::snapshot::Entry;
    use crate::mirror::store::Store;
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
    fn yaml_reads_back_as_the_tree() {
        let s = snapshot(&[
            ("/app/a", "1"),
            ("/app/b/c", "\"x\""),
            ("/app/b/yes", "yes"),
            ("/app/b/ver", "\"1.0\""),
            ("/app/multi", "line one\nline: two # not a comment"),
            ("/app/flags", "[true, null, 2.5]"),
        ]);
        let text = String::from_utf8(render(&s, "/app/", Format::Yaml).unwrap()).unwrap();
        let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
        assert_eq!(docs.len(), 1, "{text}");
        assert_eq!(docs[0], yaml_value(&tree(&s, "/app/")), "{text}");
        assert_eq!(docs[0]["b"]["yes"].as_str(), Some("yes"), "{text}");
        assert_eq!(docs[0]["b"]["ver"].as_str(), Some("1.0"), "{text}");
        assert_eq!(docs[0]["a"].as_i64(), Some(1), "{text}");
    }

    #[test]
    fn templates_see_the_tree_and_refuse_missing_keys() {
        let s = snapshot(&[
            ("/app/web/greeting", "hello <world>"),
            ("/app/web/port", "8080"),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let shape = |source: &str| {
            let mut target = crate::config::RenderTarget {
                prefix: "/app/web/".into(),
                path: dir.path().join("site.html"),
                format: Format::Template,
                template: Some(crate::config::render::Template {
                    path: dir.path().join("t"),
                    source: source.into(),
                }),
                mode: 0o644,
                on_change: None,
            };
            target.prefix = "/app/web/".into();
            Shape::new(&target).unwrap()
        };
        let text = shape(
            "listen {{ tree.port + 1 }}; {{ keys['greeting'] }} @{{ revision }} {{ prefix }}",
        )
        .render(&s, "/app/web/")
        .unwrap();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "listen 8081; hello <world> @2 /app/web/"
        );
        let e = shape("{{ tree.missing }}")
            .render(&s, "/app/web/")
            .unwrap_err();
        assert!(
            matches!(e, FormatError::Template(ref m) if m.contains("undefined")),
            "{e}"
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
