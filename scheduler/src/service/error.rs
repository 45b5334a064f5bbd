//! The service layer's errors, each mapped to its gRPC code in one place
//! ([`From<ServiceError> for Status`](ServiceError)).
//!
//! Handlers and the Raft thread's handle return [`ServiceError`]; tonic sees a `Status` only
//! at the edge. Field paths found by validation ([`FieldErrors`]) survive into the
//! client's message (`spec.resources.cpu_milli: ...; spec.tenant: ...`). Conditions a
//! client should retry (a dropped proposal, a leadership change, a full queue on a
//! replica that is shutting down, no leader known yet during an election) are
//! `UNAVAILABLE`; a follower that knows the leader answers `FAILED_PRECONDITION` with the
//! leader's address in `berth-leader` metadata (empty, on the UNAVAILABLE answer, while no
//! leader is known), which [`berth_net::is_not_leader`] tells apart from a refusal.

use thiserror::Error;
use tonic::Status;

use berth_proto::FieldErrors;

use crate::replication::ProposeError;
use crate::state::Rejection;

/// Why a request to a replica failed.
#[derive(Debug, Clone, Error)]
pub enum ServiceError {
    /// A request field is wrong; every bad field with its path. INVALID_ARGUMENT.
    #[error("{}", .0.one_line())]
    Invalid(#[from] FieldErrors),
    /// The state machine refused the item (code by the rejection's kind).
    #[error("{0}")]
    Rejected(#[from] Rejection),
    /// This replica is not the leader; `leader` is 0 and `address` empty when unknown.
    /// FAILED_PRECONDITION with the leader in `berth-leader` metadata; UNAVAILABLE (retry
    /// shortly) with that metadata empty while no leader is known.
    #[error("{}", berth_net::leader::not_leader_message(*.leader, .address))]
    NotLeader {
        /// Leader id, 0 when unknown.
        leader: u64,
        /// Its client address, empty when unknown.
        address: String,
    },
    /// raft-rs dropped the proposal (a leader transfer, a membership change in progress).
    /// UNAVAILABLE.
    #[error("the proposal was dropped ({0}); retry (creates with the same request_id)")]
    Dropped(String),
    /// Leadership changed before the request committed. UNAVAILABLE.
    #[error(
        "leadership changed before the request committed; retry with the same request_id \
         (retries are idempotent)"
    )]
    LostLeadership,
    /// The replica cannot take the request now (shutting down, a queue closed, a peer or
    /// agent unreachable). UNAVAILABLE.
    #[error("{0}")]
    Unavailable(String),
    /// A bounded queue or a size limit is full. RESOURCE_EXHAUSTED.
    #[error("{0}")]
    Exhausted(String),
    /// A refusal that does not depend on which replica answered (a membership change the
    /// cluster cannot make, a stream opened twice, the wrong cluster). FAILED_PRECONDITION.
    #[error("{0}")]
    Precondition(String),
    /// No such object. NOT_FOUND.
    #[error("{0}")]
    NotFound(String),
    /// The request did not commit in time. DEADLINE_EXCEEDED.
    #[error("{0}")]
    Timeout(String),
    /// A bug or a broken replica (its Raft thread stopped). INTERNAL.
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    /// The error for a missing request field: INVALID_ARGUMENT `field: must be set`.
    pub fn missing(field: &str) -> ServiceError {
        ServiceError::Invalid(FieldErrors::missing(field))
    }

    /// One bad field: INVALID_ARGUMENT `field: message`.
    pub fn invalid(field: &str, message: impl Into<String>) -> ServiceError {
        ServiceError::Invalid(FieldErrors::one(field, message))
    }
}

impl From<ProposeError> for ServiceError {
    fn from(e: ProposeError) -> ServiceError {
        match e {
            ProposeError::NotLeader { leader, address } => {
                ServiceError::NotLeader { leader, address }
            }
            ProposeError::Dropped(why) => ServiceError::Dropped(why),
            ProposeError::Membership(why) => ServiceError::Precondition(why),
        }
    }
}

fn rejection_code(r: &Rejection) -> tonic::Code {
    use tonic::Code;
    match r {
        Rejection::InvalidSpec(_) => Code::InvalidArgument,
        Rejection::BatchTooLarge(_)
        | Rejection::ConcurrencyQuota { .. }
        | Rejection::GpuQuota { .. }
        | Rejection::NoRoomToThaw { .. }
        | Rejection::SnapshotBudget { .. } => Code::ResourceExhausted,
        Rejection::UnknownNode(_) | Rejection::UnknownSandbox(_) => Code::NotFound,
        _ => Code::FailedPrecondition,
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        let message = e.to_string();
        match e {
            ServiceError::NotLeader { leader, address } => {
                berth_net::not_leader_status(leader, &address)
            }
            ServiceError::Invalid(_) => Status::invalid_argument(message),
            ServiceError::Rejected(r) => Status::new(rejection_code(&r), message),
            ServiceError::Dropped(_)
            | ServiceError::LostLeadership
            | ServiceError::Unavailable(_) => Status::unavailable(message),
            ServiceError::Exhausted(_) => Status::resource_exhausted(message),
            ServiceError::Precondition(_) => Status::failed_precondition(message),
            ServiceError::NotFound(_) => Status::not_found(message),
            ServiceError::Timeout(_) => Status::deadline_exceeded(message),
            ServiceError::Internal(_) => Status::internal(message),
        }
    }
}

/// Why a replica could not start, or why a running one stopped.
#[derive(Debug, Error)]
pub enum StartError {
    /// A config field is refused.
    #[error("{field}: {message}")]
    Config {
        /// Dotted path of the field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A socket could not be bound, or a directory opened.
    #[error("{what}: {source}")]
    Io {
        /// The field or path concerned.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The replica's store could not be opened, or its Raft thread started.
    #[error("{0}")]
    Replica(String),
    /// The running replica failed (its Raft thread or its gRPC server stopped).
    #[error("{0}")]
    Stopped(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_error_has_its_code_and_field_paths_survive() {
        let invalid = ServiceError::from(FieldErrors(vec![
            berth_proto::FieldError {
                field: "spec.tenant".into(),
                message: "must be set".into(),
            },
            berth_proto::FieldError {
                field: "spec.resources.cpu_milli".into(),
                message: "0 is outside 1..=1024000".into(),
            },
        ]));
        let status = Status::from(invalid);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "spec.tenant: must be set; spec.resources.cpu_milli: 0 is outside 1..=1024000"
        );

        let rejected = Status::from(ServiceError::Rejected(Rejection::InvalidSpec(
            FieldErrors::missing("spec.image"),
        )));
        assert_eq!(rejected.code(), Code::InvalidArgument);
        assert_eq!(rejected.message(), "invalid spec: spec.image: must be set");
        let quota = Status::from(ServiceError::Rejected(Rejection::ConcurrencyQuota {
            tenant: "acme".into(),
            max: 3,
        }));
        assert_eq!(quota.code(), Code::ResourceExhausted);

        for retryable in [
            ServiceError::LostLeadership,
            ServiceError::Dropped("leader transfer".into()),
            ServiceError::Unavailable("shutting down".into()),
        ] {
            assert_eq!(Status::from(retryable).code(), Code::Unavailable);
        }

        let follower = Status::from(ServiceError::NotLeader {
            leader: 2,
            address: "127.0.0.1:7071".into(),
        });
        assert!(berth_net::is_not_leader(&follower));
        assert_eq!(
            follower
                .metadata()
                .get(berth_net::LEADER_METADATA)
                .and_then(|v| v.to_str().ok()),
            Some("127.0.0.1:7071")
        );
        assert_eq!(follower.code(), Code::FailedPrecondition);
        // No leader yet (an election): retryable, like every other "try again shortly".
        let unknown = Status::from(ServiceError::NotLeader {
            leader: 0,
            address: String::new(),
        });
        assert_eq!(unknown.code(), Code::Unavailable);
        assert!(berth_net::is_not_leader(&unknown));
        assert!(unknown.message().contains("no leader is known"));
        let refusal = Status::from(ServiceError::Precondition("wrong cluster".into()));
        assert!(!berth_net::is_not_leader(&refusal));
    }
}
