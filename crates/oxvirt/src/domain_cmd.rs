//! `oxvirt domain ...`: the offline storage-domain admin tool (in the spirit of `vdsm-tool
//! dump-volume-chains` and VDSM's storage verbs), working directly on a domain directory.
//!
//! Every subcommand parses its arguments (ids as UUIDs, never paths), calls `oxvirt-storage`,
//! and prints text or `--json`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use oxvirt_storage::{
    Allocation, CopyMode, DomainType, FileStorageDomain, Legality, NewDomain, Severity, VolFormat, VolumeSpec,
};
use oxvirt_types::{ImgUuid, SdUuid, VolUuid};

#[derive(Args)]
pub struct DomainArgs {
    #[command(subcommand)]
    command: DomainCommand,
}

#[derive(Clone, Copy, ValueEnum)]
enum TypeArg {
    Localfs,
    Nfs,
    Posixfs,
    Glusterfs,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Raw,
    Cow,
}

#[derive(Clone, Copy, ValueEnum)]
enum AllocArg {
    Sparse,
    Preallocated,
}

#[derive(Clone, Copy, ValueEnum)]
enum LegalityArg {
    Legal,
    Illegal,
}

impl From<FormatArg> for VolFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Raw => VolFormat::Raw,
            FormatArg::Cow => VolFormat::Cow,
        }
    }
}

impl From<AllocArg> for Allocation {
    fn from(a: AllocArg) -> Self {
        match a {
            AllocArg::Sparse => Allocation::Sparse,
            AllocArg::Preallocated => Allocation::Preallocated,
        }
    }
}

#[derive(Subcommand)]
enum DomainCommand {
    /// Create a file storage domain (VDSM format, version 5) under a mount directory.
    Create {
        /// Directory holding domains (a local directory, or an NFS/POSIX mount).
        #[arg(long)]
        mount: PathBuf,
        #[arg(long)]
        description: String,
        /// Domain id (random if omitted).
        #[arg(long)]
        sd: Option<SdUuid>,
        #[arg(long, value_enum, default_value = "localfs")]
        r#type: TypeArg,
        /// REMOTE_PATH recorded in the metadata (default: the mount directory).
        #[arg(long)]
        remote_path: Option<String>,
    },
    /// Show a domain's metadata, capacity and health.
    Info {
        domain: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the domains under a mount directory.
    List { mount: PathBuf },
    /// Check a domain's consistency; exits non-zero when errors are found.
    Check {
        domain: PathBuf,
        /// Also run qemu-img info/check on every volume.
        #[arg(long)]
        deep: bool,
        #[arg(long)]
        json: bool,
    },
    /// List image ids.
    ListImages { domain: PathBuf },
    /// Show every image's volume chain, like `vdsm-tool dump-volume-chains`.
    DumpChains {
        domain: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Finish or undo interrupted operations and collect garbage.
    Recover {
        domain: PathBuf,
        /// Other domains that cross-domain operations may need.
        #[arg(long = "with")]
        with: Vec<PathBuf>,
    },
    /// Create a new image with one base volume.
    CreateVolume {
        domain: PathBuf,
        #[arg(long)]
        image: ImgUuid,
        #[arg(long)]
        volume: VolUuid,
        /// Capacity in bytes (suffixes K, M, G, T accepted).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, value_enum, default_value = "cow")]
        format: FormatArg,
        #[arg(long, value_enum, default_value = "sparse")]
        allocation: AllocArg,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Create a snapshot volume on top of the image's leaf.
    Snapshot {
        domain: PathBuf,
        #[arg(long)]
        image: ImgUuid,
        #[arg(long)]
        volume: VolUuid,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Cold merge of TOP into its parent BASE (TOP is removed).
    Merge {
        domain: PathBuf,
        #[arg(long)]
        image: ImgUuid,
        #[arg(long)]
        base: VolUuid,
        #[arg(long)]
        top: VolUuid,
    },
    /// Delete the leaf volume of an image.
    DeleteVolume {
        domain: PathBuf,
        #[arg(long)]
        image: ImgUuid,
        #[arg(long)]
        volume: VolUuid,
    },
    /// Delete a whole image.
    DeleteImage {
        domain: PathBuf,
        #[arg(long)]
        image: ImgUuid,
    },
    /// Mark an image's single volume as a template (SHARED).
    MakeTemplate {
        domain: PathBuf,
        #[arg(long)]
        image: ImgUuid,
        #[arg(long)]
        volume: VolUuid,
    },
    /// Create a thin clone of a template volume as a new image.
    Clone {
        domain: PathBuf,
        #[arg(long)]
        template_image: ImgUuid,
        #[arg(long)]
        template_volume: VolUuid,
        #[arg(long)]
        image: ImgUuid,
        #[arg(long)]
        volume: VolUuid,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Copy an image to another domain (whole chain, or collapsed into one volume).
    CopyImage {
        domain: PathBuf,
        #[arg(long)]
        image: ImgUuid,
        /// Destination domain directory.
        #[arg(long)]
        to: PathBuf,
        /// Destination image id (default: the same).
        #[arg(long)]
        dst_image: Option<ImgUuid>,
        /// Collapse the chain into this new volume.
        #[arg(long)]
        collapse_to: Option<VolUuid>,
        #[arg(long, value_enum, default_value = "cow")]
        format: FormatArg,
        #[arg(long, value_enum, default_value = "sparse")]
        allocation: AllocArg,
        /// Delete the source image afterwards (a move).
        #[arg(long)]
        r#move: bool,
    },
    /// Extend the leaf volume's capacity.
    Resize {
        domain: PathBuf,
        #[arg(long)]
        image: ImgUuid,
        #[arg(long)]
        volume: VolUuid,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Space a collapsed copy of the image would need.
    Measure {
        domain: PathBuf,
        #[arg(long)]
        image: ImgUuid,
        #[arg(long, value_enum, default_value = "cow")]
        format: FormatArg,
    },
    /// Set a volume's LEGALITY.
    SetLegality {
        domain: PathBuf,
        #[arg(long)]
        image: ImgUuid,
        #[arg(long)]
        volume: VolUuid,
        #[arg(value_enum)]
        legality: LegalityArg,
    },
    /// Benchmark snapshot, thin clone and cold merge against bare qemu-img.
    Bench {
        /// Scratch directory (a fresh subdirectory is created and removed).
        #[arg(long, default_value = "/var/tmp")]
        dir: PathBuf,
        #[arg(long, default_value_t = 20)]
        iterations: usize,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}"))
}

fn open(path: &Path) -> anyhow::Result<FileStorageDomain> {
    FileStorageDomain::open(path).with_context(|| format!("opening storage domain {}", path.display()))
}

fn json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn progress_printer() -> impl FnMut(f64) {
    let mut last = -10.0;
    move |p| {
        if p - last >= 10.0 || p >= 100.0 {
            eprintln!("progress {p:.0}%");
            last = p;
        }
    }
}

pub fn run(args: DomainArgs) -> anyhow::Result<()> {
    match args.command {
        DomainCommand::Create {
            mount,
            description,
            sd,
            r#type,
            remote_path,
        } => {
            let domain_type = match r#type {
                TypeArg::Localfs => DomainType::LocalFs,
                TypeArg::Nfs => DomainType::Nfs,
                TypeArg::Posixfs => DomainType::PosixFs,
                TypeArg::Glusterfs => DomainType::GlusterFs,
            };
            let dom = FileStorageDomain::create(
                &mount,
                &NewDomain {
                    sd: sd.unwrap_or_else(SdUuid::new_random),
                    description,
                    domain_type,
                    remote_path,
                },
            )?;
            println!("{}", dom.root().display());
        }
        DomainCommand::Info {
            domain,
            json: as_json,
        } => {
            let dom = open(&domain)?;
            let stats = dom.stats()?;
            let health = dom.health();
            if as_json {
                return json(&serde_json::json!({
                    "metadata": dom.metadata(), "stats": stats, "health": health,
                }));
            }
            let md = dom.metadata();
            println!("uuid:        {}", md.sd);
            println!("description: {}", md.description);
            println!(
                "type:        {} {} {} (version {})",
                md.domain_type.as_str(),
                md.class.as_str(),
                md.role.as_str(),
                md.version
            );
            println!("remote path: {}", md.remote_path);
            println!(
                "pools:       {:?}",
                md.pools.iter().map(|p| p.to_string()).collect::<Vec<_>>()
            );
            println!(
                "disk:        {} free of {} bytes",
                stats.disk_free, stats.disk_total
            );
            println!("contents:    {} images, {} volumes", stats.images, stats.volumes);
            println!(
                "health:      {} (read delay {:?}){}",
                if health.valid { "valid" } else { "INVALID" },
                health.read_delay,
                health.error.map(|e| format!(": {e}")).unwrap_or_default()
            );
        }
        DomainCommand::List { mount } => {
            for (sd, path) in FileStorageDomain::scan(&mount)? {
                println!("{sd}  {}", path.display());
            }
        }
        DomainCommand::Check {
            domain,
            deep,
            json: as_json,
        } => {
            let dom = open(&domain)?;
            let report = dom.check(deep)?;
            if as_json {
                json(&report)?;
            } else {
                for p in &report.problems {
                    let sev = match p.severity {
                        Severity::Error => "error",
                        Severity::Warning => "warning",
                    };
                    let img = p.image.map(|i| format!(" image {i}")).unwrap_or_default();
                    let vol = p.volume.map(|v| format!(" volume {v}")).unwrap_or_default();
                    println!("{sev}:{img}{vol}: {}", p.message);
                }
                println!(
                    "{} images, {} volumes, {} checked with qemu-img: {} problems",
                    report.images,
                    report.volumes,
                    report.qemu_checked,
                    report.problems.len()
                );
            }
            if report.errors().next().is_some() {
                bail!("storage domain {} has errors", dom.sd());
            }
        }
        DomainCommand::ListImages { domain } => {
            for img in open(&domain)?.images()? {
                println!("{img}");
            }
        }
        DomainCommand::DumpChains {
            domain,
            json: as_json,
        } => {
            let dom = open(&domain)?;
            let chains = dom.dump_chains()?;
            if as_json {
                return json(&chains);
            }
            println!("Images volume chains (base volume first)\n");
            for c in chains {
                println!("   image:    {}", c.image);
                match c.chain {
                    Ok(vols) => {
                        for v in vols {
                            println!();
                            println!("             - {}", v.id);
                            println!(
                                "               status: OK, voltype: {}, format: {}, legality: {}, type: {}, capacity: {}, truesize: {}",
                                v.meta.role, v.meta.format, v.meta.legality, v.meta.allocation, v.meta.capacity, v.true_size
                            );
                        }
                    }
                    Err(e) => println!("\n             Error: {e}"),
                }
                println!();
            }
        }
        DomainCommand::Recover { domain, with } => {
            let dom = open(&domain)?;
            let others = with.iter().map(|p| open(p)).collect::<anyhow::Result<Vec<_>>>()?;
            let refs: Vec<&FileStorageDomain> = others.iter().collect();
            json(&dom.recover(&refs)?)?;
        }
        DomainCommand::CreateVolume {
            domain,
            image,
            volume,
            size,
            format,
            allocation,
            description,
        } => {
            let mut spec = VolumeSpec::new(size, format.into(), allocation.into());
            spec.description = description;
            json(&open(&domain)?.create_volume(image, volume, &spec)?)?;
        }
        DomainCommand::Snapshot {
            domain,
            image,
            volume,
            description,
        } => json(&open(&domain)?.create_snapshot(image, volume, None, &description)?)?,
        DomainCommand::Merge {
            domain,
            image,
            base,
            top,
        } => {
            open(&domain)?.cold_merge(image, base, top, &mut progress_printer())?;
        }
        DomainCommand::DeleteVolume {
            domain,
            image,
            volume,
        } => open(&domain)?.delete_volume(image, volume)?,
        DomainCommand::DeleteImage { domain, image } => open(&domain)?.delete_image(image)?,
        DomainCommand::MakeTemplate {
            domain,
            image,
            volume,
        } => open(&domain)?.make_template(image, volume)?,
        DomainCommand::Clone {
            domain,
            template_image,
            template_volume,
            image,
            volume,
            description,
        } => json(&open(&domain)?.clone_from_template(
            template_image,
            template_volume,
            image,
            volume,
            &description,
        )?)?,
        DomainCommand::CopyImage {
            domain,
            image,
            to,
            dst_image,
            collapse_to,
            format,
            allocation,
            r#move,
        } => {
            let (src, dst) = (open(&domain)?, open(&to)?);
            let mode = match collapse_to {
                Some(vol) => CopyMode::Collapsed {
                    vol,
                    format: format.into(),
                    allocation: allocation.into(),
                    top: None,
                },
                None => CopyMode::Chain,
            };
            let dst_image = dst_image.unwrap_or(image);
            if r#move {
                if dst_image != image || collapse_to.is_some() {
                    bail!("--move copies the whole chain under the same image id");
                }
                src.move_image(image, &dst, &mut progress_printer())?;
            } else {
                src.copy_image(image, &dst, dst_image, mode, &mut progress_printer())?;
            }
        }
        DomainCommand::Resize {
            domain,
            image,
            volume,
            size,
        } => println!("{}", open(&domain)?.resize_volume(image, volume, size)?),
        DomainCommand::Measure {
            domain,
            image,
            format,
        } => {
            let m = open(&domain)?.measure(image, None, format.into())?;
            println!(
                "required {} bytes, fully allocated {} bytes",
                m.required, m.fully_allocated
            );
        }
        DomainCommand::SetLegality {
            domain,
            image,
            volume,
            legality,
        } => {
            let l = match legality {
                LegalityArg::Legal => Legality::Legal,
                LegalityArg::Illegal => Legality::Illegal,
            };
            open(&domain)?.set_legality(image, volume, l)?;
        }
        DomainCommand::Bench { dir, iterations } => {
            let report = oxvirt_storage::bench::run(&dir, iterations)?;
            println!("storage benchmark, {} iterations, medians:", report.iterations);
            for f in &report.figures {
                println!(
                    "  {:<28} ours {:>9.2?}  bare {:>9.2?}  ratio {:.2}   (bare: {})",
                    f.verb, f.ours, f.bare, f.ratio, f.bare_commands
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
