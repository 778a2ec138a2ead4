//! The file-system edge: atomic replacement, directory fsync, direct reads, hard links.
//!
//! Invariant: every metadata change on storage goes through [`atomic_write`] — temporary file
//! `<name>.new`, write, fsync, rename over the target, fsync the directory — so a reader (or a
//! crash) sees either the old content or the new one, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Suffix of the temporary file used by [`atomic_write`] (VDSM uses the same for `.meta`).
pub const TEMP_SUFFIX: &str = ".new";

pub fn temp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(TEMP_SUFFIX);
    PathBuf::from(s)
}

/// Replaces `path` with `data` atomically and durably.
pub fn atomic_write(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path(path);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Writes a whole file and fsyncs it (no rename: the caller publishes it later).
pub fn write_synced(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Writes a whole file without syncing it; the caller syncs the returned handle.
pub fn write_unsynced(path: &Path, data: &[u8], mode: u32) -> io::Result<File> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.write_all(data)?;
    Ok(f)
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes a file; `Ok(false)` if it was already gone.
pub fn remove_if_exists(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Makes `dst` a hard link to `src`, replacing a different file at `dst` (VDSM's `forceLink`).
pub fn force_link(src: &Path, dst: &Path) -> io::Result<()> {
    let s = fs::metadata(src)?;
    if let Ok(d) = fs::symlink_metadata(dst) {
        if d.ino() == s.ino() && d.dev() == s.dev() {
            return Ok(());
        }
        fs::remove_file(dst)?;
    }
    fs::hard_link(src, dst)
}

/// Creates (or grows) a sparse file of `size` bytes, as VDSM's `truncateFile` does.
pub fn create_sized(path: &Path, size: u64, mode: u32) -> io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .open(path)?;
    if f.metadata()?.len() < size {
        f.set_len(size)?;
    }
    f.sync_all()
}

/// Reads `len` bytes at `offset` (short files read as zeros past their end).
pub fn read_at(path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path)?;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(buf)
}

/// Grows `path` to at least `size` bytes (sparse), fsynced.
pub fn ensure_len(path: &Path, size: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    if f.metadata()?.len() < size {
        f.set_len(size)?;
    }
    f.sync_all()
}

/// Writes `data` at `offset` and fsyncs.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, offset)?;
    f.sync_all()
}

/// Reads up to `len` bytes from the start of `path` with `O_DIRECT` (bypassing the page cache,
/// so the time measured is the storage's), returning the bytes and how long the read took.
pub fn read_direct(path: &Path, len: usize) -> io::Result<(Vec<u8>, Duration)> {
    const ALIGN: usize = 4096;
    let len = len.div_ceil(ALIGN).max(1) * ALIGN;
    let layout = std::alloc::Layout::from_size_align(len, ALIGN).expect("valid layout");
    let start = Instant::now();
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .or_else(|e| {
            // Some file systems (tmpfs) refuse O_DIRECT; fall back to a buffered read there.
            if e.raw_os_error() == Some(libc::EINVAL) {
                File::open(path)
            } else {
                Err(e)
            }
        })?;
    // SAFETY: layout has non-zero size; the buffer is freed below on every path.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    if buf.is_null() {
        return Err(io::Error::new(io::ErrorKind::OutOfMemory, "aligned buffer"));
    }
    let mut total = 0usize;
    let result = loop {
        use std::os::fd::AsRawFd;
        // SAFETY: buf points to `len` writable bytes; total < len.
        let n = unsafe { libc::read(f.as_raw_fd(), buf.add(total).cast(), len - total) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break Err(e);
        }
        let n = n as usize;
        total += n;
        // O_DIRECT reads must stay aligned: stop after a short (end-of-file) read.
        if n == 0 || total == len || !n.is_multiple_of(ALIGN) {
            break Ok(());
        }
    };
    let elapsed = start.elapsed();
    // SAFETY: buf holds `len` initialized (zeroed, then read) bytes.
    let out = unsafe { std::slice::from_raw_parts(buf, total) }.to_vec();
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    result.map(|()| (out, elapsed))
}

/// Total and available bytes of the file system holding `path`.
pub fn statvfs(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((frsize * st.f_blocks as u64, frsize * st.f_bavail as u64))
}

/// Allocated bytes of a file (`st_blocks * 512`).
pub fn allocated(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.meta");
        atomic_write(&p, b"one", 0o660).unwrap();
        atomic_write(&p, b"two", 0o660).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert!(!temp_path(&p).exists());
    }

    #[test]
    fn force_link_is_idempotent_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        fs::write(&a, b"A").unwrap();
        fs::write(&b, b"B").unwrap();
        force_link(&a, &b).unwrap();
        force_link(&a, &b).unwrap();
        assert_eq!(fs::read(&b).unwrap(), b"A");
        assert_eq!(fs::metadata(&a).unwrap().nlink(), 2);
    }

    #[test]
    fn direct_read_returns_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m");
        fs::write(&p, b"KEY=VALUE\n").unwrap();
        let (data, _) = read_direct(&p, 4096).unwrap();
        assert_eq!(&data, b"KEY=VALUE\n");
        let (total, free) = statvfs(d.path()).unwrap();
        assert!(total >= free && total > 0);
    }
}
