//! Making sure a BPF filesystem is mounted where pins go. `ip netns exec` remounts /sys, so
//! in a lab (or any fresh mount namespace) /sys/fs/bpf may be a plain directory.
use std::{ffi::CString, io, os::unix::ffi::OsStrExt as _, path::Path};

use anyhow::{Context as _, Result, bail};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `dir` is the root of (or inside) a mounted bpffs.
pub fn is_bpffs(dir: &Path) -> io::Result<bool> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a zeroed out-struct.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Ensures `dir` is on a bpffs, mounting one there if needed. Returns true if it mounted.
pub fn ensure(dir: &Path) -> Result<bool> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating bpffs directory {}", dir.display()))?;
    if is_bpffs(dir).with_context(|| format!("checking {}", dir.display()))? {
        return Ok(false);
    }
    let target = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        bail!(
            "{} is not a BPF filesystem and mounting one there failed: {e}. Mount it \
             (`mount -t bpf bpf {}`) or pass --bpffs with a bpffs directory",
            dir.display(),
            dir.display()
        );
    }
    Ok(true)
}
