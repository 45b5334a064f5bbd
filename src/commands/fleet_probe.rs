//! What `berth bench fleet` reads from outside the processes it measures: `/proc` (RSS
//! and CPU time), `/metrics`, directory sizes, and the fleet emulator's report lines.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::fleet_stats::{Percentiles, Report, Span};

/// A process's resident memory and CPU time so far.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProcSample {
    /// Resident set size, bytes.
    pub(crate) rss_bytes: u64,
    /// User + system CPU time, seconds.
    pub(crate) cpu_s: f64,
}

/// Reads `/proc/PID/status` and `/proc/PID/stat`; zeros when the process is gone.
pub(crate) fn sample(pid: u32) -> ProcSample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces, inside parentheses).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let hz = 100.0;
    ProcSample {
        rss_bytes: rss_kib * 1_024,
        cpu_s: (ticks(11) + ticks(12)) as f64 / hz,
    }
}

/// `GET /metrics` at `address`: series (with labels) → value.
pub(crate) fn scrape(address: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(mut s) = std::net::TcpStream::connect(address) else {
        return out;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    for line in text.lines().filter(|l| l.starts_with("berth_")) {
        if let Some((name, value)) = line.rsplit_once(' ') {
            if let Ok(v) = value.parse::<f64>() {
                out.insert(name.to_owned(), v);
            }
        }
    }
    out
}

/// Bytes of the files under `dir`.
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

/// A running `berth fleet-emulator` and its latest report.
pub(crate) struct Emulator {
    child: Child,
    latest: Arc<Mutex<Option<Report>>>,
    span: Arc<Mutex<Span>>,
}

impl Emulator {
    /// Starts `binary fleet-emulator ARGS`.
    pub(crate) fn start(binary: &Path, args: &[String]) -> Result<Emulator, String> {
        let mut child = Command::new(binary)
            .arg("fleet-emulator")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting the fleet emulator: {e}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or("the fleet emulator has no stdout")?;
        let latest = Arc::new(Mutex::new(None));
        let span = Arc::new(Mutex::new(Span::default()));
        let (sink, span_sink) = (latest.clone(), span.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Ok(report) = serde_json::from_str::<Report>(&line) {
                    if let Ok(mut s) = span_sink.lock() {
                        s.add(&report);
                    }
                    if let Ok(mut l) = sink.lock() {
                        *l = Some(report);
                    }
                }
            }
        });
        Ok(Emulator {
            child,
            latest,
            span,
        })
    }

    /// Latencies reported since the last call (or the start).
    pub(crate) fn take_span(&self) -> Percentiles {
        self.span
            .lock()
            .map(|mut s| std::mem::take(&mut *s).percentiles())
            .unwrap_or_default()
    }

    /// The emulator's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The latest report (default before the first).
    pub(crate) fn latest(&self) -> Report {
        self.latest
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .unwrap_or_default()
    }

    /// Waits until `done` holds for a report, printing progress every few seconds; the
    /// report that satisfied it, or an error naming `what` after `timeout`.
    pub(crate) async fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Report) -> bool,
        progress: impl Fn(&Report) -> String,
    ) -> Result<(Report, Duration), String> {
        let started = Instant::now();
        let mut shown = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("the fleet emulator exited ({status}) while {what}"));
            }
            let r = self.latest();
            if done(&r) {
                return Ok((r, started.elapsed()));
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "{what}: not done after {} s ({})",
                    timeout.as_secs(),
                    progress(&r)
                ));
            }
            if shown.elapsed() >= Duration::from_secs(5) {
                eprintln!("  {what}: {}", progress(&r));
                shown = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `berth` binary running now.
pub(crate) fn berth_binary() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("locating berth: {e}"))
}
