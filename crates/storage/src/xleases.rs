//! The external leases volume (`dom_md/xleases`) index, in VDSM's format (`xlease.py`).
//!
//! The volume is made of slots of `alignment` bytes: slot 0 the lockspace (unused by VDSM),
//! slot 1 the index, slot 2 reserved for sanlock, slots 3.. the leases themselves. The index is
//! `62 * 4096` bytes: a 512-byte metadata block
//! (`>i x 4s x 48s x 10s x c 440x c`: magic 0x12152016, version "0001", lockspace, mtime,
//! updating flag, "\n") followed by 64-byte records (`48s x 11s x 3c`: resource name, offset,
//! updating flag, reserved flag, "\n"). An empty record has an empty name and offset 0.
//!
//! Invariants: a record's lease offset is derived from its position (`(3 + n) * alignment`),
//! never from its stored offset field. Pure: this module builds and parses bytes only.

pub const INDEX_MAGIC: u32 = 0x1215_2016;
pub const INDEX_VERSION: u32 = 1;
pub const METADATA_SIZE: usize = 512;
pub const RECORD_SIZE: usize = 64;
pub const INDEX_SIZE: usize = 62 * 4096;
pub const MAX_RECORDS: usize = (INDEX_SIZE - METADATA_SIZE) / RECORD_SIZE;
pub const RESERVED_SLOTS: u64 = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XleaseError {
    #[error("xleases index is {0} bytes, expected {INDEX_SIZE}")]
    Truncated(usize),
    #[error("xleases index has magic {0:#x}, expected {INDEX_MAGIC:#x}")]
    BadMagic(u32),
    #[error("xleases index field {field} is invalid: {value:?}")]
    Invalid { field: &'static str, value: String },
    #[error("lockspace name {0:?} does not fit in 48 ASCII bytes")]
    LockspaceName(String),
}

/// The index metadata block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexMetadata {
    pub version: u32,
    pub lockspace: String,
    pub mtime: u64,
    pub updating: bool,
}

/// One index record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub resource: String,
    pub offset: u64,
    pub updating: bool,
}

impl Record {
    pub fn is_empty(&self) -> bool {
        self.resource.is_empty()
    }
}

/// Offset of the lease of record `recnum` in the volume.
pub fn lease_offset(recnum: usize, alignment: u64) -> u64 {
    (RESERVED_SLOTS + recnum as u64) * alignment
}

/// Offset of the index in the volume.
pub fn index_offset(alignment: u64) -> u64 {
    alignment
}

/// A freshly formatted index: metadata (not updating) and all records empty.
pub fn format_index(lockspace: &str, mtime: u64) -> Result<Vec<u8>, XleaseError> {
    if lockspace.len() > 48 || !lockspace.is_ascii() {
        return Err(XleaseError::LockspaceName(lockspace.to_string()));
    }
    let mut buf = vec![0u8; INDEX_SIZE];
    buf[..METADATA_SIZE].copy_from_slice(&metadata_block(&IndexMetadata {
        version: INDEX_VERSION,
        lockspace: lockspace.to_string(),
        mtime,
        updating: false,
    }));
    let empty = record_bytes(&Record {
        resource: String::new(),
        offset: 0,
        updating: false,
    });
    for n in 0..MAX_RECORDS {
        let o = METADATA_SIZE + n * RECORD_SIZE;
        buf[o..o + RECORD_SIZE].copy_from_slice(&empty);
    }
    Ok(buf)
}

/// The 512-byte index metadata block.
pub fn metadata_block(md: &IndexMetadata) -> [u8; METADATA_SIZE] {
    let mut b = [0u8; METADATA_SIZE];
    b[0..4].copy_from_slice(&INDEX_MAGIC.to_be_bytes());
    // b[4] pad
    b[5..9].copy_from_slice(format!("{:04}", md.version).as_bytes());
    // b[9] pad
    let ls = md.lockspace.as_bytes();
    b[10..10 + ls.len()].copy_from_slice(ls);
    // b[58] pad
    b[59..69].copy_from_slice(format!("{:010}", md.mtime % 10_000_000_000).as_bytes());
    // b[69] pad
    b[70] = if md.updating { b'u' } else { b'-' };
    // b[71..511] pad (440 bytes)
    b[511] = b'\n';
    b
}

/// The 64 bytes of one index record.
pub fn record_bytes(r: &Record) -> [u8; RECORD_SIZE] {
    let mut b = [0u8; RECORD_SIZE];
    let name = r.resource.as_bytes();
    b[..name.len().min(48)].copy_from_slice(&name[..name.len().min(48)]);
    // b[48] pad
    b[49..60].copy_from_slice(format!("{:011}", r.offset % 100_000_000_000).as_bytes());
    // b[60] pad
    b[61] = if r.updating { b'u' } else { b'-' };
    b[62] = b'-';
    b[63] = b'\n';
    b
}

fn cstr(field: &'static str, b: &[u8]) -> Result<String, XleaseError> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = &b[..end];
    if !s.is_ascii() {
        return Err(XleaseError::Invalid {
            field,
            value: String::from_utf8_lossy(s).into(),
        });
    }
    Ok(String::from_utf8_lossy(s).into_owned())
}

fn num(field: &'static str, b: &[u8]) -> Result<u64, XleaseError> {
    let s = std::str::from_utf8(b).unwrap_or("");
    s.parse().map_err(|_| XleaseError::Invalid {
        field,
        value: String::from_utf8_lossy(b).into(),
    })
}

/// Parses the index metadata block.
pub fn parse_metadata(b: &[u8]) -> Result<IndexMetadata, XleaseError> {
    if b.len() < METADATA_SIZE {
        return Err(XleaseError::Truncated(b.len()));
    }
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
    if magic != INDEX_MAGIC {
        return Err(XleaseError::BadMagic(magic));
    }
    let version = num("version", &b[5..9])? as u32;
    if version != INDEX_VERSION {
        return Err(XleaseError::Invalid {
            field: "version",
            value: version.to_string(),
        });
    }
    Ok(IndexMetadata {
        version,
        lockspace: cstr("lockspace", &b[10..58])?,
        mtime: num("mtime", &b[59..69])?,
        updating: b[70] == b'u',
    })
}

/// Parses a whole index: metadata and every record.
pub fn parse_index(b: &[u8]) -> Result<(IndexMetadata, Vec<Record>), XleaseError> {
    if b.len() < INDEX_SIZE {
        return Err(XleaseError::Truncated(b.len()));
    }
    let md = parse_metadata(b)?;
    let records = (0..MAX_RECORDS)
        .map(|n| {
            let r = &b[METADATA_SIZE + n * RECORD_SIZE..METADATA_SIZE + (n + 1) * RECORD_SIZE];
            Ok(Record {
                resource: cstr("resource", &r[..48])?,
                offset: num("offset", &r[49..60])?,
                updating: r[61] == b'u',
            })
        })
        .collect::<Result<Vec<_>, XleaseError>>()?;
    Ok((md, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatted_index_matches_vdsm_layout() {
        let ls = "3f1a2b3c-4d5e-4f60-8a9b-0c1d2e3f4a5b";
        let b = format_index(ls, 1_700_000_000).unwrap();
        assert_eq!(b.len(), 253_952);
        assert_eq!(&b[0..4], &[0x12, 0x15, 0x20, 0x16]);
        assert_eq!(&b[5..9], b"0001");
        assert_eq!(&b[10..10 + ls.len()], ls.as_bytes());
        assert_eq!(&b[59..69], b"1700000000");
        assert_eq!(b[70], b'-');
        assert_eq!(b[511], b'\n');
        // First empty record: 48 NULs, NUL, "00000000000", NUL, "-", "-", "\n".
        let r = &b[512..576];
        assert!(r[..49].iter().all(|&c| c == 0));
        assert_eq!(&r[49..60], b"00000000000");
        assert_eq!(&r[60..], b"\0--\n");
        let (md, recs) = parse_index(&b).unwrap();
        assert_eq!(md.lockspace, ls);
        assert!(!md.updating);
        assert_eq!(recs.len(), MAX_RECORDS);
        assert!(recs.iter().all(Record::is_empty));
        assert_eq!(lease_offset(0, 1 << 20), 3 << 20);
    }

    #[test]
    fn corrupt_index_is_rejected() {
        let mut b = format_index("x", 1).unwrap();
        b[0] = 0;
        assert!(matches!(parse_index(&b), Err(XleaseError::BadMagic(_))));
        assert!(matches!(parse_index(&b[..100]), Err(XleaseError::Truncated(100))));
        assert!(format_index(&"x".repeat(49), 1).is_err());
    }
}
