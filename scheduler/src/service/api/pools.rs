//! `AdminService`'s warm-pool calls: set (the template is checked and its limits resolved
//! as a create's are, so a create with the same fields matches it), delete, list. The pool
//! itself lives in the replicated state ([`crate::state::pools`]); the leader's keeper
//! ([`crate::service::pools`]) fills it.

use tonic::{Request, Response, Status};

use berth_proto::pb::v1 as pb;

use super::{AdminApi, linearizable, only_outcome};
use crate::convert;
use crate::service::{ServiceError, Store};
use crate::state::pools::{PoolRecord, WarmPool};
use crate::state::{Command, ItemOutcome, Rejection, State};

/// A pool as the API shows it.
fn pool_to_pb(name: &str, record: &PoolRecord, state: &State) -> pb::WarmPool {
    let (ready, warming) = state.pool_counts(record);
    pb::WarmPool {
        name: name.to_owned(),
        template: Some(convert::spec_to_pb(&record.pool.template)),
        size: record.pool.size,
        ready,
        warming,
        created: record.created,
        claimed: record.claimed,
    }
}

impl<S: Store> AdminApi<S> {
    pub(super) async fn set_warm_pool_call(
        &self,
        request: Request<pb::SetWarmPoolRequest>,
    ) -> Result<Response<pb::WarmPool>, Status> {
        self.require_admin(&request, "SetWarmPool").await?;
        let req = request.into_inner();
        let mut template =
            convert::spec_from_pb(req.template.as_ref(), "template").map_err(ServiceError::from)?;
        if !template.command.is_empty() {
            return Err(ServiceError::invalid(
                "template.command",
                "a pool's sandboxes run no command until claimed; leave it empty",
            )
            .into());
        }
        template.keep_alive = true;
        // The same defaults a create gets, so a create that leaves them at 0 matches.
        self.sessions
            .apply(&mut template)
            .map_err(|e| ServiceError::invalid("template.timeout_ms", e.one_line()))?;
        let name = req.name.clone();
        let pool = WarmPool {
            template,
            size: req.size,
        };
        let result = self
            .handle
            .command(Command::SetWarmPool {
                name: name.clone(),
                pool,
            })
            .await?;
        if let ItemOutcome::Rejected(r) = only_outcome(result.outcomes)? {
            return Err(ServiceError::Rejected(r).into());
        }
        let found = self
            .handle
            .read(false, move |v| {
                v.state
                    .pools()
                    .get(&name)
                    .map(|r| pool_to_pb(&name, r, v.state))
            })
            .await?;
        found
            .map(Response::new)
            .ok_or_else(|| ServiceError::NotFound("the pool was deleted meanwhile".into()).into())
    }

    pub(super) async fn delete_warm_pool_call(
        &self,
        request: Request<pb::DeleteWarmPoolRequest>,
    ) -> Result<Response<pb::DeleteWarmPoolResponse>, Status> {
        self.require_admin(&request, "DeleteWarmPool").await?;
        let name = request.into_inner().name;
        let result = self
            .handle
            .command(Command::DeleteWarmPool { name: name.clone() })
            .await?;
        match only_outcome(result.outcomes)? {
            ItemOutcome::Rejected(Rejection::InvalidSpec(_)) => {
                Err(ServiceError::NotFound(format!("name: there is no warm pool {name:?}")).into())
            }
            ItemOutcome::Rejected(r) => Err(ServiceError::Rejected(r).into()),
            _ => Ok(Response::new(pb::DeleteWarmPoolResponse {})),
        }
    }

    pub(super) async fn list_warm_pools_call(
        &self,
        request: Request<pb::ListWarmPoolsRequest>,
    ) -> Result<Response<pb::ListWarmPoolsResponse>, Status> {
        self.require_admin(&request, "ListWarmPools").await?;
        let linear = linearizable(&request);
        let pools = self
            .handle
            .read(linear, |v| {
                v.state
                    .pools()
                    .iter()
                    .map(|(name, r)| pool_to_pb(name, r, v.state))
                    .collect()
            })
            .await?;
        Ok(Response::new(pb::ListWarmPoolsResponse { pools }))
    }
}
