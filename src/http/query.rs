//! The query parameters the routes understand, parsed once per request; a value that cannot be
//! understood is a `400 bad_query`, never ignored.

use std::time::Duration;

use http::Uri;

use crate::http::error::ApiError;
use crate::http::notify::MAX_WAIT;

/// Query parameters the routes understand; others are ignored.
#[derive(Debug, Default)]
pub(crate) struct Query {
    /// `?recurse`: the path is a prefix.
    pub(crate) recurse: bool,
    /// `?max_stale=<duration>`: refuse with 503 when the mirror is staler.
    pub(crate) max_stale: Option<Duration>,
    /// `?consistent`: at least as new as a quorum read made for this request.
    pub(crate) consistent: bool,
    /// `?cas=<mod_revision>`: compare-and-swap for writes (like `If-Match`).
    pub(crate) cas: Option<i64>,
    /// `?index=<revision>`: a blocking query: answer once the key or prefix changes after it.
    pub(crate) index: Option<i64>,
    /// `?wait=<duration>`: how long a blocking query may wait (capped at `MAX_WAIT`).
    pub(crate) wait: Option<Duration>,
    /// `?since=<revision>`: where a change stream resumes (like `Last-Event-ID`).
    pub(crate) since: Option<i64>,
}

fn flag(name: &str, value: &str) -> Result<bool, ApiError> {
    match value {
        "" | "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(ApiError::BadQuery(format!(
            "{name}={other:?}: expected true or false"
        ))),
    }
}

/// The `name=value` pairs of a URI's query, in order, as written (a bare `name` has value `""`).
/// Every query parser (this one, Consul's) walks them.
pub(crate) fn query_pairs(uri: &Uri) -> impl Iterator<Item = (&str, &str)> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

pub(crate) fn parse_query(uri: &Uri) -> Result<Query, ApiError> {
    let mut q = Query::default();
    for (name, value) in query_pairs(uri) {
        match name {
            "recurse" => q.recurse = flag(name, value)?,
            "consistent" => q.consistent = flag(name, value)?,
            "max_stale" => {
                let d = humantime::parse_duration(value).map_err(|_| {
                    ApiError::BadQuery(format!(
                        "max_stale={value:?}: expected a duration such as 5s or 500ms"
                    ))
                })?;
                q.max_stale = Some(d);
            }
            "cas" => q.cas = Some(parse_revision("cas", value)?),
            "index" => q.index = Some(parse_revision("index", value)?),
            "since" => q.since = Some(parse_revision("since", value)?),
            "wait" => {
                let d = humantime::parse_duration(value).map_err(|_| {
                    ApiError::BadQuery(format!(
                        "wait={value:?}: expected a duration such as 30s or 5m"
                    ))
                })?;
                q.wait = Some(d.min(MAX_WAIT));
            }
            _ => {}
        }
    }
    Ok(q)
}

/// A revision a client gives in header `name` (`If-Match`, `Last-Event-ID`), if it gives one.
pub(crate) fn header_revision(
    headers: &http::HeaderMap,
    name: http::header::HeaderName,
    what: &str,
) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::BadQuery(format!("{what} is not text")))?;
    parse_revision(what, text).map(Some)
}

/// A mod_revision given by a client: 0 (the key must not exist) or a positive revision.
pub(crate) fn parse_revision(what: &str, text: &str) -> Result<i64, ApiError> {
    match text.trim().trim_matches('"').parse::<i64>() {
        Ok(r) if r >= 0 => Ok(r),
        _ => Err(ApiError::BadQuery(format!(
            "{what}={text:?}: expected a mod_revision (0 for \"must not exist\")"
        ))),
    }
}
