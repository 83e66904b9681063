//! Translation: Kubernetes API objects -> the services and backends the datapath should have.
//!
//! Pure: no IO, deterministic (objects are processed sorted by namespace/name, so the result
//! does not depend on the order they were listed in), and total: any input, however malformed,
//! yields a [`Translation`]. A bad field produces an [`Issue`] and skips only the item it
//! belongs to (one cluster IP, one port, one endpoint); everything else is still programmed.
//!
//! Scope: ClusterIP entries. The pipeline keeps what NodePort, LoadBalancer, externalIPs and
//! the traffic policies will need (the node name, each endpoint's node and zone, the
//! ready/serving/terminating conditions) so they can be added as more [`ServiceKey`] sources
//! and endpoint filters without reshaping it.
//!
//! kube-proxy behaviours this follows (see `SEMANTICS.md`):
//! - services labelled `service.kubernetes.io/service-proxy-name`, `type: ExternalName` and
//!   headless services (`clusterIP: None`) get nothing;
//! - the endpoint port is the EndpointSlice port whose name and protocol equal the Service
//!   port's, never `targetPort`;
//! - ready endpoints are used; if none is ready, serving+terminating ones; never non-serving
//!   ones. A missing `ready`/`serving` condition counts as true, a missing `terminating` as
//!   false (the API's and kube-proxy's reading);
//! - only the first address of an endpoint is used (the API says they are fungible, and
//!   kube-proxy does the same);
//! - IP addresses are parsed like kube-proxy's `ParseIPSloppy`: leading zeros in an octet are
//!   accepted as decimal, for objects created before the API server became strict.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::abi::Protocol;

/// Label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label handing a Service to another proxy; such services are ignored.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The only EndpointSlice address type used (IPv6 and FQDN slices are skipped).
pub const ADDRESS_TYPE_IPV4: &str = "IPv4";

/// The objects to translate and the node the agent runs on.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub services: &'a [Service],
    pub slices: &'a [EndpointSlice],
    /// The node this agent programs. Not used by ClusterIP translation; kept for the
    /// node-local traffic policies.
    pub node_name: &'a str,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub desired: Desired,
    pub issues: Vec<Issue>,
}

/// Everything the service and backend maps should hold.
pub type Desired = BTreeMap<ServiceKey, DesiredService>;

/// What a packet's destination is matched against: one service address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// One service address and the backends it may lead to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// `namespace/name:port-name`, or `namespace/name` for an unnamed port (kube-proxy's
    /// spelling), for logs and `inspect`.
    pub name: String,
    /// Usable endpoints, sorted and without duplicates. Empty means "reject".
    pub backends: Vec<BackendAddr>,
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
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)
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

/// Translates the API objects into the desired map contents.
pub fn translate(input: &Input) -> Translation {
    let mut issues = Vec::new();
    let endpoints = index_slices(input.slices, &mut issues);
    let mut desired = Desired::new();

    let mut services: Vec<&Service> = input.services.iter().collect();
    services.sort_by(|a, b| object_id(&a.metadata).cmp(&object_id(&b.metadata)));
    for svc in services {
        let mut ctx = Ctx {
            object: format!("Service {}", display_id(&svc.metadata)),
            issues: &mut issues,
        };
        let Some(view) = service_view(svc, &mut ctx) else {
            continue;
        };
        let slices = endpoints
            .get(&(view.namespace.as_str(), view.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in &view.ports {
            let candidates = port_endpoints(slices, port);
            let backends = usable(&candidates, |_| true);
            let name = if port.name.is_empty() {
                format!("{}/{}", view.namespace, view.name)
            } else {
                format!("{}/{}:{}", view.namespace, view.name, port.name)
            };
            for ip in &view.cluster_ips {
                let key = ServiceKey {
                    ip: *ip,
                    port: port.port,
                    protocol: port.protocol,
                };
                match desired.get(&key) {
                    Some(other) => ctx.issue(
                        &port.field,
                        format!(
                            "{key} is already used by {}; this port is skipped",
                            other.name
                        ),
                    ),
                    None => {
                        desired.insert(
                            key,
                            DesiredService {
                                name: name.clone(),
                                backends: backends.clone(),
                            },
                        );
                    }
                }
            }
        }
    }
    Translation { desired, issues }
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
}

struct PortView {
    /// `spec.ports[i]`, for issues.
    field: String,
    /// Empty when unnamed.
    name: String,
    port: u16,
    protocol: Protocol,
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
    match spec.type_.as_deref() {
        None | Some("ClusterIP" | "NodePort" | "LoadBalancer") => {}
        Some("ExternalName") => return None,
        Some(other) => {
            ctx.issue(
                "spec.type",
                format!("unknown service type {other:?}; the service is skipped"),
            );
            return None;
        }
    }
    let cluster_ips = cluster_ips(spec, ctx)?;
    let ports = service_ports(spec, ctx);
    Some(ServiceView {
        namespace: namespace(&svc.metadata).to_owned(),
        name,
        cluster_ips,
        ports,
    })
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

fn service_ports(spec: &ServiceSpec, ctx: &mut Ctx) -> Vec<PortView> {
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
            ..
        } = p;
        let Some(protocol) = parse_protocol(protocol.as_deref(), &format!("{field}.protocol"), ctx)
        else {
            continue;
        };
        let Some(port) = parse_port(Some(*port), &format!("{field}.port"), ctx) else {
            continue;
        };
        out.push(PortView {
            field,
            name: name.clone().unwrap_or_default(),
            port,
            protocol,
        });
    }
    out
}

/// One EndpointSlice of a service, validated.
struct SliceView {
    ports: Vec<SlicePort>,
    endpoints: Vec<EndpointView>,
}

struct SlicePort {
    /// Empty when unnamed.
    name: String,
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
    #[expect(
        dead_code,
        reason = "kept for internalTrafficPolicy/externalTrafficPolicy Local"
    )]
    node_name: Option<String>,
    #[expect(
        dead_code,
        reason = "kept for topology-aware routing (trafficDistribution, hints)"
    )]
    zone: Option<String>,
}

/// Groups the usable IPv4 slices by the `(namespace, service name)` they belong to.
fn index_slices<'a>(
    slices: &'a [EndpointSlice],
    issues: &mut Vec<Issue>,
) -> HashMap<(&'a str, &'a str), Vec<SliceView>> {
    let mut sorted: Vec<&EndpointSlice> = slices.iter().collect();
    sorted.sort_by(|a, b| object_id(&a.metadata).cmp(&object_id(&b.metadata)));
    let mut out: HashMap<(&str, &str), Vec<SliceView>> = HashMap::new();
    for slice in sorted {
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        let Some(service) = service.filter(|s| !s.is_empty()) else {
            continue;
        };
        if slice.address_type != ADDRESS_TYPE_IPV4 {
            continue;
        }
        let mut ctx = Ctx {
            object: format!("EndpointSlice {}", display_id(&slice.metadata)),
            issues: &mut *issues,
        };
        let view = slice_view(slice, &mut ctx);
        out.entry((namespace(&slice.metadata), service.as_str()))
            .or_default()
            .push(view);
    }
    out
}

fn slice_view(slice: &EndpointSlice, ctx: &mut Ctx) -> SliceView {
    let mut ports: Vec<SlicePort> = Vec::new();
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
        if ports
            .iter()
            .any(|q| q.name == name && q.protocol == protocol)
        {
            ctx.issue(
                &field,
                format!("duplicate port name {name:?} for {protocol}; the first one is used"),
            );
            continue;
        }
        ports.push(SlicePort {
            name,
            port,
            protocol,
        });
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
        zone: ep.zone.clone(),
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
        let Some(sp) = slice
            .ports
            .iter()
            .find(|sp| sp.name == port.name && sp.protocol == port.protocol)
        else {
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
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let Some(part) = parts.next() else {
            return Ip::Invalid("");
        };
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Ip::Invalid("");
        }
        match part.parse::<u8>() {
            Ok(v) => *octet = v,
            Err(_) => return Ip::Invalid(""),
        }
    }
    if parts.next().is_some() {
        return Ip::Invalid("");
    }
    let ip = Ipv4Addr::from(octets);
    if ip.is_unspecified() {
        return Ip::Invalid(" (unspecified address)");
    }
    Ip::V4(ip)
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::EndpointConditions;
    use std::collections::BTreeMap;

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
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test IP")
    }

    fn key(ip_: &str, port: u16, protocol: Protocol) -> ServiceKey {
        ServiceKey {
            ip: ip(ip_),
            port,
            protocol,
        }
    }

    fn tcp(ip_: &str, port: u16) -> BackendAddr {
        BackendAddr {
            ip: ip(ip_),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn ds(name: &str, backends: &[BackendAddr]) -> DesiredService {
        DesiredService {
            name: name.into(),
            backends: backends.to_vec(),
        }
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

    fn expect(desired: Vec<(ServiceKey, DesiredService)>, issues: Vec<Issue>) -> Translation {
        Translation {
            desired: desired.into_iter().collect(),
            issues,
        }
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
                        ds(
                            "default/web:http",
                            &[tcp("10.0.0.1", 8080), tcp("10.0.0.4", 8080)],
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
                        ds(
                            "default/web:http",
                            &[
                                tcp("10.0.0.1", 8080),
                                tcp("10.0.0.4", 8080),
                                tcp("10.0.0.5", 8080),
                            ],
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
                            ds("default/web:http", &[tcp("10.0.0.1", 8080)]),
                        ),
                        (
                            key("10.96.0.10", 81, TCP),
                            ds("default/web:admin", &[tcp("10.0.0.2", 8081)]),
                        ),
                    ],
                    vec![],
                ),
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
                ),
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
                            "10.96.0.70:80/TCP is already used by default/a:http; this port is skipped",
                        ),
                        issue(
                            "Service default/b",
                            "spec.ports[0]",
                            "10.96.0.70:80/TCP is already used by default/a:http; this port is skipped",
                        ),
                    ],
                ),
            },
        ]
    }

    #[test]
    fn translate_table() {
        for c in cases() {
            let (services, slices) = &c.input;
            let got = translate(&Input {
                services,
                slices,
                node_name: "node-a",
            });
            assert_eq!(got.desired, c.expected.desired, "{}: desired", c.name);
            assert_eq!(got.issues, c.expected.issues, "{}: issues", c.name);
        }
    }

    #[test]
    fn input_order_does_not_matter() {
        for c in cases() {
            let (mut services, mut slices) = c.input;
            services.reverse();
            slices.reverse();
            let got = translate(&Input {
                services: &services,
                slices: &slices,
                node_name: "node-a",
            });
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
}
