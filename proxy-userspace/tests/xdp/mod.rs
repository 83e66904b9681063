//! Packet fixtures of the XDP fast path on the uplink (`lb_up_xdp`), part of the `fixtures`
//! test binary (same harness: real programs, maps programmed by translate -> plan -> writer).
//! Every XDP run is followed, where it matters, by the tc program on XDP's output, as in the
//! kernel.
use super::*;

const XDP_PASS: u32 = 2;
const LOCAL_EP: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 10);

/// XDP's verdict and the frame it hands on. Whether it marked the packet as translated (the
/// metadata tc reads) must agree with whether it rewrote the destination.
pub(super) fn run_xdp(f: &Fixture, pkt: &[u8]) -> (u32, Vec<u8>) {
    let before = f.counter(counter::XDP_FWD_ESTABLISHED);
    let r = datapath::xdp_test_run(
        f.dp.xdp_program(programs::UPLINK_XDP).expect("xdp program"),
        pkt,
        1,
    )
    .expect("BPF_PROG_TEST_RUN");
    let translated = f.counter(counter::XDP_FWD_ESTABLISHED) > before;
    assert_eq!(
        r.translated(),
        translated,
        "the XDP_META_TRANSLATED mark (meta {:?}) goes with a translation",
        r.meta
    );
    assert!(
        r.translated() || r.meta.is_empty(),
        "no other metadata: {:?}",
        r.meta
    );
    (r.verdict, r.frame)
}

/// XDP must hand `pkt` to tc byte for byte, unmarked.
fn assert_untouched(f: &Fixture, pkt: &[u8], what: &str) {
    let (rc, out) = run_xdp(f, pkt);
    assert_eq!(rc, XDP_PASS, "{what}: XDP_PASS");
    assert_eq!(out, pkt, "{what}: untouched");
}

/// Turns an Ethernet frame into an encapsulated one.
type Wrapper = fn(&[u8]) -> Vec<u8>;

/// Wraps an Ethernet frame in GUE variant 0 with an empty GUE header (hlen 0, proto IPIP).
fn wrap_gue_v0(inner: &[u8]) -> Vec<u8> {
    // Version 0, C 0, hlen 0, proto 4, flags 0.
    encap(inner, UDP, &gue_udp(inner, &[0, 4, 0, 0]))
}

/// The L4 checksum field rewritten to the folded pseudo-header sum: what a CHECKSUM_PARTIAL
/// skb from a veth peer carries.
fn as_partial_checksum(pkt: &[u8]) -> Vec<u8> {
    let mut p = pkt.to_vec();
    let h = packet::headers(pkt).expect("IPv4 + L4 headers");
    let sum = packet::pseudo_header_sum(pkt);
    let off = 14 + h.ihl + packet::l4_csum_off(h.proto);
    p[off..off + 2].copy_from_slice(&sum.to_be_bytes());
    p
}

#[test]
fn xdp_decapsulates_ipip_and_gue_v0_and_v1_keeping_the_vip() {
    let f = Fixture::new(&load_balancer(&[("10.76.0.10", "node1")], true, &[]));
    let wrappers: [(&str, Wrapper); 3] = [
        ("ipip", |i| wrap(i, false)),
        ("gue v1", |i| wrap(i, true)),
        ("gue v0", wrap_gue_v0),
    ];
    for (n, (what, wrapper)) in wrappers.iter().enumerate() {
        let inner = packet(TCP, (EXT, 52000 + n as u16), (LB_IP, 80), 0, false);
        let (rc, out) = run_xdp(&f, &wrapper(&inner));
        assert_eq!(rc, XDP_PASS, "{what}");
        assert_eq!(
            out, inner,
            "{what}: the outer header is gone, the inner frame (VIP intact) is what tc gets"
        );
        // tc on XDP's output: a new flow to the VIP, balanced there.
        let (rc, out) = f.run(programs::UPLINK_INGRESS, &out);
        assert_eq!(rc, TC_ACT_OK, "{what}");
        assert_eq!(parse_checked(&out).dst, (LOCAL_EP, 9376), "{what}");
    }
    assert_eq!(f.counter(counter::XDP_DECAP), 3);
    assert_eq!(f.counter(counter::DECAP), 0, "tc had nothing left to strip");
    // Not for this node, or not GUE: left alone (and not counted).
    let inner = packet(TCP, (EXT, 52100), (LB_IP, 80), 0, false);
    let mut other_node = wrap(&inner, false);
    other_node[14 + 19] ^= 1;
    assert_untouched(&f, &other_node, "IPIP for another address");
    let mut other_port = wrap(&inner, true);
    other_port[14 + 23] ^= 1;
    assert_untouched(&f, &other_port, "UDP to another port");
    let mut gue_v0_with_options = wrap_gue_v0(&inner);
    gue_v0_with_options[14 + 28] = 0x01; // hlen 1: extension fields we do not parse
    assert_untouched(&f, &gue_v0_with_options, "GUE v0 with extension fields");
    assert_eq!(f.counter(counter::XDP_DECAP), 3);
}

#[test]
fn xdp_dnats_established_flows_with_checksums_recomputed_from_scratch() {
    let f = Fixture::new(&load_balancer(&[("10.76.0.10", "node1")], true, &[]));
    let mut l3_bytes = 0;
    for (n, ip_options) in [0usize, 8].into_iter().enumerate() {
        let client = (EXT, 53000 + n as u16);
        let syn = packet(TCP, client, (LB_IP, 80), ip_options, false);
        let pkt = tcp_with(tcp_flags::ACK, client, (LB_IP, 80), ip_options);
        // The first packet of a flow goes to tc untouched; tc balances it.
        assert_untouched(&f, &syn, "a new flow");
        let (_, first) = f.run(programs::UPLINK_INGRESS, &syn);
        assert_eq!(parse_checked(&first).dst, (LOCAL_EP, 9376));
        let tc_before = f.counter(counter::FWD_ESTABLISHED);
        // The next packets are translated by XDP.
        let (rc, out) = run_xdp(&f, &pkt);
        assert_eq!(rc, XDP_PASS);
        let p = parse_checked(&out);
        assert_eq!(p.dst, (LOCAL_EP, 9376), "options={ip_options}: DNAT at XDP");
        assert_eq!(p.src, client, "client preserved");
        // tc then finds nothing to do.
        assert_eq!(
            f.run(programs::UPLINK_INGRESS, &out),
            (TC_ACT_OK, out.clone())
        );
        assert_eq!(f.counter(counter::FWD_ESTABLISHED), tc_before);
        // The same packet through tc alone: the same bytes.
        let (_, via_tc) = f.run(programs::UPLINK_INGRESS, &pkt);
        assert_eq!(out, via_tc, "XDP rewrites exactly what tc would have");
        // A FIN changes the flow's state: tc's.
        let fin = tcp_with(
            tcp_flags::FIN | tcp_flags::ACK,
            client,
            (LB_IP, 80),
            ip_options,
        );
        assert_untouched(&f, &fin, "a FIN");
        // Packets translated by tc (SYN, ACK) and by XDP (ACK).
        l3_bytes += 3 * (pkt.len() as u64 - 14);
    }
    assert_eq!(f.counter(counter::XDP_FWD_ESTABLISHED), 2);
    let id = f.state.services()
        [&proxy_userspace::translate::ServiceKey::external(LB_IP, 80, abi::Protocol::Tcp)]
        .svc_id;
    let svc = f.dp.service_counters([id]).expect("service counters");
    assert_eq!(svc.len(), 1);
    assert_eq!(
        (svc[0].1.packets, svc[0].1.bytes),
        (6, l3_bytes),
        "the service's counters include the packets XDP translated"
    );
    // UDP, with a checksum and without one (zero stays zero).
    let f = Fixture::new(
        &load_balancer(&[("10.76.0.10", "node1")], true, &[])
            .replace("protocol: TCP", "protocol: UDP"),
    );
    for (n, zero) in [false, true].into_iter().enumerate() {
        let pkt = packet(UDP, (EXT, 54000 + n as u16), (LB_IP, 80), 0, zero);
        let (_, first) = f.run(programs::UPLINK_INGRESS, &pkt);
        let (rc, out) = run_xdp(&f, &pkt);
        assert_eq!(rc, XDP_PASS);
        let p = parse_checked(&out);
        assert_eq!(p.dst, (LOCAL_EP, 9376), "udp zero={zero}");
        assert_eq!(
            p.l4_csum == 0,
            zero,
            "udp zero={zero}: a zero checksum stays zero"
        );
        assert_eq!(out, first, "udp zero={zero}: same bytes as tc");
    }
    assert_eq!(f.counter(counter::XDP_FWD_ESTABLISHED), 2);
}

#[test]
fn xdp_leaves_partial_checksums_masquerade_replies_and_stale_flows_to_tc() {
    let mut f = Fixture::new(&load_balancer(&[("10.76.0.10", "node1")], true, &[]));
    f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, (EXT, 55000), (LB_IP, 80), 0, false),
    );
    let pkt = tcp_with(tcp_flags::ACK, (EXT, 55000), (LB_IP, 80), 0);
    let (_, first) = f.run(programs::UPLINK_INGRESS, &pkt);
    // A CHECKSUM_PARTIAL-looking packet of the established flow: tc's helpers handle it.
    let partial = as_partial_checksum(&pkt);
    assert_untouched(&f, &partial, "pseudo-header-only checksum");
    assert_eq!(f.counter(counter::XDP_PASS_PARTIAL_CSUM), 1);
    let (rc, out) = f.run(programs::UPLINK_INGRESS, &partial);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(&out[30..34], &LOCAL_EP.octets(), "tc translated it instead");
    // The backend's reply (reply entry) is not XDP's business.
    let reply = tcp_with(tcp_flags::ACK, (LOCAL_EP, 9376), (EXT, 55000), 0);
    assert_untouched(&f, &reply, "a reply");
    // The backend goes away: XDP must not keep sending the flow there.
    f.program(&load_balancer(&[("10.76.0.11", "node1")], true, &[]));
    assert_untouched(&f, &pkt, "a flow whose backend is gone");
    let (_, out) = f.run(programs::UPLINK_INGRESS, &pkt);
    assert_eq!(
        parse_checked(&out).dst,
        (Ipv4Addr::new(10, 76, 0, 11), 9376)
    );
    assert_eq!(f.counter(counter::REBALANCED), 1, "tc re-balanced it");
    assert_ne!(first, out);
    // Now established on the new backend: XDP again.
    let (_, again) = run_xdp(&f, &pkt);
    assert_eq!(again, out);
    assert_eq!(f.counter(counter::XDP_FWD_ESTABLISHED), 1);

    // externalTrafficPolicy Cluster to a remote endpoint: masqueraded (SNAT + routing), tc's.
    let f = Fixture::new(&load_balancer(&[("10.76.1.10", "node2")], false, &[]));
    let (_, fwd) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, (EXT, 55100), (NODE, 30080), 0, false),
    );
    let p = parse_checked(&fwd);
    assert_eq!(p.src.0, NODE, "masqueraded");
    let pkt = tcp_with(tcp_flags::ACK, (EXT, 55100), (NODE, 30080), 0);
    assert_untouched(&f, &pkt, "a masqueraded flow");
    assert_untouched(
        &f,
        &tcp_with(tcp_flags::ACK, p.dst, p.src, 0),
        "a masqueraded reply",
    );
    assert_eq!(f.counter(counter::XDP_FWD_ESTABLISHED), 0);
}

#[test]
fn xdp_passes_non_service_malformed_truncated_and_fragmented_packets_untouched() {
    let f = Fixture::new(&load_balancer(&[("10.76.0.10", "node1")], true, &[]));
    f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, (EXT, 56000), (LB_IP, 80), 0, false),
    );
    let pkt = tcp_with(tcp_flags::ACK, (EXT, 56000), (LB_IP, 80), 0);
    let before = f.dp.counters().expect("counters");
    assert_untouched(
        &f,
        &packet(
            TCP,
            (EXT, 56000),
            (Ipv4Addr::new(10, 76, 1, 10), 9376),
            0,
            false,
        ),
        "not a service",
    );
    // Every one of these belongs to the established flow, so only the checks stop XDP.
    let cut = pkt[..14 + 20 + 17].to_vec();
    assert_untouched(&f, &cut, "cut inside the TCP checksum");
    assert_untouched(&f, &pkt[..14 + 10], "cut inside the IPv4 header");
    // (BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header, as drivers do.)
    assert_untouched(&f, &pkt[..14], "an Ethernet header alone");
    let mut bad_ihl = pkt.clone();
    bad_ihl[14] = 0x43;
    assert_untouched(&f, &bad_ihl, "IHL below 5");
    // tc's rule, which XDP shares: the IPv4 total length must cover the L4 checksum.
    let mut short_total = pkt.clone();
    short_total[16..18].copy_from_slice(&(20u16 + 10).to_be_bytes());
    let c = packet::ipv4_header_checksum(&short_total[14..34]);
    short_total[24..26].copy_from_slice(&c.to_be_bytes());
    assert_untouched(
        &f,
        &short_total,
        "an IPv4 total length short of the TCP header",
    );
    let mut v6 = pkt.clone();
    v6[14] = 0x65;
    assert_untouched(&f, &v6, "IP version 6 in an IPv4 ethertype");
    let mut arp = pkt.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_untouched(&f, &arp, "not IPv4");
    let mut later_fragment = pkt.clone();
    later_fragment[14 + 6] = 0x00;
    later_fragment[14 + 7] = 0x10;
    assert_untouched(&f, &later_fragment, "a non-first fragment");
    let mut first_fragment = pkt.clone();
    first_fragment[14 + 6] = 0x20; // MF
    assert_untouched(&f, &first_fragment, "a first fragment");
    let icmp = icmp_error(3, 4, Ipv4Addr::new(192, 0, 2, 1), LB_IP, &pkt);
    assert_untouched(&f, &icmp, "an ICMP error");
    assert_eq!(
        f.dp.counters().expect("counters"),
        before,
        "XDP counts nothing for packets it leaves alone"
    );
}
