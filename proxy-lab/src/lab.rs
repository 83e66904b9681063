//! The network-namespace lab: a GKE-like topology on one kernel.
//!
//! ```text
//!                    <prefix>-ext (eth0 192.0.2.10/24, default via 192.0.2.1)
//!                         |
//!   <prefix>-router   ext 192.0.2.1/24
//!                     fabric (bridge) 10.240.0.1/24, ports node1 + node2
//!                     routes: 10.76.0.0/24 via .11, 10.76.1.0/24 via .12, 10.96.0.0/16 via .11
//!                      /                                 \
//!   <prefix>-node1  eth0 10.240.0.11/24          <prefix>-node2  eth0 10.240.0.12/24
//!                   cbr0 10.76.0.1/24                            cbr0 10.76.1.1/24
//!                   default via 10.240.0.1                       default via 10.240.0.1
//!                    |  ports veth<pod>                           |  ports veth<pod>
//!   <prefix>-<pod>  eth0 10.76.0.x/24                <prefix>-<pod> eth0 10.76.1.x/24
//!                   default via 10.76.0.1                         default via 10.76.1.1
//! ```
//!
//! Every namespace name starts with `<prefix>-`, so several labs run side by side on one kernel.
//! Interface names only have to be unique inside their namespace, so they are the same in every
//! lab (`eth0`, `cbr0`, `veth<pod>`, router side `node1`/`node2`/`ext`, router bridge `fabric`).
//! `ip_forward=1` in the router and the nodes; `rp_filter=0`, `accept_redirects=0` and
//! `send_redirects=0` everywhere (the router forwards node-to-node traffic back out the fabric,
//! like the cloud does, and must not tell the nodes to bypass it).
//!
//! State lives under `/run/ebpf-proxy-lab/<prefix>/`: `lab.json` (a [`LabState`]), one bpffs mount
//! per node (`bpffs-node1`, `bpffs-node2`; mounted in the host mount namespace, hence visible
//! inside `ip netns exec`, which only remounts /sys) and `logs/` for spawned processes. So `lab up`
//! in one process and `lab status` / `lab down` in another work.
//!
//! Public entry points:
//! - [`Lab::up`] builds a lab (torn down on drop unless [`Lab::set_keep`]`(true)`),
//!   [`Lab::attach`] re-opens one from its state file (kept by default), [`Lab::down`].
//! - names: [`Lab::ns`], [`Lab::router_ns`], [`Lab::ext_ns`], [`Lab::node_ns`], [`Lab::pod_ns`],
//!   [`Lab::bpffs`], [`Lab::state`].
//! - processes: [`Lab::exec`], [`Lab::exec_ok`], [`Lab::spawn`], [`Lab::stop`],
//!   [`Lab::child_status`], [`Lab::log_path`], [`Lab::start_pod_servers`].
//! - out-of-process management: [`list_labs`], [`status`] (= [`Lab::status`]), [`down_by_prefix`].

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde::{Deserialize, Serialize};

/// Where lab state lives: `/run/ebpf-proxy-lab/<prefix>/`.
pub const STATE_ROOT: &str = "/run/ebpf-proxy-lab";
/// The state file inside a lab's state directory.
pub const STATE_FILE: &str = "lab.json";
/// The node fabric (the "VPC subnet"): router .1, node N .(10+N).
pub const FABRIC_CIDR: &str = "10.240.0.0/24";
/// The router's address on the fabric, every node's default gateway.
pub const ROUTER_FABRIC_IP: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);
/// The external network behind the router.
pub const EXT_CIDR: &str = "192.0.2.0/24";
/// The router's address on the external network.
pub const ROUTER_EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The external client's address.
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Reserved service CIDR (ClusterIPs). The router routes it to node1 so that traffic to a
/// ClusterIP from outside the cluster lands somewhere deterministic.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// LoadBalancer ingress IPs: the router spreads them over every node by ECMP, destination
/// unchanged (direct server return).
pub const LB_CIDR: &str = "203.0.113.0/24";
/// The node the router sends [`SERVICE_CIDR`] to.
pub const SERVICE_CIDR_NODE: u8 = 1;
/// The port the pod servers (`serve-hostname`) listen on, TCP and UDP (like serve_hostname).
pub const POD_SERVER_PORT: u16 = 9376;
/// The lab's nodes.
pub const NODES: [u8; 2] = [1, 2];
/// Interface names, identical in every lab (they live in per-lab namespaces).
pub const UPLINK_IF: &str = "eth0";
pub const BRIDGE_IF: &str = "cbr0";
pub const POD_IF: &str = "eth0";
pub const ROUTER_FABRIC_BRIDGE: &str = "fabric";
pub const ROUTER_EXT_IF: &str = "ext";
/// Roles that are not pod names.
pub const RESERVED_ROLES: [&str; 4] = ["router", "node1", "node2", "ext"];

const NOT_ROOT: &str =
    "the lab needs root (network namespaces, veth, bpffs): run as root or with sudo";
const NO_IP: &str = "the lab needs the `ip` command from iproute2: install iproute2";
const MAX_PREFIX_LEN: usize = 12;
const MAX_POD_NAME_LEN: usize = 48;
const LOG_TAIL_BYTES: u64 = 4096;

/// A node's fabric address: 10.240.0.(10+N).
pub fn node_ip(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 240, 0, 10 + node)
}

/// A node's pod CIDR network address: 10.76.(N-1).0 (a /24).
pub fn node_pod_net(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 76, node.wrapping_sub(1), 0)
}

/// A node's pod CIDR as text: `10.76.(N-1).0/24`.
pub fn node_pod_cidr(node: u8) -> String {
    format!("{}/24", node_pod_net(node))
}

/// A node's bridge (cbr0) address, the pods' gateway: 10.76.(N-1).1.
pub fn node_bridge_ip(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 76, node.wrapping_sub(1), 1)
}

/// One pod of the lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    /// Lowercase letters, digits and '-'; not one of [`RESERVED_ROLES`].
    pub name: String,
    /// 1 or 2.
    pub node: u8,
    /// Inside the node's pod CIDR, not the network, gateway (.1) or broadcast address.
    pub ip: Ipv4Addr,
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LabSpec {
    pub pods: Vec<PodSpec>,
}

impl LabSpec {
    /// `hostnames-a` 10.76.0.10 and `hostnames-b` 10.76.0.11 on node1, `hostnames-c` 10.76.1.10
    /// on node2, and a client pod `client` 10.76.0.20 on node1.
    pub fn default_demo() -> Self {
        let pod = |name: &str, node, ip| PodSpec {
            name: name.to_owned(),
            node,
            ip,
        };
        LabSpec {
            pods: vec![
                pod("hostnames-a", 1, Ipv4Addr::new(10, 76, 0, 10)),
                pod("hostnames-b", 1, Ipv4Addr::new(10, 76, 0, 11)),
                pod("hostnames-c", 2, Ipv4Addr::new(10, 76, 1, 10)),
                pod("client", 1, Ipv4Addr::new(10, 76, 0, 20)),
            ],
        }
    }

    /// Checks names, nodes and addresses.
    pub fn validate(&self) -> Result<()> {
        let mut names = std::collections::BTreeSet::new();
        let mut ips = std::collections::BTreeSet::new();
        for pod in &self.pods {
            let name = &pod.name;
            ensure!(
                !name.is_empty()
                    && name.len() <= MAX_POD_NAME_LEN
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !name.starts_with('-'),
                "pod name {name:?}: use 1..={MAX_POD_NAME_LEN} of [a-z0-9-], not starting with '-'"
            );
            ensure!(
                !RESERVED_ROLES.contains(&name.as_str()),
                "pod name {name:?} is reserved (router, node1, node2, ext)"
            );
            ensure!(names.insert(name.clone()), "duplicate pod name {name:?}");
            ensure!(
                NODES.contains(&pod.node),
                "pod {name}: node must be 1 or 2, got {}",
                pod.node
            );
            let o = pod.ip.octets();
            let net = node_pod_net(pod.node).octets();
            ensure!(
                o[..3] == net[..3] && o[3] != 0 && o[3] != 1 && o[3] != 255,
                "pod {name}: ip {} is not a usable pod address in node{}'s CIDR {} (.1 is cbr0)",
                pod.ip,
                pod.node,
                node_pod_cidr(pod.node)
            );
            ensure!(ips.insert(pod.ip), "pod {name}: ip {} used twice", pod.ip);
        }
        Ok(())
    }
}

/// A node as built (part of [`LabState`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub node: u8,
    pub ns: String,
    /// Fabric address of `eth0`.
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    /// Address of `cbr0`.
    pub bridge_ip: Ipv4Addr,
    /// The node's private bpffs mount (pin path root for an agent running in this node).
    pub bpffs: PathBuf,
}

/// A pod as built (part of [`LabState`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    pub name: String,
    pub node: u8,
    pub ip: Ipv4Addr,
    pub ns: String,
    /// The host-side veth (a port of cbr0 in the node namespace).
    pub host_veth: String,
    /// The pod-side interface (`eth0`).
    pub pod_if: String,
}

/// Everything about a lab, persisted as `/run/ebpf-proxy-lab/<prefix>/lab.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub prefix: String,
    pub spec: LabSpec,
    pub router_ns: String,
    pub ext_ns: String,
    pub ext_ip: Ipv4Addr,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    pub service_cidr: String,
    pub pod_server_port: u16,
    /// The pid of the process that brought the lab up.
    pub created_by_pid: u32,
}

impl LabState {
    fn plan(prefix: &str, spec: &LabSpec) -> Result<Self> {
        spec.validate()?;
        let dir = state_dir(prefix);
        let nodes = NODES
            .iter()
            .map(|&node| NodeState {
                node,
                ns: format!("{prefix}-node{node}"),
                ip: node_ip(node),
                pod_cidr: node_pod_cidr(node),
                bridge_ip: node_bridge_ip(node),
                bpffs: dir.join(format!("bpffs-node{node}")),
            })
            .collect();
        let mut pods = Vec::new();
        for pod in &spec.pods {
            let host_veth = host_veth_name(&pod.name);
            if let Some(other) = pods
                .iter()
                .find(|p: &&PodState| p.node == pod.node && p.host_veth == host_veth)
            {
                bail!(
                    "pods {} and {} map to the same host veth {host_veth}",
                    other.name,
                    pod.name
                );
            }
            pods.push(PodState {
                name: pod.name.clone(),
                node: pod.node,
                ip: pod.ip,
                ns: format!("{prefix}-{}", pod.name),
                host_veth,
                pod_if: POD_IF.to_owned(),
            });
        }
        Ok(LabState {
            prefix: prefix.to_owned(),
            spec: spec.clone(),
            router_ns: format!("{prefix}-router"),
            ext_ns: format!("{prefix}-ext"),
            ext_ip: EXT_IP,
            nodes,
            pods,
            service_cidr: SERVICE_CIDR.to_owned(),
            pod_server_port: POD_SERVER_PORT,
            created_by_pid: std::process::id(),
        })
    }

    /// Every namespace of the lab: router, ext, nodes, pods.
    pub fn all_namespaces(&self) -> Vec<String> {
        let mut v = vec![self.router_ns.clone(), self.ext_ns.clone()];
        v.extend(self.nodes.iter().map(|n| n.ns.clone()));
        v.extend(self.pods.iter().map(|p| p.ns.clone()));
        v
    }

    /// The node with this number.
    pub fn node(&self, node: u8) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.node == node)
    }

    /// The pod with this name.
    pub fn pod(&self, name: &str) -> Option<&PodState> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// Reads `/run/ebpf-proxy-lab/<prefix>/lab.json`.
    pub fn load(prefix: &str) -> Result<Self> {
        let path = state_dir(prefix).join(STATE_FILE);
        let text = fs::read_to_string(&path)
            .with_context(|| format!("reading lab state {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing lab state {}", path.display()))
    }

    fn save(&self) -> Result<()> {
        let path = state_dir(&self.prefix).join(STATE_FILE);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).context("serializing lab state")?;
        fs::write(&tmp, text + "\n").with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
    }
}

/// The host-side veth of a pod: `veth<pod>`, or `veth<first 7>` + 4 hex digits of a hash when
/// that would exceed 15 characters.
pub fn host_veth_name(pod: &str) -> String {
    let full = format!("veth{pod}");
    if full.len() <= 15 {
        return full;
    }
    // FNV-1a, stable across runs and Rust versions.
    let mut h: u32 = 0x811c_9dc5;
    for b in pod.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let head: String = pod.chars().take(7).collect();
    format!("veth{head}{:04x}", h & 0xffff)
}

/// `/run/ebpf-proxy-lab/<prefix>`.
pub fn state_dir(prefix: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(prefix)
}

/// A private mount of the cgroup v2 hierarchy, `/run/ebpf-proxy-lab/<prefix>/cgroup2`: the
/// machine's one hierarchy, mounted where `ip netns exec` (which remounts /sys) still sees it.
pub fn cgroup_mount(prefix: &str) -> PathBuf {
    state_dir(prefix).join("cgroup2")
}

/// Node `node`'s cgroup, `<cgroup mount>/<prefix>-node<N>`: the "host processes" of that node
/// run in it, and its agent attaches the socket-level programs to it (never to the root
/// cgroup, which every process on the machine shares). Removed on teardown.
pub fn node_cgroup(prefix: &str, node: u8) -> PathBuf {
    cgroup_mount(prefix).join(format!("{prefix}-node{node}"))
}

/// Checks that a lab prefix is usable: 1..=12 of `[a-z0-9]`, starting with a letter (no '-', so
/// `<prefix>-` unambiguously identifies a lab's namespaces).
pub fn validate_prefix(prefix: &str) -> Result<()> {
    ensure!(
        !prefix.is_empty()
            && prefix.len() <= MAX_PREFIX_LEN
            && prefix.as_bytes()[0].is_ascii_lowercase()
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "lab prefix {prefix:?}: use 1..={MAX_PREFIX_LEN} of [a-z0-9], starting with a letter"
    );
    Ok(())
}

/// Fails clearly unless we are root and `ip` (iproute2) is installed.
pub fn ensure_prereqs() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    ensure!(euid == 0, "{NOT_ROOT} (euid is {euid})");
    match Command::new("ip").arg("-V").stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => bail!("{NO_IP} (`ip -V` failed: {})", out.status),
        Err(e) => Err(anyhow!(e).context(NO_IP)),
    }
}

static PREFIX_COUNTER: AtomicU32 = AtomicU32::new(0);

struct Tracked {
    child: Child,
    ns: String,
    argv: Vec<OsString>,
    log: PathBuf,
}

/// A running lab. Torn down on drop (tracked children killed, every `<prefix>-*` namespace
/// deleted, bpffs unmounted, state removed) unless [`Lab::set_keep`]`(true)`.
pub struct Lab {
    state: LabState,
    keep: bool,
    torn_down: bool,
    children: Mutex<Vec<Tracked>>,
    spawn_seq: AtomicU32,
}

impl fmt::Debug for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.state.prefix)
            .field("keep", &self.keep)
            .field("torn_down", &self.torn_down)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// Builds a lab. `name_prefix: None` picks a fresh `epl<pid%10000><counter>`; an explicit
    /// prefix must not be in use. On error everything built so far is torn down.
    pub fn up(name_prefix: Option<&str>, spec: &LabSpec) -> Result<Lab> {
        ensure_prereqs()?;
        spec.validate()?;
        fs::create_dir_all(STATE_ROOT).with_context(|| format!("creating {STATE_ROOT}"))?;
        let existing = netns_list()?;
        let prefix = match name_prefix {
            Some(p) => {
                validate_prefix(p)?;
                claim_prefix(p, &existing)?
                    .then(|| p.to_owned())
                    .ok_or_else(|| {
                        anyhow!(
                            "lab {p} already exists (tear it down with `cargo xtask lab down {p}`)"
                        )
                    })?
            }
            None => loop {
                let n = PREFIX_COUNTER.fetch_add(1, Ordering::Relaxed);
                let p = format!("epl{}{n}", std::process::id() % 10000);
                ensure!(p.len() <= MAX_PREFIX_LEN, "ran out of lab prefixes");
                if claim_prefix(&p, &existing)? {
                    break p;
                }
            },
        };
        // From here on the state directory is ours: Drop cleans up whatever exists.
        let mut lab = Lab {
            state: LabState {
                prefix: prefix.clone(),
                spec: spec.clone(),
                router_ns: String::new(),
                ext_ns: String::new(),
                ext_ip: EXT_IP,
                nodes: Vec::new(),
                pods: Vec::new(),
                service_cidr: SERVICE_CIDR.to_owned(),
                pod_server_port: POD_SERVER_PORT,
                created_by_pid: std::process::id(),
            },
            keep: false,
            torn_down: false,
            children: Mutex::new(Vec::new()),
            spawn_seq: AtomicU32::new(0),
        };
        lab.state = LabState::plan(&prefix, spec)?;
        lab.state.save()?;
        lab.build()
            .with_context(|| format!("bringing up lab {prefix}"))?;
        Ok(lab)
    }

    /// Re-opens an existing lab from its state file (e.g. one brought up by another process).
    /// The returned lab is kept on drop; call [`Lab::down`] or `set_keep(false)` to tear it down.
    pub fn attach(prefix: &str) -> Result<Lab> {
        validate_prefix(prefix)?;
        let state = LabState::load(prefix)?;
        Ok(Lab {
            state,
            keep: true,
            torn_down: false,
            children: Mutex::new(Vec::new()),
            spawn_seq: AtomicU32::new(0),
        })
    }

    /// Same as the free function [`status`].
    pub fn status(prefix: &str) -> Result<LabStatus> {
        status(prefix)
    }

    /// Whether drop leaves the lab in place.
    pub fn set_keep(&mut self, keep: bool) {
        self.keep = keep;
    }

    pub fn prefix(&self) -> &str {
        &self.state.prefix
    }

    pub fn state(&self) -> &LabState {
        &self.state
    }

    /// `/run/ebpf-proxy-lab/<prefix>`.
    pub fn state_dir(&self) -> PathBuf {
        state_dir(&self.state.prefix)
    }

    /// `<prefix>-<role>` for any role: `router`, `ext`, `node1`, `node2` or a pod name.
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.state.prefix)
    }

    pub fn router_ns(&self) -> String {
        self.state.router_ns.clone()
    }

    pub fn ext_ns(&self) -> String {
        self.state.ext_ns.clone()
    }

    /// `<prefix>-node<N>`.
    pub fn node_ns(&self, node: u8) -> String {
        self.ns(&format!("node{node}"))
    }

    /// `<prefix>-<pod>` (does not check that the pod exists; see [`LabState::pod`]).
    pub fn pod_ns(&self, pod: &str) -> String {
        self.ns(pod)
    }

    /// The pod's IP, if the pod exists.
    pub fn pod_ip(&self, pod: &str) -> Option<Ipv4Addr> {
        self.state.pod(pod).map(|p| p.ip)
    }

    /// The node's private bpffs mount: `/run/ebpf-proxy-lab/<prefix>/bpffs-node<N>`.
    pub fn bpffs(&self, node: u8) -> PathBuf {
        self.state_dir().join(format!("bpffs-node{node}"))
    }

    /// Node `node`'s cgroup (see [`node_cgroup`]).
    pub fn node_cgroup(&self, node: u8) -> PathBuf {
        node_cgroup(&self.state.prefix, node)
    }

    /// Runs `args` as a host process of node `node`: in its network namespace and inside its
    /// cgroup (joined before exec), so the node's socket-level programs see it. Like
    /// [`Lab::exec`], returns the output whatever the exit status.
    pub fn exec_host<S: AsRef<OsStr>>(&self, node: u8, args: &[S]) -> Result<Output> {
        let procs = self.node_cgroup(node).join("cgroup.procs");
        let mut argv: Vec<OsString> = vec![
            "sh".into(),
            "-c".into(),
            "echo $$ > \"$0\" && exec \"$@\"".into(),
            procs.into_os_string(),
        ];
        argv.extend(args.iter().map(|a| a.as_ref().to_owned()));
        self.exec(&self.node_ns(node), &argv)
    }

    /// Runs `ip netns exec <ns> <args...>` to completion and returns its output whatever the
    /// exit status (errors only if it cannot be started).
    pub fn exec<S: AsRef<OsStr>>(&self, ns: &str, args: &[S]) -> Result<Output> {
        ensure!(!args.is_empty(), "exec in {ns}: empty command");
        netns_exec_command(ns, args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running `{}` in {ns}", display_argv(args)))
    }

    /// Like [`Lab::exec`] but fails (with stderr) on a non-zero exit; returns stdout.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, ns: &str, args: &[S]) -> Result<String> {
        let out = self.exec(ns, args)?;
        check_output(&out, &format!("`{}` in {ns}", display_argv(args)))
    }

    /// Starts `ip netns exec <ns> <args...>` in the background (ip execs the program, so the
    /// pid is the program's). stdout+stderr go to a log file under the state directory
    /// ([`Lab::log_path`]). The child is tracked: [`Lab::stop`] stops it, teardown kills it.
    pub fn spawn<S: AsRef<OsStr>>(&self, ns: &str, args: &[S]) -> Result<u32> {
        ensure!(!args.is_empty(), "spawn in {ns}: empty command");
        let logs = self.state_dir().join("logs");
        fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let seq = self.spawn_seq.fetch_add(1, Ordering::Relaxed);
        let prog = Path::new(args[0].as_ref())
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "cmd".to_owned());
        let log = logs.join(format!("{seq:03}-{ns}-{prog}.log"));
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let file2 = file.try_clone().context("duplicating log file")?;
        let child = netns_exec_command(ns, args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .spawn()
            .with_context(|| format!("spawning `{}` in {ns}", display_argv(args)))?;
        let pid = child.id();
        self.children_lock().push(Tracked {
            child,
            ns: ns.to_owned(),
            argv: args.iter().map(|a| a.as_ref().to_owned()).collect(),
            log,
        });
        Ok(pid)
    }

    /// The log file of a spawned child.
    pub fn log_path(&self, pid: u32) -> Option<PathBuf> {
        self.children_lock()
            .iter()
            .find(|t| t.child.id() == pid)
            .map(|t| t.log.clone())
    }

    /// `Ok(None)` while a spawned child runs, `Ok(Some(status))` once it exited.
    pub fn child_status(&self, pid: u32) -> Result<Option<ExitStatus>> {
        let mut children = self.children_lock();
        let t = children
            .iter_mut()
            .find(|t| t.child.id() == pid)
            .ok_or_else(|| anyhow!("pid {pid} is not a child spawned by this lab"))?;
        t.child
            .try_wait()
            .with_context(|| format!("checking pid {pid}"))
    }

    /// Stops a spawned child: SIGTERM, up to 3 s grace, then SIGKILL. Returns its exit status.
    pub fn stop(&self, pid: u32) -> Result<ExitStatus> {
        let tracked = {
            let mut children = self.children_lock();
            let i = children
                .iter()
                .position(|t| t.child.id() == pid)
                .ok_or_else(|| anyhow!("pid {pid} is not a child spawned by this lab"))?;
            children.remove(i)
        };
        let mut v = vec![tracked];
        terminate_children(&mut v, Duration::from_secs(3));
        let mut t = v.pop().ok_or_else(|| anyhow!("lost child {pid}"))?;
        t.child
            .wait()
            .with_context(|| format!("waiting for pid {pid}"))
    }

    /// Spawns `<tools> serve-hostname --name <pod> --port 9376` in every pod and waits (up to
    /// 10 s) until each answers `<tools> probe <ip>:9376` over TCP and UDP from inside its pod
    /// (`tools`: the `ebpf-proxy-lab` binary). Returns pod name -> pid.
    pub fn start_pod_servers(&self, tools_binary: &Path) -> Result<BTreeMap<String, u32>> {
        let bin = fs::canonicalize(tools_binary)
            .with_context(|| format!("ebpf-proxy-lab binary {}", tools_binary.display()))?;
        let port = POD_SERVER_PORT.to_string();
        let mut pids = BTreeMap::new();
        for pod in &self.state.pods {
            let args: [&OsStr; 6] = [
                bin.as_os_str(),
                "serve-hostname".as_ref(),
                "--name".as_ref(),
                pod.name.as_ref(),
                "--port".as_ref(),
                port.as_ref(),
            ];
            pids.insert(pod.name.clone(), self.spawn(&pod.ns, &args)?);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for pod in &self.state.pods {
            let pid = pids[&pod.name];
            let target = format!("{}:{POD_SERVER_PORT}", pod.ip);
            for udp in [false, true] {
                loop {
                    if let Some(st) = self.child_status(pid)? {
                        bail!(
                            "pod server in {} exited ({st}); log:\n{}",
                            pod.name,
                            self.log_tail(pid)
                        );
                    }
                    let mut args: Vec<&OsStr> = vec![
                        bin.as_os_str(),
                        "probe".as_ref(),
                        target.as_ref(),
                        "--timeout-ms".as_ref(),
                        "300".as_ref(),
                    ];
                    if udp {
                        args.push("--udp".as_ref());
                    }
                    let out = self.exec(&pod.ns, &args)?;
                    if out.status.success() {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "pod server {} did not answer {} on {target} within 10 s: {}{}\nserver log:\n{}",
                            pod.name,
                            if udp { "UDP" } else { "TCP" },
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr),
                            self.log_tail(pid)
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        Ok(pids)
    }

    /// Tears the lab down now (even if kept): kills tracked children, then [`down_by_prefix`].
    pub fn down(mut self) -> Result<TeardownSummary> {
        self.torn_down = true;
        self.teardown()
    }

    fn teardown(&mut self) -> Result<TeardownSummary> {
        let mut children = std::mem::take(&mut *self.children_lock());
        terminate_children(&mut children, Duration::from_secs(3));
        down_by_prefix(&self.state.prefix)
    }

    fn log_tail(&self, pid: u32) -> String {
        self.log_path(pid)
            .map(|p| read_tail(&p))
            .unwrap_or_default()
    }

    fn children_lock(&self) -> std::sync::MutexGuard<'_, Vec<Tracked>> {
        // A panic while holding the lock leaves the Vec consistent; keep going.
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn build(&self) -> Result<()> {
        let st = &self.state;
        let r = st.router_ns.as_str();
        for ns in st.all_namespaces() {
            ipw(&format!("netns add {ns}"))?;
            ipw(&format!("-n {ns} link set lo up"))?;
            let forward = ns == r || st.nodes.iter().any(|n| n.ns == ns);
            set_sysctls(&ns, forward)?;
        }

        // Router: the fabric bridge (the "VPC subnet").
        let fabric = ROUTER_FABRIC_BRIDGE;
        ipw(&format!("-n {r} link add {fabric} type bridge"))?;
        ipw(&format!(
            "-n {r} link set {fabric} address 02:40:00:00:00:01"
        ))?;
        ipw(&format!(
            "-n {r} addr add {ROUTER_FABRIC_IP}/24 dev {fabric}"
        ))?;
        ipw(&format!("-n {r} link set {fabric} up"))?;

        // Nodes: uplink on the fabric, cbr0 for the pods, the cloud route for the pod CIDR.
        for node in &st.nodes {
            let n = node.ns.as_str();
            let port = format!("node{}", node.node);
            veth(n, UPLINK_IF, r, &port)?;
            ipw(&format!("-n {r} link set {port} master {fabric} up"))?;
            ipw(&format!("-n {n} addr add {}/24 dev {UPLINK_IF}", node.ip))?;
            ipw(&format!("-n {n} link set {UPLINK_IF} up"))?;
            ipw(&format!("-n {n} link add {BRIDGE_IF} type bridge"))?;
            ipw(&format!(
                "-n {n} link set {BRIDGE_IF} address 02:76:00:00:{:02x}:01",
                node.node
            ))?;
            ipw(&format!(
                "-n {n} addr add {}/24 dev {BRIDGE_IF}",
                node.bridge_ip
            ))?;
            ipw(&format!("-n {n} link set {BRIDGE_IF} up"))?;
            ipw(&format!("-n {n} route add default via {ROUTER_FABRIC_IP}"))?;
            ipw(&format!(
                "-n {r} route add {} via {}",
                node.pod_cidr, node.ip
            ))?;
            mount_bpffs(&node.bpffs)?;
        }
        // Per-node cgroups for host processes (socket-level load balancing).
        let cg = cgroup_mount(&st.prefix);
        mount_fs(&cg, c"cgroup2")
            .context("the lab needs cgroup v2 (per-node cgroups for host processes)")?;
        for node in &st.nodes {
            let d = node_cgroup(&st.prefix, node.node);
            fs::create_dir(&d).with_context(|| format!("creating cgroup {}", d.display()))?;
        }

        let svc_node = st
            .node(SERVICE_CIDR_NODE)
            .context("service CIDR node missing")?;
        ipw(&format!(
            "-n {r} route add {SERVICE_CIDR} via {}",
            svc_node.ip
        ))?;
        // The Maglev-style balancer: LoadBalancer IPs reach the nodes with their destination
        // unchanged (DSR), spread per flow over both nodes (ECMP hashed on the 4-tuple).
        write_sysctls_in(r, &[("net/ipv4/fib_multipath_hash_policy", "1")])?;
        let hops: Vec<String> = st
            .nodes
            .iter()
            .map(|n| format!("nexthop via {}", n.ip))
            .collect();
        ipw(&format!("-n {r} route add {LB_CIDR} {}", hops.join(" ")))?;

        // External client behind the router.
        let e = st.ext_ns.as_str();
        veth(e, "eth0", r, ROUTER_EXT_IF)?;
        ipw(&format!(
            "-n {r} addr add {ROUTER_EXT_IP}/24 dev {ROUTER_EXT_IF}"
        ))?;
        ipw(&format!("-n {r} link set {ROUTER_EXT_IF} up"))?;
        ipw(&format!("-n {e} addr add {}/24 dev eth0", st.ext_ip))?;
        ipw(&format!("-n {e} link set eth0 up"))?;
        ipw(&format!("-n {e} route add default via {ROUTER_EXT_IP}"))?;

        // Pods: eth0 in the pod, veth<pod> as a cbr0 port in the node.
        for pod in &st.pods {
            let node = st.node(pod.node).context("pod node missing")?;
            let (p, n, pif, hv) = (&pod.ns, &node.ns, &pod.pod_if, &pod.host_veth);
            veth(p, pif, n, hv)?;
            ipw(&format!("-n {n} link set {hv} master {BRIDGE_IF} up"))?;
            ipw(&format!("-n {p} addr add {}/24 dev {pif}", pod.ip))?;
            ipw(&format!("-n {p} link set {pif} up"))?;
            ipw(&format!("-n {p} route add default via {}", node.bridge_ip))?;
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep || self.torn_down {
            return;
        }
        self.torn_down = true;
        if std::thread::panicking() {
            for t in self.children_lock().iter() {
                eprintln!(
                    "--- lab {}: log of `{}` in {} ({}):\n{}",
                    self.state.prefix,
                    display_argv(&t.argv),
                    t.ns,
                    t.log.display(),
                    read_tail(&t.log)
                );
            }
        }
        if let Err(e) = self.teardown() {
            eprintln!("lab {}: teardown failed: {e:#}", self.state.prefix);
        }
    }
}

/// What [`down_by_prefix`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TeardownSummary {
    pub namespaces_deleted: Vec<String>,
    pub processes_killed: usize,
    pub unmounted: Vec<PathBuf>,
    /// The per-node cgroups removed, then the lab's cgroup2 mount (not in `unmounted`).
    pub cgroups_removed: Vec<PathBuf>,
    pub state_dir_removed: bool,
}

/// What exists of a lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabStatus {
    pub prefix: String,
    /// Existing namespaces named `<prefix>-*`.
    pub namespaces: Vec<String>,
    /// The state file, if present and readable.
    pub state: Option<LabState>,
    /// Mount points under the lab's state directory (the per-node bpffs).
    pub mounts: Vec<PathBuf>,
    pub state_dir_exists: bool,
}

impl LabStatus {
    /// Namespaces the state file names that do not exist.
    pub fn missing_namespaces(&self) -> Vec<String> {
        self.state
            .as_ref()
            .map(|s| {
                s.all_namespaces()
                    .into_iter()
                    .filter(|ns| !self.namespaces.contains(ns))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// State file present, every namespace and every node bpffs present.
    pub fn is_complete(&self) -> bool {
        self.state.as_ref().is_some_and(|s| {
            self.missing_namespaces().is_empty()
                && s.nodes.iter().all(|n| self.mounts.contains(&n.bpffs))
        })
    }
}

impl fmt::Display for LabStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let health = if self.is_complete() {
            "up"
        } else {
            "incomplete"
        };
        writeln!(
            f,
            "lab {} ({health}), state dir {}",
            self.prefix,
            state_dir(&self.prefix).display()
        )?;
        if let Some(s) = &self.state {
            writeln!(f, "  router  {}", s.router_ns)?;
            writeln!(f, "  ext     {}  {}", s.ext_ns, s.ext_ip)?;
            for n in &s.nodes {
                writeln!(
                    f,
                    "  node{}   {}  {}  pods {}  bpffs {}",
                    n.node,
                    n.ns,
                    n.ip,
                    n.pod_cidr,
                    n.bpffs.display()
                )?;
            }
            for p in &s.pods {
                writeln!(
                    f,
                    "  pod     {}  {}  node{}  ({})",
                    p.ns, p.ip, p.node, p.host_veth
                )?;
            }
            for ns in self.missing_namespaces() {
                writeln!(f, "  MISSING namespace {ns}")?;
            }
        } else {
            writeln!(f, "  (no readable state file)")?;
            for ns in &self.namespaces {
                writeln!(f, "  namespace {ns}")?;
            }
        }
        for m in &self.mounts {
            writeln!(f, "  mount   {}", m.display())?;
        }
        Ok(())
    }
}

/// What exists of the lab `prefix` (namespaces, state file, mounts). Does not need the lab to be
/// complete; a lab that does not exist at all has no namespaces and `state_dir_exists == false`.
pub fn status(prefix: &str) -> Result<LabStatus> {
    validate_prefix(prefix)?;
    let namespaces = lab_namespaces(prefix, &netns_list()?);
    let dir = state_dir(prefix);
    Ok(LabStatus {
        prefix: prefix.to_owned(),
        namespaces,
        state: LabState::load(prefix).ok(),
        mounts: mounts_under(&dir)?,
        state_dir_exists: dir.is_dir(),
    })
}

/// Every lab that exists: a state directory under `/run/ebpf-proxy-lab`, or a `<prefix>-router`
/// namespace.
pub fn list_labs() -> Result<Vec<LabStatus>> {
    let mut prefixes = std::collections::BTreeSet::new();
    match fs::read_dir(STATE_ROOT) {
        Ok(rd) => {
            for entry in rd {
                let entry = entry.with_context(|| format!("listing {STATE_ROOT}"))?;
                if let Some(name) = entry.file_name().to_str()
                    && validate_prefix(name).is_ok()
                {
                    prefixes.insert(name.to_owned());
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow!(e).context(format!("listing {STATE_ROOT}"))),
    }
    for ns in netns_list()? {
        if let Some(p) = ns.strip_suffix("-router")
            && validate_prefix(p).is_ok()
        {
            prefixes.insert(p.to_owned());
        }
    }
    prefixes.iter().map(|p| status(p)).collect()
}

/// Removes everything of the lab `prefix`, whichever process created it: SIGTERM (then SIGKILL
/// after 2 s) every process inside a `<prefix>-*` namespace, delete those namespaces (which
/// deletes their veths), unmount everything under the state directory, remove it. Idempotent;
/// keeps going after errors and reports them all.
pub fn down_by_prefix(prefix: &str) -> Result<TeardownSummary> {
    ensure_prereqs()?;
    validate_prefix(prefix)?;
    let mut summary = TeardownSummary::default();
    let mut errors = Vec::new();
    let mut namespaces = lab_namespaces(prefix, &netns_list()?);
    // Pods first, the router last (purely cosmetic: deletion order does not matter).
    namespaces.sort_by_key(|ns| {
        let role = &ns[prefix.len() + 1..];
        match role {
            "router" => 3,
            "ext" => 2,
            "node1" | "node2" => 1,
            _ => 0,
        }
    });

    // Processes inside the namespaces.
    let me = std::process::id();
    let pids_in = |errors: &mut Vec<anyhow::Error>| -> Vec<i32> {
        let mut all = Vec::new();
        for ns in &namespaces {
            match ip(&["netns", "pids", ns]) {
                Ok(out) => all.extend(
                    out.split_whitespace()
                        .filter_map(|s| s.parse::<i32>().ok())
                        .filter(|&p| p > 1 && p as u32 != me),
                ),
                Err(e) => errors.push(e),
            }
        }
        all.sort_unstable();
        all.dedup();
        all
    };
    let initial = pids_in(&mut errors);
    summary.processes_killed = initial.len();
    if !initial.is_empty() {
        for &pid in &initial {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut ignore = Vec::new();
        loop {
            let left = pids_in(&mut ignore);
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                for &pid in &left {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(100));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    for ns in &namespaces {
        match ip(&["netns", "delete", ns]) {
            Ok(_) => summary.namespaces_deleted.push(ns.clone()),
            Err(e) => errors.push(e),
        }
    }

    let dir = state_dir(prefix);
    remove_node_cgroups(prefix, &mut summary, &mut errors);
    match mounts_under(&dir) {
        Ok(mut mounts) => {
            // Deepest first.
            mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
            for m in mounts {
                match umount(&m) {
                    Ok(()) => summary.unmounted.push(m),
                    Err(e) => errors.push(e),
                }
            }
        }
        Err(e) => errors.push(e),
    }
    if dir.exists() {
        // Refuse to recurse into anything still mounted (it would delete pins).
        match mounts_under(&dir) {
            Ok(m) if m.is_empty() => match fs::remove_dir_all(&dir) {
                Ok(()) => summary.state_dir_removed = true,
                Err(e) => errors.push(anyhow!(e).context(format!("removing {}", dir.display()))),
            },
            Ok(m) => errors.push(anyhow!(
                "not removing {}: still mounted: {m:?}",
                dir.display()
            )),
            Err(e) => errors.push(e),
        }
    }

    if errors.is_empty() {
        Ok(summary)
    } else {
        let msgs: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
        bail!(
            "tearing down lab {prefix} (partially done: {summary:?}):\n  {}",
            msgs.join("\n  ")
        )
    }
}

// ---------------------------------------------------------------------------------------------
// helpers

/// Creates `<prefix>`'s state dir atomically; false if the prefix is taken.
fn claim_prefix(prefix: &str, existing_netns: &[String]) -> Result<bool> {
    if !lab_namespaces(prefix, existing_netns).is_empty() {
        return Ok(false);
    }
    let dir = state_dir(prefix);
    match fs::create_dir(&dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(anyhow!(e).context(format!("creating {}", dir.display()))),
    }
}

fn lab_namespaces(prefix: &str, all: &[String]) -> Vec<String> {
    let p = format!("{prefix}-");
    all.iter()
        .filter(|ns| ns.starts_with(&p))
        .cloned()
        .collect()
}

/// Names from `ip netns list` (lines look like `name (id: 3)` or `name`).
pub fn netns_list() -> Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// `ip` with a whitespace-separated argument string (lab names never contain spaces).
fn ipw(args: &str) -> Result<String> {
    ip(&args.split_whitespace().collect::<Vec<_>>())
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `ip {}` ({NO_IP})", args.join(" ")))?;
    check_output(&out, &format!("`ip {}`", args.join(" ")))
}

fn check_output(out: &Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn netns_exec_command<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd
}

fn display_argv<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A veth pair `a_if` in namespace `a` <-> `b_if` in namespace `b`, created in place (no
/// temporary names in the host namespace).
fn veth(a: &str, a_if: &str, b: &str, b_if: &str) -> Result<()> {
    ip(&[
        "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
    ])?;
    Ok(())
}

fn set_sysctls(ns: &str, forward: bool) -> Result<()> {
    let mut settings = vec![
        ("net/ipv4/conf/all/rp_filter", "0"),
        ("net/ipv4/conf/default/rp_filter", "0"),
        ("net/ipv4/conf/all/accept_redirects", "0"),
        ("net/ipv4/conf/default/accept_redirects", "0"),
        ("net/ipv4/conf/all/send_redirects", "0"),
        ("net/ipv4/conf/default/send_redirects", "0"),
    ];
    if forward {
        settings.push(("net/ipv4/ip_forward", "1"));
    }
    write_sysctls_in(ns, &settings)
}

/// Writes /proc/sys entries inside a network namespace from a short-lived thread that setns()es
/// into it (/proc/sys/net follows the calling thread's network namespace).
fn write_sysctls_in(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let path = Path::new("/run/netns").join(ns);
    let f = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            // SAFETY: setns on a valid netns fd; it only affects this (short-lived) thread,
            // which touches nothing but /proc/sys.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(anyhow!(io::Error::last_os_error()).context(format!("setns into {ns}")));
            }
            for (key, value) in settings {
                let p = Path::new("/proc/sys").join(key);
                fs::write(&p, value)
                    .with_context(|| format!("setting {} = {value} in {ns}", p.display()))?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| anyhow!("sysctl thread for {ns} panicked"))?
    })
}

fn mount_bpffs(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    let target = CString::new(path.as_os_str().as_bytes()).context("bpffs path")?;
    // SAFETY: valid NUL-terminated strings; data may be NULL.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(anyhow!(io::Error::last_os_error()))
            .with_context(|| format!("mount -t bpf bpf {}", path.display()));
    }
    Ok(())
}

/// Mounts a filesystem without a device (`mount -t <fstype> none <path>`).
fn mount_fs(path: &Path, fstype: &std::ffi::CStr) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    let target = CString::new(path.as_os_str().as_bytes()).context("mount path")?;
    // SAFETY: valid NUL-terminated strings; data may be NULL.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(anyhow!(io::Error::last_os_error()))
            .with_context(|| format!("mount -t {fstype:?} none {}", path.display()));
    }
    Ok(())
}

/// Removes the lab's node cgroups (`<prefix>-*` under its cgroup2 mount; their processes are
/// already gone, and programs attached to them go with them), then unmounts that mount.
fn remove_node_cgroups(
    prefix: &str,
    summary: &mut TeardownSummary,
    errors: &mut Vec<anyhow::Error>,
) {
    let cg = cgroup_mount(prefix);
    match mounts_under(&cg) {
        Ok(m) if m.contains(&cg) => {}
        Ok(_) => return,
        Err(e) => return errors.push(e),
    }
    let p = format!("{prefix}-");
    let dirs: Vec<PathBuf> = match fs::read_dir(&cg) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&p))
            .map(|e| e.path())
            .collect(),
        Err(e) => return errors.push(anyhow!(e).context(format!("listing {}", cg.display()))),
    };
    for d in dirs {
        // A killed process leaves its cgroup a moment after it is reaped: EBUSY until then.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match fs::remove_dir(&d) {
                Ok(()) => {
                    summary.cgroups_removed.push(d);
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    errors.push(anyhow!(e).context(format!("removing cgroup {}", d.display())));
                    break;
                }
            }
        }
    }
    match umount(&cg) {
        Ok(()) => summary.cgroups_removed.push(cg),
        Err(e) => errors.push(e),
    }
}

fn umount(path: &Path) -> Result<()> {
    let target = CString::new(path.as_os_str().as_bytes()).context("mount path")?;
    // SAFETY: valid NUL-terminated string.
    let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // Already gone (EINVAL: not a mount point, ENOENT: no such path) is fine.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(anyhow!(e).context(format!("umount {}", path.display())));
        }
    }
    Ok(())
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort();
    v.dedup();
    Ok(v)
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// SIGTERM every child, wait up to `grace`, SIGKILL the rest, reap all.
fn terminate_children(children: &mut [Tracked], grace: Duration) {
    for t in children.iter_mut() {
        if let Ok(None) = t.child.try_wait() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
            unsafe { libc::kill(t.child.id() as i32, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + grace;
    loop {
        let running = children
            .iter_mut()
            .map(|t| t.child.try_wait())
            .filter(|r| matches!(r, Ok(None)))
            .count();
        if running == 0 {
            return;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    for t in children.iter_mut() {
        if let Ok(None) = t.child.try_wait() {
            let _ = t.child.kill();
            let _ = t.child.wait();
        }
    }
}

fn read_tail(path: &Path) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > LOG_TAIL_BYTES {
        let _ = f.seek(SeekFrom::Start(len - LOG_TAIL_BYTES));
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_demo_is_valid() {
        let spec = LabSpec::default_demo();
        spec.validate().expect("valid");
        let st = LabState::plan("epl1", &spec).expect("plan");
        assert_eq!(st.router_ns, "epl1-router");
        assert_eq!(st.node(2).map(|n| n.ns.as_str()), Some("epl1-node2"));
        assert_eq!(
            st.pod("hostnames-a").map(|p| p.host_veth.as_str()),
            Some("vethhostnames-a")
        );
        assert_eq!(st.all_namespaces().len(), 8);
    }

    #[test]
    fn veth_names_fit() {
        assert_eq!(host_veth_name("client"), "vethclient");
        let long = host_veth_name("a-very-long-pod-name");
        assert_eq!(long.len(), 15);
        assert!(long.starts_with("vetha-very-"));
        assert_ne!(long, host_veth_name("a-very-long-pod-name-2"));
    }

    #[test]
    fn spec_validation() {
        let bad = |name: &str, node, ip: [u8; 4]| LabSpec {
            pods: vec![PodSpec {
                name: name.into(),
                node,
                ip: ip.into(),
            }],
        };
        assert!(bad("router", 1, [10, 76, 0, 5]).validate().is_err());
        assert!(bad("Upper", 1, [10, 76, 0, 5]).validate().is_err());
        assert!(bad("p", 3, [10, 76, 2, 5]).validate().is_err());
        assert!(bad("p", 1, [10, 76, 1, 5]).validate().is_err());
        assert!(bad("p", 1, [10, 76, 0, 1]).validate().is_err());
        assert!(bad("p", 2, [10, 76, 1, 5]).validate().is_ok());
        assert!(validate_prefix("epl12").is_ok());
        assert!(validate_prefix("epl-1").is_err());
        assert!(validate_prefix("1abc").is_err());
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
