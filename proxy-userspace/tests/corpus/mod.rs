//! The malformed-packet corpus (issue 11 items 5 and 7), part of the `fixtures` test binary.
//!
//! A seeded generator (xorshift, fixed seed: every run sees the same frames) mutates valid
//! base frames, namely ClusterIP TCP/UDP/SCTP (new, established, replies), hairpin, REJECT,
//! NodePort (client kept and masqueraded), LB IP plain, IPIP and GUE, ICMP errors quoting
//! tracked flows and fragments. The mutations: truncated at every offset, bad IHL, version, TCP
//! data offset, IPv4 and UDP lengths, fragment bits, TTL, odd sources, VLAN tags, IP options,
//! nested and fragmented tunnels, flipped bytes and checksums. Every frame is run through the
//! program its base belongs to (`lb_pod_in`, `lb_pod_out`), uplink frames through `lb_up_xdp`
//! and `lb_up_in` both, with the maps programmed by the harness and flows opened first, so
//! mutated packets hit tracked flows. Every tc run asks the kernel to check `skb->csum`
//! (`BPF_F_TEST_SKB_CHECKSUM_COMPLETE`).
//!
//! What each frame must satisfy is in [`check_tc`], [`check_xdp`] and [`compare_hooks`]; the
//! rules for "only NAT fields changed" are [`nat_mask`], for checksums [`residuals`].
//! Failing frames found by the corpus are kept below as explicit regression fixtures.
use std::{fmt::Write as _, os::fd::AsFd as _};

use proxy_userspace::datapath::sys;

use super::*;

/// The generator's seed. Changing it gives another corpus; keep it fixed so a failure
/// reproduces.
const SEED: u64 = 0x11c0_7e57_0000_0011;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const ICMP: u8 = 1;
const IPIP: u8 = 4;

/// ClusterIP with one endpoint on this node (10.76.0.10): hairpin from that pod.
const SOLO: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// ClusterIP without endpoints: REJECT.
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const LOCAL_EP: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 10);
const REMOTE_EP: Ipv4Addr = Ipv4Addr::new(10, 76, 1, 10);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);
/// NodePort of the LoadBalancer service (externalTrafficPolicy Local, endpoint on this node).
const NP_LOCAL: u16 = 30080;
/// NodePort of a service with externalTrafficPolicy Cluster and a remote endpoint: masqueraded.
const NP_MASQ: u16 = 30081;

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Every service the corpus needs, in one set of manifests: ClusterIP `web` (TCP, UDP and
/// SCTP on port 80, three endpoints), `solo` (one endpoint: hairpin), `empty` (REJECT), the
/// LoadBalancer `lb` (externalTrafficPolicy Local, NodePort 30080, endpoint on this node: the
/// XDP fast path) and the NodePort `np` (Cluster, 30081, remote endpoint: masqueraded).
fn services() -> String {
    let eps = |ips: &[(&str, &str)]| -> String {
        if ips.is_empty() {
            return " []".to_owned();
        }
        ips.iter()
            .map(|(ip, node)| {
                format!(
                    "\n  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n    nodeName: {node}"
                )
            })
            .collect()
    };
    let svc = |name: &str, spec: &str, protos: &[&str], endpoints: &[(&str, &str)]| {
        let ports: String = protos
            .iter()
            .map(|p| {
                let np = match (name, *p) {
                    ("lb", "SCTP") | ("np", "SCTP") => String::new(),
                    ("lb", _) => format!(", nodePort: {NP_LOCAL}"),
                    ("np", _) => format!(", nodePort: {NP_MASQ}"),
                    _ => String::new(),
                };
                format!(
                    "\n  - {{name: p-{}, port: 80, targetPort: 9376, protocol: {p}{np}}}",
                    p.to_lowercase()
                )
            })
            .collect();
        let slice_ports: String = protos
            .iter()
            .map(|p| {
                format!(
                    "\n- {{name: p-{}, port: 9376, protocol: {p}}}",
                    p.to_lowercase()
                )
            })
            .collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n{spec}  ports:{ports}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: {name}-abc\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: IPv4\nports:{slice_ports}\nendpoints:{}\n",
            eps(endpoints)
        )
    };
    let web: Vec<(&str, &str)> = vec![
        ("10.76.0.10", "node1"),
        ("10.76.0.11", "node1"),
        ("10.76.1.10", "node2"),
    ];
    [
        svc(
            "web",
            &format!("  clusterIP: {VIP}\n"),
            &["TCP", "UDP", "SCTP"],
            &web,
        ),
        svc(
            "solo",
            &format!("  clusterIP: {SOLO}\n"),
            &["TCP", "UDP"],
            &[("10.76.0.10", "node1")],
        ),
        svc(
            "empty",
            &format!("  clusterIP: {EMPTY}\n"),
            &["TCP", "UDP", "SCTP"],
            &[],
        ),
        svc(
            "lb",
            "  type: LoadBalancer\n  clusterIP: 10.96.0.20\n  externalTrafficPolicy: Local\n",
            &["TCP", "UDP"],
            &[("10.76.0.10", "node1")],
        )
        .replacen(
            "\n---",
            &format!("\nstatus: {{loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}}}\n---"),
            1,
        ),
        svc(
            "np",
            "  type: NodePort\n  clusterIP: 10.96.0.21\n  externalTrafficPolicy: Cluster\n",
            &["TCP", "UDP"],
            &[("10.76.1.10", "node2")],
        ),
    ]
    .join("---\n")
}

// ---- frame helpers ----

/// Recomputes the IPv4 header checksum of the header at `ip`, if its IHL fits the frame.
fn fix_ip_csum(f: &mut [u8], ip: usize) {
    let Some(&vihl) = f.get(ip) else { return };
    let ihl = (vihl & 0x0f) as usize * 4;
    if ihl < 20 || ip + ihl > f.len() {
        return;
    }
    f[ip + 10] = 0;
    f[ip + 11] = 0;
    let c = csum::ipv4_header(&f[ip..ip + ihl]);
    f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
}

/// Where the IPv4 datagram of the header at `ip` ends in the frame, the way the datapath's
/// parse sees it: the total length, clipped to the frame; a zero total length (BIG TCP) ends
/// with the frame.
fn ip_end(f: &[u8], ip: usize) -> usize {
    match u16::from_be_bytes([f[ip + 2], f[ip + 3]]) as usize {
        0 => f.len(),
        n => (ip + n).min(f.len()),
    }
}

/// Recomputes the TCP/UDP/SCTP checksum of the datagram at `ip` (a UDP checksum of zero
/// stays zero), if its headers fit.
fn fix_l4_csum(f: &mut [u8], ip: usize) {
    if f.len() < ip + 20 {
        return;
    }
    let ihl = (f[ip] & 0x0f) as usize * 4;
    let l4 = ip + ihl;
    let end = ip_end(f, ip);
    let off = match f[ip + 9] {
        TCP => 16,
        UDP => 6,
        SCTP => 8,
        _ => return,
    };
    if ihl < 20 || end < l4 + off + 2 || (f[ip + 9] == SCTP && end < l4 + 12) {
        return;
    }
    if f[ip + 9] == SCTP {
        let c = proxy_common::crc32c::sctp_checksum(&f[l4..end]);
        f[l4 + 8..l4 + 12].copy_from_slice(&c.to_le_bytes());
        return;
    }
    if f[ip + 9] == UDP && f[l4 + 6..l4 + 8] == [0, 0] {
        return;
    }
    f[l4 + off] = 0;
    f[l4 + off + 1] = 0;
    let src: [u8; 4] = f[ip + 12..ip + 16].try_into().expect("4 bytes");
    let dst: [u8; 4] = f[ip + 16..ip + 20].try_into().expect("4 bytes");
    let c = csum::l4_ipv4(src, dst, f[ip + 9], &f[l4..end]);
    f[l4 + off..l4 + off + 2].copy_from_slice(&c.to_be_bytes());
}

/// Offsets of the IPv4 headers in a frame: the outer one at 14, then, for IPIP or GUE
/// (variant 1, or 0 with an empty header), the inner ones.
fn ip_layers(f: &[u8]) -> Vec<usize> {
    let mut layers = Vec::new();
    let mut ip = ETH;
    if f.len() < 14 || f[12..14] != [8, 0] {
        return layers;
    }
    while f.len() >= ip + 20 && f[ip] >> 4 == 4 && layers.len() < 4 {
        layers.push(ip);
        let ihl = (f[ip] & 0x0f) as usize * 4;
        if ihl < 20 {
            break;
        }
        match f[ip + 9] {
            IPIP => ip += ihl,
            UDP if f.len() >= ip + ihl + 9
                && u16::from_be_bytes([f[ip + ihl + 2], f[ip + ihl + 3]])
                    == proxy_common::GUE_PORT =>
            {
                let first = f[ip + ihl + 8];
                ip += ihl + if first >> 4 == 4 { 8 } else { 12 };
            }
            _ => break,
        }
    }
    layers
}

const ETH: usize = 14;

/// What the decapsulation rule (`uplink::encap_strip`) strips from this frame, as the test
/// sees it: the outer header of IPIP (20), GUE variant 1 (28) or variant 0 (32).
fn strip_len(f: &[u8]) -> Option<usize> {
    if f.len() < 34 || f[14] != 0x45 {
        return None;
    }
    match f[23] {
        IPIP => Some(20),
        UDP if f.len() > 42 => Some(if f[42] >> 4 == 4 { 28 } else { 32 }),
        _ => None,
    }
}

/// The frame with `n` bytes of outer header after the Ethernet header removed.
fn decapsulated(f: &[u8], n: usize) -> Vec<u8> {
    let mut d = f[..ETH].to_vec();
    d.extend_from_slice(f.get(ETH + n..).unwrap_or(&[]));
    d
}

fn hex(f: &[u8]) -> String {
    f.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

// ---- the checks ----

/// The bytes a program may change in a frame it hands on (not in a reply it builds in its
/// place), on the frame as it was before (after decapsulation, if the program stripped an
/// outer header). "NAT fields", precisely:
/// - the Ethernet addresses (0..12), only when the verdict redirects (hairpin swaps them, a
///   FIB redirect writes the next hop's);
/// - in the IPv4 header at 14 (version 4, IHL >= 5): the TTL (byte 8), only when the verdict
///   redirects (and then only down by one, checked separately), the header checksum and both
///   addresses (10..20);
/// - unless the packet is a non-first fragment (no L4 header): for TCP, UDP and SCTP the two
///   ports (0..4) and the checksum (TCP 16..18, UDP 6..8, SCTP 8..12) of the L4 header at
///   14 + IHL; for ICMP, the ICMP checksum (2..4) and, in the quoted packet 8 bytes on, its
///   header checksum and addresses (10..20), its ports (0..4 after its IHL) and its UDP
///   checksum (6..8 after its IHL).
///
/// Nothing else: no length, option, flag, payload or trailer byte, and the frame keeps its
/// length.
fn nat_mask(f: &[u8], redirect: bool) -> Vec<bool> {
    let mut m = vec![false; f.len()];
    let mut allow = |r: std::ops::Range<usize>| {
        for i in r {
            if let Some(b) = m.get_mut(i) {
                *b = true;
            }
        }
    };
    if redirect {
        allow(0..12);
    }
    if f.len() < 34 || f[12..14] != [8, 0] {
        return m;
    }
    let ihl = (f[14] & 0x0f) as usize * 4;
    if f[14] >> 4 != 4 || ihl < 20 {
        return m;
    }
    if redirect {
        allow(22..23);
    }
    allow(24..34);
    if u16::from_be_bytes([f[20], f[21]]) & 0x1fff != 0 {
        return m;
    }
    let l4 = ETH + ihl;
    match f[23] {
        TCP => {
            allow(l4..l4 + 4);
            allow(l4 + 16..l4 + 18);
        }
        UDP => {
            allow(l4..l4 + 4);
            allow(l4 + 6..l4 + 8);
        }
        SCTP => {
            allow(l4..l4 + 4);
            allow(l4 + 8..l4 + 12);
        }
        ICMP => {
            allow(l4 + 2..l4 + 4);
            let inner = l4 + 8;
            if let Some(&v) = f.get(inner) {
                let iihl = (v & 0x0f) as usize * 4;
                allow(inner + 10..inner + 20);
                allow(inner + iihl..inner + iihl + 4);
                allow(inner + iihl + 6..inner + iihl + 8);
            }
        }
        _ => {}
    }
    m
}

/// A checksum's residual: what summing the covered bytes with the checksum field gives. A
/// valid ones'-complement checksum gives 0xffff (0 and 0xffff are the same number, so 0 is
/// reported as 0xffff); a valid CRC32c gives a stored ^ computed of 0. NAT done right moves the
/// checksum with the fields it covers, so the residual of every checksum stays exactly what it
/// was: a valid checksum stays valid, an invalid one stays invalid (by the same amount).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Residual {
    Ones(u16),
    Crc(u32),
    /// A UDP datagram without a checksum (field zero): it must stay without one.
    NoUdpChecksum,
}

fn ones(sum: u32) -> Residual {
    match csum::fold(sum) {
        0 => Residual::Ones(0xffff),
        r => Residual::Ones(r),
    }
}

/// The residuals of every checksum of the outermost IPv4 packet, each covering the bytes the
/// datapath's parse would consider (the datagram to its total length, clipped to the frame):
/// the IPv4 header, the TCP/UDP (pseudo-header included) or SCTP checksum unless the packet
/// is a non-first fragment, the ICMP checksum and the quoted IPv4 header of an ICMP error.
fn residuals(f: &[u8]) -> Vec<(&'static str, Residual)> {
    let mut r = Vec::new();
    if f.len() < 34 || f[12..14] != [8, 0] || f[14] >> 4 != 4 {
        return r;
    }
    let ihl = (f[14] & 0x0f) as usize * 4;
    if ihl < 20 || ETH + ihl > f.len() {
        return r;
    }
    r.push(("ipv4 header", ones(csum::add_bytes(0, &f[ETH..ETH + ihl]))));
    if u16::from_be_bytes([f[20], f[21]]) & 0x1fff != 0 {
        return r;
    }
    let l4 = ETH + ihl;
    let end = ip_end(f, ETH);
    let proto = f[23];
    match proto {
        TCP | UDP if end >= l4 + packet::l4_csum_off(proto) + 2 => {
            if proto == UDP && f[l4 + 6..l4 + 8] == [0, 0] {
                r.push(("udp", Residual::NoUdpChecksum));
            } else {
                let mut pseudo = f[26..34].to_vec();
                pseudo.extend_from_slice(&[0, proto]);
                pseudo.extend_from_slice(&((end - l4) as u16).to_be_bytes());
                let sum = csum::add_bytes(csum::add_bytes(0, &pseudo), &f[l4..end]);
                r.push((if proto == TCP { "tcp" } else { "udp" }, ones(sum)));
            }
        }
        SCTP if end >= l4 + 12 => {
            let stored = u32::from_le_bytes(f[l4 + 8..l4 + 12].try_into().expect("4 bytes"));
            let computed = proxy_common::crc32c::sctp_checksum(&f[l4..end]);
            r.push(("sctp", Residual::Crc(stored ^ computed)));
        }
        ICMP if end >= l4 + 8 => {
            r.push(("icmp", ones(csum::add_bytes(0, &f[l4..end]))));
            let inner = l4 + 8;
            if end >= inner + 20 && f[inner] >> 4 == 4 {
                let iihl = (f[inner] & 0x0f) as usize * 4;
                if iihl >= 20 && inner + iihl <= end {
                    r.push((
                        "quoted ipv4 header",
                        ones(csum::add_bytes(0, &f[inner..inner + iihl])),
                    ));
                }
            }
        }
        _ => {}
    }
    r
}

/// Only NAT fields changed between `before` and `after` (see [`nat_mask`]), the TTL at most
/// down by one on a redirect, and every checksum exactly as valid as it was.
fn check_rewrite(before: &[u8], after: &[u8], redirect: bool) -> Result<(), String> {
    if before.len() != after.len() {
        return Err(format!(
            "length changed from {} to {} without decapsulation or a reply",
            before.len(),
            after.len()
        ));
    }
    let mask = nat_mask(before, redirect);
    let changed: Vec<usize> = (0..before.len())
        .filter(|&i| before[i] != after[i] && !mask[i])
        .collect();
    if !changed.is_empty() {
        return Err(format!("non-NAT bytes changed at offsets {changed:?}"));
    }
    if before.len() > 22 && before[22] != after[22] && after[22] != before[22].wrapping_sub(1) {
        return Err(format!("TTL {} -> {}", before[22], after[22]));
    }
    let (rb, ra) = (residuals(before), residuals(after));
    if rb != ra {
        return Err(format!(
            "checksum state changed: before {rb:?}, after {ra:?}"
        ));
    }
    Ok(())
}

/// A REJECT reply built in place of `before`: sent back (MACs and addresses swapped), a TCP
/// RST or an ICMP port unreachable quoting the packet, every checksum valid.
fn check_reply(before: &[u8], after: &[u8]) -> Result<(), String> {
    if after.len() < 54 || after[12..14] != [8, 0] || after[14] != 0x45 {
        return Err("the reply is not IPv4 without options".into());
    }
    if after[..6] != before[6..12] || after[6..12] != before[..6] {
        return Err("the reply does not go back where the packet came from".into());
    }
    if after[26..30] != before[30..34] || after[30..34] != before[26..30] {
        return Err("the reply's addresses are not the packet's, swapped".into());
    }
    // The reply's own checksums; the quoted header is the packet's, as valid as it was.
    let valid = residuals(after)
        .iter()
        .filter(|(name, _)| *name != "quoted ipv4 header")
        .all(|(_, r)| matches!(r, Residual::Ones(0xffff)));
    match after[23] {
        TCP if after[34 + 13] & tcp_flags::RST != 0 && valid => Ok(()),
        // The quote: the packet's whole IPv4 header (options included) and 8 bytes more.
        ICMP if after[34..36] == [3, 3]
            && valid
            && before.get(14).is_some_and(|b| {
                let q = usize::from(b & 0x0f) * 4 + 8;
                after.len() == 42 + q && before.get(14..14 + q) == after.get(42..)
            }) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "not a valid RST or port unreachable: {:?}",
            residuals(after)
        )),
    }
}

const TC_VERDICTS: [u32; 3] = [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT];

/// Counters before and after a run.
struct Delta<'a>(&'a [u64], &'a [u64]);

impl Delta<'_> {
    fn grew(&self, idx: u32) -> bool {
        self.1[idx as usize] > self.0[idx as usize]
    }
}

/// A tc program's run on `input`: the verdict is one tc programs give; a REJECT is a proper
/// reply; otherwise only NAT fields changed (after an outer header was stripped, if `decap`
/// grew) with checksums as valid as before; a frame counted as malformed passes untouched.
fn check_tc(input: &[u8], verdict: u32, out: &[u8], d: &Delta) -> Result<(), String> {
    if !TC_VERDICTS.contains(&verdict) {
        return Err(format!(
            "verdict {verdict} is not one a tc program may give"
        ));
    }
    let base = if d.grew(counter::DECAP) {
        let n = strip_len(input).ok_or("decapsulated a frame that is not IPIP/GUE")?;
        decapsulated(input, n)
    } else {
        input.to_vec()
    };
    if d.grew(counter::REJECT) {
        if verdict == TC_ACT_SHOT && d.grew(counter::DROP_REJECT_RATE_LIMITED) && out == base {
            // `run_tc` ran a resized reply again without the CHECKSUM_COMPLETE check, and the
            // token bucket refused the second reply.
            return Ok(());
        }
        if verdict != TC_ACT_REDIRECT {
            return Err(format!("a REJECT reply with verdict {verdict}"));
        }
        return check_reply(&base, out);
    }
    if d.grew(counter::PASS_MALFORMED) && (verdict != TC_ACT_OK || out != base) {
        return Err("counted as malformed but not passed untouched".into());
    }
    check_rewrite(&base, out, verdict == TC_ACT_REDIRECT)
}

/// `lb_up_xdp`'s run: XDP_PASS (or XDP_DROP), metadata only as the translation mark, and
/// the same rewrite rules as tc (never a redirect, so no MAC or TTL change).
fn check_xdp(input: &[u8], r: &datapath::XdpTestRun, d: &Delta) -> Result<(), String> {
    if r.verdict != XDP_PASS && r.verdict != XDP_DROP {
        return Err(format!("XDP verdict {}", r.verdict));
    }
    let translated = d.grew(counter::XDP_FWD_ESTABLISHED);
    if r.translated() != translated || !(r.translated() || r.meta.is_empty()) {
        return Err(format!(
            "metadata {:?} does not match the translation count ({translated})",
            r.meta
        ));
    }
    let base = if d.grew(counter::XDP_DECAP) {
        let n = strip_len(input).ok_or("decapsulated a frame that is not IPIP/GUE")?;
        decapsulated(input, n)
    } else {
        input.to_vec()
    };
    if r.verdict == XDP_DROP {
        return Ok(());
    }
    check_rewrite(&base, &r.frame, false)
}

/// Runs a tc program once with `BPF_F_TEST_SKB_CHECKSUM_COMPLETE`: the kernel fails the run
/// (`EBADMSG`) when the program leaves `skb->csum` inconsistent with the packet. `Ok(None)`:
/// BPF_PROG_TEST_RUN refuses the frame before the program runs (`EINVAL`), which it does for
/// an IPv4 ethertype with less than an IPv4 header behind it, and only for that.
///
/// One exception to the check: a REJECT reply longer or shorter than the packet.
/// `bpf_skb_change_tail` then drops the skb to CHECKSUM_NONE, where `skb->csum` means nothing,
/// but the kernel's check compares it anyway. Such a run is repeated without the flag (the
/// reply's own checksums are still checked, by [`check_reply`]).
fn run_tc(f: &Fixture, prog: &'static str, pkt: &[u8]) -> Result<Option<(u32, Vec<u8>)>, String> {
    let p = f.dp.program(prog).expect("program");
    let fd = p.fd().expect("loaded");
    let rejects = f.counter(counter::REJECT);
    match sys::prog_test_run(fd.as_fd(), pkt, sys::BPF_F_TEST_SKB_CHECKSUM_COMPLETE) {
        Ok(r) => Ok(Some(r)),
        Err(e)
            if e.raw_os_error() == Some(libc::EBADMSG)
                && f.counter(counter::REJECT) > rejects
                && pkt.len() != if pkt[23] == TCP { 54 } else { 70 } =>
        {
            sys::prog_test_run(fd.as_fd(), pkt, 0)
                .map(Some)
                .map_err(|e| format!("BPF_PROG_TEST_RUN failed: {e}"))
        }
        Err(e)
            if e.raw_os_error() == Some(libc::EINVAL)
                && pkt.len() < 34
                && pkt[12..14] == [8, 0] =>
        {
            Ok(None)
        }
        Err(e) if e.raw_os_error() == Some(libc::EBADMSG) => Err(format!(
            "skb->csum inconsistent after the run (CHECKSUM_COMPLETE): {e}"
        )),
        Err(e) => Err(format!("BPF_PROG_TEST_RUN failed: {e}")),
    }
}

fn run_xdp_raw(f: &Fixture, pkt: &[u8]) -> datapath::XdpTestRun {
    datapath::xdp_test_run(
        f.dp.xdp_program(programs::UPLINK_XDP).expect("xdp program"),
        pkt,
        1,
    )
    .expect("BPF_PROG_TEST_RUN (XDP)")
}

/// Item 5, on one uplink frame: XDP's decision against tc's alone, both from the same state.
/// - They decapsulate the same frames (one rule, `uplink::encap_strip`).
/// - A frame XDP translates, tc alone translates too (an established flow), to the same
///   bytes, and tc then passes XDP's output untouched.
/// - A frame tc passes as malformed, XDP does not translate.
fn compare_hooks(
    xdp: &datapath::XdpTestRun,
    dx: &Delta,
    tc: (u32, &[u8]),
    dt: &Delta,
) -> Result<(), String> {
    let xdp_translated = dx.grew(counter::XDP_FWD_ESTABLISHED);
    if dx.grew(counter::XDP_DECAP) != dt.grew(counter::DECAP) {
        return Err(format!(
            "decapsulation differs: XDP {}, tc {}",
            dx.grew(counter::XDP_DECAP),
            dt.grew(counter::DECAP)
        ));
    }
    if dt.grew(counter::PASS_MALFORMED) && xdp_translated {
        return Err("XDP translated a frame tc passes as malformed".into());
    }
    if xdp_translated {
        if !dt.grew(counter::FWD_ESTABLISHED) || tc.0 != TC_ACT_OK {
            return Err(format!(
                "XDP translated a frame tc alone does not translate as established (verdict {})",
                tc.0
            ));
        }
        if tc.1 != xdp.frame.as_slice() {
            return Err(format!(
                "XDP and tc translate differently: xdp {} tc {}",
                hex(&xdp.frame),
                hex(tc.1)
            ));
        }
    }
    Ok(())
}

// ---- the generator ----

/// Which program a base frame (and its mutations) goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    PodIn,
    PodOut,
    /// `lb_up_xdp` and `lb_up_in`, compared.
    Uplink,
}

struct Base {
    name: &'static str,
    hook: Hook,
    frame: Vec<u8>,
}

const ODD_SOURCES: [Ipv4Addr; 12] = [
    Ipv4Addr::new(0, 0, 0, 0),
    Ipv4Addr::new(0, 1, 2, 3),
    Ipv4Addr::new(127, 0, 0, 1),
    Ipv4Addr::new(224, 0, 0, 1),
    Ipv4Addr::new(239, 255, 255, 250),
    Ipv4Addr::new(240, 0, 0, 1),
    Ipv4Addr::new(255, 255, 255, 255),
    NODE,
    VIP,
    LB_IP,
    HAIRPIN,
    REMOTE_EP,
];

/// Applies one random mutation to `f`; returns its description.
fn mutate(rng: &mut Rng, f: &mut Vec<u8>) -> String {
    let layers = ip_layers(f);
    // Mostly the outermost header, sometimes an inner one of a tunnel.
    let ip = if layers.is_empty() {
        ETH
    } else if rng.chance(70) {
        layers[0]
    } else {
        *rng.pick(&layers)
    };
    let fix = rng.chance(70);
    let has_ip = f.len() >= ip + 20;
    let l4 = if has_ip {
        ip + (f[ip] & 0x0f) as usize * 4
    } else {
        ip + 20
    };
    let what = match rng.below(18) {
        0 => {
            let cut = ETH + rng.below(f.len().saturating_sub(ETH));
            f.truncate(cut.max(ETH));
            format!("truncate at {cut}")
        }
        1 if has_ip => {
            let ihl = rng.below(16) as u8;
            f[ip] = (f[ip] & 0xf0) | ihl;
            format!("ihl {ihl} @{ip}")
        }
        2 if has_ip => {
            let v = rng.below(16) as u8;
            f[ip] = (f[ip] & 0x0f) | (v << 4);
            format!("version {v} @{ip}")
        }
        3 if f.len() > l4 + 13 && f.get(ip + 9) == Some(&TCP) => {
            let doff = rng.below(16) as u8;
            f[l4 + 12] = (f[l4 + 12] & 0x0f) | (doff << 4);
            if fix {
                fix_l4_csum(f, ip);
            }
            format!("tcp data offset {doff}")
        }
        4 if has_ip => {
            let len = f.len() - ip;
            let ihl = (f[ip] & 0x0f) as usize * 4;
            let tot = match rng.below(8) {
                0 => 0,
                1 => ihl.saturating_sub(1),
                2 => ihl + rng.below(20),
                3 => len.saturating_sub(1 + rng.below(8)),
                4 => len + 1 + rng.below(64),
                5 => 0xffff,
                6 => len,
                _ => rng.below(0x10000),
            } as u16;
            f[ip + 2..ip + 4].copy_from_slice(&tot.to_be_bytes());
            format!("total length {tot} @{ip}")
        }
        5 if f.len() > l4 + 6 && f.get(ip + 9) == Some(&UDP) => {
            let len = rng.below(0x10000) as u16;
            f[l4 + 4..l4 + 6].copy_from_slice(&len.to_be_bytes());
            format!("udp length {len}")
        }
        6 if has_ip => {
            let frag: u16 = match rng.below(5) {
                0 => 0x2000,
                1 => 0x2000 | (1 + rng.below(0x1fff)) as u16,
                2 => (1 + rng.below(0x1fff)) as u16,
                3 => 0x4000,
                _ => 0x8000 | rng.below(0x8000) as u16,
            };
            f[ip + 6..ip + 8].copy_from_slice(&frag.to_be_bytes());
            format!("fragment bits {frag:#06x} @{ip}")
        }
        7 if has_ip => {
            let ttl = *rng.pick(&[0u8, 1, 2, 255]);
            f[ip + 8] = ttl;
            format!("ttl {ttl} @{ip}")
        }
        8 if has_ip => {
            let src = *rng.pick(&ODD_SOURCES);
            f[ip + 12..ip + 16].copy_from_slice(&src.octets());
            if fix {
                fix_l4_csum(f, ip);
            }
            format!("source {src} @{ip}")
        }
        9 => {
            let tag: &[u8] = if rng.chance(70) {
                &[0x81, 0x00, 0x00, 0x64]
            } else {
                &[0x88, 0xa8, 0x00, 0x0a, 0x81, 0x00, 0x00, 0x64]
            };
            let at = 12.min(f.len());
            f.splice(at..at, tag.iter().copied());
            format!("vlan tag {}", hex(tag))
        }
        10 if f.len() > 12 => {
            let end = f.len().min(l4 + 24);
            let at = 12 + rng.below(end - 12);
            let x = 1 + rng.below(255) as u8;
            f[at] ^= x;
            format!("flip byte {at} ^ {x:#04x}")
        }
        11 if f.len() > l4 + 18 => {
            let off = match f.get(ip + 9) {
                Some(&TCP) => 16,
                Some(&UDP) => 6,
                Some(&SCTP) => 8,
                _ => 2,
            };
            f[l4 + off] ^= 0x5a;
            format!("corrupt l4 checksum @{}", l4 + off)
        }
        12 if has_ip => {
            f[ip + 10] ^= 0xa5;
            return format!("corrupt ip checksum @{ip}");
        }
        13 if has_ip && f[ip] & 0x0f == 5 && f.len() >= ip + 20 => {
            // Well-formed NOP options: a valid packet with its ports further on.
            let n = 4 * (1 + rng.below(10));
            f.splice(ip + 20..ip + 20, std::iter::repeat_n(1u8, n));
            f[ip] = 0x40 | (5 + n / 4) as u8;
            let tot = u16::from_be_bytes([f[ip + 2], f[ip + 3]]) as usize + n;
            f[ip + 2..ip + 4].copy_from_slice(&(tot as u16).to_be_bytes());
            fix_ip_csum(f, ip);
            return format!("{n} bytes of ip options @{ip}");
        }
        14 if f.len() >= 34 => {
            let gue = rng.chance(50);
            let mut w = wrap(f, gue);
            let frag = rng.below(4);
            if frag != 0 {
                let bits: u16 = [0, 0x2000, 0x0001, 0x2003][frag];
                w[20..22].copy_from_slice(&bits.to_be_bytes());
                fix_ip_csum(&mut w, ETH);
            }
            *f = w;
            return format!(
                "wrapped in {} (outer fragment bits {frag})",
                if gue { "gue" } else { "ipip" }
            );
        }
        15 => {
            let n = 1 + rng.below(40);
            f.extend(std::iter::repeat_n(0xee, n));
            return format!("{n} bytes of trailer");
        }
        16 if f.len() > l4 + 13 && f.get(ip + 9) == Some(&TCP) => {
            let flags = rng.below(256) as u8;
            f[l4 + 13] = flags;
            if fix {
                fix_l4_csum(f, ip);
            }
            return format!("tcp flags {flags:#04x}");
        }
        17 if f.len() > l4 + 4 && has_ip => {
            // Another client port: a new flow (checksum fixed, so it is a valid packet).
            let port = 1024 + rng.below(60000) as u16;
            f[l4..l4 + 2].copy_from_slice(&port.to_be_bytes());
            fix_l4_csum(f, ip);
            return format!("source port {port}");
        }
        _ => {
            let proto = *rng.pick(&[ICMP, IPIP, TCP, UDP, SCTP, 47, 41, 255]);
            if has_ip {
                f[ip + 9] = proto;
            }
            format!("protocol {proto} @{ip}")
        }
    };
    if fix && f.len() >= ip + 20 {
        fix_ip_csum(f, ip);
    }
    what
}

/// One frame of the corpus and what was done to it.
struct Case {
    base: &'static str,
    hook: Hook,
    mutations: String,
    frame: Vec<u8>,
}

/// The frames for `bases`: every base truncated at every offset from the Ethernet header on
/// (BPF_PROG_TEST_RUN refuses shorter frames, as drivers do), then random mutations (1 to 3
/// each) until `total` frames.
fn generate(rng: &mut Rng, bases: &[Base], total: usize) -> Vec<Case> {
    let mut cases = Vec::new();
    for b in bases {
        for cut in ETH..b.frame.len() {
            cases.push(Case {
                base: b.name,
                hook: b.hook,
                mutations: format!("truncate at {cut}"),
                frame: b.frame[..cut].to_vec(),
            });
        }
        cases.push(Case {
            base: b.name,
            hook: b.hook,
            mutations: "none".into(),
            frame: b.frame.clone(),
        });
    }
    while cases.len() < total {
        let b = rng.pick(bases);
        let mut frame = b.frame.clone();
        let n = 1 + rng.below(3);
        let mutations: Vec<String> = (0..n).map(|_| mutate(rng, &mut frame)).collect();
        if frame.len() < ETH {
            continue;
        }
        cases.push(Case {
            base: b.name,
            hook: b.hook,
            mutations: mutations.join(", "),
            frame,
        });
    }
    cases
}

/// A failed check, with what reproduces it.
struct Failure {
    base: &'static str,
    case: String,
    what: String,
}

fn failed(c: &Case, program: &str, what: String) -> Failure {
    Failure {
        base: c.base,
        case: format!(
            "{program} on {} [{}] ({}): {}",
            c.base,
            c.mutations,
            c.frame.len(),
            hex(&c.frame)
        ),
        what,
    }
}

fn report(failures: &[Failure], frames: usize) {
    if failures.is_empty() {
        return;
    }
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for f in failures {
        let k: String = f.what.chars().take(60).collect();
        let k = format!("{k} / {}", f.base);
        *kinds.entry(k).or_default() += 1;
    }
    let mut msg = format!(
        "{} of {frames} frames failed; by kind: {kinds:#?}\n",
        failures.len()
    );
    for f in failures.iter().take(30) {
        let _ = writeln!(msg, "- {}\n  {}", f.what, f.case);
    }
    panic!("{msg}");
}

// ---- the pod side ----

/// The pod hooks' base frames, with flows opened on `f` first: an established TCP flow (the
/// client's ACK, the backend's reply on both pod hooks, with IP options too), UDP with and
/// without a checksum, SCTP, hairpin, REJECT for each protocol, ICMP errors quoting tracked
/// flows, a first and a later fragment, and traffic for no service.
fn pod_bases(f: &Fixture) -> Vec<Base> {
    let mut b = Vec::new();
    let mut push = |name, hook, frame| b.push(Base { name, hook, frame });
    // TCP, opened and answered.
    let c = (CLIENT, 40000);
    let (_, fwd) = f.run(
        programs::POD_INGRESS,
        &tcp_with(tcp_flags::SYN, c, (VIP, 80), 0),
    );
    let be = parse_checked(&fwd).dst;
    f.run(
        programs::POD_EGRESS,
        &tcp_with(tcp_flags::SYN | tcp_flags::ACK, be, c, 0),
    );
    push(
        "tcp established",
        Hook::PodIn,
        tcp_with(tcp_flags::ACK, c, (VIP, 80), 0),
    );
    push(
        "tcp established with ip options",
        Hook::PodIn,
        tcp_with(tcp_flags::ACK, c, (VIP, 80), 8),
    );
    push(
        "tcp reply",
        Hook::PodOut,
        tcp_with(tcp_flags::ACK, be, c, 0),
    );
    push(
        "tcp reply from a local backend",
        Hook::PodIn,
        tcp_with(tcp_flags::ACK, be, c, 0),
    );
    push(
        "tcp new",
        Hook::PodIn,
        tcp_with(tcp_flags::SYN, (CLIENT, 40001), (VIP, 80), 0),
    );
    // UDP with a checksum, and without.
    let (_, udp_fwd) = f.run(
        programs::POD_INGRESS,
        &packet(UDP, (CLIENT, 5000), (VIP, 80), 0, false),
    );
    let ube = parse_checked(&udp_fwd).dst;
    f.run(
        programs::POD_INGRESS,
        &packet(UDP, (CLIENT, 5001), (VIP, 80), 0, true),
    );
    push(
        "udp established",
        Hook::PodIn,
        packet(UDP, (CLIENT, 5000), (VIP, 80), 0, false),
    );
    push(
        "udp established without checksum",
        Hook::PodIn,
        packet(UDP, (CLIENT, 5001), (VIP, 80), 0, true),
    );
    push(
        "udp reply",
        Hook::PodOut,
        packet(UDP, ube, (CLIENT, 5000), 0, false),
    );
    // SCTP, with Ethernet padding after the datagram.
    let (_, sctp_fwd) = f.run(
        programs::POD_INGRESS,
        &sctp_packet((CLIENT, 36412), (VIP, 80), 0),
    );
    let sbe = parse_sctp_checked(&sctp_fwd).1;
    push(
        "sctp established",
        Hook::PodIn,
        sctp_packet((CLIENT, 36412), (VIP, 80), 6),
    );
    push(
        "sctp reply",
        Hook::PodOut,
        sctp_packet(sbe, (CLIENT, 36412), 0),
    );
    push(
        "sctp new",
        Hook::PodIn,
        sctp_packet((CLIENT, 36413), (VIP, 80), 0),
    );
    // Hairpin: the only endpoint of `solo` reaches itself.
    let me = (LOCAL_EP, 41000);
    f.run(
        programs::POD_INGRESS,
        &tcp_with(tcp_flags::SYN, me, (SOLO, 80), 0),
    );
    push(
        "hairpin established",
        Hook::PodIn,
        tcp_with(tcp_flags::ACK, me, (SOLO, 80), 0),
    );
    push(
        "hairpin reply",
        Hook::PodIn,
        tcp_with(tcp_flags::ACK, (LOCAL_EP, 9376), (HAIRPIN, 41000), 0),
    );
    // REJECT.
    push(
        "reject tcp",
        Hook::PodIn,
        tcp_with(tcp_flags::SYN, (CLIENT, 42000), (EMPTY, 80), 0),
    );
    push(
        "reject udp",
        Hook::PodIn,
        packet(UDP, (CLIENT, 42001), (EMPTY, 80), 0, false),
    );
    push(
        "reject sctp",
        Hook::PodIn,
        sctp_packet((CLIENT, 42002), (EMPTY, 80), 0),
    );
    // ICMP errors about the translated TCP and UDP flows.
    push(
        "icmp frag needed quoting tcp",
        Hook::PodOut,
        icmp_error(3, 4, ROUTER, CLIENT, &fwd),
    );
    push(
        "icmp port unreachable from the backend quoting udp",
        Hook::PodOut,
        icmp_error(3, 3, ube.0, CLIENT, &udp_fwd),
    );
    push(
        "icmp time exceeded quoting tcp",
        Hook::PodOut,
        icmp_error(11, 0, ROUTER, CLIENT, &fwd),
    );
    // Fragments of a UDP datagram of the established flow: the first, then a later one.
    let id = 0x4242;
    let mut l4 = packet::udp(5000, 80, &[0x77; 24]);
    l4[4..6].copy_from_slice(&(8u16 + 24 + 16).to_be_bytes());
    let first_ip = Ipv4::new(UDP, CLIENT, VIP).id(id).fragment(true, 0);
    let l4 = first_ip.with_checksum(l4);
    let first = packet::ethernet(MAC_GW, MAC_POD, &first_ip.packet(&l4));
    f.run(programs::POD_INGRESS, &first);
    let later = packet::ethernet(
        MAC_GW,
        MAC_POD,
        &Ipv4::new(UDP, CLIENT, VIP)
            .id(id)
            .fragment(false, 32)
            .packet(&[0x66; 16]),
    );
    push("udp first fragment", Hook::PodIn, first);
    push("udp later fragment", Hook::PodIn, later);
    push(
        "no service",
        Hook::PodIn,
        packet(TCP, (CLIENT, 40000), (REMOTE_EP, 9376), 0, false),
    );
    b
}

/// Runs `cases` through the pod hooks with every check; returns the failures.
fn run_pod_cases(f: &Fixture, cases: &[Case], stats: &mut BTreeMap<String, usize>) -> Vec<Failure> {
    let mut failures = Vec::new();
    for c in cases {
        let prog = match c.hook {
            Hook::PodIn => programs::POD_INGRESS,
            _ => programs::POD_EGRESS,
        };
        let before = f.dp.counters().expect("counters");
        let r = run_tc(f, prog, &c.frame);
        let after = f.dp.counters().expect("counters");
        let d = Delta(&before, &after);
        *stats.entry(prog.to_owned()).or_default() += 1;
        let result = r.and_then(|r| match r {
            Some((v, out)) => {
                *stats.entry(format!("{prog} verdict {v}")).or_default() += 1;
                check_tc(&c.frame, v, &out, &d)
            }
            None => {
                *stats
                    .entry(format!("{prog} refused by the kernel"))
                    .or_default() += 1;
                Ok(())
            }
        });
        if let Err(what) = result {
            failures.push(failed(c, prog, what));
        }
    }
    failures
}

// ---- the uplink ----

/// The uplink's base frames, with flows opened on `f` first: LB IP and NodePort flows with
/// the client kept (the XDP fast path) plain, IPIP, GUE v1 and v0, nested, UDP with and
/// without a checksum, a masqueraded NodePort flow and its reply, an ICMP error about it,
/// ClusterIP from outside, and new flows.
fn uplink_bases(f: &Fixture) -> Vec<Base> {
    let mut b = Vec::new();
    let mut push = |name, frame| {
        b.push(Base {
            name,
            hook: Hook::Uplink,
            frame,
        })
    };
    let up = programs::UPLINK_INGRESS;
    let lb = (EXT, 50000);
    f.run(up, &tcp_with(tcp_flags::SYN, lb, (LB_IP, 80), 0));
    let ack = tcp_with(tcp_flags::ACK, lb, (LB_IP, 80), 0);
    push("lb tcp established", ack.clone());
    push(
        "lb tcp established with ip options",
        tcp_with(tcp_flags::ACK, lb, (LB_IP, 80), 8),
    );
    push("lb tcp established in ipip", wrap(&ack, false));
    push("lb tcp established in gue v1", wrap(&ack, true));
    push(
        "lb tcp established in gue v0",
        encap(&ack, UDP, &gue_udp(&ack, &[0, 4, 0, 0])),
    );
    push(
        "lb tcp established in ipip in ipip",
        wrap(&wrap(&ack, false), false),
    );
    push(
        "lb tcp established in gue in ipip",
        wrap(&wrap(&ack, true), false),
    );
    let syn = tcp_with(tcp_flags::SYN, (EXT, 50001), (LB_IP, 80), 0);
    push("lb tcp new", syn.clone());
    push("lb tcp new in gue", wrap(&syn, true));
    let np = (EXT, 50002);
    f.run(up, &tcp_with(tcp_flags::SYN, np, (NODE, NP_LOCAL), 0));
    push(
        "nodeport (client kept) established",
        tcp_with(tcp_flags::ACK, np, (NODE, NP_LOCAL), 0),
    );
    f.run(up, &packet(UDP, (EXT, 5000), (LB_IP, 80), 0, false));
    f.run(up, &packet(UDP, (EXT, 5001), (LB_IP, 80), 0, true));
    push(
        "lb udp established",
        packet(UDP, (EXT, 5000), (LB_IP, 80), 0, false),
    );
    push(
        "lb udp established without checksum",
        packet(UDP, (EXT, 5001), (LB_IP, 80), 0, true),
    );
    // Masqueraded NodePort, answered.
    let mc = (EXT, 50100);
    let (_, fwd) = f.run(up, &tcp_with(tcp_flags::SYN, mc, (NODE, NP_MASQ), 0));
    let p = parse_checked(&fwd);
    let (_, reply) = f.run(
        up,
        &tcp_with(tcp_flags::SYN | tcp_flags::ACK, p.dst, p.src, 0),
    );
    push(
        "nodeport masqueraded established",
        tcp_with(tcp_flags::ACK, mc, (NODE, NP_MASQ), 0),
    );
    push(
        "nodeport masqueraded reply",
        tcp_with(tcp_flags::ACK, p.dst, p.src, 0),
    );
    push(
        "icmp frag needed about the masqueraded reply",
        icmp_error(3, 4, Ipv4Addr::new(192, 0, 2, 1), NODE, &reply),
    );
    push(
        "cluster ip from outside",
        tcp_with(tcp_flags::SYN, (EXT, 41000), (VIP, 80), 0),
    );
    b
}

fn run_uplink_cases(
    f: &Fixture,
    cases: &[Case],
    stats: &mut BTreeMap<String, usize>,
) -> Vec<Failure> {
    let mut failures = Vec::new();
    for c in cases {
        let c0 = f.dp.counters().expect("counters");
        let x = run_xdp_raw(f, &c.frame);
        let c1 = f.dp.counters().expect("counters");
        let dx = Delta(&c0, &c1);
        *stats
            .entry(format!("lb_up_xdp verdict {}", x.verdict))
            .or_default() += 1;
        if let Err(what) = check_xdp(&c.frame, &x, &dx) {
            failures.push(failed(c, programs::UPLINK_XDP, what));
        }
        let r = run_tc(f, programs::UPLINK_INGRESS, &c.frame);
        let c2 = f.dp.counters().expect("counters");
        let dt = Delta(&c1, &c2);
        let (v, out) = match r {
            Ok(Some(r)) => r,
            Ok(None) => {
                *stats
                    .entry("lb_up_in refused by the kernel".into())
                    .or_default() += 1;
                continue;
            }
            Err(what) => {
                failures.push(failed(c, programs::UPLINK_INGRESS, what));
                continue;
            }
        };
        *stats
            .entry(format!("{} verdict {v}", programs::UPLINK_INGRESS))
            .or_default() += 1;
        if let Err(what) = check_tc(&c.frame, v, &out, &dt) {
            failures.push(failed(c, programs::UPLINK_INGRESS, what));
        }
        if let Err(what) = compare_hooks(&x, &dx, (v, &out), &dt) {
            failures.push(failed(c, "lb_up_xdp vs lb_up_in", what));
        }
        if dx.grew(counter::XDP_FWD_ESTABLISHED) {
            *stats.entry("xdp translated".into()).or_default() += 1;
            // The kernel's order: tc after XDP, on XDP's output.
            match run_tc(f, programs::UPLINK_INGRESS, &x.frame) {
                Ok(Some((v, again))) if v == TC_ACT_OK && again == x.frame => {}
                Ok(None) => {}
                Ok(Some((v, _))) => failures.push(failed(
                    c,
                    "lb_up_in after lb_up_xdp",
                    format!("tc changed XDP's translation (verdict {v})"),
                )),
                Err(what) => failures.push(failed(c, "lb_up_in after lb_up_xdp", what)),
            }
        }
    }
    failures
}

/// Frames per hook: with the truncations of every base, more than 10,000 in all.
const POD_FRAMES: usize = 6_000;
const UPLINK_FRAMES: usize = 4_500;

/// Counters that show the corpus reached the paths it is meant to exercise. The frames are
/// the same on every run; the datapath's backend choice is random, so the counts move a
/// little: the minimums are about half of what a run reaches.
fn assert_coverage(f: &Fixture, wanted: &[(u32, &str, u64)]) {
    let c = f.dp.counters().expect("counters");
    for (idx, name, min) in wanted {
        assert!(
            c[*idx as usize] >= *min,
            "the corpus reached {name} only {} times (want {min})",
            c[*idx as usize]
        );
    }
}

#[test]
fn pod_hooks_keep_every_malformed_frame_within_the_rules() {
    let t0 = std::time::Instant::now();
    let f = Fixture::new(&services());
    let bases = pod_bases(&f);
    let mut rng = Rng(SEED);
    let cases = generate(&mut rng, &bases, POD_FRAMES);
    let mut stats = BTreeMap::new();
    let failures = run_pod_cases(&f, &cases, &mut stats);
    println!(
        "pod corpus: {} frames in {:?}: {stats:?}\ncounters {:?}",
        cases.len(),
        t0.elapsed(),
        f.dp.counters().expect("counters")
    );
    report(&failures, cases.len());
    assert!(cases.len() >= POD_FRAMES);
    assert!(stats[programs::POD_INGRESS] > 2_000 && stats[programs::POD_EGRESS] > 1_000);
    assert_coverage(
        &f,
        &[
            (counter::FWD_ESTABLISHED, "established flows", 300),
            (counter::REPLY, "replies", 150),
            (counter::FWD_NEW, "new flows", 50),
            (counter::HAIRPIN, "hairpin", 1),
            (counter::REJECT, "REJECT replies", 50),
            (counter::ICMP_ERROR_XLATED, "translated ICMP errors", 30),
            (counter::FRAG_TRANSLATED, "translated fragments", 5),
            (counter::PASS_MALFORMED, "malformed frames", 500),
        ],
    );
}

#[test]
fn uplink_hooks_keep_every_malformed_frame_within_the_rules_and_agree() {
    let t0 = std::time::Instant::now();
    let f = Fixture::new(&services());
    let bases = uplink_bases(&f);
    let mut rng = Rng(SEED ^ 0x5550_4c49_4e4b);
    let cases = generate(&mut rng, &bases, UPLINK_FRAMES);
    let mut stats = BTreeMap::new();
    let failures = run_uplink_cases(&f, &cases, &mut stats);
    println!(
        "uplink corpus: {} frames in {:?}: {stats:?}\ncounters {:?}",
        cases.len(),
        t0.elapsed(),
        f.dp.counters().expect("counters")
    );
    report(&failures, cases.len());
    assert!(cases.len() >= UPLINK_FRAMES);
    assert_coverage(
        &f,
        &[
            (counter::XDP_FWD_ESTABLISHED, "XDP translations", 300),
            (counter::XDP_DECAP, "XDP decapsulations", 100),
            (counter::DECAP, "tc decapsulations", 100),
            (counter::FWD_ESTABLISHED, "established flows at tc", 300),
            (counter::REPLY, "masqueraded replies", 10),
            (counter::MASQUERADE, "masqueraded new flows", 1),
            (counter::ICMP_ERROR_XLATED, "translated ICMP errors", 20),
            (counter::PASS_MALFORMED, "malformed frames", 300),
        ],
    );
}

// ---- regression fixtures: frames the corpus found failing, minimised ----

/// Found by the corpus (item 5): IPIP or GUE to the node whose inner IPv4 header is cut short.
/// XDP stripped the outer header (`bpf_xdp_adjust_head` only needs an Ethernet header left)
/// while tc's `bpf_skb_adjust_room` refused to leave less than an IPv4 header, so tc kept it
/// wrapped: the hooks disagreed on 132 truncated frames. Now `encap_strip` wants a whole inner
/// header, for both.
#[test]
fn a_tunnel_whose_inner_header_is_cut_short_stays_wrapped_in_both_hooks() {
    let f = Fixture::new(&services());
    let inner = tcp_with(tcp_flags::ACK, (EXT, 50000), (LB_IP, 80), 0);
    for (what, w) in [("ipip", wrap(&inner, false)), ("gue", wrap(&inner, true))] {
        let outer = strip_len(&w).expect("a tunnel");
        for keep in [1, 19] {
            let cut = w[..ETH + outer + keep].to_vec();
            let x = run_xdp_raw(&f, &cut);
            assert_eq!(
                (x.verdict, &x.frame),
                (XDP_PASS, &cut),
                "{what} {keep}: XDP"
            );
            let (rc, out) = run_tc(&f, programs::UPLINK_INGRESS, &cut)
                .expect("run")
                .expect("not refused");
            assert_eq!((rc, out), (TC_ACT_OK, cut.clone()), "{what} {keep}: tc");
        }
        // A whole inner header and its ports (which the decapsulation policy reads to see
        // that the LB IP's port is served): XDP strips it.
        let whole = w[..ETH + outer + 24].to_vec();
        let x = run_xdp_raw(&f, &whole);
        assert_eq!(x.frame, decapsulated(&whole, outer), "{what}: XDP strips");
    }
    assert_eq!(f.counter(counter::XDP_DECAP), 2);
    assert_eq!(f.counter(counter::DECAP), 0);
}

/// Found by the corpus (item 7, the "checksum state"): with CHECKSUM_COMPLETE,
/// `skb->csum` was left stale by SCTP port rewrites (ports and CRC stored with nothing to
/// cancel them), port rewrites of UDP without a checksum, and REJECT replies of the same
/// length as the packet (stored over it without `BPF_F_RECOMPUTE_CSUM`). The kernel failed
/// those runs with EBADMSG.
#[test]
fn skb_csum_stays_consistent_after_sctp_udp_without_checksum_and_reject_rewrites() {
    let f = Fixture::new(&services());
    let run = |prog, pkt: &[u8]| {
        run_tc(&f, prog, pkt)
            .unwrap_or_else(|e| panic!("{e}"))
            .expect("not refused")
    };
    let (rc, out) = run(
        programs::POD_INGRESS,
        &sctp_packet((CLIENT, 36500), (VIP, 80), 6),
    );
    assert_eq!(rc, TC_ACT_OK);
    let (_, be) = parse_sctp_checked(&out);
    let (_, back) = run(programs::POD_EGRESS, &sctp_packet(be, (CLIENT, 36500), 0));
    assert_eq!(parse_sctp_checked(&back), ((VIP, 80), (CLIENT, 36500)));
    let (_, out) = run(
        programs::POD_INGRESS,
        &packet(UDP, (CLIENT, 5500), (VIP, 80), 0, true),
    );
    assert_eq!(parse_checked(&out).l4_csum, 0);
    // A SYN with 0 payload bytes is as long as its RST (54 bytes): the length is kept and
    // the skb stays CHECKSUM_COMPLETE.
    let syn = packet::ethernet(
        MAC_GW,
        MAC_POD,
        &ip(TCP, CLIENT, EMPTY, 0).packet(&ip(TCP, CLIENT, EMPTY, 0).with_checksum(packet::tcp(
            42100,
            80,
            1000,
            0,
            tcp_flags::SYN,
            b"",
        ))),
    );
    assert_eq!(syn.len(), 54);
    let (rc, rst) = run(programs::POD_INGRESS, &syn);
    assert_eq!(rc, TC_ACT_REDIRECT);
    check_reply(&syn, &rst).expect("a valid RST");
    assert_eq!(f.counter(counter::REJECT), 1);
}

/// Found by the corpus: `reject` counted a reply before building it, so packets REJECT does
/// not answer (a RST) were dropped with `reject` incremented. It counts replies sent now, as
/// documented. A UDP datagram with IP options is answered (its whole header quoted).
#[test]
fn reject_counts_only_the_replies_it_sends() {
    let f = Fixture::new(&services());
    let rst = tcp_with(
        tcp_flags::RST | tcp_flags::ACK,
        (CLIENT, 42200),
        (EMPTY, 80),
        0,
    );
    let (rc, out) = f.run(programs::POD_INGRESS, &rst);
    assert_eq!((rc, out), (TC_ACT_SHOT, rst), "a RST is never answered");
    let opts = packet(UDP, (CLIENT, 42201), (EMPTY, 80), 8, false);
    let (rc, out) = f.run(programs::POD_INGRESS, &opts);
    assert_eq!(rc, TC_ACT_REDIRECT, "UDP with IP options: port unreachable");
    check_reply(&opts, &out).expect("a valid port unreachable quoting the options");
    assert_eq!(f.counter(counter::REJECT), 1);
    let (rc, _) = f.run(
        programs::POD_INGRESS,
        &packet(UDP, (CLIENT, 42202), (EMPTY, 80), 0, false),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(f.counter(counter::REJECT), 2);
}
