//! Prometheus metrics on `--metrics-bind-address` (default 127.0.0.1:10249, like kube-proxy),
//! path `/metrics`, OpenMetrics text.
//!
//! kube-proxy's names where they mean the same thing:
//! - `kubeproxy_sync_proxy_rules_duration_seconds` (histogram): one reconcile, plan + map writes.
//! - `kubeproxy_network_programming_duration_seconds` (histogram): from the change's trigger
//!   time (EndpointSlice `endpoints.kubernetes.io/last-change-trigger-time`) to programmed;
//!   observed when the source provides trigger times ([`Metrics::observe_network_programming`]).
//! - `kubeproxy_sync_proxy_rules_last_timestamp_seconds`, `..._last_queued_timestamp_seconds`.
//!
//! Ours (`ebpf_proxy_*`), read from the pinned maps at scrape time:
//! - `ebpf_proxy_datapath_packets_total{reason}`: the per-CPU verdict counters summed
//!   (names from `proxy_common::counter::NAMES`).
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
//!   `ebpf_proxy_build_info{version,git_revision}`: see [`super::process`].
//!
//! - `ebpf_proxy_service_packets_total{namespace,service,port,protocol}` and
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
use aya::maps::{MapData, MapType, PerCpuArray};
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
    datapath::{MapSizes, WriteError},
    serve::http::{self, Response},
};

/// Conntrack can hold hundreds of thousands of entries; counting them costs a syscall each.
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
        let (ns_name, port) = name.split_once(':').unwrap_or((name, ""));
        let (namespace, service) = ns_name.split_once('/').unwrap_or(("", ns_name));
        Self {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            port: port.to_owned(),
            protocol: protocol.as_str().to_owned(),
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
    pub fn new(pin_dir: Option<&Path>, sizes: MapSizes) -> Self {
        let mut root = Registry::default();
        super::process::register(&mut root);
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let network_programming = Histogram::new([
            0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0,
        ]);
        let last_sync = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let last_queued = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        {
            let kp = root.sub_registry_with_prefix("kubeproxy");
            kp.register(
                "sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds (one reconcile: plan and map writes)",
                sync_duration.clone(),
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
                    service_ids.clone(),
                )));
            }
        }
        Self {
            registry: Arc::new(root),
            sync_duration,
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

    /// A change was queued (kube-proxy sets `last_queued_timestamp` here).
    pub fn queued(&self) {
        self.last_queued.set(unix_now());
    }

    /// A reconcile finished: its duration, and whether it wrote everything. A failure's error
    /// chain is searched for the map write that failed (by type, not by message).
    pub fn synced(&self, took: Duration, result: Result<(), &anyhow::Error>) {
        self.sync_duration.observe(took.as_secs_f64());
        match result {
            Ok(()) => {
                self.last_sync.set(unix_now());
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

    pub fn handler(&self) -> http::Handler {
        let m = self.clone();
        Arc::new(move |path| match path {
            "/metrics" => Response::new(
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                m.encode(),
            ),
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
    /// (map name, capacity) of every hash-type map to report occupancy for.
    hash_maps: Vec<(&'static str, u32, u32)>,
    cache: Mutex<Option<(Instant, Occupancy)>>,
    service_ids: Arc<Mutex<ServiceIds>>,
}

impl DatapathCollector {
    fn new(pin_dir: &Path, sizes: MapSizes, service_ids: Arc<Mutex<ServiceIds>>) -> Self {
        let hash_maps = sizes
            .layouts()
            .into_iter()
            .filter(|l| {
                matches!(
                    l.map_type,
                    MapType::Hash | MapType::LruHash | MapType::LpmTrie
                )
            })
            .map(|l| (l.name, l.max_entries, l.key_size))
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
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let counts =
            crate::datapath::pinned_service_counters(&self.pin_dir, ids.keys().copied()).ok()?;
        Some(per_service(&ids, &counts))
    }

    fn counters(&self) -> Option<Vec<u64>> {
        let m = MapData::from_pin(self.pin_dir.join(maps::COUNTERS)).ok()?;
        let a: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(aya::maps::Map::PerCpuArray(m)).ok()?;
        (0..counter::NAMES.len() as u32)
            .map(|i| a.get(&i, 0).ok().map(|v| v.iter().sum()))
            .collect()
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
            .filter_map(|&(name, _, key_size)| {
                let m = MapData::from_pin(self.pin_dir.join(name)).ok()?;
                count_entries(&m, key_size).ok().map(|n| (name, n))
            })
            .collect();
        *cache = Some((Instant::now(), v.clone()));
        v
    }
}

/// Counts a hash map's entries with `BPF_MAP_GET_NEXT_KEY` (works for any key type).
fn count_entries(m: &MapData, key_size: u32) -> std::io::Result<u64> {
    let fd = m.fd().as_fd();
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut n = 0u64;
    while crate::datapath::sys::map_next_key(fd, (n > 0).then_some(&key[..]), &mut next)? {
        n += 1;
        std::mem::swap(&mut key, &mut next);
        if n > 1 << 26 {
            break;
        }
    }
    Ok(n)
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
            for (name, v) in counter::NAMES.iter().zip(values) {
                let labels: Labels = vec![("reason".to_owned(), (*name).to_owned())];
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

    #[test]
    fn kube_proxy_names_and_sync_accounting() {
        let m = Metrics::new(None, MapSizes::default());
        m.queued();
        m.synced(Duration::from_millis(3), Ok(()));
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
            "kubeproxy_network_programming_duration_seconds_count 1",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.5\"} 0",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"1.0\"} 1",
            "# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
            "ebpf_proxy_sync_failures_total 1",
            "ebpf_proxy_map_write_failures_total{map=\"LB4_SVC_V2\",op=\"insert\"} 1",
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
    }
}
