//! config-sidecar: mirrors etcd v3 key prefixes into memory and serves them to the application
//! beside it over localhost HTTP.
//!
//! Data flows one way, etcd → [`mirror`] (the sync, then one immutable snapshot per revision) →
//! [`http`] handlers and [`files`], and so do the imports: each folder below uses only those
//! listed before it.
//!
//! - [`config`]: every setting, from flags, environment and the TOML file, validated before
//!   anything binds; the live settings a reload may change; the mirrored [`config::Prefixes`].
//! - [`liveness`]: each background task's heartbeat and the watchdog over them (`/healthz`);
//!   a leaf that every layer's tasks beat into.
//! - [`upstream`]: etcd as the sidecar reaches it: one client per member
//!   ([`upstream::EndpointPool`]), health probes of every member, writes as transactions.
//! - [`mode`]: the degradation ladder: the serving [`mode::Mode`] (full → read-only →
//!   cache-only), the state machine that sets it from the sync's and the probes' signals, its
//!   published handle and transitions log, and the operator's pin.
//! - [`mirror`]: etcd → memory: the [`mirror::sync::WatchTask`] (load at one revision, then
//!   watch), the [`mirror::store::Store`] of snapshots and their recent history, the disk
//!   snapshot, and listings and trees rendered once per revision.
//! - [`http`]: memory → the app over HTTP: routes and handlers, the fast path for plain key
//!   reads, change streams and blocking queries, the gate on who may ask, the one place errors
//!   become responses, etcd's v3 JSON gateway, etcd's gRPC API (on HTTP/2) and Consul's KV API
//!   over the same store for clients that speak them, and the server's sockets (accept loop and
//!   drain, per-connection deadlines, the wire screen of HTTP/1 request heads).
//! - [`files`]: memory → the app as files: each render target rewritten atomically when its
//!   content changes, in the formats apps read, and the app told when one changed.
//! - [`ops`]: the operator's side, on top: [`ops::serve`] wires and runs the whole; status
//!   checks, metrics, alerts (webhook), reload on SIGHUP, logging, the container health check.

#![forbid(unsafe_code)]

pub mod config;
pub mod files;
pub mod http;
pub mod liveness;
pub mod mirror;
pub mod mode;
pub mod ops;
pub mod upstream;

pub use ops::run::{serve, serve_live, Running, SNAPSHOT_FALLBACK_AFTER};
