//! Where a call into a sandbox goes: the agent of the node it is bound to, found in the
//! applied state. A call that needs the sandbox running finds it asleep (Paused or on
//! Standby) and is FAILED_PRECONDITION saying so, unless the sandbox's spec asks for
//! `auto_resume`: then the call resumes it (one `ResumeSandboxes`, as the tenant's own
//! resume would) and waits for it to run, at most [`AUTO_RESUME_WAIT`], polling the local
//! applied state. E2B resumes a paused sandbox on connect in the same way.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::agent_service_client::AgentServiceClient;
use berth_proto::pb::v1::sandbox_service_client::SandboxServiceClient;

use super::{SandboxApi, only_outcome};
use crate::model::{SandboxId, SandboxState};
use crate::service::auth::Access;
use crate::service::{ServiceError, Store};
use crate::state::{Command, ItemOutcome};

/// Longest a call waits for the sandbox it resumed to run (a restore from disk on another
/// node, with its snapshot fetched, takes seconds).
const AUTO_RESUME_WAIT: Duration = Duration::from_secs(60);
/// How often the waiting call looks again.
const POLL: Duration = Duration::from_millis(10);

/// What the state says about a call's sandbox.
enum Lookup {
    /// Its agent's address, its node, and its spec env.
    Ready(String, String, BTreeMap<String, String>),
    /// Not running and `auto_resume`: resume it (`asleep`) or wait for it.
    Resumable { asleep: bool },
    /// FAILED_PRECONDITION with this reason.
    Refused(String),
    /// Not there, or another tenant's.
    Missing,
}

/// The agent and the env a call into a sandbox uses.
pub(super) type Target = (
    String,
    AgentServiceClient<tonic::transport::Channel>,
    BTreeMap<String, String>,
);

impl<S: Store> SandboxApi<S> {
    /// The agent serving sandbox `id`; with `running`, only while the sandbox is Running
    /// (resumed first when its spec says `auto_resume`).
    pub(super) async fn agent_of(
        &self,
        id: SandboxId,
        running: bool,
        access: &Access,
    ) -> Result<(String, AgentServiceClient<tonic::transport::Channel>), ServiceError> {
        self.target_of(id, running, access)
            .await
            .map(|(address, agent, _)| (address, agent))
    }

    /// [`Self::agent_of`], with the sandbox's spec env (what its execs start from).
    pub(super) async fn target_of(
        &self,
        id: SandboxId,
        running: bool,
        access: &Access,
    ) -> Result<Target, ServiceError> {
        let deadline = Instant::now() + AUTO_RESUME_WAIT;
        let mut resumed = false;
        loop {
            match self.lookup(id, running, access, resumed).await? {
                Lookup::Ready(address, node, env) => {
                    let channel = self
                        .agents
                        .get_expecting(&address, Some(berth_net::Expect::Node(node)))
                        .map_err(|e| ServiceError::Precondition(format!("node agent: {e}")))?;
                    return Ok((address, AgentServiceClient::new(channel), env));
                }
                Lookup::Missing => {
                    return Err(ServiceError::NotFound(format!(
                        "sandbox_id: no sandbox {id}"
                    )));
                }
                Lookup::Refused(why) => return Err(ServiceError::Precondition(why)),
                Lookup::Resumable { .. } if Instant::now() > deadline => {
                    return Err(ServiceError::Unavailable(format!(
                        "sandbox_id: {id} was resumed for this call and is not running after {} s; retry",
                        AUTO_RESUME_WAIT.as_secs()
                    )));
                }
                Lookup::Resumable { asleep: true } if !resumed => {
                    self.resume_for_call(id).await?;
                    resumed = true;
                }
                Lookup::Resumable { .. } => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Proposes the resume; a follower asks the leader (as the replica it is: the caller's
    /// tenant was checked here already).
    async fn resume_for_call(&self, id: SandboxId) -> Result<(), ServiceError> {
        let address = match self
            .handle
            .command(Command::ResumeSandboxes { items: vec![id] })
            .await
        {
            Ok(result) => {
                return match only_outcome(result.outcomes)? {
                    ItemOutcome::Rejected(r) => Err(ServiceError::Rejected(r)),
                    _ => Ok(()),
                };
            }
            Err(ServiceError::NotLeader { address, .. }) if !address.is_empty() => address,
            Err(e) => return Err(e),
        };
        let channel = self
            .agents
            .get(&address)
            .map_err(|e| ServiceError::Unavailable(format!("the leader at {address}: {e}")))?;
        SandboxServiceClient::new(channel)
            .resume_sandbox(pb::ResumeSandboxRequest {
                sandbox_id: id.to_string(),
            })
            .await
            .map(|_| ())
            .map_err(|s| match s.code() {
                tonic::Code::ResourceExhausted => ServiceError::Exhausted(s.message().to_owned()),
                tonic::Code::FailedPrecondition => {
                    ServiceError::Precondition(s.message().to_owned())
                }
                _ => ServiceError::Unavailable(format!("the leader at {address}: {}", s.message())),
            })
    }

    async fn lookup(
        &self,
        id: SandboxId,
        running: bool,
        access: &Access,
        resumed: bool,
    ) -> Result<Lookup, ServiceError> {
        let access = access.clone();
        let found = self
            .handle
            .read(false, move |v| {
                // Another tenant's sandbox reads as no sandbox at all.
                let Some(sandbox) = v
                    .state
                    .sandbox(id)
                    .filter(|s| access.covers(&s.spec.tenant))
                else {
                    return Lookup::Missing;
                };
                if running && !matches!(sandbox.state, SandboxState::Running) {
                    let asleep = matches!(
                        sandbox.state,
                        SandboxState::Paused | SandboxState::Standby { .. }
                    );
                    // On its way to sleep, or (once resumed) on its way back.
                    let waking = matches!(sandbox.state, SandboxState::Pausing)
                        || (resumed
                            && matches!(
                                sandbox.state,
                                SandboxState::Pending | SandboxState::Scheduled
                            ));
                    if sandbox.spec.auto_resume && (asleep || waking) {
                        return Lookup::Resumable { asleep };
                    }
                    let hint = if asleep {
                        "; resume it first, or create it with auto_resume"
                    } else {
                        ""
                    };
                    return Lookup::Refused(format!(
                        "sandbox_id: {id} is {}, not running{hint}",
                        sandbox.state.name()
                    ));
                }
                let Some(binding) = &sandbox.binding else {
                    return Lookup::Refused(format!(
                        "sandbox_id: {id} has not been placed on a node yet ({})",
                        sandbox.state.name()
                    ));
                };
                let node = &binding.placement.node;
                match v.state.node(node) {
                    Some(r) if !r.spec.agent_address.is_empty() => Lookup::Ready(
                        r.spec.agent_address.clone(),
                        node.to_string(),
                        sandbox.spec.env.clone(),
                    ),
                    Some(_) => Lookup::Refused(format!("node {node} registered no agent address")),
                    None => Lookup::Refused(format!("node {node} is no longer registered")),
                }
            })
            .await?;
        Ok(found)
    }
}
