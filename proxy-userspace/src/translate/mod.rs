//! Translation: Kubernetes API objects -> the services and backends the datapath should have.
//!
//! Pure: no IO, deterministic (objects are processed sorted by namespace/name, so the result
//! does not depend on the order they were listed in), and total: any input, however malformed,
//! yields a [`Translation`]. A bad field produces an [`Issue`] and skips only the item it
//! belongs to (one address, one port, one endpoint); everything else is still programmed.
//!
//! Incremental: the work is done per *service group* (the Services of one namespace/name and
//! the EndpointSlices labelled with that name), which depends on nothing but the group's
//! objects and the node ([`Input::node_name`], [`Input::node_zone`],
//! [`Input::nodeport_addresses`]). Only the cheap steps that relate groups to each other (who
//! claims an address first, healthCheckNodePort clashes, the ClusterIP set) run over all of
//! them. [`translate`] computes every group; a [`Translator`] keeps each group's result and
//! computes again only the groups whose objects changed (recognised by pointer, else compared
//! by value), so one changed Service among 10^4 costs one group. Both give the same
//! [`Translation`].
//!
//! Entries, per service port (types ClusterIP, NodePort and LoadBalancer; `spec.externalIPs`
//! apply to all three):
//! - every IPv4 cluster IP: flags `CLUSTER_IP`;
//! - type NodePort/LoadBalancer with a `nodePort`: every address in
//!   [`Input::nodeport_addresses`] with that port: `NODE_PORT`;
//! - every IPv4 `spec.externalIPs` address: `EXTERNAL_IP`;
//! - type LoadBalancer: every IPv4 `status.loadBalancer.ingress[].ip` whose `ipMode` is not
//!   `Proxy` (a proxying balancer must see the traffic, so the node must not short-circuit it):
//!   `LOAD_BALANCER`, plus `SOURCE_RANGES` when `loadBalancerSourceRanges` is set.
//!
//! Endpoint sets (kube-proxy's `CategorizeEndpoints`):
//! - *cluster*: ready endpoints, narrowed by topology hints (below); if none is ready,
//!   serving+terminating ones (topology ignored: a best effort not to drop connections);
//! - *local*: the same rule applied to this node's endpoints only (`nodeName ==
//!   Input::node_name`); never narrowed by topology (Local policies are already node-scoped).
//!
//! The ClusterIP entry gets the cluster set, or with `internalTrafficPolicy: Local` the local
//! set and `ITP_LOCAL`. Each external entry (NodePort, externalIP, LB IP) gets the cluster set
//! under `externalTrafficPolicy: Cluster`; under `Local` it gets the local set with
//! `ETP_LOCAL | TWO_SCOPES`, and an [`scope::INTERNAL`] twin with the cluster set serves
//! traffic from pods and the node itself (kube-proxy's short-circuit). A Local entry whose
//! local set is empty while the service has usable endpoints elsewhere gets `DROP_IF_EMPTY`
//! (DROP); an entry with no endpoint because there is none anywhere has plain `count == 0`
//! (REJECT). The twin carries the kind flag (and `AFFINITY`) only: `SOURCE_RANGES` is checked on
//! the EXTERNAL entry, which every lookup reads first, whatever the packet's origin.
//!
//! Topology (trafficDistribution `PreferClose`/`PreferSameZone`, or the topology-mode
//! annotation: both act through the zone hints the EndpointSlice controller writes, which is
//! what kube-proxy reads): when this node's zone is known, every ready endpoint of the port
//! carries `hints.forZones`, and at least one is hinted for this zone, the cluster set is the
//! ready endpoints hinted for this zone; otherwise topology is ignored. `forNodes` hints are
//! not used.
//!
//! Decisions where the API allows a choice:
//! - Two entries claiming the same (address, port, protocol, scope): ClusterIP entries of all
//!   services are placed first, then NodePorts, then LB IPs, then externalIPs, each kind by
//!   service namespace/name; a later claimant gets an [`Issue`]. So a user-set externalIP can
//!   never take over another service's ClusterIP or a NodePort (CVE-2020-8554 style).
//! - `loadBalancerSourceRanges`: an invalid CIDR is an [`Issue`] and is left out; the entry
//!   still carries `SOURCE_RANGES` with the valid ranges, so the LB IP fails closed (sources the
//!   bad range meant to admit are dropped) instead of being open to all. Likewise a list with
//!   only IPv6 ranges admits no IPv4 source.
//! - LB ingress IPs are programmed for `type: LoadBalancer` only (a stale status left on a
//!   service whose type changed is ignored).
//! - `sessionAffinity: ClientIP`: `AFFINITY` on every entry of the service, timeout
//!   `sessionAffinityConfig.clientIP.timeoutSeconds` or 10800 (an out-of-range value is an
//!   issue and the default is used).
//! - Unknown traffic policy / affinity values are issues and the API default (Cluster / None)
//!   is used.
//! - Health checks: eTP Local services of type LoadBalancer with a `healthCheckNodePort` get a
//!   [`HealthCheck`] whose count is, like kube-proxy's, the distinct local *ready*
//!   endpoint ip:port pairs over the service's ports: only-terminating local endpoints count
//!   0 (KEP-1669: the balancer drains the node while they finish).
//!
//! Other kube-proxy behaviours this follows (see `SEMANTICS.md`):
//! - services labelled `service.kubernetes.io/service-proxy-name`, `type: ExternalName` and
//!   headless services (`clusterIP: None`) get nothing;
//! - the endpoint port is the EndpointSlice port whose name and protocol equal the Service
//!   port's, never `targetPort`;
//! - a missing `ready`/`serving` condition counts as true, a missing `terminating` as false
//!   (the API's and kube-proxy's reading);
//! - only the first address of an endpoint is used (the API says they are fungible, and
//!   kube-proxy does the same);
//! - IP addresses and CIDRs are parsed like kube-proxy's `ParseIPSloppy`/`ParseCIDRSloppy`:
//!   leading zeros in an octet are accepted as decimal, for objects created before the API
//!   server became strict.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proxy_common::{scope, svc_flags};

use crate::abi::Protocol;

/// Label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label handing a Service to another proxy; such services are ignored.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The only EndpointSlice address type used (IPv6 and FQDN slices are skipped).
pub const ADDRESS_TYPE_IPV4: &str = "IPv4";
/// Node label holding the node's zone (topology hints).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// sessionAffinity ClientIP timeout when the service sets none (the API default).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The largest sessionAffinity timeout the API allows (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// The objects to translate and the node the agent runs on. The objects may be held directly
/// or shared (`Input<Arc<Service>, Arc<EndpointSlice>>`, what [`Translator`] takes).
#[derive(Debug)]
pub struct Input<'a, S = Service, E = EndpointSlice> {
    pub services: &'a [S],
    pub slices: &'a [E],
    /// The node this agent programs: endpoints with this `nodeName` are local.
    pub node_name: &'a str,
    /// This node's zone ([`node_zone`]); `None` disables topology hints.
    pub node_zone: Option<&'a str>,
    /// The node addresses NodePorts are served on, already filtered by
    /// `--nodeport-addresses` ([`nodeport_addresses`]).
    pub nodeport_addresses: &'a [Ipv4Addr],
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub desired: Desired,
    pub issues: Vec<Issue>,
    /// Every IPv4 ClusterIP of the non-headless, non-ignored services, whether or not any
    /// port of it made an entry: a ClusterIP hit on a port/protocol without an entry is
    /// rejected.
    pub cluster_ips: BTreeSet<Ipv4Addr>,
    /// healthCheckNodePort -> what it answers, for the eTP Local LoadBalancer services.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// What a healthCheckNodePort responder says: 200 with the count, or 503 when it is 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// `namespace/name`.
    pub service: String,
    /// This node's ready endpoints of the service (distinct ip:port over its ports).
    pub local_endpoints: usize,
}

/// Everything the service and backend maps should hold.
pub type Desired = BTreeMap<ServiceKey, DesiredService>;

/// What a packet's destination is matched against: one service address, port and protocol,
/// and which traffic the entry is for ([`scope::EXTERNAL`] or [`scope::INTERNAL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: u8,
}

impl ServiceKey {
    /// The entry every packet to this address starts with.
    pub const fn external(ip: Ipv4Addr, port: u16, protocol: Protocol) -> Self {
        Self {
            ip,
            port,
            protocol,
            scope: scope::EXTERNAL,
        }
    }

    /// The same address's entry for traffic from inside the node.
    pub const fn internal(self) -> Self {
        Self {
            scope: scope::INTERNAL,
            ..self
        }
    }
}

/// One service address and the backends it may lead to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// `namespace/name:port-name`, or `namespace/name` for an unnamed port (kube-proxy's
    /// spelling), for logs and `inspect`.
    pub name: String,
    /// Usable endpoints, sorted and without duplicates. Empty means "reject", or "drop" with
    /// `svc_flags::DROP_IF_EMPTY`.
    pub backends: Vec<BackendAddr>,
    /// Serving+terminating endpoints of the entry's scope that are not in `backends` (because
    /// ready ones exist), sorted and without duplicates. New flows never go to them, but
    /// [`plan`](crate::plan::plan) keeps their existing backend entries (same ID, in no slot)
    /// so established flows to them continue while they drain (Cilium's approach); once an
    /// endpoint is no longer reported here its backend is deleted and its flows re-balance.
    pub terminating: Vec<BackendAddr>,
    /// `proxy_common::svc_flags`.
    pub flags: u32,
    /// sessionAffinity timeout in seconds with `svc_flags::AFFINITY`, else 0.
    pub affinity_timeout_s: u32,
    /// Allowed sources `(network, prefix length)`, normalized (host bits zero), sorted and
    /// deduplicated; meaningful with `svc_flags::SOURCE_RANGES` only (empty then = allow
    /// none).
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
}

impl DesiredService {
    /// An entry without affinity or source ranges.
    pub fn new(name: impl Into<String>, backends: Vec<BackendAddr>, flags: u32) -> Self {
        Self {
            name: name.into(),
            backends,
            terminating: Vec::new(),
            flags,
            affinity_timeout_s: 0,
            source_ranges: Vec::new(),
        }
    }
}

/// Where a connection to a service may be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)?;
        match self.scope {
            scope::EXTERNAL => Ok(()),
            scope::INTERNAL => f.write_str(" (internal)"),
            other => write!(f, " (scope {other})"),
        }
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)
    }
}

/// Something in an object that could not be used. The rest of the object was still used
/// where possible.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    /// `"Service default/x"` or `"EndpointSlice default/x-abc"`.
    pub object: String,
    /// Path of the offending field, e.g. `spec.ports[1].protocol`; empty for the whole object.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.message)
        } else {
            write!(f, "{}: {}: {}", self.object, self.field, self.message)
        }
    }
}

// ---- node-level inputs -----------------------------------------------------------------

/// The node's zone: its `topology.kubernetes.io/zone` label, if set and non-empty.
pub fn node_zone(node: &Node) -> Option<String> {
    node.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .filter(|z| !z.is_empty())
        .cloned()
}

/// kube-proxy's `--nodeport-addresses`: which node addresses serve NodePorts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Unset or empty: every node address.
    #[default]
    All,
    /// `primary`: the node's primary (first) address.
    Primary,
    /// The node addresses inside any of these IPv4 CIDRs `(network, prefix length)`. IPv6
    /// CIDRs are accepted (dual-stack flags) and match no IPv4 address.
    Cidrs(Vec<(Ipv4Addr, u8)>),
}

/// A `--nodeport-addresses` value that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodePortAddressesError {
    #[error(
        "--nodeport-addresses: {entry:?} is not a CIDR ({reason}); expected comma-separated \
         CIDRs such as 10.0.0.0/8,192.168.1.10/32, or the single word \"primary\""
    )]
    InvalidCidr { entry: String, reason: String },
    #[error(
        "--nodeport-addresses: empty entry in {0:?}; expected comma-separated CIDRs such as \
         10.0.0.0/8,192.168.1.10/32, or the single word \"primary\""
    )]
    EmptyEntry(String),
    #[error(
        "--nodeport-addresses: \"primary\" cannot be combined with CIDRs ({0:?}); pass either \
         \"primary\" or a list of CIDRs"
    )]
    PrimaryWithCidrs(String),
}

impl FromStr for NodePortAddresses {
    type Err = NodePortAddressesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self::All);
        }
        let entries: Vec<&str> = s.split(',').map(str::trim).collect();
        if entries.contains(&"primary") {
            return if entries.len() == 1 {
                Ok(Self::Primary)
            } else {
                Err(NodePortAddressesError::PrimaryWithCidrs(s.to_owned()))
            };
        }
        let mut cidrs = Vec::new();
        for entry in entries {
            if entry.is_empty() {
                return Err(NodePortAddressesError::EmptyEntry(s.to_owned()));
            }
            match parse_cidr(entry) {
                Ok(Cidr::V4(net, prefix)) => cidrs.push((net, prefix)),
                Ok(Cidr::V6) => {}
                Err(reason) => {
                    return Err(NodePortAddressesError::InvalidCidr {
                        entry: entry.to_owned(),
                        reason,
                    });
                }
            }
        }
        Ok(Self::Cidrs(cidrs))
    }
}

/// The node addresses NodePorts listen on: `node_ips` (primary first) filtered by the flag,
/// in order, without duplicates, and never a loopback address (CVE-2020-8558: a NodePort on
/// 127.0.0.1 is reachable by neighbours that route 127/8 to the node).
pub fn nodeport_addresses(node_ips: &[Ipv4Addr], flag: &NodePortAddresses) -> Vec<Ipv4Addr> {
    let chosen: Vec<Ipv4Addr> = match flag {
        NodePortAddresses::All => node_ips.to_vec(),
        NodePortAddresses::Primary => node_ips.first().copied().into_iter().collect(),
        NodePortAddresses::Cidrs(cidrs) => node_ips
            .iter()
            .copied()
            .filter(|ip| cidrs.iter().any(|(net, p)| in_cidr(*ip, *net, *p)))
            .collect(),
    };
    let mut seen = HashSet::new();
    chosen
        .into_iter()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && seen.insert(*ip))
        .collect()
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn in_cidr(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    u32::from(ip) & mask(prefix) == u32::from(net)
}

enum Cidr {
    /// Network (host bits cleared) and prefix length.
    V4(Ipv4Addr, u8),
    V6,
}

/// Parses a CIDR like kube-proxy's `ParseCIDRSloppy`; host bits are cleared. The error is a
/// reason to show after the value.
fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let Some((addr, prefix)) = s.split_once('/') else {
        return Err("no /prefix-length; a single address is written like 10.0.0.1/32".into());
    };
    if addr.contains(':') {
        let ok = addr.parse::<std::net::Ipv6Addr>().is_ok()
            && prefix.bytes().all(|b| b.is_ascii_digit())
            && prefix.parse::<u8>().is_ok_and(|p| p <= 128);
        return if ok {
            Ok(Cidr::V6)
        } else {
            Err("invalid IPv6 CIDR".into())
        };
    }
    let Some(ip) = parse_octets(addr) else {
        return Err(format!("invalid IPv4 address {addr:?}"));
    };
    let prefix = match prefix.parse::<u8>() {
        Ok(p) if p <= 32 && !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => return Err(format!("invalid prefix length {prefix:?} (must be 0-32)")),
    };
    Ok(Cidr::V4(
        Ipv4Addr::from(u32::from(ip) & mask(prefix)),
        prefix,
    ))
}

// ---- translation -----------------------------------------------------------------------

/// The kinds of entries, in the order they claim keys (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl Kind {
    const fn flag(self) -> u32 {
        match self {
            Kind::ClusterIp => svc_flags::CLUSTER_IP,
            Kind::NodePort => svc_flags::NODE_PORT,
            Kind::LoadBalancer => svc_flags::LOAD_BALANCER,
            Kind::ExternalIp => svc_flags::EXTERNAL_IP,
        }
    }

    const fn name(self) -> &'static str {
        match self {
            Kind::ClusterIp => "ClusterIP",
            Kind::NodePort => "NodePort",
            Kind::LoadBalancer => "LoadBalancer",
            Kind::ExternalIp => "externalIP",
        }
    }
}

impl<S, E> Clone for Input<'_, S, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S, E> Copy for Input<'_, S, E> {}

/// An entry (and its INTERNAL twin) a service wants, before keys are claimed.
#[derive(Clone, Debug)]
struct Wanted {
    kind: Kind,
    object: String,
    field: String,
    key: ServiceKey,
    external: DesiredService,
    internal: Option<DesiredService>,
}

/// Translates the API objects into the desired map contents.
pub fn translate<S: Borrow<Service>, E: Borrow<EndpointSlice>>(input: &Input<S, E>) -> Translation {
    let node = NodeView {
        name: input.node_name,
        zone: input.node_zone.filter(|z| !z.is_empty()),
    };
    let groups = group_objects(input.services, input.slices);
    let outs: Vec<GroupOut> = groups
        .values()
        .map(|g| translate_group(&g.services, &g.slices, &node, input.nodeport_addresses))
        .collect();
    assemble(outs.iter())
}

/// `(namespace, name)` of a service group or an object, owned.
type GroupKey = (String, String);

/// The objects of one service group, each kind sorted by namespace/name (stable, so
/// duplicates keep their listed order).
struct Group<'a, S, E> {
    services: Vec<&'a S>,
    slices: Vec<&'a E>,
}

/// Sorts the objects into service groups, in namespace/name order. EndpointSlices without a
/// service label or of another address type than IPv4 belong to none (they are not used).
fn group_objects<'a, S: Borrow<Service>, E: Borrow<EndpointSlice>>(
    services: &'a [S],
    slices: &'a [E],
) -> BTreeMap<(&'a str, &'a str), Group<'a, S, E>> {
    let mut groups: BTreeMap<(&str, &str), Group<S, E>> = BTreeMap::new();
    let mut sorted: Vec<&S> = services.iter().collect();
    sorted.sort_by(|a, b| {
        object_id(&(*a).borrow().metadata).cmp(&object_id(&(*b).borrow().metadata))
    });
    for svc in sorted {
        groups
            .entry(object_id(&svc.borrow().metadata))
            .or_insert_with(|| Group {
                services: Vec::new(),
                slices: Vec::new(),
            })
            .services
            .push(svc);
    }
    let mut sorted: Vec<&E> = slices.iter().collect();
    sorted.sort_by(|a, b| {
        object_id(&(*a).borrow().metadata).cmp(&object_id(&(*b).borrow().metadata))
    });
    for slice in sorted {
        let s = slice.borrow();
        let Some(service) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        if s.address_type != ADDRESS_TYPE_IPV4 {
            continue;
        }
        groups
            .entry((namespace(&s.metadata), service.as_str()))
            .or_insert_with(|| Group {
                services: Vec::new(),
                slices: Vec::new(),
            })
            .slices
            .push(slice);
    }
    groups
}

/// What one service group contributes, before it is related to the other groups.
#[derive(Clone, Debug, Default)]
struct GroupOut {
    /// The problems of the group's slices, with each slice's namespace/name (all slices'
    /// problems come first, in that order).
    slice_issues: Vec<(GroupKey, Issue)>,
    services: Vec<ServiceOut>,
}

/// What one Service contributes.
#[derive(Clone, Debug, Default)]
struct ServiceOut {
    issues: Vec<Issue>,
    cluster_ips: Vec<Ipv4Addr>,
    wanted: Vec<Wanted>,
    /// `(field, healthCheckNodePort, check)`, claimed in [`assemble`].
    health_check: Option<(String, u16, HealthCheck)>,
    /// `Service ns/name`, for the issue of a healthCheckNodePort clash.
    object: String,
}

/// Translates one service group: its services (sorted) and their slices (sorted). Depends on
/// nothing else but the node.
fn translate_group<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
    services: &[&S],
    slices: &[&E],
    node: &NodeView,
    nodeport_addresses: &[Ipv4Addr],
) -> GroupOut {
    let mut out = GroupOut::default();
    let mut views = Vec::with_capacity(slices.len());
    for slice in slices {
        let slice = (*slice).borrow();
        let mut issues = Vec::new();
        let mut ctx = Ctx {
            object: format!("EndpointSlice {}", display_id(&slice.metadata)),
            issues: &mut issues,
        };
        views.push(slice_view(slice, &mut ctx));
        let (ns, name) = object_id(&slice.metadata);
        out.slice_issues.extend(
            issues
                .into_iter()
                .map(|i| ((ns.to_owned(), name.to_owned()), i)),
        );
    }
    for svc in services {
        let svc = (*svc).borrow();
        let mut issues = Vec::new();
        let mut ctx = Ctx {
            object: format!("Service {}", display_id(&svc.metadata)),
            issues: &mut issues,
        };
        let Some(view) = service_view(svc, &mut ctx) else {
            out.services.push(ServiceOut {
                issues,
                ..Default::default()
            });
            continue;
        };
        let mut local_ready: BTreeSet<(Ipv4Addr, u16)> = BTreeSet::new();
        let mut wanted = Vec::new();
        for port in &view.ports {
            let candidates = port_endpoints(&views, port);
            local_ready.extend(
                candidates
                    .iter()
                    .filter(|(_, ep)| ep.ready && node.is_local(ep))
                    .map(|(b, _)| (b.ip, b.port)),
            );
            let sets = EndpointSets::new(&candidates, node);
            wanted.extend(port_entries(
                &view,
                port,
                &sets,
                nodeport_addresses,
                &ctx.object,
            ));
        }
        let health_check = view.health_check_node_port.as_ref().map(|(field, port)| {
            (
                field.clone(),
                *port,
                HealthCheck {
                    service: format!("{}/{}", view.namespace, view.name),
                    local_endpoints: local_ready.len(),
                },
            )
        });
        let object = ctx.object;
        out.services.push(ServiceOut {
            issues,
            cluster_ips: view.cluster_ips,
            wanted,
            health_check,
            object,
        });
    }
    out
}

/// Relates the groups (in namespace/name order) to each other: the issues in order, the
/// ClusterIP set, healthCheckNodePort clashes, and who claims each key (see the module docs).
fn assemble<'a>(groups: impl Iterator<Item = &'a GroupOut> + Clone) -> Translation {
    let mut slice_issues: Vec<&(GroupKey, Issue)> =
        groups.clone().flat_map(|g| &g.slice_issues).collect();
    slice_issues.sort_by(|a, b| a.0.cmp(&b.0));
    let mut issues: Vec<Issue> = slice_issues.into_iter().map(|(_, i)| i.clone()).collect();
    let mut cluster_ips = BTreeSet::new();
    let mut health_checks: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    let mut wanted: Vec<&Wanted> = Vec::new();
    for svc in groups.flat_map(|g| &g.services) {
        issues.extend(svc.issues.iter().cloned());
        cluster_ips.extend(svc.cluster_ips.iter().copied());
        wanted.extend(&svc.wanted);
        if let Some((field, hc_port, check)) = &svc.health_check {
            match health_checks.get(hc_port) {
                Some(other) => issues.push(Issue {
                    object: svc.object.clone(),
                    field: field.clone(),
                    message: format!(
                        "healthCheckNodePort {hc_port} is already used by {}; no health check \
                         is served for this service",
                        other.service
                    ),
                }),
                None => {
                    health_checks.insert(*hc_port, check.clone());
                }
            }
        }
    }

    // Claim keys kind by kind (stable: services stay in namespace/name order within a kind).
    wanted.sort_by_key(|w| w.kind);
    let mut desired = Desired::new();
    for w in wanted {
        let internal_key = w.key.internal();
        let taken = desired
            .get(&w.key)
            .or_else(|| w.internal.as_ref().and_then(|_| desired.get(&internal_key)));
        if let Some(other) = taken {
            issues.push(Issue {
                object: w.object.clone(),
                field: w.field.clone(),
                message: format!(
                    "{} is already used by {}; this {} entry is skipped",
                    w.key,
                    other.name,
                    w.kind.name()
                ),
            });
            continue;
        }
        desired.insert(w.key, w.external.clone());
        if let Some(internal) = &w.internal {
            desired.insert(internal_key, internal.clone());
        }
    }
    Translation {
        desired,
        issues,
        cluster_ips,
        health_checks,
    }
}

/// [`translate`] that remembers each service group's result and computes a group again only
/// when its objects or the node changed: the agent's translation, where one edit among 10^4
/// services costs one group plus the cheap steps over all of them.
///
/// An object is the same as last time when it is the same allocation (the sources hand out
/// unchanged objects again, shared) or, failing that, equal by value; so a stale result is
/// never served, whatever the caller passes.
#[derive(Debug, Default)]
pub struct Translator {
    /// The node the cached results were computed for.
    node: Option<(String, Option<String>, Vec<Ipv4Addr>)>,
    groups: BTreeMap<GroupKey, CachedGroup>,
    stats: TranslatorStats,
}

#[derive(Debug)]
struct CachedGroup {
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    out: GroupOut,
}

/// How the last [`Translator::translate`] went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TranslatorStats {
    /// Service groups computed (new or changed).
    pub translated: usize,
    /// Service groups whose result was reused.
    pub reused: usize,
}

/// The same object: the same allocation, or equal.
fn same<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

impl Translator {
    pub fn new() -> Self {
        Self::default()
    }

    /// The same result as [`translate`] of `input`.
    pub fn translate(
        &mut self,
        input: &Input<'_, Arc<Service>, Arc<EndpointSlice>>,
    ) -> Translation {
        let node_inputs = (
            input.node_name.to_owned(),
            input.node_zone.map(str::to_owned),
            input.nodeport_addresses.to_vec(),
        );
        if self.node.as_ref() != Some(&node_inputs) {
            self.groups.clear();
            self.node = Some(node_inputs);
        }
        let node = NodeView {
            name: input.node_name,
            zone: input.node_zone.filter(|z| !z.is_empty()),
        };
        let mut stats = TranslatorStats::default();
        let mut old = std::mem::take(&mut self.groups);
        for ((ns, name), g) in group_objects(input.services, input.slices) {
            let key = (ns.to_owned(), name.to_owned());
            let cached = old.remove(&key).filter(|c| {
                c.services.len() == g.services.len()
                    && c.slices.len() == g.slices.len()
                    && c.services.iter().zip(&g.services).all(|(a, b)| same(a, b))
                    && c.slices.iter().zip(&g.slices).all(|(a, b)| same(a, b))
            });
            let entry = match cached {
                Some(mut c) => {
                    stats.reused += 1;
                    // Keep the caller's allocations: next time they compare by pointer.
                    c.services = g.services.iter().map(|s| Arc::clone(s)).collect();
                    c.slices = g.slices.iter().map(|s| Arc::clone(s)).collect();
                    c
                }
                None => {
                    stats.translated += 1;
                    CachedGroup {
                        out: translate_group(
                            &g.services,
                            &g.slices,
                            &node,
                            input.nodeport_addresses,
                        ),
                        services: g.services.iter().map(|s| Arc::clone(s)).collect(),
                        slices: g.slices.iter().map(|s| Arc::clone(s)).collect(),
                    }
                }
            };
            self.groups.insert(key, entry);
        }
        // Groups left in `old` are gone from the input.
        self.stats = stats;
        assemble(self.groups.values().map(|c| &c.out))
    }

    /// How the last translation went.
    pub fn stats(&self) -> TranslatorStats {
        self.stats
    }
}

/// Who "local" and "this zone" are.
struct NodeView<'a> {
    name: &'a str,
    zone: Option<&'a str>,
}

impl NodeView<'_> {
    fn is_local(&self, ep: &EndpointView) -> bool {
        !self.name.is_empty() && ep.node_name.as_deref() == Some(self.name)
    }
}

/// The endpoint sets of one service port (see the module docs), each with the
/// serving+terminating endpoints of its scope left out of it ([`DesiredService::terminating`]).
struct EndpointSets {
    cluster: Vec<BackendAddr>,
    local: Vec<BackendAddr>,
    cluster_terminating: Vec<BackendAddr>,
    local_terminating: Vec<BackendAddr>,
    /// `svc_flags::TERMINATING_FALLBACK` when `cluster` / `local` holds serving+terminating
    /// endpoints because none is ready.
    cluster_fallback: u32,
    local_fallback: u32,
}

impl EndpointSets {
    fn new(candidates: &[(BackendAddr, &EndpointView)], node: &NodeView) -> Self {
        let zone = node.zone.filter(|zone| {
            let mut ready = candidates.iter().filter(|(_, ep)| ep.ready).peekable();
            ready.peek().is_some()
                && candidates
                    .iter()
                    .filter(|(_, ep)| ep.ready)
                    .all(|(_, ep)| !ep.zone_hints.is_empty())
                && candidates
                    .iter()
                    .any(|(_, ep)| ep.ready && ep.zone_hints.iter().any(|h| h == zone))
        });
        let mut cluster: Vec<BackendAddr> = candidates
            .iter()
            .filter(|(_, ep)| ep.ready)
            .filter(|(_, ep)| zone.is_none_or(|z| ep.zone_hints.iter().any(|h| h == z)))
            .map(|(b, _)| *b)
            .collect();
        cluster.sort();
        cluster.dedup();
        if cluster.is_empty() {
            cluster = usable(candidates, |_| true);
        }
        let local = usable(candidates, |ep| node.is_local(ep));
        let fallback = |set: &[BackendAddr], filter: &dyn Fn(&EndpointView) -> bool| {
            let any_ready = candidates.iter().any(|(_, ep)| filter(ep) && ep.ready);
            if !set.is_empty() && !any_ready {
                svc_flags::TERMINATING_FALLBACK
            } else {
                0
            }
        };
        Self {
            cluster_fallback: fallback(&cluster, &|_| true),
            local_fallback: fallback(&local, &|ep| node.is_local(ep)),
            cluster_terminating: draining(candidates, |_| true, &cluster),
            local_terminating: draining(candidates, |ep| node.is_local(ep), &local),
            cluster,
            local,
        }
    }

    /// Whether the service port has a usable endpoint anywhere (the cluster set is never
    /// emptied by topology).
    fn any(&self) -> bool {
        !self.cluster.is_empty()
    }
}

/// The entries one service port wants.
fn port_entries(
    view: &ServiceView,
    port: &PortView,
    sets: &EndpointSets,
    nodeport_addresses: &[Ipv4Addr],
    object: &str,
) -> Vec<Wanted> {
    let name = if port.name.is_empty() {
        format!("{}/{}", view.namespace, view.name)
    } else {
        format!("{}/{}:{}", view.namespace, view.name, port.name)
    };
    let (affinity_flag, affinity_timeout_s) = match view.affinity_timeout_s {
        Some(t) => (svc_flags::AFFINITY, t),
        None => (0, 0),
    };
    let entry =
        |backends: &[BackendAddr], terminating: &[BackendAddr], flags: u32| DesiredService {
            name: name.clone(),
            backends: backends.to_vec(),
            terminating: terminating.to_vec(),
            flags: flags | affinity_flag,
            affinity_timeout_s,
            source_ranges: Vec::new(),
        };
    // DROP rather than REJECT when a Local policy emptied an otherwise usable service.
    let local_empty = if sets.local.is_empty() && sets.any() {
        svc_flags::DROP_IF_EMPTY
    } else {
        0
    };
    let mut out = Vec::new();

    let cluster_ip_entry = if view.itp_local {
        entry(
            &sets.local,
            &sets.local_terminating,
            svc_flags::CLUSTER_IP | svc_flags::ITP_LOCAL | local_empty | sets.local_fallback,
        )
    } else {
        entry(
            &sets.cluster,
            &sets.cluster_terminating,
            svc_flags::CLUSTER_IP | sets.cluster_fallback,
        )
    };
    for ip in &view.cluster_ips {
        out.push(Wanted {
            kind: Kind::ClusterIp,
            object: object.to_owned(),
            field: port.field.clone(),
            key: ServiceKey::external(*ip, port.port, port.protocol),
            external: cluster_ip_entry.clone(),
            internal: None,
        });
    }

    let mut external: Vec<(Kind, String, ServiceKey)> = Vec::new();
    if let Some(node_port) = port.node_port {
        for ip in nodeport_addresses {
            external.push((
                Kind::NodePort,
                format!("{}.nodePort", port.field),
                ServiceKey::external(*ip, node_port, port.protocol),
            ));
        }
    }
    for (field, ip) in &view.lb_ips {
        external.push((
            Kind::LoadBalancer,
            field.clone(),
            ServiceKey::external(*ip, port.port, port.protocol),
        ));
    }
    for (field, ip) in &view.external_ips {
        external.push((
            Kind::ExternalIp,
            field.clone(),
            ServiceKey::external(*ip, port.port, port.protocol),
        ));
    }
    for (kind, field, key) in external {
        let ranges = match (&view.source_ranges, kind) {
            (Some(r), Kind::LoadBalancer) => Some(r),
            _ => None,
        };
        let range_flag = if ranges.is_some() {
            svc_flags::SOURCE_RANGES
        } else {
            0
        };
        let (mut ext, internal) = if view.etp_local {
            (
                entry(
                    &sets.local,
                    &sets.local_terminating,
                    kind.flag()
                        | svc_flags::ETP_LOCAL
                        | svc_flags::TWO_SCOPES
                        | local_empty
                        | range_flag
                        | sets.local_fallback,
                ),
                Some(entry(
                    &sets.cluster,
                    &sets.cluster_terminating,
                    kind.flag() | sets.cluster_fallback,
                )),
            )
        } else {
            (
                entry(
                    &sets.cluster,
                    &sets.cluster_terminating,
                    kind.flag() | range_flag | sets.cluster_fallback,
                ),
                None,
            )
        };
        if let Some(r) = ranges {
            ext.source_ranges = r.clone();
        }
        out.push(Wanted {
            kind,
            object: object.to_owned(),
            field,
            key,
            external: ext,
            internal,
        });
    }
    out
}

/// Where issues go, and which object they are about.
struct Ctx<'a> {
    object: String,
    issues: &'a mut Vec<Issue>,
}

impl Ctx<'_> {
    fn issue(&mut self, field: &str, message: impl Into<String>) {
        self.issues.push(Issue {
            object: self.object.clone(),
            field: field.to_owned(),
            message: message.into(),
        });
    }
}

/// The parts of a Service this translation uses, validated.
struct ServiceView {
    namespace: String,
    name: String,
    cluster_ips: Vec<Ipv4Addr>,
    ports: Vec<PortView>,
    /// `(field, address)`, deduplicated.
    external_ips: Vec<(String, Ipv4Addr)>,
    /// LB ingress IPs to program (`(field, address)`, deduplicated); empty unless type
    /// LoadBalancer.
    lb_ips: Vec<(String, Ipv4Addr)>,
    /// `Some` when `loadBalancerSourceRanges` is non-empty: the valid IPv4 ranges.
    source_ranges: Option<Vec<(Ipv4Addr, u8)>>,
    etp_local: bool,
    itp_local: bool,
    /// `Some(timeout)` with sessionAffinity ClientIP.
    affinity_timeout_s: Option<u32>,
    /// `(field, port)` for eTP Local LoadBalancer services.
    health_check_node_port: Option<(String, u16)>,
}

struct PortView {
    /// `spec.ports[i]`, for issues.
    field: String,
    /// Empty when unnamed.
    name: String,
    port: u16,
    protocol: Protocol,
    /// Only for types NodePort and LoadBalancer.
    node_port: Option<u16>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SvcType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// Validates a Service, or returns `None` when it gets nothing (ignored or unusable).
fn service_view(svc: &Service, ctx: &mut Ctx) -> Option<ServiceView> {
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return None;
    }
    let Some(name) = svc.metadata.name.clone().filter(|n| !n.is_empty()) else {
        ctx.issue("metadata.name", "missing; the service is skipped");
        return None;
    };
    let Some(spec) = &svc.spec else {
        ctx.issue("spec", "missing; the service is skipped");
        return None;
    };
    let type_ = match spec.type_.as_deref() {
        None | Some("ClusterIP") => SvcType::ClusterIp,
        Some("NodePort") => SvcType::NodePort,
        Some("LoadBalancer") => SvcType::LoadBalancer,
        Some("ExternalName") => return None,
        Some(other) => {
            ctx.issue(
                "spec.type",
                format!("unknown service type {other:?}; the service is skipped"),
            );
            return None;
        }
    };
    let cluster_ips = cluster_ips(spec, ctx)?;
    let ports = service_ports(spec, type_ != SvcType::ClusterIp, ctx);
    let external_ips = address_list(
        spec.external_ips.iter().flatten().map(String::as_str),
        "spec.externalIPs",
        ctx,
    );
    let lb_ips = if type_ == SvcType::LoadBalancer {
        lb_ingress_ips(svc, ctx)
    } else {
        Vec::new()
    };
    let source_ranges = source_ranges(spec, ctx);
    let etp_local = traffic_policy(
        spec.external_traffic_policy.as_deref(),
        "spec.externalTrafficPolicy",
        ctx,
    );
    let itp_local = traffic_policy(
        spec.internal_traffic_policy.as_deref(),
        "spec.internalTrafficPolicy",
        ctx,
    );
    let affinity_timeout_s = affinity(spec, ctx);
    let health_check_node_port = match spec.health_check_node_port {
        Some(p) if p != 0 && etp_local && type_ == SvcType::LoadBalancer => {
            parse_port(Some(p), "spec.healthCheckNodePort", ctx)
                .map(|p| ("spec.healthCheckNodePort".to_owned(), p))
        }
        _ => None,
    };
    Some(ServiceView {
        namespace: namespace(&svc.metadata).to_owned(),
        name,
        cluster_ips,
        ports,
        external_ips,
        lb_ips,
        source_ranges,
        etp_local,
        itp_local,
        affinity_timeout_s,
        health_check_node_port,
    })
}

/// `Local` -> true; `Cluster` or unset -> false; anything else is an issue and reads as
/// `Cluster` (the API default).
fn traffic_policy(value: Option<&str>, field: &str, ctx: &mut Ctx) -> bool {
    match value {
        Some("Local") => true,
        None | Some("" | "Cluster") => false,
        Some(other) => {
            ctx.issue(
                field,
                format!(
                    "unknown traffic policy {other:?} (expected Cluster or Local); Cluster is used"
                ),
            );
            false
        }
    }
}

/// The ClientIP affinity timeout, or `None` without affinity.
fn affinity(spec: &ServiceSpec, ctx: &mut Ctx) -> Option<u32> {
    match spec.session_affinity.as_deref() {
        None | Some("" | "None") => return None,
        Some("ClientIP") => {}
        Some(other) => {
            ctx.issue(
                "spec.sessionAffinity",
                format!(
                    "unknown session affinity {other:?} (expected None or ClientIP); None is used"
                ),
            );
            return None;
        }
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match timeout {
        None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
        Some(t) => match u32::try_from(t) {
            Ok(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => Some(t),
            _ => {
                ctx.issue(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!(
                        "invalid timeout {t} (must be 1-{MAX_AFFINITY_TIMEOUT_S}); \
                         {DEFAULT_AFFINITY_TIMEOUT_S} is used"
                    ),
                );
                Some(DEFAULT_AFFINITY_TIMEOUT_S)
            }
        },
    }
}

/// IPv4 addresses of a list field, deduplicated (first occurrence kept); IPv6 ones are
/// skipped silently (dual-stack), invalid ones are issues.
fn address_list<'s>(
    values: impl Iterator<Item = &'s str>,
    field: &str,
    ctx: &mut Ctx,
) -> Vec<(String, Ipv4Addr)> {
    let mut out: Vec<(String, Ipv4Addr)> = Vec::new();
    for (i, value) in values.enumerate() {
        let field = format!("{field}[{i}]");
        match parse_ip(value) {
            Ip::V4(ip) => {
                if !out.iter().any(|(_, o)| *o == ip) {
                    out.push((field, ip));
                }
            }
            Ip::V6 => {}
            Ip::Empty => ctx.issue(&field, "empty address; skipped"),
            Ip::Invalid(why) => {
                ctx.issue(
                    &field,
                    format!("invalid IPv4 address {value:?}{why}; skipped"),
                );
            }
        }
    }
    out
}

/// The LB ingress IPs to program: `ip` set, IPv4, `ipMode` not `Proxy`.
fn lb_ingress_ips(svc: &Service, ctx: &mut Ctx) -> Vec<(String, Ipv4Addr)> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    let mut out: Vec<(String, Ipv4Addr)> = Vec::new();
    for (i, ing) in ingress.iter().enumerate() {
        // Hostname-only ingress: nothing to match packets against.
        let Some(value) = ing.ip.as_deref() else {
            continue;
        };
        let field = format!("status.loadBalancer.ingress[{i}].ip");
        let ip = match parse_ip(value) {
            Ip::V4(ip) => ip,
            Ip::V6 | Ip::Empty => continue,
            Ip::Invalid(why) => {
                ctx.issue(
                    &field,
                    format!("invalid IPv4 address {value:?}{why}; skipped"),
                );
                continue;
            }
        };
        if ing.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        if !out.iter().any(|(_, o)| *o == ip) {
            out.push((field, ip));
        }
    }
    out
}

/// `Some(valid IPv4 ranges)` when `loadBalancerSourceRanges` is non-empty (see the module
/// docs: invalid entries are issues and left out, failing closed).
fn source_ranges(spec: &ServiceSpec, ctx: &mut Ctx) -> Option<Vec<(Ipv4Addr, u8)>> {
    let listed = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default();
    if listed.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for (i, value) in listed.iter().enumerate() {
        match parse_cidr(value.trim()) {
            Ok(Cidr::V4(net, prefix)) => out.push((net, prefix)),
            Ok(Cidr::V6) => {}
            Err(reason) => ctx.issue(
                &format!("spec.loadBalancerSourceRanges[{i}]"),
                format!(
                    "{value:?} is not a CIDR ({reason}); left out, so the sources it names are \
                     dropped"
                ),
            ),
        }
    }
    out.sort();
    out.dedup();
    Some(out)
}

/// The IPv4 cluster IPs: `spec.clusterIPs`, or `spec.clusterIP` when that list is empty.
/// `None` for a headless service.
fn cluster_ips(spec: &ServiceSpec, ctx: &mut Ctx) -> Option<Vec<Ipv4Addr>> {
    let listed: Vec<(String, &str)> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        _ => spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_owned(), ip.as_str()))
            .collect(),
    };
    if listed.iter().any(|(_, ip)| *ip == "None") {
        return None;
    }
    let mut out = Vec::new();
    for (field, ip) in listed {
        match parse_ip(ip) {
            // Not allocated yet: nothing to program.
            Ip::Empty => {}
            // Dual-stack: the IPv6 family is not handled by this datapath.
            Ip::V6 => {}
            Ip::V4(ip) => out.push(ip),
            Ip::Invalid(why) => ctx.issue(&field, format!("invalid IPv4 address {ip:?}{why}")),
        }
    }
    out.sort();
    out.dedup();
    Some(out)
}

fn service_ports(spec: &ServiceSpec, node_ports: bool, ctx: &mut Ctx) -> Vec<PortView> {
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        ctx.issue("spec.ports", "no ports; the service is skipped");
    }
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let ServicePort {
            name,
            port,
            protocol,
            node_port,
            ..
        } = p;
        let Some(protocol) = parse_protocol(protocol.as_deref(), &format!("{field}.protocol"), ctx)
        else {
            continue;
        };
        let Some(port) = parse_port(Some(*port), &format!("{field}.port"), ctx) else {
            continue;
        };
        // 0/unset: not allocated (e.g. allocateLoadBalancerNodePorts: false).
        let node_port = match node_port {
            Some(np) if node_ports && *np != 0 => match u16::try_from(*np) {
                Ok(np) => Some(np),
                Err(_) => {
                    ctx.issue(
                            &format!("{field}.nodePort"),
                            format!("invalid port {np} (must be 1-65535); no NodePort is served for this port"),
                        );
                    None
                }
            },
            _ => None,
        };
        out.push(PortView {
            field,
            name: name.clone().unwrap_or_default(),
            port,
            protocol,
            node_port,
        });
    }
    out
}
/// One EndpointSlice of a service, validated.
struct SliceView {
    /// By `(name, protocol)`: a hash lookup, so a slice with 10^5 ports stays linear.
    ports: HashMap<(String, Protocol), SlicePort>,
    endpoints: Vec<EndpointView>,
}

struct SlicePort {
    port: u16,
    protocol: Protocol,
}

/// An endpoint with everything the endpoint filters need.
#[derive(Clone, Debug)]
struct EndpointView {
    ip: Ipv4Addr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node_name: Option<String>,
    /// `hints.forZones[].name`.
    zone_hints: Vec<String>,
}

fn slice_view(slice: &EndpointSlice, ctx: &mut Ctx) -> SliceView {
    let mut ports: HashMap<(String, Protocol), SlicePort> = HashMap::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        let EndpointPort {
            name,
            port,
            protocol,
            ..
        } = p;
        let Some(protocol) = parse_protocol(protocol.as_deref(), &format!("{field}.protocol"), ctx)
        else {
            continue;
        };
        let Some(port) = parse_port(*port, &format!("{field}.port"), ctx) else {
            continue;
        };
        let name = name.clone().unwrap_or_default();
        if ports.contains_key(&(name.clone(), protocol)) {
            ctx.issue(
                &field,
                format!("duplicate port name {name:?} for {protocol}; the first one is used"),
            );
            continue;
        }
        // The key's name is empty when unnamed.
        ports.insert((name, protocol), SlicePort { port, protocol });
    }
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        if let Some(view) = endpoint_view(ep, &format!("endpoints[{i}]"), ctx) {
            endpoints.push(view);
        }
    }
    SliceView { ports, endpoints }
}

fn endpoint_view(ep: &Endpoint, field: &str, ctx: &mut Ctx) -> Option<EndpointView> {
    let Some(addr) = ep.addresses.first() else {
        ctx.issue(
            &format!("{field}.addresses"),
            "no address; the endpoint is skipped",
        );
        return None;
    };
    let ip = match parse_ip(addr) {
        Ip::V4(ip) => ip,
        Ip::Empty | Ip::V6 => {
            ctx.issue(
                &format!("{field}.addresses[0]"),
                format!("{addr:?} is not an IPv4 address"),
            );
            return None;
        }
        Ip::Invalid(why) => {
            ctx.issue(
                &format!("{field}.addresses[0]"),
                format!("invalid IPv4 address {addr:?}{why}"),
            );
            return None;
        }
    };
    let conditions = ep.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    Some(EndpointView {
        ip,
        ready,
        // The v1 API: a nil `serving` means true (not "same as ready"), as kube-proxy reads it.
        serving: conditions.and_then(|c| c.serving).unwrap_or(true),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        node_name: ep.node_name.clone(),
        zone_hints: ep
            .hints
            .as_ref()
            .and_then(|h| h.for_zones.as_ref())
            .into_iter()
            .flatten()
            .map(|z| z.name.clone())
            .filter(|z| !z.is_empty())
            .collect(),
    })
}

/// The endpoints of one service port across all of the service's slices: each slice's port
/// with the same name and protocol gives that slice's endpoints their port number.
fn port_endpoints<'a>(
    slices: &'a [SliceView],
    port: &PortView,
) -> Vec<(BackendAddr, &'a EndpointView)> {
    let mut out = Vec::new();
    for slice in slices {
        let Some(sp) = slice.ports.get(&(port.name.clone(), port.protocol)) else {
            continue;
        };
        for ep in &slice.endpoints {
            out.push((
                BackendAddr {
                    ip: ep.ip,
                    port: sp.port,
                    protocol: sp.protocol,
                },
                ep,
            ));
        }
    }
    out
}

/// Applies the endpoint-choice rule to the candidates that pass `filter` (all of them for
/// ClusterIP; only this node's for a Local traffic policy): ready ones, or if none is ready,
/// serving+terminating ones. Sorted and deduplicated; an address listed more than once (a
/// slice being replaced) counts with its best condition.
fn usable(
    candidates: &[(BackendAddr, &EndpointView)],
    filter: impl Fn(&EndpointView) -> bool,
) -> Vec<BackendAddr> {
    let considered = || candidates.iter().filter(|(_, ep)| filter(ep));
    let mut out: Vec<BackendAddr> = considered()
        .filter(|(_, ep)| ep.ready)
        .map(|(b, _)| *b)
        .collect();
    if out.is_empty() {
        out = considered()
            .filter(|(_, ep)| ep.serving && ep.terminating)
            .map(|(b, _)| *b)
            .collect();
    }
    out.sort();
    out.dedup();
    out
}

/// The serving+terminating candidates passing `filter` that are not in `chosen` (the set
/// [`usable`] or topology picked): kept programmed, in no slot, while they drain. Sorted and
/// deduplicated.
fn draining(
    candidates: &[(BackendAddr, &EndpointView)],
    filter: impl Fn(&EndpointView) -> bool,
    chosen: &[BackendAddr],
) -> Vec<BackendAddr> {
    let mut out: Vec<BackendAddr> = candidates
        .iter()
        .filter(|(_, ep)| filter(ep) && ep.serving && ep.terminating)
        // `chosen` is sorted: no quadratic cost with 10^4 endpoints.
        .filter(|(b, _)| chosen.binary_search(b).is_err())
        .map(|(b, _)| *b)
        .collect();
    out.sort();
    out.dedup();
    out
}

enum Ip {
    Empty,
    V4(Ipv4Addr),
    V6,
    /// With an explanation suffix (may be empty).
    Invalid(&'static str),
}

/// Parses an address like kube-proxy's `ParseIPSloppy`: dotted decimal with 1 to 3 digits per
/// octet, leading zeros read as decimal. Anything with a `:` is treated as IPv6 (validated
/// with std, which is strict as Go's parser is for IPv6).
fn parse_ip(s: &str) -> Ip {
    if s.is_empty() {
        return Ip::Empty;
    }
    if s.contains(':') {
        return match s.parse::<std::net::Ipv6Addr>() {
            Ok(_) => Ip::V6,
            Err(_) => Ip::Invalid(""),
        };
    }
    match parse_octets(s) {
        None => Ip::Invalid(""),
        Some(ip) if ip.is_unspecified() => Ip::Invalid(" (unspecified address)"),
        Some(ip) => Ip::V4(ip),
    }
}

/// Dotted decimal, 1 to 3 digits per octet, leading zeros read as decimal; 0.0.0.0 allowed.
fn parse_octets(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse::<u8>().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

/// Protocol of a port; the API default is TCP.
fn parse_protocol(p: Option<&str>, field: &str, ctx: &mut Ctx) -> Option<Protocol> {
    match p {
        None | Some("") => Some(Protocol::Tcp),
        Some(p) => match p.parse() {
            Ok(p) => Some(p),
            Err(e) => {
                ctx.issue(field, format!("{e}; the port is skipped"));
                None
            }
        },
    }
}

fn parse_port(p: Option<i32>, field: &str, ctx: &mut Ctx) -> Option<u16> {
    match p {
        None => {
            ctx.issue(field, "missing; the port is skipped");
            None
        }
        Some(p) => match u16::try_from(p) {
            Ok(p) if p != 0 => Some(p),
            _ => {
                ctx.issue(
                    field,
                    format!("invalid port {p} (must be 1-65535); the port is skipped"),
                );
                None
            }
        },
    }
}

/// The namespace an object is in; objects without one are in `default`, as the API server
/// (and the manifest loader) would place them.
fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|ns| !ns.is_empty())
        .unwrap_or("default")
}

/// Sort key: `(namespace, name)`.
fn object_id(meta: &ObjectMeta) -> (&str, &str) {
    (namespace(meta), meta.name.as_deref().unwrap_or_default())
}

fn display_id(meta: &ObjectMeta) -> String {
    match meta.name.as_deref().filter(|n| !n.is_empty()) {
        Some(name) => format!("{}/{name}", namespace(meta)),
        None => format!("{}/<unnamed>", namespace(meta)),
    }
}

/// The node's own IPv4 addresses from its Node object (InternalIP first).
pub fn node_addresses(node: &k8s_openapi::api::core::v1::Node) -> Vec<Ipv4Addr> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, ServiceStatus,
        SessionAffinityConfig,
    };
    use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointHints, ForZone};
    use std::collections::BTreeMap;

    use proxy_common::svc_flags::{
        AFFINITY, CLUSTER_IP, DROP_IF_EMPTY, ETP_LOCAL, EXTERNAL_IP, ITP_LOCAL, LOAD_BALANCER,
        NODE_PORT, SOURCE_RANGES, TWO_SCOPES,
    };

    /// The node every table case runs on.
    const NODE: &str = "node-a";
    const ZONE: &str = "zone-a";
    /// The node addresses NodePorts are served on in the table cases.
    const NPA: [&str; 2] = ["192.168.0.10", "192.168.1.10"];

    // ---- fixtures -------------------------------------------------------------------------

    struct SvcB(Service);

    /// A ClusterIP service `ns/name` with no IPs and no ports yet.
    fn svc(ns: &str, name: &str) -> SvcB {
        SvcB(Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec::default()),
            status: None,
        })
    }

    impl SvcB {
        fn spec(&mut self) -> &mut ServiceSpec {
            self.0.spec.get_or_insert_with(Default::default)
        }
        fn cluster_ip(mut self, ip: &str) -> Self {
            self.spec().cluster_ip = Some(ip.into());
            self
        }
        fn cluster_ips(mut self, ips: &[&str]) -> Self {
            self.spec().cluster_ips = Some(ips.iter().map(|s| s.to_string()).collect());
            self
        }
        fn type_(mut self, t: &str) -> Self {
            self.spec().type_ = Some(t.into());
            self
        }
        /// A TCP port; `name` "" leaves it unnamed.
        fn port(self, name: &str, port: i32) -> Self {
            self.port_proto(name, port, None)
        }
        fn port_proto(mut self, name: &str, port: i32, protocol: Option<&str>) -> Self {
            let p = ServicePort {
                name: (!name.is_empty()).then(|| name.into()),
                port,
                protocol: protocol.map(Into::into),
                // Deliberately wrong: the endpoint port must come from the slice.
                target_port: Some(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1),
                ),
                ..Default::default()
            };
            self.spec().ports.get_or_insert_with(Vec::new).push(p);
            self
        }
        fn label(mut self, k: &str, v: &str) -> Self {
            self.0
                .metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .insert(k.into(), v.into());
            self
        }
        /// A TCP port with a nodePort.
        fn node_port(mut self, name: &str, port: i32, node_port: i32) -> Self {
            self = self.port(name, port);
            let ports = self.spec().ports.as_mut().expect("port just added");
            ports.last_mut().expect("port just added").node_port = Some(node_port);
            self
        }
        fn external_ips(mut self, ips: &[&str]) -> Self {
            self.spec().external_ips = Some(ips.iter().map(|s| s.to_string()).collect());
            self
        }
        /// An LB ingress entry: `ip` (None: hostname only) and `ipMode`.
        fn ingress(mut self, ip: Option<&str>, mode: Option<&str>) -> Self {
            let status = self.0.status.get_or_insert_with(ServiceStatus::default);
            let lb = status
                .load_balancer
                .get_or_insert_with(LoadBalancerStatus::default);
            lb.ingress
                .get_or_insert_with(Vec::new)
                .push(LoadBalancerIngress {
                    ip: ip.map(Into::into),
                    hostname: ip.is_none().then(|| "lb.example".into()),
                    ip_mode: mode.map(Into::into),
                    ports: None,
                });
            self
        }
        fn source_ranges(mut self, r: &[&str]) -> Self {
            self.spec().load_balancer_source_ranges =
                Some(r.iter().map(|s| s.to_string()).collect());
            self
        }
        fn etp(mut self, p: &str) -> Self {
            self.spec().external_traffic_policy = Some(p.into());
            self
        }
        fn itp(mut self, p: &str) -> Self {
            self.spec().internal_traffic_policy = Some(p.into());
            self
        }
        fn affinity(mut self, mode: &str, timeout: Option<i32>) -> Self {
            self.spec().session_affinity = Some(mode.into());
            self.spec().session_affinity_config = timeout.map(|t| SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: Some(t),
                }),
            });
            self
        }
        fn health_check(mut self, port: i32) -> Self {
            self.spec().health_check_node_port = Some(port);
            self
        }
        fn traffic_distribution(mut self, d: &str) -> Self {
            self.spec().traffic_distribution = Some(d.into());
            self
        }
        fn build(self) -> Service {
            self.0
        }
    }

    struct SliceB(EndpointSlice);

    /// An IPv4 slice `ns/name` of service `service`.
    fn slice(ns: &str, name: &str, service: &str) -> SliceB {
        SliceB(EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(
                    SERVICE_NAME_LABEL.to_string(),
                    service.to_string(),
                )])),
                ..Default::default()
            },
            address_type: ADDRESS_TYPE_IPV4.into(),
            endpoints: vec![],
            ports: None,
        })
    }

    impl SliceB {
        fn port(self, name: &str, port: i32) -> Self {
            self.port_proto(name, Some(port), None)
        }
        fn port_proto(mut self, name: &str, port: Option<i32>, protocol: Option<&str>) -> Self {
            self.0
                .ports
                .get_or_insert_with(Vec::new)
                .push(EndpointPort {
                    name: (!name.is_empty()).then(|| name.into()),
                    port,
                    protocol: protocol.map(Into::into),
                    app_protocol: None,
                });
            self
        }
        fn ep(mut self, e: EpB) -> Self {
            self.0.endpoints.push(e.0);
            self
        }
        /// Ready endpoints with these addresses.
        fn ready(self, ips: &[&str]) -> Self {
            ips.iter().fold(self, |s, ip| s.ep(ep(ip)))
        }
        fn address_type(mut self, t: &str) -> Self {
            self.0.address_type = t.into();
            self
        }
        fn build(self) -> EndpointSlice {
            self.0
        }
    }

    struct EpB(Endpoint);

    /// An endpoint with no conditions (which the API reads as ready).
    fn ep(ip: &str) -> EpB {
        EpB(Endpoint {
            addresses: vec![ip.into()],
            ..Default::default()
        })
    }

    impl EpB {
        fn conditions(
            mut self,
            ready: Option<bool>,
            serving: Option<bool>,
            terminating: Option<bool>,
        ) -> Self {
            self.0.conditions = Some(EndpointConditions {
                ready,
                serving,
                terminating,
            });
            self
        }
        /// What the EndpointSlice controller writes for a terminating pod still serving.
        fn terminating_serving(self) -> Self {
            self.conditions(Some(false), Some(true), Some(true))
        }
        fn not_ready(self) -> Self {
            self.conditions(Some(false), Some(false), Some(false))
        }
        fn node(mut self, node: &str) -> Self {
            self.0.node_name = Some(node.into());
            self.0.zone = Some("zone-a".into());
            self
        }
        fn hints(mut self, zones: &[&str]) -> Self {
            self.0.hints = Some(EndpointHints {
                for_zones: Some(
                    zones
                        .iter()
                        .map(|z| ForZone {
                            name: z.to_string(),
                        })
                        .collect(),
                ),
                for_nodes: None,
            });
            self
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test IP")
    }

    fn key(ip_: &str, port: u16, protocol: Protocol) -> ServiceKey {
        ServiceKey::external(ip(ip_), port, protocol)
    }

    fn tcp(ip_: &str, port: u16) -> BackendAddr {
        BackendAddr {
            ip: ip(ip_),
            port,
            protocol: Protocol::Tcp,
        }
    }

    /// A ClusterIP entry.
    fn ds(name: &str, backends: &[BackendAddr]) -> DesiredService {
        dsf(name, backends, CLUSTER_IP)
    }

    fn dsf(name: &str, backends: &[BackendAddr], flags: u32) -> DesiredService {
        DesiredService::new(name, backends.to_vec(), flags)
    }

    fn with_affinity(mut d: DesiredService, t: u32) -> DesiredService {
        d.flags |= AFFINITY;
        d.affinity_timeout_s = t;
        d
    }

    /// `d` with serving+terminating endpoints kept for established flows.
    fn with_draining(mut d: DesiredService, t: &[BackendAddr]) -> DesiredService {
        d.terminating = t.to_vec();
        d
    }

    fn with_ranges(mut d: DesiredService, r: &[(&str, u8)]) -> DesiredService {
        d.source_ranges = r.iter().map(|(a, p)| (ip(a), *p)).collect();
        d
    }

    /// The entries of an external address under eTP Local: (external key, local-only
    /// entry) and (internal key, cluster-wide entry).
    fn local_pair(
        k: ServiceKey,
        name: &str,
        kind: u32,
        local: &[BackendAddr],
        all: &[BackendAddr],
        extra: u32,
    ) -> [(ServiceKey, DesiredService); 2] {
        [
            (k, dsf(name, local, kind | ETP_LOCAL | TWO_SCOPES | extra)),
            (k.internal(), dsf(name, all, kind)),
        ]
    }

    /// NodePort entries on every address in `NPA`.
    fn node_ports(port: u16, d: DesiredService) -> Vec<(ServiceKey, DesiredService)> {
        NPA.iter().map(|a| (key(a, port, TCP), d.clone())).collect()
    }

    fn issue(object: &str, field: &str, message: &str) -> Issue {
        Issue {
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    struct Case {
        name: &'static str,
        input: (Vec<Service>, Vec<EndpointSlice>),
        expected: Translation,
    }

    /// `cluster_ips` defaults to the addresses of the expected ClusterIP entries; override
    /// with [`Translation::with_cluster_ips`].
    fn expect(desired: Vec<(ServiceKey, DesiredService)>, issues: Vec<Issue>) -> Translation {
        let desired: Desired = desired.into_iter().collect();
        Translation {
            cluster_ips: desired
                .iter()
                .filter(|(_, d)| d.flags & CLUSTER_IP != 0)
                .map(|(k, _)| k.ip)
                .collect(),
            desired,
            issues,
            health_checks: BTreeMap::new(),
        }
    }

    impl Translation {
        fn with_cluster_ips(mut self, ips: &[&str]) -> Self {
            self.cluster_ips = ips.iter().map(|s| ip(s)).collect();
            self
        }
        fn with_health_check(mut self, port: u16, service: &str, n: usize) -> Self {
            self.health_checks.insert(
                port,
                HealthCheck {
                    service: service.into(),
                    local_endpoints: n,
                },
            );
            self
        }
    }

    fn run(services: &[Service], slices: &[EndpointSlice]) -> Translation {
        let npa: Vec<Ipv4Addr> = NPA.iter().map(|s| ip(s)).collect();
        translate(&Input {
            services,
            slices,
            node_name: NODE,
            node_zone: Some(ZONE),
            nodeport_addresses: &npa,
        })
    }

    const TCP: Protocol = Protocol::Tcp;
    const UDP: Protocol = Protocol::Udp;

    fn cases() -> Vec<Case> {
        vec![
            Case {
                name: "nothing",
                input: (vec![], vec![]),
                expected: expect(vec![], vec![]),
            },
            Case {
                name: "one service, one slice, endpoint port from the slice not targetPort",
                input: (
                    vec![
                        svc("default", "web")
                            .cluster_ip("10.96.0.10")
                            .port("http", 80)
                            .build(),
                    ],
                    vec![
                        slice("default", "web-abc", "web")
                            .port("http", 8080)
                            .ready(&["10.0.0.2", "10.0.0.1"])
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![(
                        key("10.96.0.10", 80, TCP),
                        ds(
                            "default/web:http",
                            &[tcp("10.0.0.1", 8080), tcp("10.0.0.2", 8080)],
                        ),
                    )],
                    vec![],
                ),
            },
            Case {
                name: "ports matched by name; unnamed matches unnamed only",
                input: (
                    vec![
                        svc("default", "multi")
                            .cluster_ip("10.96.0.11")
                            .port("http", 80)
                            .port("metrics", 9090)
                            .build(),
                        svc("default", "plain")
                            .cluster_ip("10.96.0.12")
                            .port("", 53)
                            .build(),
                    ],
                    vec![
                        slice("default", "multi-1", "multi")
                            .port("metrics", 9100)
                            .port("http", 8080)
                            .port("other", 7000)
                            .ready(&["10.0.0.1"])
                            .build(),
                        // Unnamed slice port: matches `plain`'s unnamed port, not a named one.
                        slice("default", "plain-1", "plain")
                            .port("", 5353)
                            .port("dns", 1)
                            .ready(&["10.0.0.3"])
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![
                        (
                            key("10.96.0.11", 80, TCP),
                            ds("default/multi:http", &[tcp("10.0.0.1", 8080)]),
                        ),
                        (
                            key("10.96.0.11", 9090, TCP),
                            ds("default/multi:metrics", &[tcp("10.0.0.1", 9100)]),
                        ),
                        (
                            key("10.96.0.12", 53, TCP),
                            ds("default/plain", &[tcp("10.0.0.3", 5353)]),
                        ),
                    ],
                    vec![],
                ),
            },
            Case {
                name: "service port with no matching slice port has no backends",
                input: (
                    vec![
                        svc("default", "web")
                            .cluster_ip("10.96.0.10")
                            .port("http", 80)
                            .build(),
                    ],
                    vec![
                        slice("default", "web-1", "web")
                            .port("https", 8443)
                            .ready(&["10.0.0.1"])
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![(key("10.96.0.10", 80, TCP), ds("default/web:http", &[]))],
                    vec![],
                ),
            },
            Case {
                name: "several slices per service, duplicates merged, other namespace and service ignored",
                input: (
                    vec![
                        svc("default", "web")
                            .cluster_ip("10.96.0.10")
                            .port("http", 80)
                            .build(),
                    ],
                    vec![
                        slice("default", "web-1", "web")
                            .port("http", 8080)
                            .ready(&["10.0.0.1", "10.0.0.2"])
                            .build(),
                        slice("default", "web-2", "web")
                            .port("http", 8080)
                            .ready(&["10.0.0.3", "10.0.0.2"])
                            .build(),
                        // Different port number in another slice (mid-rollout): both kept.
                        slice("default", "web-3", "web")
                            .port("http", 8081)
                            .ready(&["10.0.0.4"])
                            .build(),
                        slice("other", "web-1", "web")
                            .port("http", 8080)
                            .ready(&["10.9.0.1"])
                            .build(),
                        slice("default", "api-1", "api")
                            .port("http", 8080)
                            .ready(&["10.9.0.2"])
                            .build(),
                        // No service-name label: not kube-proxy's business.
                        {
                            let mut s = slice("default", "web-x", "web")
                                .port("http", 8080)
                                .ready(&["10.9.0.3"])
                                .build();
                            s.metadata.labels = None;
                            s
                        },
                    ],
                ),
                expected: expect(
                    vec![(
                        key("10.96.0.10", 80, TCP),
                        ds(
                            "default/web:http",
                            &[
                                tcp("10.0.0.1", 8080),
                                tcp("10.0.0.2", 8080),
                                tcp("10.0.0.3", 8080),
                                tcp("10.0.0.4", 8081),
                            ],
                        ),
                    )],
                    vec![],
                ),
            },
            Case {
                name: "ready endpoints win over terminating ones; non-ready ignored; nil ready counts as ready",
                input: (
                    vec![
                        svc("default", "web")
                            .cluster_ip("10.96.0.10")
                            .port("http", 80)
                            .build(),
                    ],
                    vec![
                        slice("default", "web-1", "web")
                            .port("http", 8080)
                            .ep(ep("10.0.0.1").conditions(None, None, None).node("node-a"))
                            .ep(ep("10.0.0.2").terminating_serving())
                            .ep(ep("10.0.0.3").not_ready())
                            .ep(ep("10.0.0.4").conditions(Some(true), Some(true), Some(false)))
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![(
                        key("10.96.0.10", 80, TCP),
                        // The terminating one is not chosen, but kept for its flows.
                        with_draining(
                            ds(
                                "default/web:http",
                                &[tcp("10.0.0.1", 8080), tcp("10.0.0.4", 8080)],
                            ),
                            &[tcp("10.0.0.2", 8080)],
                        ),
                    )],
                    vec![],
                ),
            },
            Case {
                name: "no ready endpoint in any slice: serving+terminating ones, never non-serving",
                input: (
                    vec![
                        svc("default", "web")
                            .cluster_ip("10.96.0.10")
                            .port("http", 80)
                            .build(),
                    ],
                    vec![
                        slice("default", "web-1", "web")
                            .port("http", 8080)
                            .ep(ep("10.0.0.1").terminating_serving())
                            .ep(ep("10.0.0.2").not_ready())
                            // Terminating but no longer serving.
                            .ep(ep("10.0.0.3").conditions(Some(false), Some(false), Some(true)))
                            .build(),
                        slice("default", "web-2", "web")
                            .port("http", 8080)
                            .ep(ep("10.0.0.4").terminating_serving())
                            // Nil serving reads as true.
                            .ep(ep("10.0.0.5").conditions(Some(false), None, Some(true)))
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![(
                        key("10.96.0.10", 80, TCP),
                        // Flagged: session affinity may stick to these terminating ones.
                        dsf(
                            "default/web:http",
                            &[
                                tcp("10.0.0.1", 8080),
                                tcp("10.0.0.4", 8080),
                                tcp("10.0.0.5", 8080),
                            ],
                            svc_flags::CLUSTER_IP | svc_flags::TERMINATING_FALLBACK,
                        ),
                    )],
                    vec![],
                ),
            },
            Case {
                name: "only non-serving endpoints: service kept with no backends (reject)",
                input: (
                    vec![
                        svc("default", "web")
                            .cluster_ip("10.96.0.10")
                            .port("http", 80)
                            .build(),
                    ],
                    vec![
                        slice("default", "web-1", "web")
                            .port("http", 8080)
                            .ep(ep("10.0.0.2").not_ready())
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![(key("10.96.0.10", 80, TCP), ds("default/web:http", &[]))],
                    vec![],
                ),
            },
            Case {
                name: "ready rule applies per port: a terminating endpoint on a port with no ready one",
                input: (
                    vec![
                        svc("default", "web")
                            .cluster_ip("10.96.0.10")
                            .port("http", 80)
                            .port("admin", 81)
                            .build(),
                    ],
                    vec![
                        slice("default", "web-1", "web")
                            .port("http", 8080)
                            .ready(&["10.0.0.1"])
                            .build(),
                        slice("default", "web-2", "web")
                            .port("http", 8080)
                            .port("admin", 8081)
                            .ep(ep("10.0.0.2").terminating_serving())
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![
                        (
                            key("10.96.0.10", 80, TCP),
                            with_draining(
                                ds("default/web:http", &[tcp("10.0.0.1", 8080)]),
                                &[tcp("10.0.0.2", 8080)],
                            ),
                        ),
                        (
                            key("10.96.0.10", 81, TCP),
                            dsf(
                                "default/web:admin",
                                &[tcp("10.0.0.2", 8081)],
                                svc_flags::CLUSTER_IP | svc_flags::TERMINATING_FALLBACK,
                            ),
                        ),
                    ],
                    vec![],
                ),
            },
            Case {
                name: "draining: serving+terminating endpoints left out are reported, once; never non-serving or not-ready ones, nor one ready elsewhere",
                input: (
                    vec![
                        svc("default", "web")
                            .cluster_ip("10.96.0.10")
                            .port("http", 80)
                            .build(),
                    ],
                    vec![
                        slice("default", "web-1", "web")
                            .port("http", 8080)
                            .ready(&["10.0.0.1"])
                            .ep(ep("10.0.0.2").terminating_serving())
                            // Terminating and no longer serving: its flows must stop.
                            .ep(ep("10.0.0.3").conditions(Some(false), Some(false), Some(true)))
                            .ep(ep("10.0.0.5").not_ready())
                            .ep(ep("10.0.0.6").terminating_serving())
                            .build(),
                        // A slice being replaced: 10.0.0.2 listed twice, 10.0.0.6 ready here.
                        slice("default", "web-2", "web")
                            .port("http", 8080)
                            .ep(ep("10.0.0.2").terminating_serving())
                            .ready(&["10.0.0.6"])
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![(
                        key("10.96.0.10", 80, TCP),
                        with_draining(
                            ds(
                                "default/web:http",
                                &[tcp("10.0.0.1", 8080), tcp("10.0.0.6", 8080)],
                            ),
                            &[tcp("10.0.0.2", 8080)],
                        ),
                    )],
                    vec![],
                ),
            },
            Case {
                name: "draining per scope: eTP Local entries report local terminating endpoints only, cluster-wide ones all; iTP Local likewise",
                input: (
                    vec![
                        svc("default", "e")
                            .cluster_ip("10.96.0.11")
                            .port("", 80)
                            .external_ips(&["203.0.113.20"])
                            .etp("Local")
                            .build(),
                        svc("default", "i")
                            .cluster_ip("10.96.0.12")
                            .port("", 80)
                            .itp("Local")
                            .build(),
                    ],
                    vec![
                        slice("default", "e-1", "e")
                            .port("", 8080)
                            .ep(ep("10.0.0.1").node(NODE))
                            .ep(ep("10.0.0.2").node(NODE).terminating_serving())
                            .ep(ep("10.0.0.3").node("node-b"))
                            .ep(ep("10.0.0.4").node("node-b").terminating_serving())
                            .build(),
                        slice("default", "i-1", "i")
                            .port("", 8080)
                            .ep(ep("10.0.1.1").node(NODE))
                            .ep(ep("10.0.1.2").node(NODE).terminating_serving())
                            .ep(ep("10.0.1.4").node("node-b").terminating_serving())
                            .build(),
                    ],
                ),
                expected: {
                    let all_ready = [tcp("10.0.0.1", 8080), tcp("10.0.0.3", 8080)];
                    let all_draining = [tcp("10.0.0.2", 8080), tcp("10.0.0.4", 8080)];
                    let mut d = vec![
                        (
                            key("10.96.0.11", 80, TCP),
                            with_draining(ds("default/e", &all_ready), &all_draining),
                        ),
                        (
                            key("10.96.0.12", 80, TCP),
                            with_draining(
                                dsf("default/i", &[tcp("10.0.1.1", 8080)], CLUSTER_IP | ITP_LOCAL),
                                &[tcp("10.0.1.2", 8080)],
                            ),
                        ),
                    ];
                    let [(ek, ext), (ik, int)] = local_pair(
                        key("203.0.113.20", 80, TCP),
                        "default/e",
                        EXTERNAL_IP,
                        &[tcp("10.0.0.1", 8080)],
                        &all_ready,
                        0,
                    );
                    d.push((ek, with_draining(ext, &[tcp("10.0.0.2", 8080)])));
                    d.push((ik, with_draining(int, &all_draining)));
                    expect(d, vec![])
                },
            },
            Case {
                name: "headless, ExternalName and other proxies' services are ignored",
                input: (
                    vec![
                        svc("default", "headless")
                            .cluster_ip("None")
                            .port("http", 80)
                            .build(),
                        svc("default", "headless2")
                            .cluster_ips(&["None"])
                            .cluster_ip("None")
                            .port("http", 80)
                            .build(),
                        svc("default", "ext")
                            .type_("ExternalName")
                            .port("http", 80)
                            .build(),
                        svc("default", "other")
                            .cluster_ip("10.96.0.20")
                            .port("http", 80)
                            .label(SERVICE_PROXY_NAME_LABEL, "x")
                            .build(),
                        svc("default", "web")
                            .cluster_ip("10.96.0.10")
                            .port("http", 80)
                            .build(),
                    ],
                    vec![
                        slice("default", "headless-1", "headless")
                            .port("http", 8080)
                            .ready(&["10.0.0.1"])
                            .build(),
                        slice("default", "other-1", "other")
                            .port("http", 8080)
                            .ready(&["10.0.0.1"])
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![(key("10.96.0.10", 80, TCP), ds("default/web:http", &[]))],
                    vec![],
                ),
            },
            Case {
                name: "NodePort and LoadBalancer services get their ClusterIP entries",
                input: (
                    vec![
                        svc("default", "np")
                            .type_("NodePort")
                            .cluster_ip("10.96.0.30")
                            .port("", 80)
                            .build(),
                        svc("default", "lb")
                            .type_("LoadBalancer")
                            .cluster_ip("10.96.0.31")
                            .port("", 443)
                            .build(),
                        svc("default", "weird")
                            .type_("Bogus")
                            .cluster_ip("10.96.0.32")
                            .port("", 80)
                            .build(),
                    ],
                    vec![
                        slice("default", "np-1", "np")
                            .port("", 8080)
                            .ready(&["10.0.0.1"])
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![
                        (
                            key("10.96.0.30", 80, TCP),
                            ds("default/np", &[tcp("10.0.0.1", 8080)]),
                        ),
                        (key("10.96.0.31", 443, TCP), ds("default/lb", &[])),
                    ],
                    vec![issue(
                        "Service default/weird",
                        "spec.type",
                        "unknown service type \"Bogus\"; the service is skipped",
                    )],
                ),
            },
            Case {
                name: "UDP and SCTP ports match slice ports of the same protocol only",
                input: (
                    vec![
                        svc("kube-system", "dns")
                            .cluster_ip("10.96.0.10")
                            .port_proto("dns", 53, Some("UDP"))
                            .port_proto("dns-tcp", 53, Some("TCP"))
                            .port_proto("sig", 36412, Some("SCTP"))
                            .build(),
                    ],
                    vec![
                        slice("kube-system", "dns-1", "dns")
                            .port_proto("dns", Some(5353), Some("UDP"))
                            .port_proto("dns-tcp", Some(5353), None)
                            .port_proto("sig", Some(36412), Some("TCP"))
                            .ready(&["10.0.0.5"])
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![
                        (
                            key("10.96.0.10", 53, TCP),
                            ds("kube-system/dns:dns-tcp", &[tcp("10.0.0.5", 5353)]),
                        ),
                        (
                            key("10.96.0.10", 53, UDP),
                            ds(
                                "kube-system/dns:dns",
                                &[BackendAddr {
                                    ip: ip("10.0.0.5"),
                                    port: 5353,
                                    protocol: UDP,
                                }],
                            ),
                        ),
                        (
                            key("10.96.0.10", 36412, Protocol::Sctp),
                            ds("kube-system/dns:sig", &[]),
                        ),
                    ],
                    vec![],
                ),
            },
            Case {
                name: "multiple clusterIPs: every IPv4 one, IPv6 skipped, clusterIPs preferred over clusterIP",
                input: (
                    vec![
                        svc("default", "dual")
                            .cluster_ip("10.96.0.99")
                            .cluster_ips(&["fd00::10", "10.96.0.40", "10.96.0.41"])
                            .port("http", 80)
                            .build(),
                    ],
                    vec![
                        slice("default", "dual-1", "dual")
                            .port("http", 8080)
                            .ready(&["10.0.0.1"])
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![
                        (
                            key("10.96.0.40", 80, TCP),
                            ds("default/dual:http", &[tcp("10.0.0.1", 8080)]),
                        ),
                        (
                            key("10.96.0.41", 80, TCP),
                            ds("default/dual:http", &[tcp("10.0.0.1", 8080)]),
                        ),
                    ],
                    vec![],
                ),
            },
            Case {
                name: "invalid cluster IP gives an issue; the rest is programmed",
                input: (
                    vec![
                        svc("default", "x")
                            .cluster_ip("foo")
                            .port("http", 80)
                            .build(),
                        svc("default", "y")
                            .cluster_ips(&["10.96.0.50", "10.96.0.256"])
                            .port("http", 80)
                            .build(),
                        svc("default", "z")
                            .cluster_ip("0.0.0.0")
                            .port("http", 80)
                            .build(),
                        svc("default", "web")
                            .cluster_ip("010.096.000.010")
                            .port("http", 80)
                            .build(),
                    ],
                    vec![],
                ),
                expected: expect(
                    vec![
                        (key("10.96.0.10", 80, TCP), ds("default/web:http", &[])),
                        (key("10.96.0.50", 80, TCP), ds("default/y:http", &[])),
                    ],
                    vec![
                        issue(
                            "Service default/x",
                            "spec.clusterIP",
                            "invalid IPv4 address \"foo\"",
                        ),
                        issue(
                            "Service default/y",
                            "spec.clusterIPs[1]",
                            "invalid IPv4 address \"10.96.0.256\"",
                        ),
                        issue(
                            "Service default/z",
                            "spec.clusterIP",
                            "invalid IPv4 address \"0.0.0.0\" (unspecified address)",
                        ),
                    ],
                ),
            },
            Case {
                name: "invalid ports and protocols skip that port only",
                input: (
                    vec![
                        svc("default", "web")
                            .cluster_ip("10.96.0.10")
                            .port("zero", 0)
                            .port("big", 70000)
                            .port_proto("icmp", 1, Some("ICMP"))
                            .port_proto("lower", 81, Some("tcp"))
                            .port("http", 80)
                            .build(),
                    ],
                    vec![
                        slice("default", "web-1", "web")
                            .port_proto("http", Some(-1), None)
                            .port_proto("http", None, None)
                            .port_proto("http", Some(8080), Some("QUIC"))
                            .port("lower", 8081)
                            .ready(&["10.0.0.1"])
                            .build(),
                        slice("default", "web-2", "web")
                            .port("http", 8080)
                            .ready(&["10.0.0.2"])
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![
                        (
                            key("10.96.0.10", 80, TCP),
                            ds("default/web:http", &[tcp("10.0.0.2", 8080)]),
                        ),
                        (
                            key("10.96.0.10", 81, TCP),
                            ds("default/web:lower", &[tcp("10.0.0.1", 8081)]),
                        ),
                    ],
                    vec![
                        issue(
                            "EndpointSlice default/web-1",
                            "ports[0].port",
                            "invalid port -1 (must be 1-65535); the port is skipped",
                        ),
                        issue(
                            "EndpointSlice default/web-1",
                            "ports[1].port",
                            "missing; the port is skipped",
                        ),
                        issue(
                            "EndpointSlice default/web-1",
                            "ports[2].protocol",
                            "unknown protocol \"QUIC\" (expected TCP, UDP or SCTP); the port is skipped",
                        ),
                        issue(
                            "Service default/web",
                            "spec.ports[0].port",
                            "invalid port 0 (must be 1-65535); the port is skipped",
                        ),
                        issue(
                            "Service default/web",
                            "spec.ports[1].port",
                            "invalid port 70000 (must be 1-65535); the port is skipped",
                        ),
                        issue(
                            "Service default/web",
                            "spec.ports[2].protocol",
                            "unknown protocol \"ICMP\" (expected TCP, UDP or SCTP); the port is skipped",
                        ),
                    ],
                ),
            },
            Case {
                name: "invalid endpoint addresses skip that endpoint only; IPv6 slices skipped",
                input: (
                    vec![
                        svc("default", "web")
                            .cluster_ip("10.96.0.10")
                            .port("http", 80)
                            .build(),
                    ],
                    vec![
                        slice("default", "web-1", "web")
                            .port("http", 8080)
                            .ready(&["10.0.0.1", "bogus", "fd00::1", "10.0.0.2"])
                            .ep(EpB(Endpoint::default()))
                            .build(),
                        slice("default", "web-6", "web")
                            .address_type("IPv6")
                            .port("http", 8080)
                            .ready(&["fd00::2"])
                            .build(),
                        slice("default", "web-f", "web")
                            .address_type("FQDN")
                            .port("http", 8080)
                            .ready(&["a.example"])
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![(
                        key("10.96.0.10", 80, TCP),
                        ds(
                            "default/web:http",
                            &[tcp("10.0.0.1", 8080), tcp("10.0.0.2", 8080)],
                        ),
                    )],
                    vec![
                        issue(
                            "EndpointSlice default/web-1",
                            "endpoints[1].addresses[0]",
                            "invalid IPv4 address \"bogus\"",
                        ),
                        issue(
                            "EndpointSlice default/web-1",
                            "endpoints[2].addresses[0]",
                            "\"fd00::1\" is not an IPv4 address",
                        ),
                        issue(
                            "EndpointSlice default/web-1",
                            "endpoints[4].addresses",
                            "no address; the endpoint is skipped",
                        ),
                    ],
                ),
            },
            Case {
                name: "missing metadata, missing spec, no ports, unallocated IP",
                input: (
                    vec![
                        Service::default(),
                        Service {
                            metadata: ObjectMeta {
                                name: Some("nospec".into()),
                                ..Default::default()
                            },
                            ..Default::default()
                        },
                        svc("default", "noports").cluster_ip("10.96.0.60").build(),
                        svc("default", "pending")
                            .cluster_ip("")
                            .port("http", 80)
                            .build(),
                        svc("default", "noip").port("http", 80).build(),
                    ],
                    vec![EndpointSlice::default(), {
                        let mut s = EndpointSlice::default();
                        s.metadata.labels =
                            Some(BTreeMap::from([(SERVICE_NAME_LABEL.into(), "noip".into())]));
                        s.address_type = ADDRESS_TYPE_IPV4.into();
                        s.endpoints = vec![Endpoint::default()];
                        s
                    }],
                ),
                expected: expect(
                    vec![],
                    vec![
                        issue(
                            "EndpointSlice default/<unnamed>",
                            "endpoints[0].addresses",
                            "no address; the endpoint is skipped",
                        ),
                        issue(
                            "Service default/<unnamed>",
                            "metadata.name",
                            "missing; the service is skipped",
                        ),
                        issue(
                            "Service default/noports",
                            "spec.ports",
                            "no ports; the service is skipped",
                        ),
                        issue(
                            "Service default/nospec",
                            "spec",
                            "missing; the service is skipped",
                        ),
                    ],
                )
                // noports still owns its ClusterIP: a hit on it is rejected, not passed.
                .with_cluster_ips(&["10.96.0.60"]),
            },
            Case {
                name: "two services claiming the same address and port: first by namespace/name wins",
                input: (
                    vec![
                        svc("default", "b")
                            .cluster_ip("10.96.0.70")
                            .port("http", 80)
                            .build(),
                        svc("default", "a")
                            .cluster_ip("10.96.0.70")
                            .port("http", 80)
                            .port("dup", 80)
                            .build(),
                    ],
                    vec![],
                ),
                expected: expect(
                    vec![(key("10.96.0.70", 80, TCP), ds("default/a:http", &[]))],
                    vec![
                        issue(
                            "Service default/a",
                            "spec.ports[1]",
                            "10.96.0.70:80/TCP is already used by default/a:http; this ClusterIP entry is skipped",
                        ),
                        issue(
                            "Service default/b",
                            "spec.ports[0]",
                            "10.96.0.70:80/TCP is already used by default/a:http; this ClusterIP entry is skipped",
                        ),
                    ],
                ),
            },
            Case {
                name: "NodePort: an entry on every nodeport address, cluster-wide endpoints under eTP Cluster",
                input: (
                    vec![
                        svc("default", "np")
                            .type_("NodePort")
                            .cluster_ip("10.96.1.1")
                            .node_port("http", 80, 30080)
                            .build(),
                    ],
                    vec![
                        slice("default", "np-1", "np")
                            .port("http", 8080)
                            .ep(ep("10.0.0.1").node(NODE))
                            .ep(ep("10.0.0.2").node("node-b"))
                            .build(),
                    ],
                ),
                expected: {
                    let all = [tcp("10.0.0.1", 8080), tcp("10.0.0.2", 8080)];
                    let mut d = vec![(key("10.96.1.1", 80, TCP), ds("default/np:http", &all))];
                    d.extend(node_ports(30080, dsf("default/np:http", &all, NODE_PORT)));
                    expect(d, vec![])
                },
            },
            Case {
                name: "eTP Local: external entries get local endpoints and an internal twin gets all; health check",
                input: (
                    vec![
                        svc("default", "lb")
                            .type_("LoadBalancer")
                            .cluster_ip("10.96.1.2")
                            .node_port("http", 80, 30081)
                            .external_ips(&["203.0.113.5"])
                            .ingress(Some("198.51.100.7"), None)
                            .etp("Local")
                            .health_check(32000)
                            .build(),
                    ],
                    vec![
                        slice("default", "lb-1", "lb")
                            .port("http", 8080)
                            .ep(ep("10.0.0.1").node(NODE))
                            .ep(ep("10.0.0.2").node("node-b"))
                            // Not ready on this node: neither used nor counted.
                            .ep(ep("10.0.0.3").node(NODE).not_ready())
                            .build(),
                    ],
                ),
                expected: {
                    let n = "default/lb:http";
                    let all = [tcp("10.0.0.1", 8080), tcp("10.0.0.2", 8080)];
                    let local = [tcp("10.0.0.1", 8080)];
                    let mut d = vec![(key("10.96.1.2", 80, TCP), ds(n, &all))];
                    for a in NPA {
                        d.extend(local_pair(key(a, 30081, TCP), n, NODE_PORT, &local, &all, 0));
                    }
                    d.extend(local_pair(
                        key("198.51.100.7", 80, TCP),
                        n,
                        LOAD_BALANCER,
                        &local,
                        &all,
                        0,
                    ));
                    d.extend(local_pair(
                        key("203.0.113.5", 80, TCP),
                        n,
                        EXTERNAL_IP,
                        &local,
                        &all,
                        0,
                    ));
                    expect(d, vec![]).with_health_check(32000, "default/lb", 1)
                },
            },
            Case {
                name: "eTP Local: no local endpoint drops (DROP_IF_EMPTY); none anywhere rejects",
                input: (
                    vec![
                        svc("default", "remote")
                            .cluster_ip("10.96.1.3")
                            .port("", 80)
                            .external_ips(&["203.0.113.6"])
                            .etp("Local")
                            .build(),
                        svc("default", "empty")
                            .cluster_ip("10.96.1.4")
                            .port("", 80)
                            .external_ips(&["203.0.113.7"])
                            .etp("Local")
                            .build(),
                    ],
                    vec![
                        slice("default", "remote-1", "remote")
                            .port("", 8080)
                            .ep(ep("10.0.0.2").node("node-b"))
                            .build(),
                        slice("default", "empty-1", "empty")
                            .port("", 8080)
                            .ep(ep("10.0.0.1").node(NODE).not_ready())
                            .build(),
                    ],
                ),
                expected: {
                    let remote = [tcp("10.0.0.2", 8080)];
                    let mut d = vec![
                        (key("10.96.1.3", 80, TCP), ds("default/remote", &remote)),
                        (key("10.96.1.4", 80, TCP), ds("default/empty", &[])),
                    ];
                    d.extend(local_pair(
                        key("203.0.113.6", 80, TCP),
                        "default/remote",
                        EXTERNAL_IP,
                        &[],
                        &remote,
                        DROP_IF_EMPTY,
                    ));
                    d.extend(local_pair(
                        key("203.0.113.7", 80, TCP),
                        "default/empty",
                        EXTERNAL_IP,
                        &[],
                        &[],
                        0,
                    ));
                    expect(d, vec![])
                },
            },
            Case {
                name: "eTP Local: ready/terminating rule applied to local endpoints on their own; health check counts ready only",
                input: (
                    vec![
                        svc("default", "t")
                            .type_("LoadBalancer")
                            .cluster_ip("10.96.1.5")
                            .port("", 80)
                            .external_ips(&["203.0.113.8"])
                            .etp("Local")
                            .health_check(32001)
                            .build(),
                    ],
                    vec![
                        slice("default", "t-1", "t")
                            .port("", 8080)
                            .ep(ep("10.0.0.1").node(NODE).terminating_serving())
                            .ep(ep("10.0.0.2").node("node-b"))
                            .build(),
                    ],
                ),
                expected: {
                    // Cluster-wide, the local terminating endpoint is not chosen (a ready one
                    // exists) but kept for its flows; locally it is the only usable one.
                    let draining = [tcp("10.0.0.1", 8080)];
                    let mut d = vec![(
                        key("10.96.1.5", 80, TCP),
                        with_draining(ds("default/t", &[tcp("10.0.0.2", 8080)]), &draining),
                    )];
                    let [ext, (ik, int)] = local_pair(
                        key("203.0.113.8", 80, TCP),
                        "default/t",
                        EXTERNAL_IP,
                        &[tcp("10.0.0.1", 8080)],
                        &[tcp("10.0.0.2", 8080)],
                        0,
                    );
                    // Locally only terminating ones are left: affinity to them is fine.
                    let (ek, mut e) = ext;
                    e.flags |= svc_flags::TERMINATING_FALLBACK;
                    d.push((ek, e));
                    d.push((ik, with_draining(int, &draining)));
                    expect(d, vec![]).with_health_check(32001, "default/t", 0)
                },
            },
            Case {
                name: "iTP Local: ClusterIP gets local endpoints, DROP_IF_EMPTY when only remote ones; external entries unaffected",
                input: (
                    vec![
                        svc("default", "a")
                            .type_("NodePort")
                            .cluster_ip("10.96.2.1")
                            .node_port("", 80, 30090)
                            .itp("Local")
                            .build(),
                        svc("default", "b")
                            .cluster_ip("10.96.2.2")
                            .port("", 80)
                            .itp("Local")
                            .build(),
                        svc("default", "c")
                            .cluster_ip("10.96.2.3")
                            .port("", 80)
                            .itp("Local")
                            .build(),
                    ],
                    vec![
                        slice("default", "a-1", "a")
                            .port("", 8080)
                            .ep(ep("10.0.0.1").node(NODE))
                            .ep(ep("10.0.0.2").node("node-b"))
                            .build(),
                        slice("default", "b-1", "b")
                            .port("", 8080)
                            .ep(ep("10.0.0.2").node("node-b"))
                            .build(),
                    ],
                ),
                expected: {
                    let all = [tcp("10.0.0.1", 8080), tcp("10.0.0.2", 8080)];
                    let mut d = vec![
                        (
                            key("10.96.2.1", 80, TCP),
                            dsf("default/a", &[tcp("10.0.0.1", 8080)], CLUSTER_IP | ITP_LOCAL),
                        ),
                        (
                            key("10.96.2.2", 80, TCP),
                            dsf("default/b", &[], CLUSTER_IP | ITP_LOCAL | DROP_IF_EMPTY),
                        ),
                        (
                            key("10.96.2.3", 80, TCP),
                            dsf("default/c", &[], CLUSTER_IP | ITP_LOCAL),
                        ),
                    ];
                    d.extend(node_ports(30090, dsf("default/a", &all, NODE_PORT)));
                    expect(d, vec![])
                },
            },
            Case {
                name: "LB ingress: Proxy mode, hostname and IPv6 skipped, invalid IP an issue, duplicates once; source ranges on LB entries only",
                input: (
                    vec![
                        svc("default", "lb")
                            .type_("LoadBalancer")
                            .cluster_ip("10.96.3.1")
                            .node_port("https", 443, 30443)
                            .external_ips(&["203.0.113.9", "2001:db8::9", "203.0.113.9"])
                            .ingress(Some("198.51.100.1"), Some("VIP"))
                            .ingress(Some("198.51.100.2"), Some("Proxy"))
                            .ingress(None, None)
                            .ingress(Some("2001:db8::1"), None)
                            .ingress(Some("bogus"), None)
                            .ingress(Some("198.51.100.1"), None)
                            .source_ranges(&[
                                "10.1.2.3/8",
                                " 192.168.0.0/24 ",
                                "2001:db8::/32",
                                "010.0.0.0/8",
                            ])
                            .build(),
                    ],
                    vec![
                        slice("default", "lb-1", "lb")
                            .port("https", 8443)
                            .ready(&["10.0.0.1"])
                            .build(),
                    ],
                ),
                expected: {
                    let n = "default/lb:https";
                    let all = [tcp("10.0.0.1", 8443)];
                    let mut d = vec![
                        (key("10.96.3.1", 443, TCP), ds(n, &all)),
                        (
                            key("198.51.100.1", 443, TCP),
                            with_ranges(
                                dsf(n, &all, LOAD_BALANCER | SOURCE_RANGES),
                                &[("10.0.0.0", 8), ("192.168.0.0", 24)],
                            ),
                        ),
                        (key("203.0.113.9", 443, TCP), dsf(n, &all, EXTERNAL_IP)),
                    ];
                    d.extend(node_ports(30443, dsf(n, &all, NODE_PORT)));
                    expect(
                        d,
                        vec![issue(
                            "Service default/lb",
                            "status.loadBalancer.ingress[4].ip",
                            "invalid IPv4 address \"bogus\"; skipped",
                        )],
                    )
                },
            },
            Case {
                name: "invalid source range: an issue, and the LB IP fails closed",
                input: (
                    vec![
                        svc("default", "a")
                            .type_("LoadBalancer")
                            .cluster_ip("10.96.3.2")
                            .port("", 80)
                            .ingress(Some("198.51.100.3"), None)
                            .source_ranges(&["10.0.0.0/33", "172.16.0.0/12"])
                            .build(),
                        svc("default", "b")
                            .type_("LoadBalancer")
                            .cluster_ip("10.96.3.3")
                            .port("", 80)
                            .ingress(Some("198.51.100.4"), None)
                            .source_ranges(&["nope"])
                            .build(),
                    ],
                    vec![],
                ),
                expected: expect(
                    vec![
                        (key("10.96.3.2", 80, TCP), ds("default/a", &[])),
                        (key("10.96.3.3", 80, TCP), ds("default/b", &[])),
                        (
                            key("198.51.100.3", 80, TCP),
                            with_ranges(
                                dsf("default/a", &[], LOAD_BALANCER | SOURCE_RANGES),
                                &[("172.16.0.0", 12)],
                            ),
                        ),
                        (
                            key("198.51.100.4", 80, TCP),
                            dsf("default/b", &[], LOAD_BALANCER | SOURCE_RANGES),
                        ),
                    ],
                    vec![
                        issue(
                            "Service default/a",
                            "spec.loadBalancerSourceRanges[0]",
                            "\"10.0.0.0/33\" is not a CIDR (invalid prefix length \"33\" (must be 0-32)); left out, so the sources it names are dropped",
                        ),
                        issue(
                            "Service default/b",
                            "spec.loadBalancerSourceRanges[0]",
                            "\"nope\" is not a CIDR (no /prefix-length; a single address is written like 10.0.0.1/32); left out, so the sources it names are dropped",
                        ),
                    ],
                ),
            },
            Case {
                name: "sessionAffinity ClientIP: every entry, default and explicit timeouts; bad values are issues",
                input: (
                    vec![
                        svc("default", "a")
                            .type_("NodePort")
                            .cluster_ip("10.96.4.1")
                            .node_port("", 80, 30100)
                            .etp("Local")
                            .affinity("ClientIP", None)
                            .build(),
                        svc("default", "b")
                            .cluster_ip("10.96.4.2")
                            .port("", 80)
                            .affinity("ClientIP", Some(60))
                            .build(),
                        svc("default", "c")
                            .cluster_ip("10.96.4.3")
                            .port("", 80)
                            .affinity("ClientIP", Some(0))
                            .build(),
                        svc("default", "d")
                            .cluster_ip("10.96.4.4")
                            .port("", 80)
                            .affinity("Sticky", None)
                            .build(),
                    ],
                    vec![],
                ),
                expected: {
                    let t = DEFAULT_AFFINITY_TIMEOUT_S;
                    let mut d = vec![
                        (key("10.96.4.1", 80, TCP), with_affinity(ds("default/a", &[]), t)),
                        (key("10.96.4.2", 80, TCP), with_affinity(ds("default/b", &[]), 60)),
                        (key("10.96.4.3", 80, TCP), with_affinity(ds("default/c", &[]), t)),
                        (key("10.96.4.4", 80, TCP), ds("default/d", &[])),
                    ];
                    for a in NPA {
                        let [(ek, ev), (ik, iv)] =
                            local_pair(key(a, 30100, TCP), "default/a", NODE_PORT, &[], &[], 0);
                        d.push((ek, with_affinity(ev, t)));
                        d.push((ik, with_affinity(iv, t)));
                    }
                    expect(
                        d,
                        vec![
                            issue(
                                "Service default/c",
                                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                                "invalid timeout 0 (must be 1-86400); 10800 is used",
                            ),
                            issue(
                                "Service default/d",
                                "spec.sessionAffinity",
                                "unknown session affinity \"Sticky\" (expected None or ClientIP); None is used",
                            ),
                        ],
                    )
                },
            },
            Case {
                name: "topology: endpoints hinted for this zone when every ready one is hinted; otherwise all",
                input: (
                    vec![
                        svc("default", "a")
                            .cluster_ip("10.96.5.1")
                            .port("", 80)
                            .traffic_distribution("PreferClose")
                            .build(),
                        svc("default", "b").cluster_ip("10.96.5.2").port("", 80).build(),
                        svc("default", "c").cluster_ip("10.96.5.3").port("", 80).build(),
                        svc("default", "d")
                            .cluster_ip("10.96.5.4")
                            .port("", 80)
                            .itp("Local")
                            .build(),
                        svc("default", "e").cluster_ip("10.96.5.5").port("", 80).build(),
                    ],
                    vec![
                        slice("default", "a-1", "a")
                            .port("", 8080)
                            .ep(ep("10.0.0.1").hints(&["zone-a"]))
                            .ep(ep("10.0.0.2").hints(&["zone-b"]))
                            .ep(ep("10.0.0.3").hints(&["zone-c", "zone-a"]))
                            // Not ready: its missing hints do not disable topology.
                            .ep(ep("10.0.0.4").not_ready())
                            .build(),
                        // One ready endpoint without hints: topology off.
                        slice("default", "b-1", "b")
                            .port("", 8080)
                            .ep(ep("10.0.0.1").hints(&["zone-a"]))
                            .ep(ep("10.0.0.2"))
                            .build(),
                        // Every endpoint hinted, none for this zone: topology off.
                        slice("default", "c-1", "c")
                            .port("", 8080)
                            .ep(ep("10.0.0.1").hints(&["zone-b"]))
                            .ep(ep("10.0.0.2").hints(&["zone-c"]))
                            .build(),
                        // Local policy sets are not narrowed by topology.
                        slice("default", "d-1", "d")
                            .port("", 8080)
                            .ep(ep("10.0.0.1").node(NODE).hints(&["zone-b"]))
                            .ep(ep("10.0.0.2").node("node-b").hints(&["zone-a"]))
                            .build(),
                        // Terminating fallback ignores topology.
                        slice("default", "e-1", "e")
                            .port("", 8080)
                            .ep(ep("10.0.0.1").terminating_serving().hints(&["zone-b"]))
                            .ep(ep("10.0.0.2").terminating_serving().hints(&["zone-a"]))
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![
                        (
                            key("10.96.5.1", 80, TCP),
                            ds("default/a", &[tcp("10.0.0.1", 8080), tcp("10.0.0.3", 8080)]),
                        ),
                        (
                            key("10.96.5.2", 80, TCP),
                            ds("default/b", &[tcp("10.0.0.1", 8080), tcp("10.0.0.2", 8080)]),
                        ),
                        (
                            key("10.96.5.3", 80, TCP),
                            ds("default/c", &[tcp("10.0.0.1", 8080), tcp("10.0.0.2", 8080)]),
                        ),
                        (
                            key("10.96.5.4", 80, TCP),
                            dsf("default/d", &[tcp("10.0.0.1", 8080)], CLUSTER_IP | ITP_LOCAL),
                        ),
                        (
                            key("10.96.5.5", 80, TCP),
                            dsf(
                                "default/e",
                                &[tcp("10.0.0.1", 8080), tcp("10.0.0.2", 8080)],
                                CLUSTER_IP | svc_flags::TERMINATING_FALLBACK,
                            ),
                        ),
                    ],
                    vec![],
                ),
            },
            Case {
                name: "ignored services get no external entries and no ClusterIP in the set",
                input: (
                    vec![
                        svc("default", "headless")
                            .cluster_ip("None")
                            .port("", 80)
                            .external_ips(&["203.0.113.20"])
                            .build(),
                        svc("default", "other")
                            .type_("LoadBalancer")
                            .cluster_ip("10.96.6.1")
                            .node_port("", 80, 30200)
                            .ingress(Some("198.51.100.20"), None)
                            .label(SERVICE_PROXY_NAME_LABEL, "x")
                            .build(),
                        svc("default", "ext")
                            .type_("ExternalName")
                            .port("", 80)
                            .external_ips(&["203.0.113.21"])
                            .build(),
                    ],
                    vec![],
                ),
                expected: expect(vec![], vec![]),
            },
            Case {
                name: "key conflicts: ClusterIPs first, then NodePorts, LB IPs, externalIPs",
                input: (
                    vec![
                        // Sorts first, but may not take kube-dns's ClusterIP or a NodePort.
                        svc("default", "a-evil")
                            .type_("LoadBalancer")
                            .cluster_ip("10.96.7.1")
                            .port_proto("dns", 53, Some("UDP"))
                            .external_ips(&["10.96.0.10", "192.168.0.10"])
                            .ingress(Some("192.168.1.10"), None)
                            .build(),
                        svc("default", "np1")
                            .type_("NodePort")
                            .cluster_ip("10.96.7.2")
                            .node_port("", 53, 53)
                            .build(),
                        svc("default", "np2")
                            .type_("NodePort")
                            .cluster_ip("10.96.7.3")
                            .node_port("", 80, 53)
                            .build(),
                        svc("kube-system", "dns")
                            .cluster_ip("10.96.0.10")
                            .port_proto("dns", 53, Some("UDP"))
                            .build(),
                    ],
                    vec![],
                ),
                expected: {
                    let mut d = vec![
                        (key("10.96.7.1", 53, UDP), ds("default/a-evil:dns", &[])),
                        (key("10.96.7.2", 53, TCP), ds("default/np1", &[])),
                        (key("10.96.7.3", 80, TCP), ds("default/np2", &[])),
                        (key("10.96.0.10", 53, UDP), ds("kube-system/dns:dns", &[])),
                    ];
                    d.extend(node_ports(53, dsf("default/np1", &[], NODE_PORT)));
                    // UDP: the TCP NodePort 53 does not collide with these.
                    d.push((
                        key("192.168.0.10", 53, UDP),
                        dsf("default/a-evil:dns", &[], EXTERNAL_IP),
                    ));
                    d.push((
                        key("192.168.1.10", 53, UDP),
                        dsf("default/a-evil:dns", &[], LOAD_BALANCER),
                    ));
                    expect(
                        d,
                        vec![
                            issue(
                                "Service default/np2",
                                "spec.ports[0].nodePort",
                                "192.168.0.10:53/TCP is already used by default/np1; this NodePort entry is skipped",
                            ),
                            issue(
                                "Service default/np2",
                                "spec.ports[0].nodePort",
                                "192.168.1.10:53/TCP is already used by default/np1; this NodePort entry is skipped",
                            ),
                            issue(
                                "Service default/a-evil",
                                "spec.externalIPs[0]",
                                "10.96.0.10:53/UDP is already used by kube-system/dns:dns; this externalIP entry is skipped",
                            ),
                        ],
                    )
                },
            },
            Case {
                name: "nodePort only for NodePort/LoadBalancer types; LB IPs only for LoadBalancer; bad values are issues",
                input: (
                    vec![
                        svc("default", "cip")
                            .cluster_ip("10.96.8.1")
                            .node_port("", 80, 30300)
                            .ingress(Some("198.51.100.30"), None)
                            .build(),
                        svc("default", "np")
                            .type_("NodePort")
                            .cluster_ip("10.96.8.2")
                            .node_port("", 80, 70000)
                            .ingress(Some("198.51.100.31"), None)
                            .external_ips(&["", "203.0.113.999"])
                            .etp("Sideways")
                            .itp("Nowhere")
                            .build(),
                        // allocateLoadBalancerNodePorts: false.
                        svc("default", "lb")
                            .type_("LoadBalancer")
                            .cluster_ip("10.96.8.3")
                            .port("", 80)
                            .build(),
                    ],
                    vec![],
                ),
                expected: expect(
                    vec![
                        (key("10.96.8.1", 80, TCP), ds("default/cip", &[])),
                        (key("10.96.8.2", 80, TCP), ds("default/np", &[])),
                        (key("10.96.8.3", 80, TCP), ds("default/lb", &[])),
                    ],
                    vec![
                        issue(
                            "Service default/np",
                            "spec.ports[0].nodePort",
                            "invalid port 70000 (must be 1-65535); no NodePort is served for this port",
                        ),
                        issue("Service default/np", "spec.externalIPs[0]", "empty address; skipped"),
                        issue(
                            "Service default/np",
                            "spec.externalIPs[1]",
                            "invalid IPv4 address \"203.0.113.999\"; skipped",
                        ),
                        issue(
                            "Service default/np",
                            "spec.externalTrafficPolicy",
                            "unknown traffic policy \"Sideways\" (expected Cluster or Local); Cluster is used",
                        ),
                        issue(
                            "Service default/np",
                            "spec.internalTrafficPolicy",
                            "unknown traffic policy \"Nowhere\" (expected Cluster or Local); Cluster is used",
                        ),
                    ],
                ),
            },
            Case {
                name: "health checks: eTP Local LoadBalancers only; a port used twice is an issue",
                input: (
                    vec![
                        svc("default", "a")
                            .type_("LoadBalancer")
                            .cluster_ip("10.96.9.1")
                            .port("http", 80)
                            .port("https", 443)
                            .etp("Local")
                            .health_check(32100)
                            .build(),
                        svc("default", "b")
                            .type_("LoadBalancer")
                            .cluster_ip("10.96.9.2")
                            .port("", 80)
                            .etp("Local")
                            .health_check(32100)
                            .build(),
                        // eTP Cluster: no health check even with a port set.
                        svc("default", "c")
                            .type_("LoadBalancer")
                            .cluster_ip("10.96.9.3")
                            .port("", 80)
                            .health_check(32101)
                            .build(),
                    ],
                    vec![
                        slice("default", "a-1", "a")
                            .port("http", 8080)
                            .port("https", 8443)
                            .ep(ep("10.0.0.1").node(NODE))
                            .ep(ep("10.0.0.2").node("node-b"))
                            .build(),
                    ],
                ),
                expected: expect(
                    vec![
                        (
                            key("10.96.9.1", 80, TCP),
                            ds(
                                "default/a:http",
                                &[tcp("10.0.0.1", 8080), tcp("10.0.0.2", 8080)],
                            ),
                        ),
                        (
                            key("10.96.9.1", 443, TCP),
                            ds(
                                "default/a:https",
                                &[tcp("10.0.0.1", 8443), tcp("10.0.0.2", 8443)],
                            ),
                        ),
                        (key("10.96.9.2", 80, TCP), ds("default/b", &[])),
                        (key("10.96.9.3", 80, TCP), ds("default/c", &[])),
                    ],
                    vec![issue(
                        "Service default/b",
                        "spec.healthCheckNodePort",
                        "healthCheckNodePort 32100 is already used by default/a; no health check is served for this service",
                    )],
                )
                // Like kube-proxy: distinct local ready ip:port pairs over the ports.
                .with_health_check(32100, "default/a", 2),
            },
        ]
    }

    #[test]
    fn translate_table() {
        for c in cases() {
            let (services, slices) = &c.input;
            let got = run(services, slices);
            for (k, d) in &c.expected.desired {
                assert_eq!(got.desired.get(k), Some(d), "{}: entry {k}", c.name);
            }
            assert_eq!(got.desired, c.expected.desired, "{}: desired", c.name);
            assert_eq!(got.issues, c.expected.issues, "{}: issues", c.name);
            assert_eq!(
                got.cluster_ips, c.expected.cluster_ips,
                "{}: cluster IPs",
                c.name
            );
            assert_eq!(
                got.health_checks, c.expected.health_checks,
                "{}: health checks",
                c.name
            );
        }
    }

    fn run_cached(
        t: &mut Translator,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
    ) -> Translation {
        let npa: Vec<Ipv4Addr> = NPA.iter().map(|s| ip(s)).collect();
        t.translate(&Input {
            services,
            slices,
            node_name: NODE,
            node_zone: Some(ZONE),
            nodeport_addresses: &npa,
        })
    }

    fn shared<T>(v: Vec<T>) -> Vec<Arc<T>> {
        v.into_iter().map(Arc::new).collect()
    }

    /// One translator fed every case of the table in turn (and the table again backwards,
    /// with fresh copies of the objects) gives exactly what a fresh translation gives: a
    /// result remembered from another input is never served.
    #[test]
    fn translator_agrees_with_translate_across_inputs() {
        let mut t = Translator::new();
        let mut all = cases();
        let backwards: Vec<Case> = cases().into_iter().rev().collect();
        all.extend(backwards);
        for c in all {
            let (services, slices) = &c.input;
            let got = run_cached(&mut t, &shared(services.clone()), &shared(slices.clone()));
            assert_eq!(got, c.expected, "{}", c.name);
        }
    }

    /// The edits an agent sees, one at a time: each result equals a fresh translation, and
    /// only the changed service group is computed again.
    #[test]
    fn translator_recomputes_only_changed_groups() {
        let a = || svc("default", "a").cluster_ip("10.96.0.1").port("http", 80);
        let b = || svc("default", "b").cluster_ip("10.96.0.2").port("http", 80);
        let a1 = |ips: &[&str]| {
            Arc::new(
                slice("default", "a-1", "a")
                    .port("http", 8080)
                    .ready(ips)
                    .build(),
            )
        };
        let b1 = Arc::new(
            slice("default", "b-1", "b")
                .port("http", 8080)
                .ready(&["10.0.1.1"])
                .build(),
        );
        let mut services = vec![Arc::new(a().build()), Arc::new(b().build())];
        let mut slices = vec![a1(&["10.0.0.1"]), Arc::clone(&b1)];
        let mut t = Translator::new();
        let mut step = |name: &str,
                        services: &[Arc<Service>],
                        slices: &[Arc<EndpointSlice>],
                        translated: usize| {
            let got = run_cached(&mut t, services, slices);
            let plain: Vec<Service> = services.iter().map(|s| (**s).clone()).collect();
            let plain_slices: Vec<EndpointSlice> = slices.iter().map(|s| (**s).clone()).collect();
            assert_eq!(got, run(&plain, &plain_slices), "{name}");
            assert_eq!(t.stats().translated, translated, "{name}: groups computed");
            got
        };
        let backends = |t: &Translation, k: &str| -> Vec<BackendAddr> {
            t.desired
                .get(&key(k, 80, TCP))
                .map(|d| d.backends.clone())
                .unwrap_or_default()
        };

        let got = step("first", &services, &slices, 2);
        assert_eq!(backends(&got, "10.96.0.1"), [tcp("10.0.0.1", 8080)]);

        let got = step("nothing changed", &services, &slices, 0);
        assert_eq!(backends(&got, "10.96.0.1"), [tcp("10.0.0.1", 8080)]);

        // Equal copies (a source that copies its objects) are recognised too.
        let copies: Vec<Arc<Service>> = services.iter().map(|s| Arc::new((**s).clone())).collect();
        step("copies", &copies, &slices, 0);

        slices[0] = a1(&["10.0.0.2"]);
        let got = step("endpoint changed", &services, &slices, 1);
        assert_eq!(backends(&got, "10.96.0.1"), [tcp("10.0.0.2", 8080)]);
        assert_eq!(backends(&got, "10.96.0.2"), [tcp("10.0.1.1", 8080)]);

        slices.push(Arc::new(
            slice("default", "a-2", "a")
                .port("http", 8080)
                .ready(&["10.0.0.3"])
                .build(),
        ));
        let got = step("second slice", &services, &slices, 1);
        assert_eq!(
            backends(&got, "10.96.0.1"),
            [tcp("10.0.0.2", 8080), tcp("10.0.0.3", 8080)]
        );
        slices.pop();
        let got = step("second slice removed", &services, &slices, 1);
        assert_eq!(backends(&got, "10.96.0.1"), [tcp("10.0.0.2", 8080)]);

        services[0] = Arc::new(a().cluster_ip("10.96.0.9").build());
        let got = step("service changed", &services, &slices, 1);
        assert_eq!(backends(&got, "10.96.0.9"), [tcp("10.0.0.2", 8080)]);
        assert!(!got.desired.contains_key(&key("10.96.0.1", 80, TCP)));

        services.remove(0);
        let got = step("service deleted", &services, &slices, 1);
        assert_eq!(got.desired.len(), 1);
        assert_eq!(got.cluster_ips, [ip("10.96.0.2")].into());

        // Renamed: the slices still name `a`, so the new service has no endpoints.
        services.push(Arc::new(
            svc("default", "c")
                .cluster_ip("10.96.0.9")
                .port("http", 80)
                .build(),
        ));
        let got = step("renamed", &services, &slices, 1);
        assert_eq!(backends(&got, "10.96.0.9"), []);

        // A new service takes an address another one had first: the claim is made over all
        // groups, whichever of them changed.
        services.push(Arc::new(
            svc("default", "0-first")
                .cluster_ip("10.96.0.2")
                .port("http", 80)
                .build(),
        ));
        let got = step("conflict", &services, &slices, 1);
        assert_eq!(
            got.desired[&key("10.96.0.2", 80, TCP)].name,
            "default/0-first:http"
        );
        assert_eq!(got.issues.len(), 1, "{:?}", got.issues);
    }

    /// Node facts are inputs of every group: a change recomputes them all.
    #[test]
    fn translator_recomputes_everything_when_the_node_changes() {
        let services = vec![Arc::new(
            svc("default", "a")
                .cluster_ip("10.96.0.1")
                .port("", 80)
                .itp("Local")
                .build(),
        )];
        let slices = vec![Arc::new(
            slice("default", "a-1", "a")
                .port("", 8080)
                .ep(ep("10.0.0.1").node("node-b"))
                .build(),
        )];
        let mut t = Translator::new();
        let at = |t: &mut Translator, node: &str| {
            t.translate(&Input {
                services: &services,
                slices: &slices,
                node_name: node,
                node_zone: None,
                nodeport_addresses: &[],
            })
            .desired[&key("10.96.0.1", 80, TCP)]
                .backends
                .clone()
        };
        assert_eq!(at(&mut t, "node-a"), []);
        assert_eq!(at(&mut t, "node-b"), [tcp("10.0.0.1", 8080)]);
        assert_eq!(t.stats().translated, 1);
    }

    #[test]
    fn input_order_does_not_matter() {
        for c in cases() {
            let (mut services, mut slices) = c.input;
            services.reverse();
            slices.reverse();
            let got = run(&services, &slices);
            assert_eq!(got, c.expected, "{}", c.name);
        }
    }

    #[test]
    fn issue_display() {
        assert_eq!(
            issue(
                "Service default/x",
                "spec.clusterIP",
                "invalid IPv4 address \"foo\""
            )
            .to_string(),
            "Service default/x: spec.clusterIP: invalid IPv4 address \"foo\""
        );
        assert_eq!(
            issue("Service default/x", "", "whatever").to_string(),
            "Service default/x: whatever"
        );
        assert_eq!(key("10.96.0.1", 53, UDP).to_string(), "10.96.0.1:53/UDP");
        assert_eq!(tcp("10.0.0.1", 8080).to_string(), "10.0.0.1:8080/TCP");
    }

    #[test]
    fn sloppy_ipv4_parsing() {
        struct Case {
            name: &'static str,
            input: &'static str,
            expected: Option<Ipv4Addr>,
        }
        let cases = [
            Case {
                name: "plain",
                input: "10.96.0.1",
                expected: Some(Ipv4Addr::new(10, 96, 0, 1)),
            },
            Case {
                name: "leading zeros are decimal",
                input: "010.001.000.009",
                expected: Some(Ipv4Addr::new(10, 1, 0, 9)),
            },
            Case {
                name: "octet too big",
                input: "10.0.0.256",
                expected: None,
            },
            Case {
                name: "four digits",
                input: "10.0.0.0001",
                expected: None,
            },
            Case {
                name: "three parts",
                input: "10.0.1",
                expected: None,
            },
            Case {
                name: "five parts",
                input: "10.0.0.1.2",
                expected: None,
            },
            Case {
                name: "sign",
                input: "10.0.0.+1",
                expected: None,
            },
            Case {
                name: "spaces",
                input: " 10.0.0.1",
                expected: None,
            },
            Case {
                name: "empty octet",
                input: "10..0.1",
                expected: None,
            },
            Case {
                name: "unspecified",
                input: "0.0.0.0",
                expected: None,
            },
            Case {
                name: "non-ascii digits",
                input: "10.0.0.١",
                expected: None,
            },
        ];
        for c in cases {
            let got = match parse_ip(c.input) {
                Ip::V4(ip) => Some(ip),
                _ => None,
            };
            assert_eq!(got, c.expected, "{}", c.name);
        }
        assert!(matches!(parse_ip("fd00::1"), Ip::V6));
        assert!(matches!(parse_ip("fd00::g"), Ip::Invalid(_)));
        assert!(matches!(parse_ip(""), Ip::Empty));
    }

    #[test]
    fn nodeport_addresses_flag_parses() {
        struct Case {
            name: &'static str,
            input: &'static str,
            expected: Result<NodePortAddresses, NodePortAddressesError>,
        }
        let cidr = |s: &str, p: u8| (ip(s), p);
        let usage = "expected comma-separated CIDRs such as 10.0.0.0/8,192.168.1.10/32, or the single word \"primary\"";
        let cases = [
            Case {
                name: "empty is the default: all node addresses",
                input: "",
                expected: Ok(NodePortAddresses::All),
            },
            Case {
                name: "blank is the default",
                input: "  ",
                expected: Ok(NodePortAddresses::All),
            },
            Case {
                name: "primary",
                input: "primary",
                expected: Ok(NodePortAddresses::Primary),
            },
            Case {
                name: "CIDRs, spaces trimmed, host bits cleared, leading zeros decimal",
                input: "10.1.2.3/8, 192.168.001.0/24,0.0.0.0/0",
                expected: Ok(NodePortAddresses::Cidrs(vec![
                    cidr("10.0.0.0", 8),
                    cidr("192.168.1.0", 24),
                    cidr("0.0.0.0", 0),
                ])),
            },
            Case {
                name: "IPv6 CIDRs accepted and match no IPv4 address",
                input: "fd00::/8,10.0.0.0/8",
                expected: Ok(NodePortAddresses::Cidrs(vec![cidr("10.0.0.0", 8)])),
            },
            Case {
                name: "primary with CIDRs",
                input: "primary,10.0.0.0/8",
                expected: Err(NodePortAddressesError::PrimaryWithCidrs(
                    "primary,10.0.0.0/8".into(),
                )),
            },
            Case {
                name: "bare address",
                input: "10.0.0.1",
                expected: Err(NodePortAddressesError::InvalidCidr {
                    entry: "10.0.0.1".into(),
                    reason: "no /prefix-length; a single address is written like 10.0.0.1/32"
                        .into(),
                }),
            },
            Case {
                name: "prefix too long",
                input: "10.0.0.0/33",
                expected: Err(NodePortAddressesError::InvalidCidr {
                    entry: "10.0.0.0/33".into(),
                    reason: "invalid prefix length \"33\" (must be 0-32)".into(),
                }),
            },
            Case {
                name: "signed prefix",
                input: "10.0.0.0/+8",
                expected: Err(NodePortAddressesError::InvalidCidr {
                    entry: "10.0.0.0/+8".into(),
                    reason: "invalid prefix length \"+8\" (must be 0-32)".into(),
                }),
            },
            Case {
                name: "bad address",
                input: "10.0.0.256/32",
                expected: Err(NodePortAddressesError::InvalidCidr {
                    entry: "10.0.0.256/32".into(),
                    reason: "invalid IPv4 address \"10.0.0.256\"".into(),
                }),
            },
            Case {
                name: "bad IPv6",
                input: "fd00::g/8",
                expected: Err(NodePortAddressesError::InvalidCidr {
                    entry: "fd00::g/8".into(),
                    reason: "invalid IPv6 CIDR".into(),
                }),
            },
            Case {
                name: "empty entry",
                input: "10.0.0.0/8,,",
                expected: Err(NodePortAddressesError::EmptyEntry("10.0.0.0/8,,".into())),
            },
        ];
        for c in cases {
            let got = c.input.parse::<NodePortAddresses>();
            assert_eq!(got, c.expected, "{}", c.name);
            if let Err(e) = got {
                let msg = e.to_string();
                assert!(
                    msg.starts_with("--nodeport-addresses: "),
                    "{}: {msg}",
                    c.name
                );
                if !matches!(e, NodePortAddressesError::PrimaryWithCidrs(_)) {
                    assert!(msg.ends_with(usage), "{}: {msg}", c.name);
                }
            }
        }
    }

    #[test]
    fn nodeport_addresses_select_node_ips() {
        struct Case {
            name: &'static str,
            input: (&'static [&'static str], &'static str),
            expected: &'static [&'static str],
        }
        let cases = [
            Case {
                name: "default: every node address, never loopback, no duplicates",
                input: (
                    &["192.168.0.10", "127.0.0.1", "10.0.0.5", "192.168.0.10"],
                    "",
                ),
                expected: &["192.168.0.10", "10.0.0.5"],
            },
            Case {
                name: "primary: the first",
                input: (&["192.168.0.10", "10.0.0.5"], "primary"),
                expected: &["192.168.0.10"],
            },
            Case {
                name: "primary that is loopback: none",
                input: (&["127.0.0.2", "10.0.0.5"], "primary"),
                expected: &[],
            },
            Case {
                name: "primary without node addresses",
                input: (&[], "primary"),
                expected: &[],
            },
            Case {
                name: "CIDRs filter, in node address order",
                input: (
                    &["192.168.0.10", "10.0.0.5", "172.16.0.1", "10.9.0.1"],
                    "10.0.0.0/16,192.168.0.10/32",
                ),
                expected: &["192.168.0.10", "10.0.0.5"],
            },
            Case {
                name: "0.0.0.0/0 still excludes 127.0.0.0/8 (CVE-2020-8558)",
                input: (&["127.0.0.1", "127.1.2.3", "10.0.0.5"], "0.0.0.0/0"),
                expected: &["10.0.0.5"],
            },
            Case {
                name: "only IPv6 CIDRs: no IPv4 NodePort address",
                input: (&["10.0.0.5"], "fd00::/8"),
                expected: &[],
            },
        ];
        for c in cases {
            let ips: Vec<Ipv4Addr> = c.input.0.iter().map(|s| ip(s)).collect();
            let flag: NodePortAddresses = c.input.1.parse().expect("valid flag");
            let expected: Vec<Ipv4Addr> = c.expected.iter().map(|s| ip(s)).collect();
            assert_eq!(nodeport_addresses(&ips, &flag), expected, "{}", c.name);
        }
    }

    #[test]
    fn node_zone_reads_the_label() {
        let mut node = Node::default();
        assert_eq!(node_zone(&node), None);
        node.metadata.labels = Some(BTreeMap::from([(ZONE_LABEL.into(), String::new())]));
        assert_eq!(node_zone(&node), None, "empty label");
        node.metadata.labels = Some(BTreeMap::from([
            (ZONE_LABEL.into(), "eu-1a".into()),
            ("topology.kubernetes.io/region".into(), "eu-1".into()),
        ]));
        assert_eq!(node_zone(&node).as_deref(), Some("eu-1a"));
    }

    #[test]
    fn unknown_zone_or_no_nodeport_addresses() {
        let services = [svc("default", "a")
            .type_("NodePort")
            .cluster_ip("10.96.5.1")
            .node_port("", 80, 30400)
            .build()];
        let slices = [slice("default", "a-1", "a")
            .port("", 8080)
            .ep(ep("10.0.0.1").hints(&["zone-a"]))
            .ep(ep("10.0.0.2").hints(&["zone-b"]))
            .build()];
        let got = translate(&Input {
            services: &services,
            slices: &slices,
            node_name: NODE,
            node_zone: None,
            nodeport_addresses: &[],
        });
        let expected = expect(
            vec![(
                key("10.96.5.1", 80, TCP),
                ds("default/a", &[tcp("10.0.0.1", 8080), tcp("10.0.0.2", 8080)]),
            )],
            vec![],
        );
        assert_eq!(
            got, expected,
            "no zone: hints ignored; no addresses: no NodePort entry"
        );
        // An empty node name never makes an endpoint without a nodeName local.
        let local = translate(&Input {
            services: &[svc("default", "a")
                .cluster_ip("10.96.5.1")
                .port("", 80)
                .itp("Local")
                .build()],
            slices: &[slice("default", "a-1", "a")
                .port("", 8080)
                .ready(&["10.0.0.1"])
                .build()],
            node_name: "",
            node_zone: None,
            nodeport_addresses: &[],
        });
        assert_eq!(
            local.desired[&key("10.96.5.1", 80, TCP)],
            dsf("default/a", &[], CLUSTER_IP | ITP_LOCAL | DROP_IF_EMPTY)
        );
    }

    #[test]
    fn service_key_display_names_the_scope() {
        let k = key("198.51.100.1", 443, TCP);
        assert_eq!(k.to_string(), "198.51.100.1:443/TCP");
        assert_eq!(k.internal().to_string(), "198.51.100.1:443/TCP (internal)");
        assert_eq!(
            ServiceKey { scope: 9, ..k }.to_string(),
            "198.51.100.1:443/TCP (scope 9)"
        );
    }
}
