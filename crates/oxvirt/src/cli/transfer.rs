//! `oxvirt disk upload` and `oxvirt disk download`: an image file into a new disk, or a disk's
//! guest data into an image file, through the engine's image transfers — the engine opens the
//! transfer, the data goes straight to the host in ovirt-imageio's protocol (as
//! `ovirt_imageio.client` does).
//!
//! The local file is read or written through a `qemu-nbd` of its own, so qcow2 and raw files
//! both work and only data travels: zero areas are skipped (the new disk or file reads zeroes
//! already). [`WORKERS`] connections move pieces of at most [`PIECE`] bytes in parallel.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};

use oxvirt_qemu::img::{CreateRequest, QemuImg};
use oxvirt_qemu::nbd::{NbdClient, NbdExport, QemuNbd};
use oxvirt_qemu::ImageFormat;

use super::api::Api;
use super::transport::{Endpoint, Http, Trust};

/// Parallel connections to the host (ovirt-imageio's client uses 4).
pub const WORKERS: usize = 4;
/// Largest piece per request.
pub const PIECE: u64 = 8 << 20;
/// How long a transfer may take to start serving or to finish after finalize.
const PHASE_WAIT: Duration = Duration::from_secs(120);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// What a transfer moved.
#[derive(Debug, Clone, Copy)]
pub struct Moved {
    /// Guest data bytes sent or received (zero areas skipped are not counted).
    pub bytes: u64,
    pub elapsed: Duration,
    /// Until the host served the transfer.
    pub opening: Duration,
    /// Moving the data.
    pub data: Duration,
    /// From finalize to the transfer's end (the disk unlocked).
    pub closing: Duration,
}

impl std::fmt::Display for Moved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} MiB of data in {:.2} s (opening {:.2} s, data {:.2} s, closing {:.2} s)",
            self.bytes >> 20,
            self.elapsed.as_secs_f64(),
            self.opening.as_secs_f64(),
            self.data.as_secs_f64(),
            self.closing.as_secs_f64()
        )
    }
}

/// An open image transfer: its id and where the host serves it.
struct Open {
    id: String,
    url: String,
}

async fn phase_until(api: &Api, id: &str, want: &[&str]) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let t = api.get(&format!("/imagetransfers/{id}")).await?;
        let phase = t["phase"].as_str().unwrap_or_default();
        if want.contains(&phase) {
            return Ok(t);
        }
        if phase == "finished_failure" {
            anyhow::bail!(
                "image transfer {id} failed: {}",
                t["message"].as_str().unwrap_or("no reason given")
            );
        }
        anyhow::ensure!(
            start.elapsed() < PHASE_WAIT,
            "image transfer {id} still {phase} after {PHASE_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn open(api: &Api, disk: &str, direction: &str, host: Option<&str>) -> anyhow::Result<Open> {
    let mut body = json!({ "disk": { "id": disk }, "direction": direction, "format": "raw" });
    if let Some(h) = host {
        body["host"] = json!({ "id": h });
    }
    let t = api
        .request(Method::POST, "/imagetransfers", Some(&body), None)
        .await
        .context("starting the image transfer")?;
    let id = t["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the engine's image transfer has no id: {t}"))?
        .to_string();
    let t = phase_until(api, &id, &["transferring"]).await?;
    let url = t["transfer_url"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("image transfer {id} serves no transfer_url"))?
        .to_string();
    Ok(Open { id, url })
}

async fn finalize(api: &Api, id: &str) -> anyhow::Result<()> {
    api.request(
        Method::POST,
        &format!("/imagetransfers/{id}/finalize"),
        Some(&json!({})),
        None,
    )
    .await
    .with_context(|| format!("finalizing image transfer {id}"))?;
    phase_until(api, id, &["finished_success"]).await?;
    Ok(())
}

async fn cancel(api: &Api, id: &str) {
    let _ = api
        .request(
            Method::POST,
            &format!("/imagetransfers/{id}/cancel"),
            Some(&json!({})),
            None,
        )
        .await;
}

/// Ends a transfer whose data moved (`moved`: the bytes) or failed: finalized, or cancelled.
async fn end(
    api: &Api,
    t: &Open,
    start: Instant,
    opening: Duration,
    moved: anyhow::Result<u64>,
) -> anyhow::Result<Moved> {
    let data = start.elapsed() - opening;
    match moved {
        Ok(bytes) => {
            finalize(api, &t.id).await?;
            Ok(Moved {
                bytes,
                elapsed: start.elapsed(),
                opening,
                data,
                closing: start.elapsed() - opening - data,
            })
        }
        Err(e) => {
            cancel(api, &t.id).await;
            Err(e)
        }
    }
}

/// The host's side of a transfer: `Http` to the transfer URL's host, and the path.
fn host_side(url: &str, trust: &Trust) -> anyhow::Result<(Arc<Http>, String)> {
    let ep = Endpoint::parse(url)?;
    let path = url
        .strip_prefix("https://")
        .and_then(|r| r.find('/').map(|i| r[i..].to_string()))
        .ok_or_else(|| anyhow::anyhow!("transfer URL {url:?} has no path"))?;
    Ok((Arc::new(Http::new(ep, trust, REQUEST_TIMEOUT)?), path))
}

fn check(r: &super::transport::HttpReply, what: &str) -> anyhow::Result<()> {
    if r.status.is_success() {
        return Ok(());
    }
    anyhow::bail!(
        "{what}: the host answered HTTP {}: {}",
        r.status.as_u16(),
        String::from_utf8_lossy(&r.body).trim()
    )
}

/// `[start, start + len)` pieces of the data extents, at most [`PIECE`] each.
fn pieces(extents: impl IntoIterator<Item = (u64, u64, bool)>) -> VecDeque<(u64, u64)> {
    let mut out = VecDeque::new();
    for (start, len, zero) in extents {
        if zero {
            continue;
        }
        let mut at = start;
        while at < start + len {
            let n = PIECE.min(start + len - at);
            out.push_back((at, n));
            at += n;
        }
    }
    out
}

/// A private directory for a local `qemu-nbd` socket.
fn socket_dir() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("oxvirt-transfer-")
        .tempdir()
        .context("creating a directory for the local NBD socket")
}

/// Runs `work` on up to [`WORKERS`] tasks over `queue`, each with its own local NBD
/// connection; the first error stops the rest.
async fn run_workers<F, Fut>(socket: &Path, queue: VecDeque<(u64, u64)>, work: F) -> anyhow::Result<u64>
where
    F: Fn(NbdClient, Arc<std::sync::Mutex<VecDeque<(u64, u64)>>>, Arc<AtomicU64>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let queue = Arc::new(std::sync::Mutex::new(queue));
    let moved = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let nbd = NbdClient::connect(socket).await?;
        tasks.push(tokio::spawn(work(nbd, queue.clone(), moved.clone())));
    }
    let mut first_err = None;
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                queue.lock().expect("queue").clear();
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(anyhow::anyhow!("a transfer worker failed: {e}"));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(moved.load(Ordering::Relaxed)),
    }
}

fn next(queue: &std::sync::Mutex<VecDeque<(u64, u64)>>) -> Option<(u64, u64)> {
    queue.lock().expect("queue").pop_front()
}

/// Uploads `file` (qcow2 or raw) into disk `disk`, which must be new (it reads zeroes).
pub async fn upload(
    api: &Api,
    trust: &Trust,
    file: &Path,
    disk: &str,
    host: Option<&str>,
) -> anyhow::Result<Moved> {
    let info = QemuImg::locate()?
        .info(file, None)
        .with_context(|| format!("reading {}", file.display()))?;
    let format = match info.format.as_str() {
        "qcow2" => ImageFormat::Qcow2,
        "raw" => ImageFormat::Raw,
        f => anyhow::bail!("{} is a {f} image: upload qcow2 or raw", file.display()),
    };
    let dir = socket_dir()?;
    let sock = dir.path().join("src.sock");
    let nbd = QemuNbd::start(
        &sock,
        &NbdExport {
            path: file,
            format,
            read_only: true,
            direct_io: false,
            shared: WORKERS as u32 + 1,
        },
    )
    .await?;
    let start = Instant::now();
    let t = open(api, disk, "upload", host).await?;
    let opening = start.elapsed();
    let r = async {
        let mut src = NbdClient::connect(&sock).await?;
        let size = src.size();
        let extents = src.extents(0, size).await?;
        src.disconnect().await;
        let queue = pieces(extents.iter().map(|e| (e.start, e.length, e.zero)));
        let (http, path) = host_side(&t.url, trust)?;
        let moved = run_workers(&sock, queue, |mut nbd, queue, moved| {
            let (http, path) = (http.clone(), path.clone());
            async move {
                while let Some((at, n)) = next(&queue) {
                    let mut buf = vec![0u8; n as usize];
                    nbd.read(at, &mut buf).await?;
                    let range = format!("bytes {at}-{}/*", at + n - 1);
                    let r = http
                        .send(
                            Method::PUT,
                            &format!("{path}?flush=n"),
                            &[("content-range", range)],
                            Some(("application/octet-stream", Bytes::from(buf))),
                        )
                        .await?;
                    check(&r, &format!("writing {n} bytes at {at}"))?;
                    moved.fetch_add(n, Ordering::Relaxed);
                }
                Ok(())
            }
        })
        .await?;
        let r = http
            .send(
                Method::PATCH,
                &path,
                &[],
                Some(("application/json", Bytes::from(r#"{"op":"flush"}"#))),
            )
            .await?;
        check(&r, "flushing the disk")?;
        anyhow::Ok(moved)
    }
    .await;
    nbd.stop().await;
    end(api, &t, start, opening, r)
        .await
        .with_context(|| format!("uploading {}", file.display()))
}

/// Downloads disk `disk`'s guest data into a new image `file` (`qcow2` or `raw`).
pub async fn download(
    api: &Api,
    trust: &Trust,
    disk: &str,
    file: &Path,
    format: ImageFormat,
    host: Option<&str>,
) -> anyhow::Result<Moved> {
    anyhow::ensure!(
        !file.exists(),
        "{} exists: download into a new file",
        file.display()
    );
    let d = api.get(&format!("/disks/{disk}")).await?;
    let size = d["provisioned_size"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| d["provisioned_size"].as_u64())
        .ok_or_else(|| anyhow::anyhow!("disk {disk} has no provisioned_size"))?;
    let start = Instant::now();
    let t = open(api, disk, "download", host).await?;
    let opening = start.elapsed();
    let r = async {
        QemuImg::locate()?
            .create(&CreateRequest {
                path: file,
                format,
                size: Some(size),
                qcow2_compat: (format == ImageFormat::Qcow2).then_some("1.1"),
                backing: None,
                preallocation: None,
                unsafe_backing: false,
            })
            .with_context(|| format!("creating {}", file.display()))?;
        let dir = socket_dir()?;
        let sock = dir.path().join("dst.sock");
        let nbd = QemuNbd::start(
            &sock,
            &NbdExport {
                path: file,
                format,
                read_only: false,
                direct_io: false,
                shared: WORKERS as u32 + 1,
            },
        )
        .await?;
        let (http, path) = host_side(&t.url, trust)?;
        let r = http
            .send(Method::GET, &format!("{path}/extents?context=zero"), &[], None)
            .await?;
        check(&r, "reading the disk's extents")?;
        let extents: Vec<Value> = serde_json::from_slice(&r.body).context("the host's extents")?;
        let queue = pieces(extents.iter().map(|e| {
            (
                e["start"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0),
                e["zero"].as_bool().unwrap_or(false),
            )
        }));
        let moved = run_workers(&sock, queue, |mut nbd, queue, moved| {
            let (http, path) = (http.clone(), path.clone());
            async move {
                while let Some((at, n)) = next(&queue) {
                    let range = format!("bytes={at}-{}", at + n - 1);
                    let r = http.send(Method::GET, &path, &[("range", range)], None).await?;
                    anyhow::ensure!(
                        r.status == StatusCode::PARTIAL_CONTENT && r.body.len() as u64 == n,
                        "reading {n} bytes at {at}: the host answered HTTP {} with {} bytes",
                        r.status.as_u16(),
                        r.body.len()
                    );
                    nbd.write(at, &r.body).await?;
                    moved.fetch_add(n, Ordering::Relaxed);
                }
                nbd.flush().await?;
                Ok(())
            }
        })
        .await;
        nbd.stop().await;
        moved
    }
    .await;
    if r.is_err() {
        let _ = std::fs::remove_file(file);
    }
    end(api, &t, start, opening, r)
        .await
        .with_context(|| format!("downloading disk {disk}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_data_travels_in_pieces() {
        let q = pieces([
            (0, 1 << 20, true),
            (1 << 20, PIECE + 5, false),
            (PIECE * 4, 10, false),
        ]);
        assert_eq!(
            Vec::from(q),
            vec![(1 << 20, PIECE), ((1 << 20) + PIECE, 5), (PIECE * 4, 10)]
        );
    }
}
