//! The lab's plan: fixed addresses and names, the pods asked for ([`LabSpec`]), and the state
//! file ([`LabState`]) naming every namespace, interface and mount of one lab.
use super::*;

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

pub(super) const NOT_ROOT: &str =
    "the lab needs root (network namespaces, veth, bpffs): run as root or with sudo";
pub(super) const NO_IP: &str = "the lab needs the `ip` command from iproute2: install iproute2";
pub(super) const MAX_PREFIX_LEN: usize = 12;
pub(super) const MAX_POD_NAME_LEN: usize = 48;
pub(super) const LOG_TAIL_BYTES: u64 = 4096;

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

/// The environment variable that picks the topology of [`LabSpec::default_demo`] (what the
/// e2e tests build): `bridge` (default) or `routed`.
pub const TOPOLOGY_ENV: &str = "EBPF_PROXY_LAB_TOPOLOGY";
/// The environment variable that makes every lab agent run with `--tc-attach <value>`
/// (`netlink` forces the cls_bpf fallback of kernels without TCX); unset: the agent's default.
pub const TC_ATTACH_ENV: &str = "EBPF_PROXY_LAB_TC_ATTACH";

/// `--tc-attach` for the lab's agents, from [`TC_ATTACH_ENV`] (`None`: unset or empty).
pub fn tc_attach_from_env() -> Option<String> {
    std::env::var(TC_ATTACH_ENV)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// The routed topology's pod gateway: link-local, answered by proxy ARP on the host-side
/// veth (as Calico does).
pub const ROUTED_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// How pods are wired into their node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// Pods' host-side veths are ports of a bridge (cbr0, the pods' gateway .1): the bridge
    /// plugin, kubenet, flannel. The agents run with `--pod-bridge-interface cbr0`.
    #[default]
    Bridge,
    /// No bridge: each pod has a /32 and a default route via 169.254.1.1 onlink, answered by
    /// proxy ARP on its host-side veth; the node routes each pod's /32 to its veth (kindnet,
    /// Calico). The agents run without a bridge flag (default pod discovery).
    Routed,
}

impl Topology {
    /// [`TOPOLOGY_ENV`], else bridge. Panics on another value (a test run misconfigured).
    pub fn from_env() -> Self {
        match std::env::var(TOPOLOGY_ENV) {
            Err(_) => Self::Bridge,
            Ok(v) => Self::parse(&v).unwrap_or_else(|e| panic!("{TOPOLOGY_ENV}: {e}")),
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "bridge" => Ok(Self::Bridge),
            "routed" => Ok(Self::Routed),
            o => Err(format!("topology {o:?}: expected bridge or routed")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Bridge => "bridge",
            Self::Routed => "routed",
        }
    }
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A node's bridge (cbr0) address, the pods' gateway in the bridge topology: 10.76.(N-1).1.
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
    #[serde(default)]
    pub topology: Topology,
}

impl LabSpec {
    /// `hostnames-a` 10.76.0.10 and `hostnames-b` 10.76.0.11 on node1, `hostnames-c` 10.76.1.10
    /// on node2, and a client pod `client` 10.76.0.20 on node1; the topology from
    /// [`TOPOLOGY_ENV`] (bridge if unset), so every e2e test runs on either.
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
            topology: Topology::from_env(),
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
    /// Address of `cbr0` (bridge topology; the routed one has no bridge).
    pub bridge_ip: Option<Ipv4Addr>,
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
    /// The host-side veth in the node namespace (a port of cbr0 in the bridge topology).
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
    pub(super) fn plan(prefix: &str, spec: &LabSpec) -> Result<Self> {
        spec.validate()?;
        let dir = state_dir(prefix);
        let nodes = NODES
            .iter()
            .map(|&node| NodeState {
                node,
                ns: format!("{prefix}-node{node}"),
                ip: node_ip(node),
                pod_cidr: node_pod_cidr(node),
                bridge_ip: (spec.topology == Topology::Bridge).then(|| node_bridge_ip(node)),
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

    pub(super) fn save(&self) -> Result<()> {
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
