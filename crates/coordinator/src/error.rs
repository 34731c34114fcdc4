//! One error for everything the coordinator refuses, mapped to a gRPC
//! status in one place, at the edge.

use tonic::Status;

/// Why the coordinator refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordinatorError {
    /// A field is outside what is allowed.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, as the proto names it (`template.vllm_args`).
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// Several fields are outside what is allowed.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Fields(Vec<crossfade_common::FieldError>),
    /// What the request names does not exist.
    #[error("{field}: no {what} `{name}`")]
    NotFound {
        /// The field that names it.
        field: &'static str,
        /// What kind of thing.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// It exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// Not now: the state does not allow it (a promotion under way).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The coordinator is shutting down (or could not store the change).
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// This coordinator is on standby: the leader (its API address, or
    /// empty while none is known) takes changes.
    #[error("{}", standby_message(.0))]
    Standby(String),
}

/// The metadata key naming the leader's API address on a standby's refusal.
pub const LEADER_METADATA: &str = "x-crossfade-leader";

fn standby_message(leader: &str) -> String {
    if leader.is_empty() {
        "this coordinator is on standby and no leader is elected yet; try again shortly".into()
    } else {
        format!("this coordinator is on standby; send changes to the leader at {leader}")
    }
}

impl CoordinatorError {
    /// `field` is invalid: `message` says why and what is allowed.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// `name` (a `what`, named by `field`) does not exist.
    pub fn not_found(field: &'static str, what: &'static str, name: impl Into<String>) -> Self {
        Self::NotFound {
            field,
            what,
            name: name.into(),
        }
    }
}

impl From<Vec<crossfade_common::FieldError>> for CoordinatorError {
    fn from(errors: Vec<crossfade_common::FieldError>) -> Self {
        Self::Fields(errors)
    }
}

impl From<CoordinatorError> for Status {
    fn from(error: CoordinatorError) -> Self {
        let message = error.to_string();
        match error {
            CoordinatorError::Invalid { .. } | CoordinatorError::Fields(_) => {
                Status::invalid_argument(message)
            }
            CoordinatorError::NotFound { .. } => Status::not_found(message),
            CoordinatorError::AlreadyExists(_) => Status::already_exists(message),
            CoordinatorError::FailedPrecondition(_) => Status::failed_precondition(message),
            CoordinatorError::ShuttingDown => Status::unavailable(message),
            CoordinatorError::Standby(leader) => {
                let mut status = Status::unavailable(message);
                if !leader.is_empty()
                    && let Ok(value) = leader.parse()
                {
                    status.metadata_mut().insert(LEADER_METADATA, value);
                }
                status
            }
        }
    }
}
