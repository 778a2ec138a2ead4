//! The storage domain metadata file (`dom_md/metadata`): codec and typed view.
//!
//! On disk it is VDSM's "persistent dict": one `KEY=VALUE` line per key, sorted by key, then a
//! `_SHA_CKSUM=<sha1 hex>` line. The checksum is the SHA-1 of the sorted `KEY=VALUE` lines
//! concatenated *without* newlines, each encoded as ASCII with non-ASCII characters written as
//! XML character references (`é` → `&#233;`), exactly as VDSM's `persistent.py` computes it.
//!
//! Invariants: [`encode`] always produces sorted keys and a correct checksum; [`decode`] refuses
//! a file whose declared checksum does not match, and one with no checksum at all (VDSM accepts
//! the latter with a warning; nothing oxvirt or VDSM writes lacks it). Pure: no I/O here.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use oxvirt_types::{PoolUuid, SdUuid};
use sha1::{Digest, Sha1};

pub const CHECKSUM_KEY: &str = "_SHA_CKSUM";

/// VDSM's limit on a domain's description (`MAX_DOMAIN_DESCRIPTION_SIZE`).
pub const MAX_DESCRIPTION: usize = 50;

pub const KEY_VERSION: &str = "VERSION";
pub const KEY_SDUUID: &str = "SDUUID";
pub const KEY_TYPE: &str = "TYPE";
pub const KEY_ROLE: &str = "ROLE";
pub const KEY_DESCRIPTION: &str = "DESCRIPTION";
pub const KEY_CLASS: &str = "CLASS";
pub const KEY_POOLS: &str = "POOL_UUID";
pub const KEY_BLOCK_SIZE: &str = "BLOCK_SIZE";
pub const KEY_ALIGNMENT: &str = "ALIGNMENT";
pub const KEY_LOCK_POLICY: &str = "LOCKPOLICY";
pub const KEY_LOCK_RENEWAL: &str = "LOCKRENEWALINTERVALSEC";
pub const KEY_LEASE_TIME: &str = "LEASETIMESEC";
pub const KEY_IO_TIMEOUT: &str = "IOOPTIMEOUTSEC";
pub const KEY_LEASE_RETRIES: &str = "LEASERETRIES";
pub const KEY_REMOTE_PATH: &str = "REMOTE_PATH";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata seal is broken: declared checksum {declared}, computed {computed}")]
    ChecksumMismatch { declared: String, computed: String },
    #[error("metadata has no {CHECKSUM_KEY} line")]
    NoChecksum,
    #[error("metadata is not UTF-8")]
    NotUtf8,
    #[error("metadata key {key} is missing")]
    Missing { key: &'static str },
    #[error("metadata key {key} has an invalid value {value:?}")]
    Invalid { key: &'static str, value: String },
    #[error("invalid metadata key or value {0:?}: keys are non-empty without '=' or newlines, values have no newlines")]
    BadEntry(String),
}

/// The SHA-1 checksum VDSM computes over a key/value map.
pub fn checksum(md: &BTreeMap<String, String>) -> String {
    let mut h = Sha1::new();
    for (k, v) in md {
        h.update(ascii_xmlcharref(k).as_bytes());
        h.update(b"=");
        h.update(ascii_xmlcharref(v).as_bytes());
    }
    h.finalize().iter().fold(String::with_capacity(40), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Python's `str.encode('ascii', 'xmlcharrefreplace')`.
fn ascii_xmlcharref(s: &str) -> std::borrow::Cow<'_, str> {
    if s.is_ascii() {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let _ = write!(out, "&#{};", c as u32);
        }
    }
    out.into()
}

/// Serializes sorted `KEY=VALUE` lines plus the checksum line.
pub fn encode(md: &BTreeMap<String, String>) -> Result<String, MetadataError> {
    let mut out = String::new();
    for (k, v) in md {
        if k.is_empty()
            || k.contains(['=', '\n', '\r', '\0'])
            || k == CHECKSUM_KEY
            || v.contains(['\n', '\r', '\0'])
        {
            return Err(MetadataError::BadEntry(format!("{k}={v}")));
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
        out.push('\n');
    }
    out.push_str(CHECKSUM_KEY);
    out.push('=');
    out.push_str(&checksum(md));
    out.push('\n');
    Ok(out)
}

/// Parses and verifies the checksum. Trailing NUL padding is ignored, as VDSM does.
pub fn decode(bytes: &[u8]) -> Result<BTreeMap<String, String>, MetadataError> {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&bytes[..end]).map_err(|_| MetadataError::NotUtf8)?;
    let mut md = BTreeMap::new();
    let mut declared = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue; // VDSM logs and skips unparsable lines
        };
        let k = k.trim();
        if k == CHECKSUM_KEY {
            declared = Some(v.to_string());
        } else {
            md.insert(k.to_string(), v.to_string());
        }
    }
    let declared = declared.ok_or(MetadataError::NoChecksum)?;
    let computed = checksum(&md);
    if declared != computed {
        return Err(MetadataError::ChecksumMismatch { declared, computed });
    }
    Ok(md)
}

/// Storage domain types (`TYPE`); oxvirt creates file domains only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DomainType {
    Nfs,
    LocalFs,
    PosixFs,
    GlusterFs,
    Cifs,
    Fcp,
    Iscsi,
}

impl DomainType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nfs => "NFS",
            Self::LocalFs => "LOCALFS",
            Self::PosixFs => "POSIXFS",
            Self::GlusterFs => "GLUSTERFS",
            Self::Cifs => "CIFS",
            Self::Fcp => "FCP",
            Self::Iscsi => "ISCSI",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Nfs,
            Self::LocalFs,
            Self::PosixFs,
            Self::GlusterFs,
            Self::Cifs,
            Self::Fcp,
            Self::Iscsi,
        ]
        .into_iter()
        .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }
    pub fn is_file(self) -> bool {
        !matches!(self, Self::Fcp | Self::Iscsi)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DomainClass {
    Data,
    Iso,
    Backup,
}

impl DomainClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Data => "Data",
            Self::Iso => "Iso",
            Self::Backup => "Backup",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Data, Self::Iso, Self::Backup]
            .into_iter()
            .find(|c| c.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DomainRole {
    Regular,
    Master,
}

impl DomainRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Regular => "Regular",
            Self::Master => "Master",
        }
    }
}

/// The typed content of a domain's metadata. Keys oxvirt does not know are kept in `extra` and
/// written back unchanged, so a pool layer (or VDSM) can add its own.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DomainMetadata {
    pub version: u32,
    pub sd: SdUuid,
    pub domain_type: DomainType,
    pub class: DomainClass,
    pub role: DomainRole,
    pub description: String,
    pub pools: Vec<PoolUuid>,
    pub lock_policy: String,
    pub lock_renewal_interval_sec: u32,
    pub lease_time_sec: u32,
    pub io_op_timeout_sec: u32,
    pub lease_retries: u32,
    pub remote_path: String,
    pub alignment: u64,
    pub block_size: u64,
    pub extra: BTreeMap<String, String>,
}

impl DomainMetadata {
    /// A new version-5 data domain with VDSM's defaults (512-byte blocks, 1 MiB alignment).
    pub fn new_v5(
        sd: SdUuid,
        domain_type: DomainType,
        description: &str,
        remote_path: &str,
    ) -> Result<Self, MetadataError> {
        validate_description(description)?;
        if remote_path.contains(['\n', '\r', '\0']) {
            return Err(MetadataError::Invalid {
                key: KEY_REMOTE_PATH,
                value: remote_path.into(),
            });
        }
        Ok(Self {
            version: 5,
            sd,
            domain_type,
            class: DomainClass::Data,
            role: DomainRole::Regular,
            description: description.to_string(),
            pools: Vec::new(),
            lock_policy: String::new(),
            lock_renewal_interval_sec: 5,
            lease_time_sec: 60,
            io_op_timeout_sec: 10,
            lease_retries: 3,
            remote_path: remote_path.to_string(),
            alignment: 1 << 20,
            block_size: 512,
            extra: BTreeMap::new(),
        })
    }

    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = self.extra.clone();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put(KEY_VERSION, self.version.to_string());
        put(KEY_SDUUID, self.sd.to_string());
        put(KEY_TYPE, self.domain_type.as_str().into());
        put(KEY_CLASS, self.class.as_str().into());
        put(KEY_ROLE, self.role.as_str().into());
        put(KEY_DESCRIPTION, self.description.clone());
        put(
            KEY_POOLS,
            self.pools
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        put(KEY_LOCK_POLICY, self.lock_policy.clone());
        put(KEY_LOCK_RENEWAL, self.lock_renewal_interval_sec.to_string());
        put(KEY_LEASE_TIME, self.lease_time_sec.to_string());
        put(KEY_IO_TIMEOUT, self.io_op_timeout_sec.to_string());
        put(KEY_LEASE_RETRIES, self.lease_retries.to_string());
        put(KEY_REMOTE_PATH, self.remote_path.clone());
        if self.version >= 5 {
            put(KEY_ALIGNMENT, self.alignment.to_string());
            put(KEY_BLOCK_SIZE, self.block_size.to_string());
        }
        m
    }

    pub fn encode(&self) -> Result<String, MetadataError> {
        encode(&self.to_map())
    }

    pub fn from_map(mut m: BTreeMap<String, String>) -> Result<Self, MetadataError> {
        fn take(m: &mut BTreeMap<String, String>, key: &'static str) -> Result<String, MetadataError> {
            m.remove(key).ok_or(MetadataError::Missing { key })
        }
        fn num<T: std::str::FromStr>(key: &'static str, v: &str) -> Result<T, MetadataError> {
            v.trim()
                .parse()
                .map_err(|_| MetadataError::Invalid { key, value: v.into() })
        }
        let bad = |key: &'static str, value: &str| MetadataError::Invalid {
            key,
            value: value.to_string(),
        };
        let version: u32 = num(KEY_VERSION, &take(&mut m, KEY_VERSION)?)?;
        let sd_s = take(&mut m, KEY_SDUUID)?;
        let sd = sd_s.parse().map_err(|_| bad(KEY_SDUUID, &sd_s))?;
        let t = take(&mut m, KEY_TYPE)?;
        let domain_type = DomainType::parse(&t).ok_or_else(|| bad(KEY_TYPE, &t))?;
        let c = take(&mut m, KEY_CLASS)?;
        let class = DomainClass::parse(&c).ok_or_else(|| bad(KEY_CLASS, &c))?;
        let r = take(&mut m, KEY_ROLE)?;
        let role = if r.eq_ignore_ascii_case("master") {
            DomainRole::Master
        } else if r.eq_ignore_ascii_case("regular") {
            DomainRole::Regular
        } else {
            return Err(bad(KEY_ROLE, &r));
        };
        let description = m.remove(KEY_DESCRIPTION).unwrap_or_default();
        let p = m.remove(KEY_POOLS).unwrap_or_default();
        let pools = p
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|_| bad(KEY_POOLS, &p)))
            .collect::<Result<Vec<PoolUuid>, _>>()?;
        // VDSM falls back to its defaults for unparsable lease parameters; so do we.
        let mut int_or = |key: &'static str, default: u32| {
            m.remove(key)
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(default)
        };
        let lock_renewal_interval_sec = int_or(KEY_LOCK_RENEWAL, 5);
        let lease_time_sec = int_or(KEY_LEASE_TIME, 60);
        let io_op_timeout_sec = int_or(KEY_IO_TIMEOUT, 10);
        let lease_retries = int_or(KEY_LEASE_RETRIES, 3);
        let lock_policy = m.remove(KEY_LOCK_POLICY).unwrap_or_default();
        let remote_path = m.remove(KEY_REMOTE_PATH).unwrap_or_default();
        let alignment = match m.remove(KEY_ALIGNMENT) {
            Some(v) => num(KEY_ALIGNMENT, &v)?,
            None => 1 << 20,
        };
        let block_size = match m.remove(KEY_BLOCK_SIZE) {
            Some(v) => num(KEY_BLOCK_SIZE, &v)?,
            None => 512,
        };
        Ok(Self {
            version,
            sd,
            domain_type,
            class,
            role,
            description,
            pools,
            lock_policy,
            lock_renewal_interval_sec,
            lease_time_sec,
            io_op_timeout_sec,
            lease_retries,
            remote_path,
            alignment,
            block_size,
            extra: m,
        })
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MetadataError> {
        Self::from_map(decode(bytes)?)
    }
}

pub fn validate_description(d: &str) -> Result<(), MetadataError> {
    if d.chars().count() > MAX_DESCRIPTION || d.contains(['\n', '\r', '\0']) {
        return Err(MetadataError::Invalid {
            key: KEY_DESCRIPTION,
            value: d.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DomainMetadata {
        let sd: SdUuid = "3f1a2b3c-4d5e-4f60-8a9b-0c1d2e3f4a5b".parse().unwrap();
        DomainMetadata::new_v5(sd, DomainType::LocalFs, "my domain", "/srv/data").unwrap()
    }

    #[test]
    fn encodes_sorted_keys_and_vdsm_checksum() {
        let text = sample().encode().unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let keys: Vec<&str> = lines.iter().map(|l| l.split('=').next().unwrap()).collect();
        let mut sorted = keys[..keys.len() - 1].to_vec();
        sorted.sort();
        assert_eq!(&keys[..keys.len() - 1], &sorted[..]);
        assert_eq!(
            &lines[..],
            &[
                "ALIGNMENT=1048576",
                "BLOCK_SIZE=512",
                "CLASS=Data",
                "DESCRIPTION=my domain",
                "IOOPTIMEOUTSEC=10",
                "LEASERETRIES=3",
                "LEASETIMESEC=60",
                "LOCKPOLICY=",
                "LOCKRENEWALINTERVALSEC=5",
                "POOL_UUID=",
                "REMOTE_PATH=/srv/data",
                "ROLE=Regular",
                "SDUUID=3f1a2b3c-4d5e-4f60-8a9b-0c1d2e3f4a5b",
                "TYPE=LOCALFS",
                "VERSION=5",
                lines[15],
            ]
        );
        // sha1 of the concatenated lines, computed independently with `sha1sum`:
        // printf '%s' 'ALIGNMENT=1048576' 'BLOCK_SIZE=512' ... | sha1sum
        let concat: String = lines[..15].concat();
        let mut h = Sha1::new();
        h.update(concat.as_bytes());
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(lines[15], format!("_SHA_CKSUM={hex}"));
        assert_eq!(DomainMetadata::decode(text.as_bytes()).unwrap(), sample());
    }

    #[test]
    fn known_vector_matches_python() {
        // python3: hashlib.sha1('A=1B=é'.encode('ascii', 'xmlcharrefreplace')).hexdigest()
        let mut m = BTreeMap::new();
        m.insert("B".to_string(), "é".to_string());
        m.insert("A".to_string(), "1".to_string());
        assert_eq!(checksum(&m), "9ab1afffebcc97cffd5dc8a45766d72b5f04a742");
    }

    #[test]
    fn broken_or_missing_checksum_is_an_error() {
        let text = sample().encode().unwrap();
        let tampered = text.replace("DESCRIPTION=my domain", "DESCRIPTION=my d0main");
        assert!(matches!(
            DomainMetadata::decode(tampered.as_bytes()),
            Err(MetadataError::ChecksumMismatch { .. })
        ));
        let unsealed: String = text
            .lines()
            .filter(|l| !l.starts_with("_SHA"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            DomainMetadata::decode(unsealed.as_bytes()),
            Err(MetadataError::NoChecksum)
        );
        // NUL padding (block storage style) is tolerated.
        let mut padded = text.into_bytes();
        padded.resize(4096, 0);
        assert_eq!(DomainMetadata::decode(&padded).unwrap(), sample());
    }

    #[test]
    fn unknown_keys_survive_a_round_trip() {
        let mut m = sample().to_map();
        m.insert("MASTER_VERSION".into(), "7".into());
        let text = encode(&m).unwrap();
        let md = DomainMetadata::decode(text.as_bytes()).unwrap();
        assert_eq!(md.extra.get("MASTER_VERSION").map(String::as_str), Some("7"));
        assert_eq!(md.encode().unwrap(), text);
    }

    #[test]
    fn rejects_bad_entries_and_descriptions() {
        assert!(DomainMetadata::new_v5(SdUuid::new_random(), DomainType::Nfs, "a\nb", "/x").is_err());
        assert!(
            DomainMetadata::new_v5(SdUuid::new_random(), DomainType::Nfs, &"x".repeat(51), "/x").is_err()
        );
        let mut m = BTreeMap::new();
        m.insert("K".into(), "v\nINJECTED=1".into());
        assert!(matches!(encode(&m), Err(MetadataError::BadEntry(_))));
    }
}
