//! The file a VM's saved state lives in (a hibernation's or a snapshot's memory volume).
//!
//! Layout: a [`HEADER_LEN`]-byte header, then QEMU's migration stream as QEMU wrote it. The
//! header starts with [`MAGIC`] and holds, as JSON padded with NULs, what the stream needs that
//! the VM's definition does not carry: each NIC's and each disk's slot (hot plugs and unplugs
//! move devices off the slots a fresh start would give them, and the stream only loads into
//! the same devices). A file without the magic is a bare stream (older saves), and a header
//! without disks an older one; they restore with fresh slots.
//!
//! Pure: encoding, decoding and applying the header; the manager does the I/O.

use serde::{Deserialize, Serialize};

use oxvirt_qemu::NicSpec;
use oxvirt_types::ImgUuid;

use super::VmDisk;

pub const MAGIC: &[u8] = b"OXVIRT-STATE 1\n";
pub const HEADER_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub nics: Vec<SavedNic>,
    /// Disks on storage images, by image.
    #[serde(default)]
    pub disks: Vec<SavedDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    pub image: ImgUuid,
    pub slot: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNic {
    pub mac: String,
    pub slot: u8,
}

/// The header for a VM with these NICs and disks (their slots assigned), exactly
/// [`HEADER_LEN`] bytes.
pub fn encode(nics: &[NicSpec], disks: &[VmDisk]) -> Result<Vec<u8>, String> {
    let h = Header {
        disks: disks
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                Some(SavedDisk {
                    image: d.image?.img,
                    slot: d.slot.unwrap_or(i as u8),
                })
            })
            .collect(),
        nics: nics
            .iter()
            .enumerate()
            .map(|(i, n)| SavedNic {
                mac: n.mac.to_ascii_lowercase(),
                slot: n.slot.unwrap_or(i as u8),
            })
            .collect(),
    };
    let mut out = MAGIC.to_vec();
    out.extend(serde_json::to_vec(&h).map_err(|e| e.to_string())?);
    if out.len() > HEADER_LEN {
        return Err(format!(
            "{} NICs and {} disks do not fit the state header",
            nics.len(),
            disks.len()
        ));
    }
    out.resize(HEADER_LEN, 0);
    Ok(out)
}

/// The header at the start of a file: `None` for a bare stream.
pub fn decode(head: &[u8]) -> Option<Result<Header, String>> {
    let body = head.strip_prefix(MAGIC)?;
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    Some(serde_json::from_slice(&body[..end]).map_err(|e| format!("a damaged state header: {e}")))
}

/// Gives the VM's NICs and disks the slots they had when the state was saved. They must be
/// the same (NICs by MAC, disks by image): the saved devices are what the stream loads into.
pub fn apply(h: &Header, nics: &mut [NicSpec], disks: &mut [VmDisk]) -> Result<(), String> {
    if !h.disks.is_empty() {
        let mut saved: Vec<String> = h.disks.iter().map(|d| d.image.to_string()).collect();
        let mut now: Vec<String> = disks
            .iter()
            .filter_map(|d| Some(d.image?.img.to_string()))
            .collect();
        saved.sort_unstable();
        now.sort_unstable();
        if saved != now {
            return Err(format!(
                "the state was saved with the disks of images [{}] and the VM has [{}] now",
                saved.join(", "),
                now.join(", ")
            ));
        }
    }
    apply_nics(h, nics)?;
    for d in disks.iter_mut() {
        if let Some(s) = d.image.and_then(|i| h.disks.iter().find(|s| s.image == i.img)) {
            d.slot = Some(s.slot);
        }
    }
    Ok(())
}

fn apply_nics(h: &Header, nics: &mut [NicSpec]) -> Result<(), String> {
    let mut saved: Vec<&str> = h.nics.iter().map(|n| n.mac.as_str()).collect();
    let mut now: Vec<String> = nics.iter().map(|n| n.mac.to_ascii_lowercase()).collect();
    saved.sort_unstable();
    now.sort_unstable();
    if saved != now {
        return Err(format!(
            "the state was saved with NICs [{}] and the VM has [{}] now",
            saved.join(", "),
            now.join(", ")
        ));
    }
    for n in nics.iter_mut() {
        let mac = n.mac.to_ascii_lowercase();
        n.slot = h.nics.iter().find(|s| s.mac == mac).map(|s| s.slot);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxvirt_qemu::NicBackend;

    fn nic(mac: &str, slot: Option<u8>) -> NicSpec {
        let mut n = NicSpec::new(mac, NicBackend::User);
        n.slot = slot;
        n
    }

    fn disk(img: &str, slot: Option<u8>) -> VmDisk {
        VmDisk {
            image: Some(super::super::ImageRef {
                sd: "6f2a3c51-93c4-4a2e-9d43-2b1a7c9e0f11".parse().unwrap(),
                img: img.parse().unwrap(),
            }),
            slot,
            ..VmDisk::new(Vec::new())
        }
    }

    const IMG1: &str = "4f1c9a0e-2b3d-4c5e-8f70-0123456789a1";
    const IMG2: &str = "4f1c9a0e-2b3d-4c5e-8f70-0123456789a2";

    #[test]
    fn slots_come_back_by_mac_and_image() {
        // The first NIC and the first disk were unplugged before the save: the others kept
        // slot 1.
        let h = encode(&[nic("56:6F:00:00:00:02", Some(1))], &[disk(IMG2, Some(1))]).unwrap();
        assert_eq!(h.len(), HEADER_LEN);
        let d = decode(&h).unwrap().unwrap();
        let mut fresh = vec![nic("56:6f:00:00:00:02", None)];
        let mut disks = vec![disk(IMG2, None)];
        apply(&d, &mut fresh, &mut disks).unwrap();
        assert_eq!((fresh[0].slot, disks[0].slot), (Some(1), Some(1)));
        // Another disk set is refused; a header from before disks were saved leaves them be.
        let mut other = vec![disk(IMG1, None)];
        let e = apply(&d, &mut fresh, &mut other).unwrap_err();
        assert!(e.contains(IMG1) && e.contains(IMG2), "{e}");
        let old = Header {
            nics: d.nics.clone(),
            disks: Vec::new(),
        };
        apply(&old, &mut fresh, &mut other).unwrap();
        assert_eq!(other[0].slot, None);
    }

    #[test]
    fn a_different_nic_set_is_refused_and_a_bare_stream_has_no_header() {
        let d = decode(&encode(&[nic("56:6f:00:00:00:01", Some(0))], &[]).unwrap())
            .unwrap()
            .unwrap();
        let mut other = vec![nic("56:6f:00:00:00:09", None)];
        let e = apply(&d, &mut other, &mut []).unwrap_err();
        assert!(
            e.contains("56:6f:00:00:00:01") && e.contains("56:6f:00:00:00:09"),
            "{e}"
        );
        assert_eq!(other[0].slot, None, "a refused header changed the NICs");
        assert!(decode(b"QEVM\x00\x00\x00\x03").is_none());
        assert!(decode(b"OXVIRT-STATE 1\n{not json").unwrap().is_err());
        assert!(encode(
            &(0..200)
                .map(|i| nic(&format!("56:6f:00:00:01:{i:02x}"), None))
                .collect::<Vec<_>>(),
            &[]
        )
        .is_err());
    }
}
