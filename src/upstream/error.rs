//! What an etcd call's failure means, told from its gRPC status code rather than from the text
//! of the message. Where etcd gives one code several meanings it defines the message too
//! (`rpctypes` in etcd's `api/v3rpc`), and only that exact message is compared.

use tonic::Code;

/// etcd's message for `ErrGRPCNoLeader` (code `Unavailable`): how a watch stream that requires a
/// leader ends when its member has none, and how a call fails then.
pub const NO_LEADER: &str = "etcdserver: no leader";

/// The kind of an etcd call's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The member answered that the cluster has no leader: nothing was applied, and the member
    /// is cut off from a quorum or the cluster is electing.
    NoLeader,
    /// The call's deadline passed (`DeadlineExceeded`, `Cancelled`, for a request that went out):
    /// a request that was sent may have been applied.
    Deadline,
    /// The member could not be reached or the connection broke (a transport or IO error, or
    /// `Unavailable` for another reason): whether a request sent was applied is unknown.
    Unreachable,
    /// etcd answered and refused the request (bad argument, permission, size, compaction...):
    /// nothing was applied.
    Refused,
}

impl Failure {
    /// What `error` means.
    pub fn of(error: &etcd_client::Error) -> Failure {
        match error {
            etcd_client::Error::GRpcStatus(status) => match status.code() {
                Code::Unavailable if status.message() == NO_LEADER => Failure::NoLeader,
                Code::Unavailable | Code::Unknown => Failure::Unreachable,
                // Canceled because the connection was refused or closed before the request
                // went out (a killed member): the member is unreachable, not slow.
                Code::DeadlineExceeded | Code::Cancelled if Failure::not_sent(error) => {
                    Failure::Unreachable
                }
                Code::DeadlineExceeded | Code::Cancelled => Failure::Deadline,
                _ => Failure::Refused,
            },
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
                Failure::Unreachable
            }
            _ => Failure::Refused,
        }
    }

    /// Whether a write that failed this way was certainly not applied.
    pub fn not_applied(self) -> bool {
        matches!(self, Failure::NoLeader | Failure::Refused)
    }

    /// The kind's name in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::NoLeader => "no_leader",
            Failure::Deadline => "deadline",
            Failure::Unreachable => "unreachable",
            Failure::Refused => "refused",
        }
    }

    /// Whether `error` proves the request never reached etcd, found in the error's chain of
    /// causes: the connection it needed was refused (the member is down; nothing listens), or
    /// hyper canceled it before handing it to the connection (`is_canceled`: the connection
    /// closed, a killed member's, while the request still waited in hyper's queue).
    pub fn not_sent(error: &etcd_client::Error) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = match error {
            etcd_client::Error::GRpcStatus(status) => std::error::Error::source(status),
            etcd_client::Error::TransportError(e) => std::error::Error::source(e),
            etcd_client::Error::IoError(e) => Some(e),
            _ => None,
        };
        while let Some(c) = cause {
            if c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
                || c.downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_canceled)
            {
                return true;
            }
            cause = c.source();
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, message))
    }

    #[test]
    fn failures_are_told_apart_by_code() {
        assert_eq!(
            Failure::of(&status(Code::Unavailable, NO_LEADER)),
            Failure::NoLeader
        );
        assert_eq!(
            Failure::of(&status(Code::Unavailable, "connection refused")),
            Failure::Unreachable
        );
        assert_eq!(
            Failure::of(&status(Code::DeadlineExceeded, "context deadline exceeded")),
            Failure::Deadline
        );
        // Canceled by a connection that never carried the request (here refused): unreachable.
        let mut canceled = tonic::Status::new(Code::Cancelled, "operation was canceled");
        canceled.set_source(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        let canceled = etcd_client::Error::GRpcStatus(canceled);
        assert!(Failure::not_sent(&canceled));
        assert_eq!(Failure::of(&canceled), Failure::Unreachable);
        // A refusal whose text mentions a leader is still a refusal: the code decides.
        assert_eq!(
            Failure::of(&status(Code::InvalidArgument, "etcdserver: no leader")),
            Failure::Refused
        );
        assert_eq!(
            Failure::of(&status(Code::PermissionDenied, "permission denied")),
            Failure::Refused
        );
        assert!(Failure::NoLeader.not_applied() && Failure::Refused.not_applied());
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(Failure::not_sent(&etcd_client::Error::IoError(refused)));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!Failure::not_sent(&etcd_client::Error::IoError(reset)));
        assert!(!Failure::not_sent(&status(
            Code::Unavailable,
            "tcp connect error"
        )));
        assert!(!Failure::Deadline.not_applied() && !Failure::Unreachable.not_applied());
    }
}
