//! `oxvirt lease ...`: the lease admin tool, in the spirit of `sanlock direct`. Lockspaces and
//! resources are named in sanlock's syntax (`NAME:HOST_ID:PATH:OFFSET`,
//! `LOCKSPACE:NAME:PATH:OFFSET`; offsets in bytes or with an `M` suffix).
//!
//! Every subcommand parses, calls `oxvirt-lease`, and prints.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use oxvirt_lease::direct::{self, LockspaceSpec, ResourceSpec};
use oxvirt_lease::lockspace::AcquireOptions;
use oxvirt_lease::{LeaseMode, Lockspace, LockspaceConfig, OwnerWait, SystemClock};

#[derive(Args)]
pub struct LeaseArgs {
    #[command(subcommand)]
    command: LeaseCommand,
}

#[derive(Subcommand)]
enum LeaseCommand {
    /// Initialise a 2000-host lockspace (1 MiB), like `sanlock direct init -s`.
    InitLockspace {
        /// NAME:0:PATH:OFFSET (the host id is ignored).
        #[arg(short = 's', long = "lockspace")]
        lockspace: LockspaceSpec,
        /// io_timeout N in seconds, written into every delta lease.
        #[arg(short = 'o', long, default_value_t = 10)]
        io_timeout: u16,
    },
    /// Initialise a resource (1 MiB), like `sanlock direct init -r`.
    InitResource {
        /// LOCKSPACE:NAME:PATH:OFFSET
        #[arg(short = 'r', long = "resource")]
        resource: ResourceSpec,
    },
    /// List the lockspaces and resources in a file, like `sanlock direct dump`.
    Dump {
        /// PATH[:OFFSET[:SIZE]]
        area: String,
        /// Also list every non-empty dblock of each resource.
        #[arg(long)]
        dblocks: bool,
    },
    /// Print one leader record, like `sanlock direct read_leader`.
    ReadLeader {
        /// A host's delta lease: NAME:HOST_ID:PATH:OFFSET
        #[arg(short = 's', long = "lockspace", conflicts_with = "resource")]
        lockspace: Option<LockspaceSpec>,
        /// A resource's leader: LOCKSPACE:NAME:PATH:OFFSET
        #[arg(short = 'r', long = "resource")]
        resource: Option<ResourceSpec>,
    },
    /// Show a lockspace's hosts as a running host sees them, after watching for `--watch` s.
    HostStatus {
        /// NAME:HOST_ID:PATH:OFFSET — our host id (acquired for the duration).
        #[arg(short = 's', long = "lockspace")]
        lockspace: LockspaceSpec,
        #[command(flatten)]
        timing: Timing,
        /// Seconds to watch renewals before printing.
        #[arg(long, default_value_t = 0)]
        watch: u64,
    },
    /// Acquire a host id (and resources in it) and hold them until interrupted or `--for`
    /// seconds have passed, then release. Exits with status 3 if the lockspace is fenced.
    Acquire {
        /// NAME:HOST_ID:PATH:OFFSET
        #[arg(short = 's', long = "lockspace")]
        lockspace: LockspaceSpec,
        /// LOCKSPACE:NAME:PATH:OFFSET (repeatable)
        #[arg(short = 'r', long = "resource")]
        resources: Vec<ResourceSpec>,
        #[command(flatten)]
        timing: Timing,
        /// Acquire the resources shared instead of exclusive.
        #[arg(long)]
        shared: bool,
        /// Watch a resource's owner for up to this many seconds and take over when it dies.
        #[arg(long)]
        wait: Option<u64>,
        /// Hold for this many seconds, then release (default: until SIGINT/SIGTERM).
        #[arg(long = "for")]
        hold_for: Option<u64>,
    },
}

#[derive(Args)]
struct Timing {
    /// io_timeout N in seconds (all lease timeouts derive from it).
    #[arg(short = 'o', long, default_value_t = 10)]
    io_timeout: u64,
    /// Fence margin M in seconds: others take our leases 8N + M after our last renewal. Keep
    /// 60 (sanlock's) unless every host in the lockspace is oxvirt with the same margin.
    #[arg(long, default_value_t = 60)]
    fence_margin: u64,
    /// Our host name in the delta lease (default: the machine's hostname).
    #[arg(long)]
    host_name: Option<String>,
}

impl Timing {
    fn config(&self, ls: &LockspaceSpec) -> anyhow::Result<LockspaceConfig> {
        let host_name = match &self.host_name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("reading the hostname")?
                .trim()
                .to_string(),
        };
        let mut c = LockspaceConfig::new(
            &ls.name,
            ls.host_id,
            &host_name,
            Duration::from_secs(self.io_timeout),
        );
        c.fence_margin = Duration::from_secs(self.fence_margin);
        Ok(c)
    }
}

pub fn run(args: LeaseArgs) -> anyhow::Result<()> {
    match args.command {
        LeaseCommand::InitLockspace {
            lockspace: l,
            io_timeout,
        } => {
            direct::init_lockspace(&l.path, l.offset, &l.name, io_timeout)?;
            println!(
                "initialised lockspace {} at {}:{}",
                l.name,
                l.path.display(),
                l.offset
            );
        }
        LeaseCommand::InitResource { resource: r } => {
            direct::init_resource(&r.path, r.offset, &r.lockspace, &r.name)?;
            println!(
                "initialised resource {}:{} at {}:{}",
                r.lockspace,
                r.name,
                r.path.display(),
                r.offset
            );
        }
        LeaseCommand::Dump { area, dblocks } => dump(&area, dblocks)?,
        LeaseCommand::ReadLeader { lockspace, resource } => {
            let leader = match (lockspace, resource) {
                (Some(l), None) => direct::read_delta_leader(&l.path, l.offset, &l.name, l.host_id)?,
                (None, Some(r)) => direct::read_paxos_leader(&r.path, r.offset, &r.lockspace, &r.name)?,
                _ => bail!("give either -s LOCKSPACE or -r RESOURCE"),
            };
            print!("{}", direct::format_leader(&leader));
        }
        LeaseCommand::HostStatus {
            lockspace: l,
            timing,
            watch,
        } => {
            let ls = Lockspace::acquire(&l.path, l.offset, timing.config(&l)?, Arc::new(SystemClock))?;
            std::thread::sleep(Duration::from_secs(watch));
            for (h, status) in ls.hosts() {
                let o = ls.host_observation(h).expect("listed hosts are observed");
                println!(
                    "{h:4} {status:?} generation {} timestamp {} name {}",
                    o.owner_generation, o.timestamp, o.owner_name
                );
            }
            ls.release()?;
        }
        LeaseCommand::Acquire {
            lockspace: l,
            resources,
            timing,
            shared,
            wait,
            hold_for,
        } => acquire(l, resources, timing, shared, wait, hold_for)?,
    }
    Ok(())
}

fn dump(area: &str, dblocks: bool) -> anyhow::Result<()> {
    let mut parts = area.splitn(3, ':');
    let path = PathBuf::from(parts.next().unwrap_or_default());
    let start = parts.next().map(direct::parse_offset).transpose()?.unwrap_or(0);
    let size = parts.next().map(direct::parse_offset).transpose()?;
    let entries = direct::dump(&path, start, size)?;
    print!("{}", direct::format_dump(&entries));
    if dblocks {
        for e in &entries {
            if let direct::DumpEntry::Paxos { offset, leader, .. } = e {
                let res = direct::read_resource(&path, *offset)?;
                println!("resource {} at {offset}:", leader.resource_name);
                for h in res.hosts {
                    match h.dblock {
                        Ok(d) => println!(
                            "  dblock[{:04}] mbal {} bal {} inp {} inp2 {} inp3 {} lver {}{}{}",
                            h.host_id,
                            d.mbal,
                            d.bal,
                            d.inp,
                            d.inp2,
                            d.inp3,
                            d.lver,
                            if d.released() { " RELEASED" } else { "" },
                            if h.mode.is_shared() {
                                format!(" SHARED gen {}", h.mode.generation)
                            } else {
                                String::new()
                            }
                        ),
                        Err(p) => println!("  dblock[{:04}] unreadable: {p}", h.host_id),
                    }
                }
            }
        }
    }
    Ok(())
}

fn acquire(
    l: LockspaceSpec,
    resources: Vec<ResourceSpec>,
    timing: Timing,
    shared: bool,
    wait: Option<u64>,
    hold_for: Option<u64>,
) -> anyhow::Result<()> {
    for r in &resources {
        if r.lockspace != l.name {
            bail!(
                "resource {} belongs to lockspace {}, not {}",
                r.name,
                r.lockspace,
                l.name
            );
        }
    }
    let ls = Lockspace::acquire(&l.path, l.offset, timing.config(&l)?, Arc::new(SystemClock))?;
    println!(
        "acquired host id {} generation {} in {}",
        ls.host_id(),
        ls.generation(),
        l.name
    );
    let fence = ls.fence_channel();
    let opts = AcquireOptions {
        mode: if shared {
            LeaseMode::Shared
        } else {
            LeaseMode::Exclusive
        },
        wait: match wait {
            Some(s) => OwnerWait::Watch(Duration::from_secs(s)),
            None => OwnerWait::NoWait,
        },
        acquire_lver: None,
    };
    let mut held = Vec::new();
    for r in &resources {
        let lease = ls
            .acquire_resource(&r.path, r.offset, &r.name, opts)
            .with_context(|| format!("acquiring {}", r.name))?;
        println!("acquired {} {:?} lver {}", r.name, lease.mode(), lease.lver());
        held.push(lease);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fenced = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let hold = async {
            match hold_for {
                Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                None => std::future::pending().await,
            }
        };
        let fenced = tokio::task::spawn_blocking(move || fence.recv().ok());
        tokio::select! {
            _ = tokio::signal::ctrl_c() => Ok::<_, anyhow::Error>(None),
            _ = term.recv() => Ok(None),
            _ = hold => Ok(None),
            ev = fenced => Ok(ev.ok().flatten()),
        }
    })?;
    if let Some(ev) = fenced {
        eprintln!("fenced: {:?}; the leases must no longer be used", ev.reason);
        std::process::exit(3);
    }
    for lease in held {
        let name = lease.resource_name();
        lease.release().with_context(|| format!("releasing {name}"))?;
        println!("released {name}");
    }
    ls.release()?;
    println!("released host id {}", l.host_id);
    // The fence-channel waiter still blocks on its receiver; do not wait for it.
    rt.shutdown_background();
    Ok(())
}
