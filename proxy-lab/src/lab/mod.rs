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
//! That is the bridge topology ([`Topology::Bridge`], the default). The routed topology
//! ([`Topology::Routed`], `EBPF_PROXY_LAB_TOPOLOGY=routed`) has no cbr0: each pod has its
//! address as a /32 and `default via 169.254.1.1 onlink`, answered by proxy ARP on the host-side
//! veth, and the node routes `10.76.x.y/32 dev veth<pod>` (as kindnet and Calico wire pods).
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
//!
//! Here: [`Lab`] itself; `spec` holds the addresses, [`LabSpec`] and [`LabState`], `status` the
//! out-of-process management, `sys` the `ip`/mount/sysctl edges.

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

mod spec;
mod status;
mod sys;

pub use spec::*;
pub use status::*;
pub use sys::netns_list;
use sys::*;

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
        ensure!(!args.is_empty(), "exec on node {node}: empty command");
        crate::programs::ensure_known(args[0].as_ref())?;
        let argv = in_cgroup(&self.node_cgroup(node), args);
        self.exec(&self.node_ns(node), &argv)
    }

    /// A pod's processes live in its node's cgroup, as on a real node where the socket hooks
    /// sit on the cgroup root and every pod is below it: `args` wrapped to join that cgroup
    /// when `ns` is a pod's namespace, else unchanged.
    fn pod_argv<S: AsRef<OsStr>>(&self, ns: &str, args: &[S]) -> Vec<OsString> {
        match self.state.pods.iter().find(|p| p.ns == ns) {
            Some(pod) => in_cgroup(&self.node_cgroup(pod.node), args),
            None => args.iter().map(|a| a.as_ref().to_owned()).collect(),
        }
    }

    /// Runs `ip netns exec <ns> <args...>` to completion and returns its output whatever the
    /// exit status (errors only if it cannot be started).
    pub fn exec<S: AsRef<OsStr>>(&self, ns: &str, args: &[S]) -> Result<Output> {
        ensure!(!args.is_empty(), "exec in {ns}: empty command");
        crate::programs::ensure_known(args[0].as_ref())?;
        netns_exec_command(ns, &self.pod_argv(ns, args))
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
        crate::programs::ensure_known(args[0].as_ref())?;
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
        let child = netns_exec_command(ns, &self.pod_argv(ns, args))
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

        // Nodes: uplink on the fabric, cbr0 for the pods (bridge topology), the cloud route for
        // the pod CIDR.
        for node in &st.nodes {
            let n = node.ns.as_str();
            let port = format!("node{}", node.node);
            veth(n, UPLINK_IF, r, &port)?;
            ipw(&format!("-n {r} link set {port} master {fabric} up"))?;
            ipw(&format!("-n {n} addr add {}/24 dev {UPLINK_IF}", node.ip))?;
            ipw(&format!("-n {n} link set {UPLINK_IF} up"))?;
            if let Some(bridge_ip) = node.bridge_ip {
                ipw(&format!("-n {n} link add {BRIDGE_IF} type bridge"))?;
                ipw(&format!(
                    "-n {n} link set {BRIDGE_IF} address 02:76:00:00:{:02x}:01",
                    node.node
                ))?;
                ipw(&format!("-n {n} addr add {bridge_ip}/24 dev {BRIDGE_IF}"))?;
                ipw(&format!("-n {n} link set {BRIDGE_IF} up"))?;
            }
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

        // Pods: eth0 in the pod, veth<pod> in the node: a cbr0 port (bridge), or routed.
        for pod in &st.pods {
            let node = st.node(pod.node).context("pod node missing")?;
            let (p, n, pif, hv) = (&pod.ns, &node.ns, &pod.pod_if, &pod.host_veth);
            veth(p, pif, n, hv)?;
            match node.bridge_ip {
                Some(gw) => {
                    ipw(&format!("-n {n} link set {hv} master {BRIDGE_IF} up"))?;
                    ipw(&format!("-n {p} addr add {}/24 dev {pif}", pod.ip))?;
                    ipw(&format!("-n {p} link set {pif} up"))?;
                    ipw(&format!("-n {p} route add default via {gw}"))?;
                }
                None => {
                    // Calico's wiring: the pod's /32, its gateway a link-local address that
                    // the host-side veth answers by proxy ARP (at once: proxy_delay 0), and
                    // the pod's /32 routed to its veth in the node.
                    write_sysctls_in(
                        n,
                        &[
                            (&format!("net/ipv4/conf/{hv}/proxy_arp"), "1"),
                            (&format!("net/ipv4/neigh/{hv}/proxy_delay"), "0"),
                        ],
                    )?;
                    ipw(&format!("-n {n} link set {hv} up"))?;
                    ipw(&format!("-n {p} addr add {}/32 dev {pif}", pod.ip))?;
                    ipw(&format!("-n {p} link set {pif} up"))?;
                    ipw(&format!(
                        "-n {p} route add {ROUTED_GATEWAY} dev {pif} scope link"
                    ))?;
                    ipw(&format!(
                        "-n {p} route add default via {ROUTED_GATEWAY} dev {pif} onlink"
                    ))?;
                    ipw(&format!("-n {n} route add {}/32 dev {hv}", pod.ip))?;
                }
            }
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

/// `args` run by a shell that first moves itself into `cgroup` (then execs, so the program
/// and its children stay there).
fn in_cgroup<S: AsRef<OsStr>>(cgroup: &Path, args: &[S]) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![
        "sh".into(),
        "-c".into(),
        "echo $$ > \"$0\" && exec \"$@\"".into(),
        cgroup.join("cgroup.procs").into_os_string(),
    ];
    argv.extend(args.iter().map(|a| a.as_ref().to_owned()));
    argv
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
    fn the_routed_topology_has_no_bridge() {
        let spec = LabSpec {
            topology: Topology::Routed,
            ..LabSpec::default_demo()
        };
        let st = LabState::plan("epl1", &spec).expect("plan");
        assert!(st.nodes.iter().all(|n| n.bridge_ip.is_none()));
        let spec = LabSpec {
            topology: Topology::Bridge,
            ..spec
        };
        let st = LabState::plan("epl1", &spec).expect("plan");
        assert_eq!(
            st.node(2).and_then(|n| n.bridge_ip),
            Some(node_bridge_ip(2))
        );
        assert_eq!(Topology::parse("routed"), Ok(Topology::Routed));
        assert_eq!(Topology::parse(""), Ok(Topology::Bridge));
        assert!(Topology::parse("flat").is_err());
        // Lab state written before topologies existed reads as bridge.
        let old: LabSpec = serde_json::from_str(r#"{"pods":[]}"#).expect("old spec");
        assert_eq!(old.topology, Topology::Bridge);
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
            topology: Topology::Bridge,
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
    fn agent_status_files_of_one_lab_only() {
        let dir = std::env::temp_dir().join(format!("epl-status-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let names = [
            "run-ebpf-proxy-lab-epl12-bpffs-node1.json",
            "run-ebpf-proxy-lab-epl12-bpffs-node2.json.4242",
            "run-ebpf-proxy-lab-epl123-bpffs-node1.json",
            "sys-fs-bpf.json",
        ];
        for n in names {
            fs::write(dir.join(n), "{}").unwrap();
        }
        let got = agent_status_files("epl12", &dir);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(got, [dir.join(names[0]), dir.join(names[1])]);
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
