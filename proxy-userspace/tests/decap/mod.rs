//! Packet fixtures of the decapsulation policy (issue 11 item 1), part of the `fixtures` test
//! binary: IPIP/GUE addressed to the node is unwrapped only when its inner packet is for a
//! LoadBalancer IP or externalIP service port this node serves, and only from the outer
//! sources `--decap-allowed-sources` allows. Everything else wrapped to the node is dropped and
//! counted. Each case runs through tc alone (`lb_up_in`) and through XDP (`lb_up_xdp`) then tc
//! on XDP's output, as in the kernel: XDP leaves refused packets wrapped for tc, which drops
//! them, so the verdict and the count are the same either way.
use super::*;
use proxy_common::cfg_flags;

const XDP_PASS: u32 = 2;
/// The externalIP of the second service (UDP 53).
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
/// The pod behind the LoadBalancer service.
const POD: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 10);
/// A load balancer inside the allowed outer sources of the restricted tests.
const BALANCER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 7);

/// The LoadBalancer service of the other fixtures (LB IP 203.0.113.10:80/TCP, ClusterIP
/// 10.96.0.10, NodePort 30080, a local endpoint) plus one with an externalIP (UDP 53).
fn services() -> String {
    let ext = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: ext, namespace: default}}\n\
         spec:\n  clusterIP: 10.96.0.11\n  externalIPs: [{EXTERNAL_IP}]\n  ports:\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: ext-abc\n  namespace: default\n  labels: {{kubernetes.io/service-name: ext}}\n\
         addressType: IPv4\nports:\n- {{name: dns, port: 5353, protocol: UDP}}\nendpoints:\n  - addresses: [\"10.76.0.11\"]\n    conditions: {{ready: true}}\n    nodeName: node1"
    );
    format!(
        "{}\n---\n{ext}",
        load_balancer(&[("10.76.0.10", "node1")], true, &[])
    )
}

/// Wraps an Ethernet frame in IPIP, GUE variant 1 or GUE variant 0 (empty GUE header) from
/// `outer_src` to the node.
fn wrap_from(outer_src: Ipv4Addr, inner: &[u8], kind: usize) -> Vec<u8> {
    match kind {
        0 => packet::encapsulate(inner, &Ipv4::new(4, outer_src, NODE), &[]),
        1 => packet::encapsulate(
            inner,
            &Ipv4::new(UDP, outer_src, NODE),
            &gue_udp(inner, &[]),
        ),
        _ => packet::encapsulate(
            inner,
            &Ipv4::new(UDP, outer_src, NODE),
            &gue_udp(inner, &[0, 4, 0, 0]),
        ),
    }
}

const KINDS: [&str; 3] = ["ipip", "gue v1", "gue v0"];

/// Both hooks unwrap `wrapped` down to `inner`'s length: tc alone, and XDP (then tc passes
/// what XDP unwrapped on). Returns tc's output of the tc-alone run.
fn assert_decapsulated(f: &Fixture, wrapped: &[u8], inner: &[u8], what: &str) -> Vec<u8> {
    let (rc, out) = f.run(programs::UPLINK_INGRESS, wrapped);
    assert_ne!(rc, TC_ACT_SHOT, "{what}: tc decapsulates");
    assert_eq!(
        out.len(),
        inner.len(),
        "{what}: tc stripped the outer header"
    );
    let (rc, x) = xdp::run_xdp(f, wrapped);
    assert_eq!(rc, XDP_PASS, "{what}");
    assert_eq!(x, inner, "{what}: XDP stripped the outer header");
    out
}

/// Both hooks refuse `wrapped`: tc drops it; XDP leaves it wrapped and unmarked, and tc then
/// drops it. `reason` goes up by exactly two (one per tc run), nothing is decapsulated.
fn assert_refused(f: &Fixture, wrapped: &[u8], reason: u32, what: &str) {
    let before = (
        f.counter(reason),
        f.counter(counter::DECAP),
        f.counter(counter::XDP_DECAP),
    );
    let (rc, _) = f.run(programs::UPLINK_INGRESS, wrapped);
    assert_eq!(rc, TC_ACT_SHOT, "{what}: tc drops it");
    let (rc, x) = xdp::run_xdp(f, wrapped);
    assert_eq!(
        (rc, x.as_slice()),
        (XDP_PASS, wrapped),
        "{what}: XDP leaves it wrapped for tc"
    );
    let (rc, _) = f.run(programs::UPLINK_INGRESS, &x);
    assert_eq!(rc, TC_ACT_SHOT, "{what}: tc drops what XDP passed on");
    assert_eq!(
        (
            f.counter(reason),
            f.counter(counter::DECAP),
            f.counter(counter::XDP_DECAP)
        ),
        (before.0 + 2, before.1, before.2),
        "{what}: counted once per tc run, nothing decapsulated"
    );
}

/// A TCP ACK, UDP datagram or SCTP packet from `EXT` (checksums computed).
fn to(proto: u8, dst: (Ipv4Addr, u16), sport: u16) -> Vec<u8> {
    if proto == TCP {
        tcp_with(tcp_flags::ACK, (EXT, sport), dst, 0)
    } else {
        packet(proto, (EXT, sport), dst, 0, false)
    }
}

#[test]
fn only_load_balancer_ips_and_external_ips_this_node_serves_are_decapsulated() {
    let f = Fixture::new(&services());
    for (k, kind) in KINDS.iter().enumerate() {
        let sport = 54000 + 10 * k as u16;
        // Served: the LB IP's service port (a SYN, balanced to the local pod) and the
        // externalIP's.
        let inner = packet(TCP, (EXT, sport), (LB_IP, 80), 0, false);
        let out = assert_decapsulated(&f, &wrap_from(EXT, &inner, k), &inner, kind);
        assert_eq!(parse_checked(&out).dst, (POD, 9376), "{kind}: balanced");
        let inner = to(UDP, (EXTERNAL_IP, 53), sport + 1);
        assert_decapsulated(&f, &wrap_from(EXT, &inner, k), &inner, kind);

        // Not served: a ClusterIP, a pod, a node port, an unknown address, an unused port or
        // another protocol of the LB IP, the externalIP's port over TCP.
        for (dst, proto, what) in [
            ((VIP, 80), TCP, "a ClusterIP"),
            ((POD, 9376), TCP, "a pod"),
            ((NODE, 30080), TCP, "a node port"),
            ((NODE, 22), TCP, "the node itself"),
            (
                (Ipv4Addr::new(203, 0, 113, 99), 80),
                TCP,
                "an unknown address",
            ),
            ((LB_IP, 81), TCP, "an unused port of the LB IP"),
            ((LB_IP, 80), UDP, "UDP to a TCP port of the LB IP"),
            ((EXTERNAL_IP, 53), TCP, "TCP to the externalIP's UDP port"),
        ] {
            let inner = to(proto, dst, sport + 2);
            assert_refused(
                &f,
                &wrap_from(EXT, &inner, k),
                counter::DROP_DECAP_NOT_SERVED,
                &format!("{kind}: {what}"),
            );
        }
    }
    assert_eq!(f.counter(counter::DECAP), 6);
    assert_eq!(f.counter(counter::XDP_DECAP), 6);
    assert_eq!(f.counter(counter::DROP_DECAP_SOURCE), 0);
}

/// ICMP errors about direct-server-return replies reach the node wrapped, addressed to the LB
/// IP (path MTU discovery): they are matched by the quoted reply's source port and protocol.
/// Other ICMP to the LB IP is not served.
#[test]
fn icmp_errors_about_replies_from_a_served_port_are_decapsulated() {
    let f = Fixture::new(&services());
    let router = Ipv4Addr::new(192, 0, 2, 1);
    let reply = packet(TCP, (LB_IP, 80), (EXT, 55000), 0, false);
    for (k, kind) in KINDS.iter().enumerate() {
        let frag_needed = icmp_error(3, 4, router, LB_IP, &reply);
        assert_decapsulated(&f, &wrap_from(EXT, &frag_needed, k), &frag_needed, kind);
        let time_exceeded = icmp_error(11, 0, router, LB_IP, &reply);
        assert_decapsulated(&f, &wrap_from(EXT, &time_exceeded, k), &time_exceeded, kind);
    }
    let other_port = packet(TCP, (LB_IP, 81), (EXT, 55000), 0, false);
    let other_source = packet(TCP, (VIP, 80), (EXT, 55000), 0, false);
    let ip = Ipv4::new(1, EXT, LB_IP);
    let echo = packet::ethernet(
        MAC_GW,
        MAC_POD,
        &ip.packet(&ip.with_checksum(packet::icmp(8, 0, [0, 1, 0, 1], b"ping"))),
    );
    for (inner, what) in [
        (
            icmp_error(3, 4, router, LB_IP, &other_port),
            "an error quoting an unused port",
        ),
        (
            icmp_error(3, 4, router, LB_IP, &other_source),
            "an error quoting another source than the LB IP",
        ),
        (echo, "an echo request"),
    ] {
        assert_refused(
            &f,
            &wrap_from(EXT, &inner, 0),
            counter::DROP_DECAP_NOT_SERVED,
            what,
        );
    }
}

/// An inner datagram in fragments: the first fragment carries the port; the fragments that
/// follow are decapsulated once their first fragment was (the fragment map remembers it), and
/// refused before.
#[test]
fn inner_fragments_follow_their_first_fragment() {
    let f = Fixture::new(&services());
    let payload = [9u8; 64];
    let l4 = packet::tcp(56000, 80, 1, 0, tcp_flags::SYN, &payload);
    let l4 = Ipv4::new(TCP, EXT, LB_IP).with_checksum(l4);
    let (head, tail) = l4.split_at(48);
    let fragment = |more: bool, offset: u16, body: &[u8]| {
        let ip = Ipv4::new(TCP, EXT, LB_IP).id(0x7777).fragment(more, offset);
        packet::ethernet(MAC_GW, MAC_POD, &ip.packet(body))
    };
    let first = fragment(true, 0, head);
    let second = fragment(false, 48, tail);
    // The tail before its head: nothing says which port it is for.
    assert_refused(
        &f,
        &wrap_from(EXT, &second, 0),
        counter::DROP_DECAP_NOT_SERVED,
        "a fragment before its first",
    );
    let (rc, out) = f.run(programs::UPLINK_INGRESS, &wrap_from(EXT, &first, 0));
    assert_ne!(rc, TC_ACT_SHOT);
    assert_eq!(
        &out[30..34],
        &POD.octets(),
        "the first fragment is balanced"
    );
    let (rc, out) = f.run(programs::UPLINK_INGRESS, &wrap_from(EXT, &second, 1));
    assert_ne!(rc, TC_ACT_SHOT);
    assert_eq!(out.len(), second.len(), "decapsulated");
    assert_eq!(&out[30..34], &POD.octets(), "and translated like its first");
    let (rc, x) = xdp::run_xdp(&f, &wrap_from(EXT, &second, 2));
    assert_eq!((rc, x), (XDP_PASS, second.clone()), "XDP agrees");
}

fn net(s: &str) -> ipnet::Ipv4Net {
    s.parse().expect("CIDR")
}

/// Sets `--decap-allowed-sources` as the agent does: the CIDRs in the trie, then the flag.
fn restrict(f: &mut Fixture, cidrs: &[&str]) {
    for c in cidrs {
        f.dp.set_decap_source(net(c), true).expect("trie");
    }
    let mut cfg = f.dp.config().expect("config");
    cfg.flags |= cfg_flags::DECAP_SOURCES_RESTRICTED;
    f.dp.set_config(&cfg).expect("config");
}

#[test]
fn decap_allowed_sources_limit_the_outer_source() {
    let mut f = Fixture::new(&services());
    // Without the flag any source is fine, and a trie entry alone changes nothing.
    f.dp.set_decap_source(net("10.0.0.0/8"), true)
        .expect("trie");
    let inner = packet(TCP, (EXT, 57000), (LB_IP, 80), 0, false);
    assert_decapsulated(&f, &wrap_from(EXT, &inner, 0), &inner, "unrestricted");

    restrict(&mut f, &["198.18.0.0/24", "192.0.2.99/32"]);
    assert_eq!(
        {
            let mut v = f.dp.decap_sources().expect("read the trie");
            v.sort();
            v
        },
        ["10.0.0.0/8", "192.0.2.99/32", "198.18.0.0/24"].map(net),
        "read back as programmed"
    );
    for (k, kind) in KINDS.iter().enumerate() {
        let inner = packet(TCP, (EXT, 57010 + k as u16), (LB_IP, 80), 0, false);
        assert_decapsulated(
            &f,
            &wrap_from(BALANCER, &inner, k),
            &inner,
            &format!("{kind}: from an allowed balancer"),
        );
        assert_refused(
            &f,
            &wrap_from(EXT, &inner, k),
            counter::DROP_DECAP_SOURCE,
            &format!("{kind}: from {EXT}, outside the allowed sources"),
        );
        // An allowed source does not make an unserved inner destination acceptable.
        let cluster_ip = to(TCP, (VIP, 80), 57020);
        assert_refused(
            &f,
            &wrap_from(BALANCER, &cluster_ip, k),
            counter::DROP_DECAP_NOT_SERVED,
            &format!("{kind}: a ClusterIP from an allowed balancer"),
        );
    }
    // The edges of the /24 and the /32.
    let inner = packet(TCP, (EXT, 57030), (LB_IP, 80), 0, false);
    for (src, allowed) in [
        (Ipv4Addr::new(198, 18, 0, 0), true),
        (Ipv4Addr::new(198, 18, 0, 255), true),
        (Ipv4Addr::new(198, 18, 1, 0), false),
        (Ipv4Addr::new(192, 0, 2, 99), true),
        (Ipv4Addr::new(192, 0, 2, 98), false),
    ] {
        let w = wrap_from(src, &inner, 0);
        if allowed {
            assert_decapsulated(&f, &w, &inner, &src.to_string());
        } else {
            assert_refused(&f, &w, counter::DROP_DECAP_SOURCE, &src.to_string());
        }
    }
    // Plain traffic to the LB IP is not concerned.
    let (rc, out) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, (EXT, 57040), (LB_IP, 80), 0, false),
    );
    assert_ne!(rc, TC_ACT_SHOT);
    assert_eq!(parse_checked(&out).dst, (POD, 9376));

    // Restricted with nothing allowed (only IPv6 CIDRs given): every source is refused.
    for c in ["10.0.0.0/8", "198.18.0.0/24", "192.0.2.99/32"] {
        f.dp.set_decap_source(net(c), false).expect("trie");
    }
    f.dp.set_decap_source(net("10.0.0.0/8"), false)
        .expect("removing a missing CIDR is fine");
    assert!(f.dp.decap_sources().expect("read the trie").is_empty());
    assert_refused(
        &f,
        &wrap_from(BALANCER, &inner, 1),
        counter::DROP_DECAP_SOURCE,
        "restricted to nothing",
    );
}

/// `--foreign-tunnels=pass`: what the policy refuses (a source outside the allowed ones, an
/// inner destination not served: a CNI's node-to-node IPIP to a pod) leaves both hooks still
/// wrapped and uncounted, for the kernel's own tunnel device; what it serves is still
/// decapsulated.
#[test]
fn foreign_tunnels_pass_leaves_refused_packets_wrapped_for_the_kernel() {
    let mut f = Fixture::new(&services());
    restrict(&mut f, &["198.18.0.0/24"]);
    let mut cfg = f.dp.config().expect("config");
    cfg.flags |= cfg_flags::FOREIGN_TUNNELS_PASS;
    f.dp.set_config(&cfg).expect("config");
    let served = packet(TCP, (EXT, 58000), (LB_IP, 80), 0, false);
    assert_decapsulated(&f, &wrap_from(BALANCER, &served, 0), &served, "served");
    let to_pod = to(TCP, (POD, 9376), 58001);
    for (wrapped, what) in [
        (
            wrap_from(BALANCER, &to_pod, 0),
            "a pod, from an allowed source",
        ),
        (
            wrap_from(EXT, &served, 1),
            "served, from a source not allowed",
        ),
    ] {
        let before = (
            f.counter(counter::DROP_DECAP_NOT_SERVED),
            f.counter(counter::DROP_DECAP_SOURCE),
        );
        let (rc, out) = f.run(programs::UPLINK_INGRESS, &wrapped);
        assert_eq!(
            (rc, &out),
            (TC_ACT_OK, &wrapped),
            "{what}: tc passes it wrapped"
        );
        let (rc, x) = xdp::run_xdp(&f, &wrapped);
        assert_eq!((rc, &x), (XDP_PASS, &wrapped), "{what}: XDP too");
        assert_eq!(
            (
                f.counter(counter::DROP_DECAP_NOT_SERVED),
                f.counter(counter::DROP_DECAP_SOURCE)
            ),
            before,
            "{what}: not a drop"
        );
    }
}
