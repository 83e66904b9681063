//! Reading whole maps in a bounded number of syscalls (`BPF_MAP_LOOKUP_BATCH`): a `/metrics`
//! scrape or `inspect` at 100k services would otherwise cost one syscall per key (more than a
//! million for the service map). Each read reports the syscalls it made, so tests can hold it
//! to its bound.
use std::{io, os::fd::BorrowedFd};

use super::sys;

/// Entries per batch syscall.
pub const BATCH: u32 = 4096;

/// Values of per-CPU maps are padded to 8 bytes per CPU (the kernel's layout).
fn per_cpu_stride(value_size: usize) -> usize {
    value_size.div_ceil(8) * 8
}

/// Possible CPUs, the per-CPU value count the kernel reads and writes.
fn cpus() -> io::Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| e)
}

/// A map's shape for batch reads.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub key_size: usize,
    pub value_size: usize,
    pub per_cpu: bool,
}

impl Shape {
    /// Bytes of one entry's value in a batch buffer.
    fn value_bytes(&self) -> io::Result<usize> {
        Ok(if self.per_cpu {
            per_cpu_stride(self.value_size) * cpus()?
        } else {
            self.value_size
        })
    }
}

/// What a read cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub entries: u64,
    pub syscalls: u64,
}

/// Calls `each(key, value)` for every entry, `chunk` entries per syscall, until `each` returns
/// false or the map ends. `value` holds every CPU's value for per-CPU maps.
pub fn for_each(
    fd: BorrowedFd<'_>,
    shape: Shape,
    chunk: u32,
    mut each: impl FnMut(&[u8], &[u8]) -> bool,
) -> io::Result<Cost> {
    let vb = shape.value_bytes()?;
    let n = chunk.max(1) as usize;
    let mut keys = vec![0u8; n * shape.key_size];
    let mut values = vec![0u8; n * vb];
    let tok = shape.key_size.max(4);
    let (mut token, mut next) = (vec![0u8; tok], vec![0u8; tok]);
    let mut cost = Cost::default();
    let mut first = true;
    loop {
        let (got, done) = sys::map_lookup_batch(
            fd,
            (!first).then_some(&token[..]),
            &mut next,
            &mut keys,
            &mut values,
            n as u32,
        )?;
        first = false;
        cost.syscalls += 1;
        for i in 0..got as usize {
            cost.entries += 1;
            let k = &keys[i * shape.key_size..(i + 1) * shape.key_size];
            if !each(k, &values[i * vb..(i + 1) * vb]) {
                return Ok(cost);
            }
        }
        if done || got == 0 {
            return Ok(cost);
        }
        std::mem::swap(&mut token, &mut next);
    }
}

/// Counts a map's entries: in batches where the map type has them (hash, LRU, arrays), else
/// key by key (LPM tries, whose batch lookups the kernel does not implement).
pub fn count_entries(fd: BorrowedFd<'_>, shape: Shape) -> io::Result<Cost> {
    match for_each(fd, shape, BATCH, |_, _| true) {
        Ok(c) => Ok(c),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(524) => {
            // 524: ENOTSUPP, the kernel's "no batch operation for this map type".
            count_by_key(fd, shape.key_size)
        }
        Err(e) => Err(e),
    }
}

/// Counts entries with `BPF_MAP_GET_NEXT_KEY`, one syscall per key.
fn count_by_key(fd: BorrowedFd<'_>, key_size: usize) -> io::Result<Cost> {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut cost = Cost::default();
    loop {
        cost.syscalls += 1;
        if !sys::map_next_key(fd, (cost.entries > 0).then_some(&key[..]), &mut next)?
            || cost.entries > 1 << 26
        {
            return Ok(cost);
        }
        cost.entries += 1;
        std::mem::swap(&mut key, &mut next);
    }
}

/// Sums a per-CPU array's values over CPUs, for indices `0..len`, with `sum(acc, one CPU's
/// value bytes)`. One syscall per `BATCH` indices.
pub fn per_cpu_array_sums<T: Default + Clone>(
    fd: BorrowedFd<'_>,
    value_size: usize,
    len: u32,
    mut sum: impl FnMut(&mut T, &[u8]),
) -> io::Result<(Vec<T>, Cost)> {
    let shape = Shape {
        key_size: 4,
        value_size,
        per_cpu: true,
    };
    let stride = per_cpu_stride(value_size);
    let mut out = vec![T::default(); len as usize];
    let cost = for_each(fd, shape, BATCH.min(len.max(1)), |k, v| {
        let i = u32::from_ne_bytes([k[0], k[1], k[2], k[3]]);
        let Some(slot) = out.get_mut(i as usize) else {
            return false;
        };
        for cpu in v.chunks_exact(stride) {
            sum(slot, &cpu[..value_size]);
        }
        i + 1 < len
    })?;
    Ok((out, cost))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_values_are_padded_to_eight_bytes() {
        assert_eq!(per_cpu_stride(4), 8);
        assert_eq!(per_cpu_stride(8), 8);
        assert_eq!(per_cpu_stride(16), 16);
        assert_eq!(per_cpu_stride(20), 24);
    }
}
