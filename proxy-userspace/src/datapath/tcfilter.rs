//! The netlink `cls_bpf` fallback for kernels without TCX (< 6.6): our tc programs attached as
//! direct-action `bpf` filters under a `clsact` qdisc, the way `tc filter replace dev X ingress
//! prio P handle H bpf da fd N name lb_pod_in` does.
//!
//! Why not aya's netlink attach: aya creates with `NLM_F_CREATE | NLM_F_EXCL` (fails when a
//! previous agent left its filter) and detaches on drop; the fallback needs one request that
//! creates the filter or, when it exists, swaps its program in place (`NLM_F_CREATE |
//! NLM_F_REPLACE`, no `NLM_F_EXCL`: cls_bpf replaces the filter under RCU, so no packet sees the
//! hook empty), and filters that outlive the agent (the kernel keeps the program referenced by
//! the filter). Ours are identified by a fixed priority and handle ([`PRIO`], [`HANDLE`]) plus
//! the program name: cleanup never touches another tool's filter.
//!
//! Message building and parsing are pure (unit tested); [`Tc`] sends them on a NETLINK_ROUTE
//! socket.
use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    tc::{TcAttribute, TcHandle, TcMessage, TcOption},
};
use netlink_packet_utils::nla::{DefaultNla, Nla as _, NlasIterator};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::links::Direction;

/// Priority of our filters (`tc ... prio 3760`): fixed so a restart replaces the same filter.
pub const PRIO: u16 = 0x0eb0;
/// Handle of our filters (`tc ... handle 0xeb0`).
pub const HANDLE: u32 = 0x0eb0;

const ETH_P_ALL: u16 = 0x0003;
const TCA_OPTIONS: u16 = 2;
// include/uapi/linux/pkt_cls.h
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_ID: u16 = 11;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;

/// The clsact parent of a direction (`ingress` / `egress`).
pub fn parent(dir: Direction) -> TcHandle {
    TcHandle {
        major: 0xffff,
        minor: match dir {
            Direction::In => TcHandle::MIN_INGRESS,
            Direction::Out => TcHandle::MIN_EGRESS,
        },
    }
}

/// `tcm_info` of a filter: priority in the high half, protocol (network order) in the low.
fn info(prio: u16) -> u32 {
    (u32::from(prio) << 16) | u32::from(ETH_P_ALL.to_be())
}

fn message(flags: u16, payload: RouteNetlinkMessage) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    m.finalize();
    m
}

fn filter_header(ifindex: u32, dir: Direction) -> TcMessage {
    let mut tc = TcMessage::default();
    tc.header.family = AddressFamily::Unspec;
    tc.header.index = ifindex as i32;
    tc.header.parent = parent(dir);
    tc.header.handle = TcHandle::from(HANDLE);
    tc.header.info = info(PRIO);
    tc
}

/// `tc qdisc add dev <ifindex> clsact` (`EEXIST` when it is there: fine).
pub fn add_clsact(ifindex: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut tc = TcMessage::default();
    tc.header.index = ifindex as i32;
    tc.header.parent = TcHandle::CLSACT;
    tc.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    tc.attributes.push(TcAttribute::Kind("clsact".into()));
    message(
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        RouteNetlinkMessage::NewQueueDiscipline(tc),
    )
}

/// `tc filter replace dev <ifindex> <dir> prio PRIO handle HANDLE bpf da fd <prog_fd> name
/// <name>`: creates our filter, or atomically swaps the program of the existing one.
pub fn replace_filter(
    ifindex: u32,
    dir: Direction,
    prog_fd: i32,
    name: &str,
) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut tc = filter_header(ifindex, dir);
    let mut cname = name.as_bytes().to_vec();
    cname.push(0);
    tc.attributes.push(TcAttribute::Kind("bpf".into()));
    tc.attributes.push(TcAttribute::Options(vec![
        TcOption::Other(DefaultNla::new(TCA_BPF_FD, prog_fd.to_ne_bytes().to_vec())),
        TcOption::Other(DefaultNla::new(TCA_BPF_NAME, cname)),
        TcOption::Other(DefaultNla::new(
            TCA_BPF_FLAGS,
            TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes().to_vec(),
        )),
    ]));
    message(
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        RouteNetlinkMessage::NewTrafficFilter(tc),
    )
}

/// Deletes our filter (priority and handle) on one hook.
pub fn delete_filter(ifindex: u32, dir: Direction) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut tc = filter_header(ifindex, dir);
    tc.attributes.push(TcAttribute::Kind("bpf".into()));
    message(
        NLM_F_REQUEST | NLM_F_ACK,
        RouteNetlinkMessage::DelTrafficFilter(tc),
    )
}

/// Dumps the filters of one hook.
pub fn dump_filters(ifindex: u32, dir: Direction) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut tc = TcMessage::default();
    tc.header.index = ifindex as i32;
    tc.header.parent = parent(dir);
    message(
        NLM_F_REQUEST | NLM_F_DUMP,
        RouteNetlinkMessage::GetTrafficFilter(tc),
    )
}

/// One `bpf` filter as a dump shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpfFilter {
    pub prio: u16,
    pub handle: u32,
    /// `TCA_BPF_NAME` (what `tc filter show` prints after `bpf`).
    pub name: String,
    /// `TCA_BPF_ID`: the attached program's id.
    pub prog_id: u32,
}

impl BpfFilter {
    /// Ours: our priority and handle, and one of our program names.
    pub fn is_ours(&self, names: &[&str]) -> bool {
        self.prio == PRIO && self.handle == HANDLE && names.contains(&self.name.as_str())
    }
}

fn nla_bytes(n: &DefaultNla) -> Vec<u8> {
    let mut v = vec![0; n.value_len()];
    n.emit_value(&mut v);
    v
}

/// The `bpf` filter a dumped message describes (`None`: another kind, or the chain header).
pub fn parse_filter(tc: &TcMessage) -> Option<BpfFilter> {
    let kind = tc.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(k) => Some(k.as_str()),
        _ => None,
    })?;
    if kind != "bpf" {
        return None;
    }
    let mut f = BpfFilter {
        prio: (tc.header.info >> 16) as u16,
        handle: u32::from(tc.header.handle),
        name: String::new(),
        prog_id: 0,
    };
    let opts = tc.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(o) => Some(o),
        _ => None,
    })?;
    // netlink-packet-route keeps the options of a kind it does not know ("bpf") as one
    // TCA_OPTIONS attribute holding the nested ones: (type, value) pairs from either form.
    let mut attrs: Vec<(u16, Vec<u8>)> = Vec::new();
    for o in opts {
        let TcOption::Other(n) = o else { continue };
        let v = nla_bytes(n);
        if opts.len() == 1 && n.kind() == TCA_OPTIONS {
            for inner in NlasIterator::new(&v[..]).flatten() {
                attrs.push((inner.kind(), inner.value().to_vec()));
            }
        } else {
            attrs.push((n.kind(), v));
        }
    }
    for (kind, v) in attrs {
        match kind {
            TCA_BPF_NAME => {
                f.name =
                    String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(&[])).into_owned()
            }
            TCA_BPF_ID if v.len() >= 4 => f.prog_id = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
            _ => {}
        }
    }
    Some(f)
}

fn serialize(m: &NetlinkMessage<RouteNetlinkMessage>) -> Vec<u8> {
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

/// A NETLINK_ROUTE socket for tc requests (blocking: each is one round trip).
pub struct Tc {
    sock: Socket,
    seq: u32,
}

impl Tc {
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { sock, seq: 0 })
    }

    /// Sends `m` and collects the replies up to the ACK (or `NLMSG_DONE` of a dump).
    fn request(
        &mut self,
        mut m: NetlinkMessage<RouteNetlinkMessage>,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        m.header.sequence_number = self.seq;
        self.sock.send(&serialize(&m), 0)?;
        let mut out = Vec::new();
        loop {
            let (buf, _) = self.sock.recv_from_full()?;
            let mut off = 0;
            while off < buf.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "netlink reply of length 0",
                    ));
                }
                off += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(c) => Err(io::Error::from_raw_os_error(-c.get())),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(i) => out.push(i),
                    _ => {}
                }
            }
        }
    }

    /// Attaches `prog_fd` (named `name`) on `dir` of `ifindex`, replacing our filter's program
    /// atomically if it exists. Adds the clsact qdisc first when the device has none.
    pub fn replace(
        &mut self,
        ifindex: u32,
        dir: Direction,
        prog_fd: i32,
        name: &str,
    ) -> io::Result<()> {
        match self.request(add_clsact(ifindex)) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
            _ => {}
        }
        self.request(replace_filter(ifindex, dir, prog_fd, name))
            .map(drop)
    }

    /// The `bpf` filters on `dir` of `ifindex`.
    pub fn list(&mut self, ifindex: u32, dir: Direction) -> io::Result<Vec<BpfFilter>> {
        let replies = match self.request(dump_filters(ifindex, dir)) {
            // No clsact qdisc (EINVAL) or no such device: no filters.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENODEV)) => {
                return Ok(Vec::new());
            }
            r => r?,
        };
        Ok(replies
            .iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewTrafficFilter(tc) => parse_filter(tc),
                _ => None,
            })
            .collect())
    }

    /// Our filter on `dir` of `ifindex` if it runs one of `names`.
    pub fn ours(
        &mut self,
        ifindex: u32,
        dir: Direction,
        names: &[&str],
    ) -> io::Result<Option<BpfFilter>> {
        Ok(self
            .list(ifindex, dir)?
            .into_iter()
            .find(|f| f.is_ours(names)))
    }

    /// Every interface in this network namespace (index, name).
    pub fn ifaces(&mut self) -> io::Result<Vec<(u32, String)>> {
        let m = message(
            NLM_F_REQUEST | NLM_F_DUMP,
            RouteNetlinkMessage::GetLink(netlink_packet_route::link::LinkMessage::default()),
        );
        Ok(self
            .request(m)?
            .iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some((
                    l.header.index,
                    l.attributes
                        .iter()
                        .find_map(|a| match a {
                            netlink_packet_route::link::LinkAttribute::IfName(n) => Some(n.clone()),
                            _ => None,
                        })
                        .unwrap_or_default(),
                )),
                _ => None,
            })
            .collect())
    }

    /// Deletes our filter on `dir` of `ifindex` if it runs one of `names`; whether there was
    /// one. Never touches a filter at our priority/handle that runs another program.
    pub fn remove_ours(
        &mut self,
        ifindex: u32,
        dir: Direction,
        names: &[&str],
    ) -> io::Result<bool> {
        if self.ours(ifindex, dir, names)?.is_none() {
            return Ok(false);
        }
        match self.request(delete_filter(ifindex, dir)) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Our filters running one of `names` on every interface: (ifindex, ifname, hook, filter).
pub fn list_all_ours(names: &[&str]) -> io::Result<Vec<(u32, String, Direction, BpfFilter)>> {
    let mut tc = Tc::open()?;
    let mut out = Vec::new();
    for (i, name) in tc.ifaces()? {
        for d in Direction::BOTH {
            if let Some(f) = tc.ours(i, d, names)? {
                out.push((i, name.clone(), d, f));
            }
        }
    }
    Ok(out)
}

/// `cleanup`: removes our filters (priority, handle and one of `names`) from both hooks of
/// every interface; how many.
pub fn cleanup_all(names: &[&str]) -> io::Result<usize> {
    let mut tc = Tc::open()?;
    let mut n = 0;
    for (i, _, d, _) in list_all_ours(names)? {
        n += usize::from(tc.remove_ours(i, d, names)?);
    }
    Ok(n)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tc_of(m: &NetlinkMessage<RouteNetlinkMessage>) -> TcMessage {
        // Round trip through bytes: what the kernel receives.
        let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&serialize(m)).unwrap();
        match back.payload {
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewTrafficFilter(t)
                | RouteNetlinkMessage::DelTrafficFilter(t)
                | RouteNetlinkMessage::GetTrafficFilter(t)
                | RouteNetlinkMessage::NewQueueDiscipline(t),
            ) => t,
            p => panic!("unexpected payload {p:?}"),
        }
    }

    #[test]
    fn replace_creates_or_swaps_without_excl_at_our_prio_and_handle() {
        let m = replace_filter(7, Direction::In, 42, "lb_pod_in");
        let f = m.header.flags;
        assert_ne!(f & NLM_F_CREATE, 0, "creates when missing");
        assert_ne!(f & NLM_F_REPLACE, 0, "replaces when present");
        assert_eq!(
            f & NLM_F_EXCL,
            0,
            "EXCL would fail on a filter left by the last agent"
        );
        let tc = tc_of(&m);
        assert_eq!(tc.header.index, 7);
        assert_eq!(u32::from(tc.header.parent), 0xffff_fff2, "clsact ingress");
        assert_eq!(u32::from(tc.header.handle), HANDLE);
        assert_eq!(tc.header.info >> 16, u32::from(PRIO));
        assert_eq!(
            tc.header.info & 0xffff,
            0x0300,
            "ETH_P_ALL in network order"
        );
        let f = parse_filter(&tc).unwrap();
        assert_eq!(f.name, "lb_pod_in");
        assert!(f.is_ours(&["lb_pod_in"]));
        let opts = tc
            .attributes
            .iter()
            .find_map(|a| match a {
                TcAttribute::Options(o) => Some(o.clone()),
                _ => None,
            })
            .unwrap();
        let [TcOption::Other(nested)] = &opts[..] else {
            panic!("{opts:?}")
        };
        let nested = nla_bytes(nested);
        let get = |k: u16| {
            NlasIterator::new(&nested[..])
                .flatten()
                .find(|n| n.kind() == k)
                .map(|n| n.value().to_vec())
        };
        assert_eq!(get(TCA_BPF_FD).unwrap(), 42i32.to_ne_bytes());
        assert_eq!(
            get(TCA_BPF_FLAGS).unwrap(),
            1u32.to_ne_bytes(),
            "direct action"
        );
        assert_eq!(get(TCA_BPF_NAME).unwrap(), b"lb_pod_in\0");
    }

    #[test]
    fn egress_delete_dump_and_clsact_messages() {
        let d = tc_of(&delete_filter(3, Direction::Out));
        assert_eq!(u32::from(d.header.parent), 0xffff_fff3, "clsact egress");
        assert_eq!(u32::from(d.header.handle), HANDLE);
        assert_eq!(d.header.info >> 16, u32::from(PRIO));
        let dump = dump_filters(3, Direction::In);
        assert_eq!(dump.header.flags & NLM_F_DUMP, NLM_F_DUMP);
        let q = add_clsact(3);
        assert_ne!(q.header.flags & NLM_F_EXCL, 0);
        let q = tc_of(&q);
        assert_eq!(u32::from(q.header.parent), 0xffff_fff1);
        assert_eq!(u32::from(q.header.handle), 0xffff_0000);
    }

    #[test]
    fn only_our_prio_handle_and_names_are_ours() {
        let f = BpfFilter {
            prio: PRIO,
            handle: HANDLE,
            name: "lb_up_in".into(),
            prog_id: 9,
        };
        assert!(f.is_ours(&["lb_up_in"]));
        assert!(!f.is_ours(&["lb_pod_in"]), "another program at our slot");
        assert!(
            !BpfFilter {
                prio: 1,
                ..f.clone()
            }
            .is_ours(&["lb_up_in"])
        );
        assert!(!BpfFilter { handle: 1, ..f }.is_ours(&["lb_up_in"]));
    }

    #[test]
    fn parse_reads_prog_id_and_skips_other_kinds() {
        let mut tc = filter_header(5, Direction::In);
        tc.attributes.push(TcAttribute::Kind("bpf".into()));
        tc.attributes.push(TcAttribute::Options(vec![
            TcOption::Other(DefaultNla::new(TCA_BPF_NAME, b"lb_pod_out\0".to_vec())),
            TcOption::Other(DefaultNla::new(TCA_BPF_ID, 77u32.to_ne_bytes().to_vec())),
        ]));
        let f = parse_filter(&tc).unwrap();
        assert_eq!((f.name.as_str(), f.prog_id), ("lb_pod_out", 77));
        let mut other = filter_header(5, Direction::In);
        other.attributes.push(TcAttribute::Kind("u32".into()));
        assert_eq!(parse_filter(&other), None);
    }
}
