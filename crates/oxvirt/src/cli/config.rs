//! The stored session: `~/.config/oxvirt/cli.json` (or `$XDG_CONFIG_HOME/oxvirt/cli.json`, or
//! the file `--config`/`OXVIRT_CLI_CONFIG` names) holding the engine's URL, the user, the SSO
//! token and how to trust the engine.
//!
//! Invariants: the file is only ever replaced whole (temporary file, fsync, rename, fsync of
//! the directory), is created with mode 0600 in a 0700 directory, and never holds a password.
//! A failed login writes nothing.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::transport::Trust;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    /// `https://host:port`.
    pub url: String,
    /// `admin@internal`.
    pub user: String,
    pub token: String,
    /// Seconds since the epoch when the engine said the token expires.
    #[serde(default)]
    pub expires: Option<u64>,
    /// The engine's CA (PEM); absent with `insecure`.
    #[serde(default)]
    pub ca_pem: Option<String>,
    #[serde(default)]
    pub insecure: bool,
}

impl Session {
    pub fn trust(&self) -> anyhow::Result<Trust> {
        match (&self.ca_pem, self.insecure) {
            (Some(pem), _) => Ok(Trust::Ca(pem.clone())),
            (None, true) => Ok(Trust::Insecure),
            (None, false) => {
                anyhow::bail!("the stored session has neither a CA nor --insecure; log in again")
            }
        }
    }
}

/// The session file: `explicit`, else `$XDG_CONFIG_HOME/oxvirt/cli.json`, else
/// `$HOME/.config/oxvirt/cli.json`.
pub fn path(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!("neither XDG_CONFIG_HOME nor HOME is set: give --config FILE")
                })?;
            PathBuf::from(home).join(".config")
        }
    };
    Ok(base.join("oxvirt").join("cli.json"))
}

pub fn load(path: &Path) -> anyhow::Result<Session> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "not logged in (no session in {}): run `oxvirt login --url https://ENGINE:PORT --user admin@internal` first",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_str(&text).with_context(|| {
        format!(
            "the session file {} is not valid; remove it and log in again",
            path.display()
        )
    })
}

/// Replaces the session file atomically, readable by its owner only.
pub fn save(path: &Path, s: &Session) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
    }
    let name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{} is not a file path", path.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // An old temporary file keeps its mode through `create`: set it again.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(serde_json::to_string_pretty(s).expect("session").as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("writing the session to {}", path.display()))
    })
}

/// Removes the session file; `false` when there was none.
pub fn remove(path: &Path) -> anyhow::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_session_is_private_and_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/cli.json");
        let s = Session {
            url: "https://127.0.0.1:1".into(),
            user: "admin@internal".into(),
            token: "t".into(),
            expires: Some(5),
            ca_pem: None,
            insecure: true,
        };
        save(&p, &s).unwrap();
        assert_eq!(load(&p).unwrap(), s);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(p.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        assert!(remove(&p).unwrap());
        assert!(!remove(&p).unwrap());
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("not logged in"), "{e}");
    }
}
