//! An EndpointSlice read into the parts translation uses, validated: its ports and its
//! endpoints with their conditions, node, zone hints; and which endpoints a port may use.
use super::*;
/// One EndpointSlice of a service, validated.
pub(super) struct SliceView {
    /// By `(name, protocol)`: a hash lookup, so a slice with 10^5 ports stays linear.
    pub(super) ports: HashMap<(String, Protocol), SlicePort>,
    pub(super) endpoints: Vec<EndpointView>,
}

pub(super) struct SlicePort {
    pub(super) port: u16,
    pub(super) protocol: Protocol,
}

/// An endpoint with everything the endpoint filters need.
#[derive(Clone, Debug)]
pub(super) struct EndpointView {
    pub(super) ip: Ipv4Addr,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
    pub(super) node_name: Option<String>,
    /// `hints.forZones[].name`.
    pub(super) zone_hints: Vec<String>,
}

pub(super) fn slice_view(slice: &EndpointSlice, ctx: &mut Ctx) -> SliceView {
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

pub(super) fn endpoint_view(ep: &Endpoint, field: &str, ctx: &mut Ctx) -> Option<EndpointView> {
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
pub(super) fn port_endpoints<'a>(
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
pub(super) fn usable(
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
pub(super) fn draining(
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
