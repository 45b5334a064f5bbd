//! Interactive sandboxes on `berth dev` (gVisor), through the `berth` CLI as a user drives
//! them: a long-lived sandbox from an image in a real registry, many execs into it (state
//! kept between them, stdin, exit codes, a killed client killing its command), files in
//! and out with paths kept inside the sandbox, and the idle and session limits.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_node_agent::image::testing::TestRegistry;

mod common;
use common::sandboxes::{create, exec, gvisor_dev, push_busybox, wait_for_state};
use common::{BERTH, Dev, text};

#[test]
fn a_long_lived_sandbox_takes_execs_and_files_and_ends_at_its_limits() {
    let registry = TestRegistry::start().expect("docker-registry (scripts/test installs it)");
    let reference = push_busybox(&registry, "berth-exec-busybox");
    let dir = tempfile::tempdir().expect("tmp");
    let dev = gvisor_dev(dir.path(), &registry, &[]);
    let id = create(
        &dev,
        &["--image", &reference, "--keep-alive", "--memory", "512Mi"],
    );
    let (state, reason) = wait_for_state(&dev, &id, "running", Duration::from_secs(60));
    let logs = dev.berth(&["sandbox", "logs", &id]);
    assert_eq!(
        state,
        "running",
        "{reason}\n{}{}\n{}",
        text(&logs.stdout),
        text(&logs.stderr),
        dev.log_tail()
    );

    // Exec into a sandbox that is not running yet answers with its state; here, one that
    // has ended.
    let ended = create(&dev, &["--image", &reference, "--", "true"]);
    wait_for_state(&dev, &ended, "exited", Duration::from_secs(60));
    let out = exec(&dev, &ended, &["true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is exited, not running"),
        "{}",
        text(&out.stderr)
    );

    // 100 execs in a row; each sees what the one before wrote.
    for i in 0..100 {
        let script = format!("echo {i} >> /tmp/seen; wc -l < /tmp/seen; exit {}", i % 5);
        let out = exec(&dev, &id, &["sh", "-c", &script]);
        assert_eq!(
            out.status.code(),
            Some(i % 5),
            "exec {i}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout).trim(), (i + 1).to_string(), "exec {i}");
    }

    // stdin, an exit code, a program that is not there.
    let mut cat = Command::new(BERTH)
        .args([
            "sandbox",
            "exec",
            "--endpoint",
            &dev.endpoint,
            "--credentials",
            dev.credentials.to_str().expect("utf-8"),
            &id,
            "--",
            "cat",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    cat.stdin
        .take()
        .expect("stdin")
        .write_all(b"abc")
        .expect("write");
    let out = cat.wait_with_output().expect("cat");
    assert_eq!(text(&out.stdout), "abc");
    assert_eq!(
        exec(&dev, &id, &["sh", "-c", "exit 7"]).status.code(),
        Some(7)
    );
    let out = exec(&dev, &id, &["no-such-program"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));

    // A client killed mid-exec takes its command with it.
    let mut sleeper = Command::new(BERTH)
        .args(["sandbox", "exec", "--endpoint", &dev.endpoint, &id, "--"])
        .args(["sh", "-c", "echo $$ > /tmp/sleeper; exec sleep 1000"])
        .env("BERTH_CREDENTIALS", &dev.credentials)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let alive = |dev: &Dev| {
        let out = exec(
            dev,
            &id,
            &["sh", "-c", "kill -0 $(cat /tmp/sleeper) && echo alive"],
        );
        text(&out.stdout).contains("alive")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !alive(&dev) {
        assert!(Instant::now() < deadline, "the sleeper never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    sleeper.kill().expect("kill");
    let _ = sleeper.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(&dev) {
        assert!(Instant::now() < deadline, "the sleeper outlived its client");
        std::thread::sleep(Duration::from_millis(100));
    }

    // 50 MiB in and out.
    let big: Vec<u8> = (0..50u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let local = dir.path().join("big.bin");
    std::fs::write(&local, &big).expect("write");
    let inside = format!("{id}:/home/big.bin");
    let out = dev.berth(&[
        "sandbox",
        "cp",
        local.to_str().expect("utf8"),
        &inside,
        "--parents",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let back = dir.path().join("back.bin");
    let out = dev.berth(&["sandbox", "cp", &inside, back.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        std::fs::read(&back).expect("back") == big,
        "the copy differs"
    );
    let out = exec(&dev, &id, &["sh", "-c", "wc -c < /home/big.bin"]);
    assert_eq!(text(&out.stdout).trim(), (50u32 << 20).to_string());

    // Paths stay inside: `..` is refused at the door, a symlink out when followed.
    let out = dev.berth(&["sandbox", "cp", &format!("{id}:/tmp/../etc/passwd"), "-"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("path"), "{}", text(&out.stderr));
    exec(
        &dev,
        &id,
        &["ln", "-s", "../../../../../../etc", "/tmp/out"],
    );
    let out = dev.berth(&[
        "sandbox",
        "cp",
        local.to_str().expect("utf8"),
        &format!("{id}:/tmp/out/x"),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("above the sandbox's root"),
        "{}",
        text(&out.stderr)
    );

    // A long-lived sandbox lives until deleted: delete it, so it does not outlive the test
    // (its shim survives dev by design).
    let out = dev.berth(&["sandbox", "delete", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // The idle and session limits end sandboxes, saying which.
    let idle = create(
        &dev,
        &[
            "--image",
            &reference,
            "--keep-alive",
            "--idle-timeout",
            "2s",
        ],
    );
    let (state, reason) = wait_for_state(&dev, &idle, "failed", Duration::from_secs(60));
    assert_eq!(state, "failed", "{reason}");
    assert!(reason.contains("idle_timeout_ms = 2000"), "{reason}");
    let session = create(
        &dev,
        &["--image", &reference, "--keep-alive", "--timeout", "3s"],
    );
    wait_for_state(&dev, &session, "running", Duration::from_secs(60));
    // Activity does not extend a session.
    for _ in 0..4 {
        exec(&dev, &session, &["true"]);
        std::thread::sleep(Duration::from_millis(500));
    }
    let (state, reason) = wait_for_state(&dev, &session, "failed", Duration::from_secs(60));
    assert_eq!(state, "failed", "{reason}");
    assert!(
        reason.contains("session limit (timeout_ms = 3000)"),
        "{reason}"
    );
}
