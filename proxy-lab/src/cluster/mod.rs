//! A two-node "cluster" in the lab: pods serving their names, an ebpf-proxy agent in each node
//! namespace reading a manifests directory, and helpers to probe services from pods. Shared by
//! `cargo xtask demo` and the end-to-end tests.
//!
//! Here: [`Cluster`] (agents, probes, `inspect`) and [`Binaries`] (with an optional past
//! release's agent, [`ReleaseAgent`], for upgrade tests); `manifests` writes the API objects,
//! `kube` runs the lab API server, `canary` the long-lived-connection checks.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::lab::{BRIDGE_IF, Lab, LabSpec, NODES, POD_SERVER_PORT, Topology};

mod canary;
mod conntrack;
mod daemonset;
mod kube;
mod manifests;

pub use canary::*;
pub use conntrack::*;
pub use daemonset::*;
pub use manifests::*;

/// The demo service's ClusterIP and port.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const SERVICE_PORT: u16 = 80;

/// The canary service (long-lived connections): ClusterIP, port, and the pods' echo port
/// (`serve-hostname --echo`, TCP and UDP).
pub const CANARY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const CANARY_PORT: u16 = 7;
pub const CANARY_POD_PORT: u16 = 9377;

/// The NodePort canary service `canary-np` (same echo pods, [`CANARY_POD_PORT`]): its
/// ClusterIP, and the NodePorts of its TCP and UDP ports. externalTrafficPolicy Cluster, so a
/// client outside reaching node1's NodePort is masqueraded (to node1's address) and may be
/// forwarded to an endpoint on node2.
pub const CANARY_NP_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
pub const CANARY_NP_TCP: u16 = 30207;
pub const CANARY_NP_UDP: u16 = 30208;
/// `canary-np`'s LoadBalancer IP (IPIP/GUE-wrapped traffic to the nodes; the router also
/// spreads it over the nodes plain, as every IP of [`crate::lab::LB_CIDR`]).
pub const CANARY_LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 207);

/// The programs the lab runs: the agent under test and the lab tools.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `ebpf-proxy`: the product (agent, `inspect`, `trace`).
    pub agent: PathBuf,
    /// `ebpf-proxy-lab`: pod servers, probes, canaries, the lab API server, the encapsulator.
    pub tools: PathBuf,
    /// A past release's agent: when set, [`Cluster::up`] starts every node's agent from it
    /// (the lab's pods, probes and canaries still come from `tools`), and a node switches to
    /// `agent` with [`Cluster::use_tree_agent`] (an upgrade).
    pub release: Option<ReleaseAgent>,
}

/// A past release's `ebpf-proxy` (built by [`crate::releases::build`]) and the `run` flags of
/// today's lab it does not know, which [`Cluster::start_agent`] leaves out.
#[derive(Clone, Debug)]
pub struct ReleaseAgent {
    /// The release's name, e.g. `v0.1.0`.
    pub name: String,
    pub agent: PathBuf,
    /// (flag, takes a value): see [`crate::releases::UNKNOWN_RUN_FLAGS`].
    pub unknown_flags: &'static [(&'static str, bool)],
}

impl ReleaseAgent {
    /// Release `rel`'s agent at `agent`, with its entry of the unknown-flags table.
    pub fn new(rel: &crate::releases::Release, agent: &Path) -> Self {
        Self {
            name: rel.name.clone(),
            agent: agent.to_path_buf(),
            unknown_flags: rel.unknown_run_flags(),
        }
    }

    /// `args` (argv, program first) without the flags this release does not know (and their
    /// values: `--flag value` and `--flag=value`).
    pub fn filter_args(&self, args: &[String]) -> Vec<String> {
        let mut out = Vec::with_capacity(args.len());
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let unknown = self.unknown_flags.iter().find(|(f, _)| {
                a == f || a.strip_prefix(f).is_some_and(|rest| rest.starts_with('='))
            });
            match unknown {
                Some((f, takes_value)) => {
                    if *takes_value && a == f {
                        it.next();
                    }
                }
                None => out.push(a.clone()),
            }
        }
        out
    }
}

impl Binaries {
    /// Both paths made absolute (the lab runs them from other namespaces and directories).
    pub fn canonicalize(&self) -> Result<Self> {
        Ok(Self {
            agent: fs::canonicalize(&self.agent)
                .with_context(|| format!("ebpf-proxy binary {}", self.agent.display()))?,
            tools: fs::canonicalize(&self.tools)
                .with_context(|| format!("ebpf-proxy-lab binary {}", self.tools.display()))?,
            release: match &self.release {
                Some(r) => Some(ReleaseAgent {
                    agent: fs::canonicalize(&r.agent).with_context(|| {
                        format!("release {} agent {}", r.name, r.agent.display())
                    })?,
                    ..r.clone()
                }),
                None => None,
            },
        })
    }

    /// `ebpf-proxy-lab` next to `ebpf-proxy` (both built into the same target directory).
    pub fn beside(agent: &Path) -> Self {
        Self {
            agent: agent.to_path_buf(),
            tools: agent.with_file_name("ebpf-proxy-lab"),
            release: None,
        }
    }
}

/// The lab with agents running.
pub struct Cluster {
    pub lab: Lab,
    pub bins: Binaries,
    pub manifests: PathBuf,
    agents: BTreeMap<u8, u32>,
    /// Kubernetes mode: the lab API server the agents watch (`None`: agents read
    /// `manifests` directly).
    kube: Option<LabApiServer>,
    /// Agents started as the rendered DaemonSet's container (Kubernetes mode).
    daemonset: Option<Box<DaemonSetAgent>>,
    /// Extra `ebpf-proxy run` arguments for agents started from now on (e.g. `--xdp-mode`).
    pub agent_args: Vec<String>,
    /// Nodes whose agent comes from `bins.release` (all of them at first when it is set).
    release_nodes: BTreeSet<u8>,
}

/// How [`Cluster::up_with`] starts the agents.
enum Mode {
    /// `run --manifests`.
    Manifests,
    /// `run --kubeconfig`, the lab API server.
    Kube,
    /// As the rendered DaemonSet's container, the lab API server.
    DaemonSet(Box<DaemonSetAgent>),
}

/// `ebpf-proxy-lab lab-apiserver` serving the manifests directory, in the router namespace (every
/// node reaches the router's fabric address, like a control plane outside the nodes).
#[derive(Debug)]
pub struct LabApiServer {
    /// Running process, `None` while killed.
    pub pid: Option<u32>,
    pub kubeconfig: PathBuf,
}

/// Where the lab API server listens (the router's fabric address).
pub const API_SERVER_ADDR: (Ipv4Addr, u16) = (crate::lab::ROUTER_FABRIC_IP, 6443);

impl Cluster {
    /// Brings up the lab, starts the pod servers, writes the manifests and starts both agents.
    /// Returns once both agents have programmed the service with `endpoints.len()` endpoints.
    pub fn up(
        bins: &Binaries,
        spec: &LabSpec,
        endpoints: &[Endpoint],
        say: &dyn Fn(&str),
    ) -> Result<Self> {
        Self::up_from(bins, spec, endpoints, None, say)
    }

    /// Like [`Cluster::up`], but copies the manifests from `src` (YAML files) instead of
    /// generating them; `endpoints` must describe what `src` holds.
    pub fn up_from(
        bins: &Binaries,
        spec: &LabSpec,
        endpoints: &[Endpoint],
        src: Option<&Path>,
        say: &dyn Fn(&str),
    ) -> Result<Self> {
        Self::up_with(bins, spec, endpoints, src, Mode::Manifests, &[], say)
    }

    /// Like [`Cluster::up`], with extra `ebpf-proxy run` arguments from the first start on
    /// (e.g. `--conntrack-max`: map sizes cannot change once the maps are pinned).
    pub fn up_with_agent_args(
        bins: &Binaries,
        spec: &LabSpec,
        endpoints: &[Endpoint],
        agent_args: &[String],
        say: &dyn Fn(&str),
    ) -> Result<Self> {
        Self::up_with(
            bins,
            spec,
            endpoints,
            None,
            Mode::Manifests,
            agent_args,
            say,
        )
    }

    /// Like [`Cluster::up`], in Kubernetes mode: `ebpf-proxy-lab lab-apiserver` serves the
    /// manifests directory (so the manifest helpers change API objects) and the agents run
    /// with `--kubeconfig`.
    pub fn up_kube(
        bins: &Binaries,
        spec: &LabSpec,
        endpoints: &[Endpoint],
        say: &dyn Fn(&str),
    ) -> Result<Self> {
        Self::up_with(bins, spec, endpoints, None, Mode::Kube, &[], say)
    }

    /// Like [`Cluster::up_kube`], with every agent started as `ds`'s container would be on
    /// that node ([`crate::daemonset`]): its command line, environment, volumes (the
    /// ConfigMaps of `ds`), capabilities and root file system, instead of the lab's command
    /// line.
    pub fn up_kube_daemonset(
        bins: &Binaries,
        spec: &LabSpec,
        endpoints: &[Endpoint],
        ds: DaemonSetAgent,
        say: &dyn Fn(&str),
    ) -> Result<Self> {
        let mode = Mode::DaemonSet(Box::new(ds));
        Self::up_with(bins, spec, endpoints, None, mode, &[], say)
    }

    fn up_with(
        bins: &Binaries,
        spec: &LabSpec,
        endpoints: &[Endpoint],
        src: Option<&Path>,
        mode: Mode,
        agent_args: &[String],
        say: &dyn Fn(&str),
    ) -> Result<Self> {
        let (kube, daemonset) = match mode {
            Mode::Manifests => (false, None),
            Mode::Kube => (true, None),
            Mode::DaemonSet(ds) => (true, Some(ds)),
        };
        say(&match spec.topology {
            Topology::Bridge => {
                "creating the lab (bridge topology): router, node1, node2, external client, pods \
                 on cbr0 bridges"
                    .to_owned()
            }
            Topology::Routed => format!(
                "creating the lab (routed topology): router, node1, node2, external client, \
                 pods on routed veths (/32 routes, gateway {} by proxy ARP), no bridge",
                crate::lab::ROUTED_GATEWAY
            ),
        });
        let lab = Lab::up(None, spec)?;
        say("starting serve-hostname in every pod (TCP and UDP :9376)");
        lab.start_pod_servers(&bins.tools)?;
        let manifests = lab.state_dir().join("manifests");
        fs::create_dir_all(&manifests)?;
        match src {
            Some(src) => {
                say(&format!("copying the manifests from {}", src.display()));
                for e in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
                    let p = e?.path();
                    if p.extension().is_some_and(|x| x == "yaml") {
                        fs::copy(&p, manifests.join(p.file_name().context("file name")?))?;
                    }
                }
            }
            None => {
                fs::write(manifests.join("service.yaml"), service_yaml())?;
                fs::write(manifests.join("nodes.yaml"), nodes_yaml())?;
                fs::write(manifests.join("endpointslice.yaml"), slice_yaml(endpoints))?;
            }
        }
        let mut c = Cluster {
            lab,
            bins: bins.canonicalize()?,
            manifests,
            agents: BTreeMap::new(),
            kube: None,
            daemonset,
            agent_args: agent_args.to_vec(),
            release_nodes: if bins.release.is_some() {
                NODES.into_iter().collect()
            } else {
                BTreeSet::new()
            },
        };
        if kube {
            say("starting the lab API server (serving the manifests over list/watch)");
            let kubeconfig = c.lab.state_dir().join("kubeconfig");
            c.kube = Some(LabApiServer {
                pid: None,
                kubeconfig,
            });
            c.start_apiserver()?;
        }
        for n in NODES {
            c.start_agent(n)?;
        }
        say("agents started in node1 and node2; waiting for them to program the maps");
        let want = endpoints.iter().filter(|e| e.ready).count();
        for n in NODES {
            c.wait_programmed(n, want, Duration::from_secs(20))?;
        }
        Ok(c)
    }

    /// The tree's agent command line for `node` (argv, program first): what
    /// [`Cluster::start_agent`] runs, before a release's unknown flags are left out.
    pub fn agent_command(&self, node: u8) -> Vec<String> {
        let bpffs = self.lab.bpffs(node);
        let source = match &self.kube {
            Some(k) => ["--kubeconfig".into(), k.kubeconfig.display().to_string()],
            None => ["--manifests".into(), self.manifests.display().to_string()],
        };
        let args: Vec<String> = vec![
            self.bins.agent.display().to_string(),
            "run".into(),
            source[0].clone(),
            source[1].clone(),
            "--node-name".into(),
            format!("node{node}"),
            "--bpffs".into(),
            bpffs.display().to_string(),
            // Socket-level balancing for the node's host processes: only this node's cgroup
            // (every lab node shares the machine's cgroup hierarchy).
            "--cgroup-path".into(),
            self.lab.node_cgroup(node).display().to_string(),
            "--cluster-cidr".into(),
            "10.76.0.0/16".into(),
        ];
        // The bridge topology names its bridge; the routed one has none, so its agents find
        // the pods' veths by themselves (the default).
        let pods: Vec<String> = match self.lab.state().spec.topology {
            Topology::Bridge => vec!["--pod-bridge-interface".into(), BRIDGE_IF.into()],
            Topology::Routed => Vec::new(),
        };
        // A test's own --tc-attach wins over the environment's.
        let tc: Vec<String> = crate::lab::tc_attach_from_env()
            .filter(|_| !self.agent_args.iter().any(|a| a == "--tc-attach"))
            .map(|m| vec!["--tc-attach".into(), m])
            .unwrap_or_default();
        args.into_iter()
            .chain(pods)
            .chain(tc)
            .chain(self.agent_args.clone())
            .collect()
    }

    /// Starts the agent on `node`: the tree's, or the release's while the node runs it
    /// ([`Binaries::release`]), without the flags that release does not know.
    pub fn start_agent(&mut self, node: u8) -> Result<u32> {
        if self.daemonset.is_some() {
            let args = self.daemonset_launch(node)?;
            let pid = self.lab.spawn(&self.lab.node_ns(node), &args)?;
            self.agents.insert(node, pid);
            return Ok(pid);
        }
        let mut args = self.agent_command(node);
        if let Some(r) = self.node_release(node) {
            args[0] = r.agent.display().to_string();
            args = r.filter_args(&args);
        }
        let pid = self.lab.spawn(&self.lab.node_ns(node), &args)?;
        self.agents.insert(node, pid);
        Ok(pid)
    }

    /// The release whose agent runs (or would start) on `node`; `None`: the tree's agent.
    pub fn node_release(&self, node: u8) -> Option<&ReleaseAgent> {
        self.bins
            .release
            .as_ref()
            .filter(|_| self.release_nodes.contains(&node))
    }

    /// The `ebpf-proxy` binary for `node`: the release's while its agent runs there, else the
    /// tree's. `inspect` uses it too (each version reads its own pins).
    pub fn node_agent_binary(&self, node: u8) -> &Path {
        self.node_release(node)
            .map_or(self.bins.agent.as_path(), |r| r.agent.as_path())
    }

    /// Agents started on `node` from now on are the tree's (after the release's agent was
    /// stopped: [`Cluster::stop_agent`], then [`Cluster::restart_agent`] upgrades).
    pub fn use_tree_agent(&mut self, node: u8) {
        self.release_nodes.remove(&node);
    }

    /// The running agent's pid on `node`.
    pub fn agent_pid(&self, node: u8) -> Option<u32> {
        self.agents.get(&node).copied()
    }

    /// SIGKILLs the agent on `node` (no chance to clean up, like an OOM kill or a node
    /// crash of the process) and waits until it is gone.
    pub fn kill_agent(&mut self, node: u8) -> Result<()> {
        let pid = self
            .agents
            .get(&node)
            .copied()
            .with_context(|| format!("no agent on node{node}"))?;
        // SAFETY: kill has no memory-safety preconditions; pid is our own child.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } != 0 {
            bail!("kill -9 {pid}: {}", std::io::Error::last_os_error());
        }
        let start = Instant::now();
        while self.lab.child_status(pid)?.is_none() {
            if start.elapsed() > Duration::from_secs(5) {
                bail!("agent {pid} on node{node} survived SIGKILL for 5 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Stops the agent on `node` with SIGTERM (SIGKILL after 3 s) and returns its exit status.
    pub fn stop_agent(&mut self, node: u8) -> Result<std::process::ExitStatus> {
        let pid = self
            .agents
            .get(&node)
            .copied()
            .with_context(|| format!("no agent on node{node}"))?;
        self.lab.stop(pid)
    }

    /// Starts a new agent on `node` (after [`Cluster::kill_agent`] or [`Cluster::stop_agent`])
    /// and waits until it has attached the datapath (adopting the pinned links).
    pub fn restart_agent(&mut self, node: u8, timeout: Duration) -> Result<u32> {
        let pid = self.start_agent(node)?;
        self.wait_agent_log(node, "datapath on ", timeout)?;
        Ok(pid)
    }

    /// Waits until the current agent's log on `node` contains `needle`.
    pub fn wait_agent_log(&self, node: u8, needle: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if let Some(pid) = self.agents.get(&node)
                && let Some(st) = self.lab.child_status(*pid)?
            {
                bail!(
                    "agent on node{node} exited ({st}):\n{}",
                    self.agent_log(node)
                );
            }
            if self.agent_log(node).contains(needle) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "agent on node{node} did not log {needle:?} within {timeout:?}:\n{}",
                    self.agent_log(node)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `args` (argv, program first) in pod `pod`'s namespace in the background; its
    /// output goes to a log file ([`Lab::log_path`]).
    pub fn spawn_in_pod(&self, pod: &str, args: &[String]) -> Result<u32> {
        self.lab.spawn(&self.lab.pod_ns(pod), args)
    }

    /// Starts `serve-hostname --echo` on [`CANARY_POD_PORT`] in each of `endpoints`' pods and
    /// adds the canary Service and EndpointSlice to the manifests; returns once both agents
    /// programmed it.
    pub fn start_canary_service(&self, endpoints: &[Endpoint]) -> Result<()> {
        // Listening before the service points at them: a SYN to a port nobody listens on yet
        // is refused, and the canary counts that connection as never established.
        let pods: Vec<&str> = endpoints.iter().map(|e| e.pod.as_str()).collect();
        self.start_pod_servers_on(&pods, CANARY_POD_PORT, &["--echo"])?;
        let tmp = self.manifests.join(".canary.yaml.tmp");
        fs::write(&tmp, canary_yaml(endpoints))?;
        fs::rename(&tmp, self.manifests.join("canary.yaml"))?;
        let key = format!("{CANARY_IP}:{CANARY_PORT}/TCP");
        for n in NODES {
            let start = Instant::now();
            loop {
                let v = self.inspect(n)?;
                let got = v["services"].as_array().and_then(|s| {
                    s.iter()
                        .find(|x| x["service"] == key.as_str())
                        .and_then(|x| x["endpoints"].as_array())
                        .map(|e| e.len())
                });
                if got == Some(endpoints.len()) {
                    break;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    bail!(
                        "node{n} did not program the canary service; agent log:\n{}",
                        self.agent_log(n)
                    );
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        Ok(())
    }

    /// Adds the NodePort canary `canary-np` ([`canary_np_yaml`]) over the echo servers
    /// [`Cluster::start_canary_service`] started in `endpoints`' pods; returns once both agents
    /// programmed it and node1's NodePorts answer the external client over TCP and UDP.
    pub fn start_canary_nodeport(&self, endpoints: &[Endpoint]) -> Result<()> {
        self.write_manifest("canary-np.yaml", &canary_np_yaml(endpoints))?;
        let key = format!("{CANARY_NP_IP}:{CANARY_PORT}/TCP");
        for n in NODES {
            self.wait_service_endpoints(n, &key, endpoints.len(), Duration::from_secs(10))?;
        }
        let ext = self.lab.ext_ns();
        let node1 = crate::lab::node_ip(1);
        for (port, udp) in [(CANARY_NP_TCP, false), (CANARY_NP_UDP, true)] {
            let target = format!("{node1}:{port}");
            let start = Instant::now();
            loop {
                let p = self.probe_in(&ext, &target, udp, 3, 1000)?;
                if p.ok() == 3 {
                    break;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    bail!(
                        "NodePort canary {target} (udp={udp}) does not answer the external \
                         client: {:?}; node1 agent log:\n{}",
                        p.0,
                        self.agent_log(1)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// `curl` of `url` from inside node `node`'s namespace: (HTTP status, body).
    pub fn http_get(&self, node: u8, url: &str) -> Result<(u16, String)> {
        let out = self.lab.exec(
            &self.lab.node_ns(node),
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
                url,
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').with_context(|| {
            format!("curl {url}: {text}{}", String::from_utf8_lossy(&out.stderr))
        })?;
        let code = code.trim().parse().with_context(|| {
            format!(
                "curl {url}: status {code:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((code, body.to_owned()))
    }

    pub fn agent_log(&self, node: u8) -> String {
        self.agents
            .get(&node)
            .and_then(|pid| self.lab.log_path(*pid))
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The lab API server's kubeconfig (Kubernetes mode only).
    pub fn kubeconfig(&self) -> Option<&Path> {
        self.kube.as_ref().map(|k| k.kubeconfig.as_path())
    }

    /// `ebpf-proxy inspect --json` against node `node`'s pins.
    pub fn inspect(&self, node: u8) -> Result<serde_json::Value> {
        // In the node's network namespace: netlink tc filters (--tc-attach=netlink) are per
        // namespace, unlike pins.
        let out = self.lab.exec(
            &self.lab.node_ns(node),
            &[
                self.node_agent_binary(node).display().to_string(),
                "inspect".into(),
                "--json".into(),
                "--bpffs".into(),
                self.lab.bpffs(node).display().to_string(),
            ],
        )?;
        if !out.status.success() {
            bail!("inspect failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `ebpf-proxy cleanup` for node `node`, in its network namespace as on a node: netlink tc
    /// filters (`--tc-attach=netlink`) are per namespace, unlike pins.
    pub fn cleanup(&self, node: u8) -> Result<std::process::Output> {
        self.lab.exec(
            &self.lab.node_ns(node),
            &[
                self.bins.agent.display().to_string(),
                "cleanup".into(),
                "--bpffs".into(),
                self.lab.bpffs(node).display().to_string(),
            ],
        )
    }

    /// Waits until node `node`'s TCP entry of the service has `want` endpoints.
    pub fn wait_programmed(&self, node: u8, want: usize, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let key = format!("{CLUSTER_IP}:{SERVICE_PORT}/TCP");
        loop {
            if let Some(pid) = self.agents.get(&node)
                && let Some(st) = self.lab.child_status(*pid)?
            {
                bail!(
                    "agent on node{node} exited ({st}):\n{}",
                    self.agent_log(node)
                );
            }
            if let Ok(v) = self.inspect(node) {
                let n = v["services"].as_array().and_then(|s| {
                    s.iter()
                        .find(|x| x["service"] == key.as_str())
                        .and_then(|x| x["endpoints"].as_array())
                        .map(|e| e.len())
                });
                if n == Some(want) {
                    return Ok(start.elapsed());
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "node{node} did not program {want} endpoints within {timeout:?}; agent log:\n{}",
                    self.agent_log(node)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Rewrites the EndpointSlice (as the endpoints controller would after a scale).
    pub fn set_endpoints(&self, endpoints: &[Endpoint]) -> Result<()> {
        let path = self.manifests.join("endpointslice.yaml");
        let tmp = self.manifests.join(".endpointslice.yaml.tmp");
        fs::write(&tmp, slice_yaml(endpoints))?;
        // Atomic replace: the agent never reads a half-written file.
        fs::rename(&tmp, &path).context("replacing the EndpointSlice manifest")?;
        Ok(())
    }

    /// `ebpf-proxy-lab probe` from inside pod `pod`.
    pub fn probe(&self, pod: &str, target: &str, udp: bool, count: u32) -> Result<Probe> {
        self.probe_in(&self.lab.pod_ns(pod), target, udp, count, 2000)
    }

    /// `ebpf-proxy-lab probe` from any lab namespace (a pod, a node, `ext`).
    pub fn probe_in(
        &self,
        ns: &str,
        target: &str,
        udp: bool,
        count: u32,
        timeout_ms: u32,
    ) -> Result<Probe> {
        let mut args: Vec<String> = vec![
            self.bins.tools.display().to_string(),
            "probe".into(),
            target.into(),
            "--count".into(),
            count.to_string(),
            "--timeout-ms".into(),
            timeout_ms.to_string(),
            "--json".into(),
        ];
        if udp {
            args.push("--udp".into());
        }
        let out = self.lab.exec(ns, &args)?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "probe output: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok(Probe(v))
    }
}

/// A probe report (the JSON of `ebpf-proxy-lab probe --json`).
#[derive(Debug)]
pub struct Probe(pub serde_json::Value);

impl Probe {
    fn map(&self, k: &str) -> BTreeMap<String, u64> {
        self.0[k]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    }
    pub fn sent(&self) -> u64 {
        self.0["sent"].as_u64().unwrap_or(0)
    }
    pub fn ok(&self) -> u64 {
        self.0["ok"].as_u64().unwrap_or(0)
    }
    /// Pod name -> answers.
    pub fn answers(&self) -> BTreeMap<String, u64> {
        self.map("answers")
    }
    /// Address the client saw the reply come from -> count.
    pub fn reply_sources(&self) -> BTreeMap<String, u64> {
        self.map("reply_sources")
    }
    pub fn failures(&self) -> BTreeMap<String, u64> {
        self.map("failures")
    }
    /// Client address the server saw -> count.
    pub fn seen_by_server(&self) -> BTreeMap<String, u64> {
        self.map("client_addrs_seen_by_server")
    }
}

/// The agent's map-size flags for `services` x `endpoints` (benches at 10^4-10^5 services),
/// with headroom for a plan's make-before-break overlap and the benches' changes.
pub fn agent_map_size_flags(services: usize, endpoints: usize) -> Vec<String> {
    let slack = |x: usize| (x + x / 8 + 1024).to_string();
    vec![
        "--max-services".into(),
        slack(services),
        "--service-map-entries".into(),
        slack(services * (endpoints + 1)),
        "--max-backends".into(),
        slack(services * endpoints),
        "--max-cluster-ips".into(),
        slack(services),
    ]
}

/// For lab tests: the binaries under test, `EBPF_PROXY_BIN` (the agent) and
/// `EBPF_PROXY_LAB_BIN` (the lab tools) as `cargo xtask test` sets them, else
/// `target/release/ebpf-proxy` and `ebpf-proxy-lab` beside it. Panics with the fix when not
/// root or when a binary is missing: lab tests never skip silently.
pub fn test_binaries() -> Binaries {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "lab tests need root (network namespaces, veth, BPF, cgroups): run `cargo xtask \
             test` as root"
        );
    }
    let agent = std::env::var_os("EBPF_PROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/ebpf-proxy")
        });
    let mut bins = Binaries::beside(&agent);
    if let Some(t) = std::env::var_os("EBPF_PROXY_LAB_BIN") {
        bins.tools = PathBuf::from(t);
    }
    for (p, var) in [
        (&bins.agent, "EBPF_PROXY_BIN"),
        (&bins.tools, "EBPF_PROXY_LAB_BIN"),
    ] {
        assert!(
            p.is_file(),
            "{} not found: build it first (cargo xtask build) or set {var}",
            p.display()
        );
    }
    bins
}

/// For upgrade tests: release `name`'s agent, from the environment variable `cargo xtask test`
/// sets ([`crate::releases::bin_env_var`], e.g. `EBPF_PROXY_V0_1_0_BIN`), else from the
/// release cache. Panics with the fix when it is missing: the test never skips.
pub fn test_release_agent(name: &str) -> ReleaseAgent {
    let rel = crate::releases::release(name).unwrap_or_else(|e| panic!("{e:#}"));
    let var = crate::releases::bin_env_var(name);
    let agent = std::env::var_os(&var)
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::releases::cached_agent(&rel));
    assert!(
        agent.is_file(),
        "release {name}'s agent {} not found: build it with `cargo xtask build-release {name}` \
         (`cargo xtask test` does) or set {var}",
        agent.display()
    );
    ReleaseAgent::new(&rel, &agent)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundled manifests are exactly what the generators produce for the demo lab, so the
    /// demo's scale step (which regenerates the slice) edits what was loaded.
    #[test]
    fn bundled_demo_manifests_match_the_generators() {
        let dir = demo_manifests_dir();
        let eps = hostnames_endpoints(&LabSpec::default_demo());
        for (file, want) in [
            ("service.yaml", service_yaml()),
            ("endpointslice.yaml", slice_yaml(&eps)),
            ("nodes.yaml", nodes_yaml()),
        ] {
            let got = fs::read_to_string(dir.join(file)).expect("bundled manifest");
            assert_eq!(
                got, want,
                "{file} differs from the generator; regenerate it"
            );
        }
    }

    #[test]
    fn a_release_agent_is_started_without_the_flags_it_does_not_know() {
        let r = ReleaseAgent {
            name: "old".into(),
            agent: PathBuf::from("/old/ebpf-proxy"),
            unknown_flags: &[("--new-value", true), ("--new-switch", false)],
        };
        let args: Vec<String> = [
            "ebpf-proxy",
            "run",
            "--new-value",
            "1",
            "--bpffs",
            "/b",
            "--new-value=2",
            "--new-switch",
            "--new-valueish",
            "x",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            r.filter_args(&args),
            ["ebpf-proxy", "run", "--bpffs", "/b", "--new-valueish", "x"]
        );
    }
}
