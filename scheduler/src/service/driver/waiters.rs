//! What the Raft thread owes the clients of each of its proposals, and how it fails them.

use tokio::sync::oneshot;

use super::handle::{CommandReply, CreateRequest, DeleteRequest};
use crate::service::ServiceError;

/// The clients waiting for one proposal.
pub(super) enum Waiter {
    Creates { replies: Vec<CreateRequest> },
    Deletes { replies: Vec<DeleteRequest> },
    Command(CommandReply),
    Membership(oneshot::Sender<Result<(), ServiceError>>),
}

/// Answers every client of `waiter` with `error`.
pub(super) fn fail(waiter: Waiter, error: ServiceError) {
    match waiter {
        Waiter::Creates { replies } => {
            for c in replies {
                let _ = c.reply.send(Err(error.clone()));
            }
        }
        Waiter::Deletes { replies } => {
            for d in replies {
                let _ = d.reply.send(Err(error.clone()));
            }
        }
        Waiter::Command(reply) => {
            let _ = reply.send(Err(error));
        }
        Waiter::Membership(reply) => {
            let _ = reply.send(Err(error));
        }
    }
}
