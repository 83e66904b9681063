//! The load-balancing pipeline shared by every packet hook:
//! `ct_lookup -> (hit: validate_flow) | (miss: lookup_service -> check_policy ->
//! select_backend -> ct_create) -> nat::apply -> deliver`.
//!
//! Conntrack holds two entries per flow, each keyed by the tuple exactly as a hook will see it
//! and carrying the rewrite to apply: the forward entry (client -> service) and the reply entry
//! (backend -> client, or to the SNAT address when masqueraded). Whichever hook sees a packet
//! first translates it; a translated packet no longer matches, so later hooks leave it alone.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect},
    programs::TcContext,
};
use proxy_common::{
    Aff4Key, Aff4Value, Backend4, Ct4Key, Ct4Value, NodeConfig, Svc4Key, backend_flags, cfg_flags,
    counter, ct_flags, scope, select_slot, svc_flags,
};

use crate::{
    fib, icmp,
    maps::{
        CT4_V2, LB4_AFF_V2, LB4_BE_V1, LB4_SVC_V2, LB4_VIP_V1, count, count_service, node_config,
        reject_allowed, source_allowed,
    },
    nat,
    parse::{ETH_HLEN, Packet, parse_ipv4},
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
    let Some(p) = parse_ipv4(ctx) else {
        // Not TCP/UDP: maybe an ICMP error about one of our flows.
        return Ok(icmp::translate_error(ctx).unwrap_or(TC_ACT_OK));
    };
    let key = Ct4Key::new(p.saddr_be, p.daddr_be, p.sport_be, p.dport_be, p.proto);
    if let Some(entry) = ct_lookup(&key) {
        if entry.flags & ct_flags::REPLY != 0 {
            count(counter::REPLY);
            return translate(ctx, &p, &entry);
        }
        if validate_flow(&entry) {
            count(counter::FWD_ESTABLISHED);
            return translate_counted(ctx, &p, &entry);
        }
        // The flow's backend is gone: forget the flow and balance it again below, so a
        // removed endpoint never keeps receiving (UDP flows included).
        let _ = CT4_V2.remove(key);
        count(counter::REBALANCED);
    }
    if !balance {
        return Ok(TC_ACT_OK);
    }
    let Some(svc) = lookup_service(p.daddr_be, p.dport_be, p.proto, origin == Origin::Pod) else {
        // A ClusterIP on a port/protocol no service uses: REJECT like kube-proxy.
        // SAFETY: the value is not kept.
        if unsafe { LB4_VIP_V1.get(p.daddr_be) }.is_some() {
            return reject_now(ctx, &p);
        }
        return Ok(TC_ACT_OK);
    };
    if svc.flags & svc_flags::SOURCE_RANGES != 0 && !source_allowed(svc.ranges_id, p.saddr_be) {
        count(counter::DROP_SOURCE_RANGE);
        return Err(TC_ACT_SHOT);
    }
    if svc.count == 0 {
        if svc.flags & svc_flags::DROP_IF_EMPTY != 0 {
            count(counter::DROP_NO_LOCAL_BACKEND);
            return Err(TC_ACT_SHOT);
        }
        return reject_now(ctx, &p);
    }
    let Some((backend_id, backend)) = select_backend(&svc, p.saddr_be) else {
        count(counter::DROP_BACKEND_MISSING);
        return Err(TC_ACT_SHOT);
    };
    let cfg = node_config();
    let entry = ct_create(&p, &key, backend_id, &backend, &svc, origin, &cfg)?;
    count(counter::FWD_NEW);
    translate_counted(ctx, &p, &entry)
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
    if !reject::answerable(p.saddr_be) {
        count(counter::DROP_REJECT_BAD_SOURCE);
        return Err(TC_ACT_SHOT);
    }
    // Like the kernel's icmp_msgs_per_sec: a scan of empty service ports must not make the
    // node emit replies at line rate.
    if !reject_allowed() {
        count(counter::DROP_REJECT_RATE_LIMITED);
        return Err(TC_ACT_SHOT);
    }
    count(counter::REJECT);
    match reject::reply(ctx, p) {
        Ok(rc) => Ok(rc),
        Err(()) => Err(TC_ACT_SHOT),
    }
}

#[inline(always)]
pub fn ct_lookup(key: &Ct4Key) -> Option<Ct4Value> {
    let ptr = CT4_V2.get_ptr_mut(key)?;
    // SAFETY: a valid map value pointer; a racing writer can at worst leave a stale
    // timestamp, which only matters for idle expiry.
    unsafe {
        (*ptr).last_seen_ns = bpf_ktime_get_ns();
        Some(*ptr)
    }
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
    let now = unsafe { bpf_ktime_get_ns() };
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
    if cfg.flags & cfg_flags::MASQUERADE_ALL != 0 {
        return true;
    }
    if svc.flags & svc_flags::EXTERNAL_KINDS != 0 {
        // externalTrafficPolicy Cluster: always. Local: never from pods (short-circuit) or
        // from external clients (client address preserved).
        let _ = origin;
        return svc.flags & svc_flags::ETP_LOCAL == 0;
    }
    // ClusterIP: traffic from outside the cluster CIDR. Without a cluster CIDR (mask 0) local
    // traffic cannot be told apart, and kube-proxy then masquerades nothing by its source.
    cfg.cluster_mask_be != 0 && !cfg.in_cluster(p.saddr_be)
}

/// Records both directions of a new flow and returns the forward rewrite.
#[inline(always)]
fn ct_create(
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
            count(counter::DROP_REWRITE);
            return Err(TC_ACT_SHOT);
        }
        fwd.src_addr_be = cfg.hairpin_addr_be;
        fwd.src_port_be = p.sport_be;
        fwd.flags |= ct_flags::SNAT | ct_flags::REDIRECT_BACK;
        rev.dst_addr_be = p.saddr_be;
        rev.dst_port_be = p.sport_be;
        rev.flags |= ct_flags::DNAT | ct_flags::REDIRECT_BACK;
        count(counter::HAIRPIN);
        let rev_key = Ct4Key::new(
            b.addr_be,
            cfg.hairpin_addr_be,
            b.port_be,
            p.sport_be,
            key.proto,
        );
        return ct_insert(key, &fwd, &rev_key, &rev);
    }
    if must_masquerade(p, svc, origin, cfg) && cfg.node_addr_be != 0 {
        // SNAT to the node with a port of our own: the reply entry's key is the claim, so
        // inserting it with NOEXIST allocates the port atomically.
        rev.dst_addr_be = p.saddr_be;
        rev.dst_port_be = p.sport_be;
        rev.flags |= ct_flags::DNAT | ct_flags::FIB_REDIRECT;
        fwd.src_addr_be = cfg.node_addr_be;
        fwd.flags |= ct_flags::SNAT | ct_flags::FIB_REDIRECT | ct_flags::MASQUERADED;
        let (min, max) = (cfg.snat_port_min as u32, cfg.snat_port_max as u32);
        let span = if max > min { max - min + 1 } else { 1 };
        let start = unsafe { bpf_get_prandom_u32() } % span;
        for i in 0..8u32 {
            let port = (min + (start + i * 97) % span) as u16;
            let rev_key = Ct4Key::new(
                b.addr_be,
                cfg.node_addr_be,
                b.port_be,
                port.to_be(),
                key.proto,
            );
            if CT4_V2.insert(rev_key, rev, BPF_NOEXIST as u64).is_ok() {
                fwd.src_port_be = port.to_be();
                if CT4_V2.insert(*key, fwd, BPF_ANY as u64).is_err() {
                    let _ = CT4_V2.remove(rev_key);
                    count(counter::DROP_CT_FULL);
                    return Err(TC_ACT_SHOT);
                }
                count(counter::MASQUERADE);
                return Ok(fwd);
            }
        }
        count(counter::DROP_SNAT_EXHAUSTED);
        return Err(TC_ACT_SHOT);
    }
    let rev_key = Ct4Key::new(b.addr_be, p.saddr_be, b.port_be, p.sport_be, key.proto);
    ct_insert(key, &fwd, &rev_key, &rev)
}

#[inline(always)]
fn ct_insert(
    key: &Ct4Key,
    fwd: &Ct4Value,
    rev_key: &Ct4Key,
    rev: &Ct4Value,
) -> Result<Ct4Value, i32> {
    if CT4_V2.insert(rev_key, rev, BPF_ANY as u64).is_err()
        || CT4_V2.insert(key, fwd, BPF_ANY as u64).is_err()
    {
        count(counter::DROP_CT_FULL);
        return Err(TC_ACT_SHOT);
    }
    Ok(*fwd)
}

/// Applies a flow's rewrite and delivers the packet as the entry says.
#[inline(always)]
pub fn translate(ctx: &TcContext, p: &Packet, entry: &Ct4Value) -> Result<i32, i32> {
    if nat::apply(ctx, p, entry).is_err() {
        count(counter::DROP_REWRITE);
        return Err(TC_ACT_SHOT);
    }
    if entry.flags & ct_flags::REDIRECT_BACK != 0 {
        // Hairpin: we route it back ourselves, so we decrement the TTL as the stack would.
        fib::forward_ttl(ctx)?;
        if nat::swap_macs(ctx).is_err() {
            count(counter::DROP_REWRITE);
            return Err(TC_ACT_SHOT);
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
            p.saddr_be
        };
        let dst = if entry.flags & ct_flags::DNAT != 0 {
            entry.dst_addr_be
        } else {
            p.daddr_be
        };
        return Ok(fib::redirect(ctx, src, dst));
    }
    Ok(TC_ACT_OK)
}
