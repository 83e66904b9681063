//! The packet layout both eBPF crates read and write: Ethernet and IPv4 offsets, and the one
//! IPv4 header builder (REJECT replies, the lab encapsulator's outer header). No helpers, no
//! maps: plain byte arithmetic the verifier accepts and the host can test.
use crate::csum;

pub const ETH_HLEN: usize = 14;
/// The IPv4 ethertype as it sits in the frame (network order), for comparing raw loads.
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const IPV4_HLEN: usize = 20;
/// The IPv4 TTL byte (followed by the protocol byte, which shares its checksum word).
pub const IP_TTL_OFF: usize = ETH_HLEN + 8;
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

/// Writes an IPv4 header without options at `buf[off..off + 20]`: identification 0, TTL 64,
/// the Don't Fragment bit if `df`, and its checksum. `src`/`dst` are in wire order.
#[inline(always)]
pub fn write_ipv4_header(
    buf: &mut [u8],
    off: usize,
    total_len: u16,
    df: bool,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
) {
    buf[off] = 0x45;
    buf[off + 1] = 0;
    buf[off + 2..off + 4].copy_from_slice(&total_len.to_be_bytes());
    buf[off + 4..off + 8].copy_from_slice(&[0, 0, if df { 0x40 } else { 0 }, 0]);
    buf[off + 8] = 64;
    buf[off + 9] = proto;
    buf[off + 10] = 0;
    buf[off + 11] = 0;
    buf[off + 12..off + 16].copy_from_slice(&src);
    buf[off + 16..off + 20].copy_from_slice(&dst);
    let c = !csum::fold(csum::sum16(buf, off, IPV4_HLEN, 0));
    buf[off + 10..off + 12].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_matches_the_full_checksum() {
        let mut buf = [0xaau8; 24];
        write_ipv4_header(&mut buf, 2, 40, true, 6, [10, 0, 0, 1], [10, 0, 0, 2]);
        let h = &buf[2..22];
        assert_eq!(&h[..10], &[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6]);
        let mut zeroed = [0u8; 20];
        zeroed.copy_from_slice(h);
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(
            u16::from_be_bytes([h[10], h[11]]),
            csum::ipv4_header(&zeroed)
        );
        assert_eq!((buf[0], buf[1], buf[22], buf[23]), (0xaa, 0xaa, 0xaa, 0xaa));
    }
}
