//! `SandboxService`'s batch calls: `CreateSandboxes` and `DeleteSandboxes`.
//!
//! Each item goes through the single-item path ([`SandboxApi::create_item`],
//! [`SandboxApi::delete_item`]): the same checks, tenant rules and idempotency, and its own
//! result, so one bad item does not fail the others. The items are then submitted to the
//! store all at once, as that many concurrent single calls would be; the leader's batcher
//! coalesces them into one log entry (or a few). What a batch saves is the per-call gRPC
//! work (frames, headers, the task per call), which is most of what the create path costs
//! on a loaded machine (see ARCHITECTURE.md, "Measured").
//!
//! A call on a follower is answered as a whole with "not the leader", as CreateSandbox is,
//! so the client follows the leader and sends the whole batch again (every item is
//! idempotent). Should leadership move while the items are in flight, the same answer
//! covers the whole call.

use futures_util::future::join_all;
use tonic::{Request, Response, Status};

use berth_proto::pb::MAX_BATCH_ITEMS;
use berth_proto::pb::v1 as pb;

use super::SandboxApi;
use crate::service::{ServiceError, Store};

/// An item's failure as the batch answer carries it.
fn item_error(status: &Status) -> pb::ItemError {
    pb::ItemError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

fn check_count(field: &str, n: usize) -> Result<(), Status> {
    if n > MAX_BATCH_ITEMS {
        return Err(ServiceError::invalid(
            field,
            format!("{n} items; a batch may hold at most {MAX_BATCH_ITEMS}"),
        )
        .into());
    }
    Ok(())
}

/// The whole call's answer when any item met a follower (leadership moved mid-call), so the
/// client follows the leader hint; otherwise the items' results.
fn whole_call_not_leader<T>(results: &[Result<T, Status>]) -> Result<(), Status> {
    match results
        .iter()
        .find_map(|r| r.as_ref().err().filter(|s| berth_net::is_not_leader(s)))
    {
        Some(status) => Err(status.clone()),
        None => Ok(()),
    }
}

impl<S: Store> SandboxApi<S> {
    pub(super) async fn create_sandboxes_call(
        &self,
        request: Request<pb::CreateSandboxesRequest>,
    ) -> Result<Response<pb::CreateSandboxesResponse>, Status> {
        let access = self.sandbox_access(&request).await?;
        let items = request.into_inner().items;
        check_count("items", items.len())?;
        self.handle.require_leader()?;
        let pending = items.into_iter().map(|item| {
            let checked = self.create_item(&access, item);
            async move {
                match checked {
                    Ok(submission) => Ok(self.handle.create(submission).await?),
                    Err(status) => Err(status),
                }
            }
        });
        let outcomes = join_all(pending).await;
        whole_call_not_leader(&outcomes)?;
        let results = outcomes
            .into_iter()
            .map(|outcome| pb::CreateSandboxResult {
                result: Some(match outcome {
                    Ok(created) => pb::create_sandbox_result::Result::Created(created),
                    Err(status) => pb::create_sandbox_result::Result::Error(item_error(&status)),
                }),
            })
            .collect();
        Ok(Response::new(pb::CreateSandboxesResponse { results }))
    }

    pub(super) async fn delete_sandboxes_call(
        &self,
        request: Request<pb::DeleteSandboxesRequest>,
    ) -> Result<Response<pb::DeleteSandboxesResponse>, Status> {
        let access = self.sandbox_access(&request).await?;
        let ids = request.into_inner().sandbox_ids;
        check_count("sandbox_ids", ids.len())?;
        self.handle.require_leader()?;
        let pending = ids.iter().enumerate().map(|(i, id)| {
            let access = &access;
            async move {
                self.delete_item(access, &format!("sandbox_ids[{i}]"), id)
                    .await
            }
        });
        let outcomes = join_all(pending).await;
        whole_call_not_leader(&outcomes)?;
        let results = outcomes
            .into_iter()
            .map(|outcome| pb::DeleteSandboxResult {
                result: Some(match outcome {
                    Ok(existed) => {
                        pb::delete_sandbox_result::Result::Deleted(pb::DeleteSandboxResponse {
                            existed,
                        })
                    }
                    Err(status) => pb::delete_sandbox_result::Result::Error(item_error(&status)),
                }),
            })
            .collect();
        Ok(Response::new(pb::DeleteSandboxesResponse { results }))
    }
}
