//! One reconcile step: snapshot -> translate -> admit what fits -> plan -> apply, with the
//! time each stage took, and the node context (name, addresses, flags) translation needs
//! beyond the API objects. The run loop calls it once per snapshot.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::Node;
use log::{debug, warn};
use proxy_common::{NodeConfig, cfg_flags};

use crate::{
    abi,
    datapath::MapSizes,
    plan::{self, MapState},
    source::{Snapshot, load_manifests},
    translate,
};

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
    /// `--decap-allowed-sources`: the outer sources IPIP/GUE is decapsulated from (`None`:
    /// any; `Some` with no entry: none, e.g. only IPv6 CIDRs were given).
    pub decap_sources: Option<Vec<ipnet::Ipv4Net>>,
    /// `--socket-lb=host`: the host network namespace's cookie; the socket programs leave
    /// sockets of any other namespace (pods) to tc. `None`: no socket hooks.
    pub host_netns_cookie: Option<u64>,
    /// `--socket-lb=all`: pods' TCP connections are balanced at the socket too, where no
    /// per-packet rule applies (only with `host_netns_cookie`, which tells pods apart).
    pub socket_lb_pods_tcp: bool,
    /// `--foreign-tunnels=pass`.
    pub foreign_tunnels_pass: bool,
}

impl Context {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            map_sizes: MapSizes::default(),
            node_ips: Vec::new(),
            cluster_cidr: Cidr::default(),
            masquerade_all: false,
            nodeport_addresses: String::new(),
            decap_sources: None,
            host_netns_cookie: None,
            socket_lb_pods_tcp: false,
            foreign_tunnels_pass: false,
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
            .map(translate::node_addresses)
            .unwrap_or_default()
    }

    /// Whether this node should still get new traffic from load balancers (`/healthz`'s
    /// `nodeEligible`); a node whose object is not known yet is eligible.
    pub fn node_eligible(&self, snapshot: &Snapshot) -> bool {
        snapshot
            .objects
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
            .is_none_or(translate::node_eligible)
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
            } | if self.decap_sources.is_some() {
                cfg_flags::DECAP_SOURCES_RESTRICTED
            } else {
                0
            } | match (self.host_netns_cookie, self.socket_lb_pods_tcp) {
                (None, _) => 0,
                (Some(_), false) => cfg_flags::SOCK_LB_HOST_ONLY,
                (Some(_), true) => cfg_flags::SOCK_LB_HOST_ONLY | cfg_flags::SOCK_LB_PODS_TCP,
            } | if self.foreign_tunnels_pass {
                cfg_flags::FOREIGN_TUNNELS_PASS
            } else {
                0
            },
            snat_port_min: SNAT_PORTS.0,
            snat_port_max: SNAT_PORTS.1,
            host_netns_cookie: self.host_netns_cookie.unwrap_or(0),
        }
    }
}

/// `--decap-allowed-sources` as the datapath serves it: `None` when the flag is not given (any
/// outer source), else its IPv4 CIDRs with host bits cleared, sorted and without duplicates,
/// and the IPv6 entries, which are not served (IPv4 only; the caller says so). A flag with
/// IPv6 entries only still restricts: no IPv4 source is allowed.
pub fn decap_sources(flag: &[ipnet::IpNet]) -> (Option<Vec<ipnet::Ipv4Net>>, Vec<ipnet::Ipv6Net>) {
    if flag.is_empty() {
        return (None, Vec::new());
    }
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for n in flag {
        match n {
            ipnet::IpNet::V4(n) => v4.push(n.trunc()),
            ipnet::IpNet::V6(n) => v6.push(*n),
        }
    }
    v4.sort();
    v4.dedup();
    (Some(v4), v6)
}

/// What to change in the pinned decapsulation sources (`current`) to get `wanted`: the CIDRs
/// to add (first, before the config that may start checking them) and those to remove (last).
pub fn decap_source_changes(
    current: &[ipnet::Ipv4Net],
    wanted: &[ipnet::Ipv4Net],
) -> (Vec<ipnet::Ipv4Net>, Vec<ipnet::Ipv4Net>) {
    let add = wanted
        .iter()
        .filter(|n| !current.contains(n))
        .copied()
        .collect();
    let remove = current
        .iter()
        .filter(|n| !wanted.contains(n))
        .copied()
        .collect();
    (add, remove)
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

/// No cluster CIDR: 0.0.0.0/0.
impl Default for Cidr {
    fn default() -> Self {
        Cidr {
            addr: Ipv4Addr::UNSPECIFIED,
            prefix: 0,
        }
    }
}

impl Cidr {
    /// Whether a cluster CIDR is configured: `None` (0.0.0.0/0, a zero mask in the datapath)
    /// means local traffic cannot be told apart, so none is masqueraded by its source.
    pub fn is_set(&self) -> bool {
        self.prefix != 0
    }

    /// kube-proxy's `--cluster-cidr` / `clusterCIDR`: empty (none), or comma-separated CIDRs,
    /// one per family. Returns the IPv4 one (or none) and the IPv6 entries, which are accepted
    /// but not served yet.
    pub fn parse_list(s: &str) -> Result<(Cidr, Vec<String>), String> {
        let mut v4 = None;
        let mut v6 = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, _) = part
                .split_once('/')
                .ok_or_else(|| format!("{part:?}: expected ADDRESS/PREFIX, e.g. 10.244.0.0/16"))?;
            if a.parse::<std::net::Ipv6Addr>().is_ok() {
                part.parse::<ipnet::Ipv6Net>()
                    .map_err(|e| format!("{part:?}: {e}"))?;
                v6.push(part.to_owned());
                continue;
            }
            if v4.is_some() {
                return Err(format!("{s:?}: more than one IPv4 CIDR (one per family)"));
            }
            let net: ipnet::Ipv4Net = part.parse().map_err(|e| format!("{part:?}: {e}"))?;
            v4 = Some(Cidr {
                addr: net.network(),
                prefix: net.prefix_len(),
            });
        }
        Ok((v4.unwrap_or_default(), v6))
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    /// [`Cidr::parse_list`]'s IPv4 CIDR (IPv6 entries are skipped).
    fn from_str(s: &str) -> Result<Self, String> {
        Cidr::parse_list(s).map(|(c, _)| c)
    }
}

/// The one place a `translate::Input` is built.
/// The result is read from the translator ([`translate::Translator::output`]).
fn translate_snapshot(snapshot: &Snapshot, ctx: &Context, translator: &mut translate::Translator) {
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
        node_ip: ctx.node_addresses(snapshot).first().copied(),
    });
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
/// only, and the desired state the maps were last brought to, so that only the entries that
/// changed are planned ([`plan::plan_changes`]). The result is always that of [`reconcile`]
/// on the same snapshot and state: the full plan runs whenever the model may hold anything
/// else than the last desired state (first sync, a failed write, IDs that ran out, or a
/// write made by someone else).
#[derive(Debug, Default)]
pub struct Reconciler {
    translator: translate::Translator,
    last: Option<Programmed>,
}

/// What the last reconciliation left in the maps (every write went through).
#[derive(Debug)]
struct Programmed {
    /// `None`: exactly the translator's last result (the capacity admitted all of it);
    /// otherwise the part of it that fitted.
    cut: Option<translate::Translation>,
    refs: plan::BackendRefs,
    /// `MapState::writes` right after: anything else means another writer.
    writes: u64,
}

impl Programmed {
    /// The changes `delta` describes, planned against `desired` (the new state), with the
    /// reference counts moved to it. Visits only the changed keys.
    fn changes(&mut self, delta: &translate::Delta, desired: &translate::Desired) -> plan::Changes {
        let mut ch = plan::Changes::default();
        for (key, old) in &delta.old {
            ch.keys.insert(*key);
            let new = desired.get(key);
            for (ds, add) in old.iter().map(|d| (d, false)).chain(new.map(|d| (d, true))) {
                self.refs.count(ds, add);
                ch.backends
                    .extend(ds.backends.iter().chain(&ds.terminating));
            }
        }
        ch.vips_added = delta.vips_added.clone();
        ch.vips_removed = delta.vips_removed.clone();
        ch
    }
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
    /// Only the changed entries were planned (`plan::plan_changes`).
    pub incremental: bool,
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
        translate_snapshot(snapshot, ctx, &mut self.translator);
        let translator = &self.translator;
        let (translated, delta) = translator.output();
        let tstats = translator.stats();
        (stages.translated, stages.reused) = (tstats.translated, tstats.reused);
        stages.translate = started.elapsed();
        let started = Instant::now();
        // Usually everything fits and the translation is used as it is; near the limits a
        // copy of it is cut down to what fits.
        let cap = ctx.map_sizes.capacity();
        let cut =
            (!plan::fits_whole(&translated.desired, &translated.cluster_ips, &cap)).then(|| {
                let mut t = translated.clone();
                let over = plan::fit_capacity(&mut t.desired, &mut t.cluster_ips, &cap);
                t.issues.extend(over);
                t
            });
        let t = cut.as_ref().unwrap_or(translated);
        stages.capacity = started.elapsed();
        let started = Instant::now();
        let last = self.last.take().filter(|l| l.writes == state.writes());
        // Only the changed entries are planned: when the maps hold the translator's previous
        // result, its delta is what they lack; when they hold a cut-down state (near the
        // limits), what differs from that.
        let planned = last.and_then(|mut l| {
            let compared;
            let delta = match (&l.cut, &cut, delta) {
                (None, None, Some(d)) => d,
                (Some(before), _, _) => {
                    compared = translate::compare(before, t);
                    &compared
                }
                _ => return None,
            };
            let ch = l.changes(delta, &t.desired);
            plan::plan_changes(state, &t.desired, &ch, &l.refs).map(|p| (p, Some(l.refs)))
        });
        stages.incremental = planned.is_some();
        let (p, refs) = planned.unwrap_or_else(|| {
            let (p, complete) = plan::plan_full(state, &t.desired, &t.cluster_ips);
            (p, complete.then(|| plan::BackendRefs::new(&t.desired)))
        });
        stages.plan = started.elapsed();
        let ops = p.ops.len();
        let started = Instant::now();
        plan::apply_plan(state, &p, writer).context("writing the service maps")?;
        stages.apply = started.elapsed();
        let summary = summarize(snapshot, ctx, state, t, ops, stages);
        self.last = refs.map(|refs| Programmed {
            refs,
            writes: state.writes(),
            cut,
        });
        Ok(summary)
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
        service_ids: crate::serve::metrics::service_ids(&t.desired, state),
        no_local_endpoints: crate::serve::metrics::no_local_endpoints(&t.desired),
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
    pub service_ids: crate::serve::metrics::ServiceIds,
    /// Service ports with a Local policy and no endpoint on this node: (internal, external).
    pub no_local_endpoints: (usize, usize),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A small deterministic generator (xorshift), so a failing sequence can be replayed.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    fn random_service(r: &mut Rng, i: u64) -> Arc<k8s_openapi::api::core::v1::Service> {
        let lb = r.below(3) == 0;
        let mut spec = serde_json::json!({
            // A few services share a ClusterIP (only the first claims each port).
            "clusterIP": format!("10.96.0.{}", 1 + i % 12),
            "ports": [{"name": "a", "port": 80 + r.below(2), "protocol": "TCP"},
                      {"name": "b", "port": 53, "protocol": if r.below(2) == 0 { "UDP" } else { "TCP" }}],
            "sessionAffinity": if r.below(4) == 0 { "ClientIP" } else { "None" },
        });
        if lb {
            spec["type"] = "LoadBalancer".into();
            spec["ports"][0]["nodePort"] = (30000 + i).into();
            spec["externalTrafficPolicy"] =
                if r.below(2) == 0 { "Local" } else { "Cluster" }.into();
            if r.below(2) == 0 {
                spec["loadBalancerSourceRanges"] =
                    serde_json::json!([format!("192.0.{}.0/24", r.below(3))]);
            }
        }
        if r.below(4) == 0 {
            spec["internalTrafficPolicy"] = "Local".into();
        }
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "p", "name": format!("s{i}")},
                "spec": spec,
                "status": {"loadBalancer": {"ingress": [{"ip": format!("198.51.100.{}", 1 + i % 5)}]}}
            }))
            .expect("service"),
        )
    }

    fn random_slice(
        r: &mut Rng,
        i: u64,
        k: u64,
    ) -> Arc<k8s_openapi::api::discovery::v1::EndpointSlice> {
        // Endpoints from a small pool, so services share backends.
        let eps: Vec<_> = (0..r.below(5))
            .map(|_| {
                let ready = r.below(4) != 0;
                serde_json::json!({
                    "addresses": [format!("10.244.0.{}", 1 + r.below(8))],
                    "nodeName": if r.below(2) == 0 { "n" } else { "other" },
                    "conditions": {"ready": ready, "serving": ready || r.below(2) == 0, "terminating": !ready}
                })
            })
            .collect();
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "p", "name": format!("s{i}-{k}"),
                             "labels": {"kubernetes.io/service-name": format!("s{i}")}},
                "addressType": "IPv4",
                "endpoints": eps,
                "ports": [{"name": "a", "port": 8080 + r.below(2), "protocol": "TCP"},
                          {"name": "b", "port": 5353, "protocol": "UDP"}]
            }))
            .expect("slice"),
        )
    }

    /// The incremental reconciliation (translation, capacity, plan) writes, change after
    /// change, exactly the maps a full recompute from the same starting maps writes.
    #[test]
    fn incremental_reconciliation_equals_a_full_recompute_map_for_map() {
        for seed in 1..=12u64 {
            let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut ctx = Context::new("n");
            ctx.node_ips = vec!["192.0.2.10".parse().expect("ip")];
            // Every other seed runs close to the capacity, so objects are rejected and
            // admitted again as others come and go.
            if seed % 2 == 0 {
                ctx.map_sizes.services = 60;
                ctx.map_sizes.backends = 6;
            }
            let mut snap = Snapshot::default();
            let (mut rec, mut state, mut maps) = (
                Reconciler::new(),
                MapState::new(),
                crate::plan::MemMaps::default(),
            );
            let (mut full_state, mut full_maps) =
                (MapState::new(), crate::plan::MemMaps::default());
            let mut incremental = 0;
            for step in 0..150 {
                for _ in 0..1 + r.below(3) {
                    let i = r.below(16);
                    let name = format!("s{i}");
                    let services = &mut snap.objects.services;
                    let slices = &mut snap.objects.slices;
                    match r.below(6) {
                        0 => services.retain(|s| s.metadata.name.as_deref() != Some(&name)),
                        1 => slices.retain(|s| {
                            !s.metadata
                                .name
                                .as_deref()
                                .unwrap_or_default()
                                .starts_with(&format!("{name}-"))
                        }),
                        2 | 3 => {
                            services.retain(|s| s.metadata.name.as_deref() != Some(&name));
                            services.push(random_service(&mut r, i));
                        }
                        _ => {
                            let k = r.below(2);
                            let slice_name = format!("{name}-{k}");
                            slices.retain(|s| s.metadata.name.as_deref() != Some(&slice_name));
                            slices.push(random_slice(&mut r, i, k));
                        }
                    }
                }
                // As the sources list them (the incremental translation's case), but for
                // every third seed, which keeps the order of the edits.
                if seed % 3 != 0 {
                    let id = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
                        (m.namespace.clone(), m.name.clone())
                    };
                    snap.objects.services.sort_by_key(|s| id(&s.metadata));
                    snap.objects.slices.sort_by_key(|s| id(&s.metadata));
                }
                let s = rec
                    .reconcile(&snap, &ctx, &mut state, &mut maps)
                    .expect("MemMaps");
                incremental += usize::from(s.stages.incremental);
                let f = reconcile(&snap, &ctx, &mut full_state, &mut full_maps).expect("MemMaps");
                assert_eq!(maps, full_maps, "seed {seed}, step {step}: the maps differ");
                assert_eq!(s.rejected, f.rejected, "seed {seed}, step {step}");
                assert!(
                    maps.broken_services().is_empty(),
                    "seed {seed}, step {step}"
                );
                assert!(
                    state.inconsistencies().is_empty(),
                    "seed {seed}, step {step}"
                );
            }
            assert!(
                incremental > 100,
                "seed {seed}: only {incremental} incremental plans"
            );
        }
    }

    fn nets(s: &[&str]) -> Vec<ipnet::IpNet> {
        s.iter().map(|n| n.parse().expect("CIDR")).collect()
    }

    #[test]
    fn decap_sources_are_any_without_the_flag_and_ipv4_only_with_it() {
        assert_eq!(decap_sources(&[]), (None, Vec::new()));
        let (v4, v6) = decap_sources(&nets(&["192.0.2.7/24", "198.51.100.1/32", "192.0.2.0/24"]));
        let want: Vec<ipnet::Ipv4Net> = ["192.0.2.0/24", "198.51.100.1/32"]
            .iter()
            .map(|n| n.parse().expect("CIDR"))
            .collect();
        assert_eq!(v4, Some(want), "host bits cleared, sorted, deduplicated");
        assert!(v6.is_empty());
        // IPv6 only: restricted, with no IPv4 source allowed (not "any").
        let (v4, v6) = decap_sources(&nets(&["2001:db8::/32"]));
        assert_eq!(v4, Some(Vec::new()));
        assert_eq!(v6.len(), 1);
        let mut ctx = Context::new("n");
        assert_eq!(ctx.node_config(&[], None).flags, 0);
        ctx.decap_sources = v4;
        assert_eq!(
            ctx.node_config(&[], None).flags,
            cfg_flags::DECAP_SOURCES_RESTRICTED
        );
    }

    #[test]
    fn socket_lb_host_sets_the_flag_and_the_cookie() {
        let mut ctx = Context::new("n");
        let c = ctx.node_config(&[], None);
        assert_eq!(
            (c.flags & cfg_flags::SOCK_LB_HOST_ONLY, c.host_netns_cookie),
            (0, 0)
        );
        ctx.host_netns_cookie = Some(4097);
        let c = ctx.node_config(&[], None);
        assert_eq!(
            (c.flags & cfg_flags::SOCK_LB_HOST_ONLY, c.host_netns_cookie),
            (cfg_flags::SOCK_LB_HOST_ONLY, 4097)
        );
        assert_eq!(
            c.flags & cfg_flags::SOCK_LB_PODS_TCP,
            0,
            "host leaves pods to tc"
        );
    }

    #[test]
    fn socket_lb_all_sets_the_pods_flag_with_the_host_one() {
        let mut ctx = Context::new("n");
        ctx.socket_lb_pods_tcp = true;
        // No cookie (off, or a kernel without SO_NETNS_COOKIE): no flag at all.
        assert_eq!(ctx.node_config(&[], None).flags, 0);
        ctx.host_netns_cookie = Some(4097);
        let c = ctx.node_config(&[], None);
        assert_eq!(
            (c.flags, c.host_netns_cookie),
            (
                cfg_flags::SOCK_LB_HOST_ONLY | cfg_flags::SOCK_LB_PODS_TCP,
                4097
            )
        );
    }

    #[test]
    fn decap_source_changes_add_the_new_and_remove_the_old() {
        let n = |s: &str| s.parse::<ipnet::Ipv4Net>().expect("CIDR");
        let current = [n("10.0.0.0/8"), n("192.0.2.0/24")];
        let wanted = [n("192.0.2.0/24"), n("198.51.100.0/24")];
        assert_eq!(
            decap_source_changes(&current, &wanted),
            (vec![n("198.51.100.0/24")], vec![n("10.0.0.0/8")])
        );
        assert_eq!(
            decap_source_changes(&current, &[]),
            (vec![], current.to_vec())
        );
    }
}
