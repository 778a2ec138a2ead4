//! `oxvirt login`, `oxvirt vm start …` and the other client subcommands: an administrator's
//! command line over the engine's oVirt REST API v4, with a stored session.
//!
//! - [`config`] owns the session file (URL, user, token, CA; never a password);
//! - [`transport`] is the HTTPS transport, [`api`] the API's JSON, faults, SSO and name lookup;
//! - [`kinds`] says where each kind of object lives and how its table looks, [`output`] prints
//!   tables or JSON, [`progress`] shows long operations until they are done.
//!
//! Shape: `oxvirt KIND VERB [NAME|ID] [options]`; objects are named by name or id (names are
//! looked up with `search=name=…` and must be unique). Results go to stdout (table or JSON),
//! progress and errors to stderr; a failure exits non-zero and changes nothing on the client.

pub mod api;
pub mod config;
pub mod kinds;
pub mod output;
pub mod progress;
pub mod transfer;
pub mod transport;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use http::Method;
use serde_json::{json, Value};

use api::Api;
use config::Session;
use kinds::Kind;
use output::Output;
use progress::{Progress, Until};

/// Options every client subcommand takes.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// How results are printed.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The session file (default ~/.config/oxvirt/cli.json).
    #[arg(long, global = true, env = "OXVIRT_CLI_CONFIG")]
    pub config: Option<PathBuf>,
    /// No progress on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// A kind's subcommands with the common options.
#[derive(Args, Debug)]
pub struct Group<T: Subcommand> {
    #[command(subcommand)]
    pub cmd: T,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Log in to an engine's API and store the session for the commands below.
    Login(LoginArgs),
    /// Revoke the stored session's token and forget the session.
    Logout(Common),
    /// Data centers.
    #[command(visible_alias = "dc")]
    Datacenter(Group<DcCmd>),
    /// Clusters.
    Cluster(Group<ClusterCmd>),
    /// Hosts (nodes): add, maintenance, activation, power management (fence).
    Host(Group<HostCmd>),
    /// A cluster's affinity groups: VMs kept together or apart.
    #[command(visible_alias = "ag")]
    Affinitygroup(Group<AffinityGroupCmd>),
    /// The built-in scheduling policies (set one with `cluster update --scheduling-policy`).
    #[command(visible_alias = "policy")]
    Schedulingpolicy(Group<PolicyCmd>),
    /// A host's fence agent (power management): one per host.
    Fenceagent(Group<FenceAgentCmd>),
    /// Storage domains: create, attach to a data center, activate, maintenance.
    #[command(visible_alias = "sd")]
    Storagedomain(Group<SdCmd>),
    /// Disks.
    Disk(Group<DiskCmd>),
    /// Virtual machines: create, start, stop, shutdown, suspend, migrate.
    Vm(Group<VmCmd>),
    /// Templates made from VMs.
    Template(Group<TemplateCmd>),
    /// A VM's snapshots: create, restore, remove.
    Snapshot(Group<SnapshotCmd>),
    /// Logical networks: in a data center, attached to clusters, carried by host NICs.
    #[command(visible_alias = "net")]
    Network(Group<NetworkCmd>),
    /// A VM's network interfaces.
    Nic(Group<NicCmd>),
    /// The vNIC profiles VM NICs connect through (one per VM network).
    Vnicprofile(Group<VnicProfileCmd>),
    /// MAC address pools (one per cluster).
    Macpool(Group<MacPoolCmd>),
    /// Jobs the engine ran (and their steps).
    Job(Group<JobCmd>),
    /// The engine's event log.
    Event(Group<EventCmd>),
    /// Tags: a tree of labels on VMs, hosts and templates (`vm list --search tag=NAME`).
    Tag(Group<TagCmd>),
    /// A data center's storage QoS: MB/s and IOPS limits that disk profiles apply.
    Qos(Group<QosCmd>),
    /// Storage domains' disk profiles (the QoS their disks get).
    Diskprofile(Group<DiskProfileCmd>),
    /// Print a shell completion script: `oxvirt completion bash > /etc/bash_completion.d/oxvirt`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The engine: https://HOST:PORT (as `oxvirt engine`/`oxvirt up` print it).
    #[arg(long, env = "OXVIRT_URL")]
    pub url: String,
    #[arg(short, long, default_value = "admin@internal")]
    pub user: String,
    /// Read the password from this file (`-`: standard input); asked on the terminal otherwise.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Trust the engine's certificate when signed by this CA (the engine's data directory
    /// has it as pki/ca.pem).
    #[arg(long, conflicts_with_all = ["ca_fingerprint", "insecure"])]
    pub ca_file: Option<PathBuf>,
    /// Fetch the engine's CA and trust it when its SHA-256 fingerprint is this one (printed by
    /// `oxvirt engine`/`oxvirt up`).
    #[arg(long, conflicts_with = "insecure")]
    pub ca_fingerprint: Option<String>,
    /// Do not check the engine's certificate at all.
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    /// oVirt search query, e.g. `status=up and name=web*`.
    #[arg(short, long)]
    pub search: Option<String>,
    /// At most this many.
    #[arg(long)]
    pub max: Option<u32>,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct WaitArgs {
    /// Return as soon as the engine accepted the request.
    #[arg(long)]
    pub no_wait: bool,
    /// Seconds to wait for the operation to finish.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

#[derive(Subcommand, Debug)]
pub enum DcCmd {
    /// List data centers.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show a data center.
    Show { name: String },
    /// Create a data center.
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Local storage only (one host).
        #[arg(long)]
        local: bool,
    },
    /// Remove a data center (no clusters or storage domains left in it).
    #[command(visible_alias = "rm")]
    Remove { name: String },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// List clusters.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show a cluster.
    Show { name: String },
    /// Create a cluster in a data center.
    Create {
        name: String,
        /// The data center (name or id).
        #[arg(long, visible_alias = "dc")]
        datacenter: String,
        /// The CPU model VMs get.
        #[arg(long)]
        cpu_type: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        sched: SchedArgs,
    },
    /// Change a cluster: its description, CPU type, scheduling policy, memory overcommit or
    /// migration bandwidth.
    Update {
        name: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        cpu_type: Option<String>,
        #[command(flatten)]
        sched: SchedArgs,
    },
    /// Remove an empty cluster.
    #[command(visible_alias = "rm")]
    Remove { name: String },
}

/// A cluster's scheduling settings.
#[derive(Args, Debug, Clone)]
pub struct SchedArgs {
    /// The scheduling policy (name or id: none, evenly_distributed, power_saving,
    /// vm_evenly_distributed; see `oxvirt schedulingpolicy list`).
    #[arg(long)]
    pub scheduling_policy: Option<String>,
    /// How much of a host's memory VMs may be promised, in percent (100-1000).
    #[arg(long)]
    pub overcommit: Option<u32>,
    /// The cluster's own value of a policy property, as NAME=VALUE (HighUtilization,
    /// LowUtilization, CpuOverCommitDurationMinutes, HighVmCount, MigrationThreshold,
    /// SpmVmGrace); repeat for several. On update they replace the cluster's own values.
    #[arg(long = "policy-property", value_name = "NAME=VALUE")]
    pub policy_properties: Vec<String>,
    /// On update: drop the cluster's own property values (the policy's defaults apply).
    #[arg(long, conflicts_with = "policy_properties")]
    pub default_policy_properties: bool,
    /// Limit live migrations of the cluster's VMs to this many Mbps, or `auto` for no limit.
    #[arg(long, value_name = "MBPS|auto")]
    pub migration_bandwidth: Option<String>,
    /// Encrypt live migrations of the cluster's VMs (TLS between the hosts, with their
    /// certificates): true or false.
    #[arg(long, value_name = "true|false")]
    pub migration_encrypted: Option<bool>,
}

impl SchedArgs {
    fn apply(&self, body: &mut Value) -> anyhow::Result<()> {
        if !self.policy_properties.is_empty() || self.default_policy_properties {
            let mut props = Vec::new();
            for p in &self.policy_properties {
                let (name, value) = p
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--policy-property {p:?} is not NAME=VALUE"))?;
                props.push(json!({ "name": name.trim(), "value": value.trim() }));
            }
            body["custom_scheduling_policy_properties"] = json!({ "property": props });
        }
        if let Some(p) = &self.scheduling_policy {
            body["scheduling_policy"] = if api::looks_like_id(p) {
                json!({ "id": p })
            } else {
                json!({ "name": p })
            };
        }
        if let Some(o) = self.overcommit {
            body["memory_policy"] = json!({ "over_commit": { "percent": o } });
        }
        if let Some(b) = &self.migration_bandwidth {
            body["migration"] = json!({ "bandwidth": match b.trim() {
                "auto" => json!({ "assignment_method": "auto" }),
                m => {
                    let mbps: u32 = m.parse().map_err(|_| {
                        anyhow::anyhow!("--migration-bandwidth {m:?} is neither a number of Mbps nor auto")
                    })?;
                    json!({ "assignment_method": "custom", "custom_value": mbps })
                }
            }});
        }
        if let Some(e) = self.migration_encrypted {
            body["migration"]["encrypted"] = json!(e);
        }
        Ok(())
    }
}

/// What `host fence` does (oVirt's fence_type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FenceTypeArg {
    /// Ask the agent whether the host is powered on.
    Status,
    /// Power the host off.
    Stop,
    /// Power the host on.
    Start,
    /// Power the host off, then on.
    Restart,
    /// Confirm that a host which stopped responding was rebooted (its VMs may then restart
    /// elsewhere once their leases are free).
    Manual,
}

#[derive(Subcommand, Debug)]
pub enum AffinityGroupCmd {
    /// List a cluster's affinity groups.
    #[command(visible_alias = "ls")]
    List {
        #[arg(long)]
        cluster: String,
    },
    /// Show an affinity group.
    Show {
        #[arg(long)]
        cluster: String,
        name: String,
    },
    /// Create an affinity group (positive and soft unless told otherwise).
    Create {
        name: String,
        #[arg(long)]
        cluster: String,
        /// Keep the VMs apart instead of together.
        #[arg(long)]
        negative: bool,
        /// A hard rule: a VM does not start where it would break it.
        #[arg(long)]
        enforcing: bool,
        /// Create the group with its rule disabled.
        #[arg(long)]
        disabled: bool,
        #[arg(long, default_value = "")]
        description: String,
        /// A member VM (name or id; repeat for more).
        #[arg(long = "vm")]
        vms: Vec<String>,
    },
    /// Remove an affinity group (its VMs stay).
    #[command(visible_alias = "rm")]
    Remove {
        #[arg(long)]
        cluster: String,
        name: String,
    },
    /// Add a VM of the cluster to a group.
    AddVm {
        #[arg(long)]
        cluster: String,
        name: String,
        vm: String,
    },
    /// Take a VM out of a group.
    RemoveVm {
        #[arg(long)]
        cluster: String,
        name: String,
        vm: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// List the scheduling policies.
    #[command(visible_alias = "ls")]
    List,
    /// Show a scheduling policy.
    Show { name: String },
}

#[derive(Subcommand, Debug)]
pub enum FenceAgentCmd {
    /// Show a host's fence agent (none: an empty list).
    #[command(visible_alias = "ls")]
    List {
        #[arg(long)]
        host: String,
    },
    /// Give a host its fence agent: `--type script --option command=/path/agent`, or a
    /// fence-agents type (`--type ipmilan` runs fence_ipmilan) with address and credentials.
    Create {
        #[arg(long)]
        host: String,
        #[arg(long = "type")]
        agent_type: String,
        #[arg(long)]
        address: Option<String>,
        #[arg(long)]
        username: Option<String>,
        /// Read the agent's password from this file (`-`: standard input).
        #[arg(long)]
        password_file: Option<PathBuf>,
        #[arg(long)]
        port: Option<u16>,
        /// NAME=VALUE passed to the agent as --NAME=VALUE (repeat for more).
        #[arg(long = "option")]
        options: Vec<String>,
    },
    /// Remove a host's fence agent.
    #[command(visible_alias = "rm")]
    Remove {
        #[arg(long)]
        host: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum HostCmd {
    /// List hosts.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show a host.
    Show { name: String },
    /// A host's statistics: memory, swap, CPU, load, boot time (live from its node when up).
    Stats { name: String },
    /// Add a host: its node (`oxvirt node --engine … --ca-fingerprint …`) joins, and the host
    /// comes up.
    Create {
        name: String,
        /// The node's API address (HOST:PORT).
        #[arg(long)]
        address: String,
        /// The cluster (name or id); `Default` when absent.
        #[arg(long)]
        cluster: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Remove a host in maintenance.
    #[command(visible_alias = "rm")]
    Remove { name: String },
    /// Take a host out of maintenance.
    Activate {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Move a host to maintenance (its VMs migrate away).
    #[command(visible_alias = "maintenance")]
    Deactivate {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Make a host the SPM of its data center (the current SPM steps down).
    SelectSpm { name: String },
    /// Power management through the host's fence agent (`--type status` prints on or off).
    Fence {
        name: String,
        #[arg(long = "type", value_enum)]
        fence_type: FenceTypeArg,
    },
}

/// Where a storage domain is (`<storage>` in the API).
#[derive(Args, Debug, Clone)]
pub struct StorageArgs {
    /// localfs, nfs or posixfs.
    #[arg(long, default_value = "localfs")]
    storage_type: String,
    /// The directory (localfs), export path (nfs) or device (posixfs).
    #[arg(long)]
    path: String,
    /// The NFS server.
    #[arg(long)]
    address: Option<String>,
}

impl StorageArgs {
    fn json(&self) -> Value {
        let mut storage = json!({ "type": self.storage_type, "path": self.path });
        if let Some(a) = &self.address {
            storage["address"] = json!(a);
        }
        storage
    }
}

/// What `sd unregistered` and `sd register` work on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnregisteredKind {
    Disk,
    Vm,
    Template,
}

impl UnregisteredKind {
    fn collection(self) -> (&'static str, &'static str, &'static kinds::Kind) {
        match self {
            Self::Disk => ("disks", "disk", &kinds::DISK),
            Self::Vm => ("vms", "vm", &kinds::VM),
            Self::Template => ("templates", "template", &kinds::TEMPLATE),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum SdCmd {
    /// List storage domains.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show a storage domain.
    Show { name: String },
    /// Create a storage domain through a host; with --datacenter, attach and activate it.
    Create {
        name: String,
        /// The host that formats it.
        #[arg(long)]
        host: String,
        #[command(flatten)]
        storage: StorageArgs,
        /// data, iso or export.
        #[arg(long = "type", default_value = "data")]
        domain_type: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Attach it to this data center and activate it.
        #[arg(long, visible_alias = "dc")]
        datacenter: Option<String>,
        #[command(flatten)]
        space: SpaceArgs,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Change a storage domain's name, description or space thresholds.
    Update {
        name: String,
        #[arg(long)]
        rename: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        space: SpaceArgs,
    },
    /// Import a data domain that exists under a path (detached from another oVirt or oxvirt
    /// setup); with --datacenter, attach and activate it. Its disks are then registered with
    /// `sd register`.
    Import {
        /// The name to give it (storage's name when absent).
        #[arg(long)]
        name: Option<String>,
        /// The host that reads it.
        #[arg(long)]
        host: String,
        #[command(flatten)]
        storage: StorageArgs,
        /// Which domain, when the path holds several.
        #[arg(long)]
        id: Option<String>,
        #[arg(long, visible_alias = "dc")]
        datacenter: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// List what a storage domain holds that the engine has no record of: disks found on
    /// storage, or the VMs or templates its OVF stores describe.
    Unregistered {
        name: String,
        #[arg(long, value_enum, default_value = "disk")]
        kind: UnregisteredKind,
    },
    /// Register an unregistered disk (with its volumes), VM or template (with its disks, NICs
    /// and snapshots) of a storage domain.
    Register {
        name: String,
        /// Its id (see `sd unregistered`).
        id: String,
        #[arg(long, value_enum, default_value = "disk")]
        kind: UnregisteredKind,
        /// The cluster a VM or template joins (by default the one its OVF names).
        #[arg(long)]
        cluster: Option<String>,
        /// Register it under this name.
        #[arg(long)]
        rename: Option<String>,
        /// Leave out disks that are missing from storage.
        #[arg(long)]
        allow_partial: bool,
        /// Give NICs whose MAC address is taken a new one from the cluster's pool.
        #[arg(long)]
        reassign_macs: bool,
        /// The OVF's cluster OLD is cluster NEW here (`OLD=NEW`; repeatable): oVirt's cluster
        /// mappings.
        #[arg(long = "map-cluster", value_name = "OLD=NEW")]
        map_cluster: Vec<String>,
        /// NICs on the OVF's network OLD go on network NEW here (`OLD=NEW`, an empty NEW
        /// leaves them unwired; repeatable): oVirt's vNIC profile mappings.
        #[arg(long = "map-network", value_name = "OLD=NEW")]
        map_network: Vec<String>,
    },
    /// Write a storage domain's OVF stores now (they are also written hourly and before the
    /// domain goes to maintenance).
    UpdateOvf { name: String },
    /// Remove an unattached storage domain.
    #[command(visible_alias = "rm")]
    Remove {
        name: String,
        /// Also delete its data, through this host.
        #[arg(long)]
        destroy: bool,
        #[arg(long)]
        host: Option<String>,
    },
    /// Attach a storage domain to a data center and activate it.
    Attach {
        name: String,
        #[arg(long, visible_alias = "dc")]
        datacenter: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Detach a storage domain in maintenance from its data center.
    Detach { name: String },
    /// Activate an attached storage domain.
    Activate {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Move an attached storage domain to maintenance.
    #[command(visible_alias = "maintenance")]
    Deactivate {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// List disks.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show a disk.
    Show { name: String },
    /// Create a floating disk.
    Create {
        name: String,
        /// Virtual size: bytes, or with a unit (512M, 10G, 1.5GiB).
        #[arg(long)]
        size: String,
        #[arg(long, visible_alias = "sd")]
        storage_domain: String,
        /// cow (qcow2, thin) or raw.
        #[arg(long, default_value = "cow")]
        format: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Remove a disk and its volumes.
    #[command(visible_alias = "rm")]
    Remove { name: String },
    /// Move a disk to another active data domain of its data center (also under its running
    /// VM: a live storage migration, the guest writing on).
    Move {
        name: String,
        /// The destination storage domain (name or id).
        #[arg(long, visible_alias = "sd")]
        storage_domain: String,
    },
    /// Grow a disk to a new size (also under its running VM, whose guest sees it at once).
    #[command(visible_alias = "resize")]
    Extend {
        name: String,
        /// The new size (e.g. 20G, 512M); a disk does not shrink.
        #[arg(long)]
        size: String,
    },
    /// Copy a disk (its VMs down) into a new disk on an active data domain, which may be its own.
    #[command(visible_alias = "cp")]
    Copy {
        name: String,
        /// The destination storage domain (name or id).
        #[arg(long, visible_alias = "sd")]
        storage_domain: String,
        /// The copy's name (default: NAME_Copy, as oVirt names it).
        #[arg(long = "name")]
        new_name: Option<String>,
    },
    /// Upload an image file (qcow2 or raw) into a new disk: the data goes straight to a host,
    /// through the engine's image transfer (ovirt-imageio's protocol).
    Upload {
        /// The image file.
        file: PathBuf,
        /// The storage domain of the new disk (name or id).
        #[arg(long, visible_alias = "sd")]
        storage_domain: String,
        /// The new disk's name (default: the file's name without its extension).
        #[arg(long)]
        name: Option<String>,
        /// The new disk's format: cow (qcow2, thin) or raw (whatever the file's format).
        #[arg(long, default_value = "cow", value_parser = ["cow", "raw"])]
        format: String,
        /// The host the data goes through (name or id; default: the engine picks one).
        #[arg(long)]
        host: Option<String>,
        /// What the disk holds: data, or an ISO for CD-ROMs (default: iso when the file is an
        /// ISO 9660 image).
        #[arg(long, value_parser = ["data", "iso"])]
        content_type: Option<String>,
    },
    /// Download a disk's guest data (its whole chain) into a new image file. The disk's VMs
    /// must be down.
    Download {
        name: String,
        /// The image file to create.
        file: PathBuf,
        /// The file's format.
        #[arg(long, default_value = "qcow2", value_parser = ["qcow2", "raw"])]
        format: String,
        /// The host the data comes through (name or id; default: the engine picks one).
        #[arg(long)]
        host: Option<String>,
    },
    /// Attach a disk to a VM, active unless `--inactive` (hot plugged into a running VM).
    Attach {
        name: String,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        inactive: bool,
        #[arg(long)]
        bootable: bool,
        /// The controller the guest sees it on (sata and ide change only while the VM is down).
        #[arg(long, default_value = "virtio", value_parser = ["virtio", "virtio_scsi", "sata", "ide"])]
        interface: String,
    },
    /// Detach a disk from a VM (hot unplugged from a running VM); the disk stays.
    Detach {
        name: String,
        #[arg(long)]
        vm: String,
    },
    /// Activate a VM's disk (hot plugged into a running VM).
    Activate {
        name: String,
        #[arg(long)]
        vm: String,
    },
    /// Deactivate a VM's disk (hot unplugged from a running VM).
    Deactivate {
        name: String,
        #[arg(long)]
        vm: String,
    },
}

/// A storage domain's space thresholds (oVirt's defaults: 10 %, 5 GB).
#[derive(Debug, clap::Args)]
pub struct SpaceArgs {
    /// Free space under this percent of the domain raises a warning event.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100))]
    warning_low_space: Option<u32>,
    /// Free space under this many GB raises an error event and refuses new disks,
    /// snapshots, clones and copies there.
    #[arg(long)]
    critical_space: Option<u32>,
}

impl SpaceArgs {
    fn apply(&self, body: &mut Value) {
        if let Some(w) = self.warning_low_space {
            body["warning_low_space_indicator"] = json!(w);
        }
        if let Some(c) = self.critical_space {
            body["critical_space_action_blocker"] = json!(c);
        }
    }
}

/// High availability: restarted elsewhere when its host dies, in place when it crashes.
#[derive(Debug, clap::Args)]
pub struct HaArgs {
    /// Highly available (holds a VM lease; the engine restarts it).
    #[arg(long)]
    ha: bool,
    /// Restart order among highly available VMs (higher first); implies --ha.
    #[arg(long)]
    ha_priority: Option<i32>,
    /// When storage errors pause the VM: resume it once its storage is back (auto_resume,
    /// the default), leave it paused for an administrator (leave_paused), or kill it after
    /// 8 × io_timeout (kill; always so for highly available VMs, whose lease it frees).
    #[arg(long, value_parser = ["auto_resume", "leave_paused", "kill"])]
    resume_behavior: Option<String>,
}

impl HaArgs {
    fn apply(&self, body: &mut Value) {
        if self.ha || self.ha_priority.is_some() {
            body["high_availability"] = json!({ "enabled": true, "priority": self.ha_priority.unwrap_or(1) });
        }
        if let Some(b) = &self.resume_behavior {
            body["storage_error_resume_behaviour"] = json!(b);
        }
    }
}

// Parsed once per run: the size of `Create` costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// List VMs.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show a VM.
    Show { name: String },
    /// A VM's statistics: memory, CPU shares (guest, hypervisor), migration progress.
    Stats { name: String },
    /// Create a VM (from Blank or a template), optionally with a new boot disk.
    Create {
        name: String,
        #[arg(long)]
        cluster: String,
        #[arg(long, default_value = "Blank")]
        template: String,
        /// Memory: bytes or with a unit (512M, 2G).
        #[arg(long)]
        memory: Option<String>,
        /// Virtual CPUs (cores of one socket).
        #[arg(long)]
        cpus: Option<u32>,
        /// Add a new bootable disk of this size.
        #[arg(long, requires = "storage_domain")]
        disk_size: Option<String>,
        /// Where the new disk goes.
        #[arg(long, visible_alias = "sd")]
        storage_domain: Option<String>,
        /// Direct kernel boot: the kernel, initrd and command line (paths on the hosts).
        #[arg(long)]
        kernel: Option<String>,
        #[arg(long)]
        initrd: Option<String>,
        #[arg(long)]
        cmdline: Option<String>,
        /// An ISO disk for its CD-ROM (name or id; see `disk upload`).
        #[arg(long)]
        cdrom: Option<String>,
        #[command(flatten)]
        boot: BootArgs,
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        ha: HaArgs,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Clone a VM that is down, or with --snapshot any VM as one of its snapshots was: its
    /// configuration, NICs with new MACs, each disk copied into one volume of its own.
    Clone {
        name: String,
        /// The new VM's name.
        new: String,
        /// The snapshot (id or description) to clone; the VM may run meanwhile.
        #[arg(long)]
        snapshot: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Put an ISO disk into a VM's CD-ROM, or eject it: for its next start, or with --current
    /// into the running VM's drive.
    Cdrom {
        name: String,
        /// The ISO disk (name or id).
        #[arg(long, required_unless_present = "eject", conflicts_with = "eject")]
        iso: Option<String>,
        /// Empty the drive.
        #[arg(long)]
        eject: bool,
        /// Change the running VM's drive now (its configuration keeps what the next start uses).
        #[arg(long)]
        current: bool,
    },
    /// Change a VM: description, memory, CPUs, high availability, where its lease lives.
    Update {
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// Memory: bytes or with a unit (512M, 2G). A running VM gets more at once (hot
        /// plugged, in 256 MiB steps) unless --next-run; less waits for its next start.
        #[arg(long)]
        memory: Option<String>,
        /// vCPUs: a running VM gets them at once (hot plug or unplug), unless --next-run.
        #[arg(long)]
        cpus: Option<u32>,
        /// A running VM keeps its vCPUs and memory until its next start.
        #[arg(long)]
        next_run: bool,
        #[command(flatten)]
        ha: HaArgs,
        /// Not highly available any more.
        #[arg(long, conflicts_with_all = ["ha", "ha_priority"])]
        no_ha: bool,
        /// The storage domain holding the VM lease of a highly available VM.
        #[arg(long)]
        lease_sd: Option<String>,
        /// Keep the lease on the first disk's domain (the default).
        #[arg(long, conflicts_with = "lease_sd")]
        no_lease_sd: bool,
    },
    /// Remove a VM that is down, with its disks.
    #[command(visible_alias = "rm")]
    Remove {
        name: String,
        /// Power it off first when it runs.
        #[arg(long)]
        force: bool,
        /// Keep its disks (detached).
        #[arg(long)]
        keep_disks: bool,
    },
    /// Start a VM and wait until it is up. --cdrom and --boot make it a run once: they hold
    /// for this run only (an installation from an ISO, say).
    Start {
        name: String,
        /// Run it on this host.
        #[arg(long)]
        host: Option<String>,
        /// This run's CD: an ISO disk (name or id).
        #[arg(long)]
        cdrom: Option<String>,
        /// This run's boot order, e.g. `cdrom,hd`.
        #[arg(long, value_delimiter = ',', value_parser = ["hd", "cdrom"])]
        boot: Vec<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Power a VM off.
    Stop {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Ask the guest to shut down (ACPI) and wait until it is down.
    Shutdown {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Reboot a running guest (a system reset); the VM stays on its host.
    Reboot { name: String },
    /// Open a running VM's VNC console: prints a remote-viewer file with a one-time password
    /// (`oxvirt vm console web1 > web1.vv && remote-viewer web1.vv`).
    Console {
        name: String,
        /// Seconds the password works.
        #[arg(long, default_value_t = 120)]
        expiry: u64,
    },
    /// Cancel a VM's migration: it runs on where it was.
    CancelMigration { name: String },
    /// Suspend a running VM: its memory goes to storage, QEMU ends (`vm start` resumes it).
    Suspend {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Live-migrate a VM (to --host, or where the scheduler says).
    Migrate {
        name: String,
        #[arg(long)]
        host: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// How a VM boots through its firmware.
#[derive(clap::Args, Debug, Default)]
pub struct BootArgs {
    /// Boot order, e.g. `cdrom,hd` (default `hd`).
    #[arg(long, value_delimiter = ',', value_parser = ["hd", "cdrom"])]
    boot: Vec<String>,
    /// oVirt's OS type (`other`, `rhel_9x64`, `windows_2022`, …): a Windows one gets its
    /// CD-ROM on SATA.
    #[arg(long)]
    os_type: Option<String>,
}

impl BootArgs {
    fn apply(&self, body: &mut Value) {
        if !self.boot.is_empty() {
            body["os"]["boot"] = json!({ "devices": { "device": self.boot } });
        }
        if let Some(t) = &self.os_type {
            body["os"]["type"] = json!(t);
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// List templates.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show a template.
    Show { name: String },
    /// Make a template from a VM that is down.
    Create {
        name: String,
        #[arg(long)]
        vm: String,
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Remove a template no VM uses.
    #[command(visible_alias = "rm")]
    Remove { name: String },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// List a VM's snapshots.
    #[command(visible_alias = "ls")]
    List {
        #[arg(long)]
        vm: String,
    },
    /// Show a snapshot (by id or description).
    Show {
        #[arg(long)]
        vm: String,
        snapshot: String,
    },
    /// Take a snapshot (live when the VM runs).
    Create {
        #[arg(long)]
        vm: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Also save the memory of a running VM.
        #[arg(long)]
        memory: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Remove a snapshot (its data merges into the chain).
    #[command(visible_alias = "rm")]
    Remove {
        #[arg(long)]
        vm: String,
        snapshot: String,
    },
    /// Restore a VM that is down to a snapshot.
    Restore {
        #[arg(long)]
        vm: String,
        snapshot: String,
        /// Also the memory the snapshot saved: the VM is suspended at the snapshot's moment
        /// and resumes from there at its next start.
        #[arg(long)]
        memory: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum NetworkCmd {
    /// List logical networks.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show a network.
    Show { name: String },
    /// Add a network to a data center (a VM network unless `--no-vm`).
    Create {
        name: String,
        #[arg(long = "dc", visible_alias = "datacenter")]
        datacenter: String,
        /// 802.1Q VLAN id.
        #[arg(long)]
        vlan: Option<u16>,
        #[arg(long)]
        mtu: Option<u32>,
        /// Not for VM NICs (no vNIC profile, no bridge).
        #[arg(long)]
        no_vm: bool,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Change a network's MTU, VLAN or description.
    Update {
        name: String,
        #[arg(long)]
        mtu: Option<u32>,
        #[arg(long, conflicts_with = "no_vlan")]
        vlan: Option<u16>,
        /// Untagged from now on.
        #[arg(long)]
        no_vlan: bool,
        #[arg(long)]
        description: Option<String>,
    },
    /// Remove a network nothing uses.
    #[command(visible_alias = "rm")]
    Remove { name: String },
    /// The networks of a cluster.
    ClusterList {
        #[arg(long)]
        cluster: String,
    },
    /// Attach a network to a cluster (its hosts must carry it unless `--optional`).
    AttachCluster {
        name: String,
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        optional: bool,
    },
    /// Detach a network from a cluster.
    DetachCluster {
        name: String,
        #[arg(long)]
        cluster: String,
    },
    /// A host's NICs and bonds, live from its node.
    HostNics {
        #[arg(long)]
        host: String,
    },
    /// Which of a host's NICs carries which network.
    HostList {
        #[arg(long)]
        host: String,
    },
    /// Carry a network on a host NIC (the host checks its connectivity and rolls back
    /// without the engine's confirmation).
    AttachHost {
        name: String,
        #[arg(long)]
        host: String,
        #[arg(long)]
        nic: String,
        /// `none`, `dhcp` or ADDRESS/PREFIX.
        #[arg(long, default_value = "none")]
        ip: String,
    },
    /// Take a network off a host.
    DetachHost {
        name: String,
        #[arg(long)]
        host: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum NicCmd {
    /// List a VM's NICs.
    #[command(visible_alias = "ls")]
    List {
        #[arg(long)]
        vm: String,
    },
    /// Show a NIC (by name or id).
    Show {
        #[arg(long)]
        vm: String,
        nic: String,
    },
    /// Add a NIC (hot plugged on a running VM); its MAC comes from the cluster's pool unless given.
    Create {
        #[arg(long)]
        vm: String,
        name: String,
        /// The VM network to connect to (its vNIC profile); none: unconnected.
        #[arg(long)]
        network: Option<String>,
        #[arg(long)]
        mac: Option<String>,
        /// virtio, e1000 or rtl8139.
        #[arg(long, default_value = "virtio")]
        interface: String,
    },
    /// Remove a NIC (hot unplugged from a running VM); its MAC returns to the pool.
    #[command(visible_alias = "rm")]
    Remove {
        #[arg(long)]
        vm: String,
        nic: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum VnicProfileCmd {
    /// List vNIC profiles.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show a vNIC profile.
    Show { name: String },
}

#[derive(Subcommand, Debug)]
pub enum MacPoolCmd {
    /// List MAC pools.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show a MAC pool.
    Show { name: String },
    /// Replace a pool's ranges: `--range 56:6f:00:00:00:00-56:6f:00:00:ff:ff` (repeat for more).
    Update {
        name: String,
        #[arg(long = "range", required = true)]
        ranges: Vec<String>,
    },
}

/// Storage limits (MB/s, IOPS; 0: none). A total excludes its read and write parts.
#[derive(Debug, clap::Args)]
pub struct LimitArgs {
    #[arg(long)]
    max_throughput: Option<u64>,
    #[arg(long)]
    max_read_throughput: Option<u64>,
    #[arg(long)]
    max_write_throughput: Option<u64>,
    #[arg(long)]
    max_iops: Option<u64>,
    #[arg(long)]
    max_read_iops: Option<u64>,
    #[arg(long)]
    max_write_iops: Option<u64>,
}

impl LimitArgs {
    fn apply(&self, body: &mut Value) {
        for (name, v) in [
            ("max_throughput", self.max_throughput),
            ("max_read_throughput", self.max_read_throughput),
            ("max_write_throughput", self.max_write_throughput),
            ("max_iops", self.max_iops),
            ("max_read_iops", self.max_read_iops),
            ("max_write_iops", self.max_write_iops),
        ] {
            if let Some(v) = v {
                body[name] = json!(v);
            }
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum QosCmd {
    /// List a data center's QoS entries.
    #[command(visible_alias = "ls")]
    List {
        #[arg(long, visible_alias = "dc")]
        datacenter: String,
    },
    /// Create a storage QoS in a data center.
    Create {
        name: String,
        #[arg(long, visible_alias = "dc")]
        datacenter: String,
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Change a QoS's limits: running VMs' disks under it get them at once.
    Update {
        name: String,
        #[arg(long, visible_alias = "dc")]
        datacenter: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Remove a QoS: its disk profiles become unlimited.
    #[command(visible_alias = "rm")]
    Remove {
        name: String,
        #[arg(long, visible_alias = "dc")]
        datacenter: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum DiskProfileCmd {
    /// List disk profiles (of one storage domain with --sd).
    #[command(visible_alias = "ls")]
    List {
        #[arg(long)]
        sd: Option<String>,
    },
    /// Create a disk profile on a storage domain, with a QoS of its data center.
    Create {
        name: String,
        #[arg(long)]
        sd: String,
        /// The QoS, in the domain's data center (--dc names it).
        #[arg(long, requires = "datacenter")]
        qos: Option<String>,
        #[arg(long, visible_alias = "dc")]
        datacenter: Option<String>,
    },
    /// Give a disk profile another QoS, or none (--no-qos).
    Update {
        name: String,
        #[arg(long, requires = "datacenter", conflicts_with = "no_qos")]
        qos: Option<String>,
        #[arg(long, visible_alias = "dc")]
        datacenter: Option<String>,
        #[arg(long)]
        no_qos: bool,
    },
    /// Remove a disk profile no disk uses.
    #[command(visible_alias = "rm")]
    Remove { name: String },
    /// Give a disk a profile of its domain, or none (--none): a running VM gets the limits.
    Set {
        #[arg(long)]
        disk: String,
        #[arg(long, conflicts_with = "none", required_unless_present = "none")]
        profile: Option<String>,
        #[arg(long)]
        none: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TagCmd {
    /// List tags (the root tag first).
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show a tag.
    Show { name: String },
    /// Create a tag, under the root tag or --parent.
    Create {
        name: String,
        #[arg(long)]
        parent: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Rename a tag, change its description or move it under another tag (root: the top).
    Update {
        name: String,
        #[arg(long)]
        rename: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        parent: Option<String>,
    },
    /// Remove a tag with the tags under it; they come off everything.
    #[command(visible_alias = "rm")]
    Remove { name: String },
    /// Put a tag on a VM, host or template.
    Assign {
        name: String,
        #[command(flatten)]
        on: TagOn,
    },
    /// Take a tag off a VM, host or template.
    Unassign {
        name: String,
        #[command(flatten)]
        on: TagOn,
    },
    /// The tags on a VM, host or template.
    Of {
        #[command(flatten)]
        on: TagOn,
    },
}

/// What a tag goes on: exactly one of these.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct TagOn {
    #[arg(long)]
    vm: Option<String>,
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    template: Option<String>,
}

impl TagOn {
    /// The path of the object's tags (`vms/{id}/tags`).
    async fn path(&self, ctx: &Ctx) -> anyhow::Result<String> {
        let (k, name) = match (&self.vm, &self.host, &self.template) {
            (Some(v), _, _) => (&kinds::VM, v),
            (_, Some(h), _) => (&kinds::HOST, h),
            (_, _, Some(t)) => (&kinds::TEMPLATE, t),
            _ => anyhow::bail!("give --vm, --host or --template"),
        };
        Ok(format!("{}/{}/tags", k.coll, ctx.id(k, name).await?))
    }
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// List jobs.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show a job with its steps.
    Show { id: String },
    /// Retry the failed command behind a job that waits for an administrator (its rollback
    /// failed, or it failed past its point of no return), once the cause is fixed.
    Retry { id: String },
}

#[derive(Subcommand, Debug)]
pub enum EventCmd {
    /// List events, newest last.
    #[command(visible_alias = "ls")]
    List {
        /// oVirt search query, e.g. `severity>=warning`.
        #[arg(short, long)]
        search: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        max: u32,
        /// Only events after this event id.
        #[arg(long)]
        from: Option<u64>,
    },
    /// Show an event.
    Show { id: String },
}

/// Runs a client subcommand; `cli` is the whole command line's definition (for completion).
pub fn run(cmd: ClientCommand, cli: clap::Command) -> anyhow::Result<()> {
    if let ClientCommand::Completion { shell } = cmd {
        let mut cli = cli;
        clap_complete::generate(shell, &mut cli, "oxvirt", &mut std::io::stdout());
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(cmd))
}

async fn run_async(cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::Login(a) => login(a).await,
        ClientCommand::Logout(c) => logout(&c).await,
        ClientCommand::Completion { .. } => unreachable!("handled before the runtime starts"),
        ClientCommand::Datacenter(g) => {
            let ctx = Ctx::open(&g.common)?;
            datacenter(&ctx, g.cmd).await
        }
        ClientCommand::Cluster(g) => {
            let ctx = Ctx::open(&g.common)?;
            cluster(&ctx, g.cmd).await
        }
        ClientCommand::Host(g) => {
            let ctx = Ctx::open(&g.common)?;
            host(&ctx, g.cmd).await
        }
        ClientCommand::Affinitygroup(g) => {
            let ctx = Ctx::open(&g.common)?;
            affinity_group(&ctx, g.cmd).await
        }
        ClientCommand::Schedulingpolicy(g) => {
            let ctx = Ctx::open(&g.common)?;
            scheduling_policy(&ctx, g.cmd).await
        }
        ClientCommand::Fenceagent(g) => {
            let ctx = Ctx::open(&g.common)?;
            fence_agent(&ctx, g.cmd).await
        }
        ClientCommand::Storagedomain(g) => {
            let ctx = Ctx::open(&g.common)?;
            storage_domain(&ctx, g.cmd).await
        }
        ClientCommand::Disk(g) => {
            let ctx = Ctx::open(&g.common)?;
            disk(&ctx, g.cmd).await
        }
        ClientCommand::Vm(g) => {
            let ctx = Ctx::open(&g.common)?;
            vm(&ctx, g.cmd).await
        }
        ClientCommand::Template(g) => {
            let ctx = Ctx::open(&g.common)?;
            template(&ctx, g.cmd).await
        }
        ClientCommand::Snapshot(g) => {
            let ctx = Ctx::open(&g.common)?;
            snapshot(&ctx, g.cmd).await
        }
        ClientCommand::Network(g) => {
            let ctx = Ctx::open(&g.common)?;
            network(&ctx, g.cmd).await
        }
        ClientCommand::Nic(g) => {
            let ctx = Ctx::open(&g.common)?;
            nic(&ctx, g.cmd).await
        }
        ClientCommand::Vnicprofile(g) => {
            let ctx = Ctx::open(&g.common)?;
            let k = &kinds::VNIC_PROFILE;
            match g.cmd {
                VnicProfileCmd::List(a) => ctx.list(k, &a).await,
                VnicProfileCmd::Show { name } => ctx.show(k, &name).await,
            }
        }
        ClientCommand::Macpool(g) => {
            let ctx = Ctx::open(&g.common)?;
            mac_pool(&ctx, g.cmd).await
        }
        ClientCommand::Job(g) => {
            let ctx = Ctx::open(&g.common)?;
            job(&ctx, g.cmd).await
        }
        ClientCommand::Event(g) => {
            let ctx = Ctx::open(&g.common)?;
            event(&ctx, g.cmd).await
        }
        ClientCommand::Tag(g) => {
            let ctx = Ctx::open(&g.common)?;
            tag(&ctx, g.cmd).await
        }
        ClientCommand::Qos(g) => {
            let ctx = Ctx::open(&g.common)?;
            qos(&ctx, g.cmd).await
        }
        ClientCommand::Diskprofile(g) => {
            let ctx = Ctx::open(&g.common)?;
            disk_profile(&ctx, g.cmd).await
        }
    }
}

// ------------------------------------------------------------------------------ session

fn read_password(a: &LoginArgs) -> anyhow::Result<String> {
    let raw = match &a.password_file {
        Some(p) => return read_secret_file(p),
        None => {
            anyhow::ensure!(
                std::io::stdin().is_terminal(),
                "no password: give --password-file FILE (or - for standard input), or run on a terminal"
            );
            rpassword::prompt_password(format!("Password for {}: ", a.user))
                .context("reading the password")?
        }
    };
    let pw = raw.trim_end_matches(['\n', '\r']).to_string();
    anyhow::ensure!(!pw.is_empty(), "the password is empty");
    Ok(pw)
}

async fn login(a: LoginArgs) -> anyhow::Result<()> {
    let path = config::path(a.common.config.as_deref())?;
    let ep = transport::Endpoint::parse(&a.url)?;
    let (trust, ca_pem) = if let Some(f) = &a.ca_file {
        let pem =
            std::fs::read_to_string(f).with_context(|| format!("reading the CA file {}", f.display()))?;
        oxvirt_pki::client_config(&pem, None)
            .with_context(|| format!("{} is not a CA certificate", f.display()))?;
        (transport::Trust::Ca(pem.clone()), Some(pem))
    } else if let Some(fp) = &a.ca_fingerprint {
        let pem = api::fetch_ca(&ep).await?;
        let got = oxvirt_pki::fingerprint_pem(&pem).context("the engine's CA certificate is not valid")?;
        anyhow::ensure!(
            oxvirt_pki::fingerprint_matches(&got, fp),
            "the engine's CA fingerprint is {got}, not {fp}: refusing to trust it"
        );
        (transport::Trust::Ca(pem.clone()), Some(pem))
    } else if a.insecure {
        (transport::Trust::Insecure, None)
    } else {
        anyhow::bail!(
            "say how to check the engine's certificate: --ca-file FILE (pki/ca.pem in the engine's data \
             directory), --ca-fingerprint SHA256 (printed by `oxvirt engine`/`oxvirt up`), or --insecure"
        );
    };
    let password = read_password(&a)?;
    let http = transport::Http::new(ep.clone(), &trust, api::REQUEST_TIMEOUT)?;
    let login = api::sso_login(&http, &a.user, &password).await?;
    let api = Api::new(http, login.token.clone(), a.user.clone());
    let root = api.get("/").await.context("checking the new session")?;
    let session = Session {
        url: ep.url(),
        user: a.user.clone(),
        token: login.token,
        expires: login.expires,
        ca_pem,
        insecure: a.insecure,
    };
    config::save(&path, &session)?;
    let product = output::at(&root, "product_info.name")
        .and_then(Value::as_str)
        .unwrap_or("engine");
    let version = output::at(&root, "product_info.version.full_version")
        .and_then(Value::as_str)
        .unwrap_or("?");
    match a.common.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "url": session.url, "user": session.user, "expires": session.expires,
                "product": product, "version": version, "session_file": path,
            }))?
        ),
        Output::Table => println!(
            "logged in to {} ({product} {version}) as {}; session stored in {}",
            session.url,
            session.user,
            path.display()
        ),
    }
    Ok(())
}

async fn logout(c: &Common) -> anyhow::Result<()> {
    let path = config::path(c.config.as_deref())?;
    let s = config::load(&path)?;
    let http = transport::Http::new(
        transport::Endpoint::parse(&s.url)?,
        &s.trust()?,
        Duration::from_secs(30),
    )?;
    // The local session goes even when the engine cannot be told (it may be gone for good).
    let revoked = api::sso_logout(&http, &s.token).await;
    config::remove(&path)?;
    match revoked {
        Ok(()) => println!("logged out of {}", s.url),
        Err(e) => eprintln!("session forgotten; the engine could not revoke the token: {e:#}"),
    }
    Ok(())
}

/// A logged-in command's context.
struct Ctx {
    api: Api,
    /// How the engine's (and its hosts') certificates are checked.
    trust: transport::Trust,
    out: Output,
    quiet: bool,
}

impl Ctx {
    fn open(c: &Common) -> anyhow::Result<Ctx> {
        let s = config::load(&config::path(c.config.as_deref())?)?;
        Ok(Ctx {
            api: Api::from_session(&s)?,
            trust: s.trust()?,
            out: c.output,
            quiet: c.quiet,
        })
    }

    async fn list(&self, kind: &'static Kind, a: &ListArgs) -> anyhow::Result<()> {
        let mut q = Vec::new();
        if let Some(s) = &a.search {
            q.push(("search", s.clone()));
        }
        if let Some(m) = a.max {
            q.push(("max", m.to_string()));
        }
        let items = self.api.list(kind.coll, kind.elem, &q).await?;
        output::print_list(&self.api, kind, &items, self.out).await
    }

    async fn id(&self, kind: &'static Kind, name: &str) -> anyhow::Result<String> {
        self.api.resolve(kind, name).await
    }

    async fn get(&self, kind: &'static Kind, id: &str) -> anyhow::Result<Value> {
        self.api.get(&format!("/{}/{id}", kind.coll)).await
    }

    async fn show(&self, kind: &'static Kind, name: &str) -> anyhow::Result<()> {
        let id = self.id(kind, name).await?;
        let obj = self.get(kind, &id).await?;
        output::print_one(&self.api, kind, &obj, self.out).await
    }

    /// The object's statistics: a table of name, value and unit (bytes readable), or the
    /// API's JSON.
    async fn statistics(&self, kind: &'static Kind, name: &str) -> anyhow::Result<()> {
        let id = self.id(kind, name).await?;
        let list = self
            .api
            .get(&format!("/{}/{id}/statistics", kind.coll))
            .await
            .with_context(|| format!("reading the statistics of {} {name}", kind.what))?;
        let stats = list["statistic"].as_array().cloned().unwrap_or_default();
        if matches!(self.out, Output::Json) {
            println!("{}", serde_json::to_string_pretty(&stats)?);
            return Ok(());
        }
        let rows: Vec<Vec<String>> = stats
            .iter()
            .map(|s| {
                let datum = match &s["values"]["value"][0]["datum"] {
                    Value::String(d) => d.clone(),
                    Value::Null => String::new(),
                    d => d.to_string(),
                };
                let unit = s["unit"].as_str().unwrap_or("");
                let value = match (unit, datum.parse::<f64>()) {
                    ("bytes", Ok(n)) => output::human_bytes(n as u64),
                    ("percent", _) => format!("{datum} %"),
                    _ => datum,
                };
                vec![s["name"].as_str().unwrap_or("").to_string(), value]
            })
            .collect();
        print!("{}", output::table(&["STATISTIC", "VALUE"], &rows));
        Ok(())
    }

    async fn create(&self, kind: &'static Kind, body: Value) -> anyhow::Result<Value> {
        self.api
            .request(Method::POST, &format!("/{}", kind.coll), Some(&body), None)
            .await
            .with_context(|| format!("creating the {}", kind.what))
    }

    async fn remove(&self, kind: &'static Kind, name: &str, query: &str) -> anyhow::Result<()> {
        let id = self.id(kind, name).await?;
        let mut p = Progress::new(format!("remove {} {name}", kind.what), self.quiet);
        let corr = progress::correlation_id("remove");
        let path = format!("/{}/{id}{query}", kind.coll);
        progress::with_job(
            &self.api,
            &mut p,
            &corr,
            self.api.request(Method::DELETE, &path, None, Some(&corr)),
        )
        .await
        .with_context(|| format!("removing {} {name}", kind.what))?;
        p.finish("removed");
        output::print_done(self.out, &format!("{} {name} removed", kind.what), None)
    }

    /// POSTs an action (`/coll/id/verb`), showing its job, then waits for `until` if given.
    async fn action(
        &self,
        label: String,
        path: String,
        body: Value,
        until: Option<Until<'_>>,
    ) -> anyhow::Result<Option<Value>> {
        Ok(self.action_reply(label, path, body, until).await?.1)
    }

    /// [`Ctx::action`], also returning the action's reply.
    async fn action_reply(
        &self,
        label: String,
        path: String,
        body: Value,
        until: Option<Until<'_>>,
    ) -> anyhow::Result<(Value, Option<Value>)> {
        let mut p = Progress::new(label.clone(), self.quiet);
        let corr = progress::correlation_id("action");
        let reply = progress::with_job(
            &self.api,
            &mut p,
            &corr,
            self.api.request(Method::POST, &path, Some(&body), Some(&corr)),
        )
        .await
        .with_context(|| format!("{label} failed"))?;
        let obj = match until {
            Some(u) => Some(progress::wait(&self.api, &mut p, u).await?),
            None => None,
        };
        p.finish("done");
        Ok((reply, obj))
    }

    /// PUTs `body` onto object `id` (`name` in messages) and prints the result.
    async fn update(&self, kind: &'static Kind, id: &str, name: &str, body: Value) -> anyhow::Result<()> {
        self.update_at(kind, id, name, body).await
    }

    /// [`Ctx::update`] at `id` with a query string after it, when there is one.
    async fn update_at(&self, kind: &'static Kind, id: &str, name: &str, body: Value) -> anyhow::Result<()> {
        let obj = self
            .api
            .request(Method::PUT, &format!("/{}/{id}", kind.coll), Some(&body), None)
            .await
            .with_context(|| format!("updating {} {name}", kind.what))?;
        self.print(kind, &obj).await
    }

    /// DELETEs `path` (a member of a sub-collection, at once): `failing` names the
    /// operation in an error, `done` is printed after it.
    async fn delete_at(&self, path: &str, failing: String, done: String) -> anyhow::Result<()> {
        self.api
            .request(Method::DELETE, path, None, None)
            .await
            .with_context(|| failing)?;
        output::print_done(self.out, &done, None)
    }

    /// Prints an object after a change: the table of one object, or its JSON.
    async fn print(&self, kind: &'static Kind, obj: &Value) -> anyhow::Result<()> {
        output::print_one(&self.api, kind, obj, self.out).await
    }
}

fn until<'a>(
    kind: &'static Kind,
    id: &str,
    name: &str,
    field: &'a str,
    want: &'a [&'a str],
    fail: &'a [&'a str],
    w: WaitArgs,
) -> Option<Until<'a>> {
    (!w.no_wait).then(|| Until {
        path: format!("/{}/{id}", kind.coll),
        what: format!("{} {name}", kind.what),
        field,
        want,
        fail,
        timeout: Duration::from_secs(w.timeout),
    })
}

/// `512M`, `10G`, `1.5GiB`, `1048576` → bytes (units are binary).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => anyhow::bail!("size {s:?}: unknown unit {u:?} (use K, M, G or T)"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("size {s:?} is not a number with an optional unit (512M, 10G)"))?;
    let bytes = n * mult as f64;
    anyhow::ensure!(
        bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64,
        "size {s:?} is out of range"
    );
    Ok(bytes.round() as u64)
}

// ------------------------------------------------------------------------------ objects

async fn datacenter(ctx: &Ctx, cmd: DcCmd) -> anyhow::Result<()> {
    let k = &kinds::DATACENTER;
    match cmd {
        DcCmd::List(a) => ctx.list(k, &a).await,
        DcCmd::Show { name } => ctx.show(k, &name).await,
        DcCmd::Create {
            name,
            description,
            local,
        } => {
            let body = json!({ "name": name, "description": description, "local": local });
            let obj = ctx.create(k, body).await?;
            ctx.print(k, &obj).await
        }
        DcCmd::Remove { name } => ctx.remove(k, &name, "").await,
    }
}

async fn cluster(ctx: &Ctx, cmd: ClusterCmd) -> anyhow::Result<()> {
    let k = &kinds::CLUSTER;
    match cmd {
        ClusterCmd::List(a) => ctx.list(k, &a).await,
        ClusterCmd::Show { name } => ctx.show(k, &name).await,
        ClusterCmd::Create {
            name,
            datacenter,
            cpu_type,
            description,
            sched,
        } => {
            let dc = ctx.id(&kinds::DATACENTER, &datacenter).await?;
            let mut body = json!({ "name": name, "description": description, "data_center": { "id": dc } });
            if let Some(t) = cpu_type {
                body["cpu"] = json!({ "type": t });
            }
            sched.apply(&mut body)?;
            let obj = ctx.create(k, body).await?;
            ctx.print(k, &obj).await
        }
        ClusterCmd::Update {
            name,
            description,
            cpu_type,
            sched,
        } => {
            let id = ctx.id(k, &name).await?;
            let mut body = json!({});
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            if let Some(t) = cpu_type {
                body["cpu"] = json!({ "type": t });
            }
            sched.apply(&mut body)?;
            ctx.update(k, &id, &name, body).await
        }
        ClusterCmd::Remove { name } => ctx.remove(k, &name, "").await,
    }
}

async fn host(ctx: &Ctx, cmd: HostCmd) -> anyhow::Result<()> {
    let k = &kinds::HOST;
    let fail: &[&str] = &["install_failed", "error", "non_operational", "non_responsive"];
    match cmd {
        HostCmd::List(a) => ctx.list(k, &a).await,
        HostCmd::Show { name } => ctx.show(k, &name).await,
        HostCmd::Stats { name } => ctx.statistics(k, &name).await,
        HostCmd::Create {
            name,
            address,
            cluster,
            wait,
        } => {
            let mut body = json!({ "name": name, "address": address });
            if let Some(c) = cluster {
                body["cluster"] = json!({ "id": ctx.id(&kinds::CLUSTER, &c).await? });
            }
            let obj = ctx.create(k, body).await?;
            let id = obj["id"].as_str().unwrap_or_default().to_string();
            let obj = match until(k, &id, &name, "status", &["up"], &["install_failed"], wait) {
                Some(u) => {
                    let mut p = Progress::new(format!("add host {name}"), ctx.quiet);
                    let o = progress::wait(&ctx.api, &mut p, u).await?;
                    p.finish("up");
                    o
                }
                None => obj,
            };
            ctx.print(k, &obj).await
        }
        HostCmd::Remove { name } => ctx.remove(k, &name, "").await,
        HostCmd::Activate { name, wait } => {
            let id = ctx.id(k, &name).await?;
            let u = until(k, &id, &name, "status", &["up"], fail, wait);
            let label = format!("activate host {name}");
            let o = ctx
                .action(label, format!("/hosts/{id}/activate"), json!({}), u)
                .await?;
            output::print_done(ctx.out, &format!("host {name} is up"), o.as_ref())
        }
        HostCmd::Deactivate { name, wait } => {
            let id = ctx.id(k, &name).await?;
            let u = until(k, &id, &name, "status", &["maintenance"], &[], wait);
            let label = format!("host {name} to maintenance");
            let o = ctx
                .action(label, format!("/hosts/{id}/deactivate"), json!({}), u)
                .await?;
            output::print_done(ctx.out, &format!("host {name} is in maintenance"), o.as_ref())
        }
        HostCmd::SelectSpm { name } => {
            let id = ctx.id(k, &name).await?;
            let label = format!("select host {name} as SPM");
            let o = ctx
                .action(label, format!("/hosts/{id}/forceselectspm"), json!({}), None)
                .await?;
            output::print_done(ctx.out, &format!("host {name} is the SPM"), o.as_ref())
        }
        HostCmd::Fence { name, fence_type } => {
            let id = ctx.id(k, &name).await?;
            let t = clap::ValueEnum::to_possible_value(&fence_type)
                .expect("every fence type has a name")
                .get_name()
                .to_string();
            let body = json!({ "fence_type": t });
            // The answer carries the power status (status); the action runs to its end.
            let r = ctx
                .api
                .request(Method::POST, &format!("/hosts/{id}/fence"), Some(&body), None)
                .await
                .with_context(|| format!("fence {t} of host {name} failed"))?;
            let what = match output::at(&r, "power_management.status").and_then(Value::as_str) {
                Some(power) => format!("host {name} is powered {power}"),
                None => format!("host {name}: fence {t} done"),
            };
            output::print_done(ctx.out, &what, Some(&r))
        }
    }
}

/// A cluster's affinity group named by name or id.
async fn find_group(ctx: &Ctx, cluster: &str, g: &str) -> anyhow::Result<Value> {
    let path = format!("clusters/{cluster}/affinitygroups");
    find_in(ctx, &path, &kinds::AFFINITY_GROUP, g).await
}

async fn affinity_group(ctx: &Ctx, cmd: AffinityGroupCmd) -> anyhow::Result<()> {
    let k = &kinds::AFFINITY_GROUP;
    let cluster_id = |c: String| async move { ctx.id(&kinds::CLUSTER, &c).await };
    match cmd {
        AffinityGroupCmd::List { cluster } => {
            let c = cluster_id(cluster).await?;
            let items = ctx
                .api
                .list(&format!("clusters/{c}/affinitygroups"), k.elem, &[])
                .await?;
            output::print_list(&ctx.api, k, &items, ctx.out).await
        }
        AffinityGroupCmd::Show { cluster, name } => {
            let c = cluster_id(cluster).await?;
            let g = find_group(ctx, &c, &name).await?;
            ctx.print(k, &g).await
        }
        AffinityGroupCmd::Create {
            name,
            cluster,
            negative,
            enforcing,
            disabled,
            description,
            vms,
        } => {
            let c = cluster_id(cluster).await?;
            let mut members = Vec::with_capacity(vms.len());
            for v in &vms {
                members.push(json!({ "id": ctx.id(&kinds::VM, v).await? }));
            }
            let body = json!({
                "name": name,
                "description": description,
                "vms_rule": { "enabled": !disabled, "positive": !negative, "enforcing": enforcing },
                "vms": { "vm": members },
            });
            let obj = ctx
                .api
                .request(
                    Method::POST,
                    &format!("/clusters/{c}/affinitygroups"),
                    Some(&body),
                    None,
                )
                .await
                .with_context(|| format!("creating affinity group {name}"))?;
            ctx.print(k, &obj).await
        }
        AffinityGroupCmd::Remove { cluster, name } => {
            let c = cluster_id(cluster).await?;
            let g = find_group(ctx, &c, &name).await?;
            let gid = g["id"].as_str().unwrap_or_default();
            ctx.delete_at(
                &format!("/clusters/{c}/affinitygroups/{gid}"),
                format!("removing affinity group {name}"),
                format!("affinity group {name} removed"),
            )
            .await
        }
        AffinityGroupCmd::AddVm { cluster, name, vm } => {
            let c = cluster_id(cluster).await?;
            let g = find_group(ctx, &c, &name).await?;
            let gid = g["id"].as_str().unwrap_or_default();
            let v = ctx.id(&kinds::VM, &vm).await?;
            ctx.api
                .request(
                    Method::POST,
                    &format!("/clusters/{c}/affinitygroups/{gid}/vms"),
                    Some(&json!({ "id": v })),
                    None,
                )
                .await
                .with_context(|| format!("adding VM {vm} to affinity group {name}"))?;
            output::print_done(ctx.out, &format!("VM {vm} added to affinity group {name}"), None)
        }
        AffinityGroupCmd::RemoveVm { cluster, name, vm } => {
            let c = cluster_id(cluster).await?;
            let g = find_group(ctx, &c, &name).await?;
            let gid = g["id"].as_str().unwrap_or_default();
            let v = ctx.id(&kinds::VM, &vm).await?;
            ctx.delete_at(
                &format!("/clusters/{c}/affinitygroups/{gid}/vms/{v}"),
                format!("removing VM {vm} from affinity group {name}"),
                format!("VM {vm} removed from affinity group {name}"),
            )
            .await
        }
    }
}

async fn scheduling_policy(ctx: &Ctx, cmd: PolicyCmd) -> anyhow::Result<()> {
    let k = &kinds::SCHEDULING_POLICY;
    match cmd {
        PolicyCmd::List => {
            ctx.list(
                k,
                &ListArgs {
                    search: None,
                    max: None,
                },
            )
            .await
        }
        PolicyCmd::Show { name } => ctx.show(k, &name).await,
    }
}

async fn fence_agent(ctx: &Ctx, cmd: FenceAgentCmd) -> anyhow::Result<()> {
    let k = &kinds::FENCE_AGENT;
    match cmd {
        FenceAgentCmd::List { host } => {
            let h = ctx.id(&kinds::HOST, &host).await?;
            let items = ctx
                .api
                .list(&format!("hosts/{h}/fenceagents"), k.elem, &[])
                .await?;
            output::print_list(&ctx.api, k, &items, ctx.out).await
        }
        FenceAgentCmd::Create {
            host,
            agent_type,
            address,
            username,
            password_file,
            port,
            options,
        } => {
            let h = ctx.id(&kinds::HOST, &host).await?;
            let mut opts = Vec::with_capacity(options.len());
            for o in &options {
                let (n, v) = o.split_once('=').unwrap_or((o.as_str(), ""));
                anyhow::ensure!(!n.is_empty(), "--option {o:?} needs a NAME (NAME=VALUE)");
                opts.push(json!({ "name": n, "value": v }));
            }
            let mut body = json!({ "type": agent_type, "options": { "option": opts } });
            if let Some(a) = address {
                body["address"] = json!(a);
            }
            if let Some(u) = username {
                body["username"] = json!(u);
            }
            if let Some(p) = port {
                body["port"] = json!(p);
            }
            if let Some(f) = password_file {
                body["password"] = json!(read_secret_file(&f)?);
            }
            let obj = ctx
                .api
                .request(
                    Method::POST,
                    &format!("/hosts/{h}/fenceagents"),
                    Some(&body),
                    None,
                )
                .await
                .with_context(|| format!("giving host {host} a fence agent"))?;
            ctx.print(k, &obj).await
        }
        FenceAgentCmd::Remove { host } => {
            let h = ctx.id(&kinds::HOST, &host).await?;
            // The one agent of a host is identified as the host.
            ctx.delete_at(
                &format!("/hosts/{h}/fenceagents/{h}"),
                format!("removing the fence agent of host {host}"),
                format!("fence agent of host {host} removed"),
            )
            .await
        }
    }
}

/// A password from a file (`-`: standard input, one line), without its line end.
fn read_secret_file(p: &std::path::Path) -> anyhow::Result<String> {
    let raw = if p.as_os_str() == "-" {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line
    } else {
        std::fs::read_to_string(p).with_context(|| format!("reading the password file {}", p.display()))?
    };
    let pw = raw.trim_end_matches(['\n', '\r']).to_string();
    anyhow::ensure!(!pw.is_empty(), "the password is empty");
    Ok(pw)
}

/// The data center a storage domain is attached to.
async fn sd_dc(ctx: &Ctx, name: &str, id: &str) -> anyhow::Result<String> {
    let sd = ctx.get(&kinds::STORAGE_DOMAIN, id).await?;
    output::at(&sd, "data_center.id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("storage domain {name} is not attached to a data center"))
}

async fn sd_activate(
    ctx: &Ctx,
    name: &str,
    id: &str,
    dc: &str,
    up: bool,
    wait: WaitArgs,
) -> anyhow::Result<Option<Value>> {
    let (verb, want): (&str, &[&str]) = if up {
        ("activate", &["active"])
    } else {
        ("deactivate", &["maintenance"])
    };
    let u = (!wait.no_wait).then(|| Until {
        path: format!("/datacenters/{dc}/storagedomains/{id}"),
        what: format!("storage domain {name}"),
        field: "status",
        want,
        fail: &[],
        timeout: Duration::from_secs(wait.timeout),
    });
    ctx.action(
        format!("{verb} storage domain {name}"),
        format!("/datacenters/{dc}/storagedomains/{id}/{verb}"),
        json!({}),
        u,
    )
    .await
}

async fn sd_attach(
    ctx: &Ctx,
    name: &str,
    id: &str,
    datacenter: &str,
    wait: WaitArgs,
) -> anyhow::Result<Value> {
    let dc = ctx.id(&kinds::DATACENTER, datacenter).await?;
    let mut p = Progress::new(format!("attach storage domain {name}"), ctx.quiet);
    let corr = progress::correlation_id("attach");
    let path = format!("/datacenters/{dc}/storagedomains");
    let attached = progress::with_job(
        &ctx.api,
        &mut p,
        &corr,
        ctx.api
            .request(Method::POST, &path, Some(&json!({ "id": id })), Some(&corr)),
    )
    .await
    .with_context(|| format!("attaching storage domain {name} to {datacenter}"))?;
    p.finish("attached");
    drop(p);
    // Attaching leaves the domain in maintenance (or the engine activates the first one).
    if attached["status"].as_str() == Some("active") || wait.no_wait {
        return Ok(attached);
    }
    let until_active = Until {
        path: format!("/datacenters/{dc}/storagedomains/{id}"),
        what: format!("storage domain {name}"),
        field: "status",
        want: &["active", "maintenance"],
        fail: &[],
        timeout: Duration::from_secs(wait.timeout),
    };
    let mut p = Progress::new(format!("attach storage domain {name}"), ctx.quiet);
    let now = progress::wait(&ctx.api, &mut p, until_active).await?;
    p.finish("attached");
    drop(p);
    if now["status"].as_str() == Some("active") {
        return Ok(now);
    }
    Ok(sd_activate(ctx, name, id, &dc, true, wait).await?.unwrap_or(now))
}

async fn storage_domain(ctx: &Ctx, cmd: SdCmd) -> anyhow::Result<()> {
    let k = &kinds::STORAGE_DOMAIN;
    match cmd {
        SdCmd::List(a) => ctx.list(k, &a).await,
        SdCmd::Show { name } => ctx.show(k, &name).await,
        SdCmd::Create {
            name,
            host,
            storage,
            domain_type,
            description,
            datacenter,
            space,
            wait,
        } => {
            let h = ctx.id(&kinds::HOST, &host).await?;
            let mut body = json!({
                "name": name, "description": description, "type": domain_type,
                "host": { "id": h }, "storage": storage.json(),
            });
            space.apply(&mut body);
            let mut obj = {
                let mut p = Progress::new(format!("create storage domain {name}"), ctx.quiet);
                p.set("formatting through the host");
                let o = ctx.create(k, body).await?;
                p.finish("created");
                o
            };
            if let Some(dc) = datacenter {
                let id = obj["id"].as_str().unwrap_or_default().to_string();
                sd_attach(ctx, &name, &id, &dc, wait).await?;
                obj = ctx.get(k, &id).await?;
            }
            ctx.print(k, &obj).await
        }
        SdCmd::Import {
            name,
            host,
            storage,
            id,
            datacenter,
            wait,
        } => {
            let h = ctx.id(&kinds::HOST, &host).await?;
            let mut body = json!({ "import": true, "host": { "id": h }, "storage": storage.json() });
            if let Some(n) = &name {
                body["name"] = json!(n);
            }
            if let Some(i) = id {
                body["id"] = json!(i);
            }
            let mut obj = {
                let mut p = Progress::new("import storage domain".to_string(), ctx.quiet);
                p.set("looking under the path through the host");
                let o = ctx.create(k, body).await?;
                p.finish("imported");
                o
            };
            if let Some(dc) = datacenter {
                let id = obj["id"].as_str().unwrap_or_default().to_string();
                let n = obj["name"].as_str().unwrap_or_default().to_string();
                sd_attach(ctx, &n, &id, &dc, wait).await?;
                obj = ctx.get(k, &id).await?;
            }
            ctx.print(k, &obj).await
        }
        SdCmd::Unregistered { name, kind } => {
            let id = ctx.id(k, &name).await?;
            let (path, item, kd) = kind.collection();
            let found = ctx
                .api
                .list(
                    &format!("storagedomains/{id}/{path}"),
                    item,
                    &[("unregistered", "true".to_string())],
                )
                .await?;
            output::print_list(&ctx.api, kd, &found, ctx.out).await
        }
        SdCmd::Register {
            name,
            id: what,
            kind,
            cluster,
            rename,
            allow_partial,
            reassign_macs,
            map_cluster,
            map_network,
        } => {
            let id = ctx.id(k, &name).await?;
            let split = |m: &str| -> anyhow::Result<(String, String)> {
                m.split_once('=')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| anyhow::anyhow!("a mapping is OLD=NEW, not {m:?}"))
            };
            let mut clusters = Vec::new();
            for m in &map_cluster {
                let (from, to) = split(m)?;
                clusters.push(json!({ "from": { "name": from }, "to": { "name": to } }));
            }
            let mut profiles = Vec::new();
            for m in &map_network {
                let (from, to) = split(m)?;
                profiles.push(json!({
                    "from": { "name": from, "network": { "name": from } },
                    "to": { "name": to, "network": { "name": to } },
                }));
            }
            let (path, item, kd) = kind.collection();
            if kind == UnregisteredKind::Disk {
                let obj = ctx
                    .api
                    .request(
                        Method::POST,
                        &format!("/storagedomains/{id}/disks?unregistered=true"),
                        Some(&json!({ "id": what })),
                        None,
                    )
                    .await
                    .with_context(|| format!("registering disk {what} of storage domain {name}"))?;
                return ctx.print(kd, &obj).await;
            }
            let mut body = json!({
                "allow_partial_import": allow_partial,
                "reassign_bad_macs": reassign_macs,
            });
            if let Some(c) = cluster {
                body["cluster"] = json!({ "id": ctx.id(&kinds::CLUSTER, &c).await? });
            }
            if let Some(n) = rename {
                body[item] = json!({ "name": n });
            }
            if !clusters.is_empty() || !profiles.is_empty() {
                body["registration_configuration"] = json!({
                    "cluster_mappings": { "registration_cluster_mapping": clusters },
                    "vnic_profile_mappings": { "registration_vnic_profile_mapping": profiles },
                });
            }
            let mut p = Progress::new(format!("register {item} {what}"), ctx.quiet);
            p.set("reading its disks on storage");
            ctx.api
                .request(
                    Method::POST,
                    &format!("/storagedomains/{id}/{path}/{what}/register"),
                    Some(&body),
                    None,
                )
                .await
                .with_context(|| format!("registering {item} {what} of storage domain {name}"))?;
            p.finish("registered");
            let obj = ctx.get(kd, &what).await?;
            ctx.print(kd, &obj).await
        }
        SdCmd::Update {
            name,
            rename,
            description,
            space,
        } => {
            let id = ctx.id(k, &name).await?;
            let mut body = json!({});
            if let Some(n) = rename {
                body["name"] = json!(n);
            }
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            space.apply(&mut body);
            anyhow::ensure!(
                body.as_object().is_some_and(|o| !o.is_empty()),
                "nothing to change: give at least one option"
            );
            ctx.update(k, &id, &name, body).await
        }
        SdCmd::UpdateOvf { name } => {
            let id = ctx.id(k, &name).await?;
            let mut p = Progress::new(format!("update the OVF stores of {name}"), ctx.quiet);
            p.set("writing through the SPM");
            ctx.api
                .request(
                    Method::POST,
                    &format!("/storagedomains/{id}/updateovfstore"),
                    Some(&json!({})),
                    None,
                )
                .await
                .with_context(|| format!("updating the OVF stores of storage domain {name}"))?;
            p.finish("written");
            Ok(())
        }
        SdCmd::Remove { name, destroy, host } => {
            let mut q = String::new();
            if destroy {
                q.push_str("?destroy=true");
            }
            if let Some(h) = host {
                q.push(if q.is_empty() { '?' } else { '&' });
                q.push_str(&format!("host={}", transport::encode(&h)));
            }
            ctx.remove(k, &name, &q).await
        }
        SdCmd::Attach {
            name,
            datacenter,
            wait,
        } => {
            let id = ctx.id(k, &name).await?;
            let o = sd_attach(ctx, &name, &id, &datacenter, wait).await?;
            output::print_done(
                ctx.out,
                &format!(
                    "storage domain {name} attached to {datacenter} ({})",
                    o["status"].as_str().unwrap_or("?")
                ),
                Some(&o),
            )
        }
        SdCmd::Detach { name } => {
            let id = ctx.id(k, &name).await?;
            let dc = sd_dc(ctx, &name, &id).await?;
            ctx.delete_at(
                &format!("/datacenters/{dc}/storagedomains/{id}"),
                format!("detaching storage domain {name}"),
                format!("storage domain {name} detached"),
            )
            .await
        }
        SdCmd::Activate { name, wait } => {
            let id = ctx.id(k, &name).await?;
            let dc = sd_dc(ctx, &name, &id).await?;
            let o = sd_activate(ctx, &name, &id, &dc, true, wait).await?;
            output::print_done(ctx.out, &format!("storage domain {name} is active"), o.as_ref())
        }
        SdCmd::Deactivate { name, wait } => {
            let id = ctx.id(k, &name).await?;
            let dc = sd_dc(ctx, &name, &id).await?;
            let o = sd_activate(ctx, &name, &id, &dc, false, wait).await?;
            output::print_done(
                ctx.out,
                &format!("storage domain {name} is in maintenance"),
                o.as_ref(),
            )
        }
    }
}

/// The id of every VM's CD-ROM in the API.
const CDROM_ID: &str = "00000000-0000-0000-0000-000000000000";

/// Whether `file` is an ISO 9660 image: its first volume descriptor, at 32 KiB, says `CD001`.
fn is_iso(file: &std::path::Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file)?;
    let mut magic = [0u8; 5];
    f.seek(SeekFrom::Start(32769))?;
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"CD001")
}

fn disk_body(name: &str, size: u64, format: &str, sd: &str) -> Value {
    json!({
        "name": name, "format": format, "provisioned_size": size,
        "sparse": format == "cow",
        "storage_domains": { "storage_domain": [ { "id": sd } ] },
    })
}

async fn disk(ctx: &Ctx, cmd: DiskCmd) -> anyhow::Result<()> {
    let k = &kinds::DISK;
    match cmd {
        DiskCmd::List(a) => ctx.list(k, &a).await,
        DiskCmd::Show { name } => ctx.show(k, &name).await,
        DiskCmd::Create {
            name,
            size,
            storage_domain,
            format,
            wait,
        } => {
            let size = parse_size(&size)?;
            let sd = ctx.id(&kinds::STORAGE_DOMAIN, &storage_domain).await?;
            let obj = ctx.create(k, disk_body(&name, size, &format, &sd)).await?;
            let id = obj["id"].as_str().unwrap_or_default().to_string();
            let obj = match until(k, &id, &name, "status", &["ok"], &["illegal"], wait) {
                Some(u) => {
                    let mut p = Progress::new(format!("create disk {name}"), ctx.quiet);
                    let o = progress::wait(&ctx.api, &mut p, u).await?;
                    p.finish("ok");
                    o
                }
                None => obj,
            };
            ctx.print(k, &obj).await
        }
        DiskCmd::Remove { name } => ctx.remove(k, &name, "").await,
        DiskCmd::Upload {
            file,
            storage_domain,
            name,
            format,
            host,
            content_type,
        } => {
            let info = oxvirt_qemu::img::QemuImg::locate()?
                .info(&file, None)
                .with_context(|| format!("reading {}", file.display()))?;
            let iso = match content_type.as_deref() {
                Some(t) => t == "iso",
                None => {
                    info.format == "raw"
                        && is_iso(&file).with_context(|| format!("reading {}", file.display()))?
                }
            };
            anyhow::ensure!(
                !iso || info.format == "raw",
                "{} is a {} image: an ISO is raw",
                file.display(),
                info.format
            );
            // An ISO is a raw disk (thin on file storage), whatever --format says.
            let format = if iso { "raw".to_string() } else { format };
            let name = match name {
                Some(n) => n,
                None => file
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| anyhow::anyhow!("name the disk with --name"))?
                    .to_string(),
            };
            let sd = ctx.id(&kinds::STORAGE_DOMAIN, &storage_domain).await?;
            let host = match host {
                Some(h) => Some(ctx.id(&kinds::HOST, &h).await?),
                None => None,
            };
            let mut body = disk_body(&name, info.virtual_size, &format, &sd);
            if iso {
                body["content_type"] = json!("iso");
                body["sparse"] = json!(true);
            }
            let obj = ctx.create(k, body).await?;
            let id = obj["id"].as_str().unwrap_or_default().to_string();
            let mut p = Progress::new(format!("upload {} into disk {name}", file.display()), ctx.quiet);
            let moved = match transfer::upload(&ctx.api, &ctx.trust, &file, &id, host.as_deref()).await {
                Ok(m) => m,
                Err(e) => {
                    p.finish("failed");
                    // A cancelled transfer took the disk with it; one that never started left
                    // it empty: it goes too (gone already is fine).
                    let _ = ctx
                        .api
                        .request(Method::DELETE, &format!("/disks/{id}"), None, None)
                        .await;
                    return Err(e);
                }
            };
            p.finish(&moved.to_string());
            let obj = ctx.get(k, &id).await?;
            ctx.print(k, &obj).await
        }
        DiskCmd::Download {
            name,
            file,
            format,
            host,
        } => {
            let id = ctx.id(k, &name).await?;
            let host = match host {
                Some(h) => Some(ctx.id(&kinds::HOST, &h).await?),
                None => None,
            };
            let fmt = match format.as_str() {
                "raw" => oxvirt_qemu::ImageFormat::Raw,
                _ => oxvirt_qemu::ImageFormat::Qcow2,
            };
            let mut p = Progress::new(format!("download disk {name} into {}", file.display()), ctx.quiet);
            let moved = match transfer::download(&ctx.api, &ctx.trust, &id, &file, fmt, host.as_deref()).await
            {
                Ok(m) => m,
                Err(e) => {
                    p.finish("failed");
                    return Err(e);
                }
            };
            p.finish("done");
            output::print_done(
                ctx.out,
                &format!("disk {name} downloaded into {} ({moved})", file.display()),
                None,
            )
        }
        DiskCmd::Move { name, storage_domain } => {
            let id = ctx.id(k, &name).await?;
            let sd = ctx.id(&kinds::STORAGE_DOMAIN, &storage_domain).await?;
            ctx.action(
                format!("move disk {name}"),
                format!("/disks/{id}/move"),
                json!({ "storage_domain": { "id": sd } }),
                None,
            )
            .await?;
            let obj = ctx.api.get(&format!("/disks/{id}")).await?;
            output::print_done(
                ctx.out,
                &format!("disk {name} moved to storage domain {storage_domain}"),
                Some(&obj),
            )
        }
        DiskCmd::Extend { name, size } => {
            let id = ctx.id(k, &name).await?;
            let size = parse_size(&size)?;
            let obj = ctx
                .api
                .request(
                    Method::PUT,
                    &format!("/disks/{id}"),
                    Some(&json!({ "provisioned_size": size })),
                    None,
                )
                .await
                .with_context(|| format!("extending disk {name} failed"))?;
            output::print_done(
                ctx.out,
                &format!(
                    "disk {name} extended to {} bytes",
                    obj["provisioned_size"].as_str().unwrap_or("?")
                ),
                Some(&obj),
            )
        }
        DiskCmd::Copy {
            name,
            storage_domain,
            new_name,
        } => {
            let id = ctx.id(k, &name).await?;
            let sd = ctx.id(&kinds::STORAGE_DOMAIN, &storage_domain).await?;
            let mut body = json!({ "storage_domain": { "id": sd } });
            if let Some(n) = &new_name {
                body["disk"] = json!({ "alias": n });
            }
            let (reply, _) = ctx
                .action_reply(
                    format!("copy disk {name}"),
                    format!("/disks/{id}/copy"),
                    body,
                    None,
                )
                .await?;
            let copy = reply["disk"]["id"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("the engine's reply names no new disk: {reply}"))?;
            let obj = ctx.api.get(&format!("/disks/{copy}")).await?;
            let alias = obj["alias"]
                .as_str()
                .or(obj["name"].as_str())
                .unwrap_or(copy)
                .to_string();
            output::print_done(
                ctx.out,
                &format!("disk {name} copied to storage domain {storage_domain} as {alias}"),
                Some(&obj),
            )
        }
        DiskCmd::Attach {
            name,
            vm,
            inactive,
            bootable,
            interface,
        } => {
            let (v, d) = (ctx.id(&kinds::VM, &vm).await?, ctx.id(k, &name).await?);
            let body = json!({
                "disk": { "id": d }, "active": !inactive, "bootable": bootable, "interface": interface,
            });
            ctx.api
                .request(
                    Method::POST,
                    &format!("/vms/{v}/diskattachments"),
                    Some(&body),
                    None,
                )
                .await
                .with_context(|| format!("attaching disk {name} to VM {vm}"))?;
            output::print_done(ctx.out, &format!("disk {name} attached to VM {vm}"), None)
        }
        DiskCmd::Detach { name, vm } => {
            let (v, d) = (ctx.id(&kinds::VM, &vm).await?, ctx.id(k, &name).await?);
            ctx.delete_at(
                &format!("/vms/{v}/diskattachments/{d}"),
                format!("detaching disk {name} from VM {vm}"),
                format!("disk {name} detached from VM {vm}"),
            )
            .await
        }
        DiskCmd::Activate { name, vm } => set_disk_active(ctx, &name, &vm, true).await,
        DiskCmd::Deactivate { name, vm } => set_disk_active(ctx, &name, &vm, false).await,
    }
}

/// Activates or deactivates a VM's disk (a running VM's QEMU follows: hot plug or unplug).
async fn set_disk_active(ctx: &Ctx, name: &str, vm: &str, active: bool) -> anyhow::Result<()> {
    let (v, d) = (ctx.id(&kinds::VM, vm).await?, ctx.id(&kinds::DISK, name).await?);
    let what = if active { "activate" } else { "deactivate" };
    ctx.api
        .request(
            Method::PUT,
            &format!("/vms/{v}/diskattachments/{d}"),
            Some(&json!({ "active": active })),
            None,
        )
        .await
        .with_context(|| format!("{what} disk {name} of VM {vm}"))?;
    output::print_done(ctx.out, &format!("disk {name} of VM {vm} {what}d"), None)
}

async fn vm(ctx: &Ctx, cmd: VmCmd) -> anyhow::Result<()> {
    let k = &kinds::VM;
    match cmd {
        VmCmd::List(a) => ctx.list(k, &a).await,
        VmCmd::Show { name } => ctx.show(k, &name).await,
        VmCmd::Stats { name } => ctx.statistics(k, &name).await,
        VmCmd::Create {
            name,
            cluster,
            template,
            memory,
            cpus,
            disk_size,
            storage_domain,
            kernel,
            initrd,
            cmdline,
            cdrom,
            boot,
            description,
            ha,
            wait,
        } => {
            // Everything is checked and looked up before anything is created.
            let memory = memory.as_deref().map(parse_size).transpose()?;
            let iso = match &cdrom {
                Some(c) => Some(ctx.id(&kinds::DISK, c).await?),
                None => None,
            };
            let disk_size = disk_size.as_deref().map(parse_size).transpose()?;
            let cl = ctx.id(&kinds::CLUSTER, &cluster).await?;
            let tmpl = ctx.id(&kinds::TEMPLATE, &template).await?;
            let sd = match &storage_domain {
                Some(s) => Some(ctx.id(&kinds::STORAGE_DOMAIN, s).await?),
                None => None,
            };
            let mut body = json!({
                "name": name, "description": description,
                "cluster": { "id": cl }, "template": { "id": tmpl },
            });
            if let Some(m) = memory {
                body["memory"] = json!(m);
                body["memory_policy"] = json!({ "guaranteed": m });
            }
            if let Some(c) = cpus {
                anyhow::ensure!(c >= 1, "--cpus must be at least 1");
                body["cpu"] = json!({ "topology": { "sockets": 1, "cores": c, "threads": 1 } });
            }
            ha.apply(&mut body);
            if kernel.is_some() || initrd.is_some() || cmdline.is_some() {
                let mut os = json!({});
                for (k, v) in [("kernel", &kernel), ("initrd", &initrd), ("cmdline", &cmdline)] {
                    if let Some(v) = v {
                        os[k] = json!(v);
                    }
                }
                body["os"] = os;
            }
            boot.apply(&mut body);
            let obj = ctx.create(k, body).await?;
            let id = obj["id"].as_str().unwrap_or_default().to_string();
            if let Some(iso) = iso {
                let set = ctx
                    .api
                    .request(
                        Method::PUT,
                        &format!("/vms/{id}/cdroms/{CDROM_ID}"),
                        Some(&json!({ "file": { "id": iso } })),
                        None,
                    )
                    .await;
                if let Err(e) = set {
                    // Undo: a VM without the CD asked for is not what was wanted.
                    let _ = ctx
                        .api
                        .request(Method::DELETE, &format!("/vms/{id}"), None, None)
                        .await;
                    return Err(e).context(format!(
                        "putting ISO {} into VM {name}'s CD-ROM",
                        cdrom.unwrap_or_default()
                    ));
                }
            }
            if let (Some(size), Some(sd)) = (disk_size, sd) {
                let att = json!({
                    "disk": disk_body(&format!("{name}-disk"), size, "cow", &sd),
                    "interface": "virtio", "bootable": true, "active": true,
                });
                let mut p = Progress::new(format!("create VM {name}"), ctx.quiet);
                p.set("creating the boot disk");
                let created = ctx
                    .api
                    .request(
                        Method::POST,
                        &format!("/vms/{id}/diskattachments"),
                        Some(&att),
                        None,
                    )
                    .await;
                let created = match created {
                    Ok(c) => c,
                    Err(e) => {
                        // Undo: a VM without the disk asked for is not what was wanted.
                        let _ = ctx
                            .api
                            .request(Method::DELETE, &format!("/vms/{id}"), None, None)
                            .await;
                        return Err(e.context(format!(
                            "creating the boot disk of VM {name} (the VM was removed again)"
                        )));
                    }
                };
                let disk_id = output::at(&created, "disk.id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                if let Some(u) = until(
                    &kinds::DISK,
                    &disk_id,
                    &format!("{name}-disk"),
                    "status",
                    &["ok"],
                    &["illegal"],
                    wait,
                ) {
                    progress::wait(&ctx.api, &mut p, u).await?;
                }
                p.finish("created");
            }
            let obj = if disk_size.is_some() {
                ctx.get(k, &id).await?
            } else {
                obj
            };
            ctx.print(k, &obj).await
        }
        VmCmd::Update {
            name,
            description,
            memory,
            cpus,
            next_run,
            ha,
            no_ha,
            lease_sd,
            no_lease_sd,
        } => {
            let memory = memory.as_deref().map(parse_size).transpose()?;
            let id = ctx.id(k, &name).await?;
            let mut body = json!({});
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            if let Some(m) = memory {
                body["memory"] = json!(m);
            }
            if let Some(c) = cpus {
                anyhow::ensure!(c >= 1, "--cpus must be at least 1");
                body["cpu"] = json!({ "topology": { "sockets": 1, "cores": c, "threads": 1 } });
            }
            ha.apply(&mut body);
            if no_ha {
                body["high_availability"] = json!({ "enabled": false, "priority": 0 });
            }
            if let Some(sd) = lease_sd {
                let sd = ctx.id(&kinds::STORAGE_DOMAIN, &sd).await?;
                body["lease"] = json!({ "storage_domain": { "id": sd } });
            } else if no_lease_sd {
                body["lease"] = json!({});
            }
            anyhow::ensure!(
                body.as_object().is_some_and(|o| !o.is_empty()),
                "nothing to change: give at least one option"
            );
            let q = if next_run { "?next_run=true" } else { "" };
            ctx.update_at(k, &format!("{id}{q}"), &name, body).await
        }
        VmCmd::Remove {
            name,
            force,
            keep_disks,
        } => {
            let mut q = Vec::new();
            if force {
                q.push("force=true");
            }
            if keep_disks {
                q.push("detach_only=true");
            }
            let q = if q.is_empty() {
                String::new()
            } else {
                format!("?{}", q.join("&"))
            };
            ctx.remove(k, &name, &q).await
        }
        VmCmd::Start {
            name,
            host,
            cdrom,
            boot,
            wait,
        } => {
            let id = ctx.id(k, &name).await?;
            let mut body = match host {
                Some(h) => json!({ "host": { "id": ctx.id(&kinds::HOST, &h).await? } }),
                None => json!({}),
            };
            if let Some(c) = cdrom {
                let iso = ctx.id(&kinds::DISK, &c).await?;
                body["vm"]["cdroms"] = json!({ "cdrom": [ { "file": { "id": iso } } ] });
            }
            if !boot.is_empty() {
                body["vm"]["os"] = json!({ "boot": { "devices": { "device": boot } } });
            }
            let u = until(k, &id, &name, "status", &["up"], &["down"], wait);
            let o = ctx
                .action(format!("start VM {name}"), format!("/vms/{id}/start"), body, u)
                .await?;
            output::print_done(ctx.out, &format!("VM {name} is up"), o.as_ref())
        }
        VmCmd::Stop { name, wait } => {
            let id = ctx.id(k, &name).await?;
            let u = until(k, &id, &name, "status", &["down"], &[], wait);
            let o = ctx
                .action(format!("stop VM {name}"), format!("/vms/{id}/stop"), json!({}), u)
                .await?;
            output::print_done(ctx.out, &format!("VM {name} is down"), o.as_ref())
        }
        VmCmd::Reboot { name } => {
            let id = ctx.id(k, &name).await?;
            ctx.action(
                format!("reboot VM {name}"),
                format!("/vms/{id}/reboot"),
                json!({}),
                None,
            )
            .await?;
            let obj = ctx.api.get(&format!("/vms/{id}")).await?;
            output::print_done(ctx.out, &format!("VM {name} is rebooting"), Some(&obj))
        }
        VmCmd::Clone {
            name,
            new,
            snapshot: None,
            wait: _,
        } => {
            let id = ctx.id(k, &name).await?;
            ctx.action(
                format!("clone VM {name} as {new}"),
                format!("/vms/{id}/clone"),
                json!({ "vm": { "name": new } }),
                None,
            )
            .await?;
            let new_id = ctx.id(k, &new).await?;
            let obj = ctx.get(k, &new_id).await?;
            output::print_done(ctx.out, &format!("VM {new} is a clone of {name}"), Some(&obj))
        }
        VmCmd::Clone {
            name,
            new,
            snapshot: Some(snap),
            wait,
        } => {
            let id = ctx.id(k, &name).await?;
            let src = ctx.get(k, &id).await?;
            let sid = find_snapshot(ctx, &id, &snap).await?["id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let body = json!({
                "name": new,
                "cluster": { "id": src["cluster"]["id"] },
                "snapshots": { "snapshot": [{ "id": sid }] },
            });
            let label = format!("clone snapshot {snap} of VM {name} as {new}");
            let (reply, _) = ctx.action_reply(label, "/vms".into(), body, None).await?;
            let new_id = reply["id"].as_str().unwrap_or_default().to_string();
            let obj = match until(k, &new_id, &new, "status", &["down"], &[], wait) {
                Some(u) => {
                    let mut p = Progress::new(format!("copy the disks of {new}"), ctx.quiet);
                    let obj = progress::wait(&ctx.api, &mut p, u).await?;
                    p.finish("done");
                    obj
                }
                None => reply,
            };
            let what = format!("VM {new} is a clone of snapshot {sid} of {name}");
            output::print_done(ctx.out, &what, Some(&obj))
        }
        VmCmd::Cdrom {
            name,
            iso,
            eject: _,
            current,
        } => {
            let id = ctx.id(k, &name).await?;
            let file = match &iso {
                Some(i) => ctx.id(&kinds::DISK, i).await?,
                None => String::new(),
            };
            let q = if current { "?current=true" } else { "" };
            let obj = ctx
                .api
                .request(
                    Method::PUT,
                    &format!("/vms/{id}/cdroms/{CDROM_ID}{q}"),
                    Some(&json!({ "file": { "id": file } })),
                    None,
                )
                .await
                .with_context(|| format!("changing the CD of VM {name}"))?;
            let what = match &iso {
                Some(i) => format!("ISO {i} is in VM {name}'s CD-ROM"),
                None => format!("VM {name}'s CD-ROM is empty"),
            };
            let when = if current { "" } else { " (from its next start)" };
            output::print_done(ctx.out, &format!("{what}{when}"), Some(&obj))
        }
        VmCmd::Console { name, expiry } => {
            let id = ctx.id(k, &name).await?;
            let base = format!("/vms/{id}/graphicsconsoles/766e63");
            let file = ctx
                .api
                .request(
                    Method::POST,
                    &format!("{base}/remoteviewerconnectionfile"),
                    Some(&json!({})),
                    None,
                )
                .await
                .with_context(|| format!("opening the console of VM {name}"))?;
            let text = file["remote_viewer_connection_file"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("the engine sent no remote-viewer file: {file}"))?;
            let password = text
                .lines()
                .find_map(|l| l.strip_prefix("password="))
                .ok_or_else(|| anyhow::anyhow!("the remote-viewer file has no password"))?;
            // The file's ticket has the engine's default lifetime: give it the one asked for.
            ctx.api
                .request(
                    Method::POST,
                    &format!("{base}/ticket"),
                    Some(&json!({ "ticket": { "value": password, "expiry": expiry } })),
                    None,
                )
                .await
                .with_context(|| format!("setting the console ticket of VM {name}"))?;
            let text: String = text
                .lines()
                .map(|l| {
                    if l.starts_with("# Password is valid for") {
                        format!("# Password is valid for {expiry} seconds.\n")
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            print!("{text}");
            Ok(())
        }
        VmCmd::CancelMigration { name } => {
            let id = ctx.id(k, &name).await?;
            ctx.action(
                format!("cancel the migration of VM {name}"),
                format!("/vms/{id}/cancelmigration"),
                json!({}),
                None,
            )
            .await?;
            let obj = ctx.api.get(&format!("/vms/{id}")).await?;
            output::print_done(ctx.out, &format!("migration of VM {name} cancelled"), Some(&obj))
        }
        VmCmd::Shutdown { name, wait } => {
            let id = ctx.id(k, &name).await?;
            let u = until(k, &id, &name, "status", &["down"], &[], wait);
            let o = ctx
                .action(
                    format!("shut down VM {name}"),
                    format!("/vms/{id}/shutdown"),
                    json!({}),
                    u,
                )
                .await?;
            output::print_done(ctx.out, &format!("VM {name} is down"), o.as_ref())
        }
        VmCmd::Suspend { name, wait } => {
            let id = ctx.id(k, &name).await?;
            let u = until(k, &id, &name, "status", &["suspended"], &["down", "up"], wait);
            let o = ctx
                .action(
                    format!("suspend VM {name}"),
                    format!("/vms/{id}/suspend"),
                    json!({}),
                    u,
                )
                .await?;
            output::print_done(ctx.out, &format!("VM {name} is suspended"), o.as_ref())
        }
        VmCmd::Migrate { name, host, wait } => {
            let id = ctx.id(k, &name).await?;
            let body = match host {
                Some(h) => json!({ "host": { "id": ctx.id(&kinds::HOST, &h).await? } }),
                None => json!({}),
            };
            let u = until(k, &id, &name, "status", &["up"], &["down"], wait);
            let o = ctx
                .action(
                    format!("migrate VM {name}"),
                    format!("/vms/{id}/migrate"),
                    body,
                    u,
                )
                .await?;
            output::print_done(ctx.out, &format!("VM {name} migrated"), o.as_ref())
        }
    }
}

async fn template(ctx: &Ctx, cmd: TemplateCmd) -> anyhow::Result<()> {
    let k = &kinds::TEMPLATE;
    match cmd {
        TemplateCmd::List(a) => ctx.list(k, &a).await,
        TemplateCmd::Show { name } => ctx.show(k, &name).await,
        TemplateCmd::Create {
            name,
            vm,
            description,
            wait,
        } => {
            let v = ctx.id(&kinds::VM, &vm).await?;
            let body = json!({ "name": name, "description": description, "vm": { "id": v } });
            let mut p = Progress::new(format!("create template {name}"), ctx.quiet);
            let corr = progress::correlation_id("template");
            let obj = progress::with_job(
                &ctx.api,
                &mut p,
                &corr,
                ctx.api
                    .request(Method::POST, "/templates", Some(&body), Some(&corr)),
            )
            .await
            .with_context(|| format!("creating template {name}"))?;
            let id = obj["id"].as_str().unwrap_or_default().to_string();
            let obj = match until(k, &id, &name, "status", &["ok"], &["illegal"], wait) {
                Some(u) => progress::wait(&ctx.api, &mut p, u).await?,
                None => obj,
            };
            p.finish("ok");
            drop(p);
            ctx.print(k, &obj).await
        }
        TemplateCmd::Remove { name } => ctx.remove(k, &name, "").await,
    }
}

/// A VM's snapshot named by id or by its (unique) description.
async fn find_snapshot(ctx: &Ctx, vm: &str, s: &str) -> anyhow::Result<Value> {
    let all = ctx
        .api
        .list(&format!("vms/{vm}/snapshots"), "snapshot", &[])
        .await?;
    let by_id: Vec<&Value> = all.iter().filter(|x| x["id"].as_str() == Some(s)).collect();
    let found: Vec<&Value> = if by_id.is_empty() {
        all.iter()
            .filter(|x| x["description"].as_str() == Some(s))
            .collect()
    } else {
        by_id
    };
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => anyhow::bail!("the VM has no snapshot with id or description {s:?}"),
        _ => anyhow::bail!("{} snapshots are described {s:?}: give the id", found.len()),
    }
}

async fn snapshot(ctx: &Ctx, cmd: SnapshotCmd) -> anyhow::Result<()> {
    let k = &kinds::SNAPSHOT;
    match cmd {
        SnapshotCmd::List { vm } => {
            let v = ctx.id(&kinds::VM, &vm).await?;
            let items = ctx
                .api
                .list(&format!("vms/{v}/snapshots"), "snapshot", &[])
                .await?;
            output::print_list(&ctx.api, k, &items, ctx.out).await
        }
        SnapshotCmd::Show { vm, snapshot } => {
            let v = ctx.id(&kinds::VM, &vm).await?;
            let s = find_snapshot(ctx, &v, &snapshot).await?;
            ctx.print(k, &s).await
        }
        SnapshotCmd::Create {
            vm,
            description,
            memory,
            wait,
        } => {
            let v = ctx.id(&kinds::VM, &vm).await?;
            let body = json!({ "description": description, "persist_memorystate": memory });
            let mut p = Progress::new(format!("snapshot VM {vm}"), ctx.quiet);
            let corr = progress::correlation_id("snapshot");
            let obj = progress::with_job(
                &ctx.api,
                &mut p,
                &corr,
                ctx.api.request(
                    Method::POST,
                    &format!("/vms/{v}/snapshots"),
                    Some(&body),
                    Some(&corr),
                ),
            )
            .await
            .with_context(|| format!("taking a snapshot of VM {vm}"))?;
            let sid = obj["id"].as_str().unwrap_or_default().to_string();
            let obj = if wait.no_wait {
                obj
            } else {
                let u = Until {
                    path: format!("/vms/{v}/snapshots/{sid}"),
                    what: format!("snapshot {sid}"),
                    field: "snapshot_status",
                    want: &["ok"],
                    fail: &[],
                    timeout: Duration::from_secs(wait.timeout),
                };
                progress::wait(&ctx.api, &mut p, u).await?
            };
            p.finish("ok");
            drop(p);
            ctx.print(k, &obj).await
        }
        SnapshotCmd::Remove { vm, snapshot } => {
            let v = ctx.id(&kinds::VM, &vm).await?;
            let s = find_snapshot(ctx, &v, &snapshot).await?;
            let sid = s["id"].as_str().unwrap_or_default();
            let mut p = Progress::new(format!("remove snapshot {snapshot}"), ctx.quiet);
            let corr = progress::correlation_id("rmsnap");
            let path = format!("/vms/{v}/snapshots/{sid}");
            progress::with_job(
                &ctx.api,
                &mut p,
                &corr,
                ctx.api.request(Method::DELETE, &path, None, Some(&corr)),
            )
            .await
            .with_context(|| format!("removing snapshot {snapshot} of VM {vm}"))?;
            p.finish("removed");
            drop(p);
            output::print_done(ctx.out, &format!("snapshot {sid} removed"), None)
        }
        SnapshotCmd::Restore { vm, snapshot, memory } => {
            let v = ctx.id(&kinds::VM, &vm).await?;
            let s = find_snapshot(ctx, &v, &snapshot).await?;
            let sid = s["id"].as_str().unwrap_or_default();
            ctx.action(
                format!("restore VM {vm} to snapshot {snapshot}"),
                format!("/vms/{v}/snapshots/{sid}/restore"),
                json!({ "restore_memory": memory }),
                None,
            )
            .await?;
            output::print_done(ctx.out, &format!("VM {vm} restored to snapshot {sid}"), None)
        }
    }
}

/// One member of a sub-collection by id or name.
async fn find_in(ctx: &Ctx, path: &str, kind: &'static Kind, key: &str) -> anyhow::Result<Value> {
    let all = ctx.api.list(path, kind.elem, &[]).await?;
    let found: Vec<&Value> = all
        .iter()
        .filter(|x| x["id"].as_str() == Some(key) || x["name"].as_str() == Some(key))
        .collect();
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => anyhow::bail!("no {} {key:?} there", kind.what),
        _ => anyhow::bail!("{} {}s match {key:?}: give the id", found.len(), kind.what),
    }
}

/// `none`, `dhcp` or ADDRESS/PREFIX as an `ip_address_assignment`.
fn ip_assignment(ip: &str) -> anyhow::Result<Value> {
    Ok(match ip {
        "none" | "dhcp" => json!({ "assignment_method": ip }),
        other => {
            let (addr, prefix) = other
                .split_once('/')
                .ok_or_else(|| anyhow::anyhow!("--ip {other:?}: give none, dhcp or ADDRESS/PREFIX"))?;
            json!({ "assignment_method": "static", "ip": { "address": addr, "netmask": prefix } })
        }
    })
}

async fn network(ctx: &Ctx, cmd: NetworkCmd) -> anyhow::Result<()> {
    let k = &kinds::NETWORK;
    match cmd {
        NetworkCmd::List(a) => ctx.list(k, &a).await,
        NetworkCmd::Show { name } => ctx.show(k, &name).await,
        NetworkCmd::Create {
            name,
            datacenter,
            vlan,
            mtu,
            no_vm,
            description,
        } => {
            let dc = ctx.id(&kinds::DATACENTER, &datacenter).await?;
            let mut body = json!({
                "name": name, "description": description, "data_center": { "id": dc },
                "usages": { "usage": if no_vm { vec![] } else { vec!["vm"] } },
            });
            if let Some(v) = vlan {
                body["vlan"] = json!({ "id": v.to_string() });
            }
            if let Some(m) = mtu {
                body["mtu"] = json!(m);
            }
            let obj = ctx.create(k, body).await?;
            ctx.print(k, &obj).await
        }
        NetworkCmd::Update {
            name,
            mtu,
            vlan,
            no_vlan,
            description,
        } => {
            let id = ctx.id(k, &name).await?;
            let mut body = json!({});
            if let Some(m) = mtu {
                body["mtu"] = json!(m);
            }
            if let Some(v) = vlan {
                body["vlan"] = json!({ "id": v.to_string() });
            }
            if no_vlan {
                body["vlan"] = json!({});
            }
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            anyhow::ensure!(
                body.as_object().is_some_and(|o| !o.is_empty()),
                "nothing to change: give --mtu, --vlan, --no-vlan or --description"
            );
            ctx.update(k, &id, &name, body).await
        }
        NetworkCmd::Remove { name } => ctx.remove(k, &name, "").await,
        NetworkCmd::ClusterList { cluster } => {
            let c = ctx.id(&kinds::CLUSTER, &cluster).await?;
            let kc = &kinds::CLUSTER_NETWORK;
            let items = ctx
                .api
                .list(&format!("clusters/{c}/networks"), kc.elem, &[])
                .await?;
            output::print_list(&ctx.api, kc, &items, ctx.out).await
        }
        NetworkCmd::AttachCluster {
            name,
            cluster,
            optional,
        } => {
            let c = ctx.id(&kinds::CLUSTER, &cluster).await?;
            let n = ctx.id(k, &name).await?;
            let obj = ctx
                .api
                .request(
                    Method::POST,
                    &format!("/clusters/{c}/networks"),
                    Some(&json!({ "id": n, "required": !optional })),
                    None,
                )
                .await
                .with_context(|| format!("attaching network {name} to cluster {cluster}"))?;
            ctx.print(&kinds::CLUSTER_NETWORK, &obj).await
        }
        NetworkCmd::DetachCluster { name, cluster } => {
            let c = ctx.id(&kinds::CLUSTER, &cluster).await?;
            let n = ctx.id(k, &name).await?;
            ctx.delete_at(
                &format!("/clusters/{c}/networks/{n}"),
                format!("detaching network {name} from cluster {cluster}"),
                format!("network {name} detached from cluster {cluster}"),
            )
            .await
        }
        NetworkCmd::HostNics { host } => {
            let h = ctx.id(&kinds::HOST, &host).await?;
            let kn = &kinds::HOST_NIC;
            let items = ctx.api.list(&format!("hosts/{h}/nics"), kn.elem, &[]).await?;
            output::print_list(&ctx.api, kn, &items, ctx.out).await
        }
        NetworkCmd::HostList { host } => {
            let h = ctx.id(&kinds::HOST, &host).await?;
            let ka = &kinds::NETWORK_ATTACHMENT;
            let items = ctx
                .api
                .list(&format!("hosts/{h}/networkattachments"), ka.elem, &[])
                .await?;
            output::print_list(&ctx.api, ka, &items, ctx.out).await
        }
        NetworkCmd::AttachHost { name, host, nic, ip } => {
            let ip = ip_assignment(&ip)?;
            let h = ctx.id(&kinds::HOST, &host).await?;
            let n = ctx.id(k, &name).await?;
            let body = json!({
                "network": { "id": n },
                "host_nic": { "name": nic },
                "ip_address_assignments": { "ip_address_assignment": [ip] },
            });
            ctx.action(
                format!("attach network {name} to {nic} on host {host}"),
                format!("/hosts/{h}/networkattachments"),
                body,
                None,
            )
            .await?;
            output::print_done(ctx.out, &format!("network {name} on {nic} of host {host}"), None)
        }
        NetworkCmd::DetachHost { name, host } => {
            let h = ctx.id(&kinds::HOST, &host).await?;
            let n = ctx.id(k, &name).await?;
            let atts = ctx
                .api
                .list(
                    &format!("hosts/{h}/networkattachments"),
                    "network_attachment",
                    &[],
                )
                .await?;
            let a = atts
                .iter()
                .find(|a| a["network"]["id"].as_str() == Some(n.as_str()))
                .and_then(|a| a["id"].as_str())
                .ok_or_else(|| anyhow::anyhow!("host {host} does not carry network {name}"))?;
            ctx.delete_at(
                &format!("/hosts/{h}/networkattachments/{a}"),
                format!("detaching network {name} from host {host}"),
                format!("network {name} detached from host {host}"),
            )
            .await
        }
    }
}

async fn nic(ctx: &Ctx, cmd: NicCmd) -> anyhow::Result<()> {
    let k = &kinds::NIC;
    match cmd {
        NicCmd::List { vm } => {
            let v = ctx.id(&kinds::VM, &vm).await?;
            let items = ctx.api.list(&format!("vms/{v}/nics"), k.elem, &[]).await?;
            output::print_list(&ctx.api, k, &items, ctx.out).await
        }
        NicCmd::Show { vm, nic } => {
            let v = ctx.id(&kinds::VM, &vm).await?;
            let n = find_in(ctx, &format!("vms/{v}/nics"), k, &nic).await?;
            ctx.print(k, &n).await
        }
        NicCmd::Create {
            vm,
            name,
            network,
            mac,
            interface,
        } => {
            let v = ctx.id(&kinds::VM, &vm).await?;
            let mut body = json!({ "name": name, "interface": interface });
            if let Some(n) = network {
                // A VM network's vNIC profile has the network's name.
                let net = ctx.id(&kinds::NETWORK, &n).await?;
                let p = ctx
                    .api
                    .list(&format!("networks/{net}/vnicprofiles"), "vnic_profile", &[])
                    .await?;
                let pid = p
                    .first()
                    .and_then(|p| p["id"].as_str())
                    .ok_or_else(|| anyhow::anyhow!("network {n} is not a VM network"))?;
                body["vnic_profile"] = json!({ "id": pid });
            }
            if let Some(m) = mac {
                body["mac"] = json!({ "address": m });
            }
            let obj = ctx
                .api
                .request(Method::POST, &format!("/vms/{v}/nics"), Some(&body), None)
                .await
                .with_context(|| format!("adding NIC {name} to VM {vm}"))?;
            ctx.print(k, &obj).await
        }
        NicCmd::Remove { vm, nic } => {
            let v = ctx.id(&kinds::VM, &vm).await?;
            let n = find_in(ctx, &format!("vms/{v}/nics"), k, &nic).await?;
            let id = n["id"].as_str().unwrap_or_default();
            ctx.delete_at(
                &format!("/vms/{v}/nics/{id}"),
                format!("removing NIC {nic} of VM {vm}"),
                format!("NIC {nic} of VM {vm} removed"),
            )
            .await
        }
    }
}

async fn mac_pool(ctx: &Ctx, cmd: MacPoolCmd) -> anyhow::Result<()> {
    let k = &kinds::MAC_POOL;
    match cmd {
        MacPoolCmd::List(a) => ctx.list(k, &a).await,
        MacPoolCmd::Show { name } => ctx.show(k, &name).await,
        MacPoolCmd::Update { name, ranges } => {
            let id = ctx.id(k, &name).await?;
            let mut rs = Vec::new();
            for r in &ranges {
                // A MAC has no '-': the first one splits the ends.
                let (from, to) = r
                    .split_once('-')
                    .ok_or_else(|| anyhow::anyhow!("--range {r:?}: give FROM-TO"))?;
                rs.push(json!({ "from": from, "to": to }));
            }
            let body = json!({ "ranges": { "range": rs } });
            ctx.update(k, &id, &name, body).await
        }
    }
}

/// The id of QoS `name` in data center `dc` (its QoS entries are under it).
async fn qos_id(ctx: &Ctx, dc: &str, name: &str) -> anyhow::Result<(String, String)> {
    let dc = ctx.id(&kinds::DATACENTER, dc).await?;
    let all = ctx
        .api
        .list(&format!("datacenters/{dc}/qoss"), "qos", &[])
        .await?;
    let id = all
        .iter()
        .find(|q| q["name"].as_str() == Some(name) || q["id"].as_str() == Some(name))
        .and_then(|q| q["id"].as_str())
        .ok_or_else(|| anyhow::anyhow!("no QoS named {name:?} in the data center"))?;
    Ok((dc, id.to_string()))
}

async fn qos(ctx: &Ctx, cmd: QosCmd) -> anyhow::Result<()> {
    let k = &kinds::QOS;
    match cmd {
        QosCmd::List { datacenter } => {
            let dc = ctx.id(&kinds::DATACENTER, &datacenter).await?;
            let items = ctx
                .api
                .list(&format!("datacenters/{dc}/qoss"), "qos", &[])
                .await?;
            output::print_list(&ctx.api, k, &items, ctx.out).await
        }
        QosCmd::Create {
            name,
            datacenter,
            description,
            limits,
        } => {
            let dc = ctx.id(&kinds::DATACENTER, &datacenter).await?;
            let mut body = json!({ "name": name, "description": description, "type": "storage" });
            limits.apply(&mut body);
            let obj = ctx
                .api
                .request(
                    Method::POST,
                    &format!("/datacenters/{dc}/qoss"),
                    Some(&body),
                    None,
                )
                .await
                .with_context(|| format!("creating QoS {name}"))?;
            ctx.print(k, &obj).await
        }
        QosCmd::Update {
            name,
            datacenter,
            limits,
        } => {
            let (dc, id) = qos_id(ctx, &datacenter, &name).await?;
            let mut body = json!({});
            limits.apply(&mut body);
            anyhow::ensure!(
                body.as_object().is_some_and(|o| !o.is_empty()),
                "nothing to change: give at least one limit"
            );
            let obj = ctx
                .api
                .request(
                    Method::PUT,
                    &format!("/datacenters/{dc}/qoss/{id}"),
                    Some(&body),
                    None,
                )
                .await
                .with_context(|| format!("updating QoS {name}"))?;
            ctx.print(k, &obj).await
        }
        QosCmd::Remove { name, datacenter } => {
            let (dc, id) = qos_id(ctx, &datacenter, &name).await?;
            ctx.api
                .request(
                    Method::DELETE,
                    &format!("/datacenters/{dc}/qoss/{id}"),
                    None,
                    None,
                )
                .await
                .with_context(|| format!("removing QoS {name}"))?;
            output::print_done(ctx.out, &format!("QoS {name} removed"), None)
        }
    }
}

async fn disk_profile(ctx: &Ctx, cmd: DiskProfileCmd) -> anyhow::Result<()> {
    let k = &kinds::DISK_PROFILE;
    let qos_ref = |qos: Option<String>, dc: Option<String>| async move {
        match (qos, dc) {
            (Some(q), Some(dc)) => Ok::<_, anyhow::Error>(Some(qos_id(ctx, &dc, &q).await?.1)),
            _ => Ok(None),
        }
    };
    match cmd {
        DiskProfileCmd::List { sd } => {
            let path = match sd {
                Some(sd) => format!(
                    "storagedomains/{}/diskprofiles",
                    ctx.id(&kinds::STORAGE_DOMAIN, &sd).await?
                ),
                None => "diskprofiles".into(),
            };
            let items = ctx.api.list(&path, "disk_profile", &[]).await?;
            output::print_list(&ctx.api, k, &items, ctx.out).await
        }
        DiskProfileCmd::Create {
            name,
            sd,
            qos,
            datacenter,
        } => {
            let sd = ctx.id(&kinds::STORAGE_DOMAIN, &sd).await?;
            let mut body = json!({ "name": name, "storage_domain": { "id": sd } });
            if let Some(q) = qos_ref(qos, datacenter).await? {
                body["qos"] = json!({ "id": q });
            }
            let obj = ctx.create(k, body).await?;
            ctx.print(k, &obj).await
        }
        DiskProfileCmd::Update {
            name,
            qos,
            datacenter,
            no_qos,
        } => {
            let id = ctx.id(k, &name).await?;
            let body = match qos_ref(qos, datacenter).await? {
                Some(q) => json!({ "qos": { "id": q } }),
                None if no_qos => json!({ "qos": {} }),
                None => anyhow::bail!("give --qos (with --dc) or --no-qos"),
            };
            ctx.update(k, &id, &name, body).await
        }
        DiskProfileCmd::Remove { name } => {
            let id = ctx.id(k, &name).await?;
            ctx.api
                .request(Method::DELETE, &format!("/diskprofiles/{id}"), None, None)
                .await
                .with_context(|| format!("removing disk profile {name}"))?;
            output::print_done(ctx.out, &format!("disk profile {name} removed"), None)
        }
        DiskProfileCmd::Set { disk, profile, none } => {
            let d = ctx.id(&kinds::DISK, &disk).await?;
            let body = match (profile, none) {
                (Some(p), _) => json!({ "disk_profile": { "id": ctx.id(k, &p).await? } }),
                (None, true) => json!({ "disk_profile": {} }),
                (None, false) => anyhow::bail!("give --profile or --none"),
            };
            ctx.update(&kinds::DISK, &d, &disk, body).await
        }
    }
}

/// A tag named `name` (`root` is the root tag, which `tag list` shows but nothing names).
async fn tag_id(ctx: &Ctx, name: &str) -> anyhow::Result<String> {
    if name == "root" {
        return Ok("00000000-0000-0000-0000-000000000000".into());
    }
    ctx.id(&kinds::TAG, name).await
}

async fn tag(ctx: &Ctx, cmd: TagCmd) -> anyhow::Result<()> {
    let k = &kinds::TAG;
    match cmd {
        TagCmd::List(a) => ctx.list(k, &a).await,
        TagCmd::Show { name } => {
            let id = tag_id(ctx, &name).await?;
            let obj = ctx.get(k, &id).await?;
            output::print_one(&ctx.api, k, &obj, ctx.out).await
        }
        TagCmd::Create {
            name,
            parent,
            description,
        } => {
            let mut body = json!({ "name": name, "description": description });
            if let Some(p) = parent {
                body["parent"] = json!({ "id": tag_id(ctx, &p).await? });
            }
            let obj = ctx.create(k, body).await?;
            ctx.print(k, &obj).await
        }
        TagCmd::Update {
            name,
            rename,
            description,
            parent,
        } => {
            let id = tag_id(ctx, &name).await?;
            let mut body = json!({});
            if let Some(n) = rename {
                body["name"] = json!(n);
            }
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            if let Some(p) = parent {
                body["parent"] = json!({ "id": tag_id(ctx, &p).await? });
            }
            anyhow::ensure!(
                body.as_object().is_some_and(|o| !o.is_empty()),
                "nothing to change: give at least one option"
            );
            ctx.update(k, &id, &name, body).await
        }
        TagCmd::Remove { name } => {
            let id = tag_id(ctx, &name).await?;
            ctx.api
                .request(Method::DELETE, &format!("/tags/{id}"), None, None)
                .await
                .with_context(|| format!("removing tag {name}"))?;
            output::print_done(ctx.out, &format!("tag {name} removed"), None)
        }
        TagCmd::Assign { name, on } => {
            let path = on.path(ctx).await?;
            let id = tag_id(ctx, &name).await?;
            let obj = ctx
                .api
                .request(
                    Method::POST,
                    &format!("/{path}"),
                    Some(&json!({ "id": id })),
                    None,
                )
                .await
                .with_context(|| format!("putting tag {name} on {path}"))?;
            ctx.print(k, &obj).await
        }
        TagCmd::Unassign { name, on } => {
            let path = on.path(ctx).await?;
            let id = tag_id(ctx, &name).await?;
            ctx.api
                .request(Method::DELETE, &format!("/{path}/{id}"), None, None)
                .await
                .with_context(|| format!("taking tag {name} off {path}"))?;
            output::print_done(ctx.out, &format!("tag {name} taken off"), None)
        }
        TagCmd::Of { on } => {
            let path = on.path(ctx).await?;
            let items = ctx.api.list(&path, "tag", &[]).await?;
            output::print_list(&ctx.api, k, &items, ctx.out).await
        }
    }
}

async fn job(ctx: &Ctx, cmd: JobCmd) -> anyhow::Result<()> {
    let k = &kinds::JOB;
    match cmd {
        JobCmd::List(a) => ctx.list(k, &a).await,
        JobCmd::Show { id } => {
            let mut j = ctx.get(k, &id).await?;
            let steps = ctx.api.list(&format!("jobs/{id}/steps"), "step", &[]).await?;
            match ctx.out {
                Output::Json => {
                    j["steps"] = json!({ "step": steps });
                    println!("{}", serde_json::to_string_pretty(&j)?);
                }
                Output::Table => {
                    output::print_one(&ctx.api, k, &j, Output::Table).await?;
                    println!();
                    output::print_list(&ctx.api, &kinds::STEP, &steps, Output::Table).await?;
                }
            }
            Ok(())
        }
        JobCmd::Retry { id } => {
            ctx.action(
                format!("retry job {id}"),
                format!("/jobs/{id}/retry"),
                json!({}),
                None,
            )
            .await?;
            output::print_done(ctx.out, &format!("job {id} retried"), None)
        }
    }
}

async fn event(ctx: &Ctx, cmd: EventCmd) -> anyhow::Result<()> {
    let k = &kinds::EVENT;
    match cmd {
        EventCmd::List { search, max, from } => {
            let mut q = vec![("max", max.to_string())];
            if let Some(s) = search {
                q.push(("search", s));
            }
            if let Some(f) = from {
                q.push(("from", f.to_string()));
            }
            let items = ctx.api.list(k.coll, k.elem, &q).await?;
            output::print_list(&ctx.api, k, &items, ctx.out).await
        }
        EventCmd::Show { id } => {
            let e = ctx.get(k, &id).await?;
            ctx.print(k, &e).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2 g").unwrap(), 2 << 30);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("0").is_err());
    }
}
