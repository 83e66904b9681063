//! inotify on a manifests directory: wakes the manifests source as soon as a file changes, so
//! an edit is programmed without waiting for the next poll (which stays as the fallback).
use std::{io, path::Path};

/// Change notification for a manifests directory (inotify): wakes the reader as soon as a file
/// in it is written, renamed, created or removed, so an edit is programmed without waiting
/// for the next poll. Pollers keep polling as a fallback: inotify misses changes made on
/// another machine (network file systems), and the watch ends when the directory itself is
/// removed or renamed ([`DirWatch::changed`] then fails; make a new one when it is back).
#[derive(Debug)]
pub struct DirWatch {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl DirWatch {
    /// Watches `dir` (which must exist). Needs a tokio runtime.
    pub fn new(dir: &Path) -> io::Result<Self> {
        use std::os::fd::{FromRawFd as _, OwnedFd};
        use std::os::unix::ffi::OsStrExt as _;
        // SAFETY: no pointers; the returned descriptor is owned below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MODIFY
            | libc::IN_ATTRIB
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MOVED_FROM
            | libc::IN_MOVED_TO
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF
            | libc::IN_ONLYDIR;
        // SAFETY: `path` is a NUL-terminated string that outlives the call.
        if unsafe { libc::inotify_add_watch(raw, path.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is an open descriptor owned by the AsyncFd for its whole life.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Waits until something in the directory changed (events are drained: one wake-up per
    /// burst). Fails once the watch ended (the directory was removed or renamed). Cancel safe.
    pub async fn changed(&mut self) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        // Room for many events at once; each is 16 bytes plus the name.
        let mut buf = [0u8; 4096];
        loop {
            let mut guard = self.fd.readable().await?;
            let mut ended = false;
            let mut any = false;
            loop {
                let fd = guard.get_inner().as_raw_fd();
                // SAFETY: `buf` is valid for writes of its length.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::WouldBlock {
                        guard.clear_ready();
                        break;
                    }
                    return Err(e);
                }
                any = true;
                ended |= inotify_watch_ended(&buf[..n as usize]);
            }
            if ended {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "the watched directory was removed or renamed",
                ));
            }
            if any {
                return Ok(());
            }
        }
    }
}

/// Whether a buffer of inotify events says the watch on the directory itself ended.
fn inotify_watch_ended(mut buf: &[u8]) -> bool {
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    let mut ended = false;
    while buf.len() >= HEADER {
        // inotify_event: wd i32, mask u32, cookie u32, len u32, then `len` name bytes.
        let field = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let (mask, len) = (field(4), field(12) as usize);
        ended |= mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED) != 0;
        buf = buf.get(HEADER + len..).unwrap_or_default();
    }
    ended
}

#[cfg(test)]
mod tests {
    use std::{fs, time::Duration};

    use super::*;

    #[tokio::test]
    async fn dir_watch_wakes_on_edits_and_ends_with_the_directory() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("m");
        fs::create_dir(&dir).expect("mkdir");
        let mut w = DirWatch::new(&dir).expect("inotify");
        let wait = Duration::from_secs(2);
        // An atomic replace, as the lab and ConfigMap volumes do it.
        fs::write(dir.join(".x.tmp"), "a: 1\n").expect("write");
        fs::rename(dir.join(".x.tmp"), dir.join("x.yaml")).expect("rename");
        tokio::time::timeout(wait, w.changed())
            .await
            .expect("woken by the edit")
            .expect("watch alive");
        fs::rename(&dir, root.path().join("away")).expect("move the directory");
        let r = tokio::time::timeout(wait, w.changed())
            .await
            .expect("woken");
        assert!(r.is_err(), "the watch ends with the directory: {r:?}");
        assert!(DirWatch::new(&dir).is_err(), "no directory, no watch");
    }
}
