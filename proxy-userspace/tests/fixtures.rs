//! Packet-fixture tests: the real eBPF programs, loaded into the kernel, run on synthesized
//! packets through BPF_PROG_TEST_RUN, with maps programmed by the production
//! manifests -> translate -> plan -> writer path. Needs root (CAP_BPF, CAP_NET_ADMIN).
use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_common::{NodeConfig, counter, csum, programs};
use proxy_userspace::{
    abi,
    datapath::{self, Datapath, LoadOptions},
    packet::{self, Ipv4, tcp_flags},
    plan::{self, MapState},
    translate,
};

/// Conntrack lifecycle: states, expiry, SNAT ports, clashes, floods, fragments
/// (`tests/conntrack/mod.rs`).
mod conntrack;
/// The malformed-packet corpus: generated frames through every program, XDP and tc compared
/// (`tests/corpus/mod.rs`).
mod corpus;
/// The decapsulation policy: what IPIP/GUE is unwrapped, from where (`tests/decap/mod.rs`).
mod decap;
/// ICMP error parsing hardening (`tests/icmp_errors/mod.rs`).
mod icmp_errors;
/// Per-service counters and affinity vs terminating endpoints (`tests/lb_svc/mod.rs`).
mod lb_svc;
/// Whole-map reads in batches (`tests/map_reads/mod.rs`).
mod map_reads;
/// TTL on the redirect paths (`tests/ttl/mod.rs`).
mod ttl;
/// The XDP fast path's fixtures (`tests/xdp/mod.rs`), sharing this harness.
mod xdp;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const TCP: u8 = 6;
const UDP: u8 = 17;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 20);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 11);
const EXT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const MAC_POD: [u8; 6] = [0x02, 0, 0, 0, 0, 0x20];
const MAC_GW: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("packet-fixture tests load BPF programs: run them as root (cargo xtask test)");
    }
}

/// A Service `ns/name` with a ClusterIP and named ports, plus one EndpointSlice.
fn objects(yaml: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut svcs = Vec::new();
    let mut slices = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v = serde_yaml::Value::deserialize(doc).expect("fixture yaml");
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("Service") => svcs.push(serde_yaml::from_value(v).expect("service")),
            Some("EndpointSlice") => slices.push(serde_yaml::from_value(v).expect("slice")),
            k => panic!("unexpected kind {k:?}"),
        }
    }
    (svcs, slices)
}
use serde::Deserialize as _;

fn hostnames(endpoints: &[&str], proto: &str) -> String {
    let eps: String = endpoints
        .iter()
        .map(|ip| format!("\n  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}"))
        .collect();
    let eps = if eps.is_empty() {
        " []".to_owned()
    } else {
        eps
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: hostnames, namespace: default}}\n\
         spec:\n  clusterIP: {VIP}\n  ports:\n  - {{name: web, port: 80, targetPort: 9376, protocol: {proto}}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: hostnames-abc\n  namespace: default\n  labels: {{kubernetes.io/service-name: hostnames}}\n\
         addressType: IPv4\nports:\n- {{name: web, port: 9376, protocol: {proto}}}\nendpoints:{eps}"
    )
}

/// The plan from `state` to the objects in `yaml`, as node1 (NODE) translates them.
fn plan_for(state: &MapState, yaml: &str) -> plan::Plan {
    let (services, slices) = objects(yaml);
    let t = translate::translate(&translate::Input {
        services: &services,
        slices: &slices,
        node_name: "node1",
        node_zone: None,
        nodeport_addresses: &[NODE],
        node_ip: Some(NODE),
    });
    assert!(
        t.issues.is_empty(),
        "fixture has issues: {:?}",
        t.issues.iter().map(|i| i.to_string()).collect::<Vec<_>>()
    );
    plan::plan(state, &t.desired, &t.cluster_ips)
}

struct Fixture {
    dp: Datapath,
    state: MapState,
}

impl Fixture {
    fn new(yaml: &str) -> Self {
        Self::with_options(yaml, &LoadOptions::default())
    }

    fn with_options(yaml: &str, opts: &LoadOptions) -> Self {
        require_root();
        let mut dp = Datapath::load(opts).expect("load the eBPF object");
        dp.set_config(&NodeConfig {
            hairpin_addr_be: abi::addr_be(HAIRPIN),
            node_addr_be: abi::addr_be(NODE),
            cluster_cidr_be: abi::addr_be(Ipv4Addr::new(10, 76, 0, 0)),
            cluster_mask_be: abi::addr_be(Ipv4Addr::new(255, 255, 0, 0)),
            snat_port_min: 61000,
            snat_port_max: 65000,
            ..Default::default()
        })
        .expect("config");
        let mut f = Self {
            dp,
            state: MapState::default(),
        };
        f.program(yaml);
        f
    }

    fn program(&mut self, yaml: &str) {
        let p = plan_for(&self.state, yaml);
        let mut maps = self.dp.lb_maps().expect("maps");
        plan::apply_plan(&mut self.state, &p, &mut maps).expect("apply plan");
    }

    fn run(&self, prog: &'static str, pkt: &[u8]) -> (u32, Vec<u8>) {
        test_run(self.dp.program(prog).expect("program"), pkt)
    }

    fn counter(&self, idx: u32) -> u64 {
        self.dp.counters().expect("counters")[idx as usize]
    }
}

/// Runs `prog` once on `pkt` (BPF_PROG_TEST_RUN): its verdict and the packet it leaves.
fn test_run<P>(prog: &P, pkt: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let mut out = vec![0u8; pkt.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// Ethernet + IPv4 (optional options) + TCP SYN or UDP, checksums computed from scratch.
fn packet(
    proto: u8,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    ip_options: usize,
    udp_zero_csum: bool,
) -> Vec<u8> {
    let payload = b"hello";
    let l4 = if proto == TCP {
        packet::tcp(src.1, dst.1, 1000, 0, tcp_flags::SYN, payload)
    } else {
        packet::udp(src.1, dst.1, payload)
    };
    let l4 = if proto == UDP && udp_zero_csum {
        l4
    } else {
        ip(proto, src.0, dst.0, ip_options).with_checksum(l4)
    };
    frame(proto, src.0, dst.0, ip_options, &l4)
}

/// `packet`'s TCP segment with other flags (ACK for an established flow, FIN, RST...).
fn tcp_with(flags: u8, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), ip_options: usize) -> Vec<u8> {
    let l4 = packet::tcp(src.1, dst.1, 1000, 1, flags, b"hello");
    let l4 = ip(TCP, src.0, dst.0, ip_options).with_checksum(l4);
    frame(TCP, src.0, dst.0, ip_options, &l4)
}

/// The fixtures' IPv4 header: identification 0x1234, DF, `ip_options` bytes of NOP options.
fn ip(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, ip_options: usize) -> Ipv4 {
    Ipv4::new(proto, src, dst)
        .id(0x1234)
        .dont_fragment()
        .nop_options(ip_options)
}

/// Ethernet + IPv4 (with `ip_options` bytes of NOP options, checksum computed) around `l4`.
fn frame(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, ip_options: usize, l4: &[u8]) -> Vec<u8> {
    let l3 = ip(proto, src, dst, ip_options).packet(l4);
    packet::ethernet(MAC_GW, MAC_POD, &l3)
}

#[derive(Debug)]
struct Parsed {
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    l4_csum: u16,
    dst_mac: [u8; 6],
}

/// Parses a frame and asserts that both checksums are right, recomputed from scratch.
fn parse_checked(f: &[u8]) -> Parsed {
    let h = packet::headers(f).expect("IPv4 + L4 headers");
    let ip = &f[14..];
    let (ihl, proto) = (h.ihl, h.proto);
    let stored = u16::from_be_bytes([ip[10], ip[11]]);
    assert_eq!(
        stored,
        packet::ipv4_header_checksum(&ip[..ihl]),
        "IPv4 header checksum"
    );
    let l4 = &ip[ihl..h.total_len];
    let off = packet::l4_csum_off(proto);
    let l4_csum = u16::from_be_bytes([l4[off], l4[off + 1]]);
    if !(proto == UDP && l4_csum == 0) {
        assert_eq!(
            l4_csum,
            packet::l4_checksum(h.src.0, h.dst.0, proto, l4),
            "L4 checksum"
        );
    }
    let mut dst_mac = [0u8; 6];
    dst_mac.copy_from_slice(&f[..6]);
    Parsed {
        src: h.src,
        dst: h.dst,
        l4_csum,
        dst_mac,
    }
}

const EPS: [&str; 3] = ["10.76.0.10", "10.76.0.11", "10.76.1.10"];

#[test]
fn tcp_to_cluster_ip_is_dnated_with_valid_checksums_and_sticky() {
    let f = Fixture::new(&hostnames(&EPS, "TCP"));
    let syn = packet(TCP, (CLIENT, 40000), (VIP, 80), 0, false);
    let (rc, out) = f.run(programs::POD_INGRESS, &syn);
    assert_eq!(rc, TC_ACT_OK);
    let p = parse_checked(&out);
    assert_eq!(
        p.src,
        (CLIENT, 40000),
        "source untouched for pod -> ClusterIP"
    );
    assert!(
        EPS.contains(&p.dst.0.to_string().as_str()),
        "DNAT to an endpoint, got {:?}",
        p.dst
    );
    assert_eq!(p.dst.1, 9376, "endpoint port from the EndpointSlice");
    assert_eq!(f.counter(counter::FWD_NEW), 1);
    // The same flow keeps its endpoint.
    for _ in 0..20 {
        let (rc, again) = f.run(programs::POD_INGRESS, &syn);
        assert_eq!(rc, TC_ACT_OK);
        assert_eq!(parse_checked(&again).dst, p.dst);
    }
    assert_eq!(f.counter(counter::FWD_ESTABLISHED), 20);
    assert_eq!(f.counter(counter::FWD_NEW), 1);
}

#[test]
fn reply_is_reverse_translated_on_the_clients_port() {
    let f = Fixture::new(&hostnames(&EPS, "TCP"));
    let (_, out) = f.run(
        programs::POD_INGRESS,
        &packet(TCP, (CLIENT, 40001), (VIP, 80), 0, false),
    );
    let backend = parse_checked(&out).dst;
    let reply = packet(TCP, backend, (CLIENT, 40001), 0, false);
    let (rc, out) = f.run(programs::POD_EGRESS, &reply);
    assert_eq!(rc, TC_ACT_OK);
    let p = parse_checked(&out);
    assert_eq!(
        p.src,
        (VIP, 80),
        "the client sees the VIP as the reply source"
    );
    assert_eq!(p.dst, (CLIENT, 40001));
    assert_eq!(f.counter(counter::REPLY), 1);
    // A reply already translated (a second hook) is left alone.
    let (rc, again) = f.run(programs::POD_EGRESS, &out);
    assert_eq!((rc, again), (TC_ACT_OK, out));
}

#[test]
fn new_flows_spread_uniformly_over_all_endpoints() {
    let f = Fixture::new(&hostnames(&EPS, "TCP"));
    let mut hits: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
    for port in 0..600u16 {
        let (rc, out) = f.run(
            programs::POD_INGRESS,
            &packet(TCP, (CLIENT, 20000 + port), (VIP, 80), 0, false),
        );
        assert_eq!(rc, TC_ACT_OK);
        *hits.entry(parse_checked(&out).dst.0).or_default() += 1;
    }
    assert_eq!(hits.len(), 3, "every endpoint chosen: {hits:?}");
    for (ip, n) in &hits {
        // Expected 200 each; 120 is > 6 standard deviations below.
        assert!(
            *n > 120,
            "endpoint {ip} got only {n} of 600 flows: {hits:?}"
        );
    }
}

#[test]
fn udp_with_and_without_checksum() {
    let f = Fixture::new(&hostnames(&EPS, "UDP"));
    let (rc, out) = f.run(
        programs::POD_INGRESS,
        &packet(UDP, (CLIENT, 5000), (VIP, 80), 0, false),
    );
    assert_eq!(rc, TC_ACT_OK);
    let p = parse_checked(&out);
    assert!(EPS.contains(&p.dst.0.to_string().as_str()));
    assert_ne!(p.l4_csum, 0);
    let (rc, out) = f.run(
        programs::POD_INGRESS,
        &packet(UDP, (CLIENT, 5001), (VIP, 80), 0, true),
    );
    assert_eq!(rc, TC_ACT_OK);
    let p = parse_checked(&out);
    assert_eq!(p.l4_csum, 0, "a zero UDP checksum stays zero");
    assert_eq!(p.dst.1, 9376);
    // TCP to a ClusterIP whose port is UDP-only: REJECT, like kube-proxy.
    let tcp = packet(TCP, (CLIENT, 5002), (VIP, 80), 0, false);
    let (rc, out) = f.run(programs::POD_INGRESS, &tcp);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(out[14 + 20 + 13] & 0x04, 0x04, "a TCP RST");
}

#[test]
fn non_service_and_malformed_packets_pass_untouched() {
    let f = Fixture::new(&hostnames(&EPS, "TCP"));
    let other = packet(
        TCP,
        (CLIENT, 40000),
        (Ipv4Addr::new(10, 76, 1, 10), 9376),
        0,
        false,
    );
    assert_eq!(
        f.run(programs::POD_INGRESS, &other),
        (TC_ACT_OK, other.clone())
    );
    // A ClusterIP on a port no service uses is rejected, not passed.
    let wrong_port = packet(TCP, (CLIENT, 40000), (VIP, 81), 0, false);
    let (rc, out) = f.run(programs::POD_INGRESS, &wrong_port);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(parse_checked(&out).src, (VIP, 81), "RST from the ClusterIP");
    assert_eq!(f.counter(counter::REJECT), 1);
    // Truncated TCP header (cut inside the checksum field).
    let syn = packet(TCP, (CLIENT, 40000), (VIP, 80), 0, false);
    let cut = syn[..14 + 20 + 10].to_vec();
    assert_eq!(f.run(programs::POD_INGRESS, &cut), (TC_ACT_OK, cut.clone()));
    assert_eq!(f.counter(counter::PASS_MALFORMED), 1);
    // Bad IHL.
    let mut bad = syn.clone();
    bad[14] = 0x43;
    assert_eq!(f.run(programs::POD_INGRESS, &bad), (TC_ACT_OK, bad.clone()));
    assert_eq!(f.counter(counter::PASS_MALFORMED), 2);
    // A non-first fragment carries no ports.
    let mut frag = syn.clone();
    frag[14 + 6] = 0x00;
    frag[14 + 7] = 0x10;
    assert_eq!(
        f.run(programs::POD_INGRESS, &frag),
        (TC_ACT_OK, frag.clone())
    );
    assert_eq!(f.counter(counter::PASS_FRAGMENT), 1);
    assert_eq!(f.counter(counter::FWD_NEW), 0);
}

#[test]
fn ip_options_are_honoured() {
    let f = Fixture::new(&hostnames(&EPS, "TCP"));
    let (rc, out) = f.run(
        programs::POD_INGRESS,
        &packet(TCP, (CLIENT, 40000), (VIP, 80), 8, false),
    );
    assert_eq!(rc, TC_ACT_OK);
    let p = parse_checked(&out);
    assert_eq!(p.dst.1, 9376, "ports found after the options");
}

#[test]
fn service_without_endpoints_rejects_tcp_with_rst() {
    let f = Fixture::new(&hostnames(&[], "TCP"));
    let (rc, out) = f.run(
        programs::POD_INGRESS,
        &packet(TCP, (CLIENT, 40000), (VIP, 80), 0, false),
    );
    assert_eq!(
        rc, TC_ACT_REDIRECT,
        "the RST goes back out of the client's port"
    );
    assert_eq!(out.len(), 14 + 20 + 20, "headers only");
    let p = parse_checked(&out);
    assert_eq!(
        p.src,
        (VIP, 80),
        "the RST comes from the address the client dialled"
    );
    assert_eq!(p.dst, (CLIENT, 40000));
    assert_eq!(p.dst_mac, MAC_POD);
    let tcp = &out[34..];
    assert_eq!(tcp[13], 0x14, "RST|ACK");
    assert_eq!(
        u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
        1000 + 5 + 1,
        "acks SYN + payload"
    );
    assert_eq!(f.counter(counter::REJECT), 1);
}

#[test]
fn service_without_endpoints_rejects_udp_with_icmp_port_unreachable() {
    let f = Fixture::new(&hostnames(&[], "UDP"));
    let pkt = packet(UDP, (CLIENT, 5353), (VIP, 80), 0, false);
    let (rc, out) = f.run(programs::POD_INGRESS, &pkt);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(out.len(), 14 + 20 + 8 + 28);
    let ip = &out[14..34];
    assert_eq!(
        u16::from_be_bytes([ip[10], ip[11]]),
        packet::ipv4_header_checksum(ip),
        "IPv4 checksum"
    );
    assert_eq!(ip[9], 1, "ICMP");
    assert_eq!(&ip[12..16], &VIP.octets(), "from the VIP");
    assert_eq!(&ip[16..20], &CLIENT.octets());
    let icmp = &out[34..];
    assert_eq!((icmp[0], icmp[1]), (3, 3), "destination/port unreachable");
    assert_eq!(
        csum::fold(csum::add_bytes(0, icmp)),
        0xffff,
        "ICMP checksum"
    );
    assert_eq!(
        &icmp[8..36],
        &pkt[14..42],
        "quotes the offending header and 8 bytes"
    );
    assert_eq!(f.counter(counter::REJECT), 1);
}

/// With IP options the quote grows with the header: the client's stack finds the ports after
/// the options (the kernel's icmp_send quotes the same way).
#[test]
fn udp_with_ip_options_is_rejected_quoting_the_whole_header() {
    let f = Fixture::new(&hostnames(&[], "UDP"));
    for opts in [4, 40] {
        let pkt = packet(UDP, (CLIENT, 5354), (VIP, 80), opts, false);
        let (rc, out) = f.run(programs::POD_INGRESS, &pkt);
        assert_eq!(rc, TC_ACT_REDIRECT, "{opts} bytes of options");
        let q = 20 + opts + 8;
        assert_eq!(out.len(), 14 + 20 + 8 + q);
        let ip = &out[14..34];
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, 20 + 8 + q);
        assert_eq!(
            u16::from_be_bytes([ip[10], ip[11]]),
            packet::ipv4_header_checksum(ip)
        );
        let icmp = &out[34..];
        assert_eq!((icmp[0], icmp[1]), (3, 3));
        assert_eq!(
            csum::fold(csum::add_bytes(0, icmp)),
            0xffff,
            "ICMP checksum"
        );
        assert_eq!(&icmp[8..], &pkt[14..14 + q], "header, options and 8 bytes");
    }
    assert_eq!(f.counter(counter::REJECT), 2);
}

#[test]
fn hairpin_snats_and_sends_both_directions_back_to_the_pod() {
    let me = Ipv4Addr::new(10, 76, 0, 10);
    let f = Fixture::new(&hostnames(&["10.76.0.10"], "TCP"));
    let (rc, out) = f.run(
        programs::POD_INGRESS,
        &packet(TCP, (me, 41000), (VIP, 80), 0, false),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    let p = parse_checked(&out);
    assert_eq!(p.dst, (me, 9376));
    assert_eq!(
        p.src,
        (HAIRPIN, 41000),
        "the pod must not see its own address as the source"
    );
    assert_eq!(p.dst_mac, MAC_POD, "sent back to the pod");
    assert_eq!(f.counter(counter::HAIRPIN), 1);
    let (rc, out) = f.run(
        programs::POD_INGRESS,
        &packet(TCP, (me, 9376), (HAIRPIN, 41000), 0, false),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    let p = parse_checked(&out);
    assert_eq!(p.src, (VIP, 80));
    assert_eq!(p.dst, (me, 41000));
}

#[test]
fn flows_to_a_removed_endpoint_move_to_a_live_one() {
    let mut f = Fixture::new(&hostnames(&EPS, "UDP"));
    let pkt = packet(UDP, (CLIENT, 7000), (VIP, 80), 0, false);
    let (_, out) = f.run(programs::POD_INGRESS, &pkt);
    let first = parse_checked(&out).dst.0.to_string();
    let rest: Vec<&str> = EPS.iter().copied().filter(|e| *e != first).collect();
    f.program(&hostnames(&rest, "UDP"));
    let (rc, out) = f.run(programs::POD_INGRESS, &pkt);
    assert_eq!(rc, TC_ACT_OK);
    let now = parse_checked(&out).dst.0.to_string();
    assert_ne!(now, first, "the flow left the removed endpoint");
    assert!(rest.contains(&now.as_str()));
    assert_eq!(f.counter(counter::REBALANCED), 1);
}

/// A LoadBalancer service with NodePort 30080, LB IP 203.0.113.10 and the given policy.
fn load_balancer(endpoints: &[(&str, &str)], local: bool, ranges: &[&str]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(ip, node)| {
            format!(
                "\n  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n    nodeName: {node}"
            )
        })
        .collect();
    let ranges = if ranges.is_empty() {
        String::new()
    } else {
        format!("  loadBalancerSourceRanges: [{}]\n", ranges.join(", "))
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: default}}\n\
         spec:\n  type: LoadBalancer\n  clusterIP: {VIP}\n  externalTrafficPolicy: {}\n{ranges}  ports:\n  - {{name: web, port: 80, targetPort: 9376, protocol: TCP, nodePort: 30080}}\n\
         status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.10}}]}}}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: lb-abc\n  namespace: default\n  labels: {{kubernetes.io/service-name: lb}}\n\
         addressType: IPv4\nports:\n- {{name: web, port: 9376, protocol: TCP}}\nendpoints:{eps}",
        if local { "Local" } else { "Cluster" }
    )
}

const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

#[test]
fn nodeport_from_outside_is_masqueraded_to_the_node_and_replies_come_back_from_the_nodeport() {
    let f = Fixture::new(&load_balancer(&[("10.76.1.10", "node2")], false, &[]));
    let (rc, out) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, (EXT, 50000), (NODE, 30080), 0, false),
    );
    assert!(
        rc == TC_ACT_OK || rc == TC_ACT_REDIRECT,
        "forwarded, got {rc}"
    );
    let p = parse_checked(&out);
    assert_eq!(p.dst, (Ipv4Addr::new(10, 76, 1, 10), 9376));
    assert_eq!(p.src.0, NODE, "masqueraded to the node");
    assert!(
        (61000..=65000).contains(&p.src.1),
        "SNAT port from our range: {}",
        p.src.1
    );
    assert_eq!(f.counter(counter::MASQUERADE), 1);
    // The backend's reply, coming back to the node on the uplink.
    let (rc, back) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, p.dst, p.src, 0, false),
    );
    assert!(rc == TC_ACT_OK || rc == TC_ACT_REDIRECT, "got {rc}");
    let r = parse_checked(&back);
    assert_eq!(r.src, (NODE, 30080), "the client sees the NodePort");
    assert_eq!(r.dst, (EXT, 50000));
}

#[test]
fn load_balancer_ip_with_local_policy_keeps_the_client_and_drops_without_local_endpoints() {
    let f = Fixture::new(&load_balancer(&[("10.76.0.10", "node1")], true, &[]));
    let (_, out) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, (EXT, 50001), (LB_IP, 80), 0, false),
    );
    let p = parse_checked(&out);
    assert_eq!(p.dst, (Ipv4Addr::new(10, 76, 0, 10), 9376));
    assert_eq!(p.src, (EXT, 50001), "client address preserved");
    let f = Fixture::new(&load_balancer(&[("10.76.1.10", "node2")], true, &[]));
    let (rc, _) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, (EXT, 50002), (LB_IP, 80), 0, false),
    );
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(f.counter(counter::DROP_NO_LOCAL_BACKEND), 1);
}

/// Captures the programs' aya-log records (what the agent's reader forwards to its log).
#[derive(Clone, Default)]
struct Records(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Records {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        let line = datapath::debuglog::describe(&r.args().to_string());
        self.0.lock().expect("records lock").push(line);
    }
    fn flush(&self) {}
}

impl Records {
    fn take(&self, logger: &mut aya_log::EbpfLogger<Records>) -> Vec<String> {
        logger.flush();
        std::mem::take(&mut *self.0.lock().expect("records lock"))
    }
}

/// Debug logging: silent while off; when on, one line per drop or reject naming the reason
/// and the packet; forwarded packets never log; the agent's config writes keep the switch.
#[test]
fn datapath_debug_log_says_why_a_flow_was_dropped_or_rejected() {
    let mut f = Fixture::new(&load_balancer(
        &[("10.76.0.10", "node1")],
        false,
        &["198.51.100.0/24"],
    ));
    let records = Records::default();
    let mut logger = aya_log::EbpfLogger::init_with_logger(&mut f.dp.ebpf, records.clone())
        .expect("the object carries the aya-log ring buffer");
    let outside = packet(TCP, (EXT, 50003), (LB_IP, 80), 0, false);
    let (rc, _) = f.run(programs::UPLINK_INGRESS, &outside);
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(records.take(&mut logger), Vec::<String>::new(), "off");

    f.dp.set_datapath_debug(true).expect("switch on");
    let (rc, _) = f.run(programs::UPLINK_INGRESS, &outside);
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(
        records.take(&mut logger),
        [format!("drop_source_range TCP {EXT}:50003 -> {LB_IP}:80")]
    );
    let inside = packet(
        TCP,
        (Ipv4Addr::new(198, 51, 100, 7), 50004),
        (LB_IP, 80),
        0,
        false,
    );
    f.run(programs::UPLINK_INGRESS, &inside);
    assert_eq!(records.take(&mut logger), Vec::<String>::new(), "forwarded");

    // The agent rewrites its config (a node address change): the switch stays on.
    f.dp.set_config(&NodeConfig {
        node_addr_be: abi::addr_be(NODE),
        ..Default::default()
    })
    .expect("config");
    // A ClusterIP port no service uses: rejected, and said so.
    let unused = packet(UDP, (CLIENT, 5353), (VIP, 81), 0, false);
    let (rc, _) = f.run(programs::POD_INGRESS, &unused);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(
        records.take(&mut logger),
        [format!("reject UDP {CLIENT}:5353 -> {VIP}:81")]
    );

    f.dp.set_datapath_debug(false).expect("switch off");
    f.run(programs::UPLINK_INGRESS, &outside);
    assert_eq!(records.take(&mut logger), Vec::<String>::new(), "off again");
}

#[test]
fn load_balancer_source_ranges() {
    let f = Fixture::new(&load_balancer(
        &[("10.76.0.10", "node1")],
        false,
        &["198.51.100.0/24"],
    ));
    let (rc, _) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, (EXT, 50003), (LB_IP, 80), 0, false),
    );
    assert_eq!(rc, TC_ACT_SHOT, "192.0.2.10 is outside the ranges");
    assert_eq!(f.counter(counter::DROP_SOURCE_RANGE), 1);
    let inside = Ipv4Addr::new(198, 51, 100, 7);
    let (_, out) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, (inside, 50004), (LB_IP, 80), 0, false),
    );
    assert_eq!(
        parse_checked(&out).dst,
        (Ipv4Addr::new(10, 76, 0, 10), 9376)
    );
    // The NodePort of the same service ignores the ranges.
    let (_, out) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, (EXT, 50005), (NODE, 30080), 0, false),
    );
    assert_eq!(
        parse_checked(&out).dst,
        (Ipv4Addr::new(10, 76, 0, 10), 9376)
    );
}

/// Wraps `inner` (an Ethernet frame) in IPIP or GUE (variant 1) from `EXT` to the node.
fn wrap(inner: &[u8], gue: bool) -> Vec<u8> {
    if gue {
        encap(inner, UDP, &gue_udp(inner, &[]))
    } else {
        encap(inner, 4, &[])
    }
}

/// The UDP header (to `GUE_PORT`) and `gue_header` that go in front of `inner`'s IPv4 packet.
fn gue_udp(inner: &[u8], gue_header: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&40000u16.to_be_bytes());
    u.extend_from_slice(&proxy_common::GUE_PORT.to_be_bytes());
    u.extend_from_slice(&((8 + gue_header.len() + inner.len() - 14) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(gue_header);
    u
}

/// `inner`'s Ethernet header, an outer IPv4 header (`proto`, `EXT` to the node), `extra`,
/// then `inner`'s IPv4 packet.
fn encap(inner: &[u8], proto: u8, extra: &[u8]) -> Vec<u8> {
    packet::encapsulate(inner, &Ipv4::new(proto, EXT, NODE), extra)
}

#[test]
fn ipip_and_gue_wrapped_load_balancer_traffic_is_decapsulated_keeping_the_vip() {
    let f = Fixture::new(&load_balancer(&[("10.76.0.10", "node1")], true, &[]));
    for (i, gue) in [false, true].into_iter().enumerate() {
        let inner = packet(TCP, (EXT, 51000 + i as u16), (LB_IP, 80), 0, false);
        let (_, out) = f.run(programs::UPLINK_INGRESS, &wrap(&inner, gue));
        assert_eq!(out.len(), inner.len(), "gue={gue}: outer header stripped");
        let p = parse_checked(&out);
        assert_eq!(
            p.src,
            (EXT, 51000 + i as u16),
            "gue={gue}: the inner client"
        );
        assert_eq!(
            p.dst,
            (Ipv4Addr::new(10, 76, 0, 10), 9376),
            "gue={gue}: the VIP was balanced"
        );
        // The reply is direct (DSR): from the VIP straight to the client.
        let (_, back) = f.run(programs::POD_INGRESS, &packet(TCP, p.dst, p.src, 0, false));
        assert_eq!(parse_checked(&back).src, (LB_IP, 80), "gue={gue}");
    }
    assert_eq!(f.counter(counter::DECAP), 2);
}

/// An ICMP error (type/code) from `from` to `to`, quoting the first 28 bytes of `quoted`'s
/// IPv4 packet, checksums computed from scratch.
fn icmp_error(ty: u8, code: u8, from: Ipv4Addr, to: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let ip = Ipv4::new(1, from, to);
    // Next-hop MTU 1400.
    let icmp = ip.with_checksum(packet::icmp(
        ty,
        code,
        [0, 0, 0x05, 0x78],
        &quoted[14..14 + 28],
    ));
    packet::ethernet(MAC_GW, MAC_POD, &ip.packet(&icmp))
}

/// Checks the outer IPv4, ICMP and quoted IPv4 checksums; returns (outer src, outer dst,
/// quoted src, quoted dst).
type Outer = (Ipv4Addr, Ipv4Addr);
type Quoted = ((Ipv4Addr, u16), (Ipv4Addr, u16));

fn parse_icmp_error(f: &[u8]) -> (Outer, Quoted) {
    let ip = &f[14..34];
    assert_eq!(
        u16::from_be_bytes([ip[10], ip[11]]),
        packet::ipv4_header_checksum(ip),
        "outer IPv4 checksum"
    );
    let icmp = &f[34..];
    assert_eq!(
        csum::fold(csum::add_bytes(0, icmp)),
        0xffff,
        "ICMP checksum"
    );
    let q = &icmp[8..];
    assert_eq!(
        u16::from_be_bytes([q[10], q[11]]),
        packet::ipv4_header_checksum(&q[..20]),
        "quoted IPv4 checksum"
    );
    let a = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    (
        (a(&ip[12..16]), a(&ip[16..20])),
        (
            (a(&q[12..16]), u16::from_be_bytes([q[20], q[21]])),
            (a(&q[16..20]), u16::from_be_bytes([q[22], q[23]])),
        ),
    )
}

#[test]
fn fragmentation_needed_about_a_dnated_flow_is_translated_back_to_the_vip() {
    let f = Fixture::new(&hostnames(&["10.76.1.10"], "TCP"));
    let backend = (Ipv4Addr::new(10, 76, 1, 10), 9376);
    let (_, out) = f.run(
        programs::POD_INGRESS,
        &packet(TCP, (CLIENT, 40010), (VIP, 80), 0, false),
    );
    assert_eq!(parse_checked(&out).dst, backend);
    // A router on the way to the backend cannot forward the (translated) segment.
    let router = Ipv4Addr::new(10, 240, 0, 1);
    let err = icmp_error(3, 4, router, CLIENT, &out);
    let (rc, xl) = f.run(programs::POD_EGRESS, &err);
    assert_eq!(rc, TC_ACT_OK);
    let ((osrc, odst), (qsrc, qdst)) = parse_icmp_error(&xl);
    assert_eq!(
        (osrc, odst),
        (router, CLIENT),
        "the router's own address stays"
    );
    assert_eq!(qsrc, (CLIENT, 40010));
    assert_eq!(
        qdst,
        (VIP, 80),
        "the quoted packet is the one the client's socket sent"
    );
    assert_eq!(f.counter(counter::ICMP_ERROR_XLATED), 1);
    // From the backend itself (port unreachable), the outer source becomes the VIP too.
    let err = icmp_error(3, 3, backend.0, CLIENT, &out);
    let (_, xl) = f.run(programs::POD_EGRESS, &err);
    let ((osrc, _), (_, qdst)) = parse_icmp_error(&xl);
    assert_eq!(osrc, VIP);
    assert_eq!(qdst, (VIP, 80));
    // An ICMP error about a flow we never saw is left alone.
    let other = packet(TCP, (CLIENT, 40011), backend, 0, false);
    let err = icmp_error(3, 4, router, CLIENT, &other);
    assert_eq!(f.run(programs::POD_EGRESS, &err), (TC_ACT_OK, err.clone()));
}

#[test]
fn fragmentation_needed_about_a_masqueraded_reply_reaches_the_backend() {
    let f = Fixture::new(&load_balancer(&[("10.76.1.10", "node2")], false, &[]));
    let (_, fwd) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, (EXT, 50100), (NODE, 30080), 0, false),
    );
    let p = parse_checked(&fwd);
    let (_, reply) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, p.dst, p.src, 0, false),
    );
    assert_eq!(parse_checked(&reply).src, (NODE, 30080));
    // The path back to the client has a smaller MTU: the router tells the node.
    let router = Ipv4Addr::new(192, 0, 2, 1);
    let err = icmp_error(3, 4, router, NODE, &reply);
    let (_, xl) = f.run(programs::UPLINK_INGRESS, &err);
    let ((osrc, odst), (qsrc, qdst)) = parse_icmp_error(&xl);
    assert_eq!(osrc, router);
    assert_eq!(
        odst, p.dst.0,
        "delivered to the backend that sent the big segment"
    );
    assert_eq!(qsrc, p.dst, "quoted as the backend sent it");
    assert_eq!(qdst, p.src, "to the masquerade address it used");
}

// ---- SCTP: DNAT with the CRC32c kept valid (docs/semantics.md S18) ----

const SCTP: u8 = 132;

/// Ethernet + IPv4 + SCTP common header + one DATA chunk (odd-length payload, padded), CRC32c
/// computed from scratch, followed by `trailer` bytes of Ethernet padding beyond the datagram.
fn sctp_packet(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), trailer: usize) -> Vec<u8> {
    let payload = b"sctp payload, 27 bytes long";
    // DATA chunk: type 0, flags B|E, length, TSN, stream id, stream seq, PPID, payload.
    let mut chunk = vec![0, 0x03];
    chunk.extend_from_slice(&((16 + payload.len()) as u16).to_be_bytes());
    chunk.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    chunk.extend_from_slice(payload);
    chunk.resize(chunk.len().next_multiple_of(4), 0);
    let l4 = packet::sctp(src.1, dst.1, 0x5ca1_ab1e, &chunk); // verification tag
    let l4 = ip(SCTP, src.0, dst.0, 0).with_checksum(l4);
    let mut f = frame(SCTP, src.0, dst.0, 0, &l4);
    f.extend(std::iter::repeat_n(0xeeu8, trailer));
    f
}

/// Parses an SCTP frame, asserting the IPv4 checksum and the CRC32c (over the datagram only,
/// not the Ethernet padding), both recomputed from scratch. Returns (src, dst).
fn parse_sctp_checked(f: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let ip = &f[14..];
    let stored = u16::from_be_bytes([ip[10], ip[11]]);
    assert_eq!(
        stored,
        packet::ipv4_header_checksum(&ip[..20]),
        "IPv4 header checksum"
    );
    assert_eq!(ip[9], SCTP);
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let l4 = &ip[20..total];
    let stored = u32::from_le_bytes([l4[8], l4[9], l4[10], l4[11]]);
    assert_eq!(
        stored,
        proxy_common::crc32c::sctp_checksum(l4),
        "SCTP CRC32c"
    );
    let addr = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    ((addr(12), port(0)), (addr(16), port(2)))
}

#[test]
fn sctp_to_cluster_ip_is_dnated_and_reversed_with_a_valid_crc32c() {
    let f = Fixture::new(&hostnames(&EPS, "SCTP"));
    // Ethernet padding after the datagram must not enter the checksum arithmetic.
    let init = sctp_packet((CLIENT, 36412), (VIP, 80), 6);
    let (rc, out) = f.run(programs::POD_INGRESS, &init);
    assert_eq!(rc, TC_ACT_OK);
    let (src, dst) = parse_sctp_checked(&out);
    assert_eq!(
        src,
        (CLIENT, 36412),
        "source untouched for pod -> ClusterIP"
    );
    assert!(
        EPS.contains(&dst.0.to_string().as_str()),
        "DNAT to an endpoint, got {dst:?}"
    );
    assert_eq!(dst.1, 9376, "port rewritten, so the CRC had to be updated");
    assert_eq!(&out[out.len() - 6..], &[0xee; 6], "padding kept as it was");
    assert_eq!(f.counter(counter::FWD_NEW), 1);
    // The association's next packet keeps its endpoint.
    let (_, again) = f.run(programs::POD_INGRESS, &init);
    assert_eq!(parse_sctp_checked(&again).1, dst);
    assert_eq!(f.counter(counter::FWD_ESTABLISHED), 1);
    // The endpoint's reply comes back from the VIP's port.
    let (rc, back) = f.run(programs::POD_EGRESS, &sctp_packet(dst, (CLIENT, 36412), 0));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(parse_sctp_checked(&back), ((VIP, 80), (CLIENT, 36412)));
    assert_eq!(f.counter(counter::REPLY), 1);
}

#[test]
fn sctp_nodeport_is_masqueraded_with_both_ports_rewritten_and_a_valid_crc32c() {
    let yaml = load_balancer(&[("10.76.1.10", "node2")], false, &[]).replace("TCP", "SCTP");
    let f = Fixture::new(&yaml);
    let (rc, out) = f.run(
        programs::UPLINK_INGRESS,
        &sctp_packet((EXT, 50000), (NODE, 30080), 0),
    );
    assert!(
        rc == TC_ACT_OK || rc == TC_ACT_REDIRECT,
        "forwarded, got {rc}"
    );
    let (src, dst) = parse_sctp_checked(&out);
    assert_eq!(dst, (Ipv4Addr::new(10, 76, 1, 10), 9376));
    assert_eq!(src.0, NODE, "masqueraded to the node");
    assert!((61000..=65000).contains(&src.1), "SNAT port {}", src.1);
    let (rc, back) = f.run(programs::UPLINK_INGRESS, &sctp_packet(dst, src, 0));
    assert!(rc == TC_ACT_OK || rc == TC_ACT_REDIRECT, "got {rc}");
    assert_eq!(parse_sctp_checked(&back), ((NODE, 30080), (EXT, 50000)));
}

#[test]
fn sctp_service_without_endpoints_is_rejected_with_icmp_port_unreachable() {
    let f = Fixture::new(&hostnames(&[], "SCTP"));
    let (rc, out) = f.run(
        programs::POD_INGRESS,
        &sctp_packet((CLIENT, 36412), (VIP, 80), 0),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(out[14 + 9], 1, "ICMP");
    assert_eq!((out[34], out[35]), (3, 3), "destination/port unreachable");
    assert_eq!(f.counter(counter::REJECT), 1);
}

// ---- docs/semantics.md S8: masquerade by source needs a way to tell local traffic ----

#[test]
fn cluster_ip_from_outside_is_masqueraded_only_when_a_cluster_cidr_is_configured() {
    let mut f = Fixture::new(&hostnames(&EPS, "TCP"));
    let (rc, out) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, (EXT, 41000), (VIP, 80), 0, false),
    );
    assert!(
        rc == TC_ACT_OK || rc == TC_ACT_REDIRECT,
        "forwarded, got {rc}"
    );
    let p = parse_checked(&out);
    assert!(EPS.contains(&p.dst.0.to_string().as_str()), "DNAT: {p:?}");
    assert_ne!(p.src.0, EXT, "outside the cluster CIDR: masqueraded");
    assert_eq!(f.counter(counter::MASQUERADE), 1);

    // No cluster CIDR (kube-proxy without --cluster-cidr or a detect-local mode): nothing is
    // masqueraded because of its source.
    f.dp.set_config(&NodeConfig {
        hairpin_addr_be: abi::addr_be(HAIRPIN),
        node_addr_be: abi::addr_be(NODE),
        snat_port_min: 61000,
        snat_port_max: 65000,
        ..Default::default()
    })
    .expect("config");
    let (rc, out) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, (EXT, 41001), (VIP, 80), 0, false),
    );
    assert!(
        rc == TC_ACT_OK || rc == TC_ACT_REDIRECT,
        "forwarded, got {rc}"
    );
    let p = parse_checked(&out);
    assert!(EPS.contains(&p.dst.0.to_string().as_str()), "DNAT: {p:?}");
    assert_eq!(p.src, (EXT, 41001), "client address kept");
    assert_eq!(f.counter(counter::MASQUERADE), 1, "no second masquerade");
}

// ---- REJECT hygiene (issue 11 item 4) ----

#[test]
fn reject_never_answers_unspecified_loopback_multicast_or_class_e_sources() {
    let f = Fixture::new(&hostnames(&[], "TCP"));
    let fu = Fixture::new(&hostnames(&[], "UDP"));
    let bad = [
        "0.0.0.0",
        "0.1.2.3",
        "127.0.0.1",
        "127.255.0.9",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
    ];
    for (i, src) in bad.iter().enumerate() {
        let src: Ipv4Addr = src.parse().expect("address");
        for (fx, proto) in [(&f, TCP), (&fu, UDP)] {
            let pkt = packet(proto, (src, 40000), (VIP, 80), 0, false);
            let (rc, out) = fx.run(programs::POD_INGRESS, &pkt);
            assert_eq!(rc, TC_ACT_SHOT, "no reply to {src} (proto {proto})");
            assert_eq!(out, pkt, "the packet is not turned into a reply");
        }
        assert_eq!(f.counter(counter::DROP_REJECT_BAD_SOURCE), i as u64 + 1);
    }
    assert_eq!(f.counter(counter::REJECT), 0);
    assert_eq!(fu.counter(counter::REJECT), 0);
    // The edges of the good range are still answered.
    for src in ["1.0.0.1", "126.255.255.255", "128.0.0.1", "223.255.255.254"] {
        let src: Ipv4Addr = src.parse().expect("address");
        let (rc, _) = f.run(
            programs::POD_INGRESS,
            &packet(TCP, (src, 40000), (VIP, 80), 0, false),
        );
        assert_eq!(rc, TC_ACT_REDIRECT, "{src} gets its RST");
    }
    assert_eq!(f.counter(counter::REJECT), 4);
}

/// A subnet's directed broadcast address (the agent lists the node's, from its interfaces)
/// is never answered either; the subnet's other addresses are.
#[test]
fn reject_never_answers_a_directed_broadcast_source_of_the_nodes_subnets() {
    let mut f = Fixture::new(&hostnames(&[], "UDP"));
    let nets = [(NODE, 24), (HAIRPIN, 24)];
    f.dp.set_broadcasts(&datapath::netlink::subnet_broadcasts(&nets))
        .expect("broadcasts");
    for src in ["10.240.0.255", "10.76.0.255"] {
        let src: Ipv4Addr = src.parse().expect("address");
        let pkt = packet(UDP, (src, 40000), (VIP, 80), 0, false);
        let (rc, out) = f.run(programs::POD_INGRESS, &pkt);
        assert_eq!(rc, TC_ACT_SHOT, "no reply to {src}");
        assert_eq!(out, pkt, "the packet is not turned into a reply");
    }
    assert_eq!(f.counter(counter::DROP_REJECT_BAD_SOURCE), 2);
    let (rc, _) = f.run(
        programs::POD_INGRESS,
        &packet(
            UDP,
            (Ipv4Addr::new(10, 76, 0, 254), 40000),
            (VIP, 80),
            0,
            false,
        ),
    );
    assert_eq!(rc, TC_ACT_REDIRECT, "10.76.0.254 gets its port unreachable");
    // The agent's list follows the node: a subnet gone, its broadcast is answered again.
    f.dp.set_broadcasts(&[]).expect("broadcasts");
    let (rc, _) = f.run(
        programs::POD_INGRESS,
        &packet(
            UDP,
            (Ipv4Addr::new(10, 76, 0, 255), 40001),
            (VIP, 80),
            0,
            false,
        ),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(f.counter(counter::REJECT), 2);
}

#[test]
fn reject_replies_beyond_the_token_bucket_are_suppressed_and_counted() {
    require_root();
    // The bucket is per CPU: keep every run on one CPU so one bucket sees the whole burst.
    // SAFETY: a zeroed cpu_set_t with CPU 0 set, for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "pin to CPU 0"
        );
    }
    let f = Fixture::new(&hostnames(&[], "TCP"));
    let n = 200u64;
    let mut replies = 0u64;
    for i in 0..n {
        let pkt = packet(TCP, (CLIENT, 20000 + i as u16), (VIP, 80), 0, false);
        let (rc, out) = f.run(programs::POD_INGRESS, &pkt);
        if rc == TC_ACT_REDIRECT {
            replies += 1;
        } else {
            assert_eq!(rc, TC_ACT_SHOT);
            assert_eq!(out, pkt, "a suppressed reject leaves the packet as it was");
        }
    }
    let suppressed = f.counter(counter::DROP_REJECT_RATE_LIMITED);
    // Burst 50, plus the refill (1 per ms) during the loop, which takes a few ms here.
    assert!(
        (50..100).contains(&replies),
        "{replies} replies out of {n}: the bucket holds 50"
    );
    assert_eq!(replies + suppressed, n, "every suppressed reply is counted");
    assert_eq!(f.counter(counter::REJECT), replies);
    // After a pause the bucket has refilled: the next one is answered again.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let pkt = packet(TCP, (CLIENT, 30000), (VIP, 80), 0, false);
    assert_eq!(f.run(programs::POD_INGRESS, &pkt).0, TC_ACT_REDIRECT);
}

#[test]
fn outer_fragments_are_never_decapsulated() {
    let f = Fixture::new(&load_balancer(&[("10.76.0.10", "node1")], true, &[]));
    let inner = packet(TCP, (EXT, 51100), (LB_IP, 80), 0, false);
    for gue in [false, true] {
        // More fragments set, then a non-zero offset: both are fragments of the outer packet.
        for frag in [0x2000u16, 0x0001] {
            let mut w = wrap(&inner, gue);
            w[20..22].copy_from_slice(&frag.to_be_bytes());
            w[24] = 0;
            w[25] = 0;
            let c = packet::ipv4_header_checksum(&w[14..34]);
            w[24..26].copy_from_slice(&c.to_be_bytes());
            let (_, out) = f.run(programs::UPLINK_INGRESS, &w);
            assert_eq!(out, w, "gue={gue} frag={frag:#x}: left wrapped");
            let (_, out) = xdp::run_xdp(&f, &w);
            assert_eq!(
                out, w,
                "gue={gue} frag={frag:#x}: XDP leaves it wrapped too"
            );
        }
    }
    assert_eq!(f.counter(counter::DECAP), 0);
    assert_eq!(f.counter(counter::XDP_DECAP), 0);
    // DF on the outer header is not a fragment: still decapsulated.
    let mut w = wrap(&inner, false);
    w[20] |= 0x40;
    w[24] = 0;
    w[25] = 0;
    let c = packet::ipv4_header_checksum(&w[14..34]);
    w[24..26].copy_from_slice(&c.to_be_bytes());
    let (_, out) = f.run(programs::UPLINK_INGRESS, &w);
    assert_eq!(out.len(), inner.len());
    assert_eq!(f.counter(counter::DECAP), 1);
}
