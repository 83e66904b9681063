//! Fragments. Only a datagram's first fragment carries ports, so only it matches a conntrack
//! entry. Once it is translated, its ports are remembered under the datagram's identity as
//! received (addresses, protocol, IP ID, like Cilium's fragment map), and the fragments that
//! follow get the same address rewrite and delivery. A fragment that overtakes its first
//! fragment passes untouched (`pass_fragment`), as in Cilium.
use aya_ebpf::{
    bindings::{BPF_ANY, TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use proxy_common::{Ct4Key, Frag4Key, Frag4Value, counter};

use crate::{
    lb,
    maps::{LB4_FRG_V1, count},
    nat,
    parse::{Packet, fragment},
};

#[inline(always)]
fn key(saddr_be: u32, daddr_be: u32, id_be: u16, proto: u8) -> Frag4Key {
    Frag4Key {
        saddr_be,
        daddr_be,
        id_be,
        proto,
        _pad: 0,
    }
}

/// After a first fragment matched a flow: remembers its ports for the rest of the datagram.
#[inline(always)]
pub fn remember(p: &Packet) {
    if !p.first_fragment {
        return;
    }
    let v = Frag4Value {
        sport_be: p.sport_be,
        dport_be: p.dport_be,
    };
    let _ = LB4_FRG_V1.insert(
        key(p.saddr_be, p.daddr_be, p.ip_id_be, p.proto),
        v,
        BPF_ANY as u64,
    );
}

/// A non-first fragment: the translation of its datagram's first fragment, if one was seen.
#[inline(always)]
pub fn translate(ctx: &TcContext) -> Result<i32, i32> {
    let Some(f) = fragment(ctx) else {
        count(counter::PASS_FRAGMENT);
        return Ok(TC_ACT_OK);
    };
    // SAFETY: copied out immediately.
    let ports = unsafe { LB4_FRG_V1.get(key(f.saddr_be, f.daddr_be, f.id_be, f.proto)) }.copied();
    let entry = ports.and_then(|v| {
        lb::ct_get(&Ct4Key::new(
            f.saddr_be, f.daddr_be, v.sport_be, v.dport_be, f.proto,
        ))
    });
    let Some(entry) = entry else {
        count(counter::PASS_FRAGMENT);
        return Ok(TC_ACT_OK);
    };
    if nat::apply_addrs(ctx, f.saddr_be, f.daddr_be, &entry).is_err() {
        count(counter::DROP_REWRITE);
        return Err(TC_ACT_SHOT);
    }
    count(counter::FRAG_TRANSLATED);
    lb::deliver(ctx, f.saddr_be, f.daddr_be, &entry)
}
