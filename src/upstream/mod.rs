//! etcd as the sidecar reaches it: one client per member and which member to use
//! ([`pool`]) with what it has learnt of each member ([`member`]), periodic health probes of
//! every member ([`probe`]), writes as one transaction each ([`write`]), what a failed call
//! means ([`error`]), and when to call again: the backoff and jittered waits that keep a fleet
//! of sidecars from calling etcd in step ([`spread`]); an app's call passed on to etcd as it is,
//! answered with etcd's own error ([`forward`]).

pub mod error;
pub mod forward;
pub mod member;
pub mod pool;
pub mod probe;
pub mod spread;
pub mod write;

pub use pool::{Applied, Chosen, EndpointPool, RequestFailed, Retry, MAX_DECODE_BYTES};
pub use probe::{MemberProbe, Observation, ProbeResults, ProbeTask};
