//! Volume metadata (`<volUUID>.meta`): codec and typed view.
//!
//! The record is VDSM's: sorted `KEY=VALUE` lines (CAP, CTIME, DESCRIPTION, DISKTYPE, DOMAIN,
//! FORMAT, GEN, IMAGE, LEGALITY, PUUID, SEQ, TYPE, VOLTYPE on a version-5 domain), then `EOF`,
//! at most 512 bytes so that it can be written in one sector on block storage.
//!
//! Invariants: [`VolumeMetadata::encode`] never yields more than [`METADATA_SIZE`] bytes or a
//! value containing a newline; a parent of [`VolUuid::nil`] means "no parent". Pure: no I/O.

use std::collections::BTreeMap;

use oxvirt_qemu::ImageFormat;
use oxvirt_types::{ImgUuid, SdUuid, VolUuid};
use serde::{Deserialize, Serialize};

/// Maximum size of an encoded record (VDSM's `METADATA_SIZE`).
pub const METADATA_SIZE: usize = 512;
/// VDSM's limit on the description (`DESCRIPTION_SIZE`).
pub const DESCRIPTION_SIZE: usize = 210;
pub const MAX_GENERATION: u32 = 999;

/// Disk types VDSM accepts (`VOL_DISKTYPE`).
pub const DISK_TYPES: &[&str] = &[
    "DATA", "ISOF", "MEMD", "MEMM", "OVFS", "HEVD", "HESD", "HEMD", "HECI", "SCRD", "2", "1",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolMetaError {
    #[error("volume metadata key {0} is missing")]
    Missing(&'static str),
    #[error("volume metadata key {key} has an invalid value {value:?}")]
    Invalid { key: &'static str, value: String },
    #[error("volume metadata is {0} bytes, more than the {METADATA_SIZE} allowed")]
    TooLarge(usize),
    #[error("volume metadata was cleared (NONE marker)")]
    Cleared,
}

macro_rules! str_enum {
    ($(#[$doc:meta])* $name:ident { $($var:ident = $s:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $($var),* }
        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$var => $s),* }
            }
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(Self::$var),)* _ => None }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

str_enum!(
    /// `FORMAT`: how the volume's bytes are laid out.
    VolFormat { Cow = "COW", Raw = "RAW" }
);
str_enum!(
    /// `TYPE`: allocation policy.
    Allocation { Sparse = "SPARSE", Preallocated = "PREALLOCATED" }
);
str_enum!(
    /// `VOLTYPE`: the volume's place in its chain. A LEAF is the writable top, an INTERNAL volume
    /// has a child in the same image, a SHARED volume is a template layer (read-only, possibly
    /// hard-linked into other images).
    VolRole { Leaf = "LEAF", Internal = "INTERNAL", Shared = "SHARED" }
);
str_enum!(
    /// `LEGALITY`: ILLEGAL while a volume is half made or being merged into; LEGAL when its content
    /// is complete. FAKE is VDSM's placeholder for volumes that exist only on other domains.
    Legality { Legal = "LEGAL", Illegal = "ILLEGAL", Fake = "FAKE" }
);

impl VolFormat {
    pub fn image_format(self) -> ImageFormat {
        match self {
            Self::Cow => ImageFormat::Qcow2,
            Self::Raw => ImageFormat::Raw,
        }
    }
}

/// One `.meta` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMetadata {
    pub domain: SdUuid,
    pub image: ImgUuid,
    /// The parent volume, or nil for a base volume.
    pub parent: VolUuid,
    /// Virtual size in bytes.
    pub capacity: u64,
    pub format: VolFormat,
    pub allocation: Allocation,
    pub role: VolRole,
    pub disktype: String,
    pub description: String,
    pub legality: Legality,
    /// Creation time, seconds since the epoch.
    pub ctime: u64,
    /// Bumped (mod 1000) each time an operation completes on the volume.
    pub generation: u32,
    /// Position of the volume in its image's history.
    pub sequence: u32,
}

impl VolumeMetadata {
    pub fn parent(&self) -> Option<VolUuid> {
        (!self.parent.is_nil()).then_some(self.parent)
    }

    pub fn next_generation(&self) -> u32 {
        (self.generation + 1) % (MAX_GENERATION + 1)
    }

    /// The record as written to storage (version-5 keys).
    pub fn encode(&self) -> Result<Vec<u8>, VolMetaError> {
        validate_description(&self.description)?;
        validate_disktype(&self.disktype)?;
        let mut m: BTreeMap<&str, String> = BTreeMap::new();
        m.insert("CAP", self.capacity.to_string());
        m.insert("CTIME", self.ctime.to_string());
        m.insert("DESCRIPTION", self.description.clone());
        m.insert("DISKTYPE", self.disktype.clone());
        m.insert("DOMAIN", self.domain.to_string());
        m.insert("FORMAT", self.format.as_str().into());
        m.insert("GEN", self.generation.to_string());
        m.insert("IMAGE", self.image.to_string());
        m.insert("LEGALITY", self.legality.as_str().into());
        m.insert("PUUID", self.parent.to_string());
        m.insert("SEQ", self.sequence.to_string());
        m.insert("TYPE", self.allocation.as_str().into());
        m.insert("VOLTYPE", self.role.as_str().into());
        let mut out = String::with_capacity(384);
        for (k, v) in m {
            out.push_str(k);
            out.push('=');
            out.push_str(&v);
            out.push('\n');
        }
        out.push_str("EOF\n");
        if out.len() > METADATA_SIZE {
            return Err(VolMetaError::TooLarge(out.len()));
        }
        Ok(out.into_bytes())
    }

    /// Parses a record as VDSM does: stops at `EOF`, ignores NUL padding and lines without `=`,
    /// takes `SIZE` (512-byte blocks, pre-v5) when `CAP` is missing, defaults GEN and SEQ to 0.
    pub fn decode(bytes: &[u8]) -> Result<Self, VolMetaError> {
        let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let mut md: BTreeMap<String, String> = BTreeMap::new();
        for line in bytes[..end].split(|&b| b == b'\n') {
            let Ok(line) = std::str::from_utf8(line) else {
                continue;
            };
            if line.starts_with("EOF") {
                break;
            }
            if let Some((k, v)) = line.split_once('=') {
                md.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
        if md.contains_key("NONE") {
            return Err(VolMetaError::Cleared);
        }
        let get = |k: &'static str| md.get(k).map(String::as_str).ok_or(VolMetaError::Missing(k));
        let bad = |key: &'static str, value: &str| VolMetaError::Invalid {
            key,
            value: value.to_string(),
        };
        fn id<T: std::str::FromStr>(key: &'static str, v: &str) -> Result<T, VolMetaError> {
            v.parse()
                .map_err(|_| VolMetaError::Invalid { key, value: v.into() })
        }
        let capacity = match md.get("CAP") {
            Some(v) => id::<u64>("CAP", v)?,
            None => {
                let s = get("SIZE").map_err(|_| VolMetaError::Missing("CAP"))?;
                id::<u64>("SIZE", s)?
                    .checked_mul(512)
                    .ok_or_else(|| bad("SIZE", s))?
            }
        };
        let format = get("FORMAT")?;
        let alloc = get("TYPE")?;
        let role = get("VOLTYPE")?;
        let legality = get("LEGALITY")?;
        Ok(Self {
            domain: id("DOMAIN", get("DOMAIN")?)?,
            image: id("IMAGE", get("IMAGE")?)?,
            parent: id("PUUID", get("PUUID")?)?,
            capacity,
            format: VolFormat::parse(format).ok_or_else(|| bad("FORMAT", format))?,
            allocation: Allocation::parse(alloc).ok_or_else(|| bad("TYPE", alloc))?,
            role: VolRole::parse(role).ok_or_else(|| bad("VOLTYPE", role))?,
            disktype: get("DISKTYPE")?.to_string(),
            description: md.get("DESCRIPTION").cloned().unwrap_or_default(),
            legality: Legality::parse(legality).ok_or_else(|| bad("LEGALITY", legality))?,
            ctime: id("CTIME", get("CTIME")?)?,
            generation: md.get("GEN").map(|v| id("GEN", v)).transpose()?.unwrap_or(0),
            sequence: md.get("SEQ").map(|v| id("SEQ", v)).transpose()?.unwrap_or(0),
        })
    }
}

pub fn validate_description(d: &str) -> Result<(), VolMetaError> {
    if d.len() > DESCRIPTION_SIZE || d.contains(['\n', '\r', '\0']) {
        return Err(VolMetaError::Invalid {
            key: "DESCRIPTION",
            value: d.chars().take(64).collect(),
        });
    }
    Ok(())
}

pub fn validate_disktype(d: &str) -> Result<(), VolMetaError> {
    if !DISK_TYPES.contains(&d) {
        return Err(VolMetaError::Invalid {
            key: "DISKTYPE",
            value: d.chars().take(16).collect(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn worst_case() -> VolumeMetadata {
        VolumeMetadata {
            domain: SdUuid::new_random(),
            image: ImgUuid::new_random(),
            parent: VolUuid::new_random(),
            capacity: u64::MAX,
            format: VolFormat::Cow,
            allocation: Allocation::Preallocated,
            role: VolRole::Internal,
            disktype: "OVFS".into(),
            description: "d".repeat(DESCRIPTION_SIZE),
            legality: Legality::Illegal,
            ctime: 1_440_935_038,
            generation: 999,
            sequence: u32::MAX,
        }
    }

    #[test]
    fn worst_case_fits_in_512_bytes_and_round_trips() {
        let md = worst_case();
        let bytes = md.encode().unwrap();
        assert!(bytes.len() <= METADATA_SIZE, "{}", bytes.len());
        let text = std::str::from_utf8(&bytes).unwrap();
        let keys: Vec<&str> = text.lines().map(|l| l.split('=').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "CAP",
                "CTIME",
                "DESCRIPTION",
                "DISKTYPE",
                "DOMAIN",
                "FORMAT",
                "GEN",
                "IMAGE",
                "LEGALITY",
                "PUUID",
                "SEQ",
                "TYPE",
                "VOLTYPE",
                "EOF"
            ]
        );
        assert_eq!(VolumeMetadata::decode(&bytes).unwrap(), md);
    }

    #[test]
    fn reads_vdsm_v4_records_with_size_in_blocks() {
        let text = "CTIME=1\nDESCRIPTION=\nDISKTYPE=2\nDOMAIN=75f8a1bb-4504-4314-91ca-d9365a30692b\n\
            FORMAT=RAW\nIMAGE=75f8a1bb-4504-4314-91ca-d9365a30692c\nLEGALITY=LEGAL\nMTIME=0\n\
            PUUID=00000000-0000-0000-0000-000000000000\nSIZE=2048\nTYPE=SPARSE\nVOLTYPE=LEAF\nEOF\n\0\0\0";
        let md = VolumeMetadata::decode(text.as_bytes()).unwrap();
        assert_eq!(md.capacity, 1 << 20);
        assert_eq!(md.parent(), None);
        assert_eq!((md.generation, md.sequence), (0, 0));
    }

    #[test]
    fn rejects_overlong_or_injected_descriptions() {
        let mut md = worst_case();
        md.description = "x".repeat(DESCRIPTION_SIZE + 1);
        assert!(md.encode().is_err());
        md.description = "a\nLEGALITY=LEGAL".into();
        assert!(md.encode().is_err());
        md.description = String::new();
        md.disktype = "../x".into();
        assert!(md.encode().is_err());
        assert_eq!(
            VolumeMetadata::decode(b"NONE=#####\nEOF\n"),
            Err(VolMetaError::Cleared)
        );
        assert_eq!(
            VolumeMetadata::decode(b"EOF\n"),
            Err(VolMetaError::Missing("CAP"))
        );
    }

    proptest! {
        #[test]
        fn any_valid_record_round_trips(
            cap in any::<u64>(), gen in 0u32..=999, seq in any::<u32>(), ctime in any::<u64>(),
            desc in "[ -~]{0,210}", leaf in any::<bool>(),
        ) {
            let md = VolumeMetadata {
                capacity: cap, generation: gen, sequence: seq, ctime,
                description: desc.trim().to_string(),
                role: if leaf { VolRole::Leaf } else { VolRole::Shared },
                ..worst_case()
            };
            match md.encode() {
                Ok(bytes) => prop_assert_eq!(VolumeMetadata::decode(&bytes).unwrap(), md),
                Err(VolMetaError::TooLarge(n)) => prop_assert!(n > METADATA_SIZE),
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
    }
}
