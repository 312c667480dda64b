//! config-sidecar: mirrors etcd v3 key prefixes into memory and serves them to the application
//! beside it over localhost HTTP.
//!
//! Data flows one way, etcd → [`mirror`] (the sync, then one immutable snapshot per revision) →
//! [`http`] handlers, and so do the imports: each folder below uses only those listed before it.
//!
//! - [`config`]: every setting, from flags, environment and the TOML file, validated before
//!   anything binds; the live settings a reload may change; the mirrored [`config::Prefixes`].
//! - [`liveness`]: each background task's heartbeat and the watchdog over them (`/healthz`);
//!   a leaf that every layer's tasks beat into.
//! - [`upstream`]: etcd as the sidecar reaches it: one client per member
//!   ([`upstream::EndpointPool`]), health probes of every member, writes as transactions.
//! - [`mirror`]: etcd → memory: the [`mirror::sync::WatchTask`] (load at one revision, then
//!   watch), the [`mirror::store::Store`] of snapshots, the serving [`mirror::mode`] and the
//!   state machine that sets it, the disk snapshot, rendered listings and trees, and files
//!   rendered for apps that read files.
//! - [`http`]: memory → the app: routes and handlers, the fast path for plain key reads, change
//!   streams and blocking queries, the gate on who may ask, the one place errors become
//!   responses, and etcd's v3 JSON gateway and Consul's KV API over the same store for clients
//!   that speak them.
//! - [`server`]: sockets: the accept loop and drain, per-connection deadlines, and the wire
//!   screen of HTTP/1 request heads.
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
