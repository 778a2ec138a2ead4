//! sanlock 3.8's on-disk records: the leader record (delta lease and Paxos leader), the request
//! record, the Paxos dblock and the mode block, all little-endian at fixed offsets in 512-byte
//! sectors.
//!
//! Layouts (offsets in bytes within a sector; from sanlock's `leader.h`, `paxos_dblock.h`,
//! `mode_block.h`, `ondisk.c`):
//!
//! ```text
//! leader record (200 bytes, sector 0 of a resource; sector host_id-1 of a lockspace)
//!   0 magic u32   4 version u32   8 flags u32   12 sector_size u32
//!  16 num_hosts u64   24 max_hosts u64   32 owner_id u64   40 owner_generation u64
//!  48 lver u64   56 space_name [48]   104 resource_name [48] (host name in a delta lease)
//! 152 timestamp u64   160 unused1 u64   168 checksum u32   172 unused2 u16   174 io_timeout u16
//! 176 write_id u64   184 write_generation u64   192 write_timestamp u64
//! delta leases: bytes 256..512 of the sector are the host-event/request bitmap.
//!
//! request record (sector 1 of a resource): 0 magic u32, 4 version u32, 8 lver u64, 16 force_mode u32
//!
//! dblock (sector 2 + host_id - 1 of a resource, 56 bytes)
//!   0 mbal  8 bal  16 inp (host id)  24 inp2 (generation)  32 inp3 (timestamp)  40 lver  (u64)
//!  48 checksum u32   52 flags u32 (bit 0: RELEASED)
//! mode block (same sector, offset 128): 128 flags u32 (bit 0: SHARED), 136 generation u64
//! ```
//!
//! Checksums are CRC-32C seeded with `0xFFFF_FFFE` and without the final inversion, over bytes
//! `0..168` of a leader record and `0..48` of a dblock. Fields after the checksum (io_timeout,
//! write_*, dblock flags) are not covered, exactly as in sanlock.
//!
//! Invariant: decoding never trusts a record whose magic, version or checksum is wrong; callers
//! get a [`RecordProblem`] and must treat the record as unknown, never as free.

use std::fmt;

/// Bytes per sector; sanlock also supports 4096, which we do not write.
pub const SECTOR_SIZE: usize = 512;
/// Alignment (and size) of one lockspace or one resource with 512-byte sectors.
pub const ALIGN_SIZE: usize = 1024 * 1024;
/// Host ids 1..=2000 fit one 1 MiB lockspace of 512-byte sectors.
pub const MAX_HOSTS: u64 = 2000;
/// Longest lockspace, resource or host name (no terminating NUL on disk when full).
pub const NAME_LEN: usize = 48;

pub const DELTA_MAGIC: u32 = 0x1221_2010;
pub const DELTA_VERSION: u32 = 0x0003_0000 | 0x0000_0004;
pub const PAXOS_MAGIC: u32 = 0x0615_2010;
/// Written by `sanlock direct init -z 1` to mark a cleared resource.
pub const PAXOS_CLEAR_MAGIC: u32 = 0x1128_2016;
pub const PAXOS_VERSION: u32 = 0x0006_0000 | 0x0000_0004;
pub const REQUEST_MAGIC: u32 = 0x0829_2011;
pub const REQUEST_VERSION: u32 = 0x0001_0000 | 0x0000_0001;
const MAJOR_MASK: u32 = 0xFFFF_0000;

/// Leader flag: the owner holds the Paxos lease only briefly, to acquire a shared lease.
pub const LFL_SHORT_HOLD: u32 = 0x1;
/// Leader flag: the lease area is aligned to 1 MiB.
pub const LFL_ALIGN_1M: u32 = 0x10;
/// dblock flag: the host released the lease (its other fields stay for ballots in progress).
pub const DBLOCK_FL_RELEASED: u32 = 0x1;
/// Mode block flag: the host holds the resource in shared mode.
pub const MBLOCK_SHARED: u32 = 0x1;

pub const LEADER_CHECKSUM_LEN: usize = 168;
/// Leader records compare equal for repetition counting up to (not including) the timestamp.
pub const LEADER_COMPARE_LEN: usize = 152;
pub const LEADER_SIZE: usize = 200;
pub const DBLOCK_CHECKSUM_LEN: usize = 48;
pub const DBLOCK_SIZE: usize = 56;
pub const MBLOCK_OFFSET: usize = 128;
pub const BITMAP_OFFSET: usize = 256;

/// sanlock's checksum: CRC-32C (Castagnoli), seed `!1`, no final xor.
pub fn checksum(data: &[u8]) -> u32 {
    // `crc32c_append` inverts its argument on entry and its result on exit; undo both.
    !crc32c::crc32c_append(1, data)
}

/// A name as stored on disk: up to 48 bytes, NUL-padded.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Name([u8; NAME_LEN]);

impl Default for Name {
    fn default() -> Self {
        Name([0; NAME_LEN])
    }
}

impl Name {
    /// Validates a name for writing: 1..=48 bytes, no NUL, no ':' (sanlock's separator).
    pub fn new(name: &str) -> Result<Name, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > NAME_LEN {
            return Err(NameError::TooLong(name.len()));
        }
        if name.bytes().any(|b| b == 0 || b == b':') {
            return Err(NameError::BadChar);
        }
        let mut b = [0u8; NAME_LEN];
        b[..name.len()].copy_from_slice(name.as_bytes());
        Ok(Name(b))
    }

    pub fn from_bytes(raw: &[u8]) -> Name {
        let mut b = [0u8; NAME_LEN];
        b.copy_from_slice(&raw[..NAME_LEN]);
        Name(b)
    }

    pub fn as_bytes(&self) -> &[u8; NAME_LEN] {
        &self.0
    }

    /// The name up to its first NUL, lossily decoded.
    pub fn as_string(&self) -> String {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
        String::from_utf8_lossy(&self.0[..end]).into_owned()
    }

    pub fn is_empty(&self) -> bool {
        self.0[0] == 0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_string())
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.as_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {0} bytes long, at most 48 fit on disk")]
    TooLong(usize),
    #[error("name contains NUL or ':'")]
    BadChar,
}

/// Why a record read from disk cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordProblem {
    #[error("wrong magic {found:#010x} (expected {expected:#010x})")]
    Magic { found: u32, expected: u32 },
    #[error("unsupported version {0:#010x}")]
    Version(u32),
    #[error("checksum {stored:#010x} does not match contents ({computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("belongs to lockspace {found:?}, expected {expected:?}")]
    SpaceName { found: String, expected: String },
    #[error("belongs to resource {found:?}, expected {expected:?}")]
    ResourceName { found: String, expected: String },
    #[error("sector size {0} is not 512")]
    SectorSize(u32),
    #[error("num_hosts {num_hosts} is smaller than host id {host_id}")]
    NumHosts { num_hosts: u64, host_id: u64 },
}

fn get_u16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"))
}
fn get_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
fn put_u16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// The leader record: a delta lease (one per host id) or the leader of a Paxos resource.
///
/// In a delta lease `resource_name` holds the owner's host name and `owner_id` the host id.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaderRecord {
    pub magic: u32,
    pub version: u32,
    pub flags: u32,
    pub sector_size: u32,
    pub num_hosts: u64,
    pub max_hosts: u64,
    pub owner_id: u64,
    pub owner_generation: u64,
    pub lver: u64,
    pub space_name: Name,
    pub resource_name: Name,
    /// Writer's monotonic seconds; 0 means free.
    pub timestamp: u64,
    pub unused1: u64,
    /// As stored on disk (recomputed by [`LeaderRecord::encode`]).
    pub checksum: u32,
    pub unused2: u16,
    pub io_timeout: u16,
    pub write_id: u64,
    pub write_generation: u64,
    pub write_timestamp: u64,
}

impl LeaderRecord {
    /// Writes the record into the first 200 bytes of `sector`, computing the checksum.
    pub fn encode_into(&self, sector: &mut [u8]) {
        let b = &mut sector[..LEADER_SIZE];
        put_u32(b, 0, self.magic);
        put_u32(b, 4, self.version);
        put_u32(b, 8, self.flags);
        put_u32(b, 12, self.sector_size);
        put_u64(b, 16, self.num_hosts);
        put_u64(b, 24, self.max_hosts);
        put_u64(b, 32, self.owner_id);
        put_u64(b, 40, self.owner_generation);
        put_u64(b, 48, self.lver);
        b[56..104].copy_from_slice(self.space_name.as_bytes());
        b[104..152].copy_from_slice(self.resource_name.as_bytes());
        put_u64(b, 152, self.timestamp);
        put_u64(b, 160, self.unused1);
        let sum = checksum(&b[..LEADER_CHECKSUM_LEN]);
        put_u32(b, 168, sum);
        put_u16(b, 172, self.unused2);
        put_u16(b, 174, self.io_timeout);
        put_u64(b, 176, self.write_id);
        put_u64(b, 184, self.write_generation);
        put_u64(b, 192, self.write_timestamp);
    }

    /// A full zero-padded sector holding this record (bitmap cleared).
    pub fn to_sector(&self) -> Vec<u8> {
        let mut s = vec![0u8; SECTOR_SIZE];
        self.encode_into(&mut s);
        s
    }

    /// The record with the checksum it would have on disk.
    pub fn sealed(&self) -> LeaderRecord {
        let mut s = [0u8; LEADER_SIZE];
        self.encode_into(&mut s);
        let mut r = self.clone();
        r.checksum = get_u32(&s, 168);
        r
    }

    /// Decodes without checking anything; see [`LeaderRecord::check`].
    pub fn decode(sector: &[u8]) -> LeaderRecord {
        let b = &sector[..LEADER_SIZE];
        LeaderRecord {
            magic: get_u32(b, 0),
            version: get_u32(b, 4),
            flags: get_u32(b, 8),
            sector_size: get_u32(b, 12),
            num_hosts: get_u64(b, 16),
            max_hosts: get_u64(b, 24),
            owner_id: get_u64(b, 32),
            owner_generation: get_u64(b, 40),
            lver: get_u64(b, 48),
            space_name: Name::from_bytes(&b[56..104]),
            resource_name: Name::from_bytes(&b[104..152]),
            timestamp: get_u64(b, 152),
            unused1: get_u64(b, 160),
            checksum: get_u32(b, 168),
            unused2: get_u16(b, 172),
            io_timeout: get_u16(b, 174),
            write_id: get_u64(b, 176),
            write_generation: get_u64(b, 184),
            write_timestamp: get_u64(b, 192),
        }
    }

    /// Decodes and verifies magic, major version, sector size and checksum.
    pub fn decode_checked(sector: &[u8], expected_magic: u32) -> Result<LeaderRecord, RecordProblem> {
        let r = LeaderRecord::decode(sector);
        if r.magic != expected_magic {
            return Err(RecordProblem::Magic {
                found: r.magic,
                expected: expected_magic,
            });
        }
        let major = if expected_magic == DELTA_MAGIC {
            DELTA_VERSION & MAJOR_MASK
        } else {
            PAXOS_VERSION & MAJOR_MASK
        };
        if r.version & MAJOR_MASK != major {
            return Err(RecordProblem::Version(r.version));
        }
        let computed = checksum(&sector[..LEADER_CHECKSUM_LEN]);
        if computed != r.checksum {
            return Err(RecordProblem::Checksum {
                stored: r.checksum,
                computed,
            });
        }
        if r.sector_size as usize != SECTOR_SIZE {
            return Err(RecordProblem::SectorSize(r.sector_size));
        }
        Ok(r)
    }

    pub fn check_space(&self, space: &Name) -> Result<(), RecordProblem> {
        if &self.space_name != space {
            return Err(RecordProblem::SpaceName {
                found: self.space_name.as_string(),
                expected: space.as_string(),
            });
        }
        Ok(())
    }

    pub fn check_resource(&self, resource: &Name) -> Result<(), RecordProblem> {
        if &self.resource_name != resource {
            return Err(RecordProblem::ResourceName {
                found: self.resource_name.as_string(),
                expected: resource.as_string(),
            });
        }
        Ok(())
    }

    pub fn is_free(&self) -> bool {
        self.timestamp == 0
    }

    /// Equality of everything before the timestamp (sanlock's `leaders_match`).
    pub fn matches(&self, other: &LeaderRecord) -> bool {
        let mut a = [0u8; LEADER_SIZE];
        let mut b = [0u8; LEADER_SIZE];
        self.encode_into(&mut a);
        other.encode_into(&mut b);
        a[..LEADER_COMPARE_LEN] == b[..LEADER_COMPARE_LEN]
    }
}

/// A fresh delta lease record for host `host_id`'s sector, as `sanlock direct init -s` writes.
pub fn initial_delta_record(space: &Name, io_timeout_secs: u16) -> LeaderRecord {
    LeaderRecord {
        magic: DELTA_MAGIC,
        version: DELTA_VERSION,
        flags: LFL_ALIGN_1M,
        sector_size: SECTOR_SIZE as u32,
        num_hosts: 0,
        max_hosts: 1,
        space_name: *space,
        io_timeout: io_timeout_secs,
        ..LeaderRecord::default()
    }
}

/// A fresh Paxos leader, as `sanlock direct init -r` writes (lver 0, no owner).
pub fn initial_paxos_leader(space: &Name, resource: &Name, num_hosts: u64) -> LeaderRecord {
    LeaderRecord {
        magic: PAXOS_MAGIC,
        version: PAXOS_VERSION,
        flags: LFL_ALIGN_1M,
        sector_size: SECTOR_SIZE as u32,
        num_hosts,
        max_hosts: MAX_HOSTS,
        space_name: *space,
        resource_name: *resource,
        ..LeaderRecord::default()
    }
}

/// The request record in sector 1 of a resource (used by sanlock's "request" verb).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestRecord {
    pub magic: u32,
    pub version: u32,
    pub lver: u64,
    pub force_mode: u32,
}

impl RequestRecord {
    pub fn initial() -> RequestRecord {
        RequestRecord {
            magic: REQUEST_MAGIC,
            version: REQUEST_VERSION,
            lver: 0,
            force_mode: 0,
        }
    }

    pub fn encode_into(&self, sector: &mut [u8]) {
        put_u32(sector, 0, self.magic);
        put_u32(sector, 4, self.version);
        put_u64(sector, 8, self.lver);
        put_u32(sector, 16, self.force_mode);
    }

    pub fn decode(sector: &[u8]) -> RequestRecord {
        RequestRecord {
            magic: get_u32(sector, 0),
            version: get_u32(sector, 4),
            lver: get_u64(sector, 8),
            force_mode: get_u32(sector, 16),
        }
    }
}

/// One host's Disk Paxos block for a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dblock {
    pub mbal: u64,
    pub bal: u64,
    /// Proposed owner's host id (0: no input).
    pub inp: u64,
    /// Proposed owner's generation.
    pub inp2: u64,
    /// Proposed owner's timestamp.
    pub inp3: u64,
    pub lver: u64,
    pub checksum: u32,
    pub flags: u32,
}

impl Dblock {
    pub fn encode_into(&self, sector: &mut [u8]) {
        put_u64(sector, 0, self.mbal);
        put_u64(sector, 8, self.bal);
        put_u64(sector, 16, self.inp);
        put_u64(sector, 24, self.inp2);
        put_u64(sector, 32, self.inp3);
        put_u64(sector, 40, self.lver);
        let sum = checksum(&sector[..DBLOCK_CHECKSUM_LEN]);
        put_u32(sector, 48, sum);
        put_u32(sector, 52, self.flags);
    }

    pub fn decode(sector: &[u8]) -> Dblock {
        Dblock {
            mbal: get_u64(sector, 0),
            bal: get_u64(sector, 8),
            inp: get_u64(sector, 16),
            inp2: get_u64(sector, 24),
            inp3: get_u64(sector, 32),
            lver: get_u64(sector, 40),
            checksum: get_u32(sector, 48),
            flags: get_u32(sector, 52),
        }
    }

    /// Decodes and verifies the checksum; an all-zero block (never written) is valid.
    pub fn decode_checked(sector: &[u8]) -> Result<Dblock, RecordProblem> {
        let d = Dblock::decode(sector);
        if d.checksum == 0 && d.mbal == 0 && d.bal == 0 && d.inp == 0 && d.lver == 0 {
            return Ok(d);
        }
        let computed = checksum(&sector[..DBLOCK_CHECKSUM_LEN]);
        if computed != d.checksum {
            return Err(RecordProblem::Checksum {
                stored: d.checksum,
                computed,
            });
        }
        Ok(d)
    }

    pub fn released(&self) -> bool {
        self.flags & DBLOCK_FL_RELEASED != 0
    }
}

/// The mode block at byte 128 of a host's dblock sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModeBlock {
    pub flags: u32,
    pub generation: u64,
}

impl ModeBlock {
    pub fn shared(generation: u64) -> ModeBlock {
        ModeBlock {
            flags: MBLOCK_SHARED,
            generation,
        }
    }

    pub fn is_shared(&self) -> bool {
        self.flags & MBLOCK_SHARED != 0
    }

    pub fn encode_into(&self, sector: &mut [u8]) {
        put_u32(sector, MBLOCK_OFFSET, self.flags);
        put_u32(sector, MBLOCK_OFFSET + 4, 0);
        put_u64(sector, MBLOCK_OFFSET + 8, self.generation);
    }

    pub fn decode(sector: &[u8]) -> ModeBlock {
        ModeBlock {
            flags: get_u32(sector, MBLOCK_OFFSET),
            generation: get_u64(sector, MBLOCK_OFFSET + 8),
        }
    }
}

/// A host's dblock sector: dblock plus mode block.
pub fn host_block_sector(dblock: &Dblock, mode: &ModeBlock) -> Vec<u8> {
    let mut s = vec![0u8; SECTOR_SIZE];
    dblock.encode_into(&mut s);
    mode.encode_into(&mut s);
    s
}

/// Byte offset of host `host_id`'s delta lease within a lockspace.
pub fn delta_offset(host_id: u64) -> u64 {
    (host_id - 1) * SECTOR_SIZE as u64
}

/// Byte offset of host `host_id`'s dblock within a resource.
pub fn dblock_offset(host_id: u64) -> u64 {
    (host_id + 1) * SECTOR_SIZE as u64
}

/// Bytes read by a ballot for a resource of `num_hosts` hosts: leader, request and all dblocks,
/// rounded up to a power of two sectors as sanlock does (1 MiB for 2000 hosts).
pub fn ballot_read_len(num_hosts: u64) -> usize {
    let sectors = (num_hosts as usize + 2).next_power_of_two();
    (sectors * SECTOR_SIZE).min(ALIGN_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_sanlock_direct_init_lockspace() {
        // Sector 0 of `sanlock direct init -s LS:0:ids:0` (sanlock 3.8.5), after init committed it.
        let space = Name::new("LS").unwrap();
        let sector = initial_delta_record(&space, 10).to_sector();
        assert_eq!(get_u32(&sector, 168), 0xb0f1_74c0);
        assert_eq!(
            &sector[..16],
            &[0x10, 0x20, 0x21, 0x12, 4, 0, 3, 0, 0x10, 0, 0, 0, 0, 2, 0, 0]
        );
    }

    #[test]
    fn checksum_matches_sanlock_direct_init_resource() {
        let space = Name::new("LS").unwrap();
        let res = Name::new("RES").unwrap();
        let sector = initial_paxos_leader(&space, &res, 2000).to_sector();
        assert_eq!(get_u32(&sector, 168), 0xf2c7_9a65);
    }

    #[test]
    fn leader_round_trips_and_detects_corruption() {
        let space = Name::new("space").unwrap();
        let mut r = initial_delta_record(&space, 1);
        r.owner_id = 7;
        r.owner_generation = 3;
        r.timestamp = 12345;
        r.resource_name = Name::new("host-a").unwrap();
        let mut s = r.to_sector();
        let d = LeaderRecord::decode_checked(&s, DELTA_MAGIC).unwrap();
        assert_eq!(d, r.sealed());
        s[160] ^= 1;
        assert!(matches!(
            LeaderRecord::decode_checked(&s, DELTA_MAGIC),
            Err(RecordProblem::Checksum { .. })
        ));
        assert!(matches!(
            LeaderRecord::decode_checked(&s, PAXOS_MAGIC),
            Err(RecordProblem::Magic { .. })
        ));
    }

    #[test]
    fn dblock_zero_is_valid_and_torn_is_not() {
        let zero = [0u8; SECTOR_SIZE];
        assert_eq!(Dblock::decode_checked(&zero).unwrap(), Dblock::default());
        let d = Dblock {
            mbal: 2001,
            bal: 2001,
            inp: 1,
            inp2: 1,
            inp3: 99,
            lver: 4,
            checksum: 0,
            flags: DBLOCK_FL_RELEASED,
        };
        let mut s = host_block_sector(&d, &ModeBlock::shared(5));
        let back = Dblock::decode_checked(&s).unwrap();
        assert_eq!(back.mbal, 2001);
        assert!(back.released());
        assert_eq!(ModeBlock::decode(&s), ModeBlock::shared(5));
        s[3] = 0xff;
        assert!(Dblock::decode_checked(&s).is_err());
    }

    #[test]
    fn names_are_validated() {
        assert!(Name::new("").is_err());
        assert!(Name::new(&"x".repeat(49)).is_err());
        assert!(Name::new("a:b").is_err());
        let full = Name::new(&"y".repeat(48)).unwrap();
        assert_eq!(full.as_string().len(), 48);
    }

    #[test]
    fn ballot_read_len_is_a_power_of_two_of_sectors() {
        assert_eq!(ballot_read_len(2000), ALIGN_SIZE);
        assert_eq!(ballot_read_len(6), 8 * SECTOR_SIZE);
        assert_eq!(ballot_read_len(7), 16 * SECTOR_SIZE);
    }
}
