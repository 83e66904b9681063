//! Lab tooling, not part of the node datapath: a tc egress program that plays the
//! Katran-style balancer in front of the nodes, wrapping packets for a VIP in IPIP or GUE
//! (variant 1) addressed to one node. `ebpf-proxy-lab lab-encap` attaches it in the lab's
//! external client namespace so tests can send encapsulated traffic (the kernel here has no
//! ipip module). Its own object, so the shipped proxy-ebpf object carries only the product.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    btf_maps::Array,
    helpers::bpf_skb_adjust_room,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use proxy_common::{
    GUE_PORT,
    lab::{EncapConfig, MODE_GUE, MODE_IPIP},
    proto,
    wire::{self, ETH_HLEN, ETH_P_IP_BE},
};

#[btf_map]
static LAB_ENC_V1: Array<EncapConfig, 1> = Array::new();

/// tc egress on the lab client's interface.
#[classifier]
pub fn lab_encap(ctx: TcContext) -> i32 {
    match try_encap(&ctx) {
        Ok(()) => TC_ACT_OK,
        Err(()) => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn try_encap(ctx: &TcContext) -> Result<(), ()> {
    let Some(cfg) = LAB_ENC_V1.get(0) else {
        return Ok(());
    };
    let cfg = *cfg;
    let ethertype: u16 = ctx.load(12).map_err(|_| ())?;
    if ethertype != ETH_P_IP_BE || cfg.mode == 0 {
        return Ok(());
    }
    let daddr: u32 = ctx.load(ETH_HLEN + 16).map_err(|_| ())?;
    if daddr != cfg.vip_be {
        return Ok(());
    }
    let inner_len = u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).map_err(|_| ())?);
    let sport: u16 = ctx.load(ETH_HLEN + 20).unwrap_or(0);
    let (grow, flags, outer_proto) = if cfg.mode == MODE_IPIP {
        (20u16, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64, 4u8)
    } else if cfg.mode == MODE_GUE {
        (
            28u16,
            (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP) as u64,
            proto::UDP,
        )
    } else {
        return Ok(());
    };
    // SAFETY: growing our own skb right after the MAC header.
    if unsafe { bpf_skb_adjust_room(ctx.skb.skb, grow as i32, BPF_ADJ_ROOM_MAC, flags) } != 0 {
        return Err(());
    }
    let mut h = [0u8; 28];
    wire::write_ipv4_header(
        &mut h,
        0,
        inner_len + grow,
        false,
        outer_proto,
        cfg.outer_src_be.to_ne_bytes(),
        cfg.outer_dst_be.to_ne_bytes(),
    );
    if cfg.mode == MODE_GUE {
        // Source port from the inner flow so ECMP on the outer header keeps flows together;
        // a zero UDP checksum is allowed for IPv4.
        h[20..22].copy_from_slice(&(0xc000 | (u16::from_be(sport) & 0x3fff)).to_be_bytes());
        h[22..24].copy_from_slice(&GUE_PORT.to_be_bytes());
        h[24..26].copy_from_slice(&(inner_len + 8).to_be_bytes());
        ctx.store(ETH_HLEN, &h, 0).map_err(|_| ())?;
    } else {
        let outer: [u8; 20] = [
            h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11], h[12], h[13],
            h[14], h[15], h[16], h[17], h[18], h[19],
        ];
        ctx.store(ETH_HLEN, &outer, 0).map_err(|_| ())?;
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
