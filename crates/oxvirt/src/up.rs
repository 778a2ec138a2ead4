//! `oxvirt up`: the all-in-one.

use std::path::PathBuf;

use anyhow::Context;
use oxvirt_qemu::{probe_kvm, QemuTool};

#[derive(clap::Args)]
pub struct UpArgs {
    /// Data directory: database, storage, run state. Reused by a second run.
    #[arg(long, default_value = "/var/lib/oxvirt")]
    data: PathBuf,
    /// Address the engine's API listens on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: String,
    /// Number of node processes to start.
    #[arg(long, default_value_t = 1)]
    nodes: u16,
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data).with_context(|| format!("creating {}", args.data.display()))?;
    host_check(false)?;
    println!();
    println!("data directory: {}", args.data.display());
    println!(
        "engine API (when the engine lands): https://{}/ovirt-engine/api",
        args.listen
    );
    println!("nodes requested: {}", args.nodes);
    println!("this build has the host check only; the engine and node daemons arrive with their issues.");
    Ok(())
}

pub fn host_check(json: bool) -> anyhow::Result<()> {
    let tools: Vec<(QemuTool, Result<String, String>)> =
        [QemuTool::SystemX86_64, QemuTool::Img, QemuTool::Io]
            .into_iter()
            .map(|t| (t, t.version().map(|v| v.to_string()).map_err(|e| e.to_string())))
            .collect();
    let kvm = probe_kvm();
    if json {
        let v = serde_json::json!({
            "tools": tools.iter().map(|(t, r)| (t.binary_name().to_string(), match r {
                Ok(v) => serde_json::json!({"version": v}),
                Err(e) => serde_json::json!({"error": e}),
            })).collect::<serde_json::Map<_, _>>(),
            "kvm": kvm,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for (t, r) in &tools {
            match r {
                Ok(v) => println!("{:<20} {v}", t.binary_name()),
                Err(e) => println!("{:<20} MISSING: {e}", t.binary_name()),
            }
        }
        match &kvm {
            oxvirt_qemu::KvmProbe::Usable { api_version } => {
                println!("{:<20} usable (API {api_version})", "kvm")
            }
            oxvirt_qemu::KvmProbe::Unusable { reason } => {
                println!("{:<20} unusable: {reason} (TCG is used)", "kvm")
            }
        }
    }
    if let Some((t, Err(e))) = tools.iter().find(|(_, r)| r.is_err()) {
        anyhow::bail!("{} is required: {e}", t.binary_name());
    }
    Ok(())
}
