//! The kube-proxy compatibility table: for each flow, the verdict, the endpoints a packet may
//! reach and whether the backend sees a node address, exactly as docs/semantics.md says kube-proxy
//! answers. Each row runs `ebpf-proxy trace` (the real programs through BPF_PROG_TEST_RUN on
//! maps programmed by the production reconcile path). Needs root.
use std::path::PathBuf;

use proxy_userspace::cmd::trace::{TraceArgs, trace};

struct Case {
    name: &'static str,
    proto: &'static str,
    source: &'static str,
    destination: &'static str,
    masquerade_all: bool,
    verdict: &'static str,
    endpoints: &'static [&'static str],
    masquerade: bool,
    origin: &'static str,
}

const ALL_WEB: &[&str] = &["10.76.0.10:9376", "10.76.0.11:9376", "10.76.1.10:9376"];
const POD: &str = "10.76.0.20";
const EXT: &str = "192.0.2.10";
const NODE: &str = "10.240.0.11";

#[rustfmt::skip]
const CASES: &[Case] = &[
    Case { name: "pod -> ClusterIP: every endpoint, two slices, not masqueraded", proto: "tcp", source: POD, destination: "10.96.0.20:80", masquerade_all: false, verdict: "forward", endpoints: ALL_WEB, masquerade: false, origin: "pod" },
    Case { name: "pod -> ClusterIP over UDP", proto: "udp", source: POD, destination: "10.96.0.20:80", masquerade_all: false, verdict: "forward", endpoints: ALL_WEB, masquerade: false, origin: "pod" },
    Case { name: "pod -> ClusterIP on a port no service uses: REJECT", proto: "tcp", source: POD, destination: "10.96.0.20:81", masquerade_all: false, verdict: "reject", endpoints: &[], masquerade: false, origin: "pod" },
    Case { name: "--masquerade-all masquerades pod -> ClusterIP", proto: "tcp", source: POD, destination: "10.96.0.20:80", masquerade_all: true, verdict: "forward", endpoints: ALL_WEB, masquerade: true, origin: "pod" },
    Case { name: "external -> ClusterIP: masqueraded", proto: "tcp", source: EXT, destination: "10.96.0.20:80", masquerade_all: false, verdict: "forward", endpoints: ALL_WEB, masquerade: true, origin: "external" },
    Case { name: "host -> ClusterIP: backend sees the node", proto: "tcp", source: NODE, destination: "10.96.0.20:80", masquerade_all: false, verdict: "forward", endpoints: ALL_WEB, masquerade: true, origin: "host" },
    Case { name: "external -> NodePort (eTP Cluster): every endpoint, masqueraded", proto: "tcp", source: EXT, destination: "10.240.0.11:30080", masquerade_all: false, verdict: "forward", endpoints: ALL_WEB, masquerade: true, origin: "external" },
    Case { name: "external -> NodePort over UDP", proto: "udp", source: EXT, destination: "10.240.0.11:30081", masquerade_all: false, verdict: "forward", endpoints: ALL_WEB, masquerade: true, origin: "external" },
    Case { name: "pod -> NodePort (eTP Cluster): masqueraded even from a pod", proto: "tcp", source: POD, destination: "10.240.0.11:30080", masquerade_all: false, verdict: "forward", endpoints: ALL_WEB, masquerade: true, origin: "pod" },
    Case { name: "NodePort on an address that is not the node's: untouched", proto: "tcp", source: EXT, destination: "10.240.0.99:30080", masquerade_all: false, verdict: "pass", endpoints: &[], masquerade: false, origin: "external" },
    Case { name: "external -> LB IP (eTP Cluster)", proto: "tcp", source: EXT, destination: "203.0.113.10:80", masquerade_all: false, verdict: "forward", endpoints: ALL_WEB, masquerade: true, origin: "external" },
    Case { name: "external -> NodePort, eTP Local, no local endpoint: DROP", proto: "tcp", source: EXT, destination: "10.240.0.11:30090", masquerade_all: false, verdict: "drop", endpoints: &[], masquerade: false, origin: "external" },
    Case { name: "external -> LB IP, eTP Local, no local endpoint: DROP", proto: "tcp", source: EXT, destination: "203.0.113.20:80", masquerade_all: false, verdict: "drop", endpoints: &[], masquerade: false, origin: "external" },
    Case { name: "pod -> LB IP, eTP Local: short-circuit to every endpoint, not masqueraded", proto: "tcp", source: POD, destination: "203.0.113.20:80", masquerade_all: false, verdict: "forward", endpoints: &["10.76.1.10:9376"], masquerade: false, origin: "pod" },
    Case { name: "pod -> ClusterIP, iTP Local, no local endpoint: DROP", proto: "tcp", source: POD, destination: "10.96.0.60:80", masquerade_all: false, verdict: "drop", endpoints: &[], masquerade: false, origin: "pod" },
    Case { name: "LB IP from outside the source ranges: DROP", proto: "tcp", source: EXT, destination: "203.0.113.30:80", masquerade_all: false, verdict: "drop", endpoints: &[], masquerade: false, origin: "external" },
    Case { name: "LB IP from inside the source ranges", proto: "tcp", source: "198.51.100.9", destination: "203.0.113.30:80", masquerade_all: false, verdict: "forward", endpoints: &["10.76.0.10:9376"], masquerade: true, origin: "external" },
    Case { name: "LB IP from a pod outside the source ranges: DROP", proto: "tcp", source: POD, destination: "203.0.113.30:80", masquerade_all: false, verdict: "drop", endpoints: &[], masquerade: false, origin: "pod" },
    Case { name: "source ranges do not apply to the NodePort", proto: "tcp", source: EXT, destination: "10.240.0.11:30100", masquerade_all: false, verdict: "forward", endpoints: &["10.76.0.10:9376"], masquerade: true, origin: "external" },
    Case { name: "no endpoint anywhere: REJECT (TCP)", proto: "tcp", source: POD, destination: "10.96.0.40:80", masquerade_all: false, verdict: "reject", endpoints: &[], masquerade: false, origin: "pod" },
    Case { name: "no endpoint anywhere: REJECT (UDP)", proto: "udp", source: POD, destination: "10.96.0.40:80", masquerade_all: false, verdict: "reject", endpoints: &[], masquerade: false, origin: "pod" },
    Case { name: "none ready: serving+terminating ones, never non-serving", proto: "tcp", source: POD, destination: "10.96.0.70:80", masquerade_all: false, verdict: "forward", endpoints: &["10.76.0.10:9376"], masquerade: false, origin: "pod" },
    Case { name: "hairpin: a pod reaching itself is masqueraded", proto: "tcp", source: "10.76.0.10", destination: "10.96.0.70:80", masquerade_all: false, verdict: "forward", endpoints: &["10.76.0.10:9376"], masquerade: true, origin: "pod" },
    Case { name: "service-proxy-name label: another proxy's service, untouched", proto: "tcp", source: POD, destination: "10.96.0.90:80", masquerade_all: false, verdict: "pass", endpoints: &[], masquerade: false, origin: "pod" },
    Case { name: "externalIP from outside: masqueraded", proto: "tcp", source: EXT, destination: "198.51.100.7:80", masquerade_all: false, verdict: "forward", endpoints: &["10.76.1.10:9376"], masquerade: true, origin: "external" },
    Case { name: "endpoint port by port name, not targetPort", proto: "tcp", source: POD, destination: "10.96.0.110:80", masquerade_all: false, verdict: "forward", endpoints: &["10.76.0.11:8080"], masquerade: false, origin: "pod" },
    Case { name: "sessionAffinity ClientIP: one client, one endpoint", proto: "tcp", source: POD, destination: "10.96.0.120:80", masquerade_all: false, verdict: "forward", endpoints: &["?one"], masquerade: false, origin: "pod" },
    Case { name: "PreferClose with hints: this zone's endpoints", proto: "tcp", source: POD, destination: "10.96.0.130:80", masquerade_all: false, verdict: "forward", endpoints: &["10.76.0.10:9376"], masquerade: false, origin: "pod" },
    Case { name: "LB IP with ipMode Proxy: no in-node short-circuit", proto: "tcp", source: POD, destination: "203.0.113.40:80", masquerade_all: false, verdict: "pass", endpoints: &[], masquerade: false, origin: "pod" },
    Case { name: "a pod IP is not a service", proto: "tcp", source: POD, destination: "10.76.1.10:9376", masquerade_all: false, verdict: "pass", endpoints: &[], masquerade: false, origin: "pod" },
    Case { name: "pod -> ClusterIP over SCTP: DNAT with the port rewritten", proto: "sctp", source: POD, destination: "10.96.0.150:36412", masquerade_all: false, verdict: "forward", endpoints: &["10.76.0.11:38412", "10.76.1.10:38412"], masquerade: false, origin: "pod" },
    Case { name: "external -> NodePort over SCTP: masqueraded", proto: "sctp", source: EXT, destination: "10.240.0.11:30412", masquerade_all: false, verdict: "forward", endpoints: &["10.76.0.11:38412", "10.76.1.10:38412"], masquerade: true, origin: "external" },
    Case { name: "SCTP to a TCP-only ClusterIP port: REJECT", proto: "sctp", source: POD, destination: "10.96.0.20:80", masquerade_all: false, verdict: "reject", endpoints: &[], masquerade: false, origin: "pod" },
    Case { name: "external -> LB IP, eTP Local, local endpoint: client kept", proto: "tcp", source: EXT, destination: "203.0.113.50:80", masquerade_all: false, verdict: "forward", endpoints: &["10.76.0.10:9376"], masquerade: false, origin: "external" },
    Case { name: "--masquerade-all keeps the client of an eTP Local LB IP (ClusterIPs only)", proto: "tcp", source: EXT, destination: "203.0.113.50:80", masquerade_all: true, verdict: "forward", endpoints: &["10.76.0.10:9376"], masquerade: false, origin: "external" },
    Case { name: "--masquerade-all still masquerades pod -> that service's ClusterIP", proto: "tcp", source: POD, destination: "10.96.0.160:80", masquerade_all: true, verdict: "forward", endpoints: &["10.76.0.10:9376"], masquerade: true, origin: "pod" },
    Case { name: "source ranges holding the node address admit the LB IP as source", proto: "tcp", source: "203.0.113.60", destination: "203.0.113.60:80", masquerade_all: false, verdict: "forward", endpoints: &["10.76.0.10:9376"], masquerade: true, origin: "external" },
    Case { name: "... but not the other LB IPs", proto: "tcp", source: "203.0.113.50", destination: "203.0.113.60:80", masquerade_all: false, verdict: "drop", endpoints: &[], masquerade: false, origin: "external" },
    Case { name: "source ranges without the node address: the LB IP as source is dropped", proto: "tcp", source: "203.0.113.30", destination: "203.0.113.30:80", masquerade_all: false, verdict: "drop", endpoints: &[], masquerade: false, origin: "external" },
    Case { name: "localhost NodePort is never served (CVE-2020-8558)", proto: "tcp", source: "127.0.0.1", destination: "127.0.0.1:30080", masquerade_all: false, verdict: "pass", endpoints: &[], masquerade: false, origin: "host" },
];

#[test]
fn kube_proxy_compatibility_table() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "the compatibility table runs the real BPF programs: run it as root (cargo xtask test)"
        );
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/compat");
    let mut failures = Vec::new();
    for c in CASES {
        let args = TraceArgs {
            manifests: Some(dir.clone()),
            kubeconfig: None,
            timeout: 30,
            node_name: "node1".into(),
            node_ips: vec![NODE.parse().expect("ip")],
            cluster_cidr: "10.76.0.0/16".parse().expect("cidr"),
            masquerade_all: c.masquerade_all,
            nodeport_addresses: String::new(),
            protocol: c.proto.parse().expect("proto"),
            source: c.source.into(),
            destination: c.destination.parse().expect("destination"),
            samples: 64,
            json: true,
        };
        let r = match trace(&args) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}: trace failed: {e:#}", c.name));
                continue;
            }
        };
        let endpoints_ok = if c.endpoints == ["?one"] {
            r.endpoints.len() == 1
        } else {
            r.endpoints
                == c.endpoints
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
        };
        // A forwarded packet matched a service, and the trace names it.
        if c.verdict == "forward" && !r.service.as_deref().is_some_and(|s| s.contains('/')) {
            failures.push(format!(
                "{}: forwarded, but no service named: {r:?}",
                c.name
            ));
        }
        if r.verdict != c.verdict
            || !endpoints_ok
            || r.masquerade != c.masquerade
            || r.origin != c.origin
        {
            failures.push(format!(
                "{}: got verdict {} endpoints {:?} masquerade {} origin {}; want {} {:?} {} {}",
                c.name,
                r.verdict,
                r.endpoints,
                r.masquerade,
                r.origin,
                c.verdict,
                c.endpoints,
                c.masquerade,
                c.origin
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from kube-proxy:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}
