//! Table tests of translation: every kube-proxy rule the module docs list, malformed input,
//! and the incremental `Translator` agreeing with `translate`.
use super::*;
use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, ServiceStatus, SessionAffinityConfig,
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
            target_port: Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)),
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
        self.spec().load_balancer_source_ranges = Some(r.iter().map(|s| s.to_string()).collect());
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
        node_ip: None,
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
        node_ip: None,
    })
    .clone()
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
    let mut prev: Option<Translation> = None;
    let mut step = |name: &str,
                    services: &[Arc<Service>],
                    slices: &[Arc<EndpointSlice>],
                    translated: usize| {
        let got = run_cached(&mut t, services, slices);
        let plain: Vec<Service> = services.iter().map(|s| (**s).clone()).collect();
        let plain_slices: Vec<EndpointSlice> = slices.iter().map(|s| (**s).clone()).collect();
        assert_eq!(got, run(&plain, &plain_slices), "{name}");
        assert_eq!(t.stats().translated, translated, "{name}: groups computed");
        // The delta (patched in, or compared) is exactly what changed.
        if let Some(p) = prev.replace(got.clone()) {
            assert_eq!(t.output().1, Some(&compare(&p, &got)), "{name}: delta");
        }
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
            node_ip: None,
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
                reason: "no /prefix-length; a single address is written like 10.0.0.1/32".into(),
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
        node_ip: None,
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
        node_ip: None,
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

#[test]
fn source_ranges_holding_the_node_address_admit_the_lb_ips_as_sources() {
    use super::endpoints::with_lb_ips_if_node_allowed;
    let lb = vec![
        (
            "status.loadBalancer.ingress[0].ip".to_owned(),
            ip("203.0.113.60"),
        ),
        (
            "status.loadBalancer.ingress[1].ip".to_owned(),
            ip("203.0.113.61"),
        ),
    ];
    let ranges = vec![(ip("10.240.0.0"), 24), (ip("198.51.100.0"), 24)];
    assert_eq!(
        with_lb_ips_if_node_allowed(&ranges, Some(ip("10.240.0.11")), &lb),
        vec![
            (ip("10.240.0.0"), 24),
            (ip("198.51.100.0"), 24),
            (ip("203.0.113.60"), 32),
            (ip("203.0.113.61"), 32),
        ]
    );
    for node in [Some(ip("10.241.0.11")), None] {
        assert_eq!(
            with_lb_ips_if_node_allowed(&ranges, node, &lb),
            ranges,
            "{node:?}"
        );
    }
    // A /0 holds every node address.
    assert_eq!(
        with_lb_ips_if_node_allowed(&[(ip("0.0.0.0"), 0)], Some(ip("10.0.0.1")), &lb[..1]),
        vec![(ip("0.0.0.0"), 0), (ip("203.0.113.60"), 32)]
    );
}
