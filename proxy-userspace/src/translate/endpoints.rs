//! Endpoint sets and entries of one service port: which endpoints the cluster and local sets
//! hold (readiness, terminating fallback, topology hints) and the map entries each address
//! kind gets under the traffic policies.
use super::*;
/// Who "local" and "this zone" are.
pub(super) struct NodeView<'a> {
    pub(super) name: &'a str,
    pub(super) zone: Option<&'a str>,
    /// The node's primary address (kube-proxy's `nodeIP`).
    pub(super) ip: Option<Ipv4Addr>,
}

impl NodeView<'_> {
    pub(super) fn is_local(&self, ep: &EndpointView) -> bool {
        !self.name.is_empty() && ep.node_name.as_deref() == Some(self.name)
    }
}

/// The endpoint sets of one service port (see the module docs), each with the
/// serving+terminating endpoints of its scope left out of it ([`DesiredService::terminating`]).
pub(super) struct EndpointSets {
    pub(super) cluster: Vec<BackendAddr>,
    pub(super) local: Vec<BackendAddr>,
    pub(super) cluster_terminating: Vec<BackendAddr>,
    pub(super) local_terminating: Vec<BackendAddr>,
    /// `svc_flags::TERMINATING_FALLBACK` when `cluster` / `local` holds serving+terminating
    /// endpoints because none is ready.
    pub(super) cluster_fallback: u32,
    pub(super) local_fallback: u32,
}

impl EndpointSets {
    pub(super) fn new(candidates: &[(BackendAddr, &EndpointView)], node: &NodeView) -> Self {
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
    pub(super) fn any(&self) -> bool {
        !self.cluster.is_empty()
    }
}

/// The entries one service port wants.
pub(super) fn port_entries(
    view: &ServiceView,
    port: &PortView,
    sets: &EndpointSets,
    nodeport_addresses: &[Ipv4Addr],
    node_ip: Option<Ipv4Addr>,
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
            ext.source_ranges = with_lb_ips_if_node_allowed(r, node_ip, &view.lb_ips);
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

/// loadBalancerSourceRanges as the datapath checks them. When a range holds the node's own
/// address, the service's LB IPs are allowed as sources too: a balancer that loops the node's
/// own request back keeps the LB IP as its source (kube-proxy's iptables and nftables proxiers
/// both add this, for the node IP only).
pub(super) fn with_lb_ips_if_node_allowed(
    ranges: &[(Ipv4Addr, u8)],
    node_ip: Option<Ipv4Addr>,
    lb_ips: &[(String, Ipv4Addr)],
) -> Vec<(Ipv4Addr, u8)> {
    let contains = |(net, prefix): &(Ipv4Addr, u8), ip: Ipv4Addr| {
        let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
        u32::from(ip) & mask == u32::from(*net) & mask
    };
    let mut out = ranges.to_vec();
    if node_ip.is_some_and(|ip| ranges.iter().any(|r| contains(r, ip))) {
        out.extend(lb_ips.iter().map(|(_, ip)| (*ip, 32)));
        out.sort();
        out.dedup();
    }
    out
}
