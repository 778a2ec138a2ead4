//! `FaultFs`: a FUSE pass-through file system over a real directory whose I/O can be made to
//! fail, standing in for an NFS server that goes away and comes back.
//!
//! Why: a storage outage is the one storage fault a VM host must live through, and this kernel
//! has neither device-mapper error targets nor an NFS client. A FUSE mount is a real file system
//! in the kernel's VFS: QEMU, the lease code and the domain monitor see real `EIO`s from real
//! system calls, exactly as they would from a dead mount. Nothing is faked above the VFS.
//!
//! Design: the low-level FUSE protocol over an inode table that keeps an `O_PATH` descriptor per
//! inode (as libfuse's `passthrough_ll` does), so renames and hard links need no path
//! bookkeeping; every operation is the same system call on the backing file. Open files are
//! served with `FOPEN_DIRECT_IO`: nothing is cached in the kernel above us, so a failure shows
//! at once and data written through one node is what the next reads.
//!
//! While [`FaultFs::fail`] is on, every operation that would touch the backing storage answers
//! `EIO`; forgetting inodes and closing handles still work, so the mount recovers cleanly.
//! Mounting needs root (`mount(2)` of type `fuse`, no `fusermount`); dropping the handle
//! unmounts (lazily, so open files of a leaked process cannot keep it busy).

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

/// Attributes and entries are not cached by the kernel: every lookup reaches us (and can fail).
const TTL: Duration = Duration::ZERO;

/// A mounted fault-injecting pass-through of `backing` at `mountpoint`.
pub struct FaultFs {
    mountpoint: PathBuf,
    failing: Arc<AtomicBool>,
    fault: Arc<Mutex<Option<Fault>>>,
    failed_ops: Arc<AtomicU64>,
    session: Option<BackgroundSession>,
}

impl FaultFs {
    /// Mounts `backing` at `mountpoint` (both existing directories). Panics with the reason when
    /// the mount fails: the tests that use it cannot run without it.
    pub fn mount(backing: &Path, mountpoint: &Path) -> FaultFs {
        assert!(
            Path::new("/dev/fuse").exists(),
            "FaultFs needs /dev/fuse (the fuse kernel module)"
        );
        let root = open_path(backing).unwrap_or_else(|e| panic!("open {}: {e}", backing.display()));
        let failing = Arc::new(AtomicBool::new(false));
        let failed_ops = Arc::new(AtomicU64::new(0));
        let fault = Arc::new(Mutex::new(None));
        let fs = PassThrough {
            inodes: Mutex::new(Inodes::new(root)),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            failing: failing.clone(),
            fault: fault.clone(),
            failed_ops: failed_ops.clone(),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![fuser::MountOption::FSName("oxvirt-faultfs".into())];
        config.acl = fuser::SessionACL::All;
        // QEMU, the lease renewer and the monitor of several nodes at once: one slow request
        // must not hold up the others.
        config.n_threads = Some(4);
        let session = fuser::spawn_mount(fs, mountpoint, &config).unwrap_or_else(|e| {
            panic!(
                "FaultFs: mounting fuse at {} failed: {e} (needs root)",
                mountpoint.display()
            )
        });
        FaultFs {
            mountpoint: mountpoint.to_path_buf(),
            failing,
            fault,
            failed_ops,
            session: Some(session),
        }
    }

    /// Turns the outage on or off: everything fails with `EIO`.
    pub fn fail(&self, on: bool) {
        self.set(on.then_some(Fault {
            kind: FaultKind::Io,
            under: None,
        }));
    }

    /// Makes only what lies under a directory named `dir` fail with `EIO` (a bad region of the
    /// storage: e.g. `images`, while `dom_md` with the leases and metadata still works).
    pub fn fail_under(&self, dir: &str) {
        self.set(Some(Fault {
            kind: FaultKind::Io,
            under: Some(dir.to_string()),
        }));
    }

    /// Makes every write under a directory named `dir` fail with `ENOSPC` while reads work: an
    /// export on an exhausted thin-provisioned pool, which refuses even overwrites.
    pub fn full_under(&self, dir: &str) {
        self.set(Some(Fault {
            kind: FaultKind::Full,
            under: Some(dir.to_string()),
        }));
    }

    fn set(&self, f: Option<Fault>) {
        let on = f.is_some();
        *self.fault.lock().expect("fault") = f;
        self.failing.store(on, Ordering::SeqCst);
    }

    /// How many operations answered `EIO` because of [`FaultFs::fail`].
    pub fn failed_ops(&self) -> u64 {
        self.failed_ops.load(Ordering::Relaxed)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        self.fail(false);
        if let Ok(c) = CString::new(self.mountpoint.as_os_str().as_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        drop(self.session.take());
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    /// Every operation answers `EIO`.
    Io,
    /// Operations that write answer `ENOSPC`.
    Full,
}

#[derive(Debug, Clone)]
struct Fault {
    kind: FaultKind,
    /// Only paths with a directory of this name fail; `None`: all.
    under: Option<String>,
}

struct Inode {
    fd: OwnedFd,
    /// The backing file's (device, inode): one FUSE inode per backing inode.
    key: (u64, u64),
    lookups: u64,
}

struct Inodes {
    by_ino: HashMap<u64, Inode>,
    by_key: HashMap<(u64, u64), u64>,
    next: u64,
}

impl Inodes {
    fn new(root: OwnedFd) -> Inodes {
        let st = fstat(&root).expect("stat the backing root");
        let key = (st.st_dev, st.st_ino);
        let mut by_ino = HashMap::new();
        by_ino.insert(
            1,
            Inode {
                fd: root,
                key,
                lookups: 1,
            },
        );
        Inodes {
            by_ino,
            by_key: HashMap::from([(key, 1)]),
            next: 2,
        }
    }

    fn raw(&self, ino: INodeNo) -> Result<i32, Errno> {
        self.by_ino
            .get(&ino.0)
            .map(|i| i.fd.as_raw_fd())
            .ok_or(Errno::ENOENT)
    }

    /// Registers one more lookup of the backing file open as `fd` (stat `st`); returns its ino.
    fn remember(&mut self, fd: OwnedFd, st: &libc::stat) -> u64 {
        let key = (st.st_dev, st.st_ino);
        if let Some(ino) = self.by_key.get(&key) {
            let i = self.by_ino.get_mut(ino).expect("inode tables agree");
            i.lookups += 1;
            return *ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_key.insert(key, ino);
        self.by_ino.insert(ino, Inode { fd, key, lookups: 1 });
        ino
    }

    fn forget(&mut self, ino: u64, n: u64) {
        if ino == 1 {
            return;
        }
        if let Some(i) = self.by_ino.get_mut(&ino) {
            i.lookups = i.lookups.saturating_sub(n);
            if i.lookups == 0 {
                let key = i.key;
                self.by_ino.remove(&ino);
                self.by_key.remove(&key);
            }
        }
    }
}

struct PassThrough {
    inodes: Mutex<Inodes>,
    /// Open files and directories by handle.
    handles: Mutex<HashMap<u64, Arc<File>>>,
    next_fh: AtomicU64,
    /// Set while `fault` is: the fast path of every operation.
    failing: Arc<AtomicBool>,
    fault: Arc<Mutex<Option<Fault>>>,
    failed_ops: Arc<AtomicU64>,
}

fn errno() -> Errno {
    Errno::from(std::io::Error::last_os_error())
}

fn cstr(name: &OsStr) -> Result<CString, Errno> {
    CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

fn check(r: libc::c_int) -> Result<libc::c_int, Errno> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

fn open_path(p: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(p.as_os_str().as_bytes())?;
    // SAFETY: valid path; the returned descriptor is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd) -> Result<libc::stat, Errno> {
    stat_raw(fd.as_raw_fd())
}

fn stat_raw(fd: i32) -> Result<libc::stat, Errno> {
    // SAFETY: a zeroed stat is a valid out-parameter; the empty path with AT_EMPTY_PATH stats `fd`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let empty = c"";
    check(unsafe {
        libc::fstatat(
            fd,
            empty.as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// `/proc/self/fd/N`: how an `O_PATH` descriptor is opened for I/O or changed by path.
fn proc_path(fd: i32) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL")
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn attr(ino: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn to_timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            }
        }
    }
}

/// What a `setattr` asks to change.
struct Changes {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
    fh: Option<FileHandle>,
}

impl PassThrough {
    /// The error an operation (one that `writes` or not) on the backing file open as `fd`
    /// gets from the fault in force, if any.
    fn gate_fd(&self, fd: i32, writes: bool) -> Result<(), Errno> {
        if !self.failing.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(f) = self.fault.lock().expect("fault").clone() else {
            return Ok(());
        };
        let err = match f.kind {
            FaultKind::Io => Errno::EIO,
            FaultKind::Full if writes => Errno::ENOSPC,
            FaultKind::Full => return Ok(()),
        };
        let covered = match f.under.as_deref() {
            None => true,
            Some(dir) => std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map(|p| p.components().any(|c| c.as_os_str() == dir))
                .unwrap_or(true),
        };
        if covered {
            self.failed_ops.fetch_add(1, Ordering::Relaxed);
            return Err(err);
        }
        Ok(())
    }

    fn gate(&self, ino: INodeNo) -> Result<(), Errno> {
        self.gate_fd(self.parent_fd(ino)?, false)
    }

    fn gate_write(&self, ino: INodeNo) -> Result<(), Errno> {
        self.gate_fd(self.parent_fd(ino)?, true)
    }

    fn gate_fh(&self, fh: FileHandle) -> Result<(), Errno> {
        self.gate_fd(self.handle(fh)?.as_raw_fd(), false)
    }

    fn gate_fh_write(&self, fh: FileHandle) -> Result<(), Errno> {
        self.gate_fd(self.handle(fh)?.as_raw_fd(), true)
    }

    fn parent_fd(&self, ino: INodeNo) -> Result<i32, Errno> {
        self.inodes.lock().expect("inodes").raw(ino)
    }

    /// Looks `name` up in `parent` and registers the result.
    fn entry(&self, parent: INodeNo, name: &CStr) -> Result<FileAttr, Errno> {
        let pfd = self.parent_fd(parent)?;
        // SAFETY: valid descriptor and name; the result is owned below.
        let fd = check(unsafe {
            libc::openat(
                pfd,
                name.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = fstat(&fd)?;
        let ino = self.inodes.lock().expect("inodes").remember(fd, &st);
        Ok(attr(ino, &st))
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        self.handles
            .lock()
            .expect("handles")
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn add_handle(&self, fd: OwnedFd) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .expect("handles")
            .insert(fh, Arc::new(File::from(fd)));
        FileHandle(fh)
    }

    /// Opens inode `ino` for I/O with `flags` (never `O_DIRECT`: our buffers are not aligned,
    /// and the kernel above us does not cache anyway).
    fn open_ino(&self, ino: INodeNo, flags: i32) -> Result<OwnedFd, Errno> {
        let fd = self.parent_fd(ino)?;
        let flags =
            (flags & !(libc::O_DIRECT | libc::O_NOFOLLOW | libc::O_CREAT | libc::O_EXCL)) | libc::O_CLOEXEC;
        let p = proc_path(fd);
        // SAFETY: valid path; the result is owned below.
        let fd = check(unsafe { libc::open(p.as_ptr(), flags) })?;
        // SAFETY: fresh descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn do_setattr(&self, ino: INodeNo, c: Changes) -> Result<FileAttr, Errno> {
        let Changes {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh,
        } = c;
        self.gate(ino)?;
        let fd = self.parent_fd(ino)?;
        let p = proc_path(fd);
        if let Some(mode) = mode {
            // SAFETY: valid path.
            check(unsafe { libc::chmod(p.as_ptr(), mode) })?;
        }
        if uid.is_some() || gid.is_some() {
            let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
            // SAFETY: the empty path with AT_EMPTY_PATH changes `fd` itself.
            check(unsafe {
                libc::fchownat(
                    fd,
                    c"".as_ptr(),
                    u,
                    g,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if let Some(size) = size {
            match fh.map(|h| self.handle(h)) {
                Some(Ok(h)) => h.set_len(size).map_err(Errno::from)?,
                // SAFETY: valid path.
                _ => {
                    check(unsafe { libc::truncate(p.as_ptr(), size as i64) })?;
                }
            };
        }
        if atime.is_some() || mtime.is_some() {
            let times = [to_timespec(atime), to_timespec(mtime)];
            // SAFETY: valid path and two timespecs.
            check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) })?;
        }
        Ok(attr(ino.0, &stat_raw(fd)?))
    }
}

impl Filesystem for PassThrough {
    fn init(&mut self, _req: &Request, _config: &mut KernelConfig) -> std::io::Result<()> {
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.gate(parent).and_then(|_| self.entry(parent, &cstr(name)?));
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.lock().expect("inodes").forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self.gate(ino).and_then(|_| stat_raw(self.parent_fd(ino)?));
        match r {
            Ok(st) => reply.attr(&TTL, &attr(ino.0, &st)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let c = Changes {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh,
        };
        match self.do_setattr(ino, c) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.gate(ino).and_then(|_| {
            let fd = self.parent_fd(ino)?;
            let mut buf = vec![0u8; libc::PATH_MAX as usize];
            // SAFETY: the buffer is as long as we say.
            let n = unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                return Err(errno());
            }
            buf.truncate(n as usize);
            Ok(buf)
        });
        match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let r = self.gate_write(parent).and_then(|_| {
            let (pfd, c) = (self.parent_fd(parent)?, cstr(name)?);
            // SAFETY: valid descriptor and name.
            check(unsafe { libc::mkdirat(pfd, c.as_ptr(), mode & !umask) })?;
            self.entry(parent, &c)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.gate(parent).and_then(|_| {
            let (pfd, c) = (self.parent_fd(parent)?, cstr(name)?);
            // SAFETY: valid descriptor and name.
            check(unsafe { libc::unlinkat(pfd, c.as_ptr(), 0) })
        });
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.gate(parent).and_then(|_| {
            let (pfd, c) = (self.parent_fd(parent)?, cstr(name)?);
            // SAFETY: valid descriptor and name.
            check(unsafe { libc::unlinkat(pfd, c.as_ptr(), libc::AT_REMOVEDIR) })
        });
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let r = self.gate_write(parent).and_then(|_| {
            let (pfd, c) = (self.parent_fd(parent)?, cstr(link_name)?);
            let t = cstr(target.as_os_str())?;
            // SAFETY: valid descriptor and names.
            check(unsafe { libc::symlinkat(t.as_ptr(), pfd, c.as_ptr()) })?;
            self.entry(parent, &c)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.gate(parent).and_then(|_| {
            let (pfd, c) = (self.parent_fd(parent)?, cstr(name)?);
            let (nfd, n) = (self.parent_fd(newparent)?, cstr(newname)?);
            // SAFETY: valid descriptors and names.
            check(unsafe { libc::renameat2(pfd, c.as_ptr(), nfd, n.as_ptr(), flags.bits()) })
        });
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let r = self.gate_write(newparent).and_then(|_| {
            let fd = self.parent_fd(ino)?;
            let (nfd, n) = (self.parent_fd(newparent)?, cstr(newname)?);
            let p = proc_path(fd);
            // SAFETY: valid paths and descriptor.
            check(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    nfd,
                    n.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })?;
            self.entry(newparent, &n)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.gate(ino).and_then(|_| self.open_ino(ino, flags.0));
        match r {
            Ok(fd) => reply.opened(self.add_handle(fd), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.gate_fh(fh).and_then(|_| {
            let h = self.handle(fh)?;
            let mut buf = vec![0u8; size as usize];
            let mut done = 0usize;
            // Whole requests, short only at the end of the file.
            while done < buf.len() {
                match h
                    .read_at(&mut buf[done..], offset + done as u64)
                    .map_err(Errno::from)?
                {
                    0 => break,
                    n => done += n,
                }
            }
            buf.truncate(done);
            Ok(buf)
        });
        match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.gate_fh_write(fh).and_then(|_| {
            let h = self.handle(fh)?;
            h.write_all_at(data, offset).map_err(Errno::from)?;
            Ok(data.len() as u32)
        });
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().expect("handles").remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let r = self.gate_fh(fh).and_then(|_| {
            let h = self.handle(fh)?;
            if datasync { h.sync_data() } else { h.sync_all() }.map_err(Errno::from)
        });
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = self
            .gate(ino)
            .and_then(|_| self.open_ino(ino, libc::O_RDONLY | libc::O_DIRECTORY));
        match r {
            Ok(fd) => reply.opened(self.add_handle(fd), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let r = self.gate_fh(fh).and_then(|_| {
            let h = self.handle(fh)?;
            // Listed afresh on each call (directories here are small); `offset` is the index
            // of the next entry.
            let dir = std::fs::read_dir(format!("/proc/self/fd/{}", h.as_raw_fd())).map_err(Errno::from)?;
            let mut entries: Vec<(u64, FileType, std::ffi::OsString)> = vec![
                (ino.0, FileType::Directory, ".".into()),
                (ino.0, FileType::Directory, "..".into()),
            ];
            for e in dir.flatten() {
                let k = e.file_type().ok().and_then(FileType::from_std);
                // The kernel looks each name up before use: the ino here is informational.
                entries.push((u64::MAX, k.unwrap_or(FileType::RegularFile), e.file_name()));
            }
            Ok(entries)
        });
        match r {
            Ok(entries) => {
                for (i, (ino, k, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(ino), i as u64 + 1, k, &name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().expect("handles").remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let r = self
            .gate_fh(fh)
            .and_then(|_| self.handle(fh)?.sync_all().map_err(Errno::from));
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let r = self.gate(ino).and_then(|_| {
            let fd = self.parent_fd(ino)?;
            let p = proc_path(fd);
            // SAFETY: a zeroed statvfs is a valid out-parameter.
            let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
            check(unsafe { libc::statvfs(p.as_ptr(), &mut s) })?;
            Ok(s)
        });
        match r {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.gate_write(parent).and_then(|_| {
            let (pfd, c) = (self.parent_fd(parent)?, cstr(name)?);
            let flags = (flags & !(libc::O_DIRECT | libc::O_NOFOLLOW)) | libc::O_CREAT | libc::O_CLOEXEC;
            // SAFETY: valid descriptor and name; the result is owned below.
            let fd = check(unsafe { libc::openat(pfd, c.as_ptr(), flags, mode & !umask) })?;
            // SAFETY: fresh descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let a = self.entry(parent, &c)?;
            Ok((a, self.add_handle(fd)))
        });
        match r {
            Ok((a, fh)) => reply.created(&TTL, &a, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.gate_fh_write(fh).and_then(|_| {
            let h = self.handle(fh)?;
            // SAFETY: an open descriptor.
            check(unsafe { libc::fallocate(h.as_raw_fd(), mode, offset as i64, length as i64) })
        });
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_through_and_fails_on_demand() {
        let backing = tempfile_dir("backing");
        let mnt = tempfile_dir("mnt");
        let fs = FaultFs::mount(&backing, &mnt);
        std::fs::create_dir(mnt.join("d")).unwrap();
        std::fs::write(mnt.join("d/a"), b"hello").unwrap();
        std::fs::hard_link(mnt.join("d/a"), mnt.join("d/b")).unwrap();
        std::fs::rename(mnt.join("d/a"), mnt.join("c")).unwrap();
        assert_eq!(std::fs::read(backing.join("c")).unwrap(), b"hello");
        assert_eq!(std::fs::read(mnt.join("d/b")).unwrap(), b"hello");
        let mut names: Vec<_> = std::fs::read_dir(&mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["c", "d"]);
        // O_DIRECT opens work, as QEMU's cache=none and the lease code need.
        {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(mnt.join("c"));
            assert!(f.is_ok(), "O_DIRECT open: {f:?}");
        }
        let f = std::fs::File::open(mnt.join("c")).unwrap();
        fs.fail(true);
        let err = std::fs::read(mnt.join("c")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        let mut buf = [0u8; 5];
        let err = std::os::unix::fs::FileExt::read_at(&f, &mut buf, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "an open file fails too");
        assert!(fs.failed_ops() >= 2);
        fs.fail(false);
        std::os::unix::fs::FileExt::read_at(&f, &mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello", "the same open file works again");
        // A bad region: only what lies under `d` fails.
        fs.fail_under("d");
        assert_eq!(std::fs::read(mnt.join("c")).unwrap(), b"hello");
        let err = std::fs::read(mnt.join("d/b")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        // Full: under `d` writes fail with ENOSPC, reads work.
        // (d/b is a hard link to c, whose inode was first met as c: use a file of d's own.)
        fs.fail(false);
        std::fs::write(mnt.join("d/f"), b"f").unwrap();
        fs.full_under("d");
        assert_eq!(std::fs::read(mnt.join("d/f")).unwrap(), b"f");
        let err = std::fs::write(mnt.join("d/f"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        let err = std::fs::write(mnt.join("d/new"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        std::fs::write(mnt.join("e"), b"elsewhere").unwrap();
        fs.fail(false);
        assert_eq!(std::fs::read(mnt.join("d/b")).unwrap(), b"hello");
        drop(f);
        drop(fs);
        assert!(
            std::fs::read_dir(&mnt).unwrap().next().is_none(),
            "unmounted: the mount point is empty again"
        );
    }

    fn tempfile_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "oxvirt-faultfs-{}-{}-{name}",
            std::process::id(),
            SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
