//! The load-balancing pipeline shared by every packet hook:
//! `ct_lookup -> (hit: validate_flow) | (miss: lookup_service -> check_policy ->
//! select_backend -> ct_create) -> nat::apply -> deliver`.
//!
//! Conntrack holds two entries per flow, each keyed by the tuple exactly as a hook will see it
//! and carrying the rewrite to apply: the forward entry (client -> service) and the reply entry
//! (backend -> client, or to the SNAT address when masqueraded). Whichever hook sees a packet
//! first translates it; a translated packet no longer matches, so later hooks leave it alone.
use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    programs::TcContext,
};
use proxy_common::{
    Aff4Key, Aff4Value, Backend4, Ct4Key, Ct4Value, NodeConfig, Svc4Key, backend_flags, cfg_flags,
    counter, ct_flags, proto, scope, select_slot, svc_flags,
};

use crate::{
    debug, fib, frag, icmp,
    maps::{
        CT4_PREV, CT4_V3, CT4N_V1, LB4_AFF_V2, LB4_BE_V1, LB4_SVC_V2, LB4_VIP_V1, PODNS_V1,
        config_flags, count, count_service, is_subnet_broadcast, node_config, reject_allowed,
        source_allowed,
    },
    nat,
    parse::{ETH_HLEN, Packet, Skip, TcHeaders, parse, tcp},
    reject,
};

/// Where a packet came from, which decides the service scope and masquerading.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From a pod on this node (tc on its bridge port).
    Pod,
    /// From outside the node (tc on the uplink).
    External,
}

/// Runs the pipeline. `balance` is false on hooks that only translate tracked flows.
#[inline(always)]
pub fn process(ctx: &TcContext, origin: Origin, balance: bool) -> Result<i32, i32> {
    // The header window's stack slot is free again once parsed (the stack is nearly full).
    let parsed = {
        let mut window = MaybeUninit::uninit();
        parse(&TcHeaders::new(ctx, &mut window))
    };
    let p = match parsed {
        Ok(p) => p,
        // Not TCP/UDP: maybe an ICMP error about one of our flows.
        Err(Skip::NotOurs) => return Ok(icmp::translate_error(ctx).unwrap_or(TC_ACT_OK)),
        Err(Skip::Malformed) => {
            count(counter::PASS_MALFORMED);
            return Ok(TC_ACT_OK);
        }
        Err(Skip::Fragment) => return frag::translate(ctx),
    };
    let verdict = pipeline(ctx, &p, origin, balance);
    // Drops and rejects (sent by redirect) may have a reason to log; forwarding to the stack
    // never does.
    if !matches!(verdict, Ok(TC_ACT_OK)) {
        debug::capture(&p);
    }
    verdict
}

/// [`process`] for a program's entry point: its verdict, and the debug log line of a drop
/// or reject (written here, where the verifier has little state left).
#[inline(always)]
pub fn run(ctx: &TcContext, origin: Origin, balance: bool) -> i32 {
    let v = match process(ctx, origin, balance) {
        Ok(v) | Err(v) => v,
    };
    if v != TC_ACT_OK {
        debug::flush(ctx);
    }
    v
}

/// The pipeline for a parsed TCP/UDP/SCTP packet.
#[inline(always)]
fn pipeline(ctx: &TcContext, p: &Packet, origin: Origin, balance: bool) -> Result<i32, i32> {
    let key = Ct4Key::new(p.saddr_be, p.daddr_be, p.sport_be, p.dport_be, p.proto);
    // A tracked flow balanced again (its backend is gone): its next packet may be mid-stream.
    let mut rebalanced = false;
    if let Some((entry, table)) = ct_lookup(&key) {
        let tcp = p.proto == proto::TCP;
        let reopen = tcp
            && p.tcp_flags & (tcp::SYN | tcp::ACK) == tcp::SYN
            && entry.flags & ct_flags::FORWARD != 0
            && ct_flags::closed(entry.flags);
        if reopen {
            // A SYN on a closed flow's tuple (the client reused its port): a new flow, as
            // netfilter reopens a connection in TIME_WAIT. Balanced again below.
            ct_remove_flow(&key, &entry);
            count(counter::CT_CLOSED_REUSED);
        } else {
            let mut entry = entry;
            if tcp && p.tcp_flags & (tcp::FIN | tcp::RST) != 0 {
                entry.flags |= ct_mark_closing(&key, &entry, p.tcp_flags);
            }
            if entry.flags & ct_flags::REPLY != 0 {
                if table == Table::New {
                    ct_promote(&key, &entry);
                }
                count(counter::REPLY);
                frag::remember(p);
                return translate(ctx, p, &entry);
            }
            if validate_flow(&entry) {
                count(counter::FWD_ESTABLISHED);
                frag::remember(p);
                return translate_counted(ctx, p, &entry);
            }
            // The flow's backend is gone: forget the flow and balance it again below, so a
            // removed endpoint never keeps receiving (UDP flows included).
            ct_remove_flow(&key, &entry);
            count(counter::REBALANCED);
            rebalanced = true;
        }
    }
    if !balance {
        return Ok(TC_ACT_OK);
    }
    let Some(svc) = lookup_service(p.daddr_be, p.dport_be, p.proto, origin == Origin::Pod) else {
        // A ClusterIP on a port/protocol no service uses: REJECT like kube-proxy.
        // SAFETY: the value is not kept.
        if unsafe { LB4_VIP_V1.get(p.daddr_be) }.is_some() {
            return reject_now(ctx, p);
        }
        return Ok(TC_ACT_OK);
    };
    if p.proto == proto::TCP && p.tcp_flags & (tcp::SYN | tcp::ACK) != tcp::SYN && !rebalanced {
        // Only a SYN opens a TCP flow: junk and stray mid-stream packets create no state
        // (they could otherwise claim table space and SNAT ports). A flow whose backend went
        // away is the exception: the new backend's RST tells its client at once.
        return Err(debug::drop(counter::DROP_TCP_NO_FLOW));
    }
    if svc.flags & svc_flags::SOURCE_RANGES != 0 && !source_allowed(svc.ranges_id, p.saddr_be) {
        return Err(debug::drop(counter::DROP_SOURCE_RANGE));
    }
    if svc.count == 0 {
        if svc.flags & svc_flags::DROP_IF_EMPTY != 0 {
            return Err(debug::drop(counter::DROP_NO_LOCAL_BACKEND));
        }
        return reject_now(ctx, p);
    }
    let Some((backend_id, backend)) = select_backend(&svc, p.saddr_be) else {
        return Err(debug::drop(counter::DROP_BACKEND_MISSING));
    };
    let cfg = node_config();
    let entry = ct_create(ctx, p, &key, backend_id, &backend, &svc, origin, &cfg)?;
    count(counter::FWD_NEW);
    frag::remember(p);
    translate_counted(ctx, p, &entry)
}

/// `translate` for a forward packet, counted for its service when the rewrite succeeded.
#[inline(always)]
fn translate_counted(ctx: &TcContext, p: &Packet, entry: &Ct4Value) -> Result<i32, i32> {
    let rc = translate(ctx, p, entry)?;
    // L3 bytes: the frame minus its Ethernet header (NAT does not change the length).
    count_service(entry.svc_id, ctx.len().saturating_sub(ETH_HLEN as u32));
    Ok(rc)
}

#[inline(always)]
fn reject_now(ctx: &TcContext, p: &Packet) -> Result<i32, i32> {
    // A reply to these would go nowhere or to many (a reflection amplifier): drop instead,
    // as the kernel's icmp_send refuses broadcast and multicast.
    if !reject::answerable(p.saddr_be) || is_subnet_broadcast(p.saddr_be) {
        return Err(debug::drop(counter::DROP_REJECT_BAD_SOURCE));
    }
    // Like the kernel's icmp_msgs_per_sec: a scan of empty service ports must not make the
    // node emit replies at line rate.
    if !reject_allowed() {
        return Err(debug::drop(counter::DROP_REJECT_RATE_LIMITED));
    }
    // `reject` counts replies sent: a packet we do not answer (a RST, a UDP datagram with IP
    // options) is dropped uncounted there.
    match reject::reply(ctx, p) {
        Ok(rc) => {
            count(counter::REJECT);
            debug::note(counter::REJECT);
            Ok(rc)
        }
        Err(()) => Err(TC_ACT_SHOT),
    }
}

/// Which conntrack table holds an entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `CT4_V3`: answered flows, never evicted.
    Answered,
    /// `CT4N_V1`: flows not answered yet (LRU).
    New,
}

/// Finds a flow's entry (answered flows first: the common case costs one lookup) and
/// stamps it with the time of this packet.
#[inline(always)]
pub fn ct_lookup(key: &Ct4Key) -> Option<(Ct4Value, Table)> {
    let (ptr, table) = match CT4_V3.get_ptr_mut(key) {
        Some(p) => (p, Table::Answered),
        None => match CT4N_V1.get_ptr_mut(key) {
            Some(p) => (p, Table::New),
            None => return ct_adopt_previous(key),
        },
    };
    // Read after the lookup: a miss (most non-service packets) needs no clock.
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a valid map value pointer; a racing writer can at worst leave a stale
    // timestamp, which only matters for idle expiry.
    unsafe {
        (*ptr).last_seen_ns = now;
        Some((*ptr, table))
    }
}

/// During an upgrade, a flow the earlier release's programs opened after the agent's last copy
/// of their table (its reply may reach our programs first): copied into the answered table
/// as the agent's migration copies it, so it keeps its backend and NAT. Costs nothing but the
/// config read outside an upgrade.
#[inline(always)]
fn ct_adopt_previous(key: &Ct4Key) -> Option<(Ct4Value, Table)> {
    if config_flags() & cfg_flags::CT_PREVIOUS == 0 {
        return None;
    }
    // SAFETY: copied out immediately.
    let mut v = unsafe { CT4_PREV.get(key) }.copied()?;
    v.flags |= ct_flags::MIGRATED | ct_flags::ANSWERED;
    // SAFETY: a helper without arguments.
    v.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    // BPF_NOEXIST: an entry our programs or the agent wrote meanwhile wins.
    let _ = CT4_V3.insert(key, v, BPF_NOEXIST as u64);
    count(counter::CT_ADOPTED_PREVIOUS);
    Some((v, Table::Answered))
}

/// Reads a flow's entry from either table without touching it (ICMP errors, fragments).
#[inline(always)]
pub fn ct_get(key: &Ct4Key) -> Option<Ct4Value> {
    // SAFETY: values are copied out immediately.
    unsafe { CT4_V3.get(key).or_else(|| CT4N_V1.get(key)).copied() }
}

/// Forgets both entries of a flow, in whichever table they are.
#[inline(always)]
fn ct_remove_flow(key: &Ct4Key, entry: &Ct4Value) {
    let other = key.partner(entry);
    for k in [key, &other] {
        let _ = CT4_V3.remove(k);
        let _ = CT4N_V1.remove(k);
    }
}

/// Records a FIN or RST on both entries of the flow (each then tells the flow's TCP state
/// alone: the sweeper's timeouts and SNAT port reuse read it). Returns the bits set.
#[inline(always)]
fn ct_mark_closing(key: &Ct4Key, entry: &Ct4Value, tcp_flags: u8) -> u16 {
    let mut bits = 0;
    if tcp_flags & tcp::RST != 0 {
        bits |= ct_flags::RST;
    }
    if tcp_flags & tcp::FIN != 0 {
        bits |= if entry.flags & ct_flags::REPLY != 0 {
            ct_flags::FIN_REPLY
        } else {
            ct_flags::FIN_FORWARD
        };
    }
    let other = key.partner(entry);
    for k in [key, &other] {
        let ptr = CT4_V3.get_ptr_mut(k).or_else(|| CT4N_V1.get_ptr_mut(k));
        if let Some(ptr) = ptr {
            // SAFETY: a valid map value pointer; flags only ever gain bits here.
            unsafe { (*ptr).flags |= bits };
        }
    }
    bits
}

/// A flow's first reply: both entries move to the answered table, where no flood of
/// unanswered packets can evict them. When that table is full they stay where they are.
#[inline(always)]
fn ct_promote(rev_key: &Ct4Key, rev: &Ct4Value) {
    let fwd_key = rev_key.forward_key(rev);
    // SAFETY: copied out immediately.
    let fwd = unsafe { CT4N_V1.get(fwd_key) }.copied();
    let mut rev = *rev;
    rev.flags |= ct_flags::ANSWERED;
    if CT4_V3.insert(rev_key, rev, BPF_ANY as u64).is_err() {
        count(counter::CT_ANSWERED_FULL);
        return;
    }
    if let Some(mut fwd) = fwd {
        fwd.flags |= ct_flags::ANSWERED;
        if CT4_V3.insert(fwd_key, fwd, BPF_ANY as u64).is_err() {
            let _ = CT4_V3.remove(rev_key);
            count(counter::CT_ANSWERED_FULL);
            return;
        }
        let _ = CT4N_V1.remove(fwd_key);
    }
    let _ = CT4N_V1.remove(rev_key);
}

/// A forward entry is valid while its backend ID still resolves to the same backend.
#[inline(always)]
pub fn validate_flow(entry: &Ct4Value) -> bool {
    // SAFETY: the value is copied out immediately.
    match unsafe { LB4_BE_V1.get(entry.backend_id) } {
        Some(b) => b.addr_be == entry.dst_addr_be && b.port_be == entry.dst_port_be,
        None => false,
    }
}

#[derive(Clone, Copy)]
pub struct Service {
    pub key: Svc4Key,
    /// The external entry's svc_id: loadBalancerSourceRanges are keyed by it.
    pub ranges_id: u32,
    pub count: u16,
    pub svc_id: u32,
    pub flags: u32,
    pub affinity_timeout_s: u32,
}

/// The external entry; for traffic from inside the node (`internal`: pods and host
/// processes), the internal one when it exists. Shared with the socket hooks.
#[inline(always)]
pub fn lookup_service(addr_be: u32, port_be: u16, proto: u8, internal: bool) -> Option<Service> {
    let key = Svc4Key::new(addr_be, port_be, proto, 0);
    // SAFETY: values are copied out immediately.
    let mut v = *unsafe { LB4_SVC_V2.get(key) }?;
    let mut key = key;
    let ranges_id = v.svc_id;
    if internal && v.flags & svc_flags::TWO_SCOPES != 0 {
        let ik = key.with_scope(scope::INTERNAL);
        if let Some(iv) = unsafe { LB4_SVC_V2.get(ik) } {
            // The internal view keeps the external entry's policy flags: source ranges apply
            // from pods too, and externalTrafficPolicy Local still means "not masqueraded".
            let flags = v.flags;
            v = *iv;
            v.flags |= flags & (svc_flags::SOURCE_RANGES | svc_flags::ETP_LOCAL);
            key = ik;
        }
    }
    Some(Service {
        key,
        ranges_id,
        count: v.count,
        svc_id: v.svc_id,
        flags: v.flags,
        affinity_timeout_s: v.affinity_timeout_s,
    })
}

/// Uniformly random among the service's slots per new flow, or the client's affine backend
/// (sessionAffinity ClientIP). `None`: a slot or backend is missing. Shared with the socket
/// hooks, whose client is the node's address.
#[inline(always)]
pub fn select_backend(svc: &Service, client_be: u32) -> Option<(u32, Backend4)> {
    let affinity = svc.flags & svc_flags::AFFINITY != 0;
    // The clock only for affinity's timestamps (a helper call per new flow otherwise).
    let now = if affinity {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let aff_key = Aff4Key::new(svc.svc_id, client_be);
    // SAFETY: map values are copied out immediately.
    // A terminating backend stays in the backend map for its established flows; affinity must
    // not keep sending new ones to it unless the service has nothing but terminating
    // endpoints left (then it is as good as any, and stickiness is kept).
    let terminating_ok = svc.flags & svc_flags::TERMINATING_FALLBACK != 0;
    let affine = if affinity
        && let Some(a) = unsafe { LB4_AFF_V2.get(aff_key) }
        && now.saturating_sub(a.last_used_ns) < svc.affinity_timeout_s as u64 * 1_000_000_000
        && let Some(b) = unsafe { LB4_BE_V1.get(a.backend_id) }
        && (terminating_ok || b.flags & backend_flags::TERMINATING == 0)
    {
        Some((a.backend_id, *b))
    } else {
        None
    };
    let (id, b) = match affine {
        Some(x) => x,
        None => {
            let slot = select_slot(unsafe { bpf_get_prandom_u32() }, svc.count);
            let id = unsafe { LB4_SVC_V2.get(svc.key.with_slot(slot)) }?.backend_id;
            (id, *unsafe { LB4_BE_V1.get(id) }?)
        }
    };
    if affinity {
        let v = Aff4Value {
            backend_id: id,
            _pad: 0,
            last_used_ns: now,
        };
        let _ = LB4_AFF_V2.insert(aff_key, v, BPF_ANY as u64);
    }
    Some((id, b))
}

/// kube-proxy's masquerade rules (docs/semantics.md, S8-S10), given the flow's origin.
#[inline(always)]
fn must_masquerade(p: &Packet, svc: &Service, origin: Origin, cfg: &NodeConfig) -> bool {
    // externalTrafficPolicy Local: never from pods (short-circuit) or from external clients
    // (client address preserved), `--masquerade-all` or not: kube-proxy's iptables and
    // nftables proxiers apply masqueradeAll to traffic addressed to a ClusterIP only.
    let external = svc.flags & svc_flags::EXTERNAL_KINDS != 0;
    let etp_local = svc.flags & svc_flags::ETP_LOCAL != 0;
    if cfg.flags & cfg_flags::MASQUERADE_ALL != 0 {
        return !(external & etp_local);
    }
    if external {
        // externalTrafficPolicy Cluster: always.
        let _ = origin;
        return !etp_local;
    }
    // ClusterIP: traffic from outside the cluster CIDR. Without a cluster CIDR (mask 0) local
    // traffic cannot be told apart, and kube-proxy then masquerades nothing by its source.
    cfg.cluster_mask_be != 0 && !cfg.in_cluster(p.saddr_be)
}

/// Records both directions of a new flow and returns the forward rewrite.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn ct_create(
    ctx: &TcContext,
    p: &Packet,
    key: &Ct4Key,
    backend_id: u32,
    b: &Backend4,
    svc: &Service,
    origin: Origin,
    cfg: &NodeConfig,
) -> Result<Ct4Value, i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let mut fwd = Ct4Value {
        dst_addr_be: b.addr_be,
        dst_port_be: b.port_be,
        backend_id,
        svc_id: svc.svc_id,
        flags: ct_flags::FORWARD | ct_flags::DNAT,
        last_seen_ns: now,
        ..Ct4Value::default()
    };
    let mut rev = Ct4Value {
        src_addr_be: p.daddr_be,
        src_port_be: p.dport_be,
        svc_id: svc.svc_id,
        flags: ct_flags::REPLY | ct_flags::SNAT,
        last_seen_ns: now,
        ..Ct4Value::default()
    };
    if origin == Origin::External || svc.flags & svc_flags::EXTERNAL_KINDS != 0 {
        // The reply's new source may be a node address (a NodePort, or an LB IP the node
        // holds): the stack would drop it as a martian, so route it ourselves.
        rev.flags |= ct_flags::FIB_REDIRECT;
    }
    if b.addr_be == p.saddr_be && origin == Origin::Pod {
        // Hairpin: the pod reaches itself. Its reply would never leave the pod unless the
        // backend sees another source, so SNAT to the node's hairpin address and send both
        // directions straight back out of the pod's port (the host stack would drop a packet
        // with its own address as source).
        if cfg.hairpin_addr_be == 0 {
            return Err(debug::drop(counter::DROP_REWRITE));
        }
        fwd.src_addr_be = cfg.hairpin_addr_be;
        fwd.src_port_be = p.sport_be;
        fwd.flags |= ct_flags::SNAT | ct_flags::REDIRECT_BACK;
        rev.dst_addr_be = p.saddr_be;
        rev.dst_port_be = p.sport_be;
        rev.flags |= ct_flags::DNAT | ct_flags::REDIRECT_BACK;
        count(counter::HAIRPIN);
        return ct_commit(ctx, p, key, fwd, rev, cfg, Commit::Keep);
    }
    if must_masquerade(p, svc, origin, cfg) && cfg.node_addr_be != 0 {
        // SNAT to the node with a port of our own.
        rev.dst_addr_be = p.saddr_be;
        rev.dst_port_be = p.sport_be;
        rev.flags |= ct_flags::DNAT | ct_flags::FIB_REDIRECT;
        fwd.src_addr_be = cfg.node_addr_be;
        fwd.flags |= ct_flags::SNAT | ct_flags::FIB_REDIRECT | ct_flags::MASQUERADED;
        return ct_commit(ctx, p, key, fwd, rev, cfg, Commit::Masquerade);
    }
    fwd.src_addr_be = p.saddr_be;
    fwd.src_port_be = p.sport_be;
    // A pod's TCP flow keeps its port unless one of the pod's own connections, opened
    // straight to the endpoint, already holds the tuple. With `--socket-lb=all` most of a
    // pod's connections are opened straight to endpoints, after or before ours: ours take a
    // port from the SNAT range, out of the pod's ephemeral range, so neither meets the other.
    let how = if origin == Origin::Pod && p.proto == proto::TCP {
        if cfg.flags & cfg_flags::SOCK_LB_PODS_TCP != 0 {
            Commit::Remap
        } else {
            Commit::KeepUnlessPodSocket
        }
    } else {
        Commit::Keep
    };
    ct_commit(ctx, p, key, fwd, rev, cfg, how)
}

/// How a new flow's source port is chosen.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// The client's port if its reply tuple is free, else one from the SNAT range.
    Keep,
    /// As `Keep`, and the tuple also counts as taken when a socket of the client pod holds
    /// it: a connection opened straight to the endpoint, which our conntrack never saw
    /// (netfilter's NAT sees it, and picks another port). One socket lookup per new flow.
    KeepUnlessPodSocket,
    /// The client's address with a port from the SNAT range (`--socket-lb=all`, pods' TCP).
    Remap,
    /// Always a port from the SNAT range (the source becomes the node).
    Masquerade,
}

/// Whether a socket in the namespace of the pod behind this packet's interface holds the
/// tuple `backend -> client` (the connection the backend would answer on).
#[inline(always)]
fn pod_socket_holds(ctx: &TcContext, rev_key: &Ct4Key) -> bool {
    // SAFETY: the skb pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: copied out at once.
    let Some(netns) = (unsafe { PODNS_V1.get(ifindex) }).copied() else {
        return false;
    };
    // SAFETY: a Ct4Key starts with bpf_sock_tuple's IPv4 member (saddr, daddr, sport, dport,
    // all in network order), the 12 bytes the lookup reads; the socket is released at once.
    unsafe {
        let sk = bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut _,
            rev_key as *const Ct4Key as *mut _,
            12,
            netns as u32 as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk as *mut _);
    }
    true
}

/// What claiming a reply tuple found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Claim {
    Done,
    /// A live flow holds it.
    Taken,
    /// The table refused the insert.
    Full,
}

const EEXIST: i32 = 17;

/// SNAT port probes for a free reply tuple, then for one of a closed flow.
const FREE_PROBES: u32 = 32;
const CLOSED_PROBES: u32 = 8;

/// Claims `rev_key` for the new flow `key` by inserting its reply entry: the tuple is free,
/// a leftover of this very flow, or (`take_closed`) held by a closed flow (taken over, with
/// that flow's forward entry). A live flow's reply tuple is never overwritten: its replies
/// would come back from the wrong service.
#[inline(always)]
fn claim(key: &Ct4Key, rev_key: &Ct4Key, rev: &Ct4Value, take_closed: bool) -> Claim {
    // SAFETY: copied out immediately.
    if let Some(old) = unsafe { CT4_V3.get(rev_key) }.copied() {
        let owner = rev_key.forward_key(&old);
        if owner != *key {
            if !take_closed || !ct_flags::closed(old.flags) {
                return Claim::Taken;
            }
            let _ = CT4_V3.remove(owner);
            let _ = CT4N_V1.remove(owner);
            count(counter::CT_CLOSED_REUSED);
        }
        let _ = CT4_V3.remove(rev_key);
    }
    match CT4N_V1.insert(rev_key, rev, BPF_NOEXIST as u64) {
        Ok(()) => return Claim::Done,
        Err(e) if e != -EEXIST => return Claim::Full,
        Err(_) => {}
    }
    // SAFETY: copied out immediately.
    let Some(old) = unsafe { CT4N_V1.get(rev_key) }.copied() else {
        return Claim::Taken;
    };
    let owner = rev_key.forward_key(&old);
    if owner != *key {
        if !take_closed || !ct_flags::closed(old.flags) {
            return Claim::Taken;
        }
        let _ = CT4N_V1.remove(owner);
        count(counter::CT_CLOSED_REUSED);
    }
    if CT4N_V1.insert(rev_key, rev, BPF_ANY as u64).is_ok() {
        Claim::Done
    } else {
        Claim::Full
    }
}

/// Records a new flow: claims its reply tuple, then inserts its forward entry. The reply
/// tuple is the backend answering to (`fwd.src_addr_be`, source port). A flow keeps its
/// client's port when that tuple is free; a masqueraded flow, or one whose tuple a live
/// flow holds (a client reusing its port towards two services that share an endpoint),
/// gets a port from the SNAT range, as netfilter's NAT does; so does a pod's TCP flow under
/// `--socket-lb=all` ([`Commit::Remap`]).
#[inline(always)]
fn ct_commit(
    ctx: &TcContext,
    p: &Packet,
    key: &Ct4Key,
    mut fwd: Ct4Value,
    mut rev: Ct4Value,
    cfg: &NodeConfig,
    how: Commit,
) -> Result<Ct4Value, i32> {
    let masquerade = how == Commit::Masquerade;
    let (b_addr, b_port, addr) = (fwd.dst_addr_be, fwd.dst_port_be, fwd.src_addr_be);
    if !masquerade {
        let rev_key = Ct4Key::new(b_addr, addr, b_port, fwd.src_port_be, key.proto);
        let pod_holds = how == Commit::Remap
            || how == Commit::KeepUnlessPodSocket && pod_socket_holds(ctx, &rev_key);
        // The client reusing its own port after a close: its tuple, taken over.
        match if pod_holds {
            Claim::Taken
        } else {
            claim(key, &rev_key, &rev, true)
        } {
            Claim::Done => return ct_insert_forward(key, &fwd, &rev_key),
            Claim::Full => {
                return Err(debug::drop(counter::DROP_CT_FULL));
            }
            Claim::Taken => {}
        }
        // Remap the source port only; the reply's DNAT gives the client its port back.
        fwd.flags |= ct_flags::SNAT;
        rev.flags |= ct_flags::DNAT;
        rev.dst_addr_be = p.saddr_be;
        rev.dst_port_be = p.sport_be;
    }
    let (min, max) = (cfg.snat_port_min as u32, cfg.snat_port_max as u32);
    let span = if max > min { max - min + 1 } else { 1 };
    // SAFETY: a helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() } % span;
    // Free ports first: a closed flow's port is taken over only when FREE_PROBES random
    // ports are all in use. Reusing it at once would meet the backend's TIME_WAIT for the
    // old connection, where Linux's per-connection timestamps make it reject the new SYN
    // (PAWS) and the client retransmit; netfilter never reuses such a port either.
    for i in 0..(FREE_PROBES + CLOSED_PROBES) {
        let port = ((min + (start + i * 97) % span) as u16).to_be();
        let rev_key = Ct4Key::new(b_addr, addr, b_port, port, key.proto);
        match claim(key, &rev_key, &rev, i >= FREE_PROBES) {
            Claim::Done => {
                fwd.src_port_be = port;
                // A remap by policy is no clash.
                if how != Commit::Remap {
                    count(if masquerade {
                        counter::MASQUERADE
                    } else {
                        counter::CT_CLASH_REMAPPED
                    });
                }
                return ct_insert_forward(key, &fwd, &rev_key);
            }
            Claim::Full => {
                return Err(debug::drop(counter::DROP_CT_FULL));
            }
            Claim::Taken => {}
        }
    }
    Err(debug::drop(if masquerade {
        counter::DROP_SNAT_EXHAUSTED
    } else {
        counter::DROP_CT_CLASH
    }))
}

/// The forward entry, once the reply tuple is ours; undoes the claim if it fails.
#[inline(always)]
fn ct_insert_forward(key: &Ct4Key, fwd: &Ct4Value, rev_key: &Ct4Key) -> Result<Ct4Value, i32> {
    if CT4N_V1.insert(key, fwd, BPF_ANY as u64).is_err() {
        let _ = CT4N_V1.remove(rev_key);
        return Err(debug::drop(counter::DROP_CT_FULL));
    }
    Ok(*fwd)
}

/// Applies a flow's rewrite and delivers the packet as the entry says.
#[inline(always)]
pub fn translate(ctx: &TcContext, p: &Packet, entry: &Ct4Value) -> Result<i32, i32> {
    if nat::apply(ctx, p, entry).is_err() {
        return Err(debug::drop(counter::DROP_REWRITE));
    }
    deliver(ctx, p.saddr_be, p.daddr_be, entry)
}

/// Sends a rewritten packet on as its flow's entry says; `saddr_be`/`daddr_be` are the
/// packet's addresses before the rewrite.
#[inline(always)]
pub fn deliver(
    ctx: &TcContext,
    saddr_be: u32,
    daddr_be: u32,
    entry: &Ct4Value,
) -> Result<i32, i32> {
    if entry.flags & ct_flags::REDIRECT_BACK != 0 {
        // Hairpin: we route it back ourselves, so we decrement the TTL as the stack would.
        fib::forward_ttl(ctx)?;
        if nat::swap_macs(ctx).is_err() {
            return Err(debug::drop(counter::DROP_REWRITE));
        }
        // SAFETY: reading the skb's ingress ifindex; flags 0 = egress of that device.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        let rc = unsafe { bpf_redirect(ifindex, 0) };
        return Ok(rc as i32);
    }
    if entry.flags & ct_flags::FIB_REDIRECT != 0 {
        let src = if entry.flags & ct_flags::SNAT != 0 {
            entry.src_addr_be
        } else {
            saddr_be
        };
        let dst = if entry.flags & ct_flags::DNAT != 0 {
            entry.dst_addr_be
        } else {
            daddr_be
        };
        return Ok(fib::redirect(ctx, src, dst));
    }
    Ok(TC_ACT_OK)
}
