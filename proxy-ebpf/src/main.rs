//! ebpf-proxy's datapath. One module per hook; entry points are thin and only map the
//! pipeline's result to a verdict.
#![no_std]
#![no_main]

mod debug;
mod fib;
mod frag;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod pod;
mod reject;
mod sock;
mod uplink;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
