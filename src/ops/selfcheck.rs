//! `config-sidecar --healthcheck [/readyz]`: asks a running sidecar whether it is alive (or ready), for container
//! health checks in an image that has no HTTP client. Plain blocking HTTP/1.1 over loopback; no
//! runtime, no configuration beyond the listen address.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// How long the whole check may take.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Asks `listen` (the sidecar's listen address) for `path` (`/healthz` or `/readyz`): `Ok` on a
/// 200, else why not. An unspecified listen address (`0.0.0.0`, `::`) is asked on loopback.
pub fn check(listen: SocketAddr, path: &str) -> Result<(), String> {
    if !path.starts_with('/')
        || path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!("{path:?} is not a path such as /healthz"));
    }
    let mut target = listen;
    if target.ip().is_unspecified() {
        target.set_ip(match target.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT)
        .map_err(|e| format!("cannot connect to {target}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .map_err(|e| format!("cannot send to {target}: {e}"))?;
    let mut head = [0u8; 64];
    let n = stream
        .read(&mut head)
        .map_err(|e| format!("no answer from {target}: {e}"))?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    match status_line.split(' ').nth(1) {
        Some("200") => Ok(()),
        Some(code) => Err(format!("{target} answered {path} with {code}")),
        None => Err(format!("{target} did not answer HTTP")),
    }
}
