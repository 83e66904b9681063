//! Packet-fixture tests: the real eBPF programs, loaded into the kernel, run on synthesized
//! packets through BPF_PROG_TEST_RUN, with maps programmed by the production
//! manifests -> translate -> plan -> writer path. Needs root (CAP_BPF, CAP_NET_ADMIN).
use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::programs::{TestRun as _, TestRunOptions};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_common::{NodeConfig, counter, csum, programs};
use proxy_userspace::{
    abi,
    datapath::{Datapath, LoadOptions},
    plan::{self, MapState},
    translate,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const TCP: u8 = 6;
const UDP: u8 = 17;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 20);
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

struct Fixture {
    dp: Datapath,
    state: MapState,
}

impl Fixture {
    fn new(yaml: &str) -> Self {
        require_root();
        let mut dp = Datapath::load(&LoadOptions::default()).expect("load the eBPF object");
        dp.set_config(&NodeConfig {
            hairpin_addr_be: abi::addr_be(HAIRPIN),
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
        let (services, slices) = objects(yaml);
        let t = translate::translate(&translate::Input {
            services: &services,
            slices: &slices,
            node_name: "node1",
        });
        assert!(
            t.issues.is_empty(),
            "fixture has issues: {:?}",
            t.issues.iter().map(|i| i.to_string()).collect::<Vec<_>>()
        );
        let p = plan::plan(&self.state, &t.desired);
        let mut maps = self.dp.lb_maps().expect("maps");
        plan::apply_plan(&mut self.state, &p, &mut maps).expect("apply plan");
    }

    fn run(&self, prog: &'static str, pkt: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; pkt.len() + 256];
        let p = self.dp.program(prog).expect("program");
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn counter(&self, idx: u32) -> u64 {
        self.dp.counters().expect("counters")[idx as usize]
    }
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
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.1.to_be_bytes());
    l4.extend_from_slice(&dst.1.to_be_bytes());
    if proto == TCP {
        l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
        l4.extend_from_slice(&0u32.to_be_bytes()); // ack
        l4.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]); // SYN, window, csum, urg
    } else {
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(payload);
    let csum_off = if proto == TCP { 16 } else { 6 };
    if !(proto == UDP && udp_zero_csum) {
        let c = csum::l4_ipv4(src.0.octets(), dst.0.octets(), proto, &l4);
        l4[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
    }
    let ihl = 5 + ip_options / 4;
    let mut ip = vec![0x40 | ihl as u8, 0];
    ip.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
    ip.extend_from_slice(&src.0.octets());
    ip.extend_from_slice(&dst.0.octets());
    ip.extend(std::iter::repeat_n(1u8, ip_options)); // NOP options
    let c = csum::ipv4_header(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&MAC_GW);
    f.extend_from_slice(&MAC_POD);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
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
    let ip = &f[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let mut hdr = ip[..ihl].to_vec();
    let stored = u16::from_be_bytes([hdr[10], hdr[11]]);
    hdr[10] = 0;
    hdr[11] = 0;
    assert_eq!(stored, csum::ipv4_header(&hdr), "IPv4 header checksum");
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let proto = ip[9];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let mut l4 = ip[ihl..total].to_vec();
    let off = if proto == TCP { 16 } else { 6 };
    let l4_csum = u16::from_be_bytes([l4[off], l4[off + 1]]);
    if !(proto == UDP && l4_csum == 0) {
        l4[off] = 0;
        l4[off + 1] = 0;
        assert_eq!(
            l4_csum,
            csum::l4_ipv4(src.octets(), dst.octets(), proto, &l4),
            "L4 checksum"
        );
    }
    let sport = u16::from_be_bytes([ip[ihl], ip[ihl + 1]]);
    let dport = u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]);
    let mut dst_mac = [0u8; 6];
    dst_mac.copy_from_slice(&f[..6]);
    Parsed {
        src: (src, sport),
        dst: (dst, dport),
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
    // TCP to a UDP-only service port is not a service packet.
    let tcp = packet(TCP, (CLIENT, 5002), (VIP, 80), 0, false);
    assert_eq!(f.run(programs::POD_INGRESS, &tcp), (TC_ACT_OK, tcp));
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
    let wrong_port = packet(TCP, (CLIENT, 40000), (VIP, 81), 0, false);
    assert_eq!(
        f.run(programs::POD_INGRESS, &wrong_port),
        (TC_ACT_OK, wrong_port.clone())
    );
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
fn service_without_endpoints_drops_and_counts() {
    let f = Fixture::new(&hostnames(&[], "TCP"));
    let (rc, _) = f.run(
        programs::POD_INGRESS,
        &packet(TCP, (CLIENT, 40000), (VIP, 80), 0, false),
    );
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(f.counter(counter::DROP_NO_BACKEND), 1);
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
