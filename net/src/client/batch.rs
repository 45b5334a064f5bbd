//! The batch calls of [`Client`]: `CreateSandboxes` and `DeleteSandboxes`.
//!
//! The call follows the leader as every call does. Its answer holds one result per item;
//! an item answered UNAVAILABLE (a dropped proposal, a leadership change while it was in
//! flight) is sent again, alone with the others like it, until the client's deadline:
//! creates carry their request id, so a repeat is answered with the first result, and a
//! repeated delete of a sandbox already gone answers `existed = false`.

use std::time::{Duration, Instant};

use tonic::{Code, Status};

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::sandbox_service_client::SandboxServiceClient;

use super::Client;

/// An item's error as a `Status`, as the single-item call would have returned it.
fn item_status(e: pb::ItemError) -> Status {
    Status::new(Code::from_i32(e.code), e.message)
}

fn missing_result() -> Status {
    Status::internal("the replica answered fewer results than items")
}

/// The results of a batch call's items as rounds come in: which items are still to send
/// (those answered UNAVAILABLE while the deadline lasts) and each item's latest result.
struct Rounds<T> {
    started: Instant,
    deadline: Duration,
    backoff: Duration,
    results: Vec<Option<Result<T, Status>>>,
    todo: Vec<usize>,
}

impl<T> Rounds<T> {
    fn new(items: usize, deadline: Duration) -> Rounds<T> {
        Rounds {
            started: Instant::now(),
            deadline,
            backoff: Duration::from_millis(20),
            results: (0..items).map(|_| None).collect(),
            todo: (0..items).collect(),
        }
    }

    /// The items of the next round (indexes into the call's items); none when done.
    async fn next_round(&mut self, round: u32) -> Option<&[usize]> {
        if self.todo.is_empty() {
            return None;
        }
        if round > 0 {
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(Duration::from_millis(100));
        }
        Some(&self.todo)
    }

    /// Records a round's answers, one per item of the round, in order.
    fn record(&mut self, answers: impl IntoIterator<Item = Result<T, Status>>) {
        let mut answers = answers.into_iter();
        let mut again = Vec::new();
        let open = self.started.elapsed() < self.deadline;
        for &i in &self.todo {
            let answer = answers.next().unwrap_or_else(|| Err(missing_result()));
            if open && matches!(&answer, Err(s) if s.code() == Code::Unavailable) {
                again.push(i);
            }
            self.results[i] = Some(answer);
        }
        self.todo = again;
    }

    /// A round whose call failed as a whole: the first round's failure is the call's; on a
    /// later one (only items to send again), those items end with it.
    fn fail(&mut self, status: Status, first: bool) -> Result<(), Status> {
        if first {
            return Err(status);
        }
        for &i in &self.todo {
            self.results[i] = Some(Err(status.clone()));
        }
        self.todo.clear();
        Ok(())
    }

    fn finish(self) -> Vec<Result<T, Status>> {
        self.results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(missing_result())))
            .collect()
    }
}

impl Client {
    /// Sends `items` in rounds (see the module): `request` makes one call's request from
    /// the items of a round, `send` makes the call, `results` splits its answer per item.
    async fn in_rounds<I, Req, Resp, T, Fut>(
        &mut self,
        items: &[I],
        request: impl Fn(Vec<I>) -> Req,
        send: impl Fn(super::Conn, Req) -> Fut,
        results: impl Fn(Resp) -> Vec<Result<T, Status>>,
    ) -> Result<Vec<Result<T, Status>>, Status>
    where
        I: Clone,
        Req: Clone,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let mut rounds = Rounds::new(items.len(), self.deadline);
        let mut round = 0;
        while let Some(todo) = rounds.next_round(round).await {
            round += 1;
            let req = request(todo.iter().map(|&i| items[i].clone()).collect());
            match self.call(|c| send(c, req.clone())).await {
                Ok(answer) => rounds.record(results(answer)),
                Err(status) => rounds.fail(status, round == 1)?,
            }
        }
        Ok(rounds.finish())
    }

    /// Creates up to [`berth_proto::pb::MAX_BATCH_ITEMS`] sandboxes in one call, each
    /// idempotent on its own request id: one result per item, in order (an item's error is
    /// the `Status` CreateSandbox would have answered). Err only when the call as a whole
    /// fails (too many items, no leader within the deadline, not allowed).
    pub async fn create_many(
        &mut self,
        items: Vec<pb::CreateSandboxRequest>,
    ) -> Result<Vec<Result<pb::CreateSandboxResponse, Status>>, Status> {
        self.in_rounds(
            &items,
            |items| pb::CreateSandboxesRequest { items },
            |c, request| async move { SandboxServiceClient::new(c).create_sandboxes(request).await },
            |answer: pb::CreateSandboxesResponse| {
                answer
                    .results
                    .into_iter()
                    .map(|r| match r.result {
                        Some(pb::create_sandbox_result::Result::Created(created)) => Ok(created),
                        Some(pb::create_sandbox_result::Result::Error(e)) => Err(item_status(e)),
                        None => Err(missing_result()),
                    })
                    .collect()
            },
        )
        .await
    }

    /// Deletes up to [`berth_proto::pb::MAX_BATCH_ITEMS`] sandboxes in one call: per id, in
    /// order, whether it existed, or the `Status` DeleteSandbox would have answered.
    pub async fn delete_many(
        &mut self,
        sandbox_ids: Vec<String>,
    ) -> Result<Vec<Result<bool, Status>>, Status> {
        self.in_rounds(
            &sandbox_ids,
            |sandbox_ids| pb::DeleteSandboxesRequest { sandbox_ids },
            |c, request| async move { SandboxServiceClient::new(c).delete_sandboxes(request).await },
            |answer: pb::DeleteSandboxesResponse| {
                answer
                    .results
                    .into_iter()
                    .map(|r| match r.result {
                        Some(pb::delete_sandbox_result::Result::Deleted(d)) => Ok(d.existed),
                        Some(pb::delete_sandbox_result::Result::Error(e)) => Err(item_status(e)),
                        None => Err(missing_result()),
                    })
                    .collect()
            },
        )
        .await
    }
}
