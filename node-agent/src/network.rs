//! A sandbox's network, made and removed by its shim: a network namespace of its own
//! (`berth-<slot>`) joined to the host by a veth pair (`bsb<slot>` on the host, `eth0`
//! inside), a /30 of the node's pool, and nftables rules on the host that decide what
//! crosses. gVisor's netstack runs inside that namespace (`runsc --network=sandbox`), so
//! the sandbox's packets leave through the veth and nothing inside can change the rules.
//!
//! The rules live in one host-wide table, `inet berth`, made once (atomically, by whichever
//! shim comes first) and shared by every agent on the host:
//! - `input`: nothing from a sandbox interface reaches the host itself (its addresses,
//!   its loopback-bound services, the agent and the scheduler).
//! - `forward`: replies to a sandbox's own connections go in; anything else towards a
//!   sandbox (inbound, or another sandbox) is dropped. A sandbox's outbound packets jump,
//!   through the `egress` verdict map keyed by interface, to its own chain `sb<slot>`:
//!   the node's blocked ranges are dropped first, then `accept` (egress_all) or one
//!   `accept` per allowed destination; whatever is left is dropped.
//! - `postrouting`: sandbox traffic leaving the host is masqueraded.
//!
//! Slots are files under the host-wide `run_dir` (`/run/berth/net`), made with `O_EXCL`
//! and holding the owning shim's pid, under a host-wide `flock`: a slot whose shim is gone
//! is taken back, its leftover namespace and chain removed first. The `ip` and `nft` programs do the work: nft's own
//! transactions make each change all-or-nothing, which no Rust netlink crate offers.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use berth_proto::network::{Cidr, NetworkPolicy};

/// The nftables table every sandbox rule lives in.
const TABLE: &str = "inet berth";
/// Each sandbox's share of the pool: a /30 (network, host side, sandbox side, broadcast).
const BLOCK: u8 = 30;

/// What the shim needs to give a sandbox its network; in the launch file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetPlan {
    /// What the sandbox may reach (never `None`: such sandboxes get no plan).
    pub policy: NetworkPolicy,
    /// The host's sandbox address pool.
    pub pool: Cidr,
    /// Destinations no sandbox reaches, whatever its policy.
    pub blocked: Vec<Cidr>,
    /// Host-wide slot directory.
    pub run_dir: PathBuf,
}

/// A sandbox's namespace, veth pair, chain and slot; removed on drop.
#[derive(Debug)]
pub struct SandboxNet {
    slot: u32,
    slot_file: PathBuf,
}

impl SandboxNet {
    /// Takes a slot and builds the namespace, the veth pair and the rules.
    pub fn create(plan: &NetPlan, owner: &Path) -> Result<SandboxNet, String> {
        ensure_table()?;
        fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| format!("cannot enable IPv4 forwarding for sandbox egress: {e}"))?;
        let (slot, slot_file) = take_slot(plan, owner)?;
        let net = SandboxNet { slot, slot_file };
        let block = plan
            .pool
            .subnet(BLOCK, slot)
            .ok_or("the sandbox network slot is outside the pool")?;
        let (host, inside) = (block.nth(1), block.nth(2));
        let ns = net.netns();
        let dev = net.host_if();
        run("ip", &["netns", "add", &ns], None)?;
        let host_cmds = format!(
            "link add {dev} type veth peer name eth0 netns {ns}\n\
             addr add {host}/{BLOCK} dev {dev}\n\
             link set {dev} up\n"
        );
        run("ip", &["-batch", "-"], Some(&host_cmds))?;
        let ns_cmds = format!(
            "link set lo up\naddr add {inside}/{BLOCK} dev eth0\nlink set eth0 up\n\
             route add default via {host}\n"
        );
        run("ip", &["-n", &ns, "-batch", "-"], Some(&ns_cmds))?;
        run("nft", &["-f", "-"], Some(&chain_script(slot, plan)))?;
        Ok(net)
    }

    /// The namespace's path, for the OCI spec.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(self.netns())
    }

    fn netns(&self) -> String {
        format!("berth-{}", self.slot)
    }

    fn host_if(&self) -> String {
        format!("bsb{}", self.slot)
    }
}

impl Drop for SandboxNet {
    fn drop(&mut self) {
        remove_slot_state(self.slot);
        let _ = fs::remove_file(&self.slot_file);
    }
}

/// The rules of one sandbox: its chain, and its entry in the `egress` map.
fn chain_script(slot: u32, plan: &NetPlan) -> String {
    let chain = format!("sb{slot}");
    // Flushed: a crashed owner's rules must not survive into this sandbox's chain.
    let mut s = format!("add chain {TABLE} {chain}\nflush chain {TABLE} {chain}\n");
    if !plan.blocked.is_empty() {
        let set: Vec<String> = plan.blocked.iter().map(Cidr::to_string).collect();
        s += &format!(
            "add rule {TABLE} {chain} ip daddr {{ {} }} drop\n",
            set.join(", ")
        );
    }
    match &plan.policy {
        NetworkPolicy::None => {}
        NetworkPolicy::EgressAll => s += &format!("add rule {TABLE} {chain} accept\n"),
        NetworkPolicy::EgressAllow(rules) => {
            for r in rules {
                if r.ports.is_empty() {
                    s += &format!("add rule {TABLE} {chain} ip daddr {} accept\n", r.cidr);
                } else {
                    let ports: Vec<String> = r.ports.iter().map(u16::to_string).collect();
                    s += &format!(
                        "add rule {TABLE} {chain} ip daddr {} meta l4proto {{ tcp, udp }} \
                         th dport {{ {} }} accept\n",
                        r.cidr,
                        ports.join(", ")
                    );
                }
            }
        }
    }
    s += &format!("add element {TABLE} egress {{ \"bsb{slot}\" : jump {chain} }}\n");
    s
}

/// Makes the shared table unless it is there. `create table` fails when it exists, and one
/// `nft -f` is one transaction, so two shims racing cannot add the base rules twice.
fn ensure_table() -> Result<(), String> {
    if run("nft", &["list", "table", "inet", "berth"], None).is_ok() {
        return Ok(());
    }
    let script = format!(
        "create table {TABLE}\n\
         add map {TABLE} egress {{ type ifname : verdict ; }}\n\
         add chain {TABLE} input {{ type filter hook input priority -5 ; policy accept ; }}\n\
         add rule {TABLE} input iifname \"bsb*\" drop\n\
         add chain {TABLE} forward {{ type filter hook forward priority -5 ; policy accept ; }}\n\
         add rule {TABLE} forward oifname \"bsb*\" ct state established,related accept\n\
         add rule {TABLE} forward oifname \"bsb*\" drop\n\
         add rule {TABLE} forward iifname \"bsb*\" iifname vmap @egress\n\
         add rule {TABLE} forward iifname \"bsb*\" drop\n\
         add chain {TABLE} postrouting {{ type nat hook postrouting priority 100 ; policy accept ; }}\n\
         add rule {TABLE} postrouting iifname \"bsb*\" oifname != \"bsb*\" masquerade\n"
    );
    match run("nft", &["-f", "-"], Some(&script)) {
        Ok(()) => Ok(()),
        // Another shim made it first.
        Err(_) if run("nft", &["list", "table", "inet", "berth"], None).is_ok() => Ok(()),
        Err(e) => Err(e),
    }
}

/// A free slot, preferring one derived from the owner so restarts tend to reuse theirs.
fn take_slot(plan: &NetPlan, owner: &Path) -> Result<(u32, PathBuf), String> {
    let dir = plan.run_dir.join("slots");
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let slots = plan.pool.blocks(BLOCK).min(1 << 20);
    if slots == 0 {
        return Err(format!(
            "the sandbox address pool {} is smaller than a /30",
            plan.pool
        ));
    }
    let start = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        owner.hash(&mut h);
        (h.finish() % u64::from(slots)) as u32
    };
    let me = format!("{} {}\n", std::process::id(), owner.display());
    // Taking slots (and taking back dead owners' ones) is one shim at a time on a host,
    // so two shims cannot both reclaim the same stale slot.
    let _lock = lock(&plan.run_dir)?;
    for i in 0..slots {
        let slot = (start + i) % slots;
        let file = dir.join(slot.to_string());
        for attempt in 0..2 {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&file)
            {
                Ok(mut f) => {
                    f.write_all(me.as_bytes())
                        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
                    // A free slot is clean: owners remove their state before the file.
                    return Ok((slot, file));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt == 0 => {
                    if owner_alive(&file) {
                        break;
                    }
                    // Its owner died: take what it left behind, then the slot.
                    remove_slot_state(slot);
                    let _ = fs::remove_file(&file);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => break,
                Err(e) => return Err(format!("cannot create {}: {e}", file.display())),
            }
        }
    }
    Err(format!(
        "every one of the {slots} sandbox network slots of the pool {} is taken",
        plan.pool
    ))
}

/// Takes back every slot whose shim is gone (killed, or its host rebooted under a
/// persistent `run_dir`), with its namespace and rules; returns how many. The agent runs it
/// once at start, off its session loop.
pub fn sweep_stale(run_dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(run_dir.join("slots")) else {
        return 0;
    };
    let Ok(_lock) = lock(run_dir) else {
        return 0;
    };
    let mut swept = 0;
    for e in entries.flatten() {
        let Some(slot) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if !owner_alive(&e.path()) {
            remove_slot_state(slot);
            let _ = fs::remove_file(e.path());
            swept += 1;
        }
    }
    swept
}

/// The host-wide slot lock (`run_dir/slots.lock`), held until the file is dropped.
fn lock(run_dir: &Path) -> Result<fs::File, String> {
    use std::os::fd::AsRawFd;
    let path = run_dir.join("slots.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    nix::fcntl::flock(file.as_raw_fd(), nix::fcntl::FlockArg::LockExclusive)
        .map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
    Ok(file)
}

/// Whether the shim named in a slot file still runs.
fn owner_alive(file: &Path) -> bool {
    let Ok(text) = fs::read_to_string(file) else {
        // Being written by its new owner.
        return true;
    };
    match text
        .split_whitespace()
        .next()
        .and_then(|p| p.parse::<u32>().ok())
    {
        Some(pid) => Path::new("/proc").join(pid.to_string()).exists(),
        None => true,
    }
}

/// Removes a slot's chain, map entry and namespace (with its veth pair), whatever exists.
fn remove_slot_state(slot: u32) {
    let script = format!(
        "delete element {TABLE} egress {{ \"bsb{slot}\" }}\ndelete chain {TABLE} sb{slot}\n"
    );
    if run("nft", &["-f", "-"], Some(&script)).is_err() {
        // Half there (the map entry gone, the chain not): take what exists.
        let _ = run(
            "nft",
            &["delete", "chain", "inet", "berth", &format!("sb{slot}")],
            None,
        );
    }
    if Path::new(&format!("/run/netns/berth-{slot}")).exists() {
        let _ = run("ip", &["netns", "delete", &format!("berth-{slot}")], None);
    }
    if Path::new(&format!("/sys/class/net/bsb{slot}")).exists() {
        let _ = run("ip", &["link", "delete", &format!("bsb{slot}")], None);
    }
}

/// Runs `program args` with `stdin`; an error carries what it printed.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("cannot run {program} ({e}); sandbox networks need iproute2 and nftables")
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The sandbox-side address of `slot` in `pool`, for tests and messages.
pub fn sandbox_address(pool: &Cidr, slot: u32) -> Option<Ipv4Addr> {
    pool.subnet(BLOCK, slot).map(|b| b.nth(2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::network::EgressRule;

    fn plan(policy: NetworkPolicy) -> NetPlan {
        NetPlan {
            policy,
            pool: "10.88.0.0/16".parse().expect("test value"),
            blocked: vec!["169.254.0.0/16".parse().expect("test value")],
            run_dir: PathBuf::from("/nonexistent"),
        }
    }

    #[test]
    fn chains_drop_blocked_ranges_before_any_accept() {
        let all = chain_script(7, &plan(NetworkPolicy::EgressAll));
        let lines: Vec<&str> = all.lines().collect();
        assert_eq!(lines[0], "add chain inet berth sb7");
        assert_eq!(lines[1], "flush chain inet berth sb7");
        assert_eq!(
            lines[2],
            "add rule inet berth sb7 ip daddr { 169.254.0.0/16 } drop"
        );
        assert_eq!(lines[3], "add rule inet berth sb7 accept");
        assert_eq!(
            lines[4],
            "add element inet berth egress { \"bsb7\" : jump sb7 }"
        );

        let allow = chain_script(
            3,
            &plan(NetworkPolicy::EgressAllow(vec![
                EgressRule {
                    cidr: "10.77.0.2/32".parse().expect("test value"),
                    ports: vec![8080, 53],
                },
                EgressRule {
                    cidr: "192.168.0.0/16".parse().expect("test value"),
                    ports: vec![],
                },
            ])),
        );
        assert!(allow.contains(
            "ip daddr 10.77.0.2/32 meta l4proto { tcp, udp } th dport { 8080, 53 } accept"
        ));
        assert!(allow.contains("add rule inet berth sb3 ip daddr 192.168.0.0/16 accept"));
        assert!(
            !allow.contains("sb3 accept\n"),
            "an allow-list has no catch-all accept"
        );
    }

    #[test]
    fn slot_addresses_come_from_the_pool() {
        let pool: Cidr = "10.88.0.0/16".parse().expect("test value");
        assert_eq!(
            sandbox_address(&pool, 0),
            Some("10.88.0.2".parse().expect("test value"))
        );
        assert_eq!(
            sandbox_address(&pool, 5),
            Some("10.88.0.22".parse().expect("test value"))
        );
    }
}
