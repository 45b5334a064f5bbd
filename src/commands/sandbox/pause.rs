//! `sandbox pause` and `sandbox resume`: the call answers once the change is recorded; the
//! command then waits (polling `GetSandbox`) until the node has taken the snapshot or the
//! sandbox runs again, and prints where it ended up.

use std::process::ExitCode;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::SandboxState;
use berth_scheduler::service::client::Client;

use super::emit;
use super::show::{sandbox_json, state, state_label, status};
use crate::exit::EXIT_FAILURE;

/// How long a pause or resume may take before the command gives up waiting (the sandbox
/// goes on; `sandbox get` shows where it is).
const SETTLE_LIMIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(50);

/// What the command waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Goal {
    Paused,
    Standby,
    Running,
}

/// Waits until `sandbox` reaches `goal` (unless `no_wait`), then prints it.
pub(super) async fn settle(
    client: &mut Client,
    mut sandbox: pb::Sandbox,
    goal: Goal,
    no_wait: bool,
    json: bool,
) -> Result<ExitCode, Status> {
    let started = Instant::now();
    let target = match goal {
        Goal::Paused => SandboxState::Paused,
        Goal::Standby => SandboxState::Standby,
        Goal::Running => SandboxState::Running,
    };
    while !no_wait && state(&sandbox) != target && started.elapsed() < SETTLE_LIMIT {
        let s = state(&sandbox);
        let on_the_way = match goal {
            Goal::Paused => s == SandboxState::Pausing,
            // Recorded at once; the node freezes it as it is told.
            Goal::Standby => false,
            Goal::Running => matches!(s, SandboxState::Pending | SandboxState::Scheduled),
        };
        if !on_the_way {
            break;
        }
        tokio::time::sleep(POLL).await;
        sandbox = client.get(&sandbox.id).await?;
    }
    let reached = state(&sandbox) == target;
    if json {
        emit(&format!("{}\n", sandbox_json(&sandbox)));
    } else {
        let st = status(&sandbox);
        let mut line = format!("{} {}", sandbox.id, state_label(st.state));
        if !st.node_id.is_empty() {
            line.push_str(&format!(" on {}", st.node_id));
        }
        if !st.reason.is_empty() {
            line.push_str(&format!(": {}", st.reason));
        }
        if let Some(summary) = st
            .explanation
            .as_ref()
            .map(|e| &e.summary)
            .filter(|s| !s.is_empty())
        {
            line.push_str(&format!(" ({summary})"));
        }
        let took = started.elapsed().as_millis();
        if reached && !no_wait {
            line.push_str(&format!(" in {took} ms"));
        }
        emit(&format!("{line}\n"));
    }
    if no_wait || reached {
        Ok(ExitCode::SUCCESS)
    } else {
        if !json {
            eprintln!(
                "error: sandbox {} is {} rather than {}",
                sandbox.id,
                state_label(status(&sandbox).state),
                state_label(target as i32)
            );
        }
        Ok(ExitCode::from(EXIT_FAILURE))
    }
}
