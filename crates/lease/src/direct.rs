//! Direct access to lease areas without holding anything, like `sanlock direct`: initialise a
//! lockspace or a resource, read leaders, dump an area, and one-shot host-id operations.
//!
//! Layouts written (identical to `sanlock direct init` with 512-byte sectors):
//! - lockspace: 1 MiB, sector h-1 holds the delta lease of host id h (h = 1..=2000), each with
//!   magic 0x12212010, version 3.4, flag ALIGN_1M, timestamp 0 and the lockspace's io_timeout.
//!   The 1 MiB is written with sector 0 invalid (magic 0), then sector 0 is written valid, so a
//!   half-written lockspace is never mistaken for a good one.
//! - resource: 1 MiB, sector 0 the leader (magic 0x06152010, version 6.4, lver 0, num_hosts =
//!   max_hosts = 2000), sector 1 the request record, the rest (dblocks) zero.
//!
//! Invariant: initialisation refuses unaligned offsets and bad names before writing anything.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{SystemClock, Wake};
use crate::delta::{decode_delta, DeltaAcquire, DeltaParams, DeltaRelease};
use crate::error::LeaseError;
use crate::format::{
    dblock_offset, initial_delta_record, initial_paxos_leader, Dblock, LeaderRecord, ModeBlock, Name,
    RecordProblem, RequestRecord, ALIGN_SIZE, DELTA_MAGIC, MAX_HOSTS, PAXOS_MAGIC, SECTOR_SIZE,
};
use crate::io::{DirectFile, Region, SectorIo};
use crate::machine::{Driver, NoLockspace};
use crate::timeouts::Timeouts;

/// I/O timeout for initialising and inspecting areas (not part of any lease algorithm).
pub const DIRECT_IO_TIMEOUT: Duration = Duration::from_secs(30);

fn name(what: &'static str, s: &str) -> Result<Name, LeaseError> {
    Name::new(s).map_err(|source| LeaseError::Name {
        what,
        name: s.to_string(),
        source,
    })
}

fn check_offset(offset: u64) -> Result<(), LeaseError> {
    if !offset.is_multiple_of(ALIGN_SIZE as u64) {
        return Err(LeaseError::InvalidArgument(format!(
            "offset {offset} is not a multiple of 1 MiB"
        )));
    }
    Ok(())
}

/// Opens a lease file for direct I/O with [`DIRECT_IO_TIMEOUT`].
pub fn open(path: &Path) -> Result<Arc<DirectFile>, LeaseError> {
    DirectFile::open(path, DIRECT_IO_TIMEOUT)
        .map(Arc::new)
        .map_err(|source| LeaseError::Open {
            path: path.display().to_string(),
            source,
        })
}

fn region(path: &Path, offset: u64) -> Result<Region, LeaseError> {
    check_offset(offset)?;
    Ok(Region::new(open(path)?, offset))
}

/// Initialises a 2000-host lockspace at `offset` of `path`, like
/// `sanlock direct init -s NAME:0:PATH:OFFSET` (with `-o io_timeout_secs`).
pub fn init_lockspace(
    path: &Path,
    offset: u64,
    space_name: &str,
    io_timeout_secs: u16,
) -> Result<(), LeaseError> {
    let space = name("lockspace", space_name)?;
    init_lockspace_with(&region(path, offset)?, space_name, io_timeout_secs, MAX_HOSTS).map(|_| {
        tracing::info!(path = %path.display(), offset, space = %space, "lockspace initialised");
    })
}

/// Initialises a lockspace of `max_hosts` host ids at offset 0 of `io`.
pub fn init_lockspace_with(
    io: &dyn SectorIo,
    space_name: &str,
    io_timeout_secs: u16,
    max_hosts: u64,
) -> Result<(), LeaseError> {
    let space = name("lockspace", space_name)?;
    if io_timeout_secs == 0 {
        return Err(LeaseError::InvalidArgument(
            "io_timeout must be at least 1 s".into(),
        ));
    }
    if max_hosts == 0 || max_hosts > MAX_HOSTS {
        return Err(LeaseError::InvalidArgument(format!(
            "max_hosts {max_hosts} is outside 1..=2000"
        )));
    }
    let len = (max_hosts as usize * SECTOR_SIZE)
        .next_power_of_two()
        .min(ALIGN_SIZE);
    let mut buf = vec![0u8; len];
    let rec = initial_delta_record(&space, io_timeout_secs);
    for h in 0..max_hosts as usize {
        let mut r = rec.clone();
        if h == 0 {
            r.magic = 0;
        }
        r.encode_into(&mut buf[h * SECTOR_SIZE..]);
    }
    let obj = format!("lockspace {space}");
    io.write(0, &buf)
        .map_err(|e| LeaseError::io_write(obj.clone(), e))?;
    io.write(0, &rec.to_sector())
        .map_err(|e| LeaseError::io_write(obj, e))
}

/// Initialises a resource at `offset` of `path`, like `sanlock direct init -r SPACE:RES:PATH:OFFSET`.
pub fn init_resource(
    path: &Path,
    offset: u64,
    space_name: &str,
    resource_name: &str,
) -> Result<(), LeaseError> {
    init_resource_with(&region(path, offset)?, space_name, resource_name, MAX_HOSTS).map(|_| {
        tracing::info!(path = %path.display(), offset, space = space_name, resource = resource_name, "resource initialised");
    })
}

/// Initialises a resource for `num_hosts` hosts at offset 0 of `io`.
pub fn init_resource_with(
    io: &dyn SectorIo,
    space_name: &str,
    resource_name: &str,
    num_hosts: u64,
) -> Result<(), LeaseError> {
    let space = name("lockspace", space_name)?;
    let resource = name("resource", resource_name)?;
    if num_hosts == 0 || num_hosts > MAX_HOSTS {
        return Err(LeaseError::InvalidArgument(format!(
            "num_hosts {num_hosts} is outside 1..=2000"
        )));
    }
    let len = crate::format::ballot_read_len(num_hosts);
    let mut buf = vec![0u8; len];
    initial_paxos_leader(&space, &resource, num_hosts).encode_into(&mut buf[..SECTOR_SIZE]);
    RequestRecord::initial().encode_into(&mut buf[SECTOR_SIZE..2 * SECTOR_SIZE]);
    io.write(0, &buf)
        .map_err(|e| LeaseError::io_write(format!("resource {resource}"), e))
}

/// A lockspace location in sanlock's syntax `NAME:HOST_ID:PATH:OFFSET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockspaceSpec {
    pub name: String,
    pub host_id: u64,
    pub path: std::path::PathBuf,
    pub offset: u64,
}

/// A resource location in sanlock's syntax `LOCKSPACE:NAME:PATH:OFFSET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceSpec {
    pub lockspace: String,
    pub name: String,
    pub path: std::path::PathBuf,
    pub offset: u64,
}

/// Parses an offset in bytes, or with an `M` suffix in MiB (as `sanlock direct dump` accepts).
pub fn parse_offset(s: &str) -> Result<u64, LeaseError> {
    let bad = || LeaseError::InvalidArgument(format!("offset {s:?} is not a number of bytes or of MiB (1M)"));
    match s.strip_suffix('M') {
        Some(m) => m.parse::<u64>().map(|v| v * ALIGN_SIZE as u64).map_err(|_| bad()),
        None => s.parse().map_err(|_| bad()),
    }
}

/// Splits `A:B:PATH:OFFSET` where PATH may itself contain ':'.
fn split4(s: &str, what: &str) -> Result<(String, String, String, u64), LeaseError> {
    let bad = || LeaseError::InvalidArgument(format!("{s:?} is not {what}"));
    let (a, rest) = s.split_once(':').ok_or_else(bad)?;
    let (b, rest) = rest.split_once(':').ok_or_else(bad)?;
    let (path, off) = rest.rsplit_once(':').ok_or_else(bad)?;
    if a.is_empty() || b.is_empty() || path.is_empty() {
        return Err(bad());
    }
    Ok((a.to_string(), b.to_string(), path.to_string(), parse_offset(off)?))
}

impl std::str::FromStr for LockspaceSpec {
    type Err = LeaseError;

    fn from_str(s: &str) -> Result<Self, LeaseError> {
        let (name, host, path, offset) = split4(s, "NAME:HOST_ID:PATH:OFFSET")?;
        let host_id = host
            .parse()
            .map_err(|_| LeaseError::InvalidArgument(format!("host id {host:?} is not a number")))?;
        Name::new(&name).map_err(|source| LeaseError::Name {
            what: "lockspace",
            name: name.clone(),
            source,
        })?;
        Ok(LockspaceSpec {
            name,
            host_id,
            path: path.into(),
            offset,
        })
    }
}

impl std::str::FromStr for ResourceSpec {
    type Err = LeaseError;

    fn from_str(s: &str) -> Result<Self, LeaseError> {
        let (lockspace, name, path, offset) = split4(s, "LOCKSPACE:NAME:PATH:OFFSET")?;
        for (what, n) in [("lockspace", &lockspace), ("resource", &name)] {
            Name::new(n).map_err(|source| LeaseError::Name {
                what,
                name: n.clone(),
                source,
            })?;
        }
        Ok(ResourceSpec {
            lockspace,
            name,
            path: path.into(),
            offset,
        })
    }
}

/// One host id's delta lease as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaEntry {
    pub host_id: u64,
    pub record: Result<LeaderRecord, RecordProblem>,
}

/// Reads all delta leases of the 2000-host lockspace at `offset` of `path`, checking magic,
/// version and checksum of each (not the lockspace name).
pub fn read_lockspace(path: &Path, offset: u64) -> Result<Vec<DeltaEntry>, LeaseError> {
    read_lockspace_with(&region(path, offset)?, MAX_HOSTS)
}

pub fn read_lockspace_with(io: &dyn SectorIo, max_hosts: u64) -> Result<Vec<DeltaEntry>, LeaseError> {
    let buf = io
        .read(0, max_hosts as usize * SECTOR_SIZE)
        .map_err(|e| LeaseError::io_read("the lockspace", e))?;
    Ok((0..max_hosts)
        .map(|i| DeltaEntry {
            host_id: i + 1,
            record: LeaderRecord::decode_checked(&buf[i as usize * SECTOR_SIZE..], DELTA_MAGIC),
        })
        .collect())
}

/// Reads and verifies host `host_id`'s delta lease in lockspace `space_name`.
pub fn read_delta_leader(
    path: &Path,
    offset: u64,
    space_name: &str,
    host_id: u64,
) -> Result<LeaderRecord, LeaseError> {
    let space = name("lockspace", space_name)?;
    if host_id == 0 || host_id > MAX_HOSTS {
        return Err(LeaseError::InvalidArgument(format!(
            "host id {host_id} is outside 1..=2000"
        )));
    }
    let io = region(path, offset)?;
    let buf = io
        .read(crate::format::delta_offset(host_id), SECTOR_SIZE)
        .map_err(|e| LeaseError::io_read(format!("the delta lease of host {host_id}"), e))?;
    decode_delta(&buf, &space, host_id)
}

/// One host's block in a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBlock {
    pub host_id: u64,
    pub dblock: Result<Dblock, RecordProblem>,
    pub mode: ModeBlock,
}

/// A resource as read: leader, request record, and the host blocks that are not empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceDump {
    pub leader: LeaderRecord,
    pub request: RequestRecord,
    pub hosts: Vec<HostBlock>,
}

impl ResourceDump {
    /// Hosts whose mode block says SHARED, with the generation.
    pub fn shared_holders(&self) -> Vec<(u64, u64)> {
        self.hosts
            .iter()
            .filter(|h| h.mode.is_shared())
            .map(|h| (h.host_id, h.mode.generation))
            .collect()
    }
}

/// Reads the resource at `offset` of `path`; the leader's magic, version and checksum must be
/// valid (names are not checked).
pub fn read_resource(path: &Path, offset: u64) -> Result<ResourceDump, LeaseError> {
    read_resource_with(&region(path, offset)?)
}

pub fn read_resource_with(io: &dyn SectorIo) -> Result<ResourceDump, LeaseError> {
    let first = io
        .read(0, SECTOR_SIZE)
        .map_err(|e| LeaseError::io_read("the resource leader", e))?;
    let leader = LeaderRecord::decode_checked(&first, PAXOS_MAGIC)
        .map_err(|p| LeaseError::bad("the resource leader", p))?;
    let num_hosts = leader.num_hosts.min(MAX_HOSTS);
    let buf = io
        .read(0, crate::format::ballot_read_len(num_hosts))
        .map_err(|e| LeaseError::io_read(format!("resource {}", leader.resource_name), e))?;
    let request = RequestRecord::decode(&buf[SECTOR_SIZE..]);
    let mut hosts = Vec::new();
    for h in 1..=num_hosts {
        let off = dblock_offset(h) as usize;
        let sector = &buf[off..off + SECTOR_SIZE];
        if sector.iter().all(|&b| b == 0) {
            continue;
        }
        hosts.push(HostBlock {
            host_id: h,
            dblock: Dblock::decode_checked(sector),
            mode: ModeBlock::decode(sector),
        });
    }
    Ok(ResourceDump {
        leader: LeaderRecord::decode(&buf[..SECTOR_SIZE]),
        request,
        hosts,
    })
}

/// Reads and verifies the leader of resource `resource_name` in lockspace `space_name`.
pub fn read_paxos_leader(
    path: &Path,
    offset: u64,
    space_name: &str,
    resource_name: &str,
) -> Result<LeaderRecord, LeaseError> {
    let space = name("lockspace", space_name)?;
    let resource = name("resource", resource_name)?;
    let io = region(path, offset)?;
    let buf = io
        .read(0, SECTOR_SIZE)
        .map_err(|e| LeaseError::io_read(format!("the leader of resource {resource}"), e))?;
    crate::paxos::decode_leader(&buf, &space, &resource)
}

/// One lease area found by [`dump`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DumpEntry {
    /// A delta lease that has been acquired at least once.
    Delta { offset: u64, record: LeaderRecord },
    /// A resource leader and its shared holders (host id, generation).
    Paxos {
        offset: u64,
        leader: LeaderRecord,
        shared: Vec<(u64, u64)>,
    },
}

/// Walks `path` from `start` in 1 MiB steps like `sanlock direct dump`: lockspaces and resources
/// are listed until the first area that is neither (or until `size` bytes when given).
pub fn dump(path: &Path, start: u64, size: Option<u64>) -> Result<Vec<DumpEntry>, LeaseError> {
    check_offset(start)?;
    let file = open(path)?;
    let file_len = std::fs::metadata(path)
        .map_err(|source| LeaseError::Open {
            path: path.display().to_string(),
            source,
        })?
        .len();
    let end = size.map(|s| start + s).unwrap_or(file_len);
    let mut out = Vec::new();
    let mut off = start;
    while off < end {
        let buf = file
            .read(off, ALIGN_SIZE)
            .map_err(|e| LeaseError::io_read(format!("the area at offset {off}"), e))?;
        let magic = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes"));
        if magic == DELTA_MAGIC {
            for i in 0..ALIGN_SIZE / SECTOR_SIZE {
                let s = &buf[i * SECTOR_SIZE..(i + 1) * SECTOR_SIZE];
                let r = LeaderRecord::decode(s);
                if r.magic == 0 || (r.owner_id == 0 && r.owner_generation == 0) {
                    continue;
                }
                out.push(DumpEntry::Delta {
                    offset: off + (i * SECTOR_SIZE) as u64,
                    record: r,
                });
            }
        } else if magic == PAXOS_MAGIC {
            let leader = LeaderRecord::decode(&buf);
            let shared = (1..=leader.num_hosts.min(MAX_HOSTS))
                .filter_map(|h| {
                    let o = dblock_offset(h) as usize;
                    let mb = ModeBlock::decode(&buf[o..o + SECTOR_SIZE]);
                    mb.is_shared().then_some((h, mb.generation))
                })
                .collect();
            out.push(DumpEntry::Paxos {
                offset: off,
                leader,
                shared,
            });
        } else if size.is_none() {
            break;
        }
        off += ALIGN_SIZE as u64;
    }
    Ok(out)
}

/// Formats [`dump`] output in `sanlock direct dump`'s columns.
pub fn format_dump(entries: &[DumpEntry]) -> String {
    let mut s = format!(
        "{:>8} {:>36} {:>48} {:>10} {:>4} {:>4} {}\n",
        "offset", "lockspace", "resource", "timestamp", "own", "gen", "lver"
    );
    for e in entries {
        match e {
            DumpEntry::Delta { offset, record: r } => s.push_str(&format!(
                "{:08} {:>36} {:>48} {:010} {:04} {:04}\n",
                offset, r.space_name, r.resource_name, r.timestamp, r.owner_id, r.owner_generation
            )),
            DumpEntry::Paxos {
                offset,
                leader: r,
                shared,
            } => {
                s.push_str(&format!(
                    "{:08} {:>36} {:>48} {:010} {:04} {:04} {}\n",
                    offset,
                    r.space_name,
                    r.resource_name,
                    r.timestamp,
                    r.owner_id,
                    r.owner_generation,
                    r.lver
                ));
                for (h, g) in shared {
                    s.push_str(&format!("{:>106} {:04} {:04} SH\n", "", h, g));
                }
            }
        }
    }
    s
}

/// Formats a leader record like `sanlock direct read_leader`.
pub fn format_leader(r: &LeaderRecord) -> String {
    let delta = r.magic == DELTA_MAGIC;
    let mut s = format!(
        "magic {:#x}\nversion {:#x}\nflags {:#x}\nsector_size {}\nnum_hosts {}\nmax_hosts {}\nowner_id {}\n\
         owner_generation {}\nlver {}\nspace_name {}\nresource_name {}\ntimestamp {}\nchecksum {:#x}\nio_timeout {}\n",
        r.magic,
        r.version,
        r.flags,
        r.sector_size,
        r.num_hosts,
        r.max_hosts,
        r.owner_id,
        r.owner_generation,
        r.lver,
        r.space_name,
        r.resource_name,
        r.timestamp,
        r.checksum,
        r.io_timeout
    );
    let (a, b, c) = if delta {
        ("extra1", "extra2", "extra3")
    } else {
        ("write_id", "write_generation", "write_timestamp")
    };
    s.push_str(&format!(
        "{a} {}\n{b} {}\n{c} {}\n",
        r.write_id, r.write_generation, r.write_timestamp
    ));
    s
}

/// One-shot acquire of a host id without renewal, like `sanlock direct acquire_id`: waits 2N
/// (or 8N + M and more if another host held it) and returns the record written. Nothing renews
/// it afterwards; others see it die after 8N + M.
pub fn acquire_host_id(
    path: &Path,
    offset: u64,
    space_name: &str,
    host_id: u64,
    host_name: &str,
    timeouts: Timeouts,
) -> Result<LeaderRecord, LeaseError> {
    let space = name("lockspace", space_name)?;
    let host_name = name("host", host_name)?;
    let io = region(path, offset)?;
    let wake = Wake::new();
    let driver = Driver {
        clock: &SystemClock,
        lockspace: Some(&io),
        resource: None,
        stop: &wake,
    };
    let mut m = DeltaAcquire::new(DeltaParams {
        space,
        host_id,
        host_name,
        timeouts,
        fast_reacquire: false,
        resume: false,
    });
    let acquired = driver.run(&mut m, &NoLockspace).expect("never stopped")?;
    Ok(acquired.record)
}

/// Frees host id `host_id` if its record is exactly `record` (as returned by
/// [`acquire_host_id`] or read with [`read_delta_leader`]); like `sanlock direct release_id`.
pub fn release_host_id(
    path: &Path,
    offset: u64,
    space_name: &str,
    record: LeaderRecord,
) -> Result<bool, LeaseError> {
    let space = name("lockspace", space_name)?;
    let io = region(path, offset)?;
    let wake = Wake::new();
    let driver = Driver {
        clock: &SystemClock,
        lockspace: Some(&io),
        resource: None,
        stop: &wake,
    };
    driver
        .run(&mut DeltaRelease::new(space, record), &NoLockspace)
        .expect("never stopped")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemDisk;

    #[test]
    fn init_refuses_bad_input_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ids");
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(
            init_lockspace(&p, 512, "ls", 1),
            Err(LeaseError::InvalidArgument(_))
        ));
        assert!(matches!(
            init_lockspace(&p, 0, "a:b", 1),
            Err(LeaseError::Name { .. })
        ));
        assert!(matches!(
            init_resource(&p, 0, "ls", ""),
            Err(LeaseError::Name { .. })
        ));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
    }

    #[test]
    fn specs_parse_like_sanlock() {
        let l: LockspaceSpec = "LS:3:/rhev/data-center/mnt/a:b/dom_md/ids:0".parse().unwrap();
        assert_eq!(l.host_id, 3);
        assert_eq!(l.path.to_str().unwrap(), "/rhev/data-center/mnt/a:b/dom_md/ids");
        let r: ResourceSpec = "LS:SDM:/x/leases:1M".parse().unwrap();
        assert_eq!(
            (r.lockspace.as_str(), r.name.as_str(), r.offset),
            ("LS", "SDM", 1 << 20)
        );
        assert!("LS:x:/p:0".parse::<LockspaceSpec>().is_err());
        assert!("LS:/p".parse::<ResourceSpec>().is_err());
        assert!("LS:SDM:/p:12k".parse::<ResourceSpec>().is_err());
    }

    #[test]
    fn lockspace_and_resource_read_back() {
        let m = MemDisk::new(0);
        init_lockspace_with(&m, "space", 3, 16).unwrap();
        let entries = read_lockspace_with(&m, 16).unwrap();
        assert_eq!(entries.len(), 16);
        for e in &entries {
            let r = e.record.as_ref().unwrap();
            assert_eq!(r.space_name.to_string(), "space");
            assert_eq!(r.io_timeout, 3);
            assert!(r.is_free());
        }
        let r = MemDisk::new(0);
        init_resource_with(&r, "space", "SDM", 8).unwrap();
        let d = read_resource_with(&r).unwrap();
        assert_eq!(d.leader.lver, 0);
        assert_eq!(d.leader.num_hosts, 8);
        assert_eq!(d.request, RequestRecord::initial());
        assert!(d.hosts.is_empty());
    }
}
