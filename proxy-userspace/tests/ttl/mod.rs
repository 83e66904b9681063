//! TTL on the paths that forward by redirect (issue 11 item 2): decremented with a valid header
//! checksum, TTL <= 1 dropped and counted; paths that hand the packet to the stack leave it alone
//! (the kernel's forwarding path decrements there).
use super::*;

/// `f` with its IPv4 TTL set to `ttl` and the header checksum recomputed.
fn with_ttl(mut f: Vec<u8>, ttl: u8) -> Vec<u8> {
    let ihl = ((f[14] & 0x0f) as usize) * 4;
    f[22] = ttl;
    f[24] = 0;
    f[25] = 0;
    let c = packet::ipv4_header_checksum(&f[14..14 + ihl]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

fn ttl(f: &[u8]) -> u8 {
    f[22]
}

#[test]
fn hairpin_decrements_the_ttl_and_drops_ttl_1() {
    let me = Ipv4Addr::new(10, 76, 0, 10);
    let f = Fixture::new(&hostnames(&["10.76.0.10"], "TCP"));
    let syn = packet(TCP, (me, 41000), (VIP, 80), 0, false);
    let (rc, out) = f.run(programs::POD_INGRESS, &syn);
    assert_eq!(rc, TC_ACT_REDIRECT);
    parse_checked(&out); // header checksum still valid after the decrement
    assert_eq!(ttl(&out), 63);
    // With IP options the TTL is at the same place; the checksum covers the longer header.
    let opt = packet(TCP, (me, 41001), (VIP, 80), 8, false);
    let (rc, out) = f.run(programs::POD_INGRESS, &opt);
    assert_eq!(rc, TC_ACT_REDIRECT);
    parse_checked(&out);
    assert_eq!(ttl(&out), 63);
    assert_eq!(f.counter(counter::DROP_TTL_EXCEEDED), 0);
    for t in [1u8, 0] {
        let (rc, _) = f.run(programs::POD_INGRESS, &with_ttl(syn.clone(), t));
        assert_eq!(rc, TC_ACT_SHOT, "TTL {t} must not be redirected");
    }
    assert_eq!(f.counter(counter::DROP_TTL_EXCEEDED), 2);
    // TTL 2 still goes, leaving with 1.
    let (rc, out) = f.run(programs::POD_INGRESS, &with_ttl(syn, 2));
    assert_eq!(rc, TC_ACT_REDIRECT);
    parse_checked(&out);
    assert_eq!(ttl(&out), 1);
}

#[test]
fn fib_redirected_masquerade_decrements_the_ttl_and_drops_ttl_1() {
    let f = Fixture::new(&load_balancer(&[("10.76.1.10", "node2")], false, &[]));
    let syn = packet(TCP, (EXT, 50000), (NODE, 30080), 0, false);
    let (rc, out) = f.run(programs::UPLINK_INGRESS, &syn);
    let p = parse_checked(&out);
    assert_eq!(p.src.0, NODE, "masqueraded");
    if rc == TC_ACT_REDIRECT {
        assert_eq!(ttl(&out), 63, "redirected by us: decremented");
    } else {
        // No usable route in the test namespace: the stack forwards it and decrements.
        assert_eq!(rc, TC_ACT_OK);
        assert_eq!(ttl(&out), 64, "handed to the stack: untouched");
    }
    let routed = rc == TC_ACT_REDIRECT;
    // The backend's reply comes back through the same FIB redirect.
    let (rc2, back) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, p.dst, p.src, 0, false),
    );
    parse_checked(&back);
    assert_eq!(ttl(&back), if rc2 == TC_ACT_REDIRECT { 63 } else { 64 });
    // A new flow arriving with TTL 1.
    let late = with_ttl(packet(TCP, (EXT, 50001), (NODE, 30080), 0, false), 1);
    let (rc, out) = f.run(programs::UPLINK_INGRESS, &late);
    if routed {
        assert_eq!(rc, TC_ACT_SHOT, "TTL 1 must not be redirected");
        assert_eq!(f.counter(counter::DROP_TTL_EXCEEDED), 1);
    } else {
        assert_eq!(rc, TC_ACT_OK);
        assert_eq!(ttl(&out), 1, "the stack answers time exceeded");
        assert_eq!(f.counter(counter::DROP_TTL_EXCEEDED), 0);
    }
}

#[test]
fn paths_handing_the_packet_to_the_stack_keep_the_ttl() {
    let f = Fixture::new(&hostnames(&EPS, "TCP"));
    for t in [64u8, 1] {
        let syn = with_ttl(
            packet(TCP, (CLIENT, 40000 + t as u16), (VIP, 80), 0, false),
            t,
        );
        let (rc, out) = f.run(programs::POD_INGRESS, &syn);
        assert_eq!(rc, TC_ACT_OK, "DNAT to a backend goes through the stack");
        parse_checked(&out);
        assert_eq!(ttl(&out), t, "the kernel decrements, not us");
    }
    assert_eq!(f.counter(counter::DROP_TTL_EXCEEDED), 0);
}

#[test]
fn icmp_error_forwarded_to_a_masqueraded_backend_decrements_the_outer_ttl() {
    let f = Fixture::new(&load_balancer(&[("10.76.1.10", "node2")], false, &[]));
    let (_, fwd) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, (EXT, 50200), (NODE, 30080), 0, false),
    );
    let p = parse_checked(&fwd);
    let (_, reply) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, p.dst, p.src, 0, false),
    );
    let router = Ipv4Addr::new(192, 0, 2, 1);
    let err = icmp_error(3, 4, router, NODE, &reply);
    let (rc, xl) = f.run(programs::UPLINK_INGRESS, &err);
    let ((_, odst), _) = parse_icmp_error(&xl); // outer checksum valid after the decrement
    assert_eq!(odst, p.dst.0);
    assert_eq!(ttl(&xl), if rc == TC_ACT_REDIRECT { 63 } else { 64 });
    if rc == TC_ACT_REDIRECT {
        let (rc, _) = f.run(programs::UPLINK_INGRESS, &with_ttl(err, 1));
        assert_eq!(rc, TC_ACT_SHOT);
        assert_eq!(f.counter(counter::DROP_TTL_EXCEEDED), 1);
    }
}

/// Moves this test's thread (only it: namespaces are per thread) into a fresh network namespace
/// with forwarding on and routes over a veth pair, so the programs' FIB lookup succeeds and
/// they redirect. The host running the fixtures may have forwarding off, and then every FIB
/// path hands the packet to the stack. No cgroup or lab state is touched.
fn enter_routed_netns() {
    require_root();
    // SAFETY: unshare(2) with a constant flag; it affects the calling thread only.
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "unshare(CLONE_NEWNET)"
    );
    // Children inherit the calling thread's namespace.
    let script = "ip link set lo up && ip link add d0 type veth peer name d1 && ip link set d1 up && \
                  ip addr add 10.76.1.1/24 dev d0 && ip link set d0 up && \
                  ip route add default via 10.76.1.254 && \
                  echo 1 > /proc/sys/net/ipv4/conf/all/forwarding && \
                  echo 1 > /proc/sys/net/ipv4/conf/lo/forwarding";
    let st = std::process::Command::new("sh")
        .args(["-c", script])
        .status()
        .expect("sh");
    assert!(st.success(), "routed netns setup");
}

#[test]
fn fib_redirect_in_a_routed_namespace_decrements_and_drops_ttl_1() {
    enter_routed_netns();
    let f = Fixture::new(&load_balancer(&[("10.76.1.10", "node2")], false, &[]));
    let syn = packet(TCP, (EXT, 50300), (NODE, 30080), 0, false);
    let (rc, out) = f.run(programs::UPLINK_INGRESS, &syn);
    assert_eq!(rc, TC_ACT_REDIRECT, "masquerade is routed by us here");
    let p = parse_checked(&out);
    assert_eq!(p.src.0, NODE);
    assert_eq!(ttl(&out), 63);
    let (rc, back) = f.run(
        programs::UPLINK_INGRESS,
        &packet(TCP, p.dst, p.src, 0, false),
    );
    assert_eq!(rc, TC_ACT_REDIRECT, "the reply is routed by us too");
    assert_eq!(parse_checked(&back).src, (NODE, 30080));
    assert_eq!(ttl(&back), 63);
    // The router tells the node the client path's MTU is smaller: routed to the backend.
    let err = icmp_error(3, 4, Ipv4Addr::new(192, 0, 2, 1), NODE, &back);
    let (rc, xl) = f.run(programs::UPLINK_INGRESS, &err);
    assert_eq!(rc, TC_ACT_REDIRECT);
    parse_icmp_error(&xl);
    assert_eq!(ttl(&xl), 63);
    assert_eq!(f.counter(counter::DROP_TTL_EXCEEDED), 0);
    let late = with_ttl(packet(TCP, (EXT, 50301), (NODE, 30080), 0, false), 1);
    assert_eq!(f.run(programs::UPLINK_INGRESS, &late).0, TC_ACT_SHOT);
    assert_eq!(
        f.run(programs::UPLINK_INGRESS, &with_ttl(err, 1)).0,
        TC_ACT_SHOT
    );
    assert_eq!(f.counter(counter::DROP_TTL_EXCEEDED), 2);
}
