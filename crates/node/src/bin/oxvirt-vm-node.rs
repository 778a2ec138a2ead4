//! A VM manager as a process of its own, driven by JSON lines on stdin (see
//! `oxvirt_node::vm::control`). It stands in for `oxvirt node` in tests that need two nodes or
//! a node killed with SIGKILL; QEMU processes it starts outlive it.
//!
//! Usage: `oxvirt-vm-node --run-dir DIR [--hooks DIR] [--hook-timeout-ms N]`
//! Logs go to stderr (`OXVIRT_LOG` filters them).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use oxvirt_node::vm::hooks::Hooks;
use oxvirt_node::vm::{control, VmManager, VmManagerConfig};

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OXVIRT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut run_dir = None;
    let mut hooks_dir = None;
    let mut hook_timeout = Duration::from_secs(30);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next().unwrap_or_else(|| {
                eprintln!("{a} needs a value");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--run-dir" => run_dir = Some(PathBuf::from(value())),
            "--hooks" => hooks_dir = Some(PathBuf::from(value())),
            "--hook-timeout-ms" => {
                let v = value();
                hook_timeout = Duration::from_millis(v.parse().unwrap_or_else(|_| {
                    eprintln!("--hook-timeout-ms: {v:?} is not a number");
                    std::process::exit(2)
                }))
            }
            other => {
                eprintln!("unknown argument {other:?}; usage: oxvirt-vm-node --run-dir DIR [--hooks DIR] [--hook-timeout-ms N]");
                std::process::exit(2)
            }
        }
    }
    let Some(run_dir) = run_dir else {
        eprintln!("usage: oxvirt-vm-node --run-dir DIR [--hooks DIR] [--hook-timeout-ms N]");
        std::process::exit(2)
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async move {
        let mut cfg = VmManagerConfig::new(&run_dir);
        cfg.hooks = Hooks::new(hooks_dir, hook_timeout);
        let mgr = match VmManager::open(cfg).await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("oxvirt-vm-node: {}", control::error_chain(&e));
                std::process::exit(1)
            }
        };
        // Announce readiness (recovery done) before taking requests.
        println!("{{\"ready\": true}}");
        let stdin = tokio::io::BufReader::new(tokio::io::stdin());
        control::serve(Arc::clone(&mgr), stdin, tokio::io::stdout()).await;
    });
}
