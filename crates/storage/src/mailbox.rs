//! The pool's mailbox on the master domain, in VDSM's format: how HSM hosts ask the SPM to
//! extend a volume and how the SPM answers, with nothing shared but two files.
//!
//! # Format (VDSM `mailbox.py`)
//!
//! `dom_md/inbox` holds requests (HSM → SPM), `dom_md/outbox` replies (SPM → HSM); each file
//! gives host `h` (1..=250) the 4 KiB mailbox at offset `h * 4096`: 64 slots of 64 bytes, 63
//! for messages and the last one ending in a checksum — the sum of bytes 0..4092 as a 32-bit
//! little-endian integer. An all-zero mailbox is empty. Host 0's mailbox in `inbox` is the
//! **event block**: `"\0evt"` followed by a random 16-byte UUID that an HSM rewrites after
//! every mailbox write.
//!
//! An extend message is `"1"` (version) `"xtnd"`, the sdUUID and volUUID packed as 16-byte
//! little-endian integers, the new size in MiB as 16 lower-case hex digits, padded with `'0'`
//! to 64 bytes. The reply to a request sits in the same slot of the outbox: the request echoed
//! (success) or the same with size 0 (failure). A slot is recycled by a handshake: the HSM
//! writes `CLEAN` (64 bytes of 0x01) over its request once it has the reply, the SPM echoes
//! `CLEAN` into the outbox, and the HSM then zeroes the slot.
//!
//! # Latency by design (target: median request→reply < 250 ms)
//!
//! VDSM took 2-6 s (the SPM read every mailbox every 2 s) and 0.8-1.4 s once it added the
//! event block (checked every 0.5 s) and the HSM polled for the reply every 0.5 s. There is no
//! channel between hosts but storage, so someone must poll; the design keeps polling cheap and
//! concentrated where it matters:
//! - **SPM, idle**: reads only the 512-byte event block every `event_interval` (100 ms: ten
//!   small reads a second, on one host of the data center) and the whole inbox every
//!   `monitor_interval` (2 s) as a fallback for lost events (VDSM hosts write no events when
//!   configured without them).
//! - **SPM, on an event**: reads the inbox at once, runs the extends (each a fast file
//!   operation on a file domain), writes each host's reply mailbox right after, and looks at
//!   the event block again *immediately* — back-to-back requests are not rate-limited by the
//!   poll interval.
//! - **HSM**: writes its mailbox and then the event block the moment a request is queued; it
//!   polls its own 4 KiB of the outbox every `reply_poll` (25 ms) **only while a request is
//!   outstanding**; an idle HSM does no mailbox I/O at all.
//!
//! Expected request→reply: HSM write (~1 ms) + half an event interval (50 ms) + extend and
//! reply (a few ms) + half a reply poll (12 ms): about 70 ms, with the tail bounded by
//! `event_interval + reply_poll` plus I/O. Measured figures are in BENCHMARKS.md.
//!
//! # Reliability
//! - **Retries**: a request with no reply after `extend_timeout` (2 s) moves to another free
//!   slot (the old one is zeroed). Moving, not rewriting, matters: the SPM only acts on slots
//!   whose bytes changed since its last read. Extends are idempotent (grow to at least), so a
//!   request served twice does no harm.
//! - **Checksums**: the SPM verifies a host's mailbox before reading any message in it; the
//!   HSM verifies replies sealed by oxvirt (VDSM leaves the outbox unsealed: a zero checksum
//!   is accepted). A corrupt mailbox is ignored and **reported once** per distinct content, so
//!   a host that keeps writing garbage does not flood the log (VDSM issue #205).
//! - **Takeover**: a new SPM starts with an empty view, clears the outbox and so treats every
//!   pending request as new; HSMs need not resend.
//!
//! Invariants: only the SPM writes the outbox, only host `h` writes mailbox `h` of the inbox;
//! all mailbox I/O is `O_DIRECT` of whole 4 KiB mailboxes (the event block: one sector), so
//! the page cache never hides another host's write. The pure codecs and slot state machines
//! ([`HsmSlots`], [`SpmView`]) take time as a parameter and are tested with simulated time;
//! the threads ([`HsmMailbox`], [`SpmMailbox`]) are thin I/O loops around them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use oxvirt_lease::io::{DirectFile, SectorIo};
use oxvirt_lease::Clock;
use oxvirt_types::{SdUuid, VolUuid};
use uuid::Uuid;

pub const MAILBOX_SIZE: usize = 4096;
pub const MESSAGE_SIZE: usize = 64;
pub const SLOTS_PER_MAILBOX: usize = MAILBOX_SIZE / MESSAGE_SIZE;
/// The last slot holds the checksum.
pub const MESSAGES_PER_MAILBOX: usize = SLOTS_PER_MAILBOX - 1;
pub const CHECKSUM_BYTES: usize = 4;
/// VDSM's largest host id with a mailbox.
pub const MAX_HOST_ID: u64 = 250;
pub const MESSAGE_VERSION: u8 = b'1';
pub const EXTEND_CODE: &[u8; 4] = b"xtnd";
pub const EVENT_CODE: &[u8; 4] = b"\0evt";
pub const CLEAN_MESSAGE: [u8; MESSAGE_SIZE] = [1; MESSAGE_SIZE];
/// Largest size a message carries (VDSM's `VOLUME_MAX_SIZE`, in MiB).
pub const MAX_SIZE_MIB: u64 = 0xFFFF_FFFF;
/// Bytes before the size field: version, code, two packed UUIDs.
const SIZE_OFFSET: usize = 5 + 16 + 16;
const SIZE_CHARS: usize = 16;
/// The event block is read as one sector.
const EVENT_READ: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailboxError {
    #[error("mailbox message has version {0:#04x}, expected '1'")]
    Version(u8),
    #[error("mailbox message has unknown code {0:?}")]
    Code(String),
    #[error("mailbox message size field {0:?} is not hexadecimal")]
    Size(String),
    #[error("size {0} MiB is larger than a mailbox message can carry")]
    TooLarge(u64),
    #[error("host id {0} has no mailbox (1..={MAX_HOST_ID})")]
    HostId(u64),
    #[error("all {MESSAGES_PER_MAILBOX} mailbox slots of host {0} are in use")]
    Full(u64),
    #[error("cannot open mailbox file {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("the mailbox was stopped")]
    Stopped,
    #[error("no reply from the SPM within {0:?}")]
    Timeout(Duration),
}

/// The sum of the bytes, truncated to 32 bits (VDSM's `checksum`).
pub fn checksum(data: &[u8]) -> u32 {
    data.iter().fold(0u32, |s, b| s.wrapping_add(u32::from(*b)))
}

/// VDSM's packed UUID: the 128-bit value, little-endian.
pub fn pack_uuid(u: &Uuid) -> [u8; 16] {
    let mut b = *u.as_bytes();
    b.reverse();
    b
}

pub fn unpack_uuid(b: &[u8]) -> Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    a.reverse();
    Uuid::from_bytes(a)
}

/// "Make volume `vol` of domain `sd` at least `size_mib` MiB."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExtendMessage {
    pub sd: SdUuid,
    pub vol: VolUuid,
    pub size_mib: u64,
}

impl ExtendMessage {
    pub fn new(sd: SdUuid, vol: VolUuid, size_mib: u64) -> Result<ExtendMessage, MailboxError> {
        if size_mib > MAX_SIZE_MIB {
            return Err(MailboxError::TooLarge(size_mib));
        }
        Ok(ExtendMessage { sd, vol, size_mib })
    }

    /// The smallest MiB count covering `bytes`.
    pub fn mib_for(bytes: u64) -> u64 {
        bytes.div_ceil(1 << 20)
    }

    pub fn encode(&self) -> [u8; MESSAGE_SIZE] {
        let mut m = [b'0'; MESSAGE_SIZE];
        m[0] = MESSAGE_VERSION;
        m[1..5].copy_from_slice(EXTEND_CODE);
        m[5..21].copy_from_slice(&pack_uuid(self.sd.as_uuid()));
        m[21..37].copy_from_slice(&pack_uuid(self.vol.as_uuid()));
        let size = format!("{:0width$x}", self.size_mib, width = SIZE_CHARS);
        m[SIZE_OFFSET..SIZE_OFFSET + SIZE_CHARS].copy_from_slice(size.as_bytes());
        m
    }

    pub fn decode(m: &[u8]) -> Result<ExtendMessage, MailboxError> {
        if m[0] != MESSAGE_VERSION {
            return Err(MailboxError::Version(m[0]));
        }
        if &m[1..5] != EXTEND_CODE {
            return Err(MailboxError::Code(String::from_utf8_lossy(&m[1..5]).into_owned()));
        }
        let field = &m[SIZE_OFFSET..SIZE_OFFSET + SIZE_CHARS];
        let text = std::str::from_utf8(field)
            .map_err(|_| MailboxError::Size(String::from_utf8_lossy(field).into()))?;
        let size_mib = u64::from_str_radix(text, 16).map_err(|_| MailboxError::Size(text.to_string()))?;
        Ok(ExtendMessage {
            sd: SdUuid::from_uuid(unpack_uuid(&m[5..21])),
            vol: VolUuid::from_uuid(unpack_uuid(&m[21..37])),
            size_mib,
        })
    }

    /// The reply: this message, or the same with size 0 when the extend failed.
    pub fn reply(&self, ok: bool) -> [u8; MESSAGE_SIZE] {
        let mut r = *self;
        if !ok {
            r.size_mib = 0;
        }
        r.encode()
    }

    /// True if `reply` answers this request (same version, code, domain and volume).
    pub fn answered_by(&self, reply: &[u8]) -> bool {
        reply[..SIZE_OFFSET] == self.encode()[..SIZE_OFFSET]
    }
}

/// Writes the checksum into the last 4 bytes of a mailbox.
pub fn seal(mailbox: &mut [u8]) {
    let c = checksum(&mailbox[..MAILBOX_SIZE - CHECKSUM_BYTES]);
    mailbox[MAILBOX_SIZE - CHECKSUM_BYTES..MAILBOX_SIZE].copy_from_slice(&c.to_le_bytes());
}

/// What a mailbox's checksum says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seal {
    /// Every byte is zero.
    Empty,
    Valid,
    /// No checksum written (VDSM's outbox): accepted.
    Unsealed,
    Corrupt {
        declared: u32,
        computed: u32,
    },
}

pub fn verify(mailbox: &[u8], allow_unsealed: bool) -> Seal {
    let body = &mailbox[..MAILBOX_SIZE - CHECKSUM_BYTES];
    let declared = u32::from_le_bytes(
        mailbox[MAILBOX_SIZE - CHECKSUM_BYTES..MAILBOX_SIZE]
            .try_into()
            .expect("4 bytes"),
    );
    let computed = checksum(body);
    if declared == 0 && computed == 0 {
        Seal::Empty
    } else if declared == computed {
        Seal::Valid
    } else if declared == 0 && allow_unsealed {
        Seal::Unsealed
    } else {
        Seal::Corrupt { declared, computed }
    }
}

/// The event block an HSM writes after changing its mailbox.
pub fn event_block(event: Uuid) -> Vec<u8> {
    let mut b = vec![0u8; MAILBOX_SIZE];
    b[0..4].copy_from_slice(EVENT_CODE);
    b[4..20].copy_from_slice(event.as_bytes());
    b
}

/// The event id in an event block (all zero when none was written).
pub fn read_event(block: &[u8]) -> Uuid {
    Uuid::from_slice(&block[4..20]).unwrap_or_default()
}

/// Reports each distinct corrupt mailbox content once.
#[derive(Debug, Default)]
pub struct CorruptionLog {
    seen: HashMap<u64, u32>,
    reported: u64,
}

impl CorruptionLog {
    /// True if this corruption of `host`'s mailbox is new (and should be logged).
    pub fn note(&mut self, host: u64, declared: u32, computed: u32) -> bool {
        let key = declared ^ computed.rotate_left(16);
        if self.seen.insert(host, key) == Some(key) {
            return false;
        }
        self.reported += 1;
        true
    }

    /// The mailbox of `host` was valid again: a later corruption is news.
    pub fn clear(&mut self, host: u64) {
        self.seen.remove(&host);
    }

    pub fn reported(&self) -> u64 {
        self.reported
    }
}

// ---------------------------------------------------------------------------------------------
// HSM side.

/// One outstanding request in an HSM slot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    Free,
    /// Request written at `sent_at`, waiting for the reply.
    Requested {
        msg: ExtendMessage,
        sent_at: Duration,
        tag: u64,
    },
    /// Reply seen and CLEAN written; waiting for the SPM to echo CLEAN.
    Cleaning,
}

/// What [`HsmSlots::on_outbox`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request's tag given to [`HsmSlots::submit`].
    pub tag: u64,
    pub msg: ExtendMessage,
    /// The size the SPM confirmed (0: refused).
    pub size_mib: u64,
}

/// The HSM's slots and outgoing mailbox, as a pure state machine over (simulated) time:
///
/// ```text
/// Free ── submit ──► Requested ── reply in outbox ──► Cleaning ── CLEAN echoed ──► Free
///                      │  no reply for extend_timeout: moved to another free slot
///                      ▼  (old slot zeroed)
/// ```
#[derive(Debug)]
pub struct HsmSlots {
    host_id: u64,
    slots: Vec<Slot>,
    outgoing: Vec<u8>,
    incoming: Vec<u8>,
    extend_timeout: Duration,
    corrupt: CorruptionLog,
}

impl HsmSlots {
    pub fn new(host_id: u64, extend_timeout: Duration) -> Result<HsmSlots, MailboxError> {
        if host_id == 0 || host_id > MAX_HOST_ID {
            return Err(MailboxError::HostId(host_id));
        }
        Ok(HsmSlots {
            host_id,
            slots: vec![Slot::Free; MESSAGES_PER_MAILBOX],
            outgoing: vec![0; MAILBOX_SIZE],
            incoming: vec![0; MAILBOX_SIZE],
            extend_timeout,
            corrupt: CorruptionLog::default(),
        })
    }

    /// Takes the outbox as found at start as the baseline: what is there already answers
    /// nothing we are about to ask.
    pub fn prime(&mut self, mailbox: &[u8]) {
        self.incoming.copy_from_slice(&mailbox[..MAILBOX_SIZE]);
    }

    /// Requests awaiting a reply.
    pub fn outstanding(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Requested { .. }))
            .count()
    }

    /// Slots not free (requests and CLEAN handshakes in progress).
    pub fn busy(&self) -> usize {
        self.slots.iter().filter(|s| **s != Slot::Free).count()
    }

    /// The mailbox to write, sealed.
    pub fn outgoing(&self) -> Vec<u8> {
        let mut m = self.outgoing.clone();
        if m[..MAILBOX_SIZE - CHECKSUM_BYTES].iter().any(|b| *b != 0) {
            seal(&mut m);
        } else {
            m[MAILBOX_SIZE - CHECKSUM_BYTES..].fill(0);
        }
        m
    }

    fn put(&mut self, slot: usize, bytes: &[u8; MESSAGE_SIZE]) {
        self.outgoing[slot * MESSAGE_SIZE..(slot + 1) * MESSAGE_SIZE].copy_from_slice(bytes);
    }

    fn free_slot(&self, except: Option<usize>) -> Option<usize> {
        (0..MESSAGES_PER_MAILBOX).find(|&i| self.slots[i] == Slot::Free && Some(i) != except)
    }

    /// Queues a request. An identical request already outstanding is not sent twice: its tag is
    /// returned instead (the caller then waits on that one).
    pub fn submit(&mut self, msg: ExtendMessage, tag: u64, now: Duration) -> Result<u64, MailboxError> {
        for s in &self.slots {
            if let Slot::Requested { msg: m, tag: t, .. } = s {
                if *m == msg {
                    return Ok(*t);
                }
            }
        }
        let i = self.free_slot(None).ok_or(MailboxError::Full(self.host_id))?;
        self.slots[i] = Slot::Requested {
            msg,
            sent_at: now,
            tag,
        };
        self.put(i, &msg.encode());
        Ok(tag)
    }

    /// Takes in a fresh read of our outbox mailbox; returns the replies found. `changed` tells
    /// whether the outgoing mailbox must be written.
    pub fn on_outbox(&mut self, mailbox: &[u8]) -> (Vec<Reply>, bool) {
        let mut replies = Vec::new();
        let mut changed = false;
        match verify(mailbox, true) {
            Seal::Corrupt { declared, computed } => {
                if self.corrupt.note(self.host_id, declared, computed) {
                    tracing::error!(
                        host_id = self.host_id,
                        declared,
                        computed,
                        "reply mailbox checksum failed; ignoring it until it is rewritten"
                    );
                }
                return (replies, false);
            }
            _ => self.corrupt.clear(self.host_id),
        }
        for i in 0..MESSAGES_PER_MAILBOX {
            let r = &mailbox[i * MESSAGE_SIZE..(i + 1) * MESSAGE_SIZE];
            let before = &self.incoming[i * MESSAGE_SIZE..(i + 1) * MESSAGE_SIZE];
            if r[0] == 0 || r == before {
                continue;
            }
            match self.slots[i].clone() {
                Slot::Free => {}
                Slot::Cleaning => {
                    if r == CLEAN_MESSAGE {
                        self.slots[i] = Slot::Free;
                        self.put(i, &[0; MESSAGE_SIZE]);
                        changed = true;
                    }
                }
                Slot::Requested { msg, tag, .. } => {
                    if r == CLEAN_MESSAGE {
                        continue;
                    }
                    if !msg.answered_by(r) {
                        tracing::warn!(
                            host_id = self.host_id,
                            slot = i,
                            "reply does not match the request in its slot; ignored"
                        );
                        continue;
                    }
                    let size_mib = ExtendMessage::decode(r).map(|m| m.size_mib).unwrap_or(0);
                    if size_mib != 0 && size_mib < msg.size_mib {
                        // A stale reply to an earlier, smaller request for the same volume.
                        continue;
                    }
                    replies.push(Reply { tag, msg, size_mib });
                    self.slots[i] = Slot::Cleaning;
                    self.put(i, &CLEAN_MESSAGE);
                    changed = true;
                }
            }
        }
        self.incoming.copy_from_slice(&mailbox[..MAILBOX_SIZE]);
        (replies, changed)
    }

    /// Moves requests unanswered for `extend_timeout` to fresh slots; true if any moved.
    pub fn retry_expired(&mut self, now: Duration) -> bool {
        let mut moved = false;
        for i in 0..MESSAGES_PER_MAILBOX {
            let Slot::Requested { msg, sent_at, tag } = self.slots[i].clone() else {
                continue;
            };
            if now.saturating_sub(sent_at) < self.extend_timeout {
                continue;
            }
            let Some(j) = self.free_slot(Some(i)) else {
                // Nowhere to move: rewrite in place and hope a new SPM picks it up.
                self.slots[i] = Slot::Requested {
                    msg,
                    sent_at: now,
                    tag,
                };
                continue;
            };
            tracing::info!(host_id = self.host_id, from = i, to = j, vol = %msg.vol, "no reply from the SPM; retrying the extend request");
            self.slots[i] = Slot::Free;
            self.put(i, &[0; MESSAGE_SIZE]);
            self.slots[j] = Slot::Requested {
                msg,
                sent_at: now,
                tag,
            };
            self.put(j, &msg.encode());
            moved = true;
        }
        moved
    }

    /// The earliest time a retry is due.
    pub fn next_retry(&self) -> Option<Duration> {
        self.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Requested { sent_at, .. } => Some(*sent_at + self.extend_timeout),
                _ => None,
            })
            .min()
    }

    /// Corrupt reply mailboxes reported so far.
    pub fn corruptions_reported(&self) -> u64 {
        self.corrupt.reported()
    }
}

// ---------------------------------------------------------------------------------------------
// SPM side.

/// A request the SPM found in the inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub host_id: u64,
    pub slot: usize,
    pub msg: ExtendMessage,
}

/// The SPM's view of the inbox and its outbox, pure.
#[derive(Debug)]
pub struct SpmView {
    max_host_id: u64,
    incoming: Vec<u8>,
    outgoing: Vec<u8>,
    corrupt: CorruptionLog,
}

impl SpmView {
    pub fn new(max_host_id: u64) -> SpmView {
        let len = (max_host_id as usize + 1) * MAILBOX_SIZE;
        SpmView {
            max_host_id,
            incoming: vec![0; len],
            outgoing: vec![0; len],
            corrupt: CorruptionLog::default(),
        }
    }

    /// Bytes of inbox (and outbox) covering hosts 0..=max_host_id.
    pub fn len(&self) -> usize {
        self.incoming.len()
    }

    pub fn is_empty(&self) -> bool {
        self.incoming.is_empty()
    }

    /// Takes in a read of the whole inbox: returns new requests and the hosts whose outbox
    /// mailbox changed (CLEAN echoes) and must be written.
    pub fn on_inbox(&mut self, inbox: &[u8]) -> (Vec<Request>, Vec<u64>) {
        let mut requests = Vec::new();
        let mut dirty = Vec::new();
        let mut new_view = inbox[..self.len()].to_vec();
        for host in 1..=self.max_host_id {
            let base = host as usize * MAILBOX_SIZE;
            let mb = &inbox[base..base + MAILBOX_SIZE];
            // Most mailboxes are empty: look for a used slot before summing 4 KiB.
            if (0..MESSAGES_PER_MAILBOX).all(|i| mb[i * MESSAGE_SIZE] == 0) {
                continue;
            }
            match verify(mb, false) {
                Seal::Corrupt { declared, computed } => {
                    if self.corrupt.note(host, declared, computed) {
                        tracing::error!(host_id = host, declared, computed, "mailbox checksum failed; ignoring the host's requests until it rewrites its mailbox");
                    }
                    // Forget it, so that the same requests are seen as new once it is valid.
                    new_view[base..base + MAILBOX_SIZE].fill(0);
                    continue;
                }
                _ => self.corrupt.clear(host),
            }
            let mut host_dirty = false;
            for i in 0..MESSAGES_PER_MAILBOX {
                let at = base + i * MESSAGE_SIZE;
                let m = &mb[i * MESSAGE_SIZE..(i + 1) * MESSAGE_SIZE];
                if m[0] == 0 {
                    continue;
                }
                if m == CLEAN_MESSAGE {
                    if self.outgoing[at..at + MESSAGE_SIZE] != CLEAN_MESSAGE {
                        self.outgoing[at..at + MESSAGE_SIZE].copy_from_slice(&CLEAN_MESSAGE);
                        host_dirty = true;
                    }
                    continue;
                }
                if m == &self.incoming[at..at + MESSAGE_SIZE] {
                    continue;
                }
                match ExtendMessage::decode(m) {
                    Ok(msg) => requests.push(Request {
                        host_id: host,
                        slot: i,
                        msg,
                    }),
                    Err(e) => {
                        tracing::warn!(host_id = host, slot = i, error = %e, "ignoring an unknown mailbox message")
                    }
                }
            }
            if host_dirty {
                dirty.push(host);
            }
        }
        self.incoming = new_view;
        (requests, dirty)
    }

    /// Records a reply; returns the host's outbox mailbox to write.
    pub fn reply(&mut self, req: &Request, ok: bool) -> Vec<u8> {
        let at = req.host_id as usize * MAILBOX_SIZE + req.slot * MESSAGE_SIZE;
        self.outgoing[at..at + MESSAGE_SIZE].copy_from_slice(&req.msg.reply(ok));
        self.mailbox(req.host_id)
    }

    /// Host `host`'s outbox mailbox, sealed.
    pub fn mailbox(&self, host: u64) -> Vec<u8> {
        let base = host as usize * MAILBOX_SIZE;
        let mut m = self.outgoing[base..base + MAILBOX_SIZE].to_vec();
        seal(&mut m);
        m
    }

    pub fn corruptions_reported(&self) -> u64 {
        self.corrupt.reported()
    }
}

// ---------------------------------------------------------------------------------------------
// Threads.

/// Timing of the mailbox loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxConfig {
    /// The SPM reads the event block this often.
    pub event_interval: Duration,
    /// The SPM reads the whole inbox at least this often.
    pub monitor_interval: Duration,
    /// An HSM with outstanding requests reads its replies this often.
    pub reply_poll: Duration,
    /// An unanswered request moves to another slot after this.
    pub extend_timeout: Duration,
    /// Hosts 1..=max_host_id have mailboxes the SPM reads.
    pub max_host_id: u64,
    /// Each mailbox read or write gives up after this.
    pub io_timeout: Duration,
}

impl Default for MailboxConfig {
    fn default() -> Self {
        MailboxConfig {
            event_interval: Duration::from_millis(100),
            monitor_interval: Duration::from_secs(2),
            reply_poll: Duration::from_millis(25),
            extend_timeout: Duration::from_secs(2),
            max_host_id: MAX_HOST_ID,
            io_timeout: Duration::from_secs(10),
        }
    }
}

fn open(path: &Path, timeout: Duration) -> Result<Arc<DirectFile>, MailboxError> {
    DirectFile::open(path, timeout)
        .map(Arc::new)
        .map_err(|e| MailboxError::Open {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// The outcome of one extend request as the HSM sees it.
pub type ExtendOutcome = Result<Reply, MailboxError>;

enum HsmCmd {
    Send(ExtendMessage, Sender<ExtendOutcome>),
    Stop,
}

/// An HSM's mailbox thread: sends extend requests to the SPM and delivers the replies.
pub struct HsmMailbox {
    tx: Mutex<Sender<HsmCmd>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    host_id: u64,
}

impl HsmMailbox {
    /// Starts the mailbox of `host_id` on the master domain's `dom_md` directory. Clears the
    /// host's request mailbox (a restarted host has no outstanding requests).
    pub fn start(
        md_dir: &Path,
        host_id: u64,
        cfg: MailboxConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<HsmMailbox, MailboxError> {
        let mut slots = HsmSlots::new(host_id, cfg.extend_timeout)?;
        let inbox = open(&md_dir.join("inbox"), cfg.io_timeout)?;
        let outbox = open(&md_dir.join("outbox"), cfg.io_timeout)?;
        match outbox.read(host_id * MAILBOX_SIZE as u64, MAILBOX_SIZE) {
            Ok(mb) => slots.prime(&mb),
            Err(e) => tracing::warn!(host_id, error = %e, "cannot read our reply mailbox at start"),
        }
        let (tx, rx) = mpsc::channel();
        let mut lp = HsmLoop {
            slots,
            inbox,
            outbox,
            cfg,
            clock,
            waiters: HashMap::new(),
            next_tag: 1,
            host_id,
        };
        if let Err(e) = lp.write_mailbox(false) {
            tracing::warn!(host_id, error = %e, "cannot clear our request mailbox");
        }
        let thread = std::thread::Builder::new()
            .name(format!("mailbox-hsm:{host_id}"))
            .spawn(move || lp.run(rx))
            .map_err(|e| MailboxError::Open {
                path: md_dir.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(HsmMailbox {
            tx: Mutex::new(tx),
            thread: Mutex::new(Some(thread)),
            host_id,
        })
    }

    pub fn host_id(&self) -> u64 {
        self.host_id
    }

    /// Sends a request; the receiver yields the reply (retries happen inside).
    pub fn send(&self, msg: ExtendMessage) -> Receiver<ExtendOutcome> {
        let (tx, rx) = mpsc::channel();
        if self
            .tx
            .lock()
            .expect("hsm tx")
            .send(HsmCmd::Send(msg, tx.clone()))
            .is_err()
        {
            let _ = tx.send(Err(MailboxError::Stopped));
        }
        rx
    }

    /// Sends a request and waits up to `timeout` for the reply.
    pub fn extend(&self, msg: ExtendMessage, timeout: Duration) -> ExtendOutcome {
        match self.send(msg).recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(MailboxError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(MailboxError::Stopped),
        }
    }

    /// Stops the thread, failing outstanding requests and clearing our mailbox.
    pub fn stop(&self) {
        let _ = self.tx.lock().expect("hsm tx").send(HsmCmd::Stop);
        if let Some(t) = self.thread.lock().expect("hsm thread").take() {
            let _ = t.join();
        }
    }
}

impl Drop for HsmMailbox {
    fn drop(&mut self) {
        self.stop();
    }
}

struct HsmLoop {
    slots: HsmSlots,
    inbox: Arc<DirectFile>,
    outbox: Arc<DirectFile>,
    cfg: MailboxConfig,
    clock: Arc<dyn Clock>,
    waiters: HashMap<u64, Vec<Sender<ExtendOutcome>>>,
    next_tag: u64,
    host_id: u64,
}

impl HsmLoop {
    fn offset(&self) -> u64 {
        self.host_id * MAILBOX_SIZE as u64
    }

    fn write_mailbox(&mut self, event: bool) -> Result<(), oxvirt_lease::io::IoError> {
        self.inbox.write(self.offset(), &self.slots.outgoing())?;
        if event {
            // The event wakes the SPM; if it is lost the SPM still finds the request within
            // its monitor interval.
            if let Err(e) = self.inbox.write(0, &event_block(Uuid::new_v4())) {
                tracing::warn!(host_id = self.host_id, error = %e, "cannot write the mailbox event");
            }
        }
        Ok(())
    }

    fn accept(&mut self, msg: ExtendMessage, tx: Sender<ExtendOutcome>) -> bool {
        let tag = self.next_tag;
        match self.slots.submit(msg, tag, self.clock.now()) {
            Ok(t) => {
                if t == tag {
                    self.next_tag += 1;
                }
                self.waiters.entry(t).or_default().push(tx);
                t == tag
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                false
            }
        }
    }

    fn run(mut self, rx: Receiver<HsmCmd>) {
        let mut stopping = false;
        while !stopping {
            let mut dirty = false;
            // Idle: block until a request comes. Busy: wait one reply poll for more requests.
            let first = if self.slots.busy() == 0 {
                rx.recv().ok()
            } else {
                match rx.recv_timeout(self.cfg.reply_poll) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => Some(HsmCmd::Stop),
                }
            };
            let mut cmds: Vec<HsmCmd> = first.into_iter().collect();
            cmds.extend(rx.try_iter());
            if cmds.is_empty() && self.slots.busy() == 0 {
                // recv() failed: every sender is gone.
                break;
            }
            for c in cmds {
                match c {
                    HsmCmd::Send(msg, tx) => dirty |= self.accept(msg, tx),
                    HsmCmd::Stop => stopping = true,
                }
            }
            if stopping {
                break;
            }
            if dirty {
                // Write first: the request goes out without waiting for a read.
                if let Err(e) = self.write_mailbox(true) {
                    tracing::warn!(host_id = self.host_id, error = %e, "cannot write our request mailbox; retrying");
                }
                dirty = false;
            }
            if self.slots.busy() > 0 {
                match self.outbox.read(self.offset(), MAILBOX_SIZE) {
                    Ok(mb) => {
                        let (replies, changed) = self.slots.on_outbox(&mb);
                        dirty |= changed;
                        for r in replies {
                            for w in self.waiters.remove(&r.tag).unwrap_or_default() {
                                let _ = w.send(Ok(r.clone()));
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(host_id = self.host_id, error = %e, "cannot read our reply mailbox")
                    }
                }
                dirty |= self.slots.retry_expired(self.clock.now());
            }
            if dirty {
                if let Err(e) = self.write_mailbox(true) {
                    tracing::warn!(host_id = self.host_id, error = %e, "cannot write our request mailbox; retrying");
                }
            }
        }
        for (_, ws) in self.waiters.drain() {
            for w in ws {
                let _ = w.send(Err(MailboxError::Stopped));
            }
        }
        self.slots = HsmSlots::new(self.host_id, self.cfg.extend_timeout).expect("valid host id");
        let _ = self.write_mailbox(false);
    }
}

/// What the SPM does with an extend request: grow the volume to at least the size and
/// return the size it now has (MiB), or why it could not.
pub trait ExtendHandler: Send + Sync + 'static {
    fn extend(&self, req: &Request) -> Result<u64, String>;

    /// False once this host may no longer write the outbox (it lost the SPM role): the loop
    /// then stops without writing anything more.
    fn serving(&self) -> bool {
        true
    }
}

/// Counters of the SPM mailbox.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SpmMailboxStats {
    pub scans: u64,
    pub events: u64,
    pub requests: u64,
    pub failures: u64,
    pub corruptions_reported: u64,
}

/// The SPM's mailbox thread: watches the event block and the inbox, runs extends, replies.
pub struct SpmMailbox {
    stop: Arc<oxvirt_lease::clock::Wake>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Mutex<SpmMailboxStats>>,
}

impl SpmMailbox {
    /// Starts serving the mailbox of the master domain at `md_dir`: clears the outbox (a new
    /// SPM replies to every request still pending) and starts the monitor thread.
    pub fn start(
        md_dir: &Path,
        cfg: MailboxConfig,
        clock: Arc<dyn Clock>,
        handler: Arc<dyn ExtendHandler>,
    ) -> Result<SpmMailbox, MailboxError> {
        let inbox = open(&md_dir.join("inbox"), cfg.io_timeout)?;
        let outbox = open(&md_dir.join("outbox"), cfg.io_timeout)?;
        let view = SpmView::new(cfg.max_host_id);
        if let Err(e) = outbox.write(0, &vec![0u8; view.len()]) {
            tracing::warn!(error = %e, "cannot clear the outbox");
        }
        let stop = Arc::new(oxvirt_lease::clock::Wake::new());
        let stats = Arc::new(Mutex::new(SpmMailboxStats::default()));
        let mut lp = SpmLoop {
            view,
            inbox,
            outbox,
            cfg,
            clock,
            handler,
            stop: stop.clone(),
            stats: stats.clone(),
            last_event: Uuid::nil(),
        };
        let thread = std::thread::Builder::new()
            .name("mailbox-spm".into())
            .spawn(move || lp.run())
            .map_err(|e| MailboxError::Open {
                path: md_dir.to_path_buf(),
                reason: e.to_string(),
            })?;
        tracing::info!(md_dir = %md_dir.display(), "SPM mailbox serving");
        Ok(SpmMailbox {
            stop,
            thread: Mutex::new(Some(thread)),
            stats,
        })
    }

    pub fn stats(&self) -> SpmMailboxStats {
        *self.stats.lock().expect("spm mailbox stats")
    }

    pub fn stop(&self) {
        self.stop.signal();
        if let Some(t) = self.thread.lock().expect("spm thread").take() {
            let _ = t.join();
        }
    }
}

impl Drop for SpmMailbox {
    fn drop(&mut self) {
        self.stop();
    }
}

struct SpmLoop {
    view: SpmView,
    inbox: Arc<DirectFile>,
    outbox: Arc<DirectFile>,
    cfg: MailboxConfig,
    clock: Arc<dyn Clock>,
    handler: Arc<dyn ExtendHandler>,
    stop: Arc<oxvirt_lease::clock::Wake>,
    stats: Arc<Mutex<SpmMailboxStats>>,
    last_event: Uuid,
}

impl SpmLoop {
    fn run(&mut self) {
        let mut next_scan = self.clock.now();
        loop {
            if self.stop.is_set() {
                return;
            }
            if !self.handler.serving() {
                tracing::warn!("SPM mailbox stops: this host is no longer the SPM");
                return;
            }
            let now = self.clock.now();
            let mut scan = now >= next_scan;
            if !scan {
                match self.inbox.read(0, EVENT_READ) {
                    Ok(b) => {
                        let ev = read_event(&b);
                        if ev != self.last_event {
                            self.last_event = ev;
                            self.stats.lock().expect("stats").events += 1;
                            scan = true;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read the mailbox event block"),
                }
            }
            if scan {
                next_scan = self.clock.now() + self.cfg.monitor_interval;
                if self.scan() {
                    // Work was done: look again at once, more requests may be queued.
                    continue;
                }
            }
            let wake = (self.clock.now() + self.cfg.event_interval).min(next_scan);
            if self.clock.sleep_until(wake, &self.stop) {
                return;
            }
        }
    }

    /// Reads the inbox and serves it; true if any request or handshake was handled.
    fn scan(&mut self) -> bool {
        let inbox = match self.inbox.read(0, self.view.len()) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the inbox");
                return false;
            }
        };
        let (requests, dirty) = self.view.on_inbox(&inbox);
        {
            let mut s = self.stats.lock().expect("stats");
            s.scans += 1;
            s.corruptions_reported = self.view.corruptions_reported();
        }
        let mut hosts: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for h in &dirty {
            hosts.insert(*h, self.view.mailbox(*h));
        }
        // Group by host so that each host's reply mailbox is written once per scan, but write
        // a host's replies as soon as its requests are done.
        let mut by_host: BTreeMap<u64, Vec<Request>> = BTreeMap::new();
        for r in &requests {
            by_host.entry(r.host_id).or_default().push(r.clone());
        }
        for (host, reqs) in by_host {
            let mut mb = Vec::new();
            for r in reqs {
                let t0 = Instant::now();
                let ok = match self.handler.extend(&r) {
                    Ok(mib) => mib >= r.msg.size_mib,
                    Err(e) => {
                        tracing::error!(host_id = r.host_id, sd = %r.msg.sd, vol = %r.msg.vol, size_mib = r.msg.size_mib, error = %e, "extend request failed");
                        false
                    }
                };
                {
                    let mut s = self.stats.lock().expect("stats");
                    s.requests += 1;
                    if !ok {
                        s.failures += 1;
                    }
                }
                tracing::debug!(host_id = r.host_id, vol = %r.msg.vol, size_mib = r.msg.size_mib, ok, took_ms = t0.elapsed().as_secs_f64() * 1e3, "extend request served");
                mb = self.view.reply(&r, ok);
            }
            hosts.insert(host, mb);
        }
        let worked = !hosts.is_empty();
        if !self.handler.serving() {
            return false;
        }
        for (host, mb) in hosts {
            if let Err(e) = self.outbox.write(host * MAILBOX_SIZE as u64, &mb) {
                tracing::error!(host_id = host, error = %e, "cannot write the reply mailbox");
            }
        }
        worked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(size: u64) -> ExtendMessage {
        ExtendMessage::new(
            "8c3a8d5e-1b7c-4f2e-9a55-0d1e2f3a4b5c".parse().unwrap(),
            "11111111-2222-4333-8444-555555555555".parse().unwrap(),
            size,
        )
        .unwrap()
    }

    #[test]
    fn extend_message_layout_matches_vdsm() {
        let m = msg(0x1400);
        let b = m.encode();
        assert_eq!(b.len(), 64);
        assert_eq!(&b[0..5], b"1xtnd");
        // UUID 8c3a8d5e-... packed little-endian: the last byte of the canonical form first.
        assert_eq!(b[5], 0x5c);
        assert_eq!(b[20], 0x8c);
        assert_eq!(&b[21..37], &pack_uuid(m.vol.as_uuid()));
        assert_eq!(&b[37..53], b"0000000000001400");
        assert_eq!(&b[53..64], b"00000000000");
        assert_eq!(ExtendMessage::decode(&b).unwrap(), m);
        assert_eq!(unpack_uuid(&pack_uuid(m.sd.as_uuid())), *m.sd.as_uuid());
        // Failure replies carry size 0 and still match the request.
        let r = m.reply(false);
        assert!(m.answered_by(&r));
        assert_eq!(ExtendMessage::decode(&r).unwrap().size_mib, 0);
        assert!(!msg(1).answered_by(&CLEAN_MESSAGE));
        assert!(ExtendMessage::new(m.sd, m.vol, MAX_SIZE_MIB + 1).is_err());
        let mut bad = b;
        bad[0] = b'2';
        assert_eq!(ExtendMessage::decode(&bad), Err(MailboxError::Version(b'2')));
        let mut bad = b;
        bad[40] = b'g';
        assert!(matches!(ExtendMessage::decode(&bad), Err(MailboxError::Size(_))));
        assert_eq!(ExtendMessage::mib_for(1), 1);
        assert_eq!(ExtendMessage::mib_for(3 << 20), 3);
    }

    #[test]
    fn checksum_is_the_byte_sum_little_endian() {
        let mut mb = vec![0u8; MAILBOX_SIZE];
        assert_eq!(verify(&mb, false), Seal::Empty);
        mb[0..64].copy_from_slice(&msg(5).encode());
        seal(&mut mb);
        let sum: u32 = mb[..4092].iter().map(|b| u32::from(*b)).sum();
        assert_eq!(&mb[4092..], &sum.to_le_bytes());
        assert_eq!(verify(&mb, false), Seal::Valid);
        mb[10] ^= 0xff;
        assert!(matches!(verify(&mb, false), Seal::Corrupt { .. }));
        let mut unsealed = vec![0u8; MAILBOX_SIZE];
        unsealed[0] = 1;
        assert_eq!(verify(&unsealed, true), Seal::Unsealed);
        assert!(matches!(verify(&unsealed, false), Seal::Corrupt { .. }));
        let ev = Uuid::new_v4();
        let blk = event_block(ev);
        assert_eq!(&blk[0..4], b"\0evt");
        assert_eq!(read_event(&blk), ev);
    }

    #[test]
    fn request_reply_clean_handshake_between_hsm_and_spm() {
        let t0 = Duration::from_secs(100);
        let mut hsm = HsmSlots::new(3, Duration::from_secs(2)).unwrap();
        let mut spm = SpmView::new(4);
        assert_eq!(hsm.submit(msg(10), 1, t0).unwrap(), 1);
        // An identical request joins the outstanding one.
        assert_eq!(hsm.submit(msg(10), 2, t0).unwrap(), 1);
        assert_eq!(hsm.outstanding(), 1);
        let mut inbox = vec![0u8; spm.len()];
        inbox[3 * MAILBOX_SIZE..4 * MAILBOX_SIZE].copy_from_slice(&hsm.outgoing());
        let (reqs, dirty) = spm.on_inbox(&inbox);
        assert_eq!(
            reqs,
            vec![Request {
                host_id: 3,
                slot: 0,
                msg: msg(10)
            }]
        );
        assert!(dirty.is_empty());
        // Seen once: the same inbox again yields nothing.
        assert!(spm.on_inbox(&inbox).0.is_empty());
        let reply_mb = spm.reply(&reqs[0], true);
        assert_eq!(verify(&reply_mb, false), Seal::Valid);
        let (replies, changed) = hsm.on_outbox(&reply_mb);
        assert_eq!(
            replies,
            vec![Reply {
                tag: 1,
                msg: msg(10),
                size_mib: 10
            }]
        );
        assert!(changed);
        assert_eq!(hsm.outstanding(), 0);
        assert_eq!(hsm.busy(), 1, "slot waits for the CLEAN echo");
        inbox[3 * MAILBOX_SIZE..4 * MAILBOX_SIZE].copy_from_slice(&hsm.outgoing());
        let (reqs, dirty) = spm.on_inbox(&inbox);
        assert!(reqs.is_empty());
        assert_eq!(dirty, vec![3]);
        let (replies, changed) = hsm.on_outbox(&spm.mailbox(3));
        assert!(replies.is_empty() && changed);
        assert_eq!(hsm.busy(), 0);
        assert!(
            hsm.outgoing().iter().all(|b| *b == 0),
            "an idle mailbox is all zero"
        );
        // The slot is reused for the next request, and the SPM sees it as new.
        hsm.submit(msg(20), 3, t0).unwrap();
        inbox[3 * MAILBOX_SIZE..4 * MAILBOX_SIZE].copy_from_slice(&hsm.outgoing());
        let (reqs, _) = spm.on_inbox(&inbox);
        assert_eq!(reqs.len(), 1);
        let (replies, _) = hsm.on_outbox(&spm.reply(&reqs[0], false));
        assert_eq!(replies[0].size_mib, 0, "refusal");
    }

    #[test]
    fn unanswered_requests_move_to_another_slot_after_the_timeout() {
        let t0 = Duration::from_secs(100);
        let mut hsm = HsmSlots::new(1, Duration::from_secs(2)).unwrap();
        let mut spm = SpmView::new(2);
        hsm.submit(msg(7), 1, t0).unwrap();
        let mut inbox = vec![0u8; spm.len()];
        inbox[MAILBOX_SIZE..2 * MAILBOX_SIZE].copy_from_slice(&hsm.outgoing());
        assert_eq!(spm.on_inbox(&inbox).0.len(), 1);
        // The SPM lost it (say it died before replying).
        assert!(!hsm.retry_expired(t0 + Duration::from_millis(1999)));
        assert_eq!(hsm.next_retry(), Some(t0 + Duration::from_secs(2)));
        assert!(hsm.retry_expired(t0 + Duration::from_secs(2)));
        inbox[MAILBOX_SIZE..2 * MAILBOX_SIZE].copy_from_slice(&hsm.outgoing());
        let (reqs, _) = spm.on_inbox(&inbox);
        assert_eq!(
            reqs,
            vec![Request {
                host_id: 1,
                slot: 1,
                msg: msg(7)
            }],
            "retried in slot 1"
        );
        // A reply in the abandoned slot is ignored; the one in the new slot is taken.
        let mut stale = vec![0u8; MAILBOX_SIZE];
        stale[0..64].copy_from_slice(&msg(7).reply(true));
        seal(&mut stale);
        assert!(hsm.on_outbox(&stale).0.is_empty());
        let (replies, _) = hsm.on_outbox(&spm.reply(&reqs[0], true));
        assert_eq!(replies.len(), 1);
    }

    #[test]
    fn a_corrupt_mailbox_is_ignored_and_reported_once() {
        let mut hsm = HsmSlots::new(2, Duration::from_secs(2)).unwrap();
        let mut spm = SpmView::new(2);
        hsm.submit(msg(9), 1, Duration::ZERO).unwrap();
        let mut inbox = vec![0u8; spm.len()];
        let mut mb = hsm.outgoing();
        mb[100] = 7; // garbage outside the used slot, checksum now wrong
        inbox[2 * MAILBOX_SIZE..3 * MAILBOX_SIZE].copy_from_slice(&mb);
        for _ in 0..5 {
            assert!(spm.on_inbox(&inbox).0.is_empty());
        }
        assert_eq!(spm.corruptions_reported(), 1);
        // Once rewritten correctly the pending request is seen.
        inbox[2 * MAILBOX_SIZE..3 * MAILBOX_SIZE].copy_from_slice(&hsm.outgoing());
        let reqs = spm.on_inbox(&inbox).0;
        assert_eq!(reqs.len(), 1);
        // A corrupt reply mailbox is also reported once, and the request stays outstanding.
        let mut reply = spm.reply(&reqs[0], true);
        reply[4000] ^= 1;
        for _ in 0..3 {
            assert!(hsm.on_outbox(&reply).0.is_empty());
        }
        assert_eq!(hsm.corruptions_reported(), 1);
        assert_eq!(hsm.outstanding(), 1);
    }

    #[test]
    fn a_full_mailbox_refuses_more_requests() {
        let mut hsm = HsmSlots::new(1, Duration::from_secs(2)).unwrap();
        for i in 0..MESSAGES_PER_MAILBOX as u64 {
            hsm.submit(msg(i + 1), i, Duration::ZERO).unwrap();
        }
        assert_eq!(
            hsm.submit(msg(1000), 99, Duration::ZERO),
            Err(MailboxError::Full(1))
        );
        assert!(HsmSlots::new(0, Duration::ZERO).is_err());
        assert!(HsmSlots::new(251, Duration::ZERO).is_err());
    }

    struct Grow(Mutex<HashMap<VolUuid, u64>>);
    impl ExtendHandler for Grow {
        fn extend(&self, req: &Request) -> Result<u64, String> {
            let mut m = self.0.lock().unwrap();
            let v = m.entry(req.msg.vol).or_insert(0);
            *v = (*v).max(req.msg.size_mib);
            Ok(*v)
        }
    }

    #[test]
    fn threads_round_trip_through_real_files() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["inbox", "outbox"] {
            std::fs::write(dir.path().join(f), vec![0u8; 16 << 20]).unwrap();
        }
        let cfg = MailboxConfig {
            max_host_id: 8,
            ..MailboxConfig::default()
        };
        let clock: Arc<dyn Clock> = Arc::new(oxvirt_lease::SystemClock);
        let handler = Arc::new(Grow(Mutex::new(HashMap::new())));
        let spm = SpmMailbox::start(dir.path(), cfg, clock.clone(), handler.clone()).unwrap();
        let hsms: Vec<_> = (1..=3)
            .map(|h| HsmMailbox::start(dir.path(), h, cfg, clock.clone()).unwrap())
            .collect();
        let mut lat = Vec::new();
        for round in 1..=10u64 {
            for (i, h) in hsms.iter().enumerate() {
                let m =
                    ExtendMessage::new(SdUuid::new_random(), VolUuid::new_random(), round * 10 + i as u64)
                        .unwrap();
                let t = Instant::now();
                let r = h.extend(m, Duration::from_secs(20)).unwrap();
                lat.push(t.elapsed());
                assert_eq!(r.size_mib, m.size_mib);
            }
        }
        lat.sort();
        let p50 = lat[lat.len() / 2];
        assert!(p50 < Duration::from_millis(250), "median round trip {p50:?}");
        assert_eq!(spm.stats().requests, 30);
        assert_eq!(handler.0.lock().unwrap().len(), 30);
        drop(hsms);
        spm.stop();
    }
}
