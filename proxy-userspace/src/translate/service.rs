//! A Service read into the parts translation uses, each field validated (bad fields become
//! issues and skip only their own item): type, addresses, ports, policies, affinity, ranges.
use super::*;
/// The parts of a Service this translation uses, validated.
pub(super) struct ServiceView {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) cluster_ips: Vec<Ipv4Addr>,
    pub(super) ports: Vec<PortView>,
    /// `(field, address)`, deduplicated.
    pub(super) external_ips: Vec<(String, Ipv4Addr)>,
    /// LB ingress IPs to program (`(field, address)`, deduplicated); empty unless type
    /// LoadBalancer.
    pub(super) lb_ips: Vec<(String, Ipv4Addr)>,
    /// `Some` when `loadBalancerSourceRanges` is non-empty: the valid IPv4 ranges.
    pub(super) source_ranges: Option<Vec<(Ipv4Addr, u8)>>,
    pub(super) etp_local: bool,
    pub(super) itp_local: bool,
    /// `Some(timeout)` with sessionAffinity ClientIP.
    pub(super) affinity_timeout_s: Option<u32>,
    /// `(field, port)` for eTP Local LoadBalancer services.
    pub(super) health_check_node_port: Option<(String, u16)>,
}

pub(super) struct PortView {
    /// `spec.ports[i]`, for issues.
    pub(super) field: String,
    /// Empty when unnamed.
    pub(super) name: String,
    pub(super) port: u16,
    pub(super) protocol: Protocol,
    /// Only for types NodePort and LoadBalancer.
    pub(super) node_port: Option<u16>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum SvcType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// Validates a Service, or returns `None` when it gets nothing (ignored or unusable).
pub(super) fn service_view(svc: &Service, ctx: &mut Ctx) -> Option<ServiceView> {
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
pub(super) fn traffic_policy(value: Option<&str>, field: &str, ctx: &mut Ctx) -> bool {
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
pub(super) fn affinity(spec: &ServiceSpec, ctx: &mut Ctx) -> Option<u32> {
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
pub(super) fn address_list<'s>(
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
pub(super) fn lb_ingress_ips(svc: &Service, ctx: &mut Ctx) -> Vec<(String, Ipv4Addr)> {
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
pub(super) fn source_ranges(spec: &ServiceSpec, ctx: &mut Ctx) -> Option<Vec<(Ipv4Addr, u8)>> {
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
pub(super) fn cluster_ips(spec: &ServiceSpec, ctx: &mut Ctx) -> Option<Vec<Ipv4Addr>> {
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

pub(super) fn service_ports(spec: &ServiceSpec, node_ports: bool, ctx: &mut Ctx) -> Vec<PortView> {
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
