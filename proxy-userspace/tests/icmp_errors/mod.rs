//! ICMP error parsing (issue 11 item 3): the outer header is validated before the quote is
//! read, short quotes pass untouched counted as malformed, parameter problem is translated.
use super::*;

/// A DNATed flow (client -> VIP -> backend 10.76.1.10:9376) and the segment as translated.
fn dnated() -> (Fixture, Vec<u8>) {
    let f = Fixture::new(&hostnames(&["10.76.1.10"], "TCP"));
    let (_, out) = f.run(
        programs::POD_INGRESS,
        &packet(TCP, (CLIENT, 40020), (VIP, 80), 0, false),
    );
    (f, out)
}

const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);

/// Recomputes the outer IPv4 header checksum after a test edited the header.
fn fix_outer(mut f: Vec<u8>) -> Vec<u8> {
    f[24] = 0;
    f[25] = 0;
    let c = packet::ipv4_header_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn parameter_problem_about_a_dnated_flow_is_translated_back_to_the_vip() {
    let (f, out) = dnated();
    let err = icmp_error(12, 0, ROUTER, CLIENT, &out);
    let (rc, xl) = f.run(programs::POD_EGRESS, &err);
    assert_eq!(rc, TC_ACT_OK);
    let (_, (qsrc, qdst)) = parse_icmp_error(&xl);
    assert_eq!(qsrc, (CLIENT, 40020));
    assert_eq!(
        qdst,
        (VIP, 80),
        "parameter problem is translated like the others"
    );
    assert_eq!(f.counter(counter::ICMP_ERROR_XLATED), 1);
}

#[test]
fn a_quote_too_short_for_the_ports_passes_untouched_and_counts_as_malformed() {
    let (f, out) = dnated();
    // Quoted: the inner IPv4 header and only 2 bytes of TCP (no destination port).
    let ip = Ipv4::new(1, ROUTER, CLIENT);
    let icmp = ip.with_checksum(packet::icmp(3, 4, [0, 0, 0x05, 0x78], &out[14..14 + 22]));
    let err = packet::ethernet(MAC_GW, MAC_POD, &ip.packet(&icmp));
    let malformed = f.counter(counter::PASS_MALFORMED);
    assert_eq!(f.run(programs::POD_EGRESS, &err), (TC_ACT_OK, err.clone()));
    assert_eq!(f.counter(counter::PASS_MALFORMED), malformed + 1);
    assert_eq!(f.counter(counter::DROP_REWRITE), 0, "not a rewrite failure");
    assert_eq!(f.counter(counter::ICMP_ERROR_XLATED), 0);
    // The full quote is present in the frame but the outer total length cuts it off.
    let mut cut = icmp_error(3, 4, ROUTER, CLIENT, &out);
    let tot = (20 + 8 + 20 + 4) as u16;
    cut[16..18].copy_from_slice(&tot.to_be_bytes());
    let cut = fix_outer(cut);
    assert_eq!(f.run(programs::POD_EGRESS, &cut), (TC_ACT_OK, cut.clone()));
    assert_eq!(f.counter(counter::PASS_MALFORMED), malformed + 2);
    assert_eq!(f.counter(counter::DROP_REWRITE), 0);
    assert_eq!(f.counter(counter::ICMP_ERROR_XLATED), 0);
}

#[test]
fn bad_outer_headers_and_non_first_fragments_are_not_parsed() {
    let (f, out) = dnated();
    let err = icmp_error(3, 4, ROUTER, CLIENT, &out);
    // Outer IHL 4 (shorter than a header).
    let mut bad_ihl = err.clone();
    bad_ihl[14] = 0x44;
    let bad_ihl = fix_outer(bad_ihl);
    // Total length beyond the frame.
    let mut long = err.clone();
    long[16..18].copy_from_slice(&1400u16.to_be_bytes());
    let long = fix_outer(long);
    // A non-first fragment (offset 8 bytes): its payload is not an ICMP header.
    let mut frag = err.clone();
    frag[20..22].copy_from_slice(&1u16.to_be_bytes());
    let frag = fix_outer(frag);
    for (what, pkt) in [("IHL 4", &bad_ihl), ("long", &long), ("fragment", &frag)] {
        assert_eq!(
            f.run(programs::POD_EGRESS, pkt),
            (TC_ACT_OK, pkt.clone()),
            "{what}: passed untouched"
        );
    }
    assert_eq!(f.counter(counter::ICMP_ERROR_XLATED), 0);
    assert_eq!(f.counter(counter::DROP_REWRITE), 0);
    // The same error, well formed, is translated.
    let (_, xl) = f.run(programs::POD_EGRESS, &err);
    assert_eq!(parse_icmp_error(&xl).1.1, (VIP, 80));
    assert_eq!(f.counter(counter::ICMP_ERROR_XLATED), 1);
}
