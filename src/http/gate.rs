//! Who may talk to the sidecar: the application beside it, not a web page the user happens to
//! have open. A page on `evil.example` can make the browser send requests to `127.0.0.1:7379`
//! (by DNS rebinding, its own name resolves to loopback) or fire cross-origin requests at it; both
//! carry what the browser knows about their origin, and both are refused here before anything
//! else looks at the request:
//!
//! - the `Host` header (or, in HTTP/2, the `:authority`) must name the sidecar as a local client
//!   does — `localhost`, `127.0.0.1` or `[::1]`, with or without the listen port — or be one of
//!   the configured extra names; a request without one is refused too;
//! - a request with an `Origin` that is not such a host, or that the browser marks
//!   `Sec-Fetch-Site: cross-site`, is refused.

use std::net::SocketAddr;

use http::header::{HOST, ORIGIN};
use http::{HeaderName, Request};

use crate::http::error::ApiError;

/// `Sec-Fetch-Site`, which browsers send with every request.
static SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// The allowed names of the sidecar.
#[derive(Debug, Clone)]
pub struct Gate {
    /// Every accepted `Host` value, lowercase: each name alone and with the listen port, the
    /// commonest first.
    hosts: Vec<String>,
}

impl Gate {
    /// The gate for a sidecar listening on `listen`, also known by `extra` names (each a host
    /// name or address, without a port).
    pub fn new(listen: SocketAddr, extra: &[String]) -> Gate {
        let port = listen.port();
        let mut names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "[::1]".to_string(),
        ];
        if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
            names.push(match listen {
                SocketAddr::V4(a) => a.ip().to_string(),
                SocketAddr::V6(a) => format!("[{}]", a.ip()),
            });
        }
        names.extend(extra.iter().map(|n| n.trim().to_ascii_lowercase()));
        let mut hosts: Vec<String> = names.iter().map(|n| format!("{n}:{port}")).collect();
        hosts.extend(names);
        hosts.dedup();
        Gate { hosts }
    }

    fn allowed_host(&self, host: &[u8]) -> bool {
        self.hosts
            .iter()
            .any(|h| h.as_bytes().eq_ignore_ascii_case(host))
    }

    /// Refuses a request whose `Host` (or authority) is missing or not the sidecar's, or that a
    /// browser sent from another origin. One pass over the headers: this runs before every read.
    pub fn check<B>(&self, request: &Request<B>) -> Result<(), ApiError> {
        let (mut host, mut origin, mut cross_site) = (None, None, false);
        for (name, value) in request.headers() {
            if *name == HOST {
                if host.is_some() {
                    return Err(ApiError::HostNotAllowed("more than one Host header".into()));
                }
                host = Some(value.as_bytes());
            } else if *name == ORIGIN {
                origin = Some(value.as_bytes());
            } else if *name == SEC_FETCH_SITE {
                cross_site |= value.as_bytes().eq_ignore_ascii_case(b"cross-site");
            }
        }
        // HTTP/2 carries the authority in the URI instead.
        let host = match (host, request.uri().authority()) {
            (Some(h), _) => h,
            (None, Some(a)) => a.as_str().as_bytes(),
            (None, None) => return Err(ApiError::MissingHost),
        };
        if !self.allowed_host(host) {
            return Err(ApiError::HostNotAllowed(
                String::from_utf8_lossy(host).into_owned(),
            ));
        }
        if cross_site {
            return Err(ApiError::CrossOrigin("Sec-Fetch-Site: cross-site".into()));
        }
        if let Some(origin) = origin {
            let ok = origin
                .strip_prefix(b"http://")
                .is_some_and(|host| self.allowed_host(host));
            if !ok {
                return Err(ApiError::CrossOrigin(
                    String::from_utf8_lossy(origin).into_owned(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::builder().uri("/v1/kv/a");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn only_local_names_and_same_origin_pass() {
        let gate = Gate::new("127.0.0.1:7379".parse().unwrap(), &["config.local".into()]);
        for host in [
            "localhost:7379",
            "LOCALHOST:7379",
            "127.0.0.1:7379",
            "[::1]:7379",
            "localhost",
            "config.local:7379",
        ] {
            assert!(gate.check(&request(&[("host", host)])).is_ok(), "{host}");
        }
        for host in [
            "evil.example",
            "localhost.evil.example",
            "localhost:80",
            "127.0.0.1:7380",
            "127.0.0.2:7379",
            "",
        ] {
            let e = gate.check(&request(&[("host", host)])).unwrap_err();
            assert_eq!(e.code(), "host_not_allowed", "{host}");
        }
        assert_eq!(
            gate.check(&request(&[])).unwrap_err().code(),
            "missing_host"
        );
        let two = request(&[("host", "localhost:7379"), ("host", "evil.example")]);
        assert_eq!(gate.check(&two).unwrap_err().code(), "host_not_allowed");
        // HTTP/2: the authority stands in for Host.
        let h2 = Request::builder()
            .uri("http://localhost:7379/v1/kv/a")
            .body(())
            .unwrap();
        assert!(gate.check(&h2).is_ok());

        let local = ("host", "localhost:7379");
        assert!(gate
            .check(&request(&[local, ("origin", "http://localhost:7379")]))
            .is_ok());
        for origin in [
            "http://evil.example",
            "https://localhost:7379",
            "null",
            "http://localhost:7379.evil.example",
        ] {
            let e = gate
                .check(&request(&[local, ("origin", origin)]))
                .unwrap_err();
            assert_eq!(e.code(), "cross_origin", "{origin}");
        }
        let e = gate
            .check(&request(&[local, ("sec-fetch-site", "cross-site")]))
            .unwrap_err();
        assert_eq!(e.code(), "cross_origin");
        assert!(gate
            .check(&request(&[local, ("sec-fetch-site", "same-origin")]))
            .is_ok());
    }

    #[test]
    fn a_remote_listen_address_is_a_name_too() {
        let gate = Gate::new("10.1.2.3:7379".parse().unwrap(), &[]);
        assert!(gate.check(&request(&[("host", "10.1.2.3:7379")])).is_ok());
        let any = Gate::new("0.0.0.0:7379".parse().unwrap(), &[]);
        assert!(any.check(&request(&[("host", "0.0.0.0:7379")])).is_err());
    }
}
