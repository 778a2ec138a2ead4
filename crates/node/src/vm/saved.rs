//! The file a VM's saved state lives in (a hibernation's or a snapshot's memory volume).
//!
//! Layout: a [`HEADER_LEN`]-byte header, then QEMU's migration stream as QEMU wrote it. The
//! header starts with [`MAGIC`] and holds, as JSON padded with NULs, what the stream needs that
//! the VM's definition does not carry: each NIC's slot (hot plugs and unplugs move NICs off
//! the slots a fresh start would give them, and the stream only loads into the same devices).
//! A file without the magic is a bare stream (older saves); it restores with fresh slots.
//!
//! Pure: encoding, decoding and applying the header; the manager does the I/O.

use serde::{Deserialize, Serialize};

use oxvirt_qemu::NicSpec;

pub const MAGIC: &[u8] = b"OXVIRT-STATE 1\n";
pub const HEADER_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub nics: Vec<SavedNic>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNic {
    pub mac: String,
    pub slot: u8,
}

/// The header for a VM with these NICs (their slots assigned), exactly [`HEADER_LEN`] bytes.
pub fn encode(nics: &[NicSpec]) -> Result<Vec<u8>, String> {
    let h = Header {
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
        return Err(format!("{} NICs do not fit the state header", nics.len()));
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

/// Gives the VM's NICs the slots they had when the state was saved. The NICs must be the
/// same (by MAC): the saved devices are what the stream loads into.
pub fn apply(h: &Header, nics: &mut [NicSpec]) -> Result<(), String> {
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

    #[test]
    fn slots_come_back_by_mac() {
        // The first NIC was unplugged before the save: the other kept slot 1.
        let h = encode(&[nic("56:6F:00:00:00:02", Some(1))]).unwrap();
        assert_eq!(h.len(), HEADER_LEN);
        let d = decode(&h).unwrap().unwrap();
        let mut fresh = vec![nic("56:6f:00:00:00:02", None)];
        apply(&d, &mut fresh).unwrap();
        assert_eq!(fresh[0].slot, Some(1));
    }

    #[test]
    fn a_different_nic_set_is_refused_and_a_bare_stream_has_no_header() {
        let d = decode(&encode(&[nic("56:6f:00:00:00:01", Some(0))]).unwrap())
            .unwrap()
            .unwrap();
        let mut other = vec![nic("56:6f:00:00:00:09", None)];
        let e = apply(&d, &mut other).unwrap_err();
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
                .collect::<Vec<_>>()
        )
        .is_err());
    }
}
