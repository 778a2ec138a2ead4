//! Atomic writes of key material.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::PkiError;

pub(crate) fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `data` to `path` with mode 0600: temp file created 0600 (never briefly readable),
/// fsync, rename, fsync of the directory.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    write_atomic(path, data, 0o600)
}

pub(crate) fn write_public(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    write_atomic(path, data, 0o644)
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(err)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}
