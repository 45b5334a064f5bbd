//! The one place children are waited for. The helper may be the sandbox's pid 1, so it
//! reaps every child, orphans included (`waitpid(-1)`); callers wait for their own pid's
//! status here instead of through `std::process::Child::wait`, which would race it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{WaitOptions, WaitStatus, wait};

/// Statuses of children nobody has claimed yet are kept up to this many (orphans).
const MAX_UNCLAIMED: usize = 4096;

/// How a child ended: its exit code (128 + the signal when killed) and the signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ended {
    pub(crate) code: i32,
    pub(crate) signal: i32,
}

#[derive(Default)]
struct Table {
    ended: HashMap<u32, Ended>,
    order: VecDeque<u32>,
}

/// Collects child statuses.
#[derive(Default)]
pub(crate) struct Reaper {
    table: Mutex<Table>,
    changed: Condvar,
}

impl Reaper {
    /// Reaps forever (run on its own thread).
    pub(crate) fn run(&self) {
        loop {
            match wait(WaitOptions::empty()) {
                Ok(Some((pid, status))) => self.record(pid.as_raw_nonzero().get() as u32, status),
                Ok(None) => {}
                // No children (ECHILD) or interrupted: look again shortly.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn record(&self, pid: u32, status: WaitStatus) {
        let ended = match (status.exit_status(), status.terminating_signal()) {
            (Some(code), _) => Ended { code, signal: 0 },
            (None, Some(sig)) => Ended {
                code: 128 + sig,
                signal: sig,
            },
            (None, None) => return,
        };
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.ended.insert(pid, ended);
        t.order.push_back(pid);
        while t.order.len() > MAX_UNCLAIMED {
            if let Some(old) = t.order.pop_front() {
                t.ended.remove(&old);
            }
        }
        self.changed.notify_all();
    }

    /// Waits for `pid` to end, until `deadline` if one is given (`None` when it passed).
    pub(crate) fn wait_for(&self, pid: u32, deadline: Option<Instant>) -> Option<Ended> {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(e) = t.ended.remove(&pid) {
                t.order.retain(|p| *p != pid);
                return Some(e);
            }
            let wait = match deadline {
                Some(d) => d.checked_duration_since(Instant::now())?,
                None => Duration::from_secs(3600),
            };
            t = self
                .changed
                .wait_timeout(t, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}
