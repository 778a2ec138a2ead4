//! Choosing the accelerator.
//!
//! KVM is used when `/dev/kvm` answers `KVM_GET_API_VERSION` with the stable API (12). The probe
//! cannot tell that a nested KVM hangs Linux guests (as on our CI machines), so the admin can
//! always force TCG; `Accel::Auto` resolves to KVM only when the probe succeeds.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when the probe succeeds, else TCG.
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(format!(
                "unknown accelerator {other:?}: expected auto, kvm or tcg"
            )),
        }
    }
}

impl Accel {
    /// Resolves `Auto` with the probe; `Kvm` and `Tcg` are kept as the admin chose them.
    pub fn resolve(self, probe: &KvmProbe) -> Accel {
        match self {
            Self::Auto if probe.usable() => Self::Kvm,
            Self::Auto => Self::Tcg,
            other => other,
        }
    }
    /// The value for QEMU's `-accel`.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg | Self::Auto => "tcg",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum KvmProbe {
    Usable { api_version: i32 },
    Unusable { reason: String },
}

impl KvmProbe {
    pub fn usable(&self) -> bool {
        matches!(self, Self::Usable { .. })
    }
}

const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_STABLE_API: i32 = 12;

pub fn probe_kvm() -> KvmProbe {
    let f = match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => f,
        Err(e) => {
            return KvmProbe::Unusable {
                reason: format!("/dev/kvm: {e}"),
            }
        }
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if v == KVM_STABLE_API {
        KvmProbe::Usable { api_version: v }
    } else if v < 0 {
        KvmProbe::Unusable {
            reason: format!("KVM_GET_API_VERSION: {}", std::io::Error::last_os_error()),
        }
    } else {
        KvmProbe::Unusable {
            reason: format!("KVM API version {v}, expected {KVM_STABLE_API}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_probe_and_explicit_choices_stay() {
        let yes = KvmProbe::Usable { api_version: 12 };
        let no = KvmProbe::Unusable {
            reason: "none".into(),
        };
        assert_eq!(Accel::Auto.resolve(&yes), Accel::Kvm);
        assert_eq!(Accel::Auto.resolve(&no), Accel::Tcg);
        assert_eq!(Accel::Tcg.resolve(&yes), Accel::Tcg);
        assert_eq!(Accel::Kvm.resolve(&no), Accel::Kvm);
        assert_eq!("tcg".parse::<Accel>().unwrap(), Accel::Tcg);
        assert!("xen".parse::<Accel>().unwrap_err().contains("xen"));
    }

    #[test]
    fn probe_answers_without_panicking() {
        // Either answer is valid on a given machine; what matters is that a reason comes with "no".
        match probe_kvm() {
            KvmProbe::Usable { api_version } => assert_eq!(api_version, KVM_STABLE_API),
            KvmProbe::Unusable { reason } => assert!(!reason.is_empty()),
        }
    }
}
