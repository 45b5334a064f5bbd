//! `berth bench create --batch N`: one worker's loop with the batch calls. Each round
//! sends one `CreateSandboxes` of N items (each with its own request id), then deletes the
//! worker's oldest sandboxes past `--keep` with `DeleteSandboxes` calls of up to N ids, so
//! the live count stays steady as in the one-call-per-create mode: N deletes per N creates.
//!
//! Latency is per call, from its send (or its scheduled send under `--rate`) to its answer;
//! every item of a call is answered with the call, so an item's latency is its call's.

use std::collections::VecDeque;

use berth_proto::pb::v1 as pb;
use berth_scheduler::service::client::Client;

use super::bench_create::{Tally, Worker, bench_spec};

/// Runs `worker` with calls of `batch` items until the end of its window.
pub(super) async fn run(mut worker: Worker, mut client: Client, batch: usize) -> Tally {
    let mut live: VecDeque<String> = VecDeque::new();
    let mut local = Tally::default();
    let mut n = 0u64;
    let w = worker.index;
    while std::time::Instant::now() < worker.end {
        let sent = worker.pace().await;
        let items = (0..batch)
            .map(|_| {
                n += 1;
                pb::CreateSandboxRequest {
                    request_id: format!("bench-{w}-{n}"),
                    spec: Some(bench_spec(n)),
                }
            })
            .collect();
        local.create_calls += 1;
        match client.create_many(items).await {
            Ok(results) => {
                local.latencies_us.push(sent.elapsed().as_micros() as u64);
                for result in results {
                    match result {
                        Ok(created) => {
                            local.creates += 1;
                            if let Some(s) = created.sandbox {
                                live.push_back(s.id);
                            }
                        }
                        Err(e) => local.error("", &e),
                    }
                }
            }
            // The whole call failed: every item counts as an error.
            Err(e) => {
                local.error("", &e);
                local.errors += batch as u64 - 1;
            }
        }
        while live.len() > worker.keep {
            let take = (live.len() - worker.keep).min(batch);
            let ids: Vec<String> = live.drain(..take).collect();
            match client.delete_many(ids).await {
                Ok(results) => {
                    for result in results {
                        match result {
                            Ok(_) => local.deletes += 1,
                            Err(e) => local.error("delete ", &e),
                        }
                    }
                }
                Err(e) => {
                    local.error("delete ", &e);
                    local.errors += take as u64 - 1;
                }
            }
        }
    }
    local
}
