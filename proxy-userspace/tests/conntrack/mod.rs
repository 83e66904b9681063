//! Packet fixtures of the conntrack lifecycle (part of the `fixtures` test binary): TCP state
//! on both entries, promotion to the answered table, expiry by the sweeper, SNAT ports freed
//! and never taken from a live flow, reply-tuple clashes, floods of unanswered packets, and
//! fragments.
use proxy_common::{Ct4Key, ct_flags};
use proxy_userspace::{
    conntrack::{State, Timeouts},
    datapath::{
        MapSizes,
        conntrack::{CtEntry, Sweeper},
    },
};

use super::*;

const S: u64 = 1_000_000_000;

fn entries(f: &mut Fixture) -> Vec<CtEntry> {
    f.dp.conntrack().expect("conntrack")
}

/// The entry at `key`, if any: (value, in the answered table).
fn entry(f: &mut Fixture, key: &Ct4Key) -> Option<(proxy_common::Ct4Value, bool)> {
    entries(f)
        .into_iter()
        .find(|e| e.key == *key)
        .map(|e| (e.value, e.answered))
}

fn key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8) -> Ct4Key {
    Ct4Key::new(
        abi::addr_be(src.0),
        abi::addr_be(dst.0),
        src.1.to_be(),
        dst.1.to_be(),
        proto,
    )
}

/// The latest packet time of any entry (the sweeper's "now" is relative to it).
fn newest(f: &mut Fixture) -> u64 {
    entries(f)
        .iter()
        .map(|e| e.value.last_seen_ns)
        .max()
        .unwrap_or(0)
}

fn sweep(f: &mut Fixture, now_ns: u64) -> Vec<(State, u64)> {
    let mut ct = f.dp.ct_tables().expect("tables");
    let mut r = Sweeper::new(7)
        .run_all(&mut ct, &Timeouts::default(), now_ns)
        .removed;
    r.sort();
    r
}

#[test]
fn tcp_state_is_tracked_on_both_entries_from_syn_to_close_and_a_closed_tuple_reopens() {
    let mut f = Fixture::new(&hostnames(&EPS[..1], "TCP"));
    let client = (CLIENT, 40100);
    let (_, out) = f.run(
        programs::POD_INGRESS,
        &tcp_with(tcp_flags::SYN, client, (VIP, 80), 0),
    );
    let backend = parse_checked(&out).dst;
    let fwd = key(client, (VIP, 80), TCP);
    let rev = key(backend, client, TCP);
    // SYN sent: both entries in the unanswered table.
    let (v, answered) = entry(&mut f, &fwd).expect("forward entry");
    assert!(!answered && v.flags & ct_flags::FORWARD != 0);
    assert!(!entry(&mut f, &rev).expect("reply entry").1);
    // The SYN-ACK: the flow moves to the answered table, both entries.
    f.run(
        programs::POD_EGRESS,
        &tcp_with(tcp_flags::SYN | tcp_flags::ACK, backend, client, 0),
    );
    for k in [&fwd, &rev] {
        let (v, answered) = entry(&mut f, k).expect("entry");
        assert!(answered && v.flags & ct_flags::ANSWERED != 0, "{k:?}");
    }
    assert_eq!(
        entries(&mut f).len(),
        2,
        "nothing left in the unanswered table"
    );
    // FIN from the client: close-wait on both entries.
    f.run(
        programs::POD_INGRESS,
        &tcp_with(tcp_flags::FIN | tcp_flags::ACK, client, (VIP, 80), 0),
    );
    for k in [&fwd, &rev] {
        let (v, _) = entry(&mut f, k).expect("entry");
        assert_eq!(State::of(TCP, v.flags, true), State::TcpCloseWait, "{k:?}");
    }
    // FIN from the backend: time-wait.
    let (_, back) = f.run(
        programs::POD_EGRESS,
        &tcp_with(tcp_flags::FIN | tcp_flags::ACK, backend, client, 0),
    );
    assert_eq!(parse_checked(&back).src, (VIP, 80), "still translated");
    let (v, _) = entry(&mut f, &fwd).expect("entry");
    assert_eq!(State::of(TCP, v.flags, true), State::TcpTimeWait);
    // The client reuses its port: a new flow, balanced again, in the unanswered table.
    let (_, again) = f.run(
        programs::POD_INGRESS,
        &tcp_with(tcp_flags::SYN, client, (VIP, 80), 0),
    );
    assert_eq!(parse_checked(&again).dst, backend);
    assert_eq!(f.counter(counter::CT_CLOSED_REUSED), 1);
    let (v, answered) = entry(&mut f, &fwd).expect("entry");
    assert!(!answered, "a new flow starts unanswered");
    assert_eq!(State::of(TCP, v.flags, false), State::TcpSynSent);
    // A RST: closed.
    f.run(
        programs::POD_EGRESS,
        &tcp_with(tcp_flags::RST, backend, client, 0),
    );
    let (v, _) = entry(&mut f, &fwd).expect("entry");
    assert_eq!(State::of(TCP, v.flags, false), State::TcpClose);
}

#[test]
fn tcp_without_syn_opens_no_flow_and_leaves_no_state() {
    let mut f = Fixture::new(&hostnames(&EPS, "TCP"));
    for (n, flags) in [tcp_flags::ACK, tcp_flags::FIN, tcp_flags::RST, 0]
        .into_iter()
        .enumerate()
    {
        let (rc, _) = f.run(
            programs::POD_INGRESS,
            &tcp_with(flags, (CLIENT, 40200 + n as u16), (VIP, 80), 0),
        );
        assert_eq!(rc, TC_ACT_SHOT, "flags {flags:#x}");
    }
    assert_eq!(f.counter(counter::DROP_TCP_NO_FLOW), 4);
    assert_eq!(f.counter(counter::FWD_NEW), 0);
    assert!(entries(&mut f).is_empty(), "no state for junk");
}

#[test]
fn the_sweeper_expires_flows_by_state_and_removes_both_entries() {
    let mut f = Fixture::new(&hostnames(&EPS[..1], "TCP"));
    // A: SYN only. B: answered. C: answered then RST.
    let (a, b, c) = ((CLIENT, 40300), (CLIENT, 40301), (CLIENT, 40302));
    let mut backend = (VIP, 0);
    for cl in [a, b, c] {
        let (_, out) = f.run(
            programs::POD_INGRESS,
            &tcp_with(tcp_flags::SYN, cl, (VIP, 80), 0),
        );
        backend = parse_checked(&out).dst;
    }
    for cl in [b, c] {
        f.run(
            programs::POD_EGRESS,
            &tcp_with(tcp_flags::SYN | tcp_flags::ACK, backend, cl, 0),
        );
    }
    f.run(
        programs::POD_INGRESS,
        &tcp_with(tcp_flags::RST, c, (VIP, 80), 0),
    );
    assert_eq!(entries(&mut f).len(), 6);
    let t0 = newest(&mut f);
    assert_eq!(
        sweep(&mut f, t0 + 5 * S),
        vec![],
        "nothing idle long enough"
    );
    // RST: 10 s.
    assert_eq!(sweep(&mut f, t0 + 11 * S), vec![(State::TcpClose, 1)]);
    assert!(entry(&mut f, &key(c, (VIP, 80), TCP)).is_none());
    assert!(
        entry(&mut f, &key(backend, c, TCP)).is_none(),
        "reply entry too"
    );
    // SYN sent: 120 s.
    assert_eq!(sweep(&mut f, t0 + 121 * S), vec![(State::TcpSynSent, 1)]);
    assert_eq!(entries(&mut f).len(), 2);
    // Established: alive after an hour, gone after a day.
    assert_eq!(sweep(&mut f, t0 + 3600 * S), vec![]);
    assert_eq!(
        sweep(&mut f, t0 + 86_401 * S),
        vec![(State::TcpEstablished, 1)]
    );
    assert!(entries(&mut f).is_empty());

    // UDP: 30 s unreplied, 120 s replied.
    let mut f = Fixture::new(&hostnames(&EPS[..1], "UDP"));
    let (_, out) = f.run(
        programs::POD_INGRESS,
        &packet(UDP, (CLIENT, 40310), (VIP, 80), 0, false),
    );
    let backend = parse_checked(&out).dst;
    f.run(
        programs::POD_INGRESS,
        &packet(UDP, (CLIENT, 40311), (VIP, 80), 0, false),
    );
    f.run(
        programs::POD_EGRESS,
        &packet(UDP, backend, (CLIENT, 40311), 0, false),
    );
    let t0 = newest(&mut f);
    assert_eq!(sweep(&mut f, t0 + 31 * S), vec![(State::UdpUnreplied, 1)]);
    assert_eq!(sweep(&mut f, t0 + 100 * S), vec![]);
    assert_eq!(sweep(&mut f, t0 + 121 * S), vec![(State::UdpReplied, 1)]);
}

/// A masquerade range of two ports: a third live flow finds none, a closed flow's port is
/// taken over at once, an expired flow's port is free again.
#[test]
fn snat_ports_come_back_when_flows_end_and_are_never_taken_from_a_live_flow() {
    let mut f = Fixture::new(&load_balancer(&[("10.76.1.10", "node2")], false, &[]));
    f.dp.set_config(&NodeConfig {
        hairpin_addr_be: abi::addr_be(HAIRPIN),
        node_addr_be: abi::addr_be(NODE),
        snat_port_min: 61000,
        snat_port_max: 61001,
        ..Default::default()
    })
    .expect("config");
    let open = |f: &Fixture, port: u16| {
        let (rc, out) = f.run(
            programs::UPLINK_INGRESS,
            &tcp_with(tcp_flags::SYN, (EXT, port), (NODE, 30080), 0),
        );
        (rc != TC_ACT_SHOT).then(|| parse_checked(&out))
    };
    let a = open(&f, 50001).expect("first flow");
    let b = open(&f, 50002).expect("second flow");
    assert_ne!(a.src.1, b.src.1, "two live flows, two ports");
    // Both answered.
    for p in [&a, &b] {
        f.run(
            programs::UPLINK_INGRESS,
            &tcp_with(tcp_flags::SYN | tcp_flags::ACK, p.dst, p.src, 0),
        );
    }
    assert!(open(&f, 50003).is_none(), "no free port: refused");
    assert_eq!(f.counter(counter::DROP_SNAT_EXHAUSTED), 1);
    // A resets: its port goes to the next flow at once.
    f.run(
        programs::UPLINK_INGRESS,
        &tcp_with(tcp_flags::RST, (EXT, 50001), (NODE, 30080), 0),
    );
    let c = open(&f, 50003).expect("the closed flow's port");
    assert_eq!(c.src.1, a.src.1);
    assert_eq!(f.counter(counter::CT_CLOSED_REUSED), 1);
    // B's replies still reach B's client: its entries were never touched.
    let (_, back) = f.run(
        programs::UPLINK_INGRESS,
        &tcp_with(tcp_flags::ACK, b.dst, b.src, 0),
    );
    assert_eq!(parse_checked(&back).dst, (EXT, 50002));
    // C never answered; D finds no port until the sweeper expires C (SYN sent, 120 s).
    assert!(open(&f, 50004).is_none());
    let t0 = newest(&mut f);
    assert_eq!(sweep(&mut f, t0 + 121 * S), vec![(State::TcpSynSent, 1)]);
    let d = open(&f, 50004).expect("the expired flow's port");
    assert_eq!(d.src.1, c.src.1);
    assert_eq!(f.counter(counter::DROP_SNAT_EXHAUSTED), 2);
}

/// Linux reuses a source port towards two ClusterIPs; they share an endpoint. The second
/// flow's reply tuple is the first's: it gets another source port, as netfilter's NAT does.
#[test]
fn a_reply_tuple_held_by_a_live_flow_is_never_overwritten() {
    let vip2 = Ipv4Addr::new(10, 96, 0, 11);
    let two = format!(
        "{}\n---\n{}",
        hostnames(&EPS[..1], "TCP"),
        hostnames(&EPS[..1], "TCP")
            .replace("name: hostnames,", "name: other,")
            .replace("hostnames-abc", "other-abc")
            .replace("service-name: hostnames", "service-name: other")
            .replace(&VIP.to_string(), &vip2.to_string())
    );
    let f = Fixture::new(&two);
    let client = (CLIENT, 40400);
    let (_, one) = f.run(
        programs::POD_INGRESS,
        &tcp_with(tcp_flags::SYN, client, (VIP, 80), 0),
    );
    let one = parse_checked(&one);
    assert_eq!(one.src, client, "the first flow keeps the client's port");
    let (rc, two) = f.run(
        programs::POD_INGRESS,
        &tcp_with(tcp_flags::SYN, client, (vip2, 80), 0),
    );
    assert_eq!(rc, TC_ACT_OK);
    let two = parse_checked(&two);
    assert_eq!(two.dst, one.dst, "same endpoint");
    assert_eq!(two.src.0, CLIENT, "the client's address is kept");
    assert_ne!(two.src.1, client.1, "another source port");
    assert_eq!(f.counter(counter::CT_CLASH_REMAPPED), 1);
    // Each flow's replies come back from its own VIP, to the client's real port.
    let (_, r1) = f.run(
        programs::POD_EGRESS,
        &tcp_with(tcp_flags::SYN | tcp_flags::ACK, one.dst, one.src, 0),
    );
    assert_eq!(
        (parse_checked(&r1).src, parse_checked(&r1).dst),
        ((VIP, 80), client)
    );
    let (_, r2) = f.run(
        programs::POD_EGRESS,
        &tcp_with(tcp_flags::SYN | tcp_flags::ACK, two.dst, two.src, 0),
    );
    assert_eq!(
        (parse_checked(&r2).src, parse_checked(&r2).dst),
        ((vip2, 80), client)
    );
    // And the client's next packets keep their translations.
    let (_, n2) = f.run(
        programs::POD_INGRESS,
        &tcp_with(tcp_flags::ACK, client, (vip2, 80), 0),
    );
    assert_eq!(parse_checked(&n2).src, two.src);
}

/// Tables of 64 entries: a flood of unanswered packets from distinct tuples (6 x the table)
/// evicts only its own kind. The established flow keeps its backend; new flows still work.
#[test]
fn a_flood_of_unanswered_packets_never_evicts_an_answered_flow() {
    let opts = LoadOptions {
        pin_dir: None,
        sizes: MapSizes {
            conntrack: 64,
            ..Default::default()
        },
    };
    let mut f = Fixture::with_options(&hostnames(&EPS, "UDP"), &opts);
    let client = (CLIENT, 40500);
    let (_, out) = f.run(
        programs::POD_INGRESS,
        &packet(UDP, client, (VIP, 80), 0, false),
    );
    let backend = parse_checked(&out).dst;
    f.run(
        programs::POD_EGRESS,
        &packet(UDP, backend, client, 0, false),
    );
    for n in 0..384u16 {
        let src = (Ipv4Addr::new(10, 76, 3, (n % 250) as u8), 1000 + n);
        f.run(
            programs::POD_INGRESS,
            &packet(UDP, src, (VIP, 80), 0, false),
        );
    }
    assert!(f.counter(counter::FWD_NEW) >= 385);
    for n in 0..20 {
        let (_, out) = f.run(
            programs::POD_INGRESS,
            &packet(UDP, client, (VIP, 80), 0, false),
        );
        assert_eq!(parse_checked(&out).dst, backend, "packet {n}: same backend");
    }
    let (v, answered) = entry(&mut f, &key(client, (VIP, 80), UDP)).expect("still tracked");
    assert!(answered && v.flags & ct_flags::ANSWERED != 0);
    // A new flow after the flood: balanced, answered, tracked.
    let late = (CLIENT, 40501);
    let (rc, out) = f.run(
        programs::POD_INGRESS,
        &packet(UDP, late, (VIP, 80), 0, false),
    );
    assert_eq!(rc, TC_ACT_OK);
    let b2 = parse_checked(&out).dst;
    let (_, back) = f.run(programs::POD_EGRESS, &packet(UDP, b2, late, 0, false));
    assert_eq!(parse_checked(&back).src, (VIP, 80));

    // When the answered table itself is full, a flow's first reply leaves it where it is
    // (counted), still translated.
    for n in 0..40u16 {
        let cl = (Ipv4Addr::new(10, 76, 4, 1), 2000 + n);
        let (_, out) = f.run(programs::POD_INGRESS, &packet(UDP, cl, (VIP, 80), 0, false));
        let b = parse_checked(&out).dst;
        let (_, back) = f.run(programs::POD_EGRESS, &packet(UDP, b, cl, 0, false));
        assert_eq!(parse_checked(&back).src, (VIP, 80), "reply {n} translated");
    }
    assert!(f.counter(counter::CT_ANSWERED_FULL) > 0);

    // A flow whose other entry the LRU evicted cannot be translated both ways: the sweeper
    // removes the half left (counted), and nothing else.
    let half = (CLIENT, 40502);
    let (_, out) = f.run(
        programs::POD_INGRESS,
        &packet(UDP, half, (VIP, 80), 0, false),
    );
    let b3 = parse_checked(&out).dst;
    assert!(
        f.dp.ct_tables()
            .expect("tables")
            .new
            .remove(&key(b3, half, UDP))
    );
    let now = newest(&mut f) + 2 * S;
    let st = Sweeper::new(1000).run_all(
        &mut f.dp.ct_tables().expect("tables"),
        &Timeouts::default(),
        now,
    );
    // (The flood may have left halves of its own too.)
    assert!(st.orphans >= 1, "{st:?}");
    assert_eq!(st.removed_total(), 0, "{st:?}");
    assert!(entry(&mut f, &key(half, (VIP, 80), UDP)).is_none());
    assert!(entry(&mut f, &key(client, (VIP, 80), UDP)).is_some());
}

/// A UDP datagram in two fragments: the second has no ports, and gets the first's
/// translation, both ways. A fragment seen before its first passes untouched.
#[test]
fn fragments_get_their_first_fragments_translation_both_ways() {
    let f = Fixture::new(&hostnames(&EPS[..1], "UDP"));
    let client = (CLIENT, 40600);
    let payload = [7u8; 64];
    let fragments = |src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), id: u16| {
        let l4 = packet::udp(src.1, dst.1, &payload);
        let l4 = Ipv4::new(UDP, src.0, dst.0).with_checksum(l4);
        let (head, tail) = l4.split_at(48);
        let first = Ipv4::new(UDP, src.0, dst.0)
            .id(id)
            .fragment(true, 0)
            .packet(head);
        let second = Ipv4::new(UDP, src.0, dst.0)
            .id(id)
            .fragment(false, 48)
            .packet(tail);
        (
            packet::ethernet(MAC_GW, MAC_POD, &first),
            packet::ethernet(MAC_GW, MAC_POD, &second),
        )
    };
    let (first, second) = fragments(client, (VIP, 80), 0x4242);
    // The tail before its head: nothing known, untouched.
    let (rc, out) = f.run(programs::POD_INGRESS, &second);
    assert_eq!((rc, &out), (TC_ACT_OK, &second));
    assert_eq!(f.counter(counter::PASS_FRAGMENT), 1);
    let (_, head) = f.run(programs::POD_INGRESS, &first);
    let backend_ip = Ipv4Addr::new(head[30], head[31], head[32], head[33]);
    assert_eq!(backend_ip.to_string(), EPS[0]);
    let (rc, tail) = f.run(programs::POD_INGRESS, &second);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(
        &tail[30..34],
        &backend_ip.octets(),
        "the tail is DNATed too"
    );
    assert_eq!(&tail[26..30], &CLIENT.octets());
    assert_eq!(
        u16::from_be_bytes([tail[24], tail[25]]),
        packet::ipv4_header_checksum(&tail[14..34]),
        "IPv4 checksum"
    );
    assert_eq!(&tail[34..], &second[34..], "the payload is untouched");
    assert_eq!(f.counter(counter::FRAG_TRANSLATED), 1);
    // The reassembled datagram's UDP checksum is valid after translation.
    let mut l4 = head[34..].to_vec();
    l4.extend_from_slice(&tail[34..]);
    assert_eq!(
        u16::from_be_bytes([l4[6], l4[7]]),
        packet::l4_checksum(CLIENT, backend_ip, UDP, &l4),
        "UDP checksum over the reassembled datagram"
    );

    // The reply, also in two fragments: the tail's source becomes the VIP.
    let (rfirst, rsecond) = fragments((backend_ip, 9376), client, 0x5151);
    let (_, rhead) = f.run(programs::POD_EGRESS, &rfirst);
    assert_eq!(&rhead[26..30], &VIP.octets());
    let (_, rtail) = f.run(programs::POD_EGRESS, &rsecond);
    assert_eq!(
        &rtail[26..30],
        &VIP.octets(),
        "the reply's tail from the VIP"
    );
    assert_eq!(f.counter(counter::FRAG_TRANSLATED), 2);
}

/// A bpffs of the test's own, mounted on a temporary directory and unmounted when dropped
/// (failed or not), for fixtures that need pins.
struct OwnBpffs(tempfile::TempDir);

impl OwnBpffs {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ebpf-proxy-fixture-bpffs-")
            .tempdir()
            .expect("temporary directory");
        datapath::bpffs::ensure(dir.path()).expect("mount a bpffs for the fixture's pins");
        Self(dir)
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for OwnBpffs {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.path().as_os_str().as_encoded_bytes())
            .expect("path without NUL");
        // SAFETY: a valid NUL-terminated path. Lazy: a map still open elsewhere is no error.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// An upgrade from a release whose answered and unanswered flows share one table (v0.1.0's
/// `CT4_V2`, same key and value layout). A flow its programs opened after the agent's last
/// copy of that table is still translated by ours, both ways, on whichever packet comes first,
/// and lands in our answered table; once the agent ends the upgrade, that table is no longer
/// read.
#[test]
fn during_an_upgrade_a_flow_only_the_earlier_releases_table_holds_keeps_its_translation() {
    require_root();
    let bpffs = OwnBpffs::new();
    let pins = bpffs.path().join("ebpf-proxy");
    let opts = LoadOptions {
        pin_dir: Some(pins.clone()),
        sizes: MapSizes::default(),
    };
    let yaml = hostnames(&EPS[..1], "UDP");
    let (one, two) = ((CLIENT, 40700), (CLIENT, 40701));
    // The "earlier release": our own object on these pins, its answered table then renamed to
    // v0.1.0's name.
    let backend = {
        let old = Fixture::with_options(&yaml, &opts);
        let mut backend = None;
        for client in [one, two] {
            let (_, out) = old.run(
                programs::POD_INGRESS,
                &packet(UDP, client, (VIP, 80), 0, false),
            );
            let b = parse_checked(&out).dst;
            old.run(programs::POD_EGRESS, &packet(UDP, b, client, 0, false));
            backend = Some(b);
        }
        backend.expect("a backend")
    };
    std::fs::rename(
        pins.join(proxy_common::maps::CT4),
        pins.join(proxy_common::maps::CT4_MIGRATE[0]),
    )
    .expect("rename the answered table's pin");

    let mut f = Fixture::with_options(&yaml, &opts);
    assert!(f.dp.reads_previous_ct(), "the earlier table is bound");
    assert!(entry(&mut f, &key(backend, one, UDP)).is_none());
    // The reply reaches our programs first: back from the service address.
    let (_, back) = f.run(programs::POD_EGRESS, &packet(UDP, backend, one, 0, false));
    assert_eq!(parse_checked(&back).src, (VIP, 80));
    assert_eq!(f.counter(counter::CT_ADOPTED_PREVIOUS), 1);
    let (v, answered) = entry(&mut f, &key(backend, one, UDP)).expect("copied into ours");
    assert!(answered && v.flags & ct_flags::MIGRATED != 0, "{v:?}");
    // The client's side too, to the same backend.
    let (_, out) = f.run(
        programs::POD_INGRESS,
        &packet(UDP, one, (VIP, 80), 0, false),
    );
    assert_eq!(parse_checked(&out).dst, backend);
    assert_eq!(f.counter(counter::CT_ADOPTED_PREVIOUS), 2);

    // The upgrade is over: the earlier table is not read any more (the agent has copied it).
    f.dp.end_previous_ct().expect("end the upgrade");
    let (_, back) = f.run(programs::POD_EGRESS, &packet(UDP, backend, two, 0, false));
    assert_eq!(parse_checked(&back).src, backend, "untranslated");
    assert_eq!(f.counter(counter::CT_ADOPTED_PREVIOUS), 2);
}
