//! The one raw bpf(2) wrapper, for the few link commands aya 0.14 has no API for: open a pin
//! (`BPF_OBJ_GET`), read a link's info (`BPF_OBJ_GET_INFO_BY_FD`), swap a link's program
//! (`BPF_LINK_UPDATE`) and detach a link (`BPF_LINK_DETACH`). `links` and `sockhooks` use it.
//! Also `BPF_MAP_GET_NEXT_KEY` from a given key, which aya's key iterator (always from the
//! start) cannot do: the conntrack sweeper resumes from where its last batch stopped.
//! `BPF_MAP_LOOKUP_BATCH` and `BPF_MAP_UPDATE_BATCH`, which aya 0.14 does not wrap: `/metrics`
//! reads whole maps, and the planner writes runs of entries, in a few calls instead of one per
//! key (see `batch`).
//! And `BPF_PROG_TEST_RUN` with flags, which aya 0.14's `TestRunOptions` cannot pass except
//! for XDP live frames: the packet fixtures ask the kernel to check `skb->csum`
//! (`BPF_F_TEST_SKB_CHECKSUM_COMPLETE`).
//!
//! Typed with our own minimal `repr(C)` mirrors of the kernel's `union bpf_attr` members and
//! `enum bpf_cmd` values: aya 0.14 keeps aya-obj's generated `bpf_attr`/`bpf_cmd` bindings
//! private (no public re-export), so they are not reachable through aya's API.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// The `enum bpf_cmd` values used here (the kernel's UAPI numbers).
#[derive(Clone, Copy, Debug)]
#[repr(i64)]
enum Cmd {
    MapGetNextKey = 4,
    ObjGet = 7,
    ProgTestRun = 10,
    ObjGetInfoByFd = 15,
    LinkUpdate = 29,
    MapLookupBatch = 24,
    MapUpdateBatch = 26,
    LinkDetach = 34,
}

/// `bpf_attr` for `BPF_OBJ_GET`: `{ __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags;
/// __s32 path_fd; }`, padded to the 32 bytes this agent has always passed.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: [u32; 3],
}

/// `bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`: `{ __u32 bpf_fd; __u32 info_len; __aligned_u64
/// info; }`.
#[repr(C)]
#[derive(Default)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `bpf_attr` for `BPF_LINK_UPDATE`: `{ __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32
/// old_prog_fd; }`.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `bpf_attr` for `BPF_MAP_GET_NEXT_KEY`: `{ __u32 map_fd; __aligned_u64 key; __aligned_u64
/// next_key; }`.
#[repr(C)]
#[derive(Default)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// `bpf_attr` for the `BPF_MAP_*_BATCH` commands: `{ __aligned_u64 in_batch; __aligned_u64
/// out_batch; __aligned_u64 keys; __aligned_u64 values; __u32 count; __u32 map_fd; __u64
/// elem_flags; __u64 flags; }`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `bpf_attr` for `BPF_PROG_TEST_RUN`: `{ __u32 prog_fd; __u32 retval; __u32 data_size_in;
/// __u32 data_size_out; __aligned_u64 data_in; __aligned_u64 data_out; __u32 repeat; __u32
/// duration; __u32 ctx_size_in; __u32 ctx_size_out; __aligned_u64 ctx_in; __aligned_u64
/// ctx_out; __u32 flags; __u32 cpu; __u32 batch_size; }`, padded to 80 bytes.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `BPF_F_TEST_SKB_CHECKSUM_COMPLETE` (kernel 6.11+): the skb enters the program as
/// CHECKSUM_COMPLETE with `skb->csum` computed over the packet from its network header, and
/// the run fails (`EINVAL` or `EBADMSG`, by kernel version) unless `skb->csum` still matches the
/// packet the program leaves.
pub const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// What one `BPF_PROG_TEST_RUN` reports.
#[derive(Clone, Copy, Debug)]
pub struct TestRunOut {
    /// The program's return value.
    pub retval: u32,
    /// The kernel's time per run, averaged over `repeat`, in ns.
    pub duration_ns: u32,
    /// Bytes of the packet the program left in `out`.
    pub size_out: usize,
}

/// `BPF_PROG_TEST_RUN` on `data`, `repeat` times, with `flags`; the packet the program leaves
/// is written to `out` (see [`TestRunOut::size_out`]). Any program type that takes a packet.
pub fn prog_test_run_into(
    prog: BorrowedFd<'_>,
    data: &[u8],
    out: &mut [u8],
    repeat: u32,
    flags: u32,
) -> io::Result<TestRunOut> {
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: u32::try_from(data.len()).map_err(io::Error::other)?,
        data_size_out: u32::try_from(out.len()).map_err(io::Error::other)?,
        data_in: data.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        flags,
        ..Default::default()
    };
    // SAFETY: data_in and data_out point to buffers of the given sizes that outlive the call.
    unsafe { bpf(Cmd::ProgTestRun, &mut attr)? };
    Ok(TestRunOut {
        retval: attr.retval,
        duration_ns: attr.duration,
        size_out: (attr.data_size_out as usize).min(out.len()),
    })
}

/// [`prog_test_run_into`] once, on `data` with `flags`: the program's return value and the
/// packet it leaves (at most `data.len() + 256` bytes).
pub fn prog_test_run(prog: BorrowedFd<'_>, data: &[u8], flags: u32) -> io::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; data.len() + 256];
    let r = prog_test_run_into(prog, data, &mut out, 1, flags)?;
    out.truncate(r.size_out);
    Ok((r.retval, out))
}

/// `bpf_attr` for `BPF_LINK_DETACH`: `{ __u32 link_fd; }`, padded to 8 bytes.
#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
    _pad: u32,
}

/// `struct bpf_link_info` as far as the agent reads it: type, id, prog_id, then the 8-aligned
/// per-link-type union at byte 16 (`tcx { ifindex; attach_type; }`, `xdp { ifindex; }`,
/// `cgroup { __u64 cgroup_id; __u32 attach_type; }`), 64 bytes in all.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkInfoRaw {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    _pad: u32,
    /// The per-link-type union, as 64-bit words.
    pub union: [u64; 6],
}

/// bpf(2) with one `bpf_attr` member.
///
/// # Safety
/// `attr` must be the member `cmd` expects; any pointer it holds must be valid for what the
/// kernel reads or writes through it during the call.
unsafe fn bpf<T>(cmd: Cmd, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, writable, zero-initialised buffer of the given size; the
    // commands used here read and write only within it (and the buffers it points to, which the
    // caller vouches for).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned BPF object (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: pathname points to a NUL-terminated string that outlives the call.
    let fd = unsafe { bpf(Cmd::ObjGet, &mut attr)? };
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfoRaw> {
    let mut info = LinkInfoRaw::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfoRaw>() as u32,
        info: &mut info as *mut LinkInfoRaw as u64,
    };
    // SAFETY: info points to a writable buffer of info_len bytes that outlives the call.
    unsafe { bpf(Cmd::ObjGetInfoByFd, &mut attr)? };
    Ok(info)
}

/// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (`None`: the first key) written to `next`,
/// which must be the map's key size, as must `key`. `Ok(false)` at the end of the map. A `key`
/// no longer in a hash map restarts from the first key (the kernel's rule).
pub fn map_next_key(map: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
    let mut attr = NextKeyAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        next_key: next.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: key and next point to buffers of the map's key size (the caller's contract)
    // that outlive the call.
    match unsafe { bpf(Cmd::MapGetNextKey, &mut attr) } {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// One `BPF_MAP_LOOKUP_BATCH`: up to `keys.len() / key_size` entries following the position
/// `token` (`None`: from the start) into `keys` and `values` (`values` sized for as many values,
/// per CPU for per-CPU maps); the position after them goes to `next` (the key size, at least 4
/// bytes). Returns how many entries were read and whether the map is exhausted. `EINVAL`
/// or `ENOTSUPP` for map types without batch lookups (LPM tries).
pub fn map_lookup_batch(
    map: BorrowedFd<'_>,
    token: Option<&[u8]>,
    next: &mut [u8],
    keys: &mut [u8],
    values: &mut [u8],
    count: u32,
) -> io::Result<(u32, bool)> {
    let mut attr = BatchAttr {
        in_batch: token.map_or(0, |t| t.as_ptr() as u64),
        out_batch: next.as_mut_ptr() as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the buffers hold `count` keys and values of the map's sizes and a batch token
    // (the caller's contract), and outlive the call.
    match unsafe { bpf(Cmd::MapLookupBatch, &mut attr) } {
        Ok(_) => Ok((attr.count, false)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok((attr.count, true)),
        Err(e) => Err(e),
    }
}

/// One `BPF_MAP_UPDATE_BATCH` of `count` entries (`keys` and `values` hold that many, of the
/// map's sizes), written in order. On failure, how many were written before it.
pub fn map_update_batch(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: u32,
) -> Result<(), (u32, io::Error)> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the kernel only reads `count` keys and values through the pointers (the caller's
    // contract on their sizes), and writes back `count`.
    match unsafe { bpf(Cmd::MapUpdateBatch, &mut attr) } {
        Ok(_) => Ok(()),
        // A count left as passed means the call failed before writing anything.
        Err(e) => Err((if attr.count >= count { 0 } else { attr.count }, e)),
    }
}

/// `BPF_LINK_UPDATE`: replaces the link's program atomically.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the attribute holds no pointers.
    unsafe { bpf(Cmd::LinkUpdate, &mut attr).map(|_| ()) }
}

/// `BPF_LINK_DETACH`: detaches the link now, whoever else holds it (pins, other processes).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the attribute holds no pointers.
    unsafe { bpf(Cmd::LinkDetach, &mut attr).map(|_| ()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_kernel() {
        use std::mem::{offset_of, size_of};
        assert_eq!(size_of::<ObjGetAttr>(), 32);
        assert_eq!(offset_of!(ObjGetAttr, bpf_fd), 8);
        assert_eq!(size_of::<InfoByFdAttr>(), 16);
        assert_eq!(offset_of!(InfoByFdAttr, info), 8);
        assert_eq!(size_of::<LinkUpdateAttr>(), 16);
        assert_eq!(size_of::<LinkDetachAttr>(), 8);
        assert_eq!(size_of::<TestRunAttr>(), 80);
        assert_eq!(offset_of!(TestRunAttr, data_in), 16);
        assert_eq!(offset_of!(TestRunAttr, ctx_in), 48);
        assert_eq!(offset_of!(TestRunAttr, flags), 64);
        assert_eq!(size_of::<LinkInfoRaw>(), 64);
        assert_eq!(offset_of!(LinkInfoRaw, union), 16);
    }
}
