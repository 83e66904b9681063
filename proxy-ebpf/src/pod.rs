//! Hooks on a pod's host-side veth (a port of the pod bridge).
//!
//! Pipeline: `parse_ipv4 -> ct_lookup -> (hit: validate_flow) | (miss: lookup_service ->
//! select_backend -> ct_create) -> nat::apply -> redirect_back?`.
//!
//! Conntrack holds two entries per flow, each keyed by the tuple exactly as a hook will see it
//! and carrying the rewrite to apply: the forward entry (client -> service, DNAT to the
//! backend) and the reply entry (backend -> client, source back to the service). The reply
//! entry is applied by whichever pod hook sees the reply first: the backend's veth ingress
//! for a local backend, or the client's veth egress for a backend on another node.
use aya_ebpf::{
    bindings::{BPF_ANY, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{Backend4, Ct4Key, Ct4Value, Svc4Key, counter, ct_flags, select_slot};

use crate::{
    maps::{CT4_V1, LB4_BE_V1, LB4_SVC_V1, count, node_config},
    nat,
    parse::{Packet, parse_ipv4},
};

/// tc ingress on a pod's host-side veth: every packet the pod sends. Balances new flows to
/// services and translates packets of tracked flows (forward, and replies of local backends).
#[classifier]
pub fn lb_pod_in(ctx: TcContext) -> i32 {
    match try_pod(&ctx, true) {
        Ok(v) | Err(v) => v,
    }
}

/// tc egress on a pod's host-side veth: every packet delivered to the pod. Reverse-translates
/// replies of tracked flows that no earlier hook translated (backends on other nodes).
#[classifier]
pub fn lb_pod_out(ctx: TcContext) -> i32 {
    match try_pod(&ctx, false) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_pod(ctx: &TcContext, ingress: bool) -> Result<i32, i32> {
    let Some(p) = parse_ipv4(ctx) else {
        return Ok(TC_ACT_OK);
    };
    let key = Ct4Key::new(p.saddr_be, p.daddr_be, p.sport_be, p.dport_be, p.proto);
    if let Some(entry) = ct_lookup(&key) {
        if entry.flags & ct_flags::REPLY != 0 {
            count(counter::REPLY);
            return translate(ctx, &p, &entry);
        }
        if validate_flow(&entry) {
            count(counter::FWD_ESTABLISHED);
            return translate(ctx, &p, &entry);
        }
        // The flow's backend is gone: forget the flow and balance it again below, so a
        // removed endpoint never keeps receiving (UDP flows included).
        let _ = CT4_V1.remove(key);
        count(counter::REBALANCED);
    }
    if !ingress {
        return Ok(TC_ACT_OK);
    }
    let Some(svc) = lookup_service(&p) else {
        return Ok(TC_ACT_OK);
    };
    let (backend_id, backend) = select_backend(&p, svc)?;
    let entry = ct_create(&p, &key, backend_id, &backend, svc.svc_id)?;
    count(counter::FWD_NEW);
    translate(ctx, &p, &entry)
}

#[inline(always)]
fn ct_lookup(key: &Ct4Key) -> Option<Ct4Value> {
    let ptr = CT4_V1.get_ptr_mut(key)?;
    // SAFETY: a valid map value pointer; a racing writer can at worst leave a stale
    // timestamp, which only matters for idle expiry.
    unsafe {
        (*ptr).last_seen_ns = bpf_ktime_get_ns();
        Some(*ptr)
    }
}

/// A forward entry is valid while its backend ID still resolves to the same backend.
#[inline(always)]
fn validate_flow(entry: &Ct4Value) -> bool {
    // SAFETY: the value is copied out immediately.
    match unsafe { LB4_BE_V1.get(entry.backend_id) } {
        Some(b) => b.addr_be == entry.dst_addr_be && b.port_be == entry.dst_port_be,
        None => false,
    }
}

#[derive(Clone, Copy)]
struct Service {
    key: Svc4Key,
    count: u16,
    svc_id: u16,
}

#[inline(always)]
fn lookup_service(p: &Packet) -> Option<Service> {
    let key = Svc4Key::new(p.daddr_be, p.dport_be, p.proto, 0);
    // SAFETY: the value is copied out immediately.
    let v = unsafe { LB4_SVC_V1.get(key) }?;
    Some(Service {
        key,
        count: v.count,
        svc_id: v.svc_id,
    })
}

/// Uniformly random among the service's slots, per new flow.
#[inline(always)]
fn select_backend(p: &Packet, svc: Service) -> Result<(u32, Backend4), i32> {
    let _ = p;
    if svc.count == 0 {
        count(counter::DROP_NO_BACKEND);
        return Err(TC_ACT_SHOT);
    }
    let slot = select_slot(unsafe { bpf_get_prandom_u32() }, svc.count);
    // SAFETY: values are copied out immediately.
    let Some(s) = (unsafe { LB4_SVC_V1.get(svc.key.with_slot(slot)) }) else {
        count(counter::DROP_BACKEND_MISSING);
        return Err(TC_ACT_SHOT);
    };
    let id = s.backend_id;
    match unsafe { LB4_BE_V1.get(id) } {
        Some(b) => Ok((id, *b)),
        None => {
            count(counter::DROP_BACKEND_MISSING);
            Err(TC_ACT_SHOT)
        }
    }
}

/// Records both directions of a new flow and returns the forward rewrite.
#[inline(always)]
fn ct_create(
    p: &Packet,
    key: &Ct4Key,
    backend_id: u32,
    b: &Backend4,
    svc_id: u16,
) -> Result<Ct4Value, i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let mut fwd = Ct4Value {
        dst_addr_be: b.addr_be,
        dst_port_be: b.port_be,
        backend_id,
        svc_id,
        flags: ct_flags::FORWARD | ct_flags::DNAT,
        last_seen_ns: now,
        ..Ct4Value::default()
    };
    let mut rev = Ct4Value {
        src_addr_be: p.daddr_be,
        src_port_be: p.dport_be,
        svc_id,
        flags: ct_flags::REPLY | ct_flags::SNAT,
        last_seen_ns: now,
        ..Ct4Value::default()
    };
    // The client sees what it sent to: the reply's peer is the backend unless hairpinned.
    let mut client_seen_by_backend = p.saddr_be;
    if b.addr_be == p.saddr_be {
        // Hairpin: the pod reaches itself. Its reply would never leave the pod unless the
        // backend sees another source, so SNAT to the node's hairpin address and send both
        // directions straight back out of the pod's port (the host stack would drop a packet
        // with its own address as source).
        let cfg = node_config();
        if cfg.hairpin_addr_be == 0 {
            count(counter::DROP_REWRITE);
            return Err(TC_ACT_SHOT);
        }
        client_seen_by_backend = cfg.hairpin_addr_be;
        fwd.src_addr_be = cfg.hairpin_addr_be;
        fwd.src_port_be = p.sport_be;
        fwd.flags |= ct_flags::SNAT | ct_flags::REDIRECT_BACK;
        rev.dst_addr_be = p.saddr_be;
        rev.dst_port_be = p.sport_be;
        rev.flags |= ct_flags::DNAT | ct_flags::REDIRECT_BACK;
        count(counter::HAIRPIN);
    }
    let rev_key = Ct4Key::new(
        b.addr_be,
        client_seen_by_backend,
        b.port_be,
        p.sport_be,
        key.proto,
    );
    if CT4_V1.insert(rev_key, rev, BPF_ANY as u64).is_err()
        || CT4_V1.insert(*key, fwd, BPF_ANY as u64).is_err()
    {
        count(counter::DROP_CT_FULL);
        return Err(TC_ACT_SHOT);
    }
    Ok(fwd)
}

#[inline(always)]
fn translate(ctx: &TcContext, p: &Packet, entry: &Ct4Value) -> Result<i32, i32> {
    if nat::apply(ctx, p, entry).is_err() {
        count(counter::DROP_REWRITE);
        return Err(TC_ACT_SHOT);
    }
    if entry.flags & ct_flags::REDIRECT_BACK != 0 {
        if nat::swap_macs(ctx).is_err() {
            count(counter::DROP_REWRITE);
            return Err(TC_ACT_SHOT);
        }
        // SAFETY: reading the skb's ingress ifindex; flags 0 = egress of that device.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        let rc = unsafe { bpf_redirect(ifindex, 0) };
        return Ok(rc as i32);
    }
    Ok(TC_ACT_OK)
}
