//! Test support: OCI images built from the host's static busybox, pushed to a real
//! registry (Debian's `docker-registry`, started here on loopback) whose own access log
//! tells how many blobs were fetched.
//!
//! Used by the agent's image tests and the end-to-end tests in `tests/`.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::ImageProcess;

/// busybox applets linked in the test images.
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "env", "pwd", "uname", "ls", "sleep", "true", "false", "id", "head",
    "tail", "dd", "mkdir", "rm", "wc", "grep", "touch", "sync", "tr", "ln", "nc", "timeout",
    "printf",
];

/// One file of a layer.
pub enum LayerEntry<'a> {
    /// A directory (0755).
    Dir(&'a str),
    /// A directory with a mode (`tmp` is 01777).
    DirMode(&'a str, u32),
    /// A regular file with contents and mode.
    File(&'a str, &'a [u8], u32),
    /// A symlink and its target.
    Link(&'a str, &'a str),
}

/// A gzip-compressed tar layer of these entries.
pub fn layer(entries: &[LayerEntry<'_>]) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        match entry {
            LayerEntry::Dir(path) | LayerEntry::DirMode(path, _) => {
                let mode = match entry {
                    LayerEntry::DirMode(_, mode) => *mode,
                    _ => 0o755,
                };
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(mode);
                header.set_size(0);
                builder.append_data(&mut header, path, io::empty())?;
            }
            LayerEntry::File(path, data, mode) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, path, *data)?;
            }
            LayerEntry::Link(path, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, path, target)?;
            }
        }
    }
    let mut gz = builder.into_inner()?;
    gz.flush()?;
    gz.finish()
}

/// A base layer: the host's static busybox with its applets, `/etc/os-release` saying
/// `name`, a passwd with root and `sandbox` (1000:1000), and the usual empty directories.
pub fn busybox_layer(name: &str) -> io::Result<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox")?;
    let os_release = format!("NAME=\"{name}\"\nID=berth-test\n");
    let mut entries = vec![
        LayerEntry::Dir("bin"),
        LayerEntry::File("bin/busybox", &busybox, 0o755),
        LayerEntry::Dir("etc"),
        LayerEntry::File("etc/os-release", os_release.as_bytes(), 0o644),
        LayerEntry::File(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000::/home/sandbox:/bin/sh\n",
            0o644,
        ),
        LayerEntry::File("etc/group", b"root:x:0:\nsandbox:x:1000:\n", 0o644),
        LayerEntry::DirMode("tmp", 0o1777),
        LayerEntry::Dir("root"),
        LayerEntry::Dir("home"),
        LayerEntry::Dir("home/sandbox"),
        LayerEntry::Dir("proc"),
        LayerEntry::Dir("sys"),
        LayerEntry::Dir("dev"),
    ];
    let links: Vec<String> = APPLETS.iter().map(|a| format!("bin/{a}")).collect();
    for l in &links {
        entries.push(LayerEntry::Link(l, "busybox"));
    }
    layer(&entries)
}

/// The image config JSON for these process settings.
pub fn config_json(process: &ImageProcess) -> Vec<u8> {
    let mut config = serde_json::json!({
        "Env": process.env,
        "WorkingDir": process.working_dir,
        "User": process.user,
    });
    if !process.entrypoint.is_empty() {
        config["Entrypoint"] = serde_json::json!(process.entrypoint);
    }
    if !process.cmd.is_empty() {
        config["Cmd"] = serde_json::json!(process.cmd);
    }
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": []},
    }))
    .unwrap_or_default()
}

/// Pushes an image (gzip layers, bottom first) to a plain-HTTP registry; returns its
/// manifest URL.
pub async fn push(
    reference: &str,
    layers: Vec<Vec<u8>>,
    process: &ImageProcess,
) -> Result<String, String> {
    super::registry::install_crypto();
    let parsed: Reference = reference.parse().map_err(|e| format!("{e}"))?;
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..ClientConfig::default()
    });
    let layers: Vec<ImageLayer> = layers
        .into_iter()
        .map(|data| ImageLayer::oci_v1_gzip(data, None))
        .collect();
    let config = Config::oci_v1(config_json(process), None);
    client
        .push(&parsed, &layers, config, &RegistryAuth::Anonymous, None)
        .await
        .map(|r| r.manifest_url)
        .map_err(|e| format!("pushing {reference}: {e}"))
}

/// A `docker-registry` on a free loopback port, stopped on drop.
pub struct TestRegistry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub address: String,
    /// Its storage root.
    pub storage: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestRegistry {
    /// Starts one; `Err` says what is missing.
    pub fn start() -> Result<TestRegistry, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let address = format!("127.0.0.1:{port}");
        let storage = dir.path().join("data");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {address}\n",
                storage.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let log = dir.path().join("access.log");
        let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out)
            .spawn()
            .map_err(|e| {
                format!("starting docker-registry (apt-get install docker-registry): {e}")
            })?;
        let registry = TestRegistry {
            child,
            address,
            storage,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&registry.address).is_err() {
            if Instant::now() > deadline {
                return Err("docker-registry did not start listening".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    /// Blob GETs the registry served, by digest, from its own access log.
    pub fn blob_gets(&self) -> BTreeMap<String, usize> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let Some(at) = line.find("\"GET /v2/") else {
                continue;
            };
            let request = &line[at..];
            if let Some(pos) = request.find("/blobs/") {
                let digest: String = request[pos + 7..]
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                *out.entry(digest).or_insert(0) += 1;
            }
        }
        out
    }

    /// The requests the registry logged, in order, as `METHOD /v2/… STATUS`.
    pub fn requests(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let at = ["GET", "HEAD", "POST", "PUT", "PATCH"]
                    .iter()
                    .find_map(|m| line.find(&format!("\"{m} /v2/")))?;
                let (request, after) = line[at + 1..].split_once('"')?;
                let method_path = request.rsplit_once(' ').map_or(request, |(mp, _)| mp);
                let status = after.split_whitespace().next().unwrap_or("");
                Some(format!("{method_path} {status}"))
            })
            .collect()
    }

    /// Overwrites a stored blob's bytes (its digest stays), as disk corruption would.
    pub fn corrupt_blob(&self, digest: &str) -> io::Result<()> {
        let hex = digest.trim_start_matches("sha256:");
        let path: PathBuf = self
            .storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        let mut bytes = std::fs::read(&path)?;
        let last = bytes.len().saturating_sub(1);
        bytes[last] ^= 0xff;
        std::fs::write(Path::new(&path), bytes)
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
