//! Sector I/O: the trait the lease algorithms are driven over, the real O_DIRECT file backend,
//! and an in-memory disk with switchable faults for threaded tests.
//!
//! [`DirectFile`] owns one I/O thread per open file. A request carries its own page-aligned
//! buffer into that thread, so when the caller gives up after `io_timeout` the thread may stay
//! blocked in a hung `pread`/`pwrite` (NFS) without the buffer being freed under it, and the
//! caller is free to go on. Files never share an I/O thread: a hung lease file cannot delay the
//! renewal of a lockspace on another file.
//!
//! Invariants:
//! - every call returns within the file's timeout (plus scheduling noise), success or not;
//! - requests on one file run in submission order, so a write that timed out and lands late
//!   can never overtake a later write from this process; requests whose caller already gave up
//!   are skipped, not executed late;
//! - files are opened `O_DIRECT | O_DSYNC` (falling back to `O_DSYNC` alone, with a warning, on
//!   file systems that refuse `O_DIRECT`, such as tmpfs).

use std::alloc::{self, Layout};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::format::SECTOR_SIZE;

/// An I/O failure as the lease algorithms see it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IoError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Os(Arc<std::io::Error>),
    #[error("transferred {done} of {len} bytes")]
    Short { done: usize, len: usize },
    #[error("offset {offset} or length {len} is not a multiple of 512")]
    Unaligned { offset: u64, len: usize },
    #[error("simulated failure")]
    Injected,
}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> Self {
        IoError::Os(Arc::new(e))
    }
}

/// Reads and writes whole sectors of one lease file (or a region of it), each call bounded in
/// time by the implementation.
pub trait SectorIo: Send + Sync + fmt::Debug {
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, IoError>;
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), IoError>;
    /// What this is, for error messages (a path).
    fn describe(&self) -> String;
}

fn check_aligned(offset: u64, len: usize) -> Result<(), IoError> {
    if !offset.is_multiple_of(SECTOR_SIZE as u64) || !len.is_multiple_of(SECTOR_SIZE) || len == 0 {
        return Err(IoError::Unaligned { offset, len });
    }
    Ok(())
}

/// A zeroed, page-aligned heap buffer, as O_DIRECT requires.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub const ALIGN: usize = 4096;

    pub fn zeroed(len: usize) -> AlignedBuf {
        let size = len.max(1).next_multiple_of(Self::ALIGN);
        let layout = Layout::from_size_align(size, Self::ALIGN).expect("aligned layout");
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len, layout }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() >= len initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

enum Op {
    Read { offset: u64, buf: AlignedBuf },
    Write { offset: u64, buf: AlignedBuf },
}

struct Request {
    op: Op,
    cancelled: Arc<AtomicBool>,
    reply: SyncSender<Result<Vec<u8>, IoError>>,
}

/// A lease file opened for direct, synchronous I/O, served by its own I/O thread.
pub struct DirectFile {
    path: PathBuf,
    direct: bool,
    timeout: Duration,
    tx: Mutex<Sender<Request>>,
}

impl fmt::Debug for DirectFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectFile")
            .field("path", &self.path)
            .field("direct", &self.direct)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl DirectFile {
    /// Opens `path` read-write; every I/O waits at most `timeout`.
    pub fn open(path: &Path, timeout: Duration) -> std::io::Result<DirectFile> {
        let (file, direct) = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)
        {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(path = %path.display(), "file system refuses O_DIRECT; using O_DSYNC alone");
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DSYNC)
                    .open(path)?;
                (f, false)
            }
            Err(e) => return Err(e),
        };
        let (tx, rx) = mpsc::channel::<Request>();
        let name = format!(
            "lease-io:{}",
            path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
        );
        std::thread::Builder::new()
            .name(name)
            .spawn(move || io_thread(file, rx))?;
        Ok(DirectFile {
            path: path.to_path_buf(),
            direct,
            timeout,
            tx: Mutex::new(tx),
        })
    }

    /// Whether the file is really open with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn submit(&self, op: Op) -> Result<Vec<u8>, IoError> {
        let cancelled = Arc::new(AtomicBool::new(false));
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        let req = Request {
            op,
            cancelled: cancelled.clone(),
            reply: reply_tx,
        };
        if self.tx.lock().expect("io queue").send(req).is_err() {
            return Err(IoError::Os(Arc::new(std::io::Error::other("I/O thread exited"))));
        }
        match reply_rx.recv_timeout(self.timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                cancelled.store(true, Ordering::SeqCst);
                Err(IoError::Timeout(self.timeout))
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err(IoError::Os(Arc::new(std::io::Error::other("I/O thread exited"))))
            }
        }
    }
}

/// Positioned I/O on an open file (a trait so tests can stand in a device that hangs).
trait RawFile: Send + 'static {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<usize>;
}

impl RawFile for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<usize> {
        FileExt::write_at(self, buf, offset)
    }
}

fn io_thread(file: impl RawFile, rx: Receiver<Request>) {
    while let Ok(req) = rx.recv() {
        if req.cancelled.load(Ordering::SeqCst) {
            continue;
        }
        let result = match req.op {
            Op::Read { offset, mut buf } => {
                let len = buf.as_slice().len();
                match read_full(&file, offset, buf.as_mut_slice()) {
                    Ok(n) if n == len => Ok(buf.as_slice().to_vec()),
                    Ok(n) => Err(IoError::Short { done: n, len }),
                    Err(e) => Err(e.into()),
                }
            }
            Op::Write { offset, buf } => {
                let len = buf.as_slice().len();
                match file.write_at(buf.as_slice(), offset) {
                    Ok(n) if n == len => Ok(Vec::new()),
                    Ok(n) => Err(IoError::Short { done: n, len }),
                    Err(e) => Err(e.into()),
                }
            }
        };
        let _ = req.reply.send(result);
    }
}

/// Reads until `buf` is full or end of file; sectors past the end of a sparse lease file read
/// as zeros, as on a block device.
fn read_full(file: &impl RawFile, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(buf.len());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl SectorIo for DirectFile {
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, IoError> {
        check_aligned(offset, len)?;
        self.submit(Op::Read {
            offset,
            buf: AlignedBuf::zeroed(len),
        })
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        check_aligned(offset, data.len())?;
        let mut buf = AlignedBuf::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        self.submit(Op::Write { offset, buf }).map(|_| ())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// A window of another [`SectorIo`] starting at `base` (a lockspace or resource at an offset).
#[derive(Debug, Clone)]
pub struct Region {
    io: Arc<dyn SectorIo>,
    base: u64,
}

impl Region {
    pub fn new(io: Arc<dyn SectorIo>, base: u64) -> Region {
        Region { io, base }
    }

    pub fn base(&self) -> u64 {
        self.base
    }
}

impl SectorIo for Region {
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, IoError> {
        self.io.read(self.base + offset, len)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.io.write(self.base + offset, data)
    }

    fn describe(&self) -> String {
        format!("{}@{}", self.io.describe(), self.base)
    }
}

/// Switchable faults of a [`FaultyIo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemFault {
    #[default]
    None,
    /// Every I/O fails with an error.
    Fail,
    /// Every I/O reports a timeout and changes nothing (storage unreachable).
    Hang,
}

/// An in-memory disk shared by threads (one per simulated shared storage).
#[derive(Debug, Default)]
pub struct MemDisk {
    data: Mutex<Vec<u8>>,
}

impl MemDisk {
    pub fn new(len: usize) -> MemDisk {
        MemDisk {
            data: Mutex::new(vec![0; len]),
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().expect("memdisk").clone()
    }
}

impl SectorIo for MemDisk {
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, IoError> {
        check_aligned(offset, len)?;
        let d = self.data.lock().expect("memdisk");
        let start = offset as usize;
        let mut out = vec![0u8; len];
        if start < d.len() {
            let end = (start + len).min(d.len());
            out[..end - start].copy_from_slice(&d[start..end]);
        }
        Ok(out)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        check_aligned(offset, data.len())?;
        let mut d = self.data.lock().expect("memdisk");
        let end = offset as usize + data.len();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(data);
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

/// One host's path to a shared [`SectorIo`], whose faults a test switches: "this host lost its
/// storage" while the others keep theirs.
#[derive(Debug)]
pub struct FaultyIo {
    inner: Arc<dyn SectorIo>,
    fault: Mutex<MemFault>,
}

impl FaultyIo {
    pub fn new(inner: Arc<dyn SectorIo>) -> FaultyIo {
        FaultyIo {
            inner,
            fault: Mutex::new(MemFault::None),
        }
    }

    pub fn set_fault(&self, f: MemFault) {
        *self.fault.lock().expect("fault") = f;
    }

    fn check(&self) -> Result<(), IoError> {
        match *self.fault.lock().expect("fault") {
            MemFault::None => Ok(()),
            MemFault::Fail => Err(IoError::Injected),
            MemFault::Hang => Err(IoError::Timeout(Duration::ZERO)),
        }
    }
}

impl SectorIo for FaultyIo {
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, IoError> {
        self.check()?;
        self.inner.read(offset, len)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.check()?;
        self.inner.write(offset, data)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_file_round_trips_sectors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let f = DirectFile::open(&p, Duration::from_secs(5)).unwrap();
        assert!(f.is_direct(), "ext4 supports O_DIRECT");
        let data: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
        f.write(512, &data).unwrap();
        assert_eq!(f.read(512, 1024).unwrap(), data);
        // Past the end of file reads zeros, like a device.
        assert_eq!(f.read(1 << 20, 512).unwrap(), vec![0u8; 512]);
        assert!(matches!(f.read(100, 512), Err(IoError::Unaligned { .. })));
    }

    #[test]
    fn region_offsets_io() {
        let m: Arc<dyn SectorIo> = Arc::new(MemDisk::new(4096));
        let r = Region::new(m.clone(), 1024);
        r.write(512, &[7u8; 512]).unwrap();
        assert_eq!(m.read(1536, 512).unwrap(), vec![7u8; 512]);
    }

    /// A device whose I/O never completes until released.
    struct Hung(
        Arc<(Mutex<bool>, std::sync::Condvar)>,
        Arc<std::sync::atomic::AtomicUsize>,
    );

    impl RawFile for Hung {
        fn read_at(&self, _buf: &mut [u8], _offset: u64) -> std::io::Result<usize> {
            let (m, cv) = &*self.0;
            let mut g = m.lock().unwrap();
            while !*g {
                g = cv.wait(g).unwrap();
            }
            Ok(0)
        }

        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<usize> {
            let mut b = vec![0u8; buf.len()];
            self.read_at(&mut b, offset)?;
            self.1.fetch_add(1, Ordering::SeqCst);
            Ok(buf.len())
        }
    }

    #[test]
    fn a_hung_file_times_out_without_blocking_another() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let (tx, rx) = mpsc::channel::<Request>();
        let g2 = gate.clone();
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w2 = writes.clone();
        let worker = std::thread::spawn(move || io_thread(Hung(g2, w2), rx));
        let hung = DirectFile {
            path: PathBuf::from("hung"),
            direct: false,
            timeout: Duration::from_millis(200),
            tx: Mutex::new(tx),
        };
        let dir = tempfile::tempdir().unwrap();
        let good_path = dir.path().join("good");
        std::fs::write(&good_path, vec![0u8; 4096]).unwrap();
        let good = DirectFile::open(&good_path, Duration::from_secs(5)).unwrap();
        let start = std::time::Instant::now();
        assert!(matches!(hung.read(0, 512), Err(IoError::Timeout(_))));
        assert!(start.elapsed() < Duration::from_secs(3));
        // The next request queues behind the stuck one and times out too.
        assert!(matches!(hung.write(0, &[1u8; 512]), Err(IoError::Timeout(_))));
        // Another file is unaffected.
        good.write(0, &[3u8; 512]).unwrap();
        assert_eq!(good.read(0, 512).unwrap(), vec![3u8; 512]);
        // Once the device answers, the cancelled write is skipped, not performed late, and the
        // file works again.
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        assert_eq!(hung.read(0, 512).unwrap(), vec![0u8; 512]);
        assert_eq!(writes.load(Ordering::SeqCst), 0);
        drop(hung);
        worker.join().unwrap();
    }
}
