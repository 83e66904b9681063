//! Lab measurements: connection latency/rate through a ClusterIP, control-plane speed and
//! ruleset memory, ebpf-proxy against kube-proxy's rule layouts and a plain routed path.
//!
//! Topology: the client pod on node1, ten `srvN` pods on node2 (so every mode takes the same
//! path: pod -> node1 -> router -> node2 -> pod, and rule-based modes need no br_netfilter for
//! replies). Rules and the agent live in node1's namespace only, one mode at a time; modes are
//! interleaved per repetition and each is torn down (agent stopped, tables flushed) before
//! the next.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use proxy_lab::cluster::Binaries;
use proxy_lab::lab::{Lab, LabSpec, NODES, POD_SERVER_PORT, PodSpec, node_ip, node_pod_cidr};
use serde_json::{Value, json};

use super::{client::monotonic_ns, rules, rules::Svc};

/// The default service-map size (`proxy_common::sizes::SVC4`) of an agent without
/// `--service-map-entries` (a build before the map-size flags): such runs stay within it.
pub const AGENT_SVC_ENTRIES: usize = 65_536;
const SERVERS: u8 = 10;
/// The target service's NodePort, measured from the external client.
const NODE_PORT: u16 = 30080;
/// How long full programming may take before the target must answer. nft 1.0.6 on 6.18
/// needs about two minutes for 10k services x 10 endpoints in one transaction: the kernel
/// binds each of the 10k anonymous `numgen` verdict maps by walking the transaction list
/// (`__nft_set_trans_bind`), so loading is quadratic.
const FULL_PROGRAM_TIMEOUT: Duration = Duration::from_secs(600);
/// The same for one incremental step.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const CLIENT: &str = "client";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    Routed,
    Ebpf,
    IptLegacy,
    IptNft,
    Nft,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Ebpf,
        Mode::IptLegacy,
        Mode::IptNft,
        Mode::Nft,
        Mode::Routed,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Mode::Routed => "routed (no NAT)",
            Mode::Ebpf => "ebpf-proxy",
            Mode::IptLegacy => "iptables-legacy",
            Mode::IptNft => "iptables-nft",
            Mode::Nft => "nftables",
        }
    }
    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.key() == s)
    }
    pub fn key(self) -> &'static str {
        match self {
            Mode::Routed => "routed",
            Mode::Ebpf => "ebpf",
            Mode::IptLegacy => "iptables_legacy",
            Mode::IptNft => "iptables_nft",
            Mode::Nft => "nftables",
        }
    }
}

pub struct LabOpts {
    pub services: Vec<usize>,
    pub reps: usize,
    pub count: usize,
    pub rate_count: usize,
    pub control_plane_at: Option<usize>,
    /// Modes to run (all by default).
    pub modes: Vec<Mode>,
    /// Extra `ebpf-proxy run` arguments (e.g. `--xdp-mode generic`).
    pub agent_args: Vec<String>,
}

fn server_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 76, 1, 10 + i)
}

/// Endpoints per service: 10, or for an agent without map-size flags (an older build) as
/// many as let `n` services fit its default service map.
pub fn endpoints_for(n: usize, sized_maps: bool) -> usize {
    if sized_maps {
        10
    } else {
        (AGENT_SVC_ENTRIES / n.max(1) - 1).clamp(1, 10)
    }
}

/// `n` services; the target (last) one has the ten real server pods (or `e` of them), the
/// others `e` endpoints at addresses nothing answers on (they only fill the tables).
fn services(n: usize, e: usize) -> Vec<Svc> {
    (0..n)
        .map(|i| {
            let target = i + 1 == n;
            let endpoints = (0..e)
                .map(|j| {
                    if target {
                        (server_ip((j % SERVERS as usize) as u8), POD_SERVER_PORT)
                    } else {
                        let k = (i * e + j) as u32;
                        (
                            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 80, 0, 0)) + 1 + k),
                            POD_SERVER_PORT,
                        )
                    }
                })
                .collect();
            Svc {
                ns: "bench".into(),
                name: format!("svc-{i}"),
                ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 100 + i as u32),
                port: 80,
                endpoints,
                node_port: target.then_some(NODE_PORT),
            }
        })
        .collect()
}

fn manifests(svcs: &[Svc]) -> String {
    let mut o = String::with_capacity(svcs.len() * 700);
    for s in svcs {
        let (kind, node_port) = match s.node_port {
            Some(np) => ("NodePort", format!(", nodePort: {np}")),
            None => ("ClusterIP", String::new()),
        };
        let _ = write!(
            o,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec:\n  type: {kind}\n  clusterIP: {}\n  ports:\n  - {{name: http, port: {}, targetPort: {POD_SERVER_PORT}, protocol: TCP{node_port}}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}-abcde\n  namespace: {}\n  labels: {{kubernetes.io/service-name: {}}}\naddressType: IPv4\nports:\n- {{name: http, port: {POD_SERVER_PORT}, protocol: TCP}}\nendpoints:\n",
            s.name, s.ns, s.ip, s.port, s.name, s.ns, s.name
        );
        for (ip, _) in &s.endpoints {
            let _ = writeln!(o, "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}");
        }
    }
    o
}

fn nodes_yaml() -> String {
    NODES
        .iter()
        .map(|n| {
            format!(
                "---\napiVersion: v1\nkind: Node\nmetadata: {{name: node{n}}}\nspec: {{podCIDR: {}}}\nstatus:\n  addresses:\n  - {{type: InternalIP, address: {}}}\n",
                node_pod_cidr(*n),
                node_ip(*n)
            )
        })
        .collect()
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

struct Bench<'a> {
    lab: Lab,
    bin: PathBuf,
    me: PathBuf,
    dir: PathBuf,
    say: &'a dyn Fn(&str),
    agent: Option<u32>,
    agent_has_cgroup_flag: bool,
    /// The agent takes --max-services and friends (sizes its maps for the run).
    agent_has_size_flags: bool,
    /// Endpoints per service of the current run.
    endpoints: usize,
    agent_args: Vec<String>,
    cgroup: PathBuf,
}

impl Bench<'_> {
    fn node(&self) -> String {
        self.lab.node_ns(1)
    }

    /// Runs `cmd args` in node1 with `stdin` from a file, inside the bench memory cgroup;
    /// returns (wall time, kernel memory charged and still held after exit).
    fn run_in_node(&self, cmd: &str, args: &[&str], stdin: &Path) -> Result<(Duration, i64)> {
        let procs = self.cgroup.join("cgroup.procs");
        let before = read_i64(&self.cgroup.join("memory.kmem.usage_in_bytes"));
        let script = format!(
            "echo $$ > {} && exec ip netns exec {} {cmd} {} < {}",
            procs.display(),
            self.node(),
            args.join(" "),
            stdin.display()
        );
        let t = Instant::now();
        let out = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .output()?;
        let took = t.elapsed();
        if !out.status.success() {
            bail!(
                "{cmd} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
                    .chars()
                    .take(2000)
                    .collect::<String>()
            );
        }
        let after = read_i64(&self.cgroup.join("memory.kmem.usage_in_bytes"));
        Ok((took, after - before))
    }

    fn node_sh(&self, script: &str) -> Result<()> {
        let out = self.lab.exec(&self.node(), &["sh", "-c", script])?;
        if !out.status.success() {
            bail!("{script}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Starts a waiter in the client pod for `target` answering with `expect` within
    /// `timeout`.
    fn waiter(
        &self,
        target: (Ipv4Addr, u16),
        expect: &str,
        timeout: Duration,
    ) -> Result<std::process::Child> {
        Command::new("ip")
            .args(["netns", "exec", &self.lab.pod_ns(CLIENT)])
            .arg(&self.me)
            .args([
                "bench-client",
                "wait",
                "--target",
                &format!("{}:{}", target.0, target.1),
                "--expect",
                expect,
                "--timeout-ms",
                &timeout.as_millis().to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the waiter")
    }

    fn wait_done(child: std::process::Child, since_ns: u64) -> Result<f64> {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("waiter: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let at: u64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
        Ok(at.saturating_sub(since_ns) as f64 / 1e6)
    }

    /// Programs `svcs` in `mode` from scratch; returns (ms until the target forwards,
    /// command ms, kernel memory bytes).
    fn program(&mut self, mode: Mode, svcs: &[Svc]) -> Result<Value> {
        let target = svcs.last().context("no services")?;
        let w = if mode == Mode::Routed {
            None
        } else {
            Some(self.waiter((target.ip, target.port), "", FULL_PROGRAM_TIMEOUT)?)
        };
        let t0 = monotonic_ns();
        let mut v = json!({});
        match mode {
            Mode::Routed => {}
            Mode::Ebpf => {
                let mdir = self.dir.join("manifests");
                let _ = fs::remove_dir_all(&mdir);
                fs::create_dir_all(&mdir)?;
                fs::write(mdir.join("nodes.yaml"), nodes_yaml())?;
                fs::write(mdir.join("services.yaml"), manifests(svcs))?;
                let args: Vec<String> = vec![
                    self.bin.display().to_string(),
                    "run".into(),
                    "--manifests".into(),
                    mdir.display().to_string(),
                    "--node-name".into(),
                    "node1".into(),
                    "--bpffs".into(),
                    self.lab.bpffs(1).display().to_string(),
                    "--cluster-cidr".into(),
                    rules::CLUSTER_CIDR.into(),
                    "--poll-interval-ms".into(),
                    "20".into(),
                ];
                let mut args = args;
                // Agents with socket-level hooks take the node's cgroup (older ones do not
                // know the flag).
                if self.agent_has_cgroup_flag {
                    args.push("--cgroup-path".into());
                    args.push(self.lab.node_cgroup(1).display().to_string());
                }
                if self.agent_has_size_flags {
                    args.extend(proxy_lab::cluster::agent_map_size_flags(
                        svcs.len(),
                        self.endpoints,
                    ));
                }
                args.extend(self.agent_args.iter().cloned());
                self.agent = Some(self.lab.spawn(&self.node(), &args)?);
            }
            Mode::IptLegacy | Mode::IptNft => {
                let f = self.dir.join("iptables.rules");
                fs::write(&f, rules::iptables_full(svcs))?;
                let cmd = if mode == Mode::IptLegacy {
                    "iptables-legacy-restore"
                } else {
                    "iptables-nft-restore"
                };
                let (took, mem) = self.run_in_node(cmd, &[], &f)?;
                v["command_ms"] = json!(took.as_secs_f64() * 1e3);
                v["kernel_memory_bytes"] = json!(mem);
            }
            Mode::Nft => {
                let f = self.dir.join("nft.rules");
                fs::write(&f, rules::nft_full(svcs))?;
                let (took, mem) = self.run_in_node("nft", &["-f", "-"], &f)?;
                v["command_ms"] = json!(took.as_secs_f64() * 1e3);
                v["kernel_memory_bytes"] = json!(mem);
            }
        }
        if let Some(w) = w {
            // Keep the command's own time in the error: it tells a slow loader from rules
            // that never forward.
            let ms =
                Self::wait_done(w, t0).with_context(|| format!("after the rules loaded ({v})"))?;
            v["until_forwarding_ms"] = json!(ms);
        }
        if mode == Mode::Ebpf {
            v["bpf_map_memory_bytes"] = json!(self.bpf_memory());
        }
        Ok(v)
    }

    fn bpf_memory(&self) -> u64 {
        let dir = self.lab.bpffs(1).join("ebpf-proxy");
        let mut total = 0;
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if let Ok(out) = Command::new("bpftool")
                .args(["map", "show", "pinned"])
                .arg(e.path())
                .arg("-j")
                .output()
                && let Ok(v) = serde_json::from_slice::<Value>(&out.stdout)
            {
                total += v["bytes_memlock"].as_u64().unwrap_or(0);
            }
        }
        total
    }

    /// Add one service, then change its endpoint; returns both "until forwarding" times.
    fn incremental(&mut self, mode: Mode, svcs: &[Svc]) -> Result<Value> {
        let mut added = Svc {
            ns: "bench".into(),
            name: "added".into(),
            ip: Ipv4Addr::new(10, 96, 250, 1),
            port: 80,
            endpoints: vec![(server_ip(0), POD_SERVER_PORT)],
            node_port: None,
        };
        let mut all: Vec<Svc> = svcs.to_vec();
        all.push(added.clone());
        let mut out = json!({});
        for step in ["add_service", "change_endpoint"] {
            let (expect, gone_ipt, gone_nft) = if step == "change_endpoint" {
                let old = added.clone();
                added.endpoints = vec![(server_ip(1), POD_SERVER_PORT)];
                *all.last_mut().context("services")? = added.clone();
                (
                    "srv1",
                    rules::sep_chains(&old),
                    rules::nft_endpoint_chains(&old),
                )
            } else {
                ("srv0", vec![], vec![])
            };
            let w = self.waiter((added.ip, added.port), expect, STEP_TIMEOUT)?;
            let t0 = monotonic_ns();
            let mut cmd_ms = None;
            match mode {
                Mode::Routed => {}
                Mode::Ebpf => {
                    write_atomic(
                        &self.dir.join("manifests").join("zz-added.yaml"),
                        &manifests(std::slice::from_ref(&added)),
                    )?;
                }
                Mode::IptLegacy | Mode::IptNft => {
                    let f = self.dir.join("partial.rules");
                    fs::write(&f, rules::iptables_partial(&all, &[&added], &gone_ipt))?;
                    let cmd = if mode == Mode::IptLegacy {
                        "iptables-legacy-restore"
                    } else {
                        "iptables-nft-restore"
                    };
                    cmd_ms = Some(self.run_in_node(cmd, &["--noflush"], &f)?.0);
                }
                Mode::Nft => {
                    let f = self.dir.join("partial.nft");
                    fs::write(
                        &f,
                        rules::nft_partial(&[&added], step == "add_service", &gone_nft),
                    )?;
                    cmd_ms = Some(self.run_in_node("nft", &["-f", "-"], &f)?.0);
                }
            }
            out[step] = json!({
                "until_forwarding_ms": Self::wait_done(w, t0)?,
                "command_ms": cmd_ms.map(|d| d.as_secs_f64() * 1e3),
            });
        }
        Ok(out)
    }

    /// Kernel counters that explain lost connections: TCP and TcpExt of the client and
    /// the servers (summed), netfilter conntrack statistics of node1.
    fn loss_counters(&self) -> BTreeMap<String, i64> {
        let mut c = BTreeMap::new();
        let mut add = |who: &str, text: &str| {
            for (k, v) in parse_proc_net(text) {
                *c.entry(format!("{who}.{k}")).or_insert(0) += v;
            }
        };
        let snmp = |ns: &str| {
            self.lab
                .exec(ns, &["cat", "/proc/net/snmp", "/proc/net/netstat"])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        add("client", &snmp(&self.lab.pod_ns(CLIENT)));
        for i in 0..SERVERS {
            add("servers", &snmp(&self.lab.pod_ns(&format!("srv{i}"))));
        }
        if let Ok(o) = self.lab.exec(&self.node(), &["conntrack", "-S"]) {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                for kv in line.split_whitespace() {
                    if let Some((k, v)) = kv.split_once('=')
                        && k != "cpu"
                        && let Ok(v) = v.parse::<i64>()
                    {
                        *c.entry(format!("node1.conntrack.{k}")).or_insert(0) += v;
                    }
                }
            }
        }
        c
    }

    /// Latency and rate from the client in namespace `ns` to `target`.
    fn measure(
        &self,
        ns: &str,
        target: (Ipv4Addr, u16),
        count: usize,
        rate_count: usize,
    ) -> Result<Value> {
        let before = self.loss_counters();
        let out = self.lab.exec(
            ns,
            &[
                self.me.display().to_string(),
                "bench-client".into(),
                "run".into(),
                "--target".into(),
                format!("{}:{}", target.0, target.1),
                "--count".into(),
                count.to_string(),
                "--rate-count".into(),
                rate_count.to_string(),
            ],
        )?;
        if !out.status.success() {
            bail!("client: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut v: Value = serde_json::from_slice(&out.stdout)?;
        // Only the counters that moved, and only those that name trouble.
        let after = self.loss_counters();
        let moved: serde_json::Map<String, Value> = after
            .iter()
            .filter(|(k, _)| LOSS_COUNTERS.iter().any(|w| k.ends_with(w)))
            .filter_map(|(k, a)| {
                let d = a - before.get(k).copied().unwrap_or(0);
                (d != 0).then(|| (k.clone(), json!(d)))
            })
            .collect();
        v["kernel_counters"] = Value::Object(moved);
        Ok(v)
    }

    fn teardown(&mut self, mode: Mode) -> Result<()> {
        match mode {
            Mode::Routed => {}
            Mode::Ebpf => {
                if let Some(pid) = self.agent.take() {
                    self.lab.stop(pid)?;
                }
                let _ = Command::new(&self.bin)
                    .args(["cleanup", "--bpffs"])
                    .arg(self.lab.bpffs(1))
                    .output();
            }
            Mode::IptLegacy => self.node_sh(
                "iptables-legacy -t nat -F && iptables-legacy -t nat -X && iptables-legacy -F && iptables-legacy -X",
            )?,
            Mode::IptNft => self.node_sh(
                "iptables-nft -t nat -F && iptables-nft -t nat -X && iptables-nft -F && iptables-nft -X && nft flush ruleset",
            )?,
            Mode::Nft => self.node_sh("nft delete table ip kube-proxy")?,
        }
        // Netfilter conntrack entries of this mode's connections must not decide the next
        // mode's (best effort: needs the conntrack tool).
        let _ = self.node_sh("conntrack -F >/dev/null 2>&1 || true");
        Ok(())
    }
}

/// Counter names (suffixes) worth reporting next to lost connections. (Every measured
/// connection ends in a client RST, so the reset counters are left out.)
const LOSS_COUNTERS: &[&str] = &[
    "Tcp.RetransSegs",
    "Tcp.AttemptFails",
    "Tcp.InErrs",
    "TcpExt.TCPSynRetrans",
    "TcpExt.TCPTimeouts",
    "TcpExt.ListenDrops",
    "TcpExt.ListenOverflows",
    "TcpExt.TW",
    "TcpExt.TWRecycled",
    "TcpExt.TCPChallengeACK",
    "TcpExt.TCPACKSkippedSynRecv",
    "TcpExt.TCPACKSkippedTimeWait",
    "TcpExt.PAWSEstab",
    "TcpExt.TCPAbortOnClose",
    "conntrack.invalid",
    "conntrack.insert_failed",
    "conntrack.drop",
    "conntrack.early_drop",
    "conntrack.clash_resolve",
    "conntrack.search_restart",
];

/// `/proc/net/snmp`-style text (a header line of names, then a line of values, both
/// prefixed `Group:`) as `Group.Name -> value`.
fn parse_proc_net(text: &str) -> Vec<(String, i64)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((g1, n)), Some((g2, v))) = (names.split_once(':'), values.split_once(':')) else {
            continue;
        };
        if g1 != g2 {
            continue;
        }
        for (k, val) in n.split_whitespace().zip(v.split_whitespace()) {
            if let Ok(val) = val.parse() {
                out.push((format!("{g1}.{k}"), val));
            }
        }
    }
    out
}

fn read_i64(p: &Path) -> i64 {
    fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

pub fn run(bins: &Binaries, opts: &LabOpts, say: &dyn Fn(&str)) -> Result<Value> {
    let mut pods = vec![PodSpec {
        name: CLIENT.into(),
        node: 1,
        ip: Ipv4Addr::new(10, 76, 0, 20),
    }];
    for i in 0..SERVERS {
        pods.push(PodSpec {
            name: format!("srv{i}"),
            node: 2,
            ip: server_ip(i),
        });
    }
    say("bench lab: client on node1, srv0..srv9 on node2");
    let lab = Lab::up(
        None,
        &LabSpec {
            pods,
            ..LabSpec::default()
        },
    )?;
    lab.start_pod_servers(&bins.tools)?;
    let bin = &bins.agent;
    let dir = lab.state_dir().join("bench");
    fs::create_dir_all(&dir)?;
    let cgroup = PathBuf::from(format!(
        "/sys/fs/cgroup/memory/eplbench{}",
        std::process::id()
    ));
    fs::create_dir_all(&cgroup).context("creating a memory cgroup (v1) for ruleset accounting")?;
    let help = Command::new(bin)
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut b = Bench {
        lab,
        bin: fs::canonicalize(bin)?,
        me: std::env::current_exe()?,
        dir,
        say,
        agent: None,
        agent_has_cgroup_flag: help.contains("--cgroup-path"),
        agent_has_size_flags: help.contains("--service-map-entries"),
        endpoints: 10,
        agent_args: opts.agent_args.clone(),
        cgroup: cgroup.clone(),
    };
    let r = run_all(&mut b, opts);
    for m in Mode::ALL {
        let _ = b.teardown(m);
    }
    drop(b);
    // Charges left in the cgroup are reparented on removal.
    let _ = fs::remove_dir(&cgroup);
    r
}

fn run_all(b: &mut Bench, opts: &LabOpts) -> Result<Value> {
    let mut sizes = Vec::new();
    for &n in &opts.services {
        let e = endpoints_for(n, b.agent_has_size_flags);
        b.endpoints = e;
        let svcs = services(n, e);
        let target = svcs.last().map(|s| (s.ip, s.port)).context("no services")?;
        let mut samples: BTreeMap<Mode, Vec<Value>> = BTreeMap::new();
        let mut programming: BTreeMap<Mode, Vec<Value>> = BTreeMap::new();
        let mut incremental: BTreeMap<Mode, Vec<Value>> = BTreeMap::new();
        for rep in 0..opts.reps {
            for k in 0..opts.modes.len() {
                let mode = opts.modes[(k + rep) % opts.modes.len()];
                (b.say)(&format!(
                    "{n} services x {e} endpoints, repetition {}/{}: {}",
                    rep + 1,
                    opts.reps,
                    mode.name()
                ));
                let res = (|| -> Result<()> {
                    let prog = b.program(mode, &svcs)?;
                    let (tgt, np) = if mode == Mode::Routed {
                        let direct = (server_ip(0), POD_SERVER_PORT);
                        (direct, direct)
                    } else {
                        (target, (node_ip(1), NODE_PORT))
                    };
                    let client = b.lab.pod_ns(CLIENT);
                    let mut m = b.measure(&client, tgt, opts.count, opts.rate_count)?;
                    // The same service's NodePort on node1, from the external client.
                    m["nodeport"] = b.measure(&b.lab.ext_ns(), np, opts.count, opts.rate_count)?;
                    samples.entry(mode).or_default().push(m);
                    programming.entry(mode).or_default().push(prog);
                    if opts.control_plane_at == Some(n) && mode != Mode::Routed {
                        let inc = b.incremental(mode, &svcs)?;
                        incremental.entry(mode).or_default().push(inc);
                    }
                    Ok(())
                })();
                let td = b.teardown(mode);
                if let Err(e) = res {
                    (b.say)(&format!("  {}: FAILED: {e:#}", mode.name()));
                    samples
                        .entry(mode)
                        .or_default()
                        .push(json!({"error": format!("{e:#}")}));
                }
                td?;
            }
        }
        let mut modes = serde_json::Map::new();
        for m in Mode::ALL {
            let s = samples.remove(&m).unwrap_or_default();
            let med = |k: &str| median(s.iter().filter_map(|v| v[k].as_f64()).collect());
            let np_med =
                |k: &str| median(s.iter().filter_map(|v| v["nodeport"][k].as_f64()).collect());
            let failed = |v: &Value| {
                v["failed"].as_u64().unwrap_or(0) + v["rate_failed"].as_u64().unwrap_or(0)
            };
            let p = programming.remove(&m).unwrap_or_default();
            let pmed = |k: &str| median(p.iter().filter_map(|v| v[k].as_f64()).collect());
            let inc = incremental.remove(&m).unwrap_or_default();
            let imed =
                |a: &str, k: &str| median(inc.iter().filter_map(|v| v[a][k].as_f64()).collect());
            modes.insert(
                m.key().into(),
                json!({
                    "name": m.name(),
                    "connect_p50_us": med("connect_p50_us"),
                    "connect_p99_us": med("connect_p99_us"),
                    "request_p50_us": med("request_p50_us"),
                    "conn_per_s": med("conn_per_s"),
                    "failed": s.iter().map(failed).sum::<u64>(),
                    "nodeport_connect_p50_us": np_med("connect_p50_us"),
                    "nodeport_connect_p99_us": np_med("connect_p99_us"),
                    "nodeport_conn_per_s": np_med("conn_per_s"),
                    "nodeport_failed": s.iter().map(|v| failed(&v["nodeport"])).sum::<u64>(),
                    "errors": s.iter().filter_map(|v| v["error"].as_str()).collect::<Vec<_>>(),
                    "full_program_until_forwarding_ms": pmed("until_forwarding_ms"),
                    "full_program_command_ms": pmed("command_ms"),
                    "kernel_memory_bytes": pmed("kernel_memory_bytes"),
                    "bpf_map_memory_bytes": pmed("bpf_map_memory_bytes"),
                    "add_service_ms": imed("add_service", "until_forwarding_ms"),
                    "add_service_command_ms": imed("add_service", "command_ms"),
                    "change_endpoint_ms": imed("change_endpoint", "until_forwarding_ms"),
                    "change_endpoint_command_ms": imed("change_endpoint", "command_ms"),
                    "samples": s,
                }),
            );
        }
        sizes.push(json!({ "services": n, "endpoints_per_service": e, "modes": modes }));
    }
    Ok(
        json!({ "reps": opts.reps, "count": opts.count, "rate_count": opts.rate_count, "sizes": sizes }),
    )
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}
