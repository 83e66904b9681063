//! Datapath debug logging: why a flow was dropped or rejected, through aya-log. Off unless
//! the operator sets `cfg_flags::DATAPATH_DEBUG`; the flag is read only on drop and reject
//! paths, so forwarding never pays for it. The agent names the reason (`counter::NAMES`).
//!
//! Three steps, so the log call sits where the verifier has little state left to explore:
//! the drop site notes the reason ([`drop`], [`note`]), the pipeline adds the packet's tuple
//! ([`capture`]), and the program's entry writes the line ([`flush`]).
use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use aya_log_ebpf::info;
use proxy_common::cfg_flags;

use crate::{
    maps::{config_flags, count, scratch},
    parse::Packet,
};

/// Counts a drop for `reason` and, with debug logging on, notes the reason. Returns the
/// verdict, for `return Err(drop(..))`.
#[inline(always)]
pub fn drop(reason: u32) -> i32 {
    count(reason);
    note(reason);
    TC_ACT_SHOT
}

/// Notes why this packet is dropped or rejected, when debug logging is on.
#[inline(always)]
pub fn note(reason: u32) {
    if config_flags() & cfg_flags::DATAPATH_DEBUG == 0 {
        return;
    }
    if let Some(s) = scratch() {
        // SAFETY: this CPU's slot.
        unsafe { (*s).noted_reason = reason + 1 };
    }
}

/// Adds the packet's tuple to a noted reason.
#[inline(always)]
pub fn capture(p: &Packet) {
    let Some(s) = scratch() else {
        return;
    };
    // SAFETY: this CPU's slot.
    unsafe {
        if (*s).noted_reason == 0 {
            return;
        }
        (*s).saddr_be = p.saddr_be;
        (*s).daddr_be = p.daddr_be;
        (*s).sport_be = p.sport_be;
        (*s).dport_be = p.dport_be;
        (*s).proto = p.proto;
    }
}

/// Logs a noted reason with its tuple, and forgets it.
#[inline(always)]
pub fn flush(ctx: &TcContext) {
    let Some(s) = scratch() else {
        return;
    };
    // SAFETY: this CPU's slot.
    let s = unsafe { &mut *s };
    let noted = core::mem::replace(&mut s.noted_reason, 0);
    if noted == 0 {
        return;
    }
    info!(
        ctx,
        "reason={} proto={} {:i}:{} -> {:i}:{}",
        noted - 1,
        s.proto,
        u32::from_be(s.saddr_be),
        u16::from_be(s.sport_be),
        u32::from_be(s.daddr_be),
        u16::from_be(s.dport_be)
    );
}
