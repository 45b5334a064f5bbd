//! `SandboxService`'s calls into a running sandbox — `Exec`, `WriteFile`, `ReadFile`,
//! `ListDir` — checked here and proxied to the sandbox's node agent, as `ReadLogs` is. Any
//! replica serves them from its applied state (the node's agent address is part of its
//! inventory). Streams are passed through without buffering beyond gRPC's flow-control
//! windows, so a slow reader slows the sandbox's process rather than growing memory here,
//! and cancelling the client's call cancels the agent's, which kills the process.

use std::collections::BTreeMap;
use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use berth_proto::pb::v1 as pb;
use berth_proto::{FieldErrors, Validator};

use super::{SandboxApi, parse_sandbox_id};
use crate::model::validate_argv_env;
use crate::service::{ServiceError, Store};

/// Longest per-exec timeout: a day.
const EXEC_TIMEOUT_MAX_MS: u64 = 24 * 3_600_000;
/// Largest terminal side.
const TERMINAL_MAX: u32 = 1_000;

pub(super) type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Checks the first message of an exec.
fn check_exec(start: &pb::ExecStart) -> Result<(), FieldErrors> {
    let mut v = Validator::new();
    v.nested("start", |v| {
        v.check(!start.command.is_empty(), "command", || {
            "must be set".into()
        });
        let env: BTreeMap<String, String> = start.env.clone().into_iter().collect();
        validate_argv_env(v, &start.command, &env);
        if !start.working_dir.is_empty() {
            if let Err(why) = berth_sandboxd::paths::check(&start.working_dir) {
                v.error("working_dir", why);
            }
        }
        if let Some(t) = &start.terminal_size {
            for (side, n) in [("rows", t.rows), ("cols", t.cols)] {
                v.check(
                    (1..=TERMINAL_MAX).contains(&n),
                    &format!("terminal_size.{side}"),
                    || format!("{n} is outside 1..={TERMINAL_MAX}"),
                );
            }
        }
        v.check(
            start.timeout_ms <= EXEC_TIMEOUT_MAX_MS,
            "timeout_ms",
            || format!("{} is above a day", start.timeout_ms),
        );
    });
    v.finish()
}

fn check_path(field: &str, path: &str) -> Result<(), ServiceError> {
    berth_sandboxd::paths::check(path).map_err(|why| ServiceError::invalid(field, why))
}

/// An upstream failure as the client should see it: the agent's own refusals keep their
/// code; anything else (it could not be reached, it broke off) is UNAVAILABLE. Used by every
/// call proxied to an agent, `ReadLogs` included.
pub(super) fn upstream(address: &str, s: Status) -> Status {
    use tonic::Code::*;
    let code = match s.code() {
        c @ (InvalidArgument | NotFound | FailedPrecondition | PermissionDenied
        | ResourceExhausted | OutOfRange | DeadlineExceeded | Internal) => c,
        _ => Unavailable,
    };
    Status::new(code, format!("the agent at {address}: {}", s.message()))
}

impl<S: Store> SandboxApi<S> {
    pub(super) async fn exec_call(
        &self,
        request: Request<Streaming<pb::ExecRequest>>,
    ) -> Result<Response<Boxed<pb::ExecResponse>>, Status> {
        let access = self.sandbox_access(&request).await?;
        let mut inbound = request.into_inner();
        let first = inbound.message().await?;
        let Some(pb::ExecRequest {
            message: Some(pb::exec_request::Message::Start(start)),
        }) = first
        else {
            return Err(ServiceError::invalid("start", "the first message must be start").into());
        };
        let id = parse_sandbox_id("start.sandbox_id", &start.sandbox_id)?;
        check_exec(&start).map_err(ServiceError::from)?;
        let (address, mut agent, env) = self.target_of(id, true, &access).await?;
        // The sandbox's env under the call's: a warm pool's sandbox was started before its
        // create gave it an env, so its helper does not hold it.
        let mut start = start;
        for (name, value) in env {
            start.env.entry(name).or_insert(value);
        }
        let first = pb::ExecRequest {
            message: Some(pb::exec_request::Message::Start(start)),
        };
        let rest = inbound.map_while(Result::ok);
        let outbound = tokio_stream::once(first).chain(rest);
        let answer = agent
            .exec(outbound)
            .await
            .map_err(|s| upstream(&address, s))?
            .into_inner();
        let address2 = address.clone();
        Ok(Response::new(Box::pin(
            answer.map(move |r| r.map_err(|s| upstream(&address2, s))),
        )))
    }

    pub(super) async fn write_file_call(
        &self,
        request: Request<Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        let access = self.sandbox_access(&request).await?;
        let mut inbound = request.into_inner();
        let Some(pb::WriteFileRequest {
            message: Some(pb::write_file_request::Message::Start(start)),
        }) = inbound.message().await?
        else {
            return Err(ServiceError::invalid("start", "the first message must be start").into());
        };
        let id = parse_sandbox_id("start.sandbox_id", &start.sandbox_id)?;
        check_path("start.path", &start.path)?;
        if start.mode > 0o7777 {
            return Err(ServiceError::invalid(
                "start.mode",
                format!("{:o} is above 7777", start.mode),
            )
            .into());
        }
        let (address, mut agent) = self.agent_of(id, true, &access).await?;
        let first = pb::WriteFileRequest {
            message: Some(pb::write_file_request::Message::Start(start)),
        };
        // A client that breaks off ends the stream with an error: the agent sees the
        // stream cut short, not complete, and keeps the old file.
        let rest = inbound.map_while(Result::ok);
        let answer = agent
            .write_file(tokio_stream::once(first).chain(rest))
            .await
            .map_err(|s| upstream(&address, s))?;
        Ok(Response::new(answer.into_inner()))
    }

    pub(super) async fn read_file_call(
        &self,
        request: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Boxed<pb::ReadFileResponse>>, Status> {
        let access = self.sandbox_access(&request).await?;
        let req = request.into_inner();
        let id = parse_sandbox_id("sandbox_id", &req.sandbox_id)?;
        check_path("path", &req.path)?;
        let (address, mut agent) = self.agent_of(id, true, &access).await?;
        let answer = agent
            .read_file(req)
            .await
            .map_err(|s| upstream(&address, s))?
            .into_inner();
        Ok(Response::new(Box::pin(
            answer.map(move |r| r.map_err(|s| upstream(&address, s))),
        )))
    }

    pub(super) async fn list_dir_call(
        &self,
        request: Request<pb::ListDirRequest>,
    ) -> Result<Response<pb::ListDirResponse>, Status> {
        let access = self.sandbox_access(&request).await?;
        let req = request.into_inner();
        let id = parse_sandbox_id("sandbox_id", &req.sandbox_id)?;
        check_path("path", &req.path)?;
        let (address, mut agent) = self.agent_of(id, true, &access).await?;
        let answer = agent
            .list_dir(req)
            .await
            .map_err(|s| upstream(&address, s))?;
        Ok(Response::new(answer.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_starts_are_checked_field_by_field() {
        let good = pb::ExecStart {
            sandbox_id: "sbx-0000000001".into(),
            command: vec!["true".into()],
            ..Default::default()
        };
        assert!(check_exec(&good).is_ok());
        let bad = pb::ExecStart {
            command: vec![],
            working_dir: "tmp".into(),
            terminal_size: Some(pb::TerminalSize { rows: 0, cols: 80 }),
            timeout_ms: EXEC_TIMEOUT_MAX_MS + 1,
            ..good.clone()
        };
        let msg = check_exec(&bad).expect_err("bad").to_string();
        for field in [
            "start.command: must be set",
            "start.working_dir",
            "start.terminal_size.rows",
            "start.timeout_ms",
        ] {
            assert!(msg.contains(field), "{field} in {msg}");
        }
        let nul = pb::ExecStart {
            command: vec!["a\0b".into()],
            ..good
        };
        assert!(
            check_exec(&nul)
                .expect_err("nul")
                .to_string()
                .contains("start.command[0]: contains a NUL byte")
        );
    }
}
