//! Typed identifiers.
//!
//! Every object on shared storage is named by a UUID, and those UUIDs become path components
//! (`<sdUUID>/images/<imgUUID>/<volUUID>`). Parsing them through these types is what keeps a
//! request from naming a path: only the canonical hyphenated form is accepted, so `..`, `/` and
//! friends can never reach the file system.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A string that is not a canonical UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: expected a UUID like 00000000-0000-0000-0000-000000000000")]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
}

/// Parses only the canonical 36-character hyphenated form (any case), unlike `Uuid::parse_str`
/// which also takes braces, URNs and the simple form.
fn parse_canonical(kind: &'static str, s: &str) -> Result<Uuid, IdError> {
    let err = || IdError {
        kind,
        value: s.chars().take(64).collect(),
    };
    if s.len() != 36 {
        return Err(err());
    }
    for (i, b) in s.bytes().enumerate() {
        let ok = match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        };
        if !ok {
            return Err(err());
        }
    }
    Uuid::parse_str(s).map_err(|_| err())
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh random id.
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }
            /// The all-zero id (VDSM's "no parent", oVirt's Blank template).
            pub const fn nil() -> Self {
                Self(Uuid::nil())
            }
            pub const fn from_uuid(u: Uuid) -> Self {
                Self(u)
            }
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
            pub fn is_nil(&self) -> bool {
                self.0.is_nil()
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                parse_canonical($kind, s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.hyphenated())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

uuid_id!(
    /// A storage domain (`sdUUID`).
    SdUuid, "storage domain id"
);
uuid_id!(
    /// A storage pool, one per data center (`spUUID`).
    PoolUuid, "storage pool id"
);
uuid_id!(
    /// An image: one virtual disk, a directory of volumes forming a chain (`imgUUID`).
    ImgUuid, "image id"
);
uuid_id!(
    /// A volume: one layer of an image's chain (`volUUID`).
    VolUuid, "volume id"
);
uuid_id!(
    /// A persistent SPM task journaled under `master/tasks/`.
    TaskId, "task id"
);
uuid_id!(
    /// A node-side job (live merge, migration) or an engine job.
    JobId, "job id"
);
uuid_id!(
    /// A virtual machine.
    VmId, "VM id"
);
uuid_id!(
    /// An image transfer (an upload or download of a disk); also its ticket's id.
    TransferId, "image transfer id"
);
uuid_id!(
    /// A data center (the engine's object; its storage pool has a `PoolUuid`).
    DcId, "data center id"
);
uuid_id!(
    /// A cluster of hosts inside a data center.
    ClusterId, "cluster id"
);
uuid_id!(
    /// A host as the engine knows it (not its lockspace `HostId`).
    HostUuid, "host id"
);
uuid_id!(
    /// A template; the nil id is the built-in Blank template.
    TemplateId, "template id"
);
uuid_id!(
    /// A VM snapshot.
    SnapshotId, "snapshot id"
);
uuid_id!(
    /// A VM's network interface.
    NicId, "NIC id"
);
uuid_id!(
    /// An engine user.
    UserId, "user id"
);
uuid_id!(
    /// An engine saga (a persisted multi-step command).
    SagaId, "saga id"
);
uuid_id!(
    /// A step of an engine job.
    StepId, "step id"
);
uuid_id!(
    /// A VM affinity group.
    AffinityGroupId, "affinity group id"
);
uuid_id!(
    /// A tag (oVirt's tags: a tree of labels on VMs, hosts and templates).
    TagId, "tag id"
);
uuid_id!(
    /// A quality-of-service entry of a data center (storage limits).
    QosId, "QoS id"
);
uuid_id!(
    /// A disk profile of a storage domain (the storage QoS its disks get).
    DiskProfileId, "disk profile id"
);
uuid_id!(
    /// A logical network of a data center.
    NetworkId, "network id"
);
uuid_id!(
    /// A vNIC profile (one per VM network, as oVirt creates them).
    VnicProfileId, "vNIC profile id"
);
uuid_id!(
    /// Which host NIC carries a logical network on a host.
    NetworkAttachmentId, "network attachment id"
);

/// A host id in a lockspace: 1..=2000, as sanlock allows (VDSM's mailbox limits it to 250).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct HostId(u16);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid host id {0}: must be 1..={max}", max = HostId::MAX)]
pub struct HostIdError(pub u64);

impl HostId {
    pub const MAX: u16 = 2000;

    pub fn new(id: u64) -> Result<Self, HostIdError> {
        if (1..=u64::from(Self::MAX)).contains(&id) {
            Ok(Self(id as u16))
        } else {
            Err(HostIdError(id))
        }
    }
    pub const fn get(self) -> u16 {
        self.0
    }
    /// Zero-based index: the host's sector in a lockspace, its dblock in a Paxos lease.
    pub const fn index(self) -> usize {
        self.0 as usize - 1
    }
}

impl TryFrom<u64> for HostId {
    type Error = HostIdError;
    fn try_from(v: u64) -> Result<Self, HostIdError> {
        Self::new(v)
    }
}

impl From<HostId> for u64 {
    fn from(h: HostId) -> u64 {
        u64::from(h.0)
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for HostId {
    type Err = HostIdError;
    fn from_str(s: &str) -> Result<Self, HostIdError> {
        let v: u64 = s.trim().parse().map_err(|_| HostIdError(0))?;
        Self::new(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_uuids_round_trip() {
        let s = "4f1c9a0e-2b3d-4c5e-8f70-0123456789ab";
        let id: SdUuid = s.parse().unwrap();
        assert_eq!(id.to_string(), s);
        let upper: VolUuid = s.to_uppercase().parse().unwrap();
        assert_eq!(upper.to_string(), s, "display is always lowercase");
    }

    #[test]
    fn path_like_and_non_canonical_ids_are_rejected() {
        for bad in [
            "",
            "..",
            "../../etc/passwd",
            "4f1c9a0e2b3d4c5e8f700123456789ab",
            "{4f1c9a0e-2b3d-4c5e-8f70-0123456789ab}",
            "urn:uuid:4f1c9a0e-2b3d-4c5e-8f70-0123456789ab",
            "4f1c9a0e-2b3d-4c5e-8f70-0123456789a/",
            "4f1c9a0e-2b3d-4c5e-8f70-0123456789abc",
        ] {
            let err = bad.parse::<ImgUuid>().unwrap_err();
            assert_eq!(err.kind, "image id");
        }
    }

    #[test]
    fn serde_uses_the_string_form_and_validates() {
        let id = VmId::new_random();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<VmId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<VmId>("\"../x\"").is_err());
    }

    #[test]
    fn host_id_range() {
        assert!(HostId::new(0).is_err());
        assert_eq!(HostId::new(1).unwrap().index(), 0);
        assert_eq!(HostId::new(2000).unwrap().get(), 2000);
        assert!(HostId::new(2001).is_err());
        assert!(serde_json::from_str::<HostId>("0").is_err());
        assert_eq!(serde_json::from_str::<HostId>("7").unwrap().get(), 7);
    }
}
