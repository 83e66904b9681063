//! `ebpf-proxy run`: the control loop. Manifests -> translate (pure) -> plan (pure) -> map
//! writer, plus keeping the programs attached to every pod bridge port.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::Node;
use log::{debug, info, warn};
use proxy_common::{NodeConfig, cfg_flags};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    abi,
    attach::Attachments,
    bpffs,
    datapath::{Datapath, LoadOptions, MapSizes},
    kube_source::{self, KubeSource, KubeSourceOptions, SourceConfig},
    manifests,
    netlink::{LinkEvents, Netlink},
    plan::{self, MapState},
    translate,
    uplinks::{self, Uplinks},
};

/// Options of `ebpf-proxy run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Directory of Service, EndpointSlice and Node manifests (YAML or JSON, multi-document).
    /// Reloaded whenever a file changes. Instead of a Kubernetes API server.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Watch Services, EndpointSlices and this node's Node object on the API server this
    /// kubeconfig names. Without --kubeconfig and --manifests, the in-cluster configuration
    /// is used when KUBERNETES_SERVICE_HOST is set (set it, and KUBERNETES_SERVICE_PORT, to
    /// the API server's own address: the `kubernetes` ClusterIP needs this proxy to work).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name: selects its Node object (addresses) and local endpoints.
    /// `--hostname-override` is kube-proxy's name for it. Default: the config file's
    /// hostnameOverride, else the hostname (as kube-proxy).
    #[arg(
        long,
        env = "NODE_NAME",
        value_name = "NAME",
        alias = "hostname-override",
        default_value = "",
        hide_default_value = true
    )]
    pub node_name: String,
    /// This node's address(es); overrides the Node object's InternalIP/ExternalIP addresses.
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<Ipv4Addr>,
    /// The pod network's CIDR (traffic from outside it is external; used for masquerade rules).
    #[arg(long, value_name = "CIDR", default_value = "10.76.0.0/16")]
    pub cluster_cidr: String,
    /// The bridge holding the pods' veths; every port gets the pod programs.
    #[arg(long, value_name = "IFACE", default_value = "cbr0")]
    pub pod_bridge: String,
    /// Interface(s) where traffic from outside the node arrives (NodePort, LoadBalancer IPs,
    /// externalIPs, IPIP/GUE). Repeatable. Default: the interfaces holding the node's
    /// addresses and the default route.
    #[arg(long = "uplink", value_name = "IFACE")]
    pub uplinks: Vec<String>,
    /// The XDP fast path on the uplinks (IPIP/GUE decapsulation, established-flow DNAT) in
    /// front of tc: auto (native, else generic with a warning), native, generic, or off.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = uplinks::XdpModeArg::Auto)]
    pub xdp_mode: uplinks::XdpModeArg,
    /// A BPF filesystem directory; maps are pinned under DIR/ebpf-proxy. Mounted if missing.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Source address used when a pod reaches itself through a service (hairpin).
    /// Default: the pod bridge's first IPv4 address.
    #[arg(long, value_name = "IP")]
    pub hairpin_ip: Option<Ipv4Addr>,
    /// How often the manifests directory is checked for changes that inotify did not report
    /// (network file systems, a directory that did not exist yet). Edits are read at once
    /// otherwise.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    pub poll_interval_ms: u64,
    /// The cgroup v2 directory whose processes (and descendants') get socket-level load
    /// balancing (host-network processes: kubelet, hostNetwork pods). Default: /sys/fs/cgroup
    /// if it is cgroup2, else /sys/fs/cgroup/unified.
    #[arg(long, value_name = "PATH")]
    pub cgroup_path: Option<PathBuf>,
    /// Map sizes (--max-services, --service-map-entries, --max-backends, --conntrack-max, ...).
    #[command(flatten)]
    pub map_sizes: crate::datapath::MapSizeArgs,
    /// kube-proxy's flags (--config, --nodeport-addresses, --masquerade-all,
    /// --healthz-bind-address, --metrics-bind-address).
    #[command(flatten)]
    pub kp: crate::config::KubeProxyFlags,
}

/// Where the agent pins its maps inside the bpffs directory.
pub fn pin_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("ebpf-proxy")
}

/// The node's own IPv4 addresses from its Node object (InternalIP first).
pub fn node_addresses(node: &Node) -> Vec<Ipv4Addr> {
    let mut addrs: Vec<(u8, Ipv4Addr)> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let rank = match a.type_.as_str() {
                "InternalIP" => 0,
                "ExternalIP" => 1,
                _ => return None,
            };
            a.address.parse().ok().map(|ip| (rank, ip))
        })
        .collect();
    addrs.sort();
    addrs.into_iter().map(|(_, ip)| ip).collect()
}

/// What the agent knows besides the API objects: who it is and how it is configured.
/// Everything translation needs beyond the objects is added here, and reaches
/// `translate::Input` only through [`translate_snapshot`].
#[derive(Clone, Debug)]
pub struct Context {
    pub node_name: String,
    /// Capacity of the service and backend maps. Services are admitted whole, smallest
    /// first, while they fit (see [`fit_capacity`]).
    pub map_sizes: MapSizes,
    /// `--node-ip`: overrides the Node object's addresses.
    pub node_ips: Vec<Ipv4Addr>,
    /// `--cluster-cidr`.
    pub cluster_cidr: Cidr,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// `--nodeport-addresses`, unparsed (`primary`, CIDRs, or empty for all node addresses).
    pub nodeport_addresses: String,
}

impl Context {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            map_sizes: MapSizes::default(),
            node_ips: Vec::new(),
            cluster_cidr: Cidr {
                addr: Ipv4Addr::new(10, 76, 0, 0),
                prefix: 16,
            },
            masquerade_all: false,
            nodeport_addresses: String::new(),
        }
    }

    /// This node's addresses: `--node-ip` if given, else its Node object's.
    pub fn node_addresses(&self, snapshot: &Snapshot) -> Vec<Ipv4Addr> {
        if !self.node_ips.is_empty() {
            return self.node_ips.clone();
        }
        snapshot
            .objects
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
            .map(node_addresses)
            .unwrap_or_default()
    }

    /// The datapath's per-node configuration for these addresses.
    pub fn node_config(&self, node_ips: &[Ipv4Addr], hairpin: Option<Ipv4Addr>) -> NodeConfig {
        NodeConfig {
            hairpin_addr_be: hairpin.map(abi::addr_be).unwrap_or(0),
            node_addr_be: node_ips.first().copied().map(abi::addr_be).unwrap_or(0),
            cluster_cidr_be: abi::addr_be(self.cluster_cidr.addr),
            cluster_mask_be: abi::addr_be(self.cluster_cidr.mask()),
            flags: if self.masquerade_all {
                cfg_flags::MASQUERADE_ALL
            } else {
                0
            },
            snat_port_min: SNAT_PORTS.0,
            snat_port_max: SNAT_PORTS.1,
            ..Default::default()
        }
    }
}

/// Source ports for masqueraded flows: above the kernel's default ephemeral range
/// (32768-60999) so they never collide with the node's own sockets, and outside the
/// NodePort range.
pub const SNAT_PORTS: (u16, u16) = (61000, 65000);

/// An IPv4 CIDR (`--cluster-cidr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn mask(&self) -> Ipv4Addr {
        if self.prefix == 0 {
            Ipv4Addr::UNSPECIFIED
        } else {
            Ipv4Addr::from(u32::MAX << (32 - self.prefix as u32))
        }
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.mask()) == u32::from(self.addr) & u32::from(self.mask())
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected ADDRESS/PREFIX, e.g. 10.76.0.0/16"))?;
        let addr: Ipv4Addr = a.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?}: prefix must be 0-32"))?;
        let c = Cidr { addr, prefix };
        Ok(Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & u32::from(c.mask())),
            prefix,
        })
    }
}

/// The objects a source holds at one moment, and the objects it could not read (each a
/// message naming the object and the problem).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub objects: manifests::Objects,
    pub unreadable: Vec<String>,
}

/// Reads a manifests directory into a snapshot. Bad files/documents/objects are in
/// `unreadable`; only an unreadable directory is an error.
pub fn load_manifests(dir: &Path) -> Result<Snapshot> {
    let (objects, errors) = manifests::load_dir(dir)?;
    Ok(Snapshot {
        objects,
        unreadable: errors.iter().map(ToString::to_string).collect(),
    })
}

/// The one place a `translate::Input` is built.
fn translate_snapshot(
    snapshot: &Snapshot,
    ctx: &Context,
    translator: &mut translate::Translator,
) -> translate::Translation {
    // Validated at startup; should a bad value get here, serve NodePorts nowhere rather
    // than on addresses the operator excluded.
    let flag = ctx
        .nodeport_addresses
        .parse::<translate::NodePortAddresses>()
        .unwrap_or_else(|e| {
            warn!("{e}; NodePorts are not served");
            translate::NodePortAddresses::Cidrs(Vec::new())
        });
    let nodeport_addresses = translate::nodeport_addresses(&ctx.node_addresses(snapshot), &flag);
    let node_zone = snapshot
        .objects
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(ctx.node_name.as_str()))
        .and_then(translate::node_zone);
    translator.translate(&translate::Input {
        services: &snapshot.objects.services,
        slices: &snapshot.objects.slices,
        node_name: &ctx.node_name,
        node_zone: node_zone.as_deref(),
        nodeport_addresses: &nodeport_addresses,
    })
}

/// One reconciliation with nothing remembered from earlier ones: [`Reconciler::reconcile`]
/// with a new [`Reconciler`].
pub fn reconcile<W: plan::MapWriter>(
    snapshot: &Snapshot,
    ctx: &Context,
    state: &mut MapState,
    writer: &mut W,
) -> Result<SyncSummary> {
    Reconciler::new().reconcile(snapshot, ctx, state, writer)
}

/// Reconciles snapshot after snapshot, remembering each service's translation
/// ([`translate::Translator`]) so that a change to one service re-translates that service
/// only. The result is always that of [`reconcile`] on the same snapshot and state.
#[derive(Debug, Default)]
pub struct Reconciler {
    translator: translate::Translator,
}

/// Where the time of one reconciliation went (the agent logs it at debug level).
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncStages {
    pub translate: Duration,
    /// Service groups translated again / reused from the previous reconciliation.
    pub translated: usize,
    pub reused: usize,
    /// [`plan::fit_capacity`].
    pub capacity: Duration,
    pub plan: Duration,
    /// The map writes.
    pub apply: Duration,
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    /// One reconciliation: translate the snapshot, admit what fits the maps, plan, write. Bad
    /// objects are skipped and returned in [`SyncSummary::rejected`]; everything valid is
    /// programmed. The same path serves the manifests and the Kubernetes sources.
    pub fn reconcile<W: plan::MapWriter>(
        &mut self,
        snapshot: &Snapshot,
        ctx: &Context,
        state: &mut MapState,
        writer: &mut W,
    ) -> Result<SyncSummary> {
        let mut stages = SyncStages::default();
        let started = Instant::now();
        let mut t = translate_snapshot(snapshot, ctx, &mut self.translator);
        let tstats = self.translator.stats();
        (stages.translated, stages.reused) = (tstats.translated, tstats.reused);
        stages.translate = started.elapsed();
        let started = Instant::now();
        let over = plan::fit_capacity(
            &mut t.desired,
            &mut t.cluster_ips,
            &ctx.map_sizes.capacity(),
        );
        t.issues.extend(over);
        stages.capacity = started.elapsed();
        let started = Instant::now();
        let p = plan::plan(state, &t.desired, &t.cluster_ips);
        stages.plan = started.elapsed();
        let ops = p.ops.len();
        let started = Instant::now();
        plan::apply_plan(state, &p, writer).context("writing the service maps")?;
        stages.apply = started.elapsed();
        Ok(summarize(snapshot, ctx, state, &t, ops, stages))
    }
}

fn summarize(
    snapshot: &Snapshot,
    ctx: &Context,
    state: &MapState,
    t: &translate::Translation,
    ops: usize,
    stages: SyncStages,
) -> SyncSummary {
    let node = snapshot
        .objects
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(ctx.node_name.as_str()))
        .cloned();
    SyncSummary {
        services: t.desired.len(),
        backends: t.desired.values().map(|s| s.backends.len()).sum(),
        ops,
        invalid: snapshot.unreadable.len() + t.issues.len(),
        rejected: rejections(&snapshot.unreadable, &t.issues),
        node,
        health_checks: t
            .health_checks
            .iter()
            .map(|(port, h)| {
                let (ns, name) = h
                    .service
                    .split_once('/')
                    .unwrap_or(("", h.service.as_str()));
                (*port, ns.to_owned(), name.to_owned(), h.local_endpoints)
            })
            .collect(),
        service_ids: crate::metrics::service_ids(&t.desired, state),
        stages,
    }
}

/// [`load_manifests`] then [`reconcile`].
pub fn sync_once<W: plan::MapWriter>(
    dir: &Path,
    ctx: &Context,
    state: &mut MapState,
    writer: &mut W,
) -> Result<SyncSummary> {
    reconcile(&load_manifests(dir)?, ctx, state, writer)
}

pub struct SyncSummary {
    /// Service entries (address, port, protocol) programmed.
    pub services: usize,
    pub backends: usize,
    pub ops: usize,
    /// Problems found (unreadable objects plus invalid fields).
    pub invalid: usize,
    /// Each object that was skipped whole or in part, with its problems. Its length is the
    /// per-object rejection count.
    pub rejected: BTreeMap<String, Vec<String>>,
    pub node: Option<Node>,
    /// healthCheckNodePort responders wanted: (port, namespace, name, local endpoints).
    pub health_checks: Vec<(u16, String, String, usize)>,
    /// Service ID -> service port, for the per-service packet counters.
    pub service_ids: crate::metrics::ServiceIds,
    pub stages: SyncStages,
}

impl SyncSummary {
    /// Objects rejected (whole or in part) in this reconciliation.
    pub fn rejected_objects(&self) -> usize {
        self.rejected.len()
    }
}

/// Groups problems by object: `"Service ns/x" -> ["spec.ports[1].port: invalid port ..."]`.
fn rejections(unreadable: &[String], issues: &[translate::Issue]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for u in unreadable {
        out.entry(u.clone()).or_default();
    }
    for i in issues {
        let what = if i.field.is_empty() {
            i.message.clone()
        } else {
            format!("{}: {}", i.field, i.message)
        };
        out.entry(i.object.clone()).or_default().push(what);
    }
    out
}

/// Logs one line per rejected object, at warn level when it is new or its problems changed
/// and at debug level when it was already reported by the previous reconciliation (so a
/// busy cluster does not repeat the same warnings every 100 ms).
#[derive(Debug, Default)]
pub struct RejectionLog {
    last: BTreeMap<String, Vec<String>>,
}

impl RejectionLog {
    /// Logs `rejected` and returns the lines logged at warn level.
    pub fn report(&mut self, rejected: &BTreeMap<String, Vec<String>>) -> Vec<String> {
        const SHOWN: usize = 3;
        let mut warned = Vec::new();
        for (object, problems) in rejected {
            let mut line = format!("rejected {object}");
            for p in problems.iter().take(SHOWN) {
                line.push_str("; ");
                line.push_str(p);
            }
            if problems.len() > SHOWN {
                line.push_str(&format!("; and {} more problems", problems.len() - SHOWN));
            }
            if self.last.get(object) == Some(problems) {
                debug!("{line}");
            } else {
                warn!("{line}");
                warned.push(line);
            }
        }
        self.last = rejected.clone();
        warned
    }
}

/// How a [`Source`] read its last snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub took: Duration,
    /// Manifest files parsed (changed) and reused (unchanged).
    pub parsed: usize,
    pub reused: usize,
}

/// Where snapshots come from: a manifests directory (polled) or the Kubernetes API (watched).
pub enum Source {
    Manifests {
        dir: PathBuf,
        /// The fallback to `watch`: inotify misses changes made on other machines (network
        /// file systems) and cannot watch a directory that does not exist.
        poll: tokio::time::Interval,
        /// inotify on the directory: an edit is read at once, not at the next poll. `None`
        /// while the directory is missing (set up again at a poll).
        watch: Option<manifests::DirWatch>,
        /// Fingerprint of the directory when it was last read; `None` forces a read.
        last: Option<u64>,
        /// The files' objects as last parsed: only changed files are parsed again.
        cache: manifests::DirCache,
        /// How the last read went.
        read: ReadStats,
    },
    Kube(Box<KubeSource>),
}

impl Source {
    /// The source `args` select (see [`kube_source::select_source`]); the Kubernetes watches
    /// start at once.
    pub async fn from_args(args: &RunArgs) -> Result<Self> {
        let host = std::env::var(kube_source::IN_CLUSTER_ENV).ok();
        let cfg = kube_source::select_source(
            args.manifests.as_deref(),
            args.kubeconfig.as_deref(),
            host.as_deref(),
        )?;
        let kube = |client| {
            let opts = KubeSourceOptions::new(args.node_name.clone());
            Self::Kube(Box::new(KubeSource::start(client, &opts)))
        };
        Ok(match cfg {
            SourceConfig::Manifests(dir) => {
                // Like an unreachable API server: start anyway (the pinned datapath keeps
                // forwarding, nothing is pruned) and keep retrying until it appears.
                if !dir.is_dir() {
                    warn!(
                        "--manifests {}: not a directory (yet); keeping the programmed state \
                         and retrying",
                        dir.display()
                    );
                }
                Self::manifests(dir, Duration::from_millis(args.poll_interval_ms.max(10)))
            }
            SourceConfig::Kubeconfig(path) => kube(kube_source::client(Some(&path)).await?),
            SourceConfig::InCluster => kube(kube_source::client(None).await?),
        })
    }

    pub fn manifests(dir: PathBuf, poll: Duration) -> Self {
        Self::Manifests {
            dir,
            poll: tokio::time::interval(poll),
            watch: None,
            last: None,
            cache: manifests::DirCache::new(),
            read: ReadStats::default(),
        }
    }

    /// How the read of the last snapshot went (manifests only; zero for the Kubernetes API,
    /// whose objects arrive parsed).
    pub fn read_stats(&self) -> ReadStats {
        match self {
            Self::Manifests { read, .. } => *read,
            Self::Kube(_) => ReadStats::default(),
        }
    }

    /// The next snapshot to reconcile: when the manifests changed, or (Kubernetes) when
    /// every watch has listed and a store changed. Cancel safe.
    pub async fn next_snapshot(&mut self) -> Snapshot {
        match self {
            Self::Kube(k) => k.next_snapshot().await,
            Self::Manifests {
                dir,
                poll,
                watch,
                last,
                cache,
                read,
            } => loop {
                match watch {
                    Some(w) => tokio::select! {
                        _ = poll.tick() => {}
                        r = w.changed() => if let Err(e) = r {
                            debug!("{}: inotify watch ended ({e}); polling", dir.display());
                            *watch = None;
                        },
                    },
                    None => {
                        poll.tick().await;
                        // Set up before the read below, so no change falls in between.
                        *watch = manifests::DirWatch::new(dir)
                            .map_err(|e| {
                                debug!("{}: no inotify watch ({e}); polling", dir.display())
                            })
                            .ok();
                    }
                }
                let fp = match manifests::fingerprint(dir) {
                    Ok(fp) => fp,
                    Err(e) => {
                        warn!("reading {}: {e}", dir.display());
                        continue;
                    }
                };
                if *last == Some(fp) {
                    continue;
                }
                let started = Instant::now();
                match cache.load(dir) {
                    Ok((objects, unreadable, stats)) => {
                        *last = Some(fp);
                        *read = ReadStats {
                            took: started.elapsed(),
                            parsed: stats.parsed,
                            reused: stats.reused,
                        };
                        return Snapshot {
                            objects,
                            unreadable,
                        };
                    }
                    Err(e) => warn!("{e:#}"),
                }
            },
        }
    }

    /// The last snapshot could not be applied: produce one again even without a change.
    pub fn retry(&mut self) {
        match self {
            Self::Kube(k) => k.retry(),
            Self::Manifests { last, .. } => *last = None,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Manifests { dir, .. } => write!(f, "manifests from {}", dir.display()),
            Self::Kube(_) => write!(f, "the Kubernetes API"),
        }
    }
}

pub async fn run(args: RunArgs) -> Result<()> {
    // Fails fast on a bad source before touching the datapath; the watches start now.
    let mut source = Source::from_args(&args).await?;
    let mut ctx = Context::new(args.node_name.clone());
    ctx.node_ips = args.node_ips.clone();
    ctx.masquerade_all = args.kp.masquerade_all;
    ctx.nodeport_addresses = args.kp.nodeport_addresses.join(",");
    ctx.cluster_cidr = args
        .cluster_cidr
        .parse()
        .map_err(|e| anyhow::anyhow!("--cluster-cidr {e}"))?;
    ctx.map_sizes = args.map_sizes.sizes().map_err(anyhow::Error::msg)?;
    let mut rejection_log = RejectionLog::default();
    if bpffs::ensure(&args.bpffs)? {
        info!("mounted a BPF filesystem at {}", args.bpffs.display());
    }
    let pins = pin_dir(&args.bpffs);
    // Maps of an older layout are never adopted (their names differ); they go once this
    // agent's programs have replaced the old ones in every link (below).
    let retired = crate::datapath::retired_pins(&pins);
    if !retired.is_empty() {
        warn!(
            "found maps of an older ebpf-proxy version ({}): their layout differs, so they are \
             not reused and their connection state is not carried over; they are removed once \
             this agent's programs are attached",
            retired
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut dp = Datapath::load(&LoadOptions {
        pin_dir: Some(pins.clone()),
        sizes: ctx.map_sizes,
    })?;
    if dp.adopted.is_empty() {
        info!("created maps pinned under {}", pins.display());
    } else {
        info!(
            "adopted pinned maps {:?} under {} (connection state kept)",
            dp.adopted,
            pins.display()
        );
    }

    crate::sockhooks::attach(&mut dp, args.cgroup_path.as_deref(), Some(&pins))?;

    // Restore what is already programmed so the first plan is a diff, not a rewrite.
    let (mut state, warnings) = {
        let maps = dp.lb_maps()?;
        MapState::from_maps(
            maps.read_services(),
            maps.read_backends(),
            maps.read_vips(),
            maps.read_src_ranges().into_iter().map(|k| (k, 1u8)),
        )
    };
    state.set_svc_id_limit(ctx.map_sizes.svc_ids);
    for w in warnings {
        warn!("restoring map state: {w}");
    }

    let nl = Netlink::connect()?;
    let Some(bridge) = nl.link_by_name(&args.pod_bridge).await? else {
        bail!(
            "pod bridge {:?} does not exist in this network namespace; pass --pod-bridge with \
             the bridge that holds the pods' veths",
            args.pod_bridge
        );
    };
    let hairpin = match args.hairpin_ip {
        Some(ip) => ip,
        None => nl
            .ipv4_addrs(bridge.index)
            .await?
            .first()
            .copied()
            .with_context(|| {
                format!("{} has no IPv4 address; pass --hairpin-ip", args.pod_bridge)
            })?,
    };
    // Node addresses come with the first snapshot (Node object) unless --node-ip gave them.
    let mut node_ips_programmed: Option<Vec<Ipv4Addr>> = None;
    dp.set_config(&ctx.node_config(&ctx.node_ips, Some(hairpin)))?;
    let mut uplink_hooks = Uplinks::new(Some(&pins), args.xdp_mode);
    info!(
        "pod bridge {} (ifindex {}), hairpin source {hairpin}",
        bridge.name, bridge.index
    );

    // Links are pinned under <pins>/links: adopting them swaps this agent's programs in
    // atomically (a restart or an upgrade), and they stay attached after this process exits.
    let mut attachments = Attachments::new(Some(&pins));
    let mut link_events = LinkEvents::subscribe()?;
    let ports = nl.bridge_ports(bridge.index).await?;
    let st = attachments.sync(&mut dp, &ports);
    info!(
        "datapath on {} bridge ports: {} links adopted with their programs replaced \
         atomically, {} attached and pinned, {} stale pins removed, {} failed",
        ports.len(),
        st.replaced,
        st.created,
        st.removed_stale,
        st.failed
    );
    if !retired.is_empty() {
        // Every link now runs this agent's programs (failed ports keep old programs that
        // still hold their maps open; removing the pins only drops the names).
        match crate::datapath::remove_pins(&retired) {
            Ok(n) => info!("removed {n} pins of older-version maps"),
            Err(e) => warn!(
                "could not remove older-version map pins under {}: {e}; remove them by hand \
                 (rm {}/<name>_V1) or with `ebpf-proxy cleanup` once the agent is stopped",
                pins.display(),
                pins.display()
            ),
        }
    }
    let (health, metrics) = start_telemetry(&args, &pins, &ctx.map_sizes).await?;
    health.set_attached(attachments.covers(&ports));
    // healthCheckNodePort responders for externalTrafficPolicy Local services, on every
    // node address (kube-proxy serves them on the node's IPs).
    let mut responders = crate::health::HealthCheckResponders::new(
        std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        health.clone(),
    );
    metrics.link_replacements.inc_by(st.replaced as u64);
    metrics
        .attached_links
        .set(2 * attachments.ports().count() as i64);

    let mut node_logged = false;
    // kubeproxy_network_programming_duration_seconds, from EndpointSlice trigger times.
    let mut triggers = kube_source::TriggerTimes::new(std::time::SystemTime::now());
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut resync = tokio::time::interval(Duration::from_secs(5));
    let mut reconciler = Reconciler::new();
    info!(
        "ebpf-proxy running on node {} with {source}",
        args.node_name
    );
    loop {
        tokio::select! {
            snapshot = source.next_snapshot() => {
                health.queued_update();
                metrics.queued();
                let started = Instant::now();
                let node_ips = ctx.node_addresses(&snapshot);
                triggers.note(&snapshot.objects.slices);
                let result = {
                    let mut maps = dp.lb_maps()?;
                    reconciler.reconcile(&snapshot, &ctx, &mut state, &mut maps)
                };
                match result {
                    Ok(s) => {
                        health.updated();
                        metrics.synced(started.elapsed(), Ok(()));
                        for t in triggers.programmed() {
                            metrics.observe_network_programming(t);
                        }
                        responders.sync_counts(&s.health_checks).await;
                        metrics.set_service_labels(s.service_ids.clone());
                        if node_ips_programmed.as_ref() != Some(&node_ips) {
                            // Masquerade source, IPIP/GUE decap address, uplink discovery.
                            dp.set_config(&ctx.node_config(&node_ips, Some(hairpin)))?;
                            let want = uplinks::discover(&nl, &args.uplinks, &node_ips, &args.pod_bridge).await?;
                            uplink_hooks.sync(&mut dp, &want);
                            if want.is_empty() {
                                warn!("no uplink found (no interface holds {node_ips:?} or a default route): pass --uplink IFACE");
                            }
                            node_ips_programmed = Some(node_ips);
                        }
                        rejection_log.report(&s.rejected);
                        let read = source.read_stats();
                        let st = &s.stages;
                        debug!(
                            "sync stages: read {:?} ({} files parsed, {} unchanged), translate {:?} \
                             ({} services translated, {} unchanged), capacity {:?}, plan {:?}, \
                             apply {:?} ({} map writes), total {:?}",
                            read.took, read.parsed, read.reused, st.translate, st.translated,
                            st.reused, st.capacity, st.plan, st.apply, s.ops, read.took + started.elapsed()
                        );
                        info!(
                            "synced {} service ports, {} endpoints: {} map operations in {:?}{}",
                            s.services, s.backends, s.ops, started.elapsed(),
                            if s.rejected_objects() > 0 { format!(" ({} objects rejected)", s.rejected_objects()) } else { String::new() }
                        );
                        if !node_logged {
                            node_logged = true;
                            let ips = if !args.node_ips.is_empty() { args.node_ips.clone() }
                                else { s.node.as_ref().map(node_addresses).unwrap_or_default() };
                            if ips.is_empty() {
                                warn!("no Node object named {:?} and no --node-ip: node addresses unknown", args.node_name);
                            } else {
                                info!("node {} addresses: {ips:?}", args.node_name);
                            }
                        }
                    }
                    Err(e) => {
                        metrics.synced(started.elapsed(), Err(&e));
                        warn!("sync failed (will retry): {e:#}");
                        source.retry();
                    }
                }
            }
            ev = link_events.next() => {
                if ev.is_none() { bail!("the rtnetlink event socket closed"); }
                let ports = nl.bridge_ports(bridge.index).await?;
                let st = attachments.sync(&mut dp, &ports);
                health.set_attached(attachments.covers(&ports));
                metrics.link_replacements.inc_by(st.replaced as u64);
                metrics.attached_links.set(2 * attachments.ports().count() as i64);
            }
            _ = resync.tick() => {
                // Belt and braces against a missed netlink event.
                let ports = nl.bridge_ports(bridge.index).await?;
                attachments.sync(&mut dp, &ports);
                health.set_attached(attachments.covers(&ports));
                metrics.attached_links.set(2 * attachments.ports().count() as i64);
                debug!("attached to {} bridge ports", attachments.ports().count());
            }
            _ = sigint.recv() => { info!("SIGINT received: exiting; programs stay attached and maps pinned under {} (remove with `ebpf-proxy cleanup`)", pins.display()); break; }
            _ = sigterm.recv() => { info!("SIGTERM received: exiting; programs stay attached and maps pinned under {} (remove with `ebpf-proxy cleanup`)", pins.display()); break; }
        }
    }
    Ok(())
}

/// Starts the health (`/healthz`, `/livez`) and metrics (`/metrics`) servers on the
/// kube-proxy bind addresses (an empty address disables one). A port that cannot be bound is
/// an error: a DaemonSet probe would fail anyway, better say why at once.
async fn start_telemetry(
    args: &RunArgs,
    pins: &Path,
    sizes: &MapSizes,
) -> Result<(crate::health::ProxyHealth, crate::metrics::Metrics)> {
    use crate::{config::parse_bind_address, health, metrics};
    let h = health::ProxyHealth::new(health::DEFAULT_HEALTH_TIMEOUT);
    let m = metrics::Metrics::new(Some(pins), *sizes);
    if let Some(addr) = parse_bind_address(
        &args.kp.healthz_bind_address,
        10256,
        "--healthz-bind-address",
    )? {
        h.serve(addr).await?;
    }
    if let Some(addr) = parse_bind_address(
        &args.kp.metrics_bind_address,
        10249,
        "--metrics-bind-address",
    )? {
        m.serve(addr).await?;
    }
    Ok((h, m))
}
