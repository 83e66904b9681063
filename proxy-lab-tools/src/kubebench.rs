//! `ebpf-proxy-lab kube-sync-bench`: the control plane's speed through the Kubernetes source
//! (issue 16 item 5), measured from outside the agent.
//!
//! One agent runs with `--kubeconfig` against the fake API server ([`FakeApiServer`], the real
//! list/watch wire protocol) in a private network namespace and on a private bpffs. The bench
//! serves N Services x E endpoints, starts the agent and times:
//!
//! - **full programming**: agent start -> the end of its first sync (the agent's
//!   `kubeproxy_sync_proxy_rules_last_timestamp_seconds`), checked against the pinned service
//!   map;
//! - **one change**: `C` single changes, alternating an EndpointSlice (one endpoint replaced)
//!   and a Service (its port moved), each timed from the moment the API server queues its
//!   watch event to the moment the pinned BPF maps hold the new state (polled every 100 µs by
//!   this process: the wire, kube-rs decoding, the source's snapshot, translate, plan and the
//!   map writes are all inside the figure). Changes are spaced (`--gap-ms`) so the agent's
//!   minimum sync interval never holds one back.
//!
//! Without `--inside` the command makes the namespace (a veth uplink with the node address)
//! and the bpffs, re-runs itself inside with `ip netns exec`, and removes both afterwards.
use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap as BpfHash, Map, MapData};
use proxy_common::{Backend4, Svc4Key, Svc4Value, maps as map_names, proto};
use serde_json::{Value, json};

use crate::fakeapi::{FakeApiServer, Kind};

/// Options of `ebpf-proxy-lab kube-sync-bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct KubeBenchArgs {
    /// The agent binary (`ebpf-proxy`).
    #[arg(long, value_name = "PATH", default_value = "target/release/ebpf-proxy")]
    pub agent: PathBuf,
    /// Services to serve (each with one TCP port).
    #[arg(long, default_value_t = 10_000)]
    pub services: usize,
    /// Endpoints per service.
    #[arg(long, default_value_t = 10)]
    pub endpoints: usize,
    /// Single changes to time after full programming.
    #[arg(long, default_value_t = 100)]
    pub changes: usize,
    /// Pause between changes (above the agent's 100 ms minimum sync interval).
    #[arg(long, value_name = "MS", default_value_t = 150)]
    pub gap_ms: u64,
    /// Write the results as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json_out: Option<PathBuf>,
    /// Keep the agent's log here (it is removed otherwise).
    #[arg(long, value_name = "PATH")]
    pub agent_log: Option<PathBuf>,
    /// Extra agent argument (repeatable), e.g. `--agent-arg=--metrics-per-service`.
    #[arg(long = "agent-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// Internal: already inside the bench namespace, with this bpffs.
    #[arg(long, value_name = "BPFFS", hide = true)]
    pub inside: Option<PathBuf>,
}

const NODE: &str = "node1";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 11);
const CLUSTER_CIDR: &str = "10.128.0.0/9";
const METRICS: &str = "127.0.0.1:10249";
const TARGET_PORT: u16 = 8080;

/// The ClusterIP of service `i` (10.96.0.0/12 holds a million).
fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// Endpoint address `j` of service `i` (10.128.0.0/9: pods of other nodes).
fn endpoint_ip(i: usize, j: usize, e: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 1)) + (i * e + j) as u32)
}

/// Fresh endpoint addresses for the changes (10.250.0.0/16, never served before).
fn changed_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 1)) + k as u32)
}

fn service(i: usize, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip(i).to_string(),
            "clusterIPs": [cluster_ip(i).to_string()],
            "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": TARGET_PORT}],
        }
    })
}

fn slice(i: usize, addrs: &[Ipv4Addr]) -> Value {
    let endpoints: Vec<Value> = addrs
        .iter()
        .map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}, "nodeName": "node2"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("svc-{i}-abcde"), "namespace": "bench",
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn node() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE},
        "spec": {"podCIDR": "10.128.0.0/24", "podCIDRs": ["10.128.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP.to_string()}]},
    })
}

pub fn run(args: KubeBenchArgs) -> Result<()> {
    match args.inside.clone() {
        Some(bpffs) => inside(&args, &bpffs),
        None => outside(&args),
    }
}

/// Namespace and bpffs, removed on drop.
struct Sandbox {
    netns: String,
    bpffs: PathBuf,
    mounted: bool,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.bpffs).status();
        }
        let _ = fs::remove_dir_all(&self.bpffs);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn outside(args: &KubeBenchArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "kube-sync-bench needs root (network namespaces, bpffs, BPF programs): run it with sudo"
        );
    }
    let agent = fs::canonicalize(&args.agent).with_context(|| {
        format!(
            "agent binary {}: build it first (cargo xtask build)",
            args.agent.display()
        )
    })?;
    let id = std::process::id();
    let mut sb = Sandbox {
        netns: format!("eplkb{id}"),
        bpffs: std::env::temp_dir().join(format!("eplkb{id}-bpffs")),
        mounted: false,
    };
    sh(&["ip", "netns", "add", &sb.netns])?;
    fs::create_dir_all(&sb.bpffs)?;
    sh(&["mount", "-t", "bpf", "bpf", &sb.bpffs.display().to_string()])?;
    sb.mounted = true;
    let n = sb.netns.clone();
    sh(&["ip", "-n", &n, "link", "set", "lo", "up"])?;
    // A veth pair (no dummy driver on every kernel); the peer stays down and unused.
    sh(&[
        "ip", "-n", &n, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer",
    ])?;
    sh(&[
        "ip",
        "-n",
        &n,
        "addr",
        "add",
        &format!("{NODE_IP}/24"),
        "dev",
        "eth0",
    ])?;
    sh(&["ip", "-n", &n, "link", "set", "eth0", "up"])?;
    let me = std::env::current_exe()?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &n])
        .arg(me)
        .arg("kube-sync-bench")
        .arg("--inside")
        .arg(&sb.bpffs)
        .arg("--agent")
        .arg(&agent)
        .args(["--services", &args.services.to_string()])
        .args(["--endpoints", &args.endpoints.to_string()])
        .args(["--changes", &args.changes.to_string()])
        .args(["--gap-ms", &args.gap_ms.to_string()]);
    if let Some(j) = &args.json_out {
        cmd.arg("--json-out").arg(std::path::absolute(j)?);
    }
    if let Some(l) = &args.agent_log {
        cmd.arg("--agent-log").arg(std::path::absolute(l)?);
    }
    for a in &args.agent_args {
        cmd.arg(format!("--agent-arg={a}"));
    }
    let st = cmd.status()?;
    drop(sb);
    if !st.success() {
        bail!("the bench failed ({st})");
    }
    Ok(())
}

/// The agent, killed on drop; its log in a file.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!(
                "the agent exited ({st}); its log:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A gauge from the agent's `/metrics` (HTTP/1.0, no dependencies).
fn metric(name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(METRICS).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

struct Maps {
    svc: BpfHash<MapData, Svc4Key, Svc4Value>,
    be: BpfHash<MapData, u32, Backend4>,
}

impl Maps {
    fn open(bpffs: &Path) -> Result<Self> {
        let dir = bpffs.join("ebpf-proxy");
        let open = |name: &str| {
            MapData::from_pin(dir.join(name))
                .with_context(|| format!("opening the pinned map {}/{name}", dir.display()))
        };
        Ok(Self {
            svc: BpfHash::try_from(Map::HashMap(open(map_names::SVC4)?))?,
            be: BpfHash::try_from(Map::HashMap(open(map_names::BACKEND4)?))?,
        })
    }

    fn key(i: usize, port: u16, slot: u16) -> Svc4Key {
        Svc4Key::new(
            u32::from(cluster_ip(i)).to_be(),
            port.to_be(),
            proto::TCP,
            slot,
        )
    }

    /// Service `i` on `port` has an entry.
    fn has_service(&self, i: usize, port: u16) -> bool {
        self.svc.get(&Self::key(i, port, 0), 0).is_ok()
    }

    /// Service `i` on `port` balances to `addr` (one of its slots' backends).
    fn has_endpoint(&self, i: usize, port: u16, addr: Ipv4Addr) -> bool {
        let Ok(head) = self.svc.get(&Self::key(i, port, 0), 0) else {
            return false;
        };
        let want = u32::from(addr).to_be();
        (1..=head.count).any(|s| {
            self.svc
                .get(&Self::key(i, port, s), 0)
                .ok()
                .and_then(|v| self.be.get(&v.backend_id, 0).ok())
                .is_some_and(|b| b.addr_be == want)
        })
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({
        "n": v.len(),
        "p50_ms": percentile(&v, 0.5),
        "p90_ms": percentile(&v, 0.9),
        "p99_ms": percentile(&v, 0.99),
        "max_ms": v.last().copied().unwrap_or(f64::NAN),
    })
}

fn inside(args: &KubeBenchArgs, bpffs: &Path) -> Result<()> {
    let (n, e) = (args.services, args.endpoints);
    if n == 0 || e == 0 {
        bail!("--services and --endpoints must be at least 1");
    }
    // The server's tasks run on their own worker thread: this thread polls the maps.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let api = rt.block_on(FakeApiServer::start());
    let t = Instant::now();
    api.apply_raw(Kind::Node, node());
    for i in 0..n {
        api.apply_raw(Kind::Service, service(i, 80));
        let addrs: Vec<Ipv4Addr> = (0..e).map(|j| endpoint_ip(i, j, e)).collect();
        api.apply_raw(Kind::EndpointSlice, slice(i, &addrs));
    }
    eprintln!(
        "kube-sync-bench: serving {n} services x {e} endpoints ({:.1} s to build)",
        t.elapsed().as_secs_f64()
    );
    let kubeconfig = bpffs.with_extension("kubeconfig");
    fs::write(&kubeconfig, api.kubeconfig())?;
    let log = bpffs.with_extension("agent.log");
    let mut cmd = Command::new(&args.agent);
    cmd.arg("run")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--node-name", NODE, "--cluster-cidr", CLUSTER_CIDR])
        .arg("--bpffs")
        .arg(bpffs)
        .args(["--socket-lb", "off", "--metrics-bind-address", METRICS])
        .args(["--healthz-bind-address", "127.0.0.1:10256"])
        .args(proxy_lab::cluster::agent_map_size_flags(n, e))
        .args(&args.agent_args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log)?)
        .stderr(fs::File::create(&log)?.try_clone()?);
    let start_wall = unix_now();
    let started = Instant::now();
    let mut agent = Agent {
        child: cmd.spawn().context("starting the agent")?,
        log: log.clone(),
    };
    eprintln!("kube-sync-bench: agent started, waiting for its first sync");
    let synced_at = loop {
        agent.check_alive()?;
        if let Some(ts) = metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
            && ts > 0.0
        {
            break ts;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "no sync within 120 s; agent log:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let full_ms = (synced_at - start_wall) * 1e3;
    let maps = Maps::open(bpffs)?;
    // The first sync holds everything: the first and last service must be there.
    for i in [0, n - 1] {
        if !maps.has_endpoint(i, 80, endpoint_ip(i, e - 1, e)) {
            bail!("after the first sync, service {i} is not in the maps with its endpoints");
        }
    }
    eprintln!(
        "kube-sync-bench: full programming {full_ms:.0} ms; now {} single changes",
        args.changes
    );

    let mut slice_ms = Vec::new();
    let mut service_ms = Vec::new();
    let mut ports = vec![80u16; n];
    for k in 0..args.changes {
        agent.check_alive()?;
        std::thread::sleep(Duration::from_millis(args.gap_ms));
        // Spread over the table (a prime stride), one service at a time.
        let i = (k * 7919 + 11) % n;
        let endpoint_change = k % 2 == 0;
        let t0 = Instant::now();
        if endpoint_change {
            let mut addrs: Vec<Ipv4Addr> = (0..e).map(|j| endpoint_ip(i, j, e)).collect();
            addrs[0] = changed_ip(k);
            api.apply_raw(Kind::EndpointSlice, slice(i, &addrs));
        } else {
            ports[i] = 1000 + k as u16;
            api.apply_raw(Kind::Service, service(i, ports[i]));
        }
        loop {
            let done = if endpoint_change {
                maps.has_endpoint(i, ports[i], changed_ip(k))
            } else {
                maps.has_service(i, ports[i])
            };
            if done {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!(
                    "change {k} (service {i}) not in the maps after 10 s; agent log:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if endpoint_change {
            slice_ms.push(ms);
        } else {
            service_ms.push(ms);
        }
    }
    let all: Vec<f64> = slice_ms.iter().chain(&service_ms).copied().collect();
    let out = json!({
        "services": n,
        "endpoints": e,
        "full_programming_ms": full_ms,
        "one_change": summary(all),
        "endpointslice_change": summary(slice_ms),
        "service_change": summary(service_ms),
        "agent_args": args.agent_args,
    });
    let c = &out["one_change"];
    println!(
        "{n} services x {e} endpoints, Kubernetes source: full programming {full_ms:.0} ms; \
         one change (watch event -> maps, {} changes): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        c["n"],
        c["p50_ms"].as_f64().unwrap_or(f64::NAN),
        c["p90_ms"].as_f64().unwrap_or(f64::NAN),
        c["p99_ms"].as_f64().unwrap_or(f64::NAN),
        c["max_ms"].as_f64().unwrap_or(f64::NAN),
    );
    if let Some(p) = &args.json_out {
        fs::write(p, serde_json::to_string_pretty(&out)?)?;
    }
    drop(agent);
    drop(api);
    let _ = fs::remove_file(&kubeconfig);
    if let Some(keep) = &args.agent_log {
        fs::copy(&log, keep)
            .with_context(|| format!("keeping the agent log as {}", keep.display()))?;
    }
    let _ = fs::remove_file(&log);
    Ok(())
}
