//! Prometheus metrics on `--metrics-bind-address` (default 127.0.0.1:10249, like kube-proxy),
//! path `/metrics`: OpenMetrics text 1.0.0 or Prometheus text 0.0.4 by the `Accept` header
//! ([`negotiate`]), gzipped when `Accept-Encoding` allows it.
//!
//! kube-proxy's `kubeproxy_*` set (pkg/proxy/metrics), same names, types, help and buckets,
//! where it applies (docs/operations.md lists those that do not: iptables/nftables/ipvs rule
//! counts and restore failures):
//! - `kubeproxy_sync_proxy_rules_duration_seconds` (histogram): one reconcile, plan + map
//!   writes; `..._sync_full_proxy_rules_duration_seconds` when every service group was
//!   translated (the first sync after a start), `..._sync_partial_...` when some were reused.
//! - `kubeproxy_network_programming_duration_seconds` (histogram): from the change's trigger
//!   time (EndpointSlice `endpoints.kubernetes.io/last-change-trigger-time`) to programmed.
//! - `kubeproxy_sync_proxy_rules_last_timestamp_seconds`, `..._last_queued_timestamp_seconds`.
//! - `kubeproxy_sync_proxy_rules_{service,endpoint}_changes_{pending,total}`: Service and
//!   EndpointSlice objects added, changed or deleted between snapshots ([`count_changes`]).
//! - `kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy}` (gauge): service
//!   ports with a Local policy, endpoints elsewhere, none on this node.
//! - `kubeproxy_proxy_healthz_total{code}`, `kubeproxy_proxy_livez_total{code}`.
//!
//! Ours (`ebpf_proxy_*`), read from the pinned maps at scrape time:
//! - `ebpf_proxy_datapath_packets_total{reason}`: the per-CPU verdict counters summed
//!   (names from `proxy_common::counter::NAMES`), and
//!   `ebpf_proxy_datapath_verdicts_total{verdict}`: the same folded into forward, drop, pass and
//!   reject ([`verdict`]; events that are not verdicts, e.g. masquerade, are left out).
//! - `ebpf_proxy_map_entries{map}` / `ebpf_proxy_map_capacity{map}`: occupancy of each hash map
//!   (conntrack included; counted at most every [`OCCUPANCY_CACHE`]).
//! - `ebpf_proxy_map_write_failures_total{map,op}`, `ebpf_proxy_sync_failures_total`,
//!   `ebpf_proxy_attached_links`, `ebpf_proxy_link_program_replacements_total`.
//! - `ebpf_proxy_conntrack_gc_removed_total{state}`: flows the sweeper removed, by the state
//!   they timed out in; `ebpf_proxy_conntrack_gc_scanned_total`, `..._gc_runs_total`;
//!   `ebpf_proxy_conntrack_migrated_total`: entries carried over from an earlier release;
//!   `ebpf_proxy_conntrack_evicted_total`: half flows (the other entry evicted by the
//!   unanswered table's LRU) the sweeper found and removed.
//!
//! - `process_*` (CPU, memory, file descriptors, start time) and
//!   `ebpf_proxy_build_info{version,git_revision,rustc}`: see [`super::process`].
//!
//! - With `--metrics-per-service` only (one series per service port: many on a large
//!   cluster): `ebpf_proxy_service_packets_total{namespace,service,port,protocol}` and
//!   `ebpf_proxy_service_bytes_total{...}`: the per-service counter map (`LB4_SCNT_V1`) summed
//!   over CPUs and over the service IDs of one service port (ClusterIP, NodePort, LB IP, ...
//!   entries each have their own ID), labelled from the last sync's ID -> service mapping
//!   ([`Metrics::set_service_labels`]). Forward packets the tc/XDP programs translated (new
//!   and established flows); a host process's connect/sendmsg counts one, with 0 bytes (the
//!   socket hooks never see packets).
use std::{
    net::SocketAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use aya::maps::{MapData, MapType};
use log::info;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use proxy_common::{counter, maps};
use tokio::task::JoinHandle;

use crate::{
    datapath::{MapSizes, WriteError, batch},
    serve::{
        health::ProbeCounter,
        http::{self, Response},
    },
    source::manifests::Objects,
};

/// Conntrack can hold hundreds of thousands of entries; counting them costs a batch syscall per
/// `batch::BATCH` entries (about 64 per full default table), so the counts are cached.
pub const OCCUPANCY_CACHE: Duration = Duration::from_secs(10);

type Labels = Vec<(String, String)>;

/// The labels of a service port's per-service counters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceLabels {
    pub namespace: String,
    pub service: String,
    /// The Service port's name (empty for an unnamed port, like kube-proxy).
    pub port: String,
    pub protocol: String,
}

impl ServiceLabels {
    /// From a desired entry's name (`namespace/name:port` or `namespace/name`).
    pub fn from_entry(name: &str, protocol: crate::abi::Protocol) -> Self {
        let (namespace, service, port) = split_entry_name(name);
        Self {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            port: port.to_owned(),
            protocol: protocol.as_str().to_owned(),
        }
    }

    /// The desired entry's name again (`namespace/name:port`, or `namespace/name`).
    pub fn entry_name(&self) -> String {
        if self.port.is_empty() {
            format!("{}/{}", self.namespace, self.service)
        } else {
            format!("{}/{}:{}", self.namespace, self.service, self.port)
        }
    }

    fn labels(&self) -> Labels {
        vec![
            ("namespace".to_owned(), self.namespace.clone()),
            ("service".to_owned(), self.service.clone()),
            ("port".to_owned(), self.port.clone()),
            ("protocol".to_owned(), self.protocol.clone()),
        ]
    }
}

/// A desired entry's name (`namespace/name:port` or `namespace/name`) as (namespace, name,
/// port). Pure.
pub fn split_entry_name(name: &str) -> (&str, &str, &str) {
    let (ns_name, port) = name.split_once(':').unwrap_or((name, ""));
    let (namespace, service) = ns_name.split_once('/').unwrap_or(("", ns_name));
    (namespace, service, port)
}

/// Service ID -> labels, as programmed by the last sync.
pub type ServiceIds = std::collections::BTreeMap<u32, ServiceLabels>;

/// The labels of every programmed service ID: the IDs come from the model of the maps after a
/// sync, the names from the desired state it was planned from. Pure.
pub fn service_ids(
    desired: &crate::translate::Desired,
    state: &crate::plan::MapState,
) -> ServiceIds {
    state
        .services()
        .iter()
        .filter_map(|(k, ps)| {
            let d = desired.get(k)?;
            Some((ps.svc_id, ServiceLabels::from_entry(&d.name, k.protocol)))
        })
        .collect()
}

/// Sums counters per label set (several IDs make one service port).
fn per_service(
    ids: &ServiceIds,
    counts: &[(u32, proxy_common::SvcCounter)],
) -> std::collections::BTreeMap<ServiceLabels, proxy_common::SvcCounter> {
    let mut out: std::collections::BTreeMap<ServiceLabels, proxy_common::SvcCounter> =
        std::collections::BTreeMap::new();
    for (id, c) in counts {
        if let Some(l) = ids.get(id) {
            let e = out.entry(l.clone()).or_default();
            e.packets += c.packets;
            e.bytes += c.bytes;
        }
    }
    out
}
/// (map name, entries).
type Occupancy = Vec<(&'static str, u64)>;

/// The agent's metrics. Cheap to clone; all clones share the registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub sync_duration: Histogram,
    pub sync_full: Histogram,
    pub sync_partial: Histogram,
    pub endpoint_changes_pending: Gauge,
    pub endpoint_changes_total: Counter,
    pub service_changes_pending: Gauge,
    pub service_changes_total: Counter,
    pub no_local_endpoints: Family<Labels, Gauge>,
    pub healthz_total: ProbeCounter,
    pub livez_total: ProbeCounter,
    pub network_programming: Histogram,
    pub last_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub last_queued: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub sync_failures: Counter,
    pub map_write_failures: Family<Labels, Counter>,
    pub attached_links: Gauge,
    pub link_replacements: Counter,
    pub ct_gc_removed: Family<Labels, Counter>,
    pub ct_gc_scanned: Counter,
    pub ct_gc_runs: Counter,
    pub ct_migrated: Counter,
    pub ct_orphans: Counter,
    service_ids: Arc<Mutex<ServiceIds>>,
    /// The objects of the last snapshot, to count what the next one changes.
    /// The last objects counted, and whether each kind is strictly in namespace/name order.
    last_objects: Arc<Mutex<(Objects, bool)>>,
}

/// kube-proxy's buckets for the sync latencies: 1 ms to 16 s, doubling.
pub fn sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// kube-proxy's network programming buckets: 0, 0.25 s, 0.5 s, 1-59 s by 1 s, 60-115 s by
/// 5 s, 120-300 s by 30 s (component-base's MergeBuckets starts with a 0 bucket).
pub fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

/// Service and EndpointSlice objects added, changed or deleted between two snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub services: u64,
    pub endpoints: u64,
}

/// What `next` changes relative to `prev`, by namespace/name. An object the source shares
/// between snapshots (same `Arc`) is unchanged without being compared. Pure.
pub fn count_changes(prev: &Objects, next: &Objects) -> Changes {
    fn diff<T: PartialEq>(
        prev: &[Arc<T>],
        next: &[Arc<T>],
        meta: impl Fn(&T) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> u64 {
        let key = |o: &Arc<T>| {
            let m = meta(o);
            (
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        };
        let before: std::collections::HashMap<_, &Arc<T>> =
            prev.iter().map(|o| (key(o), o)).collect();
        let mut seen = std::collections::HashSet::new();
        let mut n = 0;
        for o in next {
            let k = key(o);
            match before.get(&k) {
                Some(p) if crate::translate::same(p, o) => {}
                _ => n += 1,
            }
            seen.insert(k);
        }
        n + before.keys().filter(|k| !seen.contains(*k)).count() as u64
    }
    Changes {
        services: diff(&prev.services, &next.services, |s| &s.metadata),
        endpoints: diff(&prev.slices, &next.slices, |s| &s.metadata),
    }
}

/// Service ports with a Local traffic policy whose endpoints are all on other nodes (the
/// entries a Local policy emptied: `DROP_IF_EMPTY`), as (internal, external). Pure.
pub fn no_local_endpoints(desired: &crate::translate::Desired) -> (usize, usize) {
    use proxy_common::svc_flags;
    let mut internal = std::collections::BTreeSet::new();
    let mut external = std::collections::BTreeSet::new();
    for d in desired.values() {
        if d.flags & svc_flags::DROP_IF_EMPTY == 0 || !d.backends.is_empty() {
            continue;
        }
        if d.flags & svc_flags::ITP_LOCAL != 0 {
            internal.insert(d.name.as_str());
        }
        if d.flags & svc_flags::ETP_LOCAL != 0 {
            external.insert(d.name.as_str());
        }
    }
    (internal.len(), external.len())
}

/// Which verdict a datapath counter counts (`None`: an event beside the verdict, e.g.
/// masquerade, or a packet another counter already gave its verdict). Pure.
pub fn verdict(counter_name: &str) -> Option<&'static str> {
    match counter_name {
        "forward_new"
        | "forward_established"
        | "reply_reverse_nat"
        | "icmp_error_translated"
        | "socket_translated"
        | "xdp_forward_established"
        | "fragment_translated" => Some("forward"),
        "pass_malformed" | "pass_fragment" => Some("pass"),
        "reject" => Some("reject"),
        n if n.starts_with("drop_") => Some("drop"),
        _ => None,
    }
}

/// The exposition formats of `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    /// Prometheus text 0.0.4: what a client that names no format gets.
    Text,
}

impl Format {
    pub const fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The format an `Accept` header asks for: OpenMetrics when it is accepted at least as much
/// as text/plain, else Prometheus text 0.0.4 (also without a header, like Go's client). Pure.
pub fn negotiate(accept: Option<&str>) -> Format {
    let q = accept.map(http::qualities).unwrap_or_default();
    let best = |name: &str| {
        q.iter()
            .filter(|(n, _)| n == name)
            .map(|(_, q)| *q)
            .fold(None, |a: Option<f32>, q| Some(a.map_or(q, |a| a.max(q))))
    };
    match best("application/openmetrics-text") {
        Some(om) if om > 0.0 && om >= best("text/plain").unwrap_or(0.0) => Format::OpenMetrics,
        _ => Format::Text,
    }
}

/// OpenMetrics text (as prometheus-client writes it) as Prometheus text 0.0.4: counter
/// families named by their `_total` samples, no `# UNIT`/`# EOF` lines, no `_created`
/// samples, no exemplars, `unknown` as `untyped`. Pure.
pub fn to_prometheus_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line
            .strip_prefix("# HELP ")
            .or(line.strip_prefix("# TYPE "))
        {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let kind = &line[..7];
            let name = if counters.contains(name) && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            let tail = if kind == "# TYPE " && tail == "unknown" {
                "untyped"
            } else {
                tail
            };
            out.push_str(&format!("{kind}{name} {tail}\n"));
            continue;
        }
        if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            if name
                .strip_suffix("_created")
                .is_some_and(|f| counters.contains(f))
            {
                continue;
            }
            // An exemplar follows the value after " # ".
            let line = line.split(" # ").next().unwrap_or(line);
            out.push_str(line);
            out.push('\n');
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Metrics {
    /// Metrics whose datapath part reads the maps pinned under `pin_dir` (`None`: no
    /// datapath metrics, e.g. in tests).
    /// `per_service`: also the per-service packet and byte counters
    /// (`--metrics-per-service`).
    pub fn new(pin_dir: Option<&Path>, sizes: MapSizes, per_service: bool) -> Self {
        let mut root = Registry::default();
        super::process::register(&mut root);
        let sync_duration = Histogram::new(sync_buckets());
        let sync_full = Histogram::new(sync_buckets());
        let sync_partial = Histogram::new(sync_buckets());
        let network_programming = Histogram::new(network_programming_buckets());
        let last_sync = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let last_queued = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let (endpoint_changes_pending, service_changes_pending): (Gauge, Gauge) =
            Default::default();
        let (endpoint_changes_total, service_changes_total): (Counter, Counter) =
            Default::default();
        let no_local_endpoints = Family::<Labels, Gauge>::default();
        let (healthz_total, livez_total): (ProbeCounter, ProbeCounter) = Default::default();
        {
            let kp = root.sub_registry_with_prefix("kubeproxy");
            kp.register(
                "sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                sync_duration.clone(),
            );
            kp.register(
                "sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                sync_full.clone(),
            );
            kp.register(
                "sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                sync_partial.clone(),
            );
            kp.register(
                "sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
                endpoint_changes_pending.clone(),
            );
            kp.register(
                "sync_proxy_rules_endpoint_changes",
                "Cumulative proxy rules Endpoint changes",
                endpoint_changes_total.clone(),
            );
            kp.register(
                "sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
                service_changes_pending.clone(),
            );
            kp.register(
                "sync_proxy_rules_service_changes",
                "Cumulative proxy rules Service changes",
                service_changes_total.clone(),
            );
            // A gauge despite its name, as in kube-proxy.
            kp.register(
                "sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
                no_local_endpoints.clone(),
            );
            kp.register(
                "proxy_healthz",
                "Cumulative proxy healthz HTTP status",
                healthz_total.clone(),
            );
            kp.register(
                "proxy_livez",
                "Cumulative proxy livez HTTP status",
                livez_total.clone(),
            );
            kp.register(
                "network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                network_programming.clone(),
            );
            kp.register(
                "sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
                last_sync.clone(),
            );
            kp.register(
                "sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
                last_queued.clone(),
            );
        }
        let sync_failures = Counter::default();
        let map_write_failures = Family::<Labels, Counter>::default();
        let attached_links = Gauge::default();
        let link_replacements = Counter::default();
        let ct_gc_removed = Family::<Labels, Counter>::default();
        let (ct_gc_scanned, ct_gc_runs, ct_migrated, ct_orphans): (
            Counter,
            Counter,
            Counter,
            Counter,
        ) = Default::default();
        let service_ids: Arc<Mutex<ServiceIds>> = Arc::default();
        {
            let ep = root.sub_registry_with_prefix("ebpf_proxy");
            ep.register(
                "sync_failures",
                "Reconciles that failed to write the maps (retried)",
                sync_failures.clone(),
            );
            ep.register(
                "map_write_failures",
                "Map writes that failed, by map and operation (insert failures include full maps)",
                map_write_failures.clone(),
            );
            ep.register(
                "attached_links",
                "tc program links attached to pod bridge ports (pinned)",
                attached_links.clone(),
            );
            ep.register(
                "link_program_replacements",
                "Programs swapped atomically into existing pinned links (restarts and upgrades)",
                link_replacements.clone(),
            );
            ep.register(
                "conntrack_gc_removed",
                "Flows the conntrack sweeper removed (both entries, SNAT port freed), by the \
                 state they timed out in",
                ct_gc_removed.clone(),
            );
            ep.register(
                "conntrack_gc_scanned",
                "Conntrack entries the sweeper looked at",
                ct_gc_scanned.clone(),
            );
            ep.register(
                "conntrack_gc_runs",
                "Conntrack sweeper runs (each bounded)",
                ct_gc_runs.clone(),
            );
            ep.register(
                "conntrack_evicted",
                "Conntrack entries found without their flow's other entry (evicted from the \
                 unanswered-flow LRU table under pressure), removed by the sweeper",
                ct_orphans.clone(),
            );
            ep.register(
                "conntrack_migrated",
                "Conntrack entries carried over from an earlier release's table at upgrade",
                ct_migrated.clone(),
            );
            if let Some(dir) = pin_dir {
                ep.register_collector(Box::new(DatapathCollector::new(
                    dir,
                    sizes,
                    per_service.then(|| service_ids.clone()),
                )));
            }
        }
        Self {
            registry: Arc::new(root),
            sync_duration,
            sync_full,
            sync_partial,
            endpoint_changes_pending,
            endpoint_changes_total,
            service_changes_pending,
            service_changes_total,
            no_local_endpoints,
            healthz_total,
            livez_total,
            network_programming,
            last_sync,
            last_queued,
            sync_failures,
            map_write_failures,
            attached_links,
            link_replacements,
            ct_gc_removed,
            ct_gc_scanned,
            ct_gc_runs,
            ct_migrated,
            ct_orphans,
            service_ids,
            last_objects: Arc::default(),
        }
    }

    /// The service ID -> service mapping the per-service counters are labelled with (after
    /// every sync; see [`service_ids`]).
    pub fn set_service_labels(&self, ids: ServiceIds) {
        *self.service_ids.lock().unwrap_or_else(|e| e.into_inner()) = ids;
    }

    /// One conntrack sweep's results.
    pub fn swept(&self, st: &crate::datapath::conntrack::SweepStats) {
        self.ct_gc_runs.inc();
        self.ct_gc_scanned.inc_by(st.scanned as u64);
        self.ct_orphans.inc_by(st.orphans);
        for (state, n) in &st.removed {
            self.ct_gc_removed
                .get_or_create(&vec![("state".to_owned(), state.name().to_owned())])
                .inc_by(*n);
        }
    }

    /// A snapshot was queued for programming (kube-proxy sets `last_queued_timestamp` here):
    /// counts the Service and EndpointSlice changes it brings, pending until a sync succeeds.
    pub fn queued(&self, objects: &Objects) {
        self.queued_now();
        self.count_changes(objects);
    }

    /// The time of [`queued`](Self::queued) alone: a sync starts now.
    pub fn queued_now(&self) {
        self.last_queued.set(unix_now());
    }

    /// The object counts of [`queued`](Self::queued) alone: the Services and EndpointSlices
    /// that changed since the last call (pending until a sync succeeds).
    pub fn count_changes(&self, objects: &Objects) {
        use crate::translate::{diff_sorted, strictly_sorted};
        let mut guard = self.last_objects.lock().unwrap_or_else(|e| e.into_inner());
        let (last, sorted) = &mut *guard;
        // Both lists sorted (as the sources give them): a walk side by side where an unchanged
        // object costs one pointer comparison, instead of keying every object by name.
        let walked = sorted
            .then(|| {
                let s = diff_sorted(&last.services, &objects.services)?;
                let e = diff_sorted(&last.slices, &objects.slices)?;
                Some(Changes {
                    services: s.len() as u64,
                    endpoints: e.len() as u64,
                })
            })
            .flatten();
        *sorted = walked.is_some()
            || (strictly_sorted(&objects.services) && strictly_sorted(&objects.slices));
        let c = walked.unwrap_or_else(|| count_changes(last, objects));
        *last = Objects {
            services: objects.services.clone(),
            slices: objects.slices.clone(),
            nodes: Vec::new(),
        };
        self.service_changes_total.inc_by(c.services);
        self.endpoint_changes_total.inc_by(c.endpoints);
        self.service_changes_pending.inc_by(c.services as i64);
        self.endpoint_changes_pending.inc_by(c.endpoints as i64);
    }

    /// A reconcile finished: its duration, and what it programmed or why it failed. A
    /// failure's error chain is searched for the map write that failed (by type, not by
    /// message); its changes stay pending.
    pub fn synced(
        &self,
        took: Duration,
        result: Result<&crate::sync::SyncSummary, &anyhow::Error>,
    ) {
        self.sync_duration.observe(took.as_secs_f64());
        match result {
            Ok(s) => {
                // Full: every service group translated anew (the first sync after a start);
                // partial: the unchanged ones reused.
                if s.stages.reused == 0 {
                    self.sync_full.observe(took.as_secs_f64());
                } else {
                    self.sync_partial.observe(took.as_secs_f64());
                }
                self.last_sync.set(unix_now());
                self.service_changes_pending.set(0);
                self.endpoint_changes_pending.set(0);
                let (internal, external) = s.no_local_endpoints;
                for (policy, n) in [("internal", internal), ("external", external)] {
                    self.no_local_endpoints
                        .get_or_create(&vec![("traffic_policy".to_owned(), policy.to_owned())])
                        .set(n as i64);
                }
            }
            Err(e) => {
                self.sync_failures.inc();
                if let Some(w) = e.chain().find_map(|c| c.downcast_ref::<WriteError>()) {
                    self.map_write_failures
                        .get_or_create(&vec![
                            ("map".to_owned(), w.map.to_owned()),
                            ("op".to_owned(), w.op.to_owned()),
                        ])
                        .inc();
                }
            }
        }
    }

    /// A change triggered at `trigger` (by the API's clock) is now programmed.
    pub fn observe_network_programming(&self, trigger: SystemTime) {
        if let Ok(d) = SystemTime::now().duration_since(trigger) {
            self.network_programming.observe(d.as_secs_f64());
        }
    }

    /// The exposition text (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            out = format!("# encoding failed: {e}\n");
        }
        out
    }

    /// The exposition text in `format`.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::OpenMetrics => self.encode(),
            Format::Text => to_prometheus_text(&self.encode()),
        }
    }

    pub fn handler(&self) -> http::Handler {
        let m = self.clone();
        Arc::new(move |r| match r.path.as_str() {
            "/metrics" => {
                let f = negotiate(r.accept.as_deref());
                Response::new(200, f.content_type(), m.render(f)).compressible()
            }
            _ => Response::text(404, "404 page not found\n"),
        })
    }

    /// Binds `addr` and serves `/metrics` in the background.
    pub async fn serve(&self, addr: SocketAddr) -> Result<JoinHandle<()>> {
        let l = http::bind(addr, "metrics (--metrics-bind-address)").await?;
        info!("serving /metrics on {}", l.local_addr()?);
        Ok(tokio::spawn(http::serve(l, self.handler())))
    }
}

/// Reads the pinned maps at scrape time.
#[derive(Debug)]
struct DatapathCollector {
    pin_dir: PathBuf,
    /// Every hash-type map to report occupancy for, with its shape for batch reads.
    hash_maps: Vec<(&'static str, u32, batch::Shape)>,
    cache: Mutex<Option<(Instant, Occupancy)>>,
    /// `None`: no per-service series (`--metrics-per-service` not given).
    service_ids: Option<Arc<Mutex<ServiceIds>>>,
}

impl DatapathCollector {
    fn new(pin_dir: &Path, sizes: MapSizes, service_ids: Option<Arc<Mutex<ServiceIds>>>) -> Self {
        let hash_maps = sizes
            .layouts()
            .into_iter()
            .filter(|l| {
                matches!(
                    l.map_type,
                    MapType::Hash | MapType::LruHash | MapType::LpmTrie
                )
            })
            .map(|l| {
                let shape = batch::Shape {
                    key_size: l.key_size as usize,
                    value_size: l.value_size as usize,
                    per_cpu: false,
                };
                (l.name, l.max_entries, shape)
            })
            .collect();
        Self {
            pin_dir: pin_dir.to_owned(),
            hash_maps,
            cache: Mutex::new(None),
            service_ids,
        }
    }

    /// Per-service counters of the programmed IDs, summed per service port.
    fn services(
        &self,
    ) -> Option<std::collections::BTreeMap<ServiceLabels, proxy_common::SvcCounter>> {
        let ids = self
            .service_ids
            .as_ref()?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let counts =
            crate::datapath::pinned_service_counters(&self.pin_dir, ids.keys().copied()).ok()?;
        Some(per_service(&ids, &counts))
    }

    /// The verdict counters, summed over CPUs: one batch syscall.
    fn counters(&self) -> Option<Vec<u64>> {
        let m = MapData::from_pin(self.pin_dir.join(maps::COUNTERS)).ok()?;
        let (sums, _) = batch::per_cpu_array_sums::<u64>(
            m.fd().as_fd(),
            8,
            counter::NAMES.len() as u32,
            |acc, v| *acc += u64::from_ne_bytes(v.try_into().unwrap_or([0; 8])),
        )
        .ok()?;
        Some(sums)
    }

    fn occupancy(&self) -> Vec<(&'static str, u64)> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, v)) = cache.as_ref()
            && at.elapsed() < OCCUPANCY_CACHE
        {
            return v.clone();
        }
        let v: Vec<(&'static str, u64)> = self
            .hash_maps
            .iter()
            .filter_map(|&(name, _, shape)| {
                let m = MapData::from_pin(self.pin_dir.join(name)).ok()?;
                batch::count_entries(m.fd().as_fd(), shape)
                    .ok()
                    .map(|c| (name, c.entries))
            })
            .collect();
        *cache = Some((Instant::now(), v.clone()));
        v
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(values) = self.counters() {
            let mut e = encoder.encode_descriptor(
                "datapath_packets",
                "Packets by datapath verdict/reason, summed over CPUs (proxy_common::counter)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (name, v) in counter::NAMES.iter().zip(&values) {
                let labels: Labels = vec![("reason".to_owned(), (*name).to_owned())];
                ConstCounter::new(*v).encode(e.encode_family(&labels)?)?;
            }
            let mut e = encoder.encode_descriptor(
                "datapath_verdicts",
                "Packets by datapath verdict (forward, drop, pass, reject): the reasons of \
                 ebpf_proxy_datapath_packets_total folded",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            let mut by_verdict: std::collections::BTreeMap<&str, u64> =
                ["drop", "forward", "pass", "reject"].map(|v| (v, 0)).into();
            for (name, v) in counter::NAMES.iter().zip(&values) {
                if let Some(verdict) = verdict(name) {
                    *by_verdict.entry(verdict).or_default() += v;
                }
            }
            for (verdict, v) in by_verdict {
                let labels: Labels = vec![("verdict".to_owned(), verdict.to_owned())];
                ConstCounter::new(v).encode(e.encode_family(&labels)?)?;
            }
        }
        if let Some(services) = self.services() {
            let mut e = encoder.encode_descriptor(
                "service_packets",
                "Forward packets translated per service port, summed over CPUs (host \
                 processes: one per connect/sendmsg)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (l, c) in &services {
                ConstCounter::new(c.packets).encode(e.encode_family(&l.labels())?)?;
            }
            let mut e = encoder.encode_descriptor(
                "service_bytes",
                "L3 bytes of the forward packets translated per service port (0 for host \
                 processes' socket translations)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (l, c) in &services {
                ConstCounter::new(c.bytes).encode(e.encode_family(&l.labels())?)?;
            }
        }
        let occ = self.occupancy();
        {
            let mut e = encoder.encode_descriptor(
                "map_entries",
                "Entries in each BPF hash map (conntrack counts both directions of a flow)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (name, n) in &occ {
                let labels: Labels = vec![("map".to_owned(), (*name).to_owned())];
                ConstGauge::new(*n as i64).encode(e.encode_family(&labels)?)?;
            }
        }
        let mut e = encoder.encode_descriptor(
            "map_capacity",
            "max_entries of each BPF hash map",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (name, cap, _) in &self.hash_maps {
            let labels: Labels = vec![("map".to_owned(), (*name).to_owned())];
            ConstGauge::new(i64::from(*cap)).encode(e.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn service_counters_are_labelled_and_summed_per_service_port() {
        use crate::abi::Protocol;
        use proxy_common::SvcCounter;
        let web = ServiceLabels::from_entry("default/web:http", Protocol::Tcp);
        assert_eq!(
            web,
            ServiceLabels {
                namespace: "default".into(),
                service: "web".into(),
                port: "http".into(),
                protocol: "TCP".into(),
            }
        );
        let dns = ServiceLabels::from_entry("kube-system/dns", Protocol::Udp);
        assert_eq!((dns.service.as_str(), dns.port.as_str()), ("dns", ""));
        assert_eq!(web.entry_name(), "default/web:http");
        assert_eq!(dns.entry_name(), "kube-system/dns");
        // IDs 1 (ClusterIP) and 7 (NodePort) are one service port; 9 is not programmed.
        let ids: ServiceIds = [(1, web.clone()), (7, web.clone()), (3, dns.clone())].into();
        let c = |packets, bytes| SvcCounter { packets, bytes };
        let sums = per_service(
            &ids,
            &[(1, c(2, 100)), (7, c(3, 50)), (3, c(1, 1)), (9, c(5, 5))],
        );
        assert_eq!(sums[&web], c(5, 150));
        assert_eq!(sums[&dns], c(1, 1));
        assert_eq!(sums.len(), 2);
    }

    fn summary(reused: usize, no_local: (usize, usize)) -> crate::sync::SyncSummary {
        crate::sync::SyncSummary {
            services: 0,
            backends: 0,
            ops: 0,
            invalid: 0,
            rejected: Default::default(),
            node: None,
            health_checks: Vec::new(),
            service_ids: Default::default(),
            no_local_endpoints: no_local,
            stages: crate::sync::SyncStages {
                reused,
                ..Default::default()
            },
        }
    }

    fn objects(services: &[(&str, &str)], slices: &[(&str, &str)]) -> Objects {
        use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
        let meta = |ns: &str, n: &str| k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(n.into()),
            ..Default::default()
        };
        Objects {
            services: services
                .iter()
                .map(|(ns, n)| {
                    Arc::new(Service {
                        metadata: meta(ns, n),
                        ..Default::default()
                    })
                })
                .collect(),
            slices: slices
                .iter()
                .map(|(ns, n)| {
                    Arc::new(EndpointSlice {
                        metadata: meta(ns, n),
                        address_type: "IPv4".into(),
                        endpoints: Vec::new(),
                        ports: None,
                    })
                })
                .collect(),
            nodes: Vec::new(),
        }
    }

    #[test]
    fn kube_proxy_names_and_sync_accounting() {
        let m = Metrics::new(None, MapSizes::default(), false);
        let first = objects(&[("d", "web"), ("d", "db")], &[("d", "web-1")]);
        m.queued(&first);
        m.synced(Duration::from_millis(3), Ok(&summary(0, (1, 2))));
        // A new slice and a changed (re-created, equal) service object: one change.
        let mut second = objects(&[("d", "web")], &[("d", "web-1"), ("d", "web-2")]);
        second.services[0] = first.services[0].clone();
        m.queued(&second);
        let err = anyhow::Error::new(WriteError {
            op: "insert",
            map: maps::SVC4,
            source: aya::maps::MapError::KeyNotFound,
        })
        .context("writing the service maps");
        m.synced(Duration::from_millis(1), Err(&err));
        m.observe_network_programming(SystemTime::now() - Duration::from_millis(700));
        let text = m.encode();
        for want in [
            "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 2",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 2",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"} 2",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 0",
            "kubeproxy_network_programming_duration_seconds_count 1",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.5\"} 0",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"1.0\"} 1",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"300.0\"} 1",
            "# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
            // 2 services + 1 slice, then the deleted db and the new web-2.
            "kubeproxy_sync_proxy_rules_service_changes_total 3",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 2",
            // The failed sync leaves its changes pending.
            "kubeproxy_sync_proxy_rules_service_changes_pending 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 1",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 1",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 2",
            "ebpf_proxy_sync_failures_total 1",
            "ebpf_proxy_map_write_failures_total{map=\"LB4_SVC_V2\",op=\"insert\"} 1",
            "ebpf_proxy_build_info{",
            "process_cpu_seconds_total ",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        let last: f64 = text
            .lines()
            .find(|l| l.starts_with("kubeproxy_sync_proxy_rules_last_timestamp_seconds "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(last > 1.7e9, "{last}");
        m.synced(Duration::from_millis(1), Ok(&summary(5, (0, 0))));
        let text = m.encode();
        for want in [
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_proxy_rules_service_changes_pending 0",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 0",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn kube_proxy_buckets() {
        let b = network_programming_buckets();
        assert_eq!(b.len(), 1 + 2 + 59 + 12 + 7);
        assert_eq!(&b[..5], [0.0, 0.25, 0.5, 1.0, 2.0]);
        assert_eq!(b[61], 59.0);
        assert_eq!(&b[62..64], [60.0, 65.0]);
        assert_eq!(b[73], 115.0);
        assert_eq!(&b[74..], [120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0]);
        let s: Vec<f64> = sync_buckets().collect();
        assert_eq!(s.len(), 15);
        assert_eq!((s[0], s[14]), (0.001, 16.384));
    }

    #[test]
    fn every_counter_has_its_verdict() {
        let of = |v| {
            counter::NAMES
                .iter()
                .filter(|n| verdict(n) == Some(v))
                .count()
        };
        // Every drop_* reason is a drop; exactly the two pass_* reasons pass.
        assert_eq!(
            of("drop"),
            counter::NAMES
                .iter()
                .filter(|n| n.starts_with("drop_"))
                .count()
        );
        assert_eq!(of("pass"), 2);
        assert_eq!(of("reject"), 1);
        assert_eq!(of("forward"), 7);
        for annotation in [
            "masquerade",
            "hairpin",
            "rebalanced_stale_flow",
            "decapsulated",
            "tc_pass_xdp_translated",
            "xdp_pass_partial_checksum",
        ] {
            assert_eq!(verdict(annotation), None, "{annotation}");
        }
    }

    #[test]
    fn content_negotiation() {
        // What Prometheus 2.x/3.x sends by default.
        let prom = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(negotiate(Some("text/plain;version=0.0.4")), Format::Text);
        assert_eq!(
            negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            Format::Text
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text")),
            Format::OpenMetrics
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
        assert_eq!(negotiate(Some("*/*")), Format::Text);
        assert_eq!(negotiate(None), Format::Text);
    }

    #[test]
    fn prometheus_text_from_openmetrics() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{code=\"200\"} 3\na_requests_created{code=\"200\"} 1.7e9\n# HELP b Thing.\n# TYPE b gauge\n# UNIT b seconds\nb 1.5\n# TYPE c unknown\nc 2 # {trace_id=\"x\"} 1.0\n# TYPE d histogram\nd_bucket{le=\"1.0\"} 1\nd_bucket{le=\"+Inf\"} 1\nd_sum 0.5\nd_count 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{code=\"200\"} 3\n# HELP b Thing.\n# TYPE b gauge\nb 1.5\n# TYPE c untyped\nc 2\n# TYPE d histogram\nd_bucket{le=\"1.0\"} 1\nd_bucket{le=\"+Inf\"} 1\nd_sum 0.5\nd_count 1\n"
        );
        // The agent's own output: every sample's family is declared under its sample name.
        let m = Metrics::new(None, MapSizes::default(), false);
        let text = m.render(Format::Text);
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            text.contains("# TYPE kubeproxy_sync_proxy_rules_endpoint_changes_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_endpoint_changes_total 0"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn metrics_over_http_negotiated_and_gzipped() {
        use std::io::Read as _;
        let m = Metrics::new(None, MapSizes::default(), false);
        let l = http::bind((std::net::Ipv4Addr::LOCALHOST, 0).into(), "test")
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(http::serve(l, m.handler()));
        let (code, head, body) = http::get_raw(addr, "/metrics", &[]).await.unwrap();
        assert_eq!(code, 200);
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 0"));
        assert!(!text.contains("# EOF"));
        let (_, head, body) = http::get_raw(
            addr,
            "/metrics",
            &[
                ("Accept", "application/openmetrics-text;version=1.0.0"),
                ("Accept-Encoding", "gzip"),
            ],
        )
        .await
        .unwrap();
        assert!(
            head.contains("application/openmetrics-text; version=1.0.0"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase().contains("content-encoding: gzip"),
            "{head}"
        );
        let mut text = String::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut text)
            .unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(http::get(addr, "/other").await.unwrap().0, 404);
        task.abort();
    }
}
