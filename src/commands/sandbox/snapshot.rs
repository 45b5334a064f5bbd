//! `sandbox snapshot ID [--reference REF]`: the sandbox's filesystem changes pushed as a new
//! image. Plain output is the pushed reference alone, so `REF=$(berth sandbox snapshot ID)`
//! works; `-o json` (or `--json`) prints the whole result. The phases go to stderr when it
//! is a terminal.

use std::io::IsTerminal;
use std::process::ExitCode;

use tonic::Status;

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::snapshot_sandbox_progress::Message;
use berth_scheduler::service::client::Client;

use super::emit;

/// The result as `-o json` prints it.
fn json_of(id: &str, done: &pb::SnapshotSandboxResponse) -> serde_json::Value {
    serde_json::json!({
        "sandbox_id": id,
        "reference": done.reference,
        "digest": done.digest,
        "layer_bytes": done.layer_bytes,
        "uncompressed_bytes": done.uncompressed_bytes,
        "entries": done.entries,
        "base_reference": done.base_reference,
        "base_digest": done.base_digest,
        "took_ms": done.took_ms,
    })
}

/// Takes the snapshot and prints where it went.
pub(super) async fn snapshot(
    client: &mut Client,
    id: &str,
    reference: &str,
    json: bool,
) -> Result<ExitCode, Status> {
    let mut stream = client.snapshot(id, reference).await?;
    let show_phases = !json && std::io::stderr().is_terminal();
    while let Some(progress) = stream.message().await? {
        match progress.message {
            Some(Message::Phase(phase)) if show_phases => eprintln!("{id}: {phase}"),
            Some(Message::Done(done)) => {
                if json {
                    emit(&format!("{}\n", json_of(id, &done)));
                } else {
                    emit(&format!("{}\n", done.reference));
                }
                return Ok(ExitCode::SUCCESS);
            }
            _ => {}
        }
    }
    Err(Status::unavailable(
        "the snapshot's stream ended without a result (the replica or the node went away); \
         run it again",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_every_field() {
        let done = pb::SnapshotSandboxResponse {
            reference: "r:1".into(),
            digest: "sha256:aa".into(),
            layer_bytes: 3,
            ..Default::default()
        };
        let v = json_of("sbx-1", &done);
        assert_eq!(v["reference"], "r:1");
        assert_eq!(v["digest"], "sha256:aa");
        assert_eq!(v["layer_bytes"], 3);
        assert_eq!(v["sandbox_id"], "sbx-1");
    }
}
