//! Subcommands with more than a few lines of their own.

use std::fmt;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tonic::{Code, Status};

use berth_scheduler::service::client::Client;

use crate::exit::EXIT_FAILURE;

pub(crate) mod agent;
pub(crate) mod autoscaler;
pub(crate) mod bench;
pub(crate) mod bench_autoscale;
pub(crate) mod bench_burst;
pub(crate) mod bench_create;
mod bench_create_batch;
mod bench_dev;
pub(crate) mod bench_etcd;
pub(crate) mod bench_exec;
pub(crate) mod bench_failover;
pub(crate) mod bench_fleet;
pub(crate) mod bench_pool;
pub(crate) mod bench_resume;
mod bench_resume_bare;
pub(crate) mod cert;
pub(crate) mod cluster;
pub(crate) mod dev;
pub(crate) mod fleet_emulator;
mod fleet_probe;
mod fleet_stats;
pub(crate) mod node;
pub(crate) mod pool;
pub(crate) mod sandbox;
pub(crate) mod scheduler;
pub(crate) mod sim;
pub(crate) mod sim_images;
pub(crate) mod sim_run;
pub(crate) mod token;

/// Parses a duration such as `10s`, `500ms`, `1m`, `24h` or `30d` (a bare number is
/// seconds).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |i| text.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 10s, 500ms or 1m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3_600)),
        "d" => Duration::from_secs(n.saturating_mul(86_400)),
        _ => return Err(format!("{text:?}: unit must be ms, s, m, h or d")),
    };
    if d.is_zero() {
        return Err("the duration must be positive".into());
    }
    Ok(d)
}

/// Runs `work` on a multi-threaded runtime; a failure to start the runtime or of `work`
/// prints `berth <name>: <why>` and comes back as exit code 1.
pub(crate) fn block_on<T, E: fmt::Display>(
    name: &str,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("berth {name}: starting the runtime: {e}");
            ExitCode::from(EXIT_FAILURE)
        })?;
    runtime.block_on(work).map_err(|e| {
        eprintln!("berth {name}: {e}");
        ExitCode::from(EXIT_FAILURE)
    })
}

/// Runs a long-lived role (`scheduler`, `agent`, `dev`) on a multi-threaded runtime until
/// it returns: exit 0 when it ends well, 1 with `berth <name>: <why>` otherwise.
pub(crate) fn run_service<E: fmt::Display>(
    name: &str,
    service: impl std::future::Future<Output = Result<(), E>>,
) -> ExitCode {
    match block_on(name, service) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

/// Where the cluster commands (`cluster`, `sandbox`, `node`) find the cluster and how they
/// print.
#[derive(Debug, Args)]
pub(crate) struct Endpoint {
    /// Scheduler replicas (host:port, comma-separated or repeated); any one will do.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "127.0.0.1:7070",
        env = "BERTH_ENDPOINT"
    )]
    pub(crate) endpoint: Vec<String>,
    /// Credentials file: CA, client certificate and key, optional token (berth dev writes
    /// berth-data/dev/credentials.toml; default: that, then ~/.config/berth/credentials.toml).
    #[arg(long, global = true, env = "BERTH_CREDENTIALS")]
    pub(crate) credentials: Option<std::path::PathBuf>,
    /// API token (tenant or admin) sent as `authorization: Bearer`; replaces the file's.
    #[arg(long, global = true, env = "BERTH_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Plaintext, no certificate: for a cluster that runs with tls.insecure = true.
    #[arg(long, global = true)]
    pub(crate) insecure: bool,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Text)]
    pub(crate) output: Output,
}

impl Endpoint {
    /// Whether `-o json` was asked for.
    pub(crate) fn json(&self) -> bool {
        matches!(self.output, Output::Json)
    }
}

/// How long one call to the cluster keeps retrying.
#[derive(Debug, Args)]
pub(crate) struct CallTimeout {
    /// How long to keep retrying (leader changes, unreachable replicas), e.g. 5s.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    pub(crate) timeout: Duration,
}

/// How long a call keeps retrying where a command has no `--timeout` of its own for it
/// (`sandbox create`, whose `--timeout` is the sandbox's).
pub(crate) const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Output formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Output {
    /// For people.
    Text,
    /// One JSON value.
    Json,
}

/// Runs `body` with a client of the cluster on a single-threaded runtime. A failed call
/// prints `berth <name>: <why>` and exits 1; otherwise `body` chooses the exit code.
pub(crate) fn with_client(
    name: &str,
    endpoint: &Endpoint,
    timeout: Duration,
    body: impl AsyncFnOnce(&mut Client) -> Result<ExitCode, Status>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth {name}: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let client = crate::credentials::resolve(
        endpoint.credentials.as_deref(),
        endpoint.token.as_deref(),
        endpoint.insecure,
    )
    .and_then(|c| Client::new(endpoint.endpoint.clone()).with_credentials(c));
    let mut client = match client {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth {name}: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    client.deadline = timeout;
    match runtime.block_on(body(&mut client)) {
        Ok(code) => code,
        Err(status) => {
            eprintln!("berth {name}: {}", describe_failure(&status, &client));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// A failed call in words: an unreachable cluster says so and names what was tried;
/// anything else is the server's message with its code and the replica that answered.
fn describe_failure(status: &Status, client: &Client) -> String {
    // A status made on this side from a transport error keeps that error as its source;
    // one a server sent has none.
    let transport = std::error::Error::source(status).is_some();
    if status.code() == Code::Unavailable && transport {
        format!(
            "cannot reach the cluster at {} within {:?} ({}); is a scheduler running there? \
             (--endpoint, BERTH_ENDPOINT)",
            client.endpoints().join(","),
            client.deadline,
            status.message()
        )
    } else {
        format!(
            "{} ({:?}) via {}",
            status.message(),
            status.code(),
            client.current()
        )
    }
}

/// Writes command output to stdout. A closed stdout (`berth sandbox list | head`) ends
/// the output quietly instead of panicking the way `println!` does.
pub(crate) fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// A text table whose column widths follow its content.
#[derive(Debug, Default)]
pub(crate) struct Table {
    headers: Vec<&'static str>,
    right_aligned: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers, all columns left-aligned.
    pub(crate) fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            right_aligned: vec![false; headers.len()],
            rows: Vec::new(),
        }
    }

    /// Right-aligns a column (numbers).
    pub(crate) fn right_align(mut self, column: usize) -> Table {
        if let Some(r) = self.right_aligned.get_mut(column) {
            *r = true;
        }
        self
    }

    /// Adds a row; missing cells are empty, extra cells are dropped.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cell = |row: &[String], i: usize| row.get(i).map_or("", String::as_str).to_owned();
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        let lines: Vec<&[String]> = std::iter::once(header.as_slice())
            .chain(self.rows.iter().map(Vec::as_slice))
            .collect();
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|i| {
                lines
                    .iter()
                    .map(|l| cell(l, i).chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for line in lines {
            let mut out = String::new();
            for (i, width) in widths.iter().enumerate() {
                let text = cell(line, i);
                let pad = " ".repeat(width - text.chars().count());
                if i > 0 {
                    out.push_str("  ");
                }
                if self.right_aligned[i] {
                    out.push_str(&pad);
                    out.push_str(&text);
                } else {
                    out.push_str(&text);
                    out.push_str(&pad);
                }
            }
            writeln!(f, "{}", out.trim_end())?;
        }
        Ok(())
    }
}

/// A protobuf enum value for people: `running` for `SANDBOX_STATE_RUNNING` (`name` is the
/// generated `as_str_name`, `prefix` what to drop), `unknown(7)` for a value this build
/// does not know.
pub(crate) fn enum_label<E: TryFrom<i32>>(
    raw: i32,
    name: fn(&E) -> &'static str,
    prefix: &str,
) -> String {
    match E::try_from(raw) {
        Ok(value) => {
            let name = name(&value);
            name.strip_prefix(prefix)
                .unwrap_or(name)
                .to_ascii_lowercase()
        }
        Err(_) => format!("unknown({raw})"),
    }
}

/// Milli-cores as cores: 500 → `0.5`, 16000 → `16`.
pub(crate) fn format_cores(milli: u64) -> String {
    let whole = milli / 1000;
    let fraction = milli % 1000;
    if fraction == 0 {
        whole.to_string()
    } else {
        let digits = format!("{fraction:03}");
        format!("{whole}.{}", digits.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_fit_their_widest_cell() {
        let mut table = Table::new(&["ID", "ROLE", "MATCH"]).right_align(2);
        table.row(vec!["1".into(), "leader".into(), "12".into()]);
        table.row(vec!["20".into(), "follower".into(), "7".into()]);
        assert_eq!(
            table.to_string(),
            "ID  ROLE      MATCH\n1   leader       12\n20  follower      7\n"
        );
        // Widths count characters, not bytes.
        let mut table = Table::new(&["GPUS", "X"]);
        table.row(vec!["2×H100".into(), "y".into()]);
        assert_eq!(table.to_string(), "GPUS    X\n2×H100  y\n");
    }

    #[test]
    fn labels_and_cores() {
        assert_eq!(
            enum_label(
                berth_proto::pb::v1::SandboxState::Running as i32,
                berth_proto::pb::v1::SandboxState::as_str_name,
                "SANDBOX_STATE_"
            ),
            "running"
        );
        assert_eq!(
            enum_label(
                99,
                berth_proto::pb::v1::SandboxState::as_str_name,
                "SANDBOX_STATE_"
            ),
            "unknown(99)"
        );
        assert_eq!(format_cores(500), "0.5");
        assert_eq!(format_cores(16_000), "16");
        assert_eq!(format_cores(3_250), "3.25");
        assert_eq!(format_cores(1), "0.001");
    }
}
