//! Internet checksum arithmetic (RFC 1071 / RFC 1624), usable in eBPF and on the host.
//! The host uses the full computations to check the datapath's incremental updates.

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds `data` (big-endian 16-bit words; an odd tail byte is padded with zero) to `sum`.
pub fn add_bytes(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u16::from_be_bytes([c[0], c[1]]) as u32);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [b] = chunks.remainder() {
        sum = sum.wrapping_add((*b as u32) << 8);
    }
    (sum & 0xffff) + (sum >> 16)
}

/// Adds `len` bytes of `buf` from `start` as big-endian 16-bit words (an odd tail byte is
/// ignored) without folding: the loop shape the eBPF programs use on their stack buffers.
#[inline(always)]
pub fn sum16(buf: &[u8], start: usize, len: usize, mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < len {
        acc += ((buf[start + i] as u32) << 8) | buf[start + i + 1] as u32;
        i += 2;
    }
    acc
}

/// The folded (not complemented) IPv4 pseudo-header sum, host order: what the L4 checksum
/// field of a CHECKSUM_PARTIAL packet holds. Addresses in network order as loaded.
#[inline(always)]
pub const fn pseudo_header_sum(saddr_be: u32, daddr_be: u32, proto: u8, l4_len: u16) -> u16 {
    let (s, d) = (u32::from_be(saddr_be), u32::from_be(daddr_be));
    fold((s >> 16) + (s & 0xffff) + (d >> 16) + (d & 0xffff) + proto as u32 + l4_len as u32)
}

/// Checksum of an IPv4 header as it should be stored (the checksum field must hold zero or be
/// skipped by the caller: pass the header with bytes 10..12 zeroed).
pub fn ipv4_header(header: &[u8]) -> u16 {
    !fold(add_bytes(0, header))
}

/// TCP/UDP checksum over the IPv4 pseudo-header and `segment` (whose checksum field must be
/// zero). Returns the value to store; a UDP result of 0 is sent as 0xffff.
pub fn l4_ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let mut sum = add_bytes(0, &src);
    sum = add_bytes(sum, &dst);
    sum = sum.wrapping_add(proto as u32);
    sum = sum.wrapping_add(segment.len() as u32);
    sum = add_bytes(sum, segment);
    let c = !fold(sum);
    if c == 0 && proto == crate::proto::UDP {
        0xffff
    } else {
        c
    }
}

/// Incremental update of a stored checksum when a 16-bit word changes (RFC 1624 eq. 3).
#[inline(always)]
pub const fn replace16(csum: u16, old: u16, new: u16) -> u16 {
    let sum = (!csum as u32) + (!old as u32) + new as u32;
    !fold(sum)
}

/// Incremental update when a 32-bit field changes (both halves).
#[inline(always)]
pub const fn replace32(csum: u16, old: u32, new: u32) -> u16 {
    let c = replace16(csum, (old >> 16) as u16, (new >> 16) as u16);
    replace16(c, old as u16, new as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example_header() {
        // A well-known IPv4 header whose checksum is 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(
            fold(add_bytes(0, &h)),
            0xffff,
            "a valid header sums to all ones"
        );
    }

    #[test]
    fn pseudo_header_sum_matches_the_byte_sum() {
        let (s, d) = ([10u8, 76, 0, 5], [203u8, 0, 113, 9]);
        let mut pseudo = [0u8; 12];
        pseudo[..4].copy_from_slice(&s);
        pseudo[4..8].copy_from_slice(&d);
        pseudo[9] = crate::proto::TCP;
        pseudo[10..].copy_from_slice(&40u16.to_be_bytes());
        assert_eq!(
            pseudo_header_sum(
                u32::from_ne_bytes(s),
                u32::from_ne_bytes(d),
                crate::proto::TCP,
                40
            ),
            fold(add_bytes(0, &pseudo))
        );
        assert_eq!(fold(sum16(&pseudo, 0, 12, 0)), fold(add_bytes(0, &pseudo)));
    }

    #[test]
    fn incremental_matches_full_recompute() {
        let mut h = [
            0x45u8, 0, 0, 60, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 76, 0, 5, 10, 96, 0, 10,
        ];
        let before = ipv4_header(&h);
        let old = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        let new = u32::from_be_bytes([10, 76, 1, 7]);
        h[16..20].copy_from_slice(&new.to_be_bytes());
        assert_eq!(replace32(before, old, new), ipv4_header(&h));
    }
}
