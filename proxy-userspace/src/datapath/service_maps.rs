//! Typed access to the service maps: reading them back at startup, the per-service counters,
//! and the [`crate::plan::MapWriter`] the planner writes through.
use std::{os::fd::AsFd as _, path::Path};

use aya::maps::{
    HashMap, IterableMap as _, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key,
};
use proxy_common::{
    Backend4, SrcRange4Data, SrcRange4Key, Svc4Key, Svc4Value, SvcCounter, VipValue, maps,
};

use crate::plan::ExtWriteError;

/// Sums the per-CPU counters of each ID in `ids` that the map (`maps::SVC_COUNTERS`) holds,
/// reading the IDs up to the largest asked for in batches (a bounded number of syscalls at
/// any number of services).
pub fn read_service_counters(
    m: &MapData,
    ids: impl IntoIterator<Item = u32>,
) -> Result<Vec<(u32, SvcCounter)>, MapError> {
    let max = m.info()?.max_entries();
    let ids: Vec<u32> = ids.into_iter().filter(|id| *id < max).collect();
    let Some(top) = ids.iter().max() else {
        return Ok(Vec::new());
    };
    let size = std::mem::size_of::<SvcCounter>();
    let (sums, _) =
        super::batch::per_cpu_array_sums::<SvcCounter>(m.fd().as_fd(), size, top + 1, |acc, v| {
            // SAFETY: `v` is one CPU's value: `size` bytes of a plain-old-data SvcCounter.
            let c: SvcCounter = unsafe { std::ptr::read_unaligned(v.as_ptr().cast()) };
            acc.packets += c.packets;
            acc.bytes += c.bytes;
        })
        .map_err(|e| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_lookup_batch",
                io_error: e,
            })
        })?;
    Ok(ids.into_iter().map(|id| (id, sums[id as usize])).collect())
}

/// Per-service counters of the maps pinned under `pin_dir` (metrics, `inspect`).
pub fn pinned_service_counters(
    pin_dir: &Path,
    ids: impl IntoIterator<Item = u32>,
) -> Result<Vec<(u32, SvcCounter)>, MapError> {
    read_service_counters(&MapData::from_pin(pin_dir.join(maps::SVC_COUNTERS))?, ids)
}

/// Typed service and backend maps.
pub struct LbMaps<'a> {
    /// Per-service packet counters (zeroed when a service ID is allocated).
    pub svc_counters: PerCpuArray<&'a mut MapData, SvcCounter>,
    pub services: HashMap<&'a mut MapData, Svc4Key, Svc4Value>,
    pub backends: HashMap<&'a mut MapData, u32, Backend4>,
    pub vips: HashMap<&'a mut MapData, u32, VipValue>,
    pub src_ranges: LpmTrie<&'a mut MapData, SrcRange4Data, u8>,
}

impl LbMaps<'_> {
    pub fn read_services(&self) -> Vec<(Svc4Key, Svc4Value)> {
        self.services.iter().filter_map(Result::ok).collect()
    }
    pub fn read_backends(&self) -> Vec<(u32, Backend4)> {
        self.backends.iter().filter_map(Result::ok).collect()
    }
    pub fn read_vips(&self) -> Vec<(u32, VipValue)> {
        self.vips.iter().filter_map(Result::ok).collect()
    }
    pub fn read_src_ranges(&self) -> Vec<SrcRange4Key> {
        self.src_ranges
            .iter()
            .filter_map(Result::ok)
            .map(|(k, _)| {
                let d = k.data();
                SrcRange4Key {
                    prefixlen: k.prefix_len(),
                    svc_id_be: d.svc_id_be,
                    addr_be: d.addr_be,
                }
            })
            .collect()
    }
}

fn is_enoent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{op} in map {map}: {source}")]
pub struct WriteError {
    pub op: &'static str,
    pub map: &'static str,
    pub source: MapError,
}

/// Writes `entries` into the hash map `m` (`name`) with `BPF_MAP_UPDATE_BATCH`, in chunks of
/// `batch::BATCH`. On failure, how many were written before it.
fn update_batch<K: aya::Pod, V: aya::Pod>(
    m: &MapData,
    name: &'static str,
    entries: &[(K, V)],
) -> Result<(), (usize, WriteError)> {
    let mut written = 0;
    for chunk in entries.chunks(super::batch::BATCH as usize) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        super::sys::map_update_batch(
            m.fd().as_fd(),
            pod_bytes(&keys),
            pod_bytes(&values),
            chunk.len() as u32,
        )
        .map_err(|(n, io_error)| {
            let source = MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_batch",
                io_error,
            });
            (
                written + n as usize,
                WriteError {
                    op: "insert",
                    map: name,
                    source,
                },
            )
        })?;
        written += chunk.len();
    }
    Ok(())
}

/// A slice of plain-old-data map keys or values as the bytes the kernel reads.
fn pod_bytes<T: aya::Pod>(v: &[T]) -> &[u8] {
    // SAFETY: `Pod` types are `repr(C)` with no padding the kernel would misread, and the
    // slice covers exactly their memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

impl crate::plan::MapWriter for LbMaps<'_> {
    type Error = WriteError;
    fn put_backend(&mut self, id: u32, b: &Backend4) -> Result<(), WriteError> {
        self.backends.insert(id, b, 0).map_err(|source| WriteError {
            op: "insert",
            map: maps::BACKEND4,
            source,
        })
    }
    fn put_service(&mut self, k: &Svc4Key, v: &Svc4Value) -> Result<(), WriteError> {
        self.services.insert(k, v, 0).map_err(|source| WriteError {
            op: "insert",
            map: maps::SVC4,
            source,
        })
    }
    fn put_backends(&mut self, entries: &[(u32, Backend4)]) -> Result<(), (usize, WriteError)> {
        update_batch(self.backends.map(), maps::BACKEND4, entries)
    }
    fn put_services(
        &mut self,
        entries: &[(Svc4Key, Svc4Value)],
    ) -> Result<(), (usize, WriteError)> {
        update_batch(self.services.map(), maps::SVC4, entries)
    }
    fn delete_service(&mut self, k: &Svc4Key) -> Result<(), WriteError> {
        match self.services.remove(k) {
            Err(e) if !is_enoent(&e) => Err(WriteError {
                op: "delete",
                map: maps::SVC4,
                source: e,
            }),
            _ => Ok(()),
        }
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), WriteError> {
        match self.backends.remove(&id) {
            Err(e) if !is_enoent(&e) => Err(WriteError {
                op: "delete",
                map: maps::BACKEND4,
                source: e,
            }),
            _ => Ok(()),
        }
    }
    fn put_vip(&mut self, addr_be: u32, v: &VipValue) -> Result<(), ExtWriteError<WriteError>> {
        self.vips.insert(addr_be, v, 0).map_err(|source| {
            WriteError {
                op: "insert",
                map: maps::VIP4,
                source,
            }
            .into()
        })
    }
    fn delete_vip(&mut self, addr_be: u32) -> Result<(), ExtWriteError<WriteError>> {
        match self.vips.remove(&addr_be) {
            Err(e) if !is_enoent(&e) => Err(WriteError {
                op: "delete",
                map: maps::VIP4,
                source: e,
            }
            .into()),
            _ => Ok(()),
        }
    }
    fn put_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<WriteError>> {
        self.src_ranges
            .insert(&Key::new(k.prefixlen, k.data()), 1, 0)
            .map_err(|source| {
                WriteError {
                    op: "insert",
                    map: maps::SRC_RANGE4,
                    source,
                }
                .into()
            })
    }
    fn reset_service_counter(&mut self, svc_id: u32) -> Result<(), ExtWriteError<WriteError>> {
        if svc_id >= self.svc_counters.len() {
            return Ok(());
        }
        let err = |source| WriteError {
            op: "reset",
            map: maps::SVC_COUNTERS,
            source,
        };
        let sys = |call, io_error| {
            err(MapError::SyscallError(aya::sys::SyscallError {
                call,
                io_error,
            }))
        };
        let ncpus = aya::util::nr_cpus().map_err(|(call, e)| sys(call, e))?;
        let zero = aya::maps::PerCpuValues::try_from(vec![SvcCounter::default(); ncpus])
            .map_err(|e| sys("nr_cpus", e))?;
        self.svc_counters
            .set(svc_id, zero, 0)
            .map_err(|e| err(e).into())
    }
    fn delete_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<WriteError>> {
        match self.src_ranges.remove(&Key::new(k.prefixlen, k.data())) {
            Err(e) if !is_enoent(&e) => Err(WriteError {
                op: "delete",
                map: maps::SRC_RANGE4,
                source: e,
            }
            .into()),
            _ => Ok(()),
        }
    }
}
