//! CRC32c (Castagnoli, RFC 9260 appendix A), the SCTP checksum, usable in eBPF and on the host.
//!
//! SCTP has no pseudo-header, so rewriting addresses leaves its checksum alone; rewriting ports
//! (bytes 0..4 of the common header) does not. Recomputing the CRC over a whole packet is a
//! loop over every byte, too costly per packet in BPF. CRC is affine over GF(2): for equal-length
//! messages `crc(a) ^ crc(b)` is the CRC register (initial value 0, no final xor) of `a ^ b`.
//! With the difference confined to the first four bytes, that register is the register of the
//! four difference bytes advanced over the `len - 4` zero bytes that follow, which is a
//! multiplication by x^(8 * (len - 4)) modulo the polynomial: a few dozen shift/xor rounds
//! per set bit of the length, whatever the length (the method of zlib's `crc32_combine`).
//!
//! Values use the usual reflected representation (bit 31 is x^0). The checksum field holds the
//! CRC in little-endian byte order (Linux: `cpu_to_le32`), so the packet bytes at offset 8
//! are `crc.to_le_bytes()`.

/// The reflected Castagnoli polynomial.
pub const POLY: u32 = 0x82f6_3b78;

/// `X2N[k]` = x^(2^k) mod P, for multiplying by x^n one bit of n at a time.
const X2N: [u32; 32] = x2n_table();

const fn x2n_table() -> [u32; 32] {
    // Compile time only, so plain branches are fine here.
    const fn mul(a: u32, mut b: u32) -> u32 {
        let mut p = 0;
        let mut i = 0;
        while i < 32 {
            if a & (1u32 << (31 - i)) != 0 {
                p ^= b;
            }
            b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
            i += 1;
        }
        p
    }
    let mut t = [0u32; 32];
    let mut p: u32 = 1 << 30; // x^1
    let mut k = 0;
    while k < 32 {
        t[k] = p;
        p = mul(p, p);
        k += 1;
    }
    t
}

/// All ones when bit 0 of `x` is set, else zero, computed without a branch the compiler could
/// reintroduce: the BPF verifier walks both sides of every data-dependent branch, and with
/// one per bit of the length and of the CRC the paths would multiply past its limit.
#[inline(always)]
fn mask(x: u32) -> u32 {
    // SAFETY: a volatile read of a local; it only hides the value's range from the optimizer.
    let bit = unsafe { core::ptr::read_volatile(&(x & 1)) };
    0u32.wrapping_sub(bit)
}

/// One step of the reflected CRC register: multiply by x.
#[inline(always)]
fn step(b: u32) -> u32 {
    (b >> 1) ^ (POLY & mask(b))
}

/// a * b mod P (both in the reflected representation), branch-free.
#[inline(always)]
pub fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut p: u32 = 0;
    for i in 0..32 {
        p ^= b & mask(a >> (31 - i));
        b = step(b);
    }
    p
}

/// x^(8 * n) mod P: the effect of `n` zero bytes on the CRC register.
#[inline(always)]
pub fn zero_bytes_operator(n: u16) -> u32 {
    let mut p: u32 = 1 << 31; // x^0
    // Bit k of n multiplies by x^(8 * 2^k) = X2N[k + 3].
    for k in 0..16 {
        let m = mask((n as u32) >> k);
        p = (multmodp(X2N[k + 3], p) & m) | (p & !m);
    }
    p
}

/// Feeds `bytes` into a CRC register without initial or final inversion.
#[inline(always)]
pub fn register(mut crc: u32, bytes: [u8; 4]) -> u32 {
    for b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = step(crc);
        }
    }
    crc
}

/// The new checksum of an SCTP packet of `len` bytes (common header included) whose first
/// four bytes (source and destination port, wire order) change from `old` to `new`. `crc` and
/// the result are CRC values, not the field's little-endian bytes.
#[inline(always)]
pub fn update_first4(crc: u32, old: [u8; 4], new: [u8; 4], len: u16) -> u32 {
    let diff = [
        old[0] ^ new[0],
        old[1] ^ new[1],
        old[2] ^ new[2],
        old[3] ^ new[3],
    ];
    crc ^ multmodp(
        zero_bytes_operator(len.saturating_sub(4)),
        register(0, diff),
    )
}

/// CRC32c of `data` computed bit by bit (host side: fixtures and tests).
pub fn checksum(data: &[u8]) -> u32 {
    checksum_bytes(data.iter().copied())
}

/// The checksum an SCTP packet (common header onwards) should carry: the CRC with the
/// checksum field (bytes 8..12) taken as zero.
pub fn sctp_checksum(packet: &[u8]) -> u32 {
    checksum_bytes(
        packet
            .iter()
            .enumerate()
            .map(|(i, &b)| if (8..12).contains(&i) { 0 } else { b }),
    )
}

fn checksum_bytes(bytes: impl Iterator<Item = u8>) -> u32 {
    let mut crc = !0u32;
    for b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = step(crc);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // RFC 3720 / iSCSI test vectors for CRC32c.
        assert_eq!(checksum(b"123456789"), 0xe306_9283);
        assert_eq!(checksum(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(checksum(&[0xffu8; 32]), 0x62a8_ab43);
    }

    #[test]
    fn incremental_port_rewrite_matches_full_recompute() {
        // Deterministic pseudo-random packets of many lengths, including odd ones and the
        // minimum (a bare common header).
        let mut seed = 0x1234_5678u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for len in (12usize..300).chain([1480, 1500, 9000, 65_000, 65_515]) {
            let mut buf = [0u8; 65_515];
            let pkt = &mut buf[..len];
            pkt.iter_mut().for_each(|b| *b = next() as u8);
            let crc = sctp_checksum(pkt);
            pkt[8..12].copy_from_slice(&crc.to_le_bytes());
            let old = [pkt[0], pkt[1], pkt[2], pkt[3]];
            let new = next().to_be_bytes();
            pkt[0..4].copy_from_slice(&new);
            let want = sctp_checksum(pkt);
            let got = update_first4(crc, old, new, len as u16);
            assert_eq!(got, want, "len {len}");
        }
    }

    #[test]
    fn unchanged_ports_keep_the_checksum() {
        assert_eq!(
            update_first4(0xdead_beef, [1, 2, 3, 4], [1, 2, 3, 4], 100),
            0xdead_beef
        );
    }
}
