//! NBD as `qemu-nbd` serves it: the `qemu-nbd` process that exports a volume (with its backing
//! chain) on a Unix socket, and a client for the fixed-newstyle protocol.
//!
//! The node's image transfer service (`node::imageio`) reads and writes guest data through this
//! client, so an upload of raw data lands in a qcow2 volume (or a download collapses a chain)
//! with QEMU's own block layer doing the format work, as VDSM's `NBD.start_server` and
//! ovirt-imageio do.
//!
//! The client keeps one request in flight per connection; callers that want parallel I/O open
//! more connections (`qemu-nbd --shared`). It negotiates structured replies and the
//! `base:allocation` meta context, so [`NbdClient::extents`] reports holes and zero areas.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;

use crate::cmdline::ImageFormat;
use crate::tools::{QemuTool, ToolError};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERROR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;

const TX_READ_ONLY: u16 = 1 << 1;
const TX_SEND_FLUSH: u16 = 1 << 2;
const TX_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

const BASE_ALLOCATION: &str = "base:allocation";

/// Largest read or write payload per request: qemu-nbd refuses more than 32 MiB.
pub const MAX_IO: usize = 8 << 20;
/// Largest zero or block-status request (the protocol's lengths are 32-bit).
const MAX_RANGE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("cannot start qemu-nbd for {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-nbd for {path} exited before serving: {stderr}")]
    Exited { path: PathBuf, stderr: String },
    #[error("qemu-nbd for {path} did not open {socket} within {secs} s")]
    NoSocket {
        path: PathBuf,
        socket: PathBuf,
        secs: u64,
    },
    #[error("NBD connection to {socket}")]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD server at {socket} broke the protocol: {what}")]
    Protocol { socket: PathBuf, what: String },
    #[error("NBD server at {socket} refused option {option}: {message}")]
    Option {
        socket: PathBuf,
        option: u32,
        message: String,
    },
    #[error("NBD {command} at offset {offset} failed with errno {errno}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Command {
        command: &'static str,
        offset: u64,
        errno: u32,
        message: String,
    },
    #[error("NBD {command} of {length} bytes at offset {offset} is beyond the export's {size} bytes")]
    OutOfRange {
        command: &'static str,
        offset: u64,
        length: u64,
        size: u64,
    },
    #[error("the NBD export at {socket} is read-only")]
    ReadOnly { socket: PathBuf },
}

/// What `qemu-nbd` exports.
#[derive(Debug, Clone)]
pub struct NbdExport<'a> {
    /// The image; its backing chain is opened too (relative names resolve against its directory).
    pub path: &'a Path,
    pub format: ImageFormat,
    pub read_only: bool,
    /// Open with O_DIRECT (callers probe the file system, as for VM disks).
    pub direct_io: bool,
    /// Concurrent clients allowed.
    pub shared: u32,
}

/// A running `qemu-nbd`, killed when dropped (and, through `PR_SET_PDEATHSIG`, when the process
/// that started it dies: an orphan would keep the image's write lock).
#[derive(Debug)]
pub struct QemuNbd {
    child: tokio::process::Child,
    socket: PathBuf,
}

impl QemuNbd {
    /// Starts `qemu-nbd` on `socket` and waits until it accepts connections. Call it from an
    /// async task, not a blocking-pool thread: the parent-death signal follows the spawning
    /// thread.
    pub async fn start(socket: &Path, export: &NbdExport<'_>) -> Result<QemuNbd, NbdError> {
        let bin = QemuTool::Nbd.locate()?;
        let _ = std::fs::remove_file(socket);
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg(format!("--socket={}", socket.display()))
            .arg("--persistent")
            .arg(format!("--shared={}", export.shared.max(1)))
            .arg(format!("--format={}", export.format.driver()))
            .arg(if export.direct_io {
                "--cache=none"
            } else {
                "--cache=writeback"
            })
            .arg("--aio=threads")
            .arg("--discard=unmap")
            .arg("--detect-zeroes=unmap");
        if export.read_only {
            cmd.arg("--read-only");
        }
        cmd.arg(export.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| NbdError::Spawn {
            path: export.path.to_path_buf(),
            source,
        })?;
        let wait = Duration::from_secs(10);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(_status) = child.try_wait().map_err(|source| NbdError::Spawn {
                path: export.path.to_path_buf(),
                source,
            })? {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut stderr).await;
                }
                return Err(NbdError::Exited {
                    path: export.path.to_path_buf(),
                    stderr: stderr.trim().to_string(),
                });
            }
            // qemu-nbd listens before it opens the image, and exits when that fails: it
            // serves once it greets a client (`NBDMAGIC`), which it does only with the image
            // open. A probe that reads no greeting loops, and the exit check above tells.
            if let Ok(mut probe) = UnixStream::connect(socket).await {
                let mut magic = [0u8; 8];
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if let Ok(Ok(_)) = tokio::time::timeout(left, probe.read_exact(&mut magic)).await {
                    if &magic == b"NBDMAGIC" {
                        break;
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(NbdError::NoSocket {
                    path: export.path.to_path_buf(),
                    socket: socket.to_path_buf(),
                    secs: wait.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(QemuNbd {
            child,
            socket: socket.to_path_buf(),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stops the server (SIGTERM: qemu-nbd flushes and closes the image) and removes the socket.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling our own child by pid; it has not been reaped (we hold it).
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A run of the export with one allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    /// Reads as zeroes.
    pub zero: bool,
    /// Not allocated in the image (or its chain).
    pub hole: bool,
}

/// One NBD connection.
pub struct NbdClient {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: BufWriter<tokio::net::unix::OwnedWriteHalf>,
    socket: PathBuf,
    size: u64,
    tx_flags: u16,
    structured: bool,
    allocation_ctx: Option<u32>,
    cookie: u64,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("socket", &self.socket)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl NbdClient {
    /// Connects and negotiates the default export.
    pub async fn connect(socket: &Path) -> Result<NbdClient, NbdError> {
        let stream = UnixStream::connect(socket).await.map_err(|source| NbdError::Io {
            socket: socket.to_path_buf(),
            source,
        })?;
        let (r, w) = stream.into_split();
        let mut c = NbdClient {
            reader: BufReader::with_capacity(256 << 10, r),
            writer: BufWriter::with_capacity(256 << 10, w),
            socket: socket.to_path_buf(),
            size: 0,
            tx_flags: 0,
            structured: false,
            allocation_ctx: None,
            cookie: 0,
        };
        c.handshake().await?;
        Ok(c)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.tx_flags & TX_READ_ONLY != 0
    }

    fn io(&self, source: std::io::Error) -> NbdError {
        NbdError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    fn protocol(&self, what: impl Into<String>) -> NbdError {
        NbdError::Protocol {
            socket: self.socket.clone(),
            what: what.into(),
        }
    }

    async fn handshake(&mut self) -> Result<(), NbdError> {
        let magic = self.reader.read_u64().await.map_err(|e| self.io(e))?;
        let opt_magic = self.reader.read_u64().await.map_err(|e| self.io(e))?;
        if magic != NBDMAGIC || opt_magic != IHAVEOPT {
            return Err(self.protocol("not a fixed-newstyle NBD server"));
        }
        let server_flags = self.reader.read_u16().await.map_err(|e| self.io(e))?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol("the server does not offer fixed newstyle negotiation"));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
        self.writer
            .write_u32(client_flags)
            .await
            .map_err(|e| self.io(e))?;

        // Structured replies are what carry block status; a server without them still serves
        // reads and writes (extents then report the whole export as data).
        self.send_option(OPT_STRUCTURED_REPLY, &[]).await?;
        let (kind, _) = self.read_option_reply(OPT_STRUCTURED_REPLY).await?;
        self.structured = kind == REP_ACK;

        if self.structured {
            let mut data = Vec::new();
            data.extend_from_slice(&0u32.to_be_bytes()); // export name ""
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
            data.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.send_option(OPT_SET_META_CONTEXT, &data).await?;
            loop {
                let (kind, payload) = self.read_option_reply(OPT_SET_META_CONTEXT).await?;
                match kind {
                    REP_META_CONTEXT if payload.len() >= 4 => {
                        let id = u32::from_be_bytes(payload[..4].try_into().expect("4 bytes"));
                        if &payload[4..] == BASE_ALLOCATION.as_bytes() {
                            self.allocation_ctx = Some(id);
                        }
                    }
                    REP_ACK => break,
                    k if k & REP_ERROR_BIT != 0 => break,
                    k => return Err(self.protocol(format!("unexpected reply {k} to SET_META_CONTEXT"))),
                }
            }
        }

        let mut data = Vec::new();
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &data).await?;
        let mut got_export = false;
        loop {
            let (kind, payload) = self.read_option_reply(OPT_GO).await?;
            match kind {
                REP_INFO if payload.len() >= 2 => {
                    let info = u16::from_be_bytes([payload[0], payload[1]]);
                    if info == INFO_EXPORT && payload.len() >= 12 {
                        self.size = u64::from_be_bytes(payload[2..10].try_into().expect("8 bytes"));
                        self.tx_flags = u16::from_be_bytes([payload[10], payload[11]]);
                        got_export = true;
                    }
                }
                REP_ACK => break,
                k if k & REP_ERROR_BIT != 0 => {
                    return Err(NbdError::Option {
                        socket: self.socket.clone(),
                        option: OPT_GO,
                        message: String::from_utf8_lossy(&payload).into_owned(),
                    })
                }
                k => return Err(self.protocol(format!("unexpected reply {k} to GO"))),
            }
        }
        if !got_export {
            return Err(self.protocol("GO succeeded without the export's size"));
        }
        Ok(())
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.writer.write_all(&msg).await.map_err(|e| self.io(e))?;
        self.writer.flush().await.map_err(|e| self.io(e))
    }

    /// One option reply: its type and payload.
    async fn read_option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let magic = self.reader.read_u64().await.map_err(|e| self.io(e))?;
        let opt = self.reader.read_u32().await.map_err(|e| self.io(e))?;
        let kind = self.reader.read_u32().await.map_err(|e| self.io(e))?;
        let len = self.reader.read_u32().await.map_err(|e| self.io(e))?;
        if magic != OPT_REPLY_MAGIC || opt != option {
            return Err(self.protocol(format!("bad reply header to option {option}")));
        }
        if len > 1 << 20 {
            return Err(self.protocol(format!("option reply of {len} bytes")));
        }
        let mut payload = vec![0; len as usize];
        self.reader
            .read_exact(&mut payload)
            .await
            .map_err(|e| self.io(e))?;
        Ok((kind, payload))
    }

    async fn send_request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<u64, NbdError> {
        self.cookie = self.cookie.wrapping_add(1);
        let mut head = [0u8; 28];
        head[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        head[4..6].copy_from_slice(&flags.to_be_bytes());
        head[6..8].copy_from_slice(&command.to_be_bytes());
        head[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        head[16..24].copy_from_slice(&offset.to_be_bytes());
        head[24..28].copy_from_slice(&length.to_be_bytes());
        self.writer.write_all(&head).await.map_err(|e| self.io(e))?;
        if !payload.is_empty() {
            self.writer.write_all(payload).await.map_err(|e| self.io(e))?;
        }
        self.writer.flush().await.map_err(|e| self.io(e))?;
        Ok(self.cookie)
    }

    fn check_range(&self, command: &'static str, offset: u64, length: u64) -> Result<(), NbdError> {
        if offset.checked_add(length).is_none_or(|end| end > self.size) {
            return Err(NbdError::OutOfRange {
                command,
                offset,
                length,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Reads the reply (simple or every structured chunk) to request `cookie`. Read data goes
    /// into `buf` (at offsets relative to `base`); block status into `extents`.
    async fn read_reply(
        &mut self,
        command: &'static str,
        cookie: u64,
        base: u64,
        mut buf: Option<&mut [u8]>,
        mut extents: Option<&mut Vec<(u32, u32)>>,
    ) -> Result<(), NbdError> {
        loop {
            let magic = self.reader.read_u32().await.map_err(|e| self.io(e))?;
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let errno = self.reader.read_u32().await.map_err(|e| self.io(e))?;
                    let handle = self.reader.read_u64().await.map_err(|e| self.io(e))?;
                    if handle != cookie {
                        return Err(self.protocol(format!("reply for request {handle}, expected {cookie}")));
                    }
                    if errno != 0 {
                        return Err(NbdError::Command {
                            command,
                            offset: base,
                            errno,
                            message: String::new(),
                        });
                    }
                    if let Some(b) = buf.as_deref_mut() {
                        self.reader.read_exact(b).await.map_err(|e| self.io(e))?;
                    }
                    return Ok(());
                }
                STRUCTURED_REPLY_MAGIC => {
                    let flags = self.reader.read_u16().await.map_err(|e| self.io(e))?;
                    let kind = self.reader.read_u16().await.map_err(|e| self.io(e))?;
                    let handle = self.reader.read_u64().await.map_err(|e| self.io(e))?;
                    let len = self.reader.read_u32().await.map_err(|e| self.io(e))? as usize;
                    if handle != cookie {
                        return Err(self.protocol(format!("reply for request {handle}, expected {cookie}")));
                    }
                    match kind {
                        REPLY_TYPE_NONE => {}
                        REPLY_TYPE_OFFSET_DATA => {
                            let offset = self.reader.read_u64().await.map_err(|e| self.io(e))?;
                            let n = len
                                .checked_sub(8)
                                .ok_or_else(|| self.protocol("short OFFSET_DATA chunk"))?;
                            let b = buf
                                .as_deref_mut()
                                .ok_or_else(|| self.protocol("data for a request without any"))?;
                            let at = offset
                                .checked_sub(base)
                                .map(|a| a as usize)
                                .filter(|a| a + n <= b.len())
                                .ok_or_else(|| self.protocol("OFFSET_DATA outside the request"))?;
                            self.reader
                                .read_exact(&mut b[at..at + n])
                                .await
                                .map_err(|e| self.io(e))?;
                        }
                        REPLY_TYPE_OFFSET_HOLE => {
                            let offset = self.reader.read_u64().await.map_err(|e| self.io(e))?;
                            let n = self.reader.read_u32().await.map_err(|e| self.io(e))? as usize;
                            let b = buf
                                .as_deref_mut()
                                .ok_or_else(|| self.protocol("hole for a request without data"))?;
                            let at = offset
                                .checked_sub(base)
                                .map(|a| a as usize)
                                .filter(|a| a + n <= b.len())
                                .ok_or_else(|| self.protocol("OFFSET_HOLE outside the request"))?;
                            b[at..at + n].fill(0);
                        }
                        REPLY_TYPE_BLOCK_STATUS => {
                            if len < 4 || !(len - 4).is_multiple_of(8) {
                                return Err(self.protocol("malformed BLOCK_STATUS chunk"));
                            }
                            let ctx = self.reader.read_u32().await.map_err(|e| self.io(e))?;
                            for _ in 0..(len - 4) / 8 {
                                let l = self.reader.read_u32().await.map_err(|e| self.io(e))?;
                                let f = self.reader.read_u32().await.map_err(|e| self.io(e))?;
                                if Some(ctx) == self.allocation_ctx {
                                    if let Some(e) = extents.as_deref_mut() {
                                        e.push((l, f));
                                    }
                                }
                            }
                        }
                        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                            let mut payload = vec![0; len];
                            self.reader
                                .read_exact(&mut payload)
                                .await
                                .map_err(|e| self.io(e))?;
                            if payload.len() < 6 {
                                return Err(self.protocol("short error chunk"));
                            }
                            let errno = u32::from_be_bytes(payload[..4].try_into().expect("4 bytes"));
                            let mlen = u16::from_be_bytes([payload[4], payload[5]]) as usize;
                            let message = String::from_utf8_lossy(&payload[6..(6 + mlen).min(payload.len())])
                                .into_owned();
                            // Drain the remaining chunks of this reply before reporting.
                            if flags & REPLY_FLAG_DONE == 0 {
                                Box::pin(self.read_reply(command, cookie, base, None, None))
                                    .await
                                    .ok();
                            }
                            return Err(NbdError::Command {
                                command,
                                offset: base,
                                errno,
                                message,
                            });
                        }
                        k => {
                            // An unknown non-error chunk: skip it, as the protocol allows.
                            let mut skip = vec![0; len];
                            self.reader.read_exact(&mut skip).await.map_err(|e| self.io(e))?;
                            tracing::debug!(kind = k, "skipped an unknown NBD reply chunk");
                        }
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(());
                    }
                }
                m => return Err(self.protocol(format!("bad reply magic {m:#x}"))),
            }
        }
    }

    /// Fills `buf` from `offset`.
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.check_range("read", offset, buf.len() as u64)?;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_IO);
            let at = offset + done as u64;
            let cookie = self.send_request(CMD_READ, 0, at, n as u32, &[]).await?;
            self.read_reply("read", cookie, at, Some(&mut buf[done..done + n]), None)
                .await?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (not flushed: see [`NbdClient::flush`]).
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.check_range("write", offset, data.len() as u64)?;
        if self.read_only() {
            return Err(NbdError::ReadOnly {
                socket: self.socket.clone(),
            });
        }
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(MAX_IO);
            let at = offset + done as u64;
            let cookie = self
                .send_request(CMD_WRITE, 0, at, n as u32, &data[done..done + n])
                .await?;
            self.read_reply("write", cookie, at, None, None).await?;
            done += n;
        }
        Ok(())
    }

    /// Zeroes `length` bytes at `offset`; with `punch`, the area may become a hole (deallocated)
    /// rather than allocated zeroes.
    pub async fn zero(&mut self, offset: u64, length: u64, punch: bool) -> Result<(), NbdError> {
        self.check_range("zero", offset, length)?;
        if self.read_only() {
            return Err(NbdError::ReadOnly {
                socket: self.socket.clone(),
            });
        }
        if self.tx_flags & TX_SEND_WRITE_ZEROES == 0 {
            // The protocol's fallback: write zeroes as data.
            let zeroes = vec![0u8; MAX_IO.min(length as usize)];
            let mut done = 0;
            while done < length {
                let n = (length - done).min(zeroes.len() as u64) as usize;
                self.write(offset + done, &zeroes[..n]).await?;
                done += n as u64;
            }
            return Ok(());
        }
        let flags = if punch { 0 } else { CMD_FLAG_NO_HOLE };
        let mut done = 0;
        while done < length {
            let n = (length - done).min(MAX_RANGE);
            let at = offset + done;
            let cookie = self
                .send_request(CMD_WRITE_ZEROES, flags, at, n as u32, &[])
                .await?;
            self.read_reply("zero", cookie, at, None, None).await?;
            done += n;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub async fn flush(&mut self) -> Result<(), NbdError> {
        if self.tx_flags & TX_SEND_FLUSH == 0 {
            return Ok(());
        }
        let cookie = self.send_request(CMD_FLUSH, 0, 0, 0, &[]).await?;
        self.read_reply("flush", cookie, 0, None, None).await
    }

    /// Allocation of `[offset, offset + length)`, merged into maximal runs. Without the
    /// `base:allocation` context the whole range is one data extent.
    pub async fn extents(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>, NbdError> {
        self.check_range("block status", offset, length)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |e: Extent| match out.last_mut() {
            Some(l) if l.zero == e.zero && l.hole == e.hole && l.start + l.length == e.start => {
                l.length += e.length
            }
            _ => out.push(e),
        };
        let end = offset + length;
        let mut at = offset;
        if self.allocation_ctx.is_none() {
            if length > 0 {
                push(Extent {
                    start: offset,
                    length,
                    zero: false,
                    hole: false,
                });
            }
            return Ok(out);
        }
        while at < end {
            let n = (end - at).min(MAX_RANGE);
            let cookie = self.send_request(CMD_BLOCK_STATUS, 0, at, n as u32, &[]).await?;
            let mut got = Vec::new();
            self.read_reply("block status", cookie, at, None, Some(&mut got))
                .await?;
            if got.is_empty() {
                return Err(self.protocol(format!("no block status for offset {at}")));
            }
            for (l, f) in got {
                if at >= end || l == 0 {
                    break;
                }
                let l = u64::from(l).min(end - at);
                push(Extent {
                    start: at,
                    length: l,
                    zero: f & STATE_ZERO != 0,
                    hole: f & STATE_HOLE != 0,
                });
                at += l;
            }
        }
        Ok(out)
    }

    /// Ends the session politely (the server then closes the image cleanly).
    pub async fn disconnect(mut self) {
        let _ = self.send_request(CMD_DISC, 0, 0, 0, &[]).await;
        let _ = self.writer.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::img::{CreateRequest, QemuImg};

    fn qcow2(dir: &Path, size: u64) -> PathBuf {
        let path = dir.join("disk.qcow2");
        QemuImg::locate()
            .unwrap_or_else(|e| panic!("{e}"))
            .create(&CreateRequest {
                path: &path,
                format: ImageFormat::Qcow2,
                size: Some(size),
                qcow2_compat: Some("1.1"),
                backing: None,
                preallocation: None,
                unsafe_backing: false,
            })
            .unwrap_or_else(|e| panic!("{e}"));
        path
    }

    #[tokio::test]
    async fn reads_writes_zeroes_and_reports_extents_of_a_qcow2_volume() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 << 20;
        let path = qcow2(dir.path(), size);
        let sock = dir.path().join("nbd.sock");
        let server = QemuNbd::start(
            &sock,
            &NbdExport {
                path: &path,
                format: ImageFormat::Qcow2,
                read_only: false,
                direct_io: false,
                shared: 4,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let mut c = NbdClient::connect(server.socket()).await.unwrap();
        assert_eq!(c.size(), size);
        assert!(!c.read_only());
        // A fresh qcow2 is one hole that reads as zeroes.
        let e = c.extents(0, size).await.unwrap();
        assert_eq!(
            e,
            vec![Extent {
                start: 0,
                length: size,
                zero: true,
                hole: true
            }]
        );
        // Unaligned data across two MAX_IO chunks, then read back.
        let data: Vec<u8> = (0..(MAX_IO + 12345)).map(|i| (i % 251) as u8 + 1).collect();
        c.write(1 << 20, &data).await.unwrap();
        c.flush().await.unwrap();
        let mut back = vec![0u8; data.len()];
        c.read(1 << 20, &mut back).await.unwrap();
        assert!(back == data, "read back differs from what was written");
        let e = c.extents(0, size).await.unwrap();
        assert!(e[0].hole && e[0].start == 0 && e[0].length == 1 << 20, "{e:?}");
        assert!(!e[1].zero && !e[1].hole, "{e:?}");
        assert_eq!(e.iter().map(|x| x.length).sum::<u64>(), size);
        // Zeroing part of the data reads back zeroes.
        c.zero(2 << 20, 1 << 20, true).await.unwrap();
        let mut z = vec![1u8; 1 << 20];
        c.read(2 << 20, &mut z).await.unwrap();
        assert!(z.iter().all(|&b| b == 0));
        // Out of range is refused before anything is sent.
        let err = c.write(size - 10, &[0u8; 20]).await.unwrap_err();
        assert!(matches!(err, NbdError::OutOfRange { .. }), "{err}");
        c.disconnect().await;
        server.stop().await;
        assert!(!sock.exists());
        // qemu-img sees the data written through NBD.
        let map = QemuImg::locate().unwrap().map(&path, None).unwrap();
        assert!(map.iter().any(|m| m.data), "{map:?}");
    }

    #[tokio::test]
    async fn a_read_only_export_refuses_writes_and_a_bad_image_reports_qemu_nbds_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = qcow2(dir.path(), 1 << 20);
        let sock = dir.path().join("ro.sock");
        let server = QemuNbd::start(
            &sock,
            &NbdExport {
                path: &path,
                format: ImageFormat::Qcow2,
                read_only: true,
                direct_io: false,
                shared: 1,
            },
        )
        .await
        .unwrap();
        let mut c = NbdClient::connect(&sock).await.unwrap();
        assert!(c.read_only());
        let err = c.write(0, b"x").await.unwrap_err();
        assert!(matches!(err, NbdError::ReadOnly { .. }), "{err}");
        drop(c);
        server.stop().await;

        let bad = dir.path().join("missing.qcow2");
        let err = QemuNbd::start(
            &dir.path().join("bad.sock"),
            &NbdExport {
                path: &bad,
                format: ImageFormat::Qcow2,
                read_only: true,
                direct_io: false,
                shared: 1,
            },
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, NbdError::Exited { .. }), "{msg}");
        assert!(msg.contains("missing.qcow2"), "{msg}");
    }
}
