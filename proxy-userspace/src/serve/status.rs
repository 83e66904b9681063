//! The agent's status file: what `ebpf-proxy inspect` shows that the pinned maps do not hold
//! (service names and types, endpoint states, the agent's version, configuration, last sync
//! and health). The agent rewrites it after successful syncs (the latest one's, at most once
//! a second, from a thread of its own); `inspect` reads it and joins it with the maps by
//! service ID.
//!
//! Where: `/run/ebpf-proxy/<bpffs path, '/' as '-'>.json` (`sys-fs-bpf.json` for the default
//! `--bpffs`), so `inspect --bpffs DIR` finds the agent of that pin directory (the BPF
//! filesystem holds pins only, no files). In a container it is the container's own /run:
//! run `inspect` in the agent's container (`kubectl exec`).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::{
    serve::{
        health::{HealthStatus, ProxyHealth},
        metrics::ServiceIds,
        process,
    },
    source::manifests::Objects,
};

/// Where agents keep their status files.
pub const STATUS_DIR: &str = "/run/ebpf-proxy";

/// The status file of the agent pinning under `bpffs`. Pure.
pub fn status_path(bpffs: &Path) -> PathBuf {
    let name = bpffs.to_string_lossy().trim_matches('/').replace('/', "-");
    let name = if name.is_empty() {
        "root".to_owned()
    } else {
        name
    };
    Path::new(STATUS_DIR).join(format!("{name}.json"))
}

/// Everything in the status file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub version: String,
    pub git_revision: String,
    pub rustc: String,
    pub pid: u32,
    pub node_name: String,
    /// The agent's effective configuration (flags and config file merged), for reading.
    pub config: BTreeMap<String, String>,
    /// The maps the agent uses: pin name (its ABI version is the `_Vn` suffix) -> max entries.
    pub maps: BTreeMap<String, u32>,
    /// The last successful sync (RFC 3339, UTC) and its Unix time.
    pub last_sync: String,
    pub last_sync_unix: f64,
    pub health: Health,
    pub services: Vec<ServiceInfo>,
    /// Programmed service ID -> `namespace/name:port` (or `namespace/name`).
    pub service_ids: BTreeMap<u32, String>,
}

/// `/healthz` as of the last write.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub healthy: bool,
    pub reason: String,
    pub node_eligible: bool,
}

/// A Service as the agent last read it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// ClusterIP, NodePort, LoadBalancer or ExternalName.
    #[serde(rename = "type")]
    pub type_: String,
    pub cluster_ips: Vec<String>,
    pub external_ips: Vec<String>,
    pub load_balancer_ips: Vec<String>,
    pub ports: Vec<PortInfo>,
    pub external_traffic_policy: String,
    pub internal_traffic_policy: String,
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PortInfo {
    pub name: String,
    pub port: i32,
    pub protocol: String,
    pub node_port: Option<i32>,
}

/// One endpoint of one of the service's EndpointSlices, with its conditions (API defaults
/// applied: ready unset is ready, serving unset is ready, terminating unset is false).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub addresses: Vec<String>,
    pub ports: Vec<i32>,
    pub node: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub slice: String,
}

impl EndpointInfo {
    /// `ready`, `serving, terminating`, `terminating` or `not ready`.
    pub fn state(&self) -> &'static str {
        match (self.ready, self.serving, self.terminating) {
            (true, _, _) => "ready",
            (false, true, true) => "serving,terminating",
            (false, false, true) => "terminating",
            _ => "not-ready",
        }
    }
}

fn service_info(s: &Service, slices: &[&EndpointSlice]) -> ServiceInfo {
    let spec = s.spec.clone().unwrap_or_default();
    let cluster_ips = spec
        .cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default();
    let lb = s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|i| i.iter().filter_map(|i| i.ip.clone()).collect())
        .unwrap_or_default();
    let mut endpoints = Vec::new();
    for sl in slices {
        for e in &sl.endpoints {
            let c = e.conditions.clone().unwrap_or_default();
            let ready = c.ready.unwrap_or(true);
            endpoints.push(EndpointInfo {
                addresses: e.addresses.clone(),
                ports: sl.ports.iter().flatten().filter_map(|p| p.port).collect(),
                node: e.node_name.clone().unwrap_or_default(),
                ready,
                serving: c.serving.unwrap_or(ready),
                terminating: c.terminating.unwrap_or(false),
                slice: sl.metadata.name.clone().unwrap_or_default(),
            });
        }
    }
    ServiceInfo {
        namespace: s.metadata.namespace.clone().unwrap_or_default(),
        name: s.metadata.name.clone().unwrap_or_default(),
        type_: spec.type_.clone().unwrap_or_else(|| "ClusterIP".into()),
        cluster_ips,
        external_ips: spec.external_ips.clone().unwrap_or_default(),
        load_balancer_ips: lb,
        ports: spec
            .ports
            .iter()
            .flatten()
            .map(|p| PortInfo {
                name: p.name.clone().unwrap_or_default(),
                port: p.port,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                node_port: p.node_port,
            })
            .collect(),
        external_traffic_policy: spec
            .external_traffic_policy
            .clone()
            .unwrap_or_else(|| "Cluster".into()),
        internal_traffic_policy: spec
            .internal_traffic_policy
            .clone()
            .unwrap_or_else(|| "Cluster".into()),
        endpoints,
    }
}

/// Every Service with the endpoints of its EndpointSlices (by the
/// `kubernetes.io/service-name` label), sorted by namespace/name. Pure.
pub fn catalogue(objects: &Objects) -> Vec<ServiceInfo> {
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for sl in &objects.slices {
        if let Some(svc) = sl
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        {
            let ns = sl.metadata.namespace.clone().unwrap_or_default();
            by_service.entry((ns, svc.clone())).or_default().push(sl);
        }
    }
    let mut out: Vec<ServiceInfo> = objects
        .services
        .iter()
        .map(|s| {
            let key = (
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default(),
            );
            service_info(s, by_service.get(&key).map_or(&[][..], Vec::as_slice))
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// Shortest time between two writes: a sync loop under churn is not slowed by status files;
/// the last sync's status is always written, at most this much later.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// What one sync leaves for the status file.
struct Update {
    objects: Objects,
    ids: ServiceIds,
    health: HealthStatus,
    at: SystemTime,
}

/// Keeps the status file of one agent current: a thread of its own renders and writes it
/// (serializing every Service costs time on a large cluster), the latest sync's status at
/// most every [`MIN_WRITE_INTERVAL`].
pub struct StatusWriter {
    path: PathBuf,
    tx: mpsc::Sender<Update>,
}

impl StatusWriter {
    /// `config`: what `inspect status` shows as the configuration.
    pub fn new(
        bpffs: &Path,
        node_name: &str,
        config: BTreeMap<String, String>,
        sizes: &crate::datapath::MapSizes,
    ) -> Self {
        let maps = sizes
            .layouts()
            .iter()
            .map(|l| (l.name.to_owned(), l.max_entries))
            .collect();
        let base = AgentStatus {
            version: process::VERSION.to_owned(),
            git_revision: process::GIT_REVISION.to_owned(),
            rustc: process::RUSTC.to_owned(),
            pid: std::process::id(),
            node_name: node_name.to_owned(),
            config,
            maps,
            ..Default::default()
        };
        Self::at(status_path(bpffs), base, MIN_WRITE_INTERVAL)
    }

    fn at(path: PathBuf, base: AgentStatus, interval: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<Update>();
        let p = path.clone();
        let spawned = std::thread::Builder::new()
            .name("status-file".into())
            .spawn(move || {
                let mut failing = false;
                // Ends when the agent drops its writer.
                while let Ok(mut u) = rx.recv() {
                    while let Ok(newer) = rx.try_recv() {
                        u = newer;
                    }
                    match write_atomically(&p, &render(&base, u)) {
                        Ok(()) if failing => {
                            info!("status file {} written again", p.display());
                            failing = false;
                        }
                        Ok(()) => {}
                        Err(e) if !failing => {
                            warn!("status file for `inspect` not written: {e:#}");
                            failing = true;
                        }
                        Err(_) => {}
                    }
                    std::thread::sleep(interval);
                }
            });
        if let Err(e) = spawned {
            warn!("no status file for `inspect`: starting its thread: {e}");
        }
        Self { path, tx }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// After a successful sync: the objects it programmed, the service IDs and health.
    pub fn synced(&self, objects: &Objects, ids: &ServiceIds, health: &ProxyHealth) {
        let _ = self.tx.send(Update {
            objects: Objects {
                services: objects.services.clone(),
                slices: objects.slices.clone(),
                nodes: Vec::new(),
            },
            ids: ids.clone(),
            health: health.status(),
            at: SystemTime::now(),
        });
    }

    /// Removes the file (`cleanup`).
    pub fn remove(bpffs: &Path) -> std::io::Result<bool> {
        match std::fs::remove_file(status_path(bpffs)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The file's JSON for one sync. Pure.
fn render(base: &AgentStatus, u: Update) -> Vec<u8> {
    let status = AgentStatus {
        last_sync: super::health::rfc3339(u.at),
        last_sync_unix: u
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
        health: Health {
            healthy: u.health.healthy,
            reason: u.health.reason,
            node_eligible: u.health.node_eligible,
        },
        services: catalogue(&u.objects),
        service_ids: u.ids.iter().map(|(id, l)| (*id, l.entry_name())).collect(),
        ..base.clone()
    };
    serde_json::to_vec(&status).unwrap_or_default()
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().context("status path without a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension(format!("json.{}", std::process::id()));
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Reads the status file of the agent of `bpffs` (`None` when there is none).
pub fn read(bpffs: &Path) -> Result<Option<AgentStatus>> {
    let path = status_path(bpffs);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn status_paths_by_pin_directory() {
        assert_eq!(
            status_path(Path::new("/sys/fs/bpf")),
            Path::new("/run/ebpf-proxy/sys-fs-bpf.json")
        );
        assert_eq!(
            status_path(Path::new("/tmp/lab/node1/bpf/")),
            Path::new("/run/ebpf-proxy/tmp-lab-node1-bpf.json")
        );
    }

    #[test]
    fn services_with_their_endpoint_states() {
        let objects: Objects = {
            let svc: Service = serde_yaml::from_str(
                "metadata: {name: web, namespace: default}\n\
                 spec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n\
                 \x20 ports: [{name: http, port: 80, protocol: TCP, nodePort: 30080}]\n",
            )
            .unwrap();
            let slice: EndpointSlice = serde_yaml::from_str(
                "metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\n\
                 addressType: IPv4\n\
                 ports: [{name: http, port: 8080}]\n\
                 endpoints:\n\
                 - {addresses: [10.76.0.5], nodeName: node1}\n\
                 - {addresses: [10.76.1.5], nodeName: node2, conditions: {ready: false, serving: true, terminating: true}}\n\
                 - {addresses: [10.76.1.6], conditions: {ready: false, terminating: true, serving: false}}\n\
                 - {addresses: [10.76.1.7], conditions: {ready: false}}\n",
            )
            .unwrap();
            let other: Service = serde_yaml::from_str(
                "metadata: {name: a, namespace: b}\nspec: {clusterIP: None}\n",
            )
            .unwrap();
            Objects {
                services: vec![Arc::new(svc), Arc::new(other)],
                slices: vec![Arc::new(slice)],
                nodes: Vec::new(),
            }
        };
        let c = catalogue(&objects);
        assert_eq!(
            c.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["a", "web"]
        );
        let web = &c[1];
        assert_eq!(
            (web.type_.as_str(), web.external_traffic_policy.as_str()),
            ("NodePort", "Local")
        );
        assert_eq!(web.cluster_ips, ["10.96.0.10"]);
        assert_eq!(web.ports[0].node_port, Some(30080));
        let states: Vec<_> = web.endpoints.iter().map(EndpointInfo::state).collect();
        assert_eq!(
            states,
            ["ready", "serving,terminating", "terminating", "not-ready"]
        );
        assert_eq!(web.endpoints[0].ports, [8080]);
        assert_eq!(web.endpoints[0].node, "node1");
        assert_eq!(c[0].type_, "ClusterIP");
        assert!(c[0].endpoints.is_empty());
    }

    #[test]
    fn the_writer_thread_writes_the_latest_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s/status.json");
        let base = AgentStatus {
            node_name: "n1".into(),
            ..Default::default()
        };
        let w = StatusWriter::at(path.clone(), base, Duration::from_millis(50));
        let health = ProxyHealth::new(Duration::from_secs(60));
        let web = crate::serve::metrics::ServiceLabels::from_entry(
            "default/web:http",
            crate::abi::Protocol::Tcp,
        );
        for id in 1..=3u32 {
            w.synced(&Objects::default(), &[(id, web.clone())].into(), &health);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let st: Option<AgentStatus> = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(st) = st.filter(|s| s.service_ids.contains_key(&3)) {
                assert_eq!(st.node_name, "n1");
                assert_eq!(st.service_ids[&3], "default/web:http");
                assert!(!st.health.healthy, "not attached: {:?}", st.health);
                assert!(st.last_sync_unix > 1.7e9);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "status never written");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn written_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x/status.json");
        let st = AgentStatus {
            version: "1".into(),
            node_name: "n".into(),
            service_ids: [(3, "default/web:http".to_owned())].into(),
            ..Default::default()
        };
        write_atomically(&path, &serde_json::to_vec(&st).unwrap()).unwrap();
        let back: AgentStatus = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, st);
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }
}
