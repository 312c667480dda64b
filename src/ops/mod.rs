//! The operator's side, on top of every other layer: [`run`] wires the parts together and runs
//! them; [`report`], with [`checks`] and [`metrics`], reports on them (`/v1/status`,
//! `/metrics`); [`alerts`] turns mode transitions and check changes into alerts, bounded per
//! check, and [`webhook`] posts them;
//! [`reload`] applies a new configuration on SIGHUP; [`telemetry`] sets up logging; [`selfcheck`]
//! is the container health check client; [`allocator`] sets glibc's allocator for bursts and
//! hands memory back after them.

pub mod alerts;
pub mod allocator;
pub mod checks;
pub mod metrics;
pub mod reload;
pub mod report;
pub mod run;
pub mod selfcheck;
pub mod telemetry;
pub mod webhook;
