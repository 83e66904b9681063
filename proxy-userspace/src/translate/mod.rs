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
//! Other kube-proxy behaviours this follows (see `docs/semantics.md`, rules S1-S18):
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

mod endpoints;
mod fields;
mod node;
mod service;
mod slice;
mod translator;

// The room's API is flat (`translate::translate`, `translate::Translator`, ...); the files
// split it by concern. The globs also give the files each other's `pub(super)` items.
use endpoints::*;
use fields::*;
pub use node::*;
use service::*;
use slice::*;
pub use translator::*;

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
    /// The node's primary address (kube-proxy's `nodeIP`): a loadBalancerSourceRange holding
    /// it also admits the service's LB IPs as sources.
    pub node_ip: Option<Ipv4Addr>,
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
    /// `plan::plan` keeps their existing backend entries (same ID, in no slot)
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

#[cfg(test)]
mod tests;
