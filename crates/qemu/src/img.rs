//! A typed wrapper around `qemu-img`.
//!
//! Every verb builds one command line, runs it, and turns its output into typed results:
//! `--output=json` where `qemu-img` offers it, the `-p` progress lines (`(12.34/100%)`, separated
//! by `\r`) into a callback for long-running verbs. A failed command becomes an [`ImgError`]
//! carrying the command line and its standard error, so the caller never has to guess why.
//!
//! Relative backing file names (VDSM's convention: the bare parent volUUID) are resolved by
//! `qemu-img` against the image's directory; commands that create or rewrite such a reference run
//! with that directory as their working directory, as VDSM does.
//!
//! Invariant: this module keeps no state between calls; [`QemuImg`] only remembers where the
//! binary is.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::cmdline::ImageFormat;
use crate::tools::{QemuTool, ToolError};

/// Why a `qemu-img` call failed.
#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot parse the output of `{command}`: {output:?}")]
    Output {
        command: String,
        output: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Preallocation modes of `qemu-img create`/`convert` (`-o preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preallocation {
    Off,
    Metadata,
    Falloc,
    Full,
}

impl Preallocation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Metadata => "metadata",
            Self::Falloc => "falloc",
            Self::Full => "full",
        }
    }
}

/// `qemu-img create` arguments.
#[derive(Debug, Clone)]
pub struct CreateRequest<'a> {
    pub path: &'a Path,
    pub format: ImageFormat,
    /// Virtual size in bytes (may be omitted with a backing file: it inherits the backing size).
    pub size: Option<u64>,
    /// qcow2 `compat=` (VDSM writes "1.1" on domains of version ≥ 4).
    pub qcow2_compat: Option<&'a str>,
    /// Backing file as it is written into the image (relative to the image's directory).
    pub backing: Option<(&'a str, ImageFormat)>,
    pub preallocation: Option<Preallocation>,
    /// `-u`: do not open the backing file (its size must then be given).
    pub unsafe_backing: bool,
}

/// `qemu-img convert` arguments.
#[derive(Debug, Clone)]
pub struct ConvertRequest<'a> {
    pub src: &'a Path,
    pub src_format: Option<ImageFormat>,
    pub dst: &'a Path,
    pub dst_format: ImageFormat,
    pub qcow2_compat: Option<&'a str>,
    /// Backing file of the destination (written into it, relative to its directory). With a
    /// backing file only the clusters allocated in the source's top layer are copied, so a
    /// chain is copied layer by layer.
    pub backing: Option<(&'a str, ImageFormat)>,
    pub preallocation: Option<Preallocation>,
}

/// `qemu-img measure` arguments: either an existing image or a size.
#[derive(Debug, Clone)]
pub struct MeasureRequest<'a> {
    pub src: Option<(&'a Path, Option<ImageFormat>)>,
    pub size: Option<u64>,
    pub out_format: ImageFormat,
}

/// `qemu-img info --output=json` (one image).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
    #[serde(default)]
    pub actual_size: Option<u64>,
    #[serde(default)]
    pub cluster_size: Option<u64>,
    #[serde(default)]
    pub backing_filename: Option<String>,
    #[serde(default)]
    pub full_backing_filename: Option<String>,
    #[serde(default)]
    pub backing_filename_format: Option<String>,
    #[serde(default)]
    pub dirty_flag: Option<bool>,
    #[serde(default)]
    pub format_specific: Option<FormatSpecific>,
}

impl ImageInfo {
    /// qcow2 `compat` ("0.10" or "1.1"), if this is a qcow2 image.
    pub fn qcow2_compat(&self) -> Option<&str> {
        self.format_specific
            .as_ref()
            .filter(|f| f.kind == "qcow2")
            .and_then(|f| f.data.get("compat"))
            .and_then(|v| v.as_str())
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub data: serde_json::Map<String, serde_json::Value>,
}

/// `qemu-img measure --output=json`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Measure {
    /// Bytes needed for the data currently allocated.
    pub required: u64,
    /// Bytes needed if every cluster were allocated.
    pub fully_allocated: u64,
    #[serde(default)]
    pub bitmaps: Option<u64>,
}

/// `qemu-img check --output=json`. Exit status 2 (corruptions) and 3 (leaks) still produce a
/// report; they are reflected here rather than as errors.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    pub filename: String,
    pub format: String,
    pub check_errors: u64,
    #[serde(default)]
    pub corruptions: u64,
    #[serde(default)]
    pub leaks: u64,
    #[serde(default)]
    pub corruptions_fixed: u64,
    #[serde(default)]
    pub leaks_fixed: u64,
    #[serde(default)]
    pub image_end_offset: Option<u64>,
    #[serde(default)]
    pub total_clusters: Option<u64>,
    #[serde(default)]
    pub allocated_clusters: Option<u64>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.check_errors == 0 && self.corruptions == 0 && self.leaks == 0
    }
}

/// One extent of `qemu-img map --output=json`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct MapExtent {
    pub start: u64,
    pub length: u64,
    /// Which layer the data comes from: 0 is the image itself, 1 its backing file, ...
    pub depth: u32,
    #[serde(default)]
    pub present: Option<bool>,
    pub zero: bool,
    pub data: bool,
    #[serde(default)]
    pub offset: Option<u64>,
}

/// Result of `qemu-img compare`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comparison {
    Identical,
    /// qemu-img's own description of the first difference.
    Differ(String),
}

/// Locates `qemu-img` once; every verb runs it afresh.
#[derive(Debug, Clone)]
pub struct QemuImg {
    bin: PathBuf,
}

impl QemuImg {
    /// Finds `qemu-img` (see [`QemuTool::locate`]).
    pub fn locate() -> Result<Self, ImgError> {
        Ok(Self {
            bin: QemuTool::Img.locate()?,
        })
    }

    pub fn with_binary(bin: PathBuf) -> Self {
        Self { bin }
    }

    pub fn binary(&self) -> &Path {
        &self.bin
    }

    /// `qemu-img info --output=json -U`: reads the image even while a VM holds it open.
    pub fn info(&self, path: &Path, format: Option<ImageFormat>) -> Result<ImageInfo, ImgError> {
        let mut a = args(["info", "--output=json", "-U"]);
        push_format(&mut a, "-f", format);
        a.push(path.into());
        self.json(a, cwd_of(path))
    }

    /// `qemu-img info --backing-chain`: the image first, then each backing file down to the base.
    pub fn info_chain(&self, path: &Path, format: Option<ImageFormat>) -> Result<Vec<ImageInfo>, ImgError> {
        let mut a = args(["info", "--output=json", "-U", "--backing-chain"]);
        push_format(&mut a, "-f", format);
        a.push(path.into());
        self.json(a, cwd_of(path))
    }

    /// `qemu-img create`.
    pub fn create(&self, req: &CreateRequest<'_>) -> Result<(), ImgError> {
        let mut a = args(["create", "-q"]);
        push_format(&mut a, "-f", Some(req.format));
        let mut opts = Vec::new();
        if req.format == ImageFormat::Qcow2 {
            if let Some(c) = req.qcow2_compat {
                opts.push(format!("compat={c}"));
            }
        }
        if let Some(p) = req.preallocation {
            opts.push(format!("preallocation={}", p.as_str()));
        }
        if !opts.is_empty() {
            a.push("-o".into());
            a.push(opts.join(",").into());
        }
        if let Some((backing, fmt)) = req.backing {
            a.push("-b".into());
            a.push(backing.into());
            push_format(&mut a, "-F", Some(fmt));
        }
        if req.unsafe_backing {
            a.push("-u".into());
        }
        a.push(req.path.into());
        if let Some(size) = req.size {
            a.push(size.to_string().into());
        }
        self.run(a, cwd_of(req.path), None).map(drop)
    }

    /// `qemu-img convert -p -t none -T none`, reporting progress (0.0..=100.0).
    pub fn convert(&self, req: &ConvertRequest<'_>, progress: &mut dyn FnMut(f64)) -> Result<(), ImgError> {
        let mut a = args(["convert", "-p", "-t", "none", "-T", "none"]);
        push_format(&mut a, "-f", req.src_format);
        push_format(&mut a, "-O", Some(req.dst_format));
        let mut opts = Vec::new();
        if req.dst_format == ImageFormat::Qcow2 {
            if let Some(c) = req.qcow2_compat {
                opts.push(format!("compat={c}"));
            }
        }
        if let Some(p) = req.preallocation {
            opts.push(format!("preallocation={}", p.as_str()));
        }
        if let Some((backing, fmt)) = req.backing {
            opts.push(format!("backing_file={backing}"));
            opts.push(format!("backing_fmt={}", fmt.driver()));
        }
        if !opts.is_empty() {
            a.push("-o".into());
            a.push(opts.join(",").into());
        }
        a.push(req.src.into());
        a.push(req.dst.into());
        // Relative backing names are resolved against the destination's directory.
        self.run(a, cwd_of(req.dst), Some(progress)).map(drop)
    }

    /// `qemu-img commit -p -t none`: writes `top`'s data into `base` (default: its backing
    /// file). `keep_top` (`-d`) leaves top's clusters in place, which is faster and keeps every
    /// view through `top` valid while the commit runs.
    pub fn commit(
        &self,
        top: &Path,
        top_format: ImageFormat,
        base: Option<&Path>,
        keep_top: bool,
        progress: &mut dyn FnMut(f64),
    ) -> Result<(), ImgError> {
        let mut a = args(["commit", "-p", "-t", "none"]);
        push_format(&mut a, "-f", Some(top_format));
        if let Some(b) = base {
            a.push("-b".into());
            a.push(b.into());
        }
        if keep_top {
            a.push("-d".into());
        }
        a.push(top.into());
        self.run(a, cwd_of(top), Some(progress)).map(drop)
    }

    /// `qemu-img rebase`; with `unsafe_` (`-u`) only the header's backing reference changes.
    /// `backing: None` makes the image standalone.
    pub fn rebase(
        &self,
        image: &Path,
        format: ImageFormat,
        backing: Option<(&str, ImageFormat)>,
        unsafe_: bool,
    ) -> Result<(), ImgError> {
        let mut a = args(["rebase", "-q", "-t", "none"]);
        push_format(&mut a, "-f", Some(format));
        if unsafe_ {
            a.push("-u".into());
        }
        a.push("-b".into());
        match backing {
            Some((b, fmt)) => {
                a.push(b.into());
                push_format(&mut a, "-F", Some(fmt));
            }
            None => a.push("".into()),
        }
        a.push(image.into());
        self.run(a, cwd_of(image), None).map(drop)
    }

    /// `qemu-img resize` to `size` bytes (growing only; shrinking needs `--shrink`, not offered).
    pub fn resize(&self, image: &Path, format: ImageFormat, size: u64) -> Result<(), ImgError> {
        let mut a = args(["resize", "-q"]);
        push_format(&mut a, "-f", Some(format));
        a.push(image.into());
        a.push(size.to_string().into());
        self.run(a, cwd_of(image), None).map(drop)
    }

    /// `qemu-img measure --output=json`.
    pub fn measure(&self, req: &MeasureRequest<'_>) -> Result<Measure, ImgError> {
        let mut a = args(["measure", "--output=json"]);
        push_format(&mut a, "-O", Some(req.out_format));
        if let Some(size) = req.size {
            a.push("--size".into());
            a.push(size.to_string().into());
        }
        let mut cwd = None;
        if let Some((src, fmt)) = req.src {
            a.push("-U".into());
            push_format(&mut a, "-f", fmt);
            a.push(src.into());
            cwd = cwd_of(src);
        }
        self.json(a, cwd)
    }

    /// `qemu-img check --output=json`.
    pub fn check(&self, image: &Path, format: Option<ImageFormat>) -> Result<CheckReport, ImgError> {
        let mut a = args(["check", "--output=json", "-U"]);
        push_format(&mut a, "-f", format);
        a.push(image.into());
        let command = describe(&self.bin, &a);
        let out = self.output(a, cwd_of(image))?;
        // 0 clean, 2 corruptions, 3 leaks: all produce a report. 1 means the check did not run.
        match out.status.code() {
            Some(0) | Some(2) | Some(3) => parse_json(&command, &out.stdout),
            _ => Err(failed(command, &out.status, &out.stderr)),
        }
    }

    /// `qemu-img check -r leaks --output=json`: frees clusters an interrupted writer leaked
    /// (harmless to data, but wasted space); returns the report after the repair.
    pub fn repair_leaks(&self, image: &Path, format: ImageFormat) -> Result<CheckReport, ImgError> {
        let mut a = args(["check", "--output=json", "-r", "leaks"]);
        push_format(&mut a, "-f", Some(format));
        a.push(image.into());
        let command = describe(&self.bin, &a);
        let out = self.output(a, cwd_of(image))?;
        match out.status.code() {
            Some(0) | Some(2) | Some(3) => parse_json(&command, &out.stdout),
            _ => Err(failed(command, &out.status, &out.stderr)),
        }
    }

    /// `qemu-img map --output=json`.
    pub fn map(&self, image: &Path, format: Option<ImageFormat>) -> Result<Vec<MapExtent>, ImgError> {
        let mut a = args(["map", "--output=json", "-U"]);
        push_format(&mut a, "-f", format);
        a.push(image.into());
        self.json(a, cwd_of(image))
    }

    /// `qemu-img compare` of the guest-visible contents of two images (whole chains).
    /// `strict` (`-s`) also fails when the sizes differ or one image allocates what the other
    /// does not.
    pub fn compare(&self, a_img: &Path, b_img: &Path, strict: bool) -> Result<Comparison, ImgError> {
        let mut a = args(["compare", "-U"]);
        if strict {
            a.push("-s".into());
        }
        a.push(a_img.into());
        a.push(b_img.into());
        let command = describe(&self.bin, &a);
        let out = self.output(a, None)?;
        match out.status.code() {
            Some(0) => Ok(Comparison::Identical),
            Some(1) => Ok(Comparison::Differ(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            )),
            _ => Err(failed(command, &out.status, &out.stderr)),
        }
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        a: Vec<OsString>,
        cwd: Option<PathBuf>,
    ) -> Result<T, ImgError> {
        let command = describe(&self.bin, &a);
        let out = self.run(a, cwd, None)?;
        parse_json(&command, &out)
    }

    /// A `qemu-img` command that dies with its parent: an operation interrupted by the death of
    /// its process is redone by recovery, which must not race a still-running orphan for the
    /// image locks.
    fn command(&self) -> Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&self.bin);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    fn output(&self, a: Vec<OsString>, cwd: Option<PathBuf>) -> Result<std::process::Output, ImgError> {
        let mut cmd = self.command();
        cmd.args(&a).stdin(Stdio::null());
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        cmd.output().map_err(|source| ImgError::Spawn {
            command: describe(&self.bin, &a),
            source,
        })
    }

    /// Runs the command; returns its stdout. With `progress`, stdout is parsed as `-p` output
    /// while the command runs.
    fn run(
        &self,
        a: Vec<OsString>,
        cwd: Option<PathBuf>,
        progress: Option<&mut dyn FnMut(f64)>,
    ) -> Result<Vec<u8>, ImgError> {
        let command = describe(&self.bin, &a);
        tracing::debug!(%command, "qemu-img");
        let Some(progress) = progress else {
            let out = self.output(a, cwd)?;
            return if out.status.success() {
                Ok(out.stdout)
            } else {
                Err(failed(command, &out.status, &out.stderr))
            };
        };
        let mut cmd = self.command();
        cmd.args(&a)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd.spawn().map_err(|source| ImgError::Spawn {
            command: command.clone(),
            source,
        })?;
        let mut stderr = child.stderr.take().expect("piped stderr");
        let err_thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf);
            buf
        });
        let mut stdout = child.stdout.take().expect("piped stdout");
        let mut parser = ProgressParser::default();
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    for p in parser.feed(&buf[..n]) {
                        progress(p);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let status = child.wait().map_err(|source| ImgError::Spawn {
            command: command.clone(),
            source,
        })?;
        let err = err_thread.join().unwrap_or_default();
        if status.success() {
            if parser.last != Some(100.0) {
                progress(100.0);
            }
            Ok(Vec::new())
        } else {
            Err(failed(command, &status, &err))
        }
    }
}

/// Parses `qemu-img -p` output: records like `    (12.34/100%)` separated by `\r` (and a final
/// `\n`). Partial records are kept until the rest arrives.
#[derive(Debug, Default)]
pub struct ProgressParser {
    pending: Vec<u8>,
    last: Option<f64>,
}

impl ProgressParser {
    /// Feeds bytes; returns each new progress value (monotonic, deduplicated).
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<f64> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.pending.iter().position(|&b| b == b'\r' || b == b'\n') {
            let record: Vec<u8> = self.pending.drain(..=pos).collect();
            if let Some(v) = parse_progress_record(&record) {
                if self.last.is_none_or(|l| v > l) {
                    self.last = Some(v);
                    out.push(v);
                }
            }
        }
        out
    }
}

fn parse_progress_record(record: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(record).ok()?.trim();
    let inner = s.strip_prefix('(')?.strip_suffix("/100%)")?;
    let v: f64 = inner.parse().ok()?;
    (0.0..=100.0).contains(&v).then_some(v)
}

fn args<const N: usize>(a: [&str; N]) -> Vec<OsString> {
    a.iter().map(OsString::from).collect()
}

fn push_format(a: &mut Vec<OsString>, flag: &str, format: Option<ImageFormat>) {
    if let Some(f) = format {
        a.push(flag.into());
        a.push(f.driver().into());
    }
}

fn cwd_of(path: &Path) -> Option<PathBuf> {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
}

fn describe(bin: &Path, a: &[OsString]) -> String {
    let mut s = bin.display().to_string();
    for x in a {
        s.push(' ');
        let x = x.to_string_lossy();
        if x.is_empty() || x.contains(' ') {
            s.push_str(&format!("{x:?}"));
        } else {
            s.push_str(&x);
        }
    }
    s
}

fn failed(command: String, status: &std::process::ExitStatus, stderr: &[u8]) -> ImgError {
    ImgError::Failed {
        command,
        status: status.to_string(),
        stderr: String::from_utf8_lossy(stderr).trim().to_string(),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(command: &str, out: &[u8]) -> Result<T, ImgError> {
    serde_json::from_slice(out).map_err(|source| ImgError::Output {
        command: command.to_string(),
        output: String::from_utf8_lossy(out).chars().take(512).collect(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_records_split_across_reads() {
        let mut p = ProgressParser::default();
        assert_eq!(p.feed(b"    (0.00/100%)\r    (12.5"), vec![0.0]);
        assert_eq!(p.feed(b"0/100%)\r    (12.50/100%)\r"), vec![12.5]);
        assert_eq!(p.feed(b"    (100.00/100%)\n"), vec![100.0]);
        assert!(p.feed(b"garbage\r(200/100%)\r").is_empty());
    }

    #[test]
    fn info_json_parses_qcow2_with_backing() {
        let json = r#"{
            "virtual-size": 1073741824, "filename": "b", "cluster-size": 65536,
            "format": "qcow2", "actual-size": 200704, "backing-filename": "a",
            "full-backing-filename": "/d/a", "backing-filename-format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "lazy-refcounts": false}},
            "dirty-flag": false
        }"#;
        let i: ImageInfo = serde_json::from_str(json).unwrap();
        assert_eq!(i.virtual_size, 1 << 30);
        assert_eq!(i.backing_filename.as_deref(), Some("a"));
        assert_eq!(i.qcow2_compat(), Some("1.1"));
    }

    #[test]
    fn describe_quotes_empty_and_spaced_args() {
        let d = describe(Path::new("/bin/qemu-img"), &args(["rebase", "-b", "", "a b"]));
        assert_eq!(d, r#"/bin/qemu-img rebase -b "" "a b""#);
    }
}
