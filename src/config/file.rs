//! The TOML file (`--config`): its values as the text a flag would carry, so the file is parsed
//! by the same schema as flags and environment ([`super::settings::parse`]).

use std::path::Path;

use super::ConfigError;

/// Reads the TOML file into its key / value pairs.
pub(super) fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
    })?;
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::new("--config", format!("{}: {}", path.display(), e.message())))
}

/// A file value of the setting `name` as the text a flag would carry: strings as they are,
/// numbers and booleans written out, arrays one value each (a list setting's values are split at
/// its `delimiter`, `None` for one value), a table (`[[render]]`) as one JSON object.
pub(super) fn file_values(
    path: &Path,
    name: &str,
    delimiter: Option<char>,
    value: toml::Value,
) -> Result<Vec<String>, ConfigError> {
    let bad =
        |what: &str| ConfigError::new("--config", format!("{}: {name}: {what}", path.display()));
    let delimiter = delimiter.unwrap_or(',');
    match value {
        toml::Value::String(s) => Ok(vec![s]),
        toml::Value::Integer(i) => Ok(vec![i.to_string()]),
        toml::Value::Boolean(b) => Ok(vec![b.to_string()]),
        toml::Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                toml::Value::String(s) if !s.contains(delimiter) => Ok(s),
                toml::Value::String(_) => {
                    Err(bad(&format!("a list item may not contain {delimiter:?}")))
                }
                toml::Value::Table(table) if delimiter != ',' => Ok(table_text(&table, delimiter)),
                _ => Err(bad("expected a list of strings")),
            })
            .collect(),
        _ => Err(bad(
            "expected a string, a number, a boolean or a list of strings",
        )),
    }
}

/// A table as one JSON object, the delimiter escaped (`\u003b`): outside a JSON string it
/// cannot occur, inside one the escape means the same character.
fn table_text(table: &toml::Table, delimiter: char) -> String {
    let json = serde_json::to_string(table).expect("TOML values are JSON values");
    json.replace(delimiter, &format!("\\u{:04x}", delimiter as u32))
}

/// A value given as a JSON object, as a TOML inline table, for `--check-config`.
pub(super) fn table_value(text: &str) -> Option<toml::Value> {
    if !text.starts_with('{') {
        return None;
    }
    serde_json::from_str::<toml::Value>(text).ok()
}
