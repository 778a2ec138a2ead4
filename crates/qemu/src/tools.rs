//! Locating QEMU's binaries and reading their versions.
//!
//! Binaries are looked up on `PATH` unless overridden with `OXVIRT_QEMU_SYSTEM` /
//! `OXVIRT_QEMU_IMG` / `OXVIRT_QEMU_IO` / `OXVIRT_QEMU_NBD`, so a missing QEMU is reported once, by name, with the
//! package that provides it, instead of as an opaque spawn failure later.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuTool {
    SystemX86_64,
    Img,
    Io,
    Nbd,
}

impl QemuTool {
    pub fn binary_name(self) -> &'static str {
        match self {
            Self::SystemX86_64 => "qemu-system-x86_64",
            Self::Img => "qemu-img",
            Self::Io => "qemu-io",
            Self::Nbd => "qemu-nbd",
        }
    }
    fn env_override(self) -> &'static str {
        match self {
            Self::SystemX86_64 => "OXVIRT_QEMU_SYSTEM",
            Self::Img => "OXVIRT_QEMU_IMG",
            Self::Io => "OXVIRT_QEMU_IO",
            Self::Nbd => "OXVIRT_QEMU_NBD",
        }
    }
    /// The Debian package that ships the binary.
    pub fn package(self) -> &'static str {
        match self {
            Self::SystemX86_64 => "qemu-system-x86",
            Self::Img | Self::Io | Self::Nbd => "qemu-utils",
        }
    }

    /// Full path of the binary, or an error naming it and its package.
    pub fn locate(self) -> Result<PathBuf, ToolError> {
        if let Some(p) = std::env::var_os(self.env_override()) {
            let p = PathBuf::from(p);
            return if is_executable(&p) {
                Ok(p)
            } else {
                Err(ToolError::Missing {
                    tool: self.binary_name(),
                    package: self.package(),
                })
            };
        }
        find_in_path(self.binary_name()).ok_or(ToolError::Missing {
            tool: self.binary_name(),
            package: self.package(),
        })
    }

    /// Runs `<tool> --version` and parses the first "version X.Y.Z".
    pub fn version(self) -> Result<ToolVersion, ToolError> {
        let path = self.locate()?;
        let out = Command::new(&path)
            .arg("--version")
            .output()
            .map_err(|source| ToolError::Spawn {
                tool: self.binary_name(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        ToolVersion::parse(&text).ok_or_else(|| ToolError::UnparsableVersion {
            tool: self.binary_name(),
            output: text.lines().next().unwrap_or_default().to_string(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{tool} not found (install the Debian package {package}, or run scripts/deps.sh)")]
    Missing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("cannot run {tool}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse the version of {tool} from {output:?}")]
    UnparsableVersion { tool: &'static str, output: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ToolVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl ToolVersion {
    /// Parses the first `version X.Y[.Z]` in QEMU's `--version` text, or (qemu-nbd prints
    /// `qemu-nbd X.Y.Z`) the first number on its first line.
    pub fn parse(text: &str) -> Option<Self> {
        let token = match text.find("version ") {
            Some(i) => text[i + "version ".len()..].split_whitespace().next()?,
            None => text
                .lines()
                .next()?
                .split_whitespace()
                .find(|t| t.starts_with(|c: char| c.is_ascii_digit()))?,
        };
        let mut parts = token.split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next()??;
        let micro = parts.next().flatten().unwrap_or(0);
        Some(Self { major, minor, micro })
    }
}

impl std::fmt::Display for ToolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_version_lines() {
        let v =
            ToolVersion::parse("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n").unwrap();
        assert_eq!(
            v,
            ToolVersion {
                major: 7,
                minor: 2,
                micro: 22
            }
        );
        let v = ToolVersion::parse("qemu-img version 10.0.2 (Debian)").unwrap();
        assert_eq!(v.to_string(), "10.0.2");
        assert_eq!(ToolVersion::parse("qemu-io version 8.1").unwrap().micro, 0);
        assert!(ToolVersion::parse("no version here").is_none());
        let v = ToolVersion::parse("qemu-nbd 7.2.22 (Debian 1:7.2+dfsg-7)\nWritten by").unwrap();
        assert_eq!(v.to_string(), "7.2.22");
        assert!(ToolVersion::parse("qemu-nbd\n").is_none());
    }

    #[test]
    fn installed_tools_report_versions() {
        for tool in [QemuTool::SystemX86_64, QemuTool::Img, QemuTool::Io, QemuTool::Nbd] {
            let v = tool.version().unwrap_or_else(|e| panic!("{e}"));
            assert!(v.major >= 7, "{} {v} is older than QEMU 7", tool.binary_name());
        }
    }
}
