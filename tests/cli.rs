//! The `berth` binary as an operator uses it: help, config checking, exit codes.

use std::path::Path;
use std::process::{Command, Output};

fn berth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .output()
        .expect("run berth")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_every_subcommand() {
    let out = berth(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for sub in [
        "scheduler",
        "agent",
        "autoscaler",
        "dev",
        "sim",
        "sandbox",
        "node",
        "cluster",
        "bench",
        "config",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(sub)),
            "{sub} missing from:\n{help}"
        );
    }
    assert!(help.contains("--log-level") && help.contains("--log-format"));
}

/// The example configs copied into `dir` with their `/etc/berth/tls/` files made by a CA
/// of the file's cluster (berth-dev for dev.toml, berth-prod for the rest).
fn examples_with_certificates(dir: &Path) -> Vec<String> {
    use berth_net::tls::pki::LocalPki;
    let mut pkis = std::collections::BTreeMap::new();
    for cluster in ["berth-dev", "berth-prod"] {
        let pki = LocalPki::create(&dir.join(cluster), cluster).expect("pki");
        for role in [
            "replica/1",
            "node/aws-use1-p5-0001",
            "node/local-h100-0",
            "autoscaler/main",
        ] {
            pki.issue(role).expect("issue");
        }
        pkis.insert(cluster, pki);
    }
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read_dir").flatten() {
            if e.path().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
            }
        }
    };
    copy(
        Path::new("deploy/examples/inventories"),
        &dir.join("inventories"),
    );
    let mut out = Vec::new();
    for e in std::fs::read_dir("deploy/examples")
        .expect("deploy/examples")
        .flatten()
    {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let cluster = if e.file_name() == "dev.toml" {
            "berth-dev"
        } else {
            "berth-prod"
        };
        let text = std::fs::read_to_string(&path).expect("read");
        let tls_dir = format!("{}/", pkis[cluster].dir.display());
        let target = dir.join(e.file_name());
        std::fs::write(&target, text.replace("/etc/berth/tls/", &tls_dir)).expect("write");
        out.push(target.display().to_string());
    }
    out
}

#[test]
fn example_configs_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut examples = examples_with_certificates(dir.path());
    examples.sort();
    assert!(examples.len() >= 4, "{examples:?}");
    let mut args = vec!["config", "check"];
    args.extend(examples.iter().map(String::as_str));
    let out = berth(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), examples.len());
}

#[test]
fn a_config_with_two_mistakes_names_both_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[scheduler]\nnode_id = 1\nlisten_address = \"no-port\"\n\n[scheduler.raft]\nelection_ticks = 1\nheartbeat_ticks = 1\n",
    )
    .expect("write");
    let examples = examples_with_certificates(dir.path());
    let good_path = examples
        .iter()
        .find(|p| p.ends_with("/scheduler.toml"))
        .expect("scheduler.toml")
        .clone();
    let good = Path::new(&good_path);
    let out = berth(&[
        "config",
        "check",
        good.to_str().expect("utf-8"),
        bad.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("scheduler.listen_address: \"no-port\" is not a host:port address"),
        "{stderr}"
    );
    assert!(
        stderr
            .contains("scheduler.raft.election_ticks: 1 must be greater than heartbeat_ticks (1)"),
        "{stderr}"
    );
    assert!(stderr.contains("1 of 2 config files invalid"), "{stderr}");
    // The good file is still reported as good.
    assert!(text(&out.stdout).contains("scheduler.toml: ok (scheduler)"));
}

#[test]
fn a_typo_in_a_field_name_is_refused_with_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, "[agent]\nnode_id = \"a\"\nregoin = \"us-east-1\"\n").expect("write");
    let out = berth(&["config", "check", path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("unknown field `regoin`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_agent_without_runsc_says_how_to_fix_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[agent]\nnode_id = \"n1\"\nruntime = \"gvisor\"\nrunsc_path = \"/nonexistent/runsc\"\n\
         [agent.tls]\ninsecure = true\n",
    )
    .expect("write");
    let out = berth(&["agent", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("agent.runsc_path"), "{err}");
    assert!(err.contains("apt-get install runsc"), "{err}");
    assert!(err.contains("runtime = \"process\""), "{err}");
}

#[test]
fn scheduler_with_a_missing_config_names_the_file() {
    let out = berth(&["scheduler", "--config", "/nonexistent/berth.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("/nonexistent/berth.toml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn cluster_status_against_nothing_fails_clearly() {
    let out = berth(&[
        "cluster",
        "status",
        "--endpoint",
        "127.0.0.1:1",
        "--timeout",
        "1s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("berth cluster:"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_bad_log_filter_is_a_usage_error() {
    for filter in ["loud", "info,[=x"] {
        let out = berth(&[
            "--log-level",
            filter,
            "config",
            "check",
            "deploy/examples/dev.toml",
        ]);
        assert_eq!(out.status.code(), Some(2), "{filter}");
        assert!(
            text(&out.stderr).contains("--log-level"),
            "{}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "nothing runs after a usage error");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let examples = examples_with_certificates(dir.path());
    let dev = examples
        .iter()
        .find(|p| p.ends_with("/dev.toml"))
        .expect("dev.toml");
    let out = berth(&["--log-level", "warn,berth=debug", "config", "check", dev]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn sim_openb_prints_the_documented_json() {
    let dir = std::env::var("BERTH_OPENB_DIR").unwrap_or_else(|_| "../shared/data/openb".into());
    let pods = format!("{dir}/openb_pod_list_multigpu20.csv");
    let out = berth(&[
        "sim", "openb", "--pods", &pods, "--policy", "bestfit", "--seeds", "42", "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(json["policy"], "bestfit");
    assert!(
        json["mean_unallocated_pct_at_100"]
            .as_f64()
            .is_some_and(|v| (0.0..100.0).contains(&v))
    );
    let table = berth(&[
        "sim", "openb", "--pods", &pods, "--policy", "bestfit", "--seeds", "42",
    ]);
    assert!(text(&table.stdout).contains("published (FGD paper, unallocated @100%)"));
}

#[test]
fn sim_openb_rejects_bad_arguments_clearly() {
    let out = berth(&["sim", "openb", "--pods", "nowhere.csv", "--policy", "best"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unknown policy \"best\""),
        "{}",
        text(&out.stderr)
    );
    let out = berth(&["sim", "openb", "--pods", "nowhere.csv", "--seeds", "9..3"]);
    assert!(
        text(&out.stderr).contains("empty range"),
        "{}",
        text(&out.stderr)
    );
    let out = berth(&["sim", "openb", "--pods", "nowhere.csv"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("nowhere"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bench_place_prints_latency_json() {
    let out = berth(&[
        "bench",
        "place",
        "--nodes",
        "300",
        "--sandboxes",
        "2000",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in ["nodes", "policy", "p50_us", "p99_us", "placements_per_s"] {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
    assert!(
        json.get("image_hit_pct").is_none(),
        "no images asked: {json}"
    );
    assert_eq!(json["nodes"], 300);
    assert!(
        json["placed"].as_u64().is_some_and(|n| n > 1000),
        "most of the mix fits a half-full pool: {json}"
    );
}

#[test]
fn sim_images_reports_each_rule_of_one_run() {
    let out = berth(&[
        "sim",
        "images",
        "--nodes",
        "200",
        "--seeds",
        "1",
        "--rules",
        "off,on,bonus:10",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.contains("hit rate") && table.contains("nodes used @50%"),
        "{table}"
    );
    for rule in ["off ", "tie-break ", "bonus:10 "] {
        assert!(
            table.lines().any(|l| l.starts_with(rule)),
            "{rule}in:\n{table}"
        );
    }
    let out = berth(&["sim", "images", "--nodes", "200", "--seeds", "1", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(json["rules"][0]["rule"], "off");
    assert_eq!(json["rules"][1]["rule"], "tie-break");
    let out = berth(&["sim", "images", "--rules", "off,sometimes"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unknown image rule \"sometimes\""),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bench_place_with_images_reports_the_hit_rate() {
    let out = berth(&[
        "bench",
        "place",
        "--nodes",
        "300",
        "--sandboxes",
        "2000",
        "--images",
        "50",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(
        json["image_hit_pct"]
            .as_f64()
            .is_some_and(|p| p > 0.0 && p <= 100.0),
        "{json}"
    );
}

#[test]
fn sim_chaos_runs_seeds_and_reports_them() {
    let out = berth(&["sim", "chaos", "--seeds", "3", "--start", "100", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(report["seeds"], 3);
    assert_eq!(report["failed_seeds"], serde_json::json!([]));
    assert!(
        report["acked_creates"].as_u64().unwrap_or(0) > 100,
        "{report}"
    );
    assert!(report["crashes"].as_u64().unwrap_or(0) > 0, "{report}");
}

#[test]
fn sandbox_create_refuses_a_bad_gpu_spec_naming_the_flag() {
    for spec in ["H100:0", "H100:two", "H100,H100"] {
        let out = berth(&["sandbox", "create", "--gpu", spec, "--", "true"]);
        assert_eq!(out.status.code(), Some(2), "{spec}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("--gpu"),
            "{spec}: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "nothing runs after a usage error");
    }
}

#[test]
fn sandbox_create_refuses_a_bad_memory_size_naming_the_flag() {
    for size in ["lots", "0", "2g"] {
        let out = berth(&["sandbox", "create", "--memory", size, "--", "true"]);
        assert_eq!(out.status.code(), Some(2), "{size}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("--memory"),
            "{size}: {}",
            text(&out.stderr)
        );
    }
    let out = berth(&["sandbox", "create", "--cpu", "0", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--cpu"), "{}", text(&out.stderr));
}

#[test]
fn sandbox_and_node_commands_against_nothing_fail_clearly() {
    for command in [&["sandbox", "list"][..], &["node", "list"][..]] {
        let mut args = command.to_vec();
        args.extend(["--endpoint", "127.0.0.1:1", "--timeout", "1s", "--insecure"]);
        let started = std::time::Instant::now();
        let out = berth(&args);
        assert_eq!(out.status.code(), Some(1), "{command:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&format!("berth {}:", command[0]))
                && stderr.contains("cannot reach the cluster at 127.0.0.1:1"),
            "{command:?}: {stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "{command:?}: no table without a cluster"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{command:?} kept retrying past --timeout"
        );
    }
}

#[test]
fn sim_run_writes_the_report_and_sim_compare_prints_both() {
    let dir = tempfile::tempdir().expect("tmp");
    let scenario = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("simulations/scenarios/h100-stockout-failover.toml");
    let body = std::fs::read_to_string(&scenario)
        .expect("scenario")
        .replace("duration_h = 12.0", "duration_h = 3.0");
    let small = dir.path().join("small.toml");
    std::fs::write(&small, body).expect("write");
    let out = dir.path().join("out");
    let run = berth(&[
        "sim",
        "run",
        small.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
        "--seed",
        "9",
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let stdout = text(&run.stdout);
    assert!(
        stdout.contains("h100-stockout-failover: 3 simulated hours"),
        "{stdout}"
    );
    assert!(stdout.contains("lower bound"), "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary"))
            .expect("json");
    for key in [
        "peak_concurrent_sandboxes",
        "wait_p50_s",
        "wait_p99_s",
        "cost_usd",
        "cost_lower_bound_usd",
    ] {
        assert!(summary.get(key).is_some(), "{key} missing: {summary}");
    }
    assert_eq!(summary["seed"], 9);

    let compare = berth(&[
        "sim",
        "compare",
        small.to_str().expect("utf-8"),
        small.to_str().expect("utf-8"),
        "--out",
        dir.path().join("cmp").to_str().expect("utf-8"),
    ]);
    assert!(compare.status.success(), "{}", text(&compare.stderr));
    assert!(text(&compare.stdout).contains("cost / lower bound"));
    assert!(dir.path().join("cmp/B/report.html").exists());

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[scenario]\nname = \"x\"\n[workload]\nkind = \"poisson\"\npeak_concurrent = 0\n[autoscaler]\n").expect("write");
    let refused = berth(&["sim", "run", bad.to_str().expect("utf-8")]);
    assert_eq!(refused.status.code(), Some(1));
    let err = text(&refused.stderr);
    assert!(
        err.contains("workload.peak_concurrent: 0 is outside"),
        "{err}"
    );
    assert!(
        err.contains("workload.mix: needs at least one entry"),
        "{err}"
    );
}

#[test]
fn dev_refuses_an_unknown_only_node_before_starting_anything() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("dev");
    let out = berth(&[
        "dev",
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--only-node",
        "bogus",
        "--no-autoscaler",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--only-node bogus: no such dev node (there are aws-use1-p5-0,"),
        "{err}"
    );
    assert!(!err.contains("replica started"), "{err}");
    assert!(!data.exists(), "nothing was written");
}

#[test]
fn without_credentials_a_cluster_command_says_where_it_looked() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["sandbox", "list", "--endpoint", "127.0.0.1:1"])
        .current_dir(dir.path())
        .env("HOME", dir.path())
        .env_remove("BERTH_CREDENTIALS")
        .env_remove("BERTH_TOKEN")
        .output()
        .expect("run berth");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("berth sandbox: no credentials: pass --credentials FILE")
            && err.contains("~/.config/berth/credentials.toml")
            && err.contains("--insecure"),
        "{err}"
    );
}

#[test]
fn cert_makes_a_ca_issues_identities_and_shows_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let ca = dir.path().join("ca");
    let ca_arg = ca.to_str().expect("utf-8");
    let out = berth(&["cert", "ca", "--dir", ca_arg, "--cluster", "prod"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ca.key (owner-only"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(ca.join("ca.key"))
        .expect("ca.key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the CA key is owner-only");
    // A second CA over the first is refused: it would orphan every certificate.
    let again = berth(&["cert", "ca", "--dir", ca_arg, "--cluster", "prod"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("refusing to replace the cluster's root of trust"),
        "{}",
        text(&again.stderr)
    );
    let creds = dir.path().join("creds.toml");
    let out = berth(&[
        "cert",
        "issue",
        "--dir",
        ca_arg,
        "admin/alice",
        "--ttl",
        "2d",
        "--credentials",
        creds.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("identity:    spiffe://prod/admin/alice"),
        "{}",
        text(&out.stdout)
    );
    let written = std::fs::read_to_string(&creds).expect("credentials file");
    assert!(written.contains("admin-alice.pem"), "{written}");
    let out = berth(&[
        "cert",
        "show",
        ca.join("admin-alice.pem").to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("spiffe://prod/admin/alice, valid, from"),
        "{}",
        text(&out.stdout)
    );
    let bad = berth(&["cert", "issue", "--dir", ca_arg, "wizard/merlin"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("wizard"),
        "{}",
        text(&bad.stderr)
    );
}
