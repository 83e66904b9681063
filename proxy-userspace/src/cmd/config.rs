//! kube-proxy-compatible flags and the `--config` file (a `KubeProxyConfiguration` subset).
//!
//! Precedence: a flag given on the command line (or through its environment variable) wins,
//! then the config file, then the default: so a DaemonSet can keep kube-proxy's ConfigMap and
//! override single values per node. kube-proxy fields that mean nothing here (`mode`, `ipvs`,
//! `conntrack`, ...) are accepted and reported once as ignored, so an existing kube-proxy
//! ConfigMap can be mounted as is; unknown top-level fields are an error (a typo must not pass
//! silently).
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use clap::{ArgMatches, parser::ValueSource};
use serde::Deserialize;

use crate::{
    cmd::kpflags::{DetectLocalMode, IgnoredFlags, LocalDetection, parse_go_bool},
    datapath::uplinks,
    logging::LogFormat,
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
    /// This node's name: selects its Node object (addresses, podCIDRs) and local endpoints.
    /// `--hostname-override` is kube-proxy's name for it. Default: the config file's
    /// hostnameOverride, else the hostname (as kube-proxy).
    #[arg(
        long,
        env = "NODE_NAME",
        value_name = "NAME",
        visible_alias = "hostname-override",
        default_value = "",
        hide_default_value = true
    )]
    pub node_name: String,
    /// This node's address(es); overrides the Node object's InternalIP/ExternalIP addresses.
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<Ipv4Addr>,
    /// The pod network's CIDR, comma-separated, one per family (kube-proxy's flag). With
    /// --detect-local-mode ClusterCIDR (the default), ClusterIP traffic from outside it is
    /// masqueraded. Default: none (the config file's clusterCIDR, else none), and then, as
    /// with kube-proxy, nothing is masqueraded because of its source. IPv6 entries are
    /// accepted and not served yet.
    #[arg(
        long,
        value_name = "CIDR[,CIDR]",
        default_value = "",
        hide_default_value = true
    )]
    pub cluster_cidr: String,
    /// The bridge holding the pods' veths (bridge plugin, flannel's cni0, kubenet's cbr0):
    /// its ports are the pod interfaces. kube-proxy's --pod-bridge-interface, which
    /// --detect-local-mode BridgeInterface also reads. (`--pod-bridge` is this flag's older
    /// name.) Default: no bridge; pod interfaces are those named --pod-interface-name-prefix*
    /// if given, else every veth or netkit device whose peer is in another network namespace
    /// (any CNI), uplinks excluded.
    #[arg(
        long = "pod-bridge-interface",
        alias = "pod-bridge",
        value_name = "IFACE",
        default_value = "",
        hide_default_value = true
    )]
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
    /// How the tc programs attach: auto (TCX links where the kernel has TCX, Linux >= 6.6,
    /// else netlink cls_bpf filters), tcx, or netlink. Both outlive the agent and are swapped
    /// atomically on restart; see docs/kernels.md.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = crate::datapath::attach::TcAttachArg::Auto)]
    pub tc_attach: crate::datapath::attach::TcAttachArg,
    /// Outer source addresses (CIDRs, comma-separated) that IPIP/GUE-wrapped traffic is
    /// decapsulated from: the site's load balancers. Default: any source. Whatever the
    /// source, only packets for a LoadBalancer IP or externalIP service port this node serves
    /// are decapsulated. IPv6 entries are accepted and not served (IPv4 only).
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub decap_allowed_sources: Vec<ipnet::IpNet>,
    /// IPIP/GUE addressed to the node that ebpf-proxy does not decapsulate (an outer source
    /// outside --decap-allowed-sources, an inner destination that is not a served LoadBalancer
    /// IP or externalIP): `drop` it (counted), or `pass` it to the kernel still wrapped, for a
    /// CNI that tunnels between nodes itself (Calico or flannel in IPIP mode). Passing opens
    /// nothing: the kernel's own tunnel device decapsulates after netfilter.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = ForeignTunnels::Drop)]
    pub foreign_tunnels: ForeignTunnels,
    /// Also export per-service packet and byte counters on /metrics
    /// (`ebpf_proxy_service_{packets,bytes}_total{namespace,service,port,protocol}`): one
    /// series per service port, many on a large cluster, so off by default. `inspect` shows
    /// the same counters either way.
    #[arg(long)]
    pub metrics_per_service: bool,
    /// Turn datapath debug logging on at start: the tc programs say why each flow is dropped
    /// or rejected (reason, protocol, addresses), logged at info with target
    /// ebpf_proxy::datapath. Costs nothing while off. `ebpf-proxy debug on|off` switches it
    /// while the agent runs, and that choice survives restarts. One line per dropped packet:
    /// for diagnosis, not for a node under attack.
    #[arg(long)]
    pub datapath_debug: bool,
    /// A BPF filesystem directory; maps are pinned under DIR/ebpf-proxy. Mounted if missing.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Source address used when a pod reaches itself through a service (hairpin).
    /// Default: the node's address (what kube-proxy masquerades it to).
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
    /// Socket-level load balancing (cgroup connect/sendmsg hooks): `host` translates only
    /// sockets of the host network namespace (kubelet, hostNetwork pods) and leaves pods'
    /// sockets to the tc programs on their interfaces, which apply every kube-proxy rule;
    /// `all` also translates a pod's TCP connect() to a service without
    /// loadBalancerSourceRanges or sessionAffinity (ClusterIPs, and external addresses with
    /// externalTrafficPolicy Local), with no per-packet NAT or conntrack, unless
    /// --masquerade-all; pods' UDP, those services and REJECT/DROP verdicts stay on tc;
    /// `off` attaches no socket hooks (host processes then cannot reach ClusterIPs).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SocketLb::Host)]
    pub socket_lb: SocketLb,
    /// Map sizes (--max-services, --service-map-entries, --max-backends, --conntrack-max, ...).
    #[command(flatten)]
    pub map_sizes: crate::datapath::MapSizeArgs,
    /// Conntrack timeouts (kube-proxy's --conntrack-* flags).
    #[command(flatten)]
    pub conntrack: crate::conntrack::ConntrackArgs,
    /// kube-proxy's flags.
    #[command(flatten, next_help_heading = "kube-proxy flags (kube-proxy's meaning)")]
    pub kp: KubeProxyFlags,
    /// kube-proxy's flags that do not apply: accepted, one warning each.
    #[command(flatten)]
    pub ignored: IgnoredFlags,
}

/// The kube-proxy flags ebpf-proxy honours (flattened into `ebpf-proxy run`). Boolean ones are
/// Go-style, as kube-proxy's: `--flag`, `--flag=true`, `--flag=false`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KubeProxyFlags {
    /// A kube-proxy configuration file (YAML, `kind: KubeProxyConfiguration`,
    /// `apiVersion: kubeproxy.config.k8s.io/v1alpha1`), e.g. kubeadm's ConfigMap as is. Used
    /// fields: clusterCIDR, hostnameOverride, healthzBindAddress, metricsBindAddress,
    /// nodePortAddresses, iptables.masqueradeAll / nftables.masqueradeAll,
    /// clientConnection.kubeconfig, detectLocalMode, detectLocal.bridgeInterface,
    /// detectLocal.interfaceNamePrefix, logging.verbosity, logging.format, oomScoreAdj; the
    /// others are named in one warning. Flags given on the command line override the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The Kubernetes API server's URL; overrides the kubeconfig's server. Without
    /// --kubeconfig: this URL, with no credentials (as kube-proxy).
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,
    /// Log verbosity, klog's scale: 0-3 info, 4-5 debug, 6 and above trace. RUST_LOG, when
    /// set, wins. Default: the config file's logging.verbosity, else 0.
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub v: Option<u32>,
    /// Log format: text, or json (one object per line: ts, level, msg, target). Default: the
    /// config file's logging.format, else text.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub logging_format: Option<LogFormat>,
    /// How traffic from pods ("local") is told from other traffic, which decides what
    /// addressed to a ClusterIP is masqueraded: ClusterCIDR (sources in --cluster-cidr),
    /// NodeCIDR (sources in this node's Node.spec.podCIDRs), BridgeInterface (traffic from
    /// --pod-bridge-interface) or InterfaceNamePrefix (traffic from interfaces named
    /// --pod-interface-name-prefix*). The last two are approximated by the pod bridge's IPv4
    /// subnet (a warning says so). Default: the config file's detectLocalMode, else
    /// ClusterCIDR.
    #[arg(long, value_enum, value_name = "MODE", ignore_case = true)]
    pub detect_local_mode: Option<DetectLocalMode>,
    /// The name prefix of the pods' interfaces (e.g. veth, cali, lxc): without
    /// --pod-bridge-interface, those interfaces get the pod programs; --detect-local-mode
    /// InterfaceNamePrefix reads it too. Default: the config file's
    /// detectLocal.interfaceNamePrefix.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "",
        hide_default_value = true
    )]
    pub pod_interface_name_prefix: String,
    /// Addresses NodePort services accept traffic on: CIDRs (comma-separated or repeated) and/or
    /// `primary` (the node's primary IPs). Default: every node address (kube-proxy's default).
    #[arg(long, value_name = "CIDR|primary", value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// SNAT all service traffic, not only traffic that needs it (kube-proxy's
    /// --masquerade-all). Replies then always return through this node.
    #[arg(
        long,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "false",
        hide_default_value = true,
        value_name = "BOOL",
        value_parser = parse_go_bool
    )]
    pub masquerade_all: bool,
    /// Where /healthz and /livez are served (IP:port; an IP alone uses port 10256; empty
    /// disables). Unhealthy only when an update is pending too long or the programs are not
    /// attached, as with kube-proxy.
    #[arg(long, value_name = "IP:PORT", default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: String,
    /// Where Prometheus /metrics is served (IP:port; an IP alone uses port 10249; empty
    /// disables). Default loopback only, as with kube-proxy.
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: String,
    /// Deprecated in kube-proxy: the port of --healthz-bind-address (0 disables). Ignored
    /// with --config, as in kube-proxy.
    #[arg(long, value_name = "PORT")]
    pub healthz_port: Option<u16>,
    /// Deprecated in kube-proxy: the port of --metrics-bind-address (0 disables). Ignored
    /// with --config, as in kube-proxy.
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// The agent's oom_score_adj (-1000..1000), written to /proc/self/oom_score_adj at start.
    /// Default: the config file's oomScoreAdj, else left as it is.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub oom_score_adj: Option<i32>,
    /// Remove everything ebpf-proxy put on this node (program links, pinned maps under
    /// --bpffs), then exit 0: `ebpf-proxy cleanup` under kube-proxy's flag name.
    #[arg(
        long,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "false",
        hide_default_value = true,
        value_name = "BOOL",
        value_parser = parse_go_bool
    )]
    pub cleanup: bool,
    /// Do what needs full privileges, then exit 0: mount the BPF filesystem if missing and
    /// create (or adopt) the pinned maps. Nothing is attached.
    #[arg(
        long,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "false",
        hide_default_value = true,
        value_name = "BOOL",
        value_parser = parse_go_bool
    )]
    pub init_only: bool,
    /// Write a KubeProxyConfiguration with the values in effect for the fields ebpf-proxy
    /// reads to FILE, and exit 0.
    #[arg(long, value_name = "FILE")]
    pub write_config_to: Option<PathBuf>,
}

/// Parses a bind address as kube-proxy does: `IP:port`, or an IP (then `default_port`).
/// Empty means disabled (`None`).
pub fn parse_bind_address(s: &str, default_port: u16, flag: &str) -> Result<Option<SocketAddr>> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(Some(a));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Some(SocketAddr::new(ip, default_port)));
    }
    bail!("{flag} {s:?}: expected IP:port or IP (e.g. 0.0.0.0:{default_port})")
}

/// Checks `--nodeport-addresses` values: IPv4/IPv6 CIDRs or `primary`.
pub fn validate_nodeport_addresses(v: &[String]) -> Result<()> {
    for a in v {
        if a == "primary" {
            continue;
        }
        let ok = a.split_once('/').is_some_and(|(ip, len)| {
            match (ip.parse::<IpAddr>(), len.parse::<u8>()) {
                (Ok(IpAddr::V4(_)), Ok(l)) => l <= 32,
                (Ok(IpAddr::V6(_)), Ok(l)) => l <= 128,
                _ => false,
            }
        });
        if !ok {
            bail!("--nodeport-addresses {a:?}: expected a CIDR (e.g. 10.0.0.0/8) or `primary`");
        }
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Masq {
    masquerade_all: Option<bool>,
    #[serde(flatten)]
    _rest: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientConnection {
    kubeconfig: Option<String>,
    #[serde(flatten)]
    _rest: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DetectLocal {
    bridge_interface: Option<String>,
    interface_name_prefix: Option<String>,
    #[serde(flatten)]
    _rest: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Logging {
    format: Option<String>,
    verbosity: Option<u32>,
    #[serde(flatten)]
    _rest: BTreeMap<String, serde_yaml::Value>,
}

/// The subset of `KubeProxyConfiguration` (v1alpha1) that ebpf-proxy uses.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    hostname_override: Option<String>,
    healthz_bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    node_port_addresses: Option<Vec<String>>,
    iptables: Option<Masq>,
    nftables: Option<Masq>,
    client_connection: Option<ClientConnection>,
    detect_local_mode: Option<String>,
    detect_local: Option<DetectLocal>,
    logging: Option<Logging>,
    oom_score_adj: Option<i32>,
    conntrack: Option<Conntrack>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

/// `conntrack:` of the config file: the timeouts apply to ebpf-proxy's own table; the sizing
/// fields (maxPerCore, min) and tcpBeLiberal tune netfilter's and are reported as ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Conntrack {
    tcp_established_timeout: Option<String>,
    tcp_close_wait_timeout: Option<String>,
    udp_timeout: Option<String>,
    udp_stream_timeout: Option<String>,
    max_per_core: Option<serde_yaml::Value>,
    min: Option<serde_yaml::Value>,
    tcp_be_liberal: Option<bool>,
    #[serde(flatten)]
    _rest: BTreeMap<String, serde_yaml::Value>,
}

/// kube-proxy fields accepted and ignored (their function is built in or does not apply).
const IGNORED: &[&str] = &[
    "bindAddress",
    "bindAddressHardFail",
    "configSyncPeriod",
    "enableProfiling",
    "featureGates",
    "ipvs",
    "linux",
    "minSyncPeriod",
    "mode",
    "portRange",
    "showHiddenMetricsForVersion",
    "syncPeriod",
    "udpIdleTimeout",
    "winkernel",
    "windowsRunAsService",
];

impl KubeProxyConfiguration {
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let c: Self = serde_yaml::from_str(text).with_context(|| {
            format!("--config {}: not a KubeProxyConfiguration", path.display())
        })?;
        if let Some(k) = &c.kind
            && k != "KubeProxyConfiguration"
        {
            bail!(
                "--config {}: kind {k:?}, expected KubeProxyConfiguration",
                path.display()
            );
        }
        if let Some(v) = &c.api_version
            && v != "kubeproxy.config.k8s.io/v1alpha1"
        {
            bail!(
                "--config {}: apiVersion {v:?}, expected kubeproxy.config.k8s.io/v1alpha1",
                path.display()
            );
        }
        let unknown: Vec<&String> = c
            .other
            .keys()
            .filter(|k| !IGNORED.contains(&k.as_str()))
            .collect();
        if !unknown.is_empty() {
            bail!(
                "--config {}: unknown field(s) {unknown:?} (check the spelling; kube-proxy's \
                 fields are camelCase)",
                path.display()
            );
        }
        Ok(c)
    }

    /// kube-proxy fields present in the file that ebpf-proxy ignores.
    pub fn ignored_fields(&self) -> Vec<String> {
        self.other.keys().cloned().collect()
    }
}

fn from_cli(m: Option<&ArgMatches>, id: &str) -> bool {
    m.and_then(|m| m.value_source(id))
        .is_some_and(|s| matches!(s, ValueSource::CommandLine | ValueSource::EnvVariable))
}

/// Something `resolve` has to say once the logger is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Logged as a warning (a flag or field that does not apply, an approximation).
    pub warning: bool,
    pub text: String,
}

impl Note {
    fn info(text: impl Into<String>) -> Self {
        Self {
            warning: false,
            text: text.into(),
        }
    }
    fn warn(text: impl Into<String>) -> Self {
        Self {
            warning: true,
            text: text.into(),
        }
    }
}

impl std::ops::Deref for Note {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Merges the config file (if any) into `args`: values not given on the command line or in
/// the environment come from the file. `matches` are the `run` subcommand's matches (`None`:
/// treat every value as not given). Then fills defaults (node name = hostname, as kube-proxy)
/// and validates. Returns notes worth logging (ignored flags and fields, approximations).
pub fn resolve(args: &mut RunArgs, matches: Option<&ArgMatches>) -> Result<Vec<Note>> {
    let mut notes = Vec::new();
    let m = matches;
    if let Some(path) = args.kp.config.clone() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading --config {}", path.display()))?;
        let c = KubeProxyConfiguration::parse(&text, &path)?;
        let ignored = c.ignored_fields();
        if !ignored.is_empty() {
            notes.push(Note::info(format!(
                "--config {}: ignoring kube-proxy fields that do not apply to ebpf-proxy: {}",
                path.display(),
                ignored.join(", ")
            )));
        }
        merge_file(args, c, m, &path, &mut notes)?;
    } else {
        // kube-proxy's deprecated port flags apply only without a config file.
        if let Some(p) = args.kp.healthz_port {
            args.kp.healthz_bind_address =
                with_port(&args.kp.healthz_bind_address, p, "--healthz-bind-address")?;
        }
        if let Some(p) = args.kp.metrics_port {
            args.kp.metrics_bind_address =
                with_port(&args.kp.metrics_bind_address, p, "--metrics-bind-address")?;
        }
    }
    if args.kp.config.is_some() {
        for (flag, given) in [
            ("--healthz-port", args.kp.healthz_port.is_some()),
            ("--metrics-port", args.kp.metrics_port.is_some()),
        ] {
            if given {
                notes.push(Note::warn(format!(
                    "{flag}: ignored with --config (as in kube-proxy); use the file's bind \
                     address or the --*-bind-address flag"
                )));
            }
        }
    }
    notes.extend(args.ignored.warnings().into_iter().map(Note::warn));
    if args.kp.master.is_some() && args.manifests.is_some() {
        notes.push(Note::warn(
            "--master: ignored, --manifests is the source (no API server is used)",
        ));
    }
    if let Some(m) = &args.kp.master {
        master_url(m).map_err(|e| anyhow::anyhow!("--master {m:?}: {e}"))?;
    }
    if args.node_name.is_empty() {
        args.node_name = hostname().context(
            "no --node-name/--hostname-override, NODE_NAME or hostnameOverride, and the \
             hostname is unreadable",
        )?;
        notes.push(Note::info(format!(
            "node name {:?} taken from the hostname (set --hostname-override or NODE_NAME if \
             the Node object is named otherwise)",
            args.node_name
        )));
    }
    notes.extend(args.conntrack.notes().into_iter().map(Note::warn));
    validate_nodeport_addresses(&args.kp.nodeport_addresses)?;
    let (v4, v6) = crate::sync::Cidr::parse_list(&args.cluster_cidr)
        .map_err(|e| anyhow::anyhow!("--cluster-cidr {e}"))?;
    if !v6.is_empty() {
        notes.push(Note::info(format!(
            "--cluster-cidr: IPv6 {} accepted but not served yet (IPv4 only)",
            v6.join(",")
        )));
    }
    let (decap_v4, decap_v6) = crate::sync::decap_sources(&args.decap_allowed_sources);
    if !decap_v6.is_empty() {
        let v6: Vec<String> = decap_v6.iter().map(|n| n.to_string()).collect();
        notes.push(Note::warn(format!(
            "--decap-allowed-sources: IPv6 {} not served (IPv4 only){}",
            v6.join(","),
            if decap_v4.as_ref().is_some_and(Vec::is_empty) {
                "; no IPv4 CIDR given, so nothing is decapsulated"
            } else {
                ""
            }
        )));
    }
    let (info, warn) = local_detection(args)
        .check(v4.is_set())
        .map_err(anyhow::Error::msg)?;
    notes.extend(info.into_iter().map(Note::info));
    notes.extend(warn.into_iter().map(Note::warn));
    if let Some(n) = args.kp.oom_score_adj
        && !(-1000..=1000).contains(&n)
    {
        bail!("--oom-score-adj {n}: must be within [-1000, 1000]");
    }
    parse_bind_address(
        &args.kp.healthz_bind_address,
        10256,
        "--healthz-bind-address",
    )?;
    parse_bind_address(
        &args.kp.metrics_bind_address,
        10249,
        "--metrics-bind-address",
    )?;
    Ok(notes)
}

/// The config file's values, where the command line did not set them.
fn merge_file(
    args: &mut RunArgs,
    c: KubeProxyConfiguration,
    m: Option<&ArgMatches>,
    path: &Path,
    notes: &mut Vec<Note>,
) -> Result<()> {
    if let Some(v) = c.cluster_cidr
        && !from_cli(m, "cluster_cidr")
    {
        args.cluster_cidr = v;
    }
    if let Some(v) = c.hostname_override.filter(|v| !v.is_empty())
        && !from_cli(m, "node_name")
    {
        args.node_name = v;
    }
    // Empty fields in the file mean kube-proxy's defaults (kubeadm writes them empty).
    if let Some(v) = c.healthz_bind_address.filter(|v| !v.is_empty())
        && !from_cli(m, "healthz_bind_address")
    {
        args.kp.healthz_bind_address = v;
    }
    if let Some(v) = c.metrics_bind_address.filter(|v| !v.is_empty())
        && !from_cli(m, "metrics_bind_address")
    {
        args.kp.metrics_bind_address = v;
    }
    if let Some(v) = c.node_port_addresses
        && !from_cli(m, "nodeport_addresses")
    {
        args.kp.nodeport_addresses = v;
    }
    let masq = [c.iptables, c.nftables]
        .into_iter()
        .flatten()
        .filter_map(|s| s.masquerade_all)
        .any(|b| b);
    if masq && !from_cli(m, "masquerade_all") {
        args.kp.masquerade_all = true;
    }
    if let Some(ct) = c.conntrack {
        apply_conntrack(&mut args.conntrack, ct, m, notes, path)?;
    }
    if let Some(k) = c
        .client_connection
        .and_then(|c| c.kubeconfig)
        .filter(|k| !k.is_empty())
        && args.kubeconfig.is_none()
        && args.manifests.is_none()
    {
        args.kubeconfig = Some(PathBuf::from(k));
    }
    let bad = |e: String| anyhow::anyhow!("--config {}: {e}", path.display());
    if let Some(v) = c.detect_local_mode
        && !from_cli(m, "detect_local_mode")
    {
        args.kp.detect_local_mode = Some(DetectLocalMode::from_config(&v).map_err(bad)?);
    }
    if let Some(d) = c.detect_local {
        if let Some(b) = d.bridge_interface.filter(|b| !b.is_empty())
            && !from_cli(m, "pod_bridge")
        {
            args.pod_bridge = b;
        }
        if let Some(p) = d.interface_name_prefix.filter(|p| !p.is_empty())
            && !from_cli(m, "pod_interface_name_prefix")
        {
            args.kp.pod_interface_name_prefix = p;
        }
    }
    if let Some(l) = c.logging {
        if let Some(v) = l.verbosity
            && !from_cli(m, "v")
        {
            args.kp.v = Some(v);
        }
        if let Some(f) = l.format
            && !from_cli(m, "logging_format")
        {
            args.kp.logging_format = Some(LogFormat::from_config(&f).map_err(bad)?);
        }
    }
    if let Some(n) = c.oom_score_adj
        && !from_cli(m, "oom_score_adj")
    {
        args.kp.oom_score_adj = Some(n);
    }
    Ok(())
}

/// The config file's `conntrack:` timeouts where no flag gave them. Empty or null fields mean
/// kube-proxy's defaults.
fn apply_conntrack(
    a: &mut crate::conntrack::ConntrackArgs,
    c: Conntrack,
    m: Option<&ArgMatches>,
    notes: &mut Vec<Note>,
    path: &Path,
) -> Result<()> {
    let fields = [
        (
            c.tcp_established_timeout,
            "conntrack_tcp_timeout_established",
            "tcpEstablishedTimeout",
            &mut a.conntrack_tcp_timeout_established,
        ),
        (
            c.tcp_close_wait_timeout,
            "conntrack_tcp_timeout_close_wait",
            "tcpCloseWaitTimeout",
            &mut a.conntrack_tcp_timeout_close_wait,
        ),
        (
            c.udp_timeout,
            "conntrack_udp_timeout",
            "udpTimeout",
            &mut a.conntrack_udp_timeout,
        ),
        (
            c.udp_stream_timeout,
            "conntrack_udp_timeout_stream",
            "udpStreamTimeout",
            &mut a.conntrack_udp_timeout_stream,
        ),
    ];
    for (v, id, field, slot) in fields {
        if let Some(v) = v.filter(|v| !v.trim().is_empty())
            && !from_cli(m, id)
        {
            *slot = crate::conntrack::parse_go_duration(&v).map_err(|e| {
                anyhow::anyhow!("--config {}: conntrack.{field} {e}", path.display())
            })?;
        }
    }
    let tuned: Vec<&str> = [
        ("maxPerCore", c.max_per_core.is_some_and(|v| !v.is_null())),
        ("min", c.min.is_some_and(|v| !v.is_null())),
        ("tcpBeLiberal", c.tcp_be_liberal == Some(true)),
    ]
    .into_iter()
    .filter_map(|(f, set)| set.then_some(f))
    .collect();
    if !tuned.is_empty() {
        notes.push(Note::info(format!(
            "--config {}: conntrack.{} tune netfilter's table, which service traffic no longer \
             uses: ignored (ebpf-proxy's table is sized by --conntrack-max)",
            path.display(),
            tuned.join(", conntrack.")
        )));
    }
    Ok(())
}

/// Local traffic detection as the resolved flags configure it.
/// The effective configuration as `inspect status` shows it (flags and config file merged).
pub fn summary(args: &RunArgs) -> std::collections::BTreeMap<String, String> {
    let list = |v: &[String]| v.join(",");
    let opt = |v: Option<String>| v.unwrap_or_default();
    let source = match (&args.manifests, &args.kubeconfig, &args.kp.master) {
        (Some(d), _, _) => format!("manifests {}", d.display()),
        (None, Some(k), _) => format!("kubeconfig {}", k.display()),
        (None, None, Some(m)) => format!("master {m}"),
        (None, None, None) => "in-cluster".to_owned(),
    };
    let m = &args.map_sizes;
    [
        ("source", source),
        (
            "config",
            opt(args.kp.config.as_ref().map(|p| p.display().to_string())),
        ),
        ("hostname-override", args.node_name.clone()),
        (
            "node-ip",
            list(
                &args
                    .node_ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            ),
        ),
        ("cluster-cidr", args.cluster_cidr.clone()),
        (
            "detect-local-mode",
            format!("{:?}", local_detection(args).mode),
        ),
        ("pod-bridge-interface", args.pod_bridge.clone()),
        (
            "pod-interface-name-prefix",
            args.kp.pod_interface_name_prefix.clone(),
        ),
        ("uplink", list(&args.uplinks)),
        ("xdp-mode", format!("{:?}", args.xdp_mode).to_lowercase()),
        ("tc-attach", format!("{:?}", args.tc_attach).to_lowercase()),
        ("masquerade-all", args.kp.masquerade_all.to_string()),
        ("nodeport-addresses", list(&args.kp.nodeport_addresses)),
        (
            "decap-allowed-sources",
            list(
                &args
                    .decap_allowed_sources
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            ),
        ),
        ("healthz-bind-address", args.kp.healthz_bind_address.clone()),
        ("metrics-bind-address", args.kp.metrics_bind_address.clone()),
        ("metrics-per-service", args.metrics_per_service.to_string()),
        ("datapath-debug", args.datapath_debug.to_string()),
        ("bpffs", args.bpffs.display().to_string()),
        (
            "cgroup-path",
            opt(args.cgroup_path.as_ref().map(|p| p.display().to_string())),
        ),
        ("max-services", m.max_services.to_string()),
        ("service-map-entries", m.service_map_entries.to_string()),
        ("max-backends", m.max_backends.to_string()),
        ("conntrack-max", m.conntrack_max.to_string()),
        ("max-cluster-ips", m.max_cluster_ips.to_string()),
        ("max-source-ranges", m.max_source_ranges.to_string()),
        ("affinity-max", m.affinity_max.to_string()),
        (
            "conntrack-timeouts",
            format!("{:?}", args.conntrack.timeouts()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

pub fn local_detection(args: &RunArgs) -> LocalDetection {
    LocalDetection {
        mode: args.kp.detect_local_mode.unwrap_or_default(),
        cluster_cidr: crate::sync::Cidr::parse_list(&args.cluster_cidr)
            .map(|(v4, _)| v4)
            .unwrap_or_default(),
        bridge: args.pod_bridge.clone(),
        prefix: args.kp.pod_interface_name_prefix.clone(),
    }
}

/// `--master`: a URL; a bare `host[:port]` means https, as client-go's default.
pub fn master_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty".to_owned());
    }
    let url = if s.contains("://") {
        s.to_owned()
    } else {
        format!("https://{s}")
    };
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
    let host = url.split_once("://").map(|(_, r)| r).unwrap_or_default();
    if !scheme_ok || host.is_empty() || host.starts_with('/') {
        return Err("expected a URL such as https://10.0.0.1:6443".to_owned());
    }
    Ok(url)
}

/// kube-proxy's deprecated `--healthz-port`/`--metrics-port`: port 0 disables the server,
/// another port replaces the bind address's.
fn with_port(addr: &str, port: u16, flag: &str) -> Result<String> {
    if port == 0 {
        return Ok(String::new());
    }
    let ip = match parse_bind_address(addr, port, flag)? {
        Some(a) => a.ip(),
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    Ok(SocketAddr::new(ip, port).to_string())
}

/// `--write-config-to`: a KubeProxyConfiguration with the values in effect for the fields
/// ebpf-proxy reads (kube-proxy writes its whole default configuration).
pub fn config_yaml(args: &RunArgs) -> String {
    let q = |s: &str| serde_json::Value::from(s).to_string();
    let mode = match args.kp.detect_local_mode.unwrap_or_default() {
        DetectLocalMode::ClusterCIDR => "ClusterCIDR",
        DetectLocalMode::NodeCIDR => "NodeCIDR",
        DetectLocalMode::BridgeInterface => "BridgeInterface",
        DetectLocalMode::InterfaceNamePrefix => "InterfaceNamePrefix",
    };
    let format = match args.kp.logging_format.unwrap_or_default() {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let npa = if args.kp.nodeport_addresses.is_empty() {
        "null".to_owned()
    } else {
        format!(
            "[{}]",
            args.kp
                .nodeport_addresses
                .iter()
                .map(|a| q(a))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let kubeconfig = args
        .kubeconfig
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let oom = args
        .kp
        .oom_score_adj
        .map_or("null".to_owned(), |n| n.to_string());
    format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
         kind: KubeProxyConfiguration\n\
         clientConnection:\n  kubeconfig: {}\n\
         clusterCIDR: {}\n\
         detectLocal:\n  bridgeInterface: {}\n  interfaceNamePrefix: {}\n\
         detectLocalMode: {mode}\n\
         healthzBindAddress: {}\n\
         hostnameOverride: {}\n\
         iptables:\n  masqueradeAll: {}\n\
         logging:\n  format: {format}\n  verbosity: {}\n\
         metricsBindAddress: {}\n\
         nodePortAddresses: {npa}\n\
         oomScoreAdj: {oom}\n",
        q(&kubeconfig),
        q(&args.cluster_cidr),
        q(&args.pod_bridge),
        q(&args.kp.pod_interface_name_prefix),
        q(&args.kp.healthz_bind_address),
        q(&args.node_name),
        args.kp.masquerade_all,
        args.kp.v.unwrap_or(0),
        q(&args.kp.metrics_bind_address),
    )
}

fn hostname() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        bail!("gethostname: {}", std::io::Error::last_os_error());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).to_lowercase())
}

/// The default `--nodeport-addresses` meaning, for code that consumes it: `None` = every
/// node address; otherwise the listed CIDRs, with `primary` expanded to `primary_ips`.
pub fn nodeport_cidrs(v: &[String], primary_ips: &[Ipv4Addr]) -> Option<Vec<String>> {
    if v.is_empty() {
        return None;
    }
    Some(
        v.iter()
            .flat_map(|a| {
                if a == "primary" {
                    primary_ips.iter().map(|ip| format!("{ip}/32")).collect()
                } else {
                    vec![a.clone()]
                }
            })
            .collect(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn resolve_argv(argv: &[&str]) -> Result<(RunArgs, Vec<Note>)> {
        let m = Cli::command().try_get_matches_from(argv)?;
        let mut args = Cli::from_arg_matches(&m)?.run;
        let notes = resolve(&mut args, Some(&m))?;
        Ok((args, notes))
    }

    const FILE: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: 10.1.0.0/16
hostnameOverride: node-from-file
healthzBindAddress: 0.0.0.0:20256
metricsBindAddress: 0.0.0.0:20249
nodePortAddresses: [primary, 192.168.0.0/16]
iptables:
  masqueradeAll: true
  syncPeriod: 30s
conntrack:
  maxPerCore: 32768
  tcpEstablishedTimeout: 2h0m0s
  udpTimeout: 45s
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
";

    /// kubeadm's own kube-proxy ConfigMap starts the agent unchanged: empty fields mean
    /// kube-proxy's defaults, and the API server comes from its kubeconfig.conf.
    #[test]
    fn kubeadm_configmap_is_accepted_unchanged() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kubeadm");
        let conf = dir.join("config.conf");
        let (a, notes) =
            resolve_argv(&["x", "--config", conf.to_str().unwrap(), "--node-name", "n1"]).unwrap();
        assert_eq!(
            a.kp.healthz_bind_address, "0.0.0.0:10256",
            "empty -> default"
        );
        assert_eq!(
            a.kp.metrics_bind_address, "127.0.0.1:10249",
            "empty -> default"
        );
        assert_eq!(a.cluster_cidr, "");
        assert!(!a.kp.masquerade_all);
        assert!(a.kp.nodeport_addresses.is_empty());
        assert!(
            notes
                .iter()
                .any(|n| n.contains("not masqueraded because of its source")),
            "{notes:?}"
        );
        let kc = a.kubeconfig.clone().unwrap();
        assert_eq!(kc, Path::new("/var/lib/kube-proxy/kubeconfig.conf"));
        // Null and 0s conntrack timeouts mean the defaults.
        assert_eq!(
            a.conntrack.timeouts(),
            crate::conntrack::Timeouts::default()
        );
        // The kubeconfig it names (here: the fixture beside it) reads with kube-rs.
        let k = kube::config::Kubeconfig::read_from(dir.join("kubeconfig.conf")).unwrap();
        let cluster = k.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(
            cluster.server.as_deref(),
            Some("https://control-plane.example.internal:6443")
        );
        let user = k.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(
            user.token_file.as_deref(),
            Some("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
    }

    #[test]
    fn cluster_cidr_is_optional_and_one_per_family() {
        let (a, notes) = resolve_argv(&[
            "x",
            "--node-name",
            "n",
            "--cluster-cidr",
            "10.0.0.0/16,fd00::/48",
        ])
        .unwrap();
        let (v4, v6) = crate::sync::Cidr::parse_list(&a.cluster_cidr).unwrap();
        assert_eq!((v4.addr, v4.prefix), (Ipv4Addr::new(10, 0, 0, 0), 16));
        assert_eq!(v6, ["fd00::/48"]);
        assert!(
            notes.iter().any(|n| n.contains("IPv6 fd00::/48")),
            "{notes:?}"
        );
        let (a, _) = resolve_argv(&["x", "--node-name", "n"]).unwrap();
        let (v4, _) = crate::sync::Cidr::parse_list(&a.cluster_cidr).unwrap();
        assert!(!v4.is_set(), "no lab value as the default");
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/8,10.1.0.0/16",
            "fd00::/129",
        ] {
            assert!(
                resolve_argv(&["x", "--node-name", "n", "--cluster-cidr", bad]).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn config_file_fills_what_flags_do_not_set() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.conf");
        std::fs::write(&f, FILE).unwrap();
        let fs = f.to_str().unwrap();
        let (a, notes) = resolve_argv(&["x", "--config", fs]).unwrap();
        assert_eq!(a.cluster_cidr, "10.1.0.0/16");
        assert_eq!(a.node_name, "node-from-file");
        assert_eq!(a.kp.healthz_bind_address, "0.0.0.0:20256");
        assert_eq!(a.kp.metrics_bind_address, "0.0.0.0:20249");
        assert_eq!(a.kp.nodeport_addresses, ["primary", "192.168.0.0/16"]);
        assert!(a.kp.masquerade_all);
        assert_eq!(
            a.kubeconfig.as_deref(),
            Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        assert!(
            notes
                .iter()
                .any(|n| n.contains("ignoring") && n.contains("mode")),
            "{notes:?}"
        );
        assert!(
            notes.iter().any(|n| n.contains("conntrack.maxPerCore")),
            "{notes:?}"
        );
        let t = a.conntrack.timeouts();
        assert_eq!(t.tcp_established, std::time::Duration::from_secs(7200));
        assert_eq!(t.udp, std::time::Duration::from_secs(45));
        // A flag wins over the file.
        let (a, _) = resolve_argv(&[
            "x",
            "--config",
            fs,
            "--conntrack-tcp-timeout-established=3h",
        ])
        .unwrap();
        assert_eq!(
            a.conntrack.timeouts().tcp_established,
            std::time::Duration::from_secs(3 * 3600)
        );

        // Command-line flags win over the file.
        let (a, _) = resolve_argv(&[
            "x",
            "--config",
            fs,
            "--hostname-override",
            "n1",
            "--cluster-cidr",
            "10.2.0.0/16",
            "--healthz-bind-address",
            "127.0.0.1",
            "--nodeport-addresses",
            "10.0.0.0/8,172.16.0.0/12",
            "--manifests",
            "/tmp",
        ])
        .unwrap();
        assert_eq!(a.node_name, "n1");
        assert_eq!(a.cluster_cidr, "10.2.0.0/16");
        assert_eq!(a.kp.healthz_bind_address, "127.0.0.1");
        assert_eq!(a.kp.nodeport_addresses, ["10.0.0.0/8", "172.16.0.0/12"]);
        assert_eq!(
            a.kubeconfig, None,
            "--manifests given: the file's kubeconfig is not used"
        );
        assert_eq!(
            parse_bind_address(&a.kp.healthz_bind_address, 10256, "x").unwrap(),
            Some("127.0.0.1:10256".parse().unwrap())
        );
    }

    #[test]
    fn defaults_match_kube_proxy() {
        let (a, _) = resolve_argv(&["x", "--node-name", "n"]).unwrap();
        assert_eq!(
            parse_bind_address(&a.kp.healthz_bind_address, 10256, "x").unwrap(),
            Some("0.0.0.0:10256".parse().unwrap())
        );
        assert_eq!(
            parse_bind_address(&a.kp.metrics_bind_address, 10249, "x").unwrap(),
            Some("127.0.0.1:10249".parse().unwrap())
        );
        assert!(!a.kp.masquerade_all);
        assert!(a.kp.nodeport_addresses.is_empty());
        assert_eq!(parse_bind_address("", 1, "x").unwrap(), None);
        // No node name anywhere: the hostname, like kube-proxy.
        let (a, notes) = resolve_argv(&["x"]).unwrap();
        assert!(!a.node_name.is_empty());
        assert!(notes.iter().any(|n| n.contains("hostname")), "{notes:?}");
    }

    #[test]
    fn bad_values_are_rejected_with_the_flag_named() {
        for (argv, want) in [
            (
                vec!["x", "--nodeport-addresses", "10.0.0.0"],
                "--nodeport-addresses",
            ),
            (
                vec!["x", "--nodeport-addresses", "10.0.0.0/33"],
                "--nodeport-addresses",
            ),
            (
                vec!["x", "--healthz-bind-address", "nope"],
                "--healthz-bind-address",
            ),
            (
                vec!["x", "--metrics-bind-address", "1.2.3.4:x"],
                "--metrics-bind-address",
            ),
            (vec!["x", "--cluster-cidr", "10.0.0.0"], "--cluster-cidr"),
        ] {
            let e = resolve_argv(&argv).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{argv:?}: {e:#}");
        }
        let p = Path::new("c.yaml");
        for (text, want) in [
            ("kind: Deployment\n", "kind"),
            ("apiVersion: v9\n", "apiVersion"),
            ("clusterCidr: 10.0.0.0/8\n", "unknown field"),
            ("clusterCIDR: [1]\n", "not a KubeProxyConfiguration"),
        ] {
            let e = KubeProxyConfiguration::parse(text, p).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{text:?}: {e:#}");
        }
        assert_eq!(
            nodeport_cidrs(
                &["primary".into(), "10.0.0.0/8".into()],
                &[Ipv4Addr::new(1, 2, 3, 4)]
            ),
            Some(vec!["1.2.3.4/32".to_owned(), "10.0.0.0/8".to_owned()])
        );
        assert_eq!(nodeport_cidrs(&[], &[]), None);
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> String {
        let f = dir.path().join("config.conf");
        std::fs::write(&f, text).unwrap();
        f.to_str().unwrap().to_owned()
    }

    /// detectLocalMode, detectLocal.*, logging.* and oomScoreAdj come from the file; flags win.
    #[test]
    fn detect_local_and_logging_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            &dir,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
detectLocalMode: InterfaceNamePrefix
detectLocal:
  bridgeInterface: br-pods
  interfaceNamePrefix: veth
logging:
  format: json
  verbosity: 4
  flushFrequency: 0
oomScoreAdj: -999
",
        );
        let (a, notes) = resolve_argv(&["x", "--node-name", "n", "--config", &f]).unwrap();
        assert_eq!(
            a.kp.detect_local_mode,
            Some(DetectLocalMode::InterfaceNamePrefix)
        );
        assert_eq!(a.pod_bridge, "br-pods");
        assert_eq!(a.kp.pod_interface_name_prefix, "veth");
        assert_eq!(a.kp.v, Some(4));
        assert_eq!(a.kp.logging_format, Some(LogFormat::Json));
        assert_eq!(a.kp.oom_score_adj, Some(-999));
        assert!(
            notes
                .iter()
                .any(|n| n.warning && n.contains("InterfaceNamePrefix is approximated")),
            "{notes:?}"
        );
        let (a, _) = resolve_argv(&[
            "x",
            "--node-name",
            "n",
            "--config",
            &f,
            "--detect-local-mode=NodeCIDR",
            "--pod-bridge-interface=cbr0",
            "--v=0",
            "--logging-format=text",
            "--oom-score-adj=-500",
        ])
        .unwrap();
        assert_eq!(a.kp.detect_local_mode, Some(DetectLocalMode::NodeCIDR));
        assert_eq!(a.pod_bridge, "cbr0");
        assert_eq!(a.kp.v, Some(0));
        assert_eq!(a.kp.logging_format, Some(LogFormat::Text));
        assert_eq!(a.kp.oom_score_adj, Some(-500));

        // kubeadm's empty values: the defaults.
        let kubeadm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kubeadm/config.conf");
        let (a, _) = resolve_argv(&[
            "x",
            "--node-name",
            "n",
            "--config",
            kubeadm.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(a.kp.detect_local_mode, Some(DetectLocalMode::ClusterCIDR));
        assert_eq!(
            a.pod_bridge, "",
            "no bridge: pod interfaces are found without one"
        );
        assert_eq!(a.kp.pod_interface_name_prefix, "");
        assert_eq!(a.kp.v, Some(0));
        assert_eq!(a.kp.logging_format, None, "text");
        assert_eq!(a.kp.oom_score_adj, None);

        for (text, want) in [
            ("detectLocalMode: Bridge\n", "detectLocalMode \"Bridge\""),
            ("logging:\n  format: yaml\n", "logging.format"),
        ] {
            let f = write(&dir, text);
            let e = resolve_argv(&["x", "--node-name", "n", "--config", &f]).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{text:?}: {e:#}");
        }
    }

    #[test]
    fn detect_local_mode_needs_what_kube_proxy_needs() {
        let e = resolve_argv(&[
            "x",
            "--node-name",
            "n",
            "--detect-local-mode",
            "InterfaceNamePrefix",
        ])
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("--pod-interface-name-prefix"),
            "{e:#}"
        );
        let e = resolve_argv(&[
            "x",
            "--node-name",
            "n",
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            "",
        ])
        .unwrap_err();
        assert!(format!("{e:#}").contains("--pod-bridge-interface"), "{e:#}");
        // Case as kube-proxy spells it, or any case.
        for m in ["NodeCIDR", "nodecidr"] {
            let (a, notes) = resolve_argv(&[
                "x",
                "--node-name",
                "n",
                "--detect-local-mode",
                m,
                "--cluster-cidr",
                "10.0.0.0/8",
            ])
            .unwrap();
            assert_eq!(a.kp.detect_local_mode, Some(DetectLocalMode::NodeCIDR));
            assert!(
                notes
                    .iter()
                    .any(|n| n.contains("--cluster-cidr is not used")),
                "{notes:?}"
            );
        }
        assert!(resolve_argv(&["x", "--detect-local-mode", "Bridge"]).is_err());
    }

    #[test]
    fn deprecated_port_flags_and_master() {
        let (a, _) = resolve_argv(&[
            "x",
            "--node-name",
            "n",
            "--healthz-port",
            "20256",
            "--metrics-port=0",
        ])
        .unwrap();
        assert_eq!(a.kp.healthz_bind_address, "0.0.0.0:20256");
        assert_eq!(a.kp.metrics_bind_address, "", "port 0 disables");
        let dir = tempfile::tempdir().unwrap();
        let f = write(&dir, "kind: KubeProxyConfiguration\n");
        let (a, notes) =
            resolve_argv(&["x", "--node-name", "n", "--config", &f, "--healthz-port=1"]).unwrap();
        assert_eq!(a.kp.healthz_bind_address, "0.0.0.0:10256");
        assert!(
            notes
                .iter()
                .any(|n| n.warning && n.contains("--healthz-port: ignored with --config")),
            "{notes:?}"
        );

        assert_eq!(
            master_url("10.0.0.1:6443").unwrap(),
            "https://10.0.0.1:6443"
        );
        assert_eq!(
            master_url("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080"
        );
        for bad in ["", "ftp://x", "https://"] {
            assert!(master_url(bad).is_err(), "{bad:?}");
        }
        assert!(resolve_argv(&["x", "--node-name", "n", "--master", "ftp://x"]).is_err());
        let (_, notes) = resolve_argv(&[
            "x",
            "--node-name",
            "n",
            "--master",
            "https://a:6443",
            "--manifests",
            "/m",
        ])
        .unwrap();
        assert!(
            notes
                .iter()
                .any(|n| n.warning && n.contains("--master: ignored")),
            "{notes:?}"
        );
        assert!(resolve_argv(&["x", "--node-name", "n", "--oom-score-adj=-1001"]).is_err());
    }

    /// `--write-config-to` writes a file that reads back to the same values.
    #[test]
    fn written_config_reads_back() {
        let (a, _) = resolve_argv(&[
            "x",
            "--node-name",
            "node-7",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            "br0",
            "--masquerade-all",
            "--nodeport-addresses",
            "primary",
            "--v=5",
            "--logging-format=json",
            "--kubeconfig",
            "/k/conf",
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = write(&dir, &config_yaml(&a));
        let (b, _) = resolve_argv(&["x", "--config", &f]).unwrap();
        assert_eq!(b.node_name, "node-7");
        assert_eq!(b.cluster_cidr, "10.244.0.0/16");
        assert_eq!(
            b.kp.detect_local_mode,
            Some(DetectLocalMode::BridgeInterface)
        );
        assert_eq!(b.pod_bridge, "br0");
        assert!(b.kp.masquerade_all);
        assert_eq!(b.kp.nodeport_addresses, ["primary"]);
        assert_eq!(b.kp.v, Some(5));
        assert_eq!(b.kp.logging_format, Some(LogFormat::Json));
        assert_eq!(b.kubeconfig.as_deref(), Some(Path::new("/k/conf")));
        assert_eq!(b.kp.healthz_bind_address, a.kp.healthz_bind_address);
        assert_eq!(b.kp.metrics_bind_address, a.kp.metrics_bind_address);
    }
}

/// `--socket-lb`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketLb {
    /// Host-network sockets only; pods use the tc path.
    Host,
    /// Host-network sockets, and pods' TCP connections where no per-packet rule applies.
    All,
    /// No socket hooks.
    Off,
}

/// `--foreign-tunnels`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForeignTunnels {
    /// Drop and count them.
    Drop,
    /// Leave them wrapped for the kernel.
    Pass,
}
