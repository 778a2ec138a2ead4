//! The kinds of objects the CLI handles: where each lives in the API, what it is called, and
//! the columns of its table.

/// How a column's value is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fmt {
    Text,
    /// A byte count, shown as KiB/MiB/GiB.
    Bytes,
    /// An id of another kind's object, shown as its name.
    Ref(&'static Kind),
    /// `{major, minor}`.
    Version,
    /// A CPU topology: sockets × cores × threads, shown as the product.
    Cpus,
    /// An array, comma-separated (an object in it by its values: a range as `from-to`).
    List,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Col {
    pub header: &'static str,
    /// Dotted path into the object's JSON (`host.id`, `storage.path`).
    pub path: &'static str,
    pub fmt: Fmt,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Kind {
    /// For messages: "VM", "data center".
    pub what: &'static str,
    /// The collection under `/ovirt-engine/api`.
    pub coll: &'static str,
    /// The member element's name.
    pub elem: &'static str,
    pub cols: &'static [Col],
}

const fn c(header: &'static str, path: &'static str, fmt: Fmt) -> Col {
    Col { header, path, fmt }
}

use Fmt::*;

pub static DATACENTER: Kind = Kind {
    what: "data center",
    coll: "datacenters",
    elem: "data_center",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("STATUS", "status", Text),
        c("LOCAL", "local", Text),
        c("VERSION", "version", Version),
        c("DESCRIPTION", "description", Text),
    ],
};

pub static CLUSTER: Kind = Kind {
    what: "cluster",
    coll: "clusters",
    elem: "cluster",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("DATA CENTER", "data_center.id", Ref(&DATACENTER)),
        c("CPU", "cpu.type", Text),
        c("POLICY", "scheduling_policy.name", Text),
        c("OVERCOMMIT %", "memory_policy.over_commit.percent", Text),
        c("VERSION", "version", Version),
        c("DESCRIPTION", "description", Text),
    ],
};

pub static HOST: Kind = Kind {
    what: "host",
    coll: "hosts",
    elem: "host",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("STATUS", "status", Text),
        c("ADDRESS", "address", Text),
        c("CLUSTER", "cluster.id", Ref(&CLUSTER)),
        c("SPM", "spm.status", Text),
        c("CPUS", "cpu.topology", Cpus),
        c("MEMORY", "memory", Bytes),
        c("FREE", "max_scheduling_memory", Bytes),
        c("PM", "power_management.enabled", Text),
    ],
};

pub static SCHEDULING_POLICY: Kind = Kind {
    what: "scheduling policy",
    coll: "schedulingpolicies",
    elem: "scheduling_policy",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("DEFAULT", "default_policy", Text),
        c("DESCRIPTION", "description", Text),
    ],
};

/// Lives under its cluster (`clusters/{id}/affinitygroups`): listed and named through it.
pub static AFFINITY_GROUP: Kind = Kind {
    what: "affinity group",
    coll: "affinitygroups",
    elem: "affinity_group",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("CLUSTER", "cluster.id", Ref(&CLUSTER)),
        c("ENABLED", "vms_rule.enabled", Text),
        c("POSITIVE", "vms_rule.positive", Text),
        c("ENFORCING", "vms_rule.enforcing", Text),
        c("DESCRIPTION", "description", Text),
    ],
};

/// A host's fence agent (`hosts/{id}/fenceagents`; one per host, identified as the host).
pub static FENCE_AGENT: Kind = Kind {
    what: "fence agent",
    coll: "fenceagents",
    elem: "agent",
    cols: &[
        c("HOST", "host.id", Ref(&HOST)),
        c("TYPE", "type", Text),
        c("ADDRESS", "address", Text),
        c("USERNAME", "username", Text),
        c("PORT", "port", Text),
    ],
};

pub static STORAGE_DOMAIN: Kind = Kind {
    what: "storage domain",
    coll: "storagedomains",
    elem: "storage_domain",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("TYPE", "type", Text),
        c("STATUS", "status", Text),
        c("STORAGE", "storage.type", Text),
        c("PATH", "storage.path", Text),
        c("AVAILABLE", "available", Bytes),
        c("USED", "used", Bytes),
        c("DATA CENTER", "data_center.id", Ref(&DATACENTER)),
    ],
};

pub static DISK: Kind = Kind {
    what: "disk",
    coll: "disks",
    elem: "disk",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("STATUS", "status", Text),
        c("FORMAT", "format", Text),
        c("CONTENT", "content_type", Text),
        c("SIZE", "provisioned_size", Bytes),
        c("ACTUAL", "actual_size", Bytes),
        c("STORAGE DOMAIN", "storage_domain.id", Ref(&STORAGE_DOMAIN)),
    ],
};

/// Lives under its data center (`datacenters/{id}/qoss`).
pub static QOS: Kind = Kind {
    what: "QoS",
    coll: "qoss",
    elem: "qos",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("MB/S", "max_throughput", Text),
        c("READ MB/S", "max_read_throughput", Text),
        c("WRITE MB/S", "max_write_throughput", Text),
        c("IOPS", "max_iops", Text),
        c("READ IOPS", "max_read_iops", Text),
        c("WRITE IOPS", "max_write_iops", Text),
    ],
};

pub static DISK_PROFILE: Kind = Kind {
    what: "disk profile",
    coll: "diskprofiles",
    elem: "disk_profile",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("STORAGE DOMAIN", "storage_domain.id", Ref(&STORAGE_DOMAIN)),
        c("QOS", "qos.id", Text),
        c("DESCRIPTION", "description", Text),
    ],
};

pub static TAG: Kind = Kind {
    what: "tag",
    coll: "tags",
    elem: "tag",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("PARENT", "parent.id", Ref(&TAG)),
        c("DESCRIPTION", "description", Text),
    ],
};

pub static TEMPLATE: Kind = Kind {
    what: "template",
    coll: "templates",
    elem: "template",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("STATUS", "status", Text),
        c("MEMORY", "memory", Bytes),
        c("CPUS", "cpu.topology", Cpus),
        c("CLUSTER", "cluster.id", Ref(&CLUSTER)),
        c("DESCRIPTION", "description", Text),
    ],
};

pub static VM: Kind = Kind {
    what: "VM",
    coll: "vms",
    elem: "vm",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("STATUS", "status", Text),
        c("HOST", "host.id", Ref(&HOST)),
        c("CLUSTER", "cluster.id", Ref(&CLUSTER)),
        c("CPUS", "cpu.topology", Cpus),
        c("MEMORY", "memory", Bytes),
        c("TEMPLATE", "template.id", Ref(&TEMPLATE)),
    ],
};

pub static SNAPSHOT: Kind = Kind {
    what: "snapshot",
    coll: "snapshots",
    elem: "snapshot",
    cols: &[
        c("ID", "id", Text),
        c("DESCRIPTION", "description", Text),
        c("TYPE", "snapshot_type", Text),
        c("STATUS", "snapshot_status", Text),
        c("MEMORY", "persist_memorystate", Text),
        c("DATE", "date", Text),
    ],
};

pub static JOB: Kind = Kind {
    what: "job",
    coll: "jobs",
    elem: "job",
    cols: &[
        c("ID", "id", Text),
        c("STATUS", "status", Text),
        c("DESCRIPTION", "description", Text),
        c("STARTED", "start_time", Text),
        c("ENDED", "end_time", Text),
        c("CORRELATION ID", "correlation_id", Text),
    ],
};

pub static STEP: Kind = Kind {
    what: "step",
    coll: "steps",
    elem: "step",
    cols: &[
        c("NUMBER", "number", Text),
        c("TYPE", "type", Text),
        c("STATUS", "status", Text),
        c("DESCRIPTION", "description", Text),
        c("STARTED", "start_time", Text),
        c("ENDED", "end_time", Text),
    ],
};

pub static EVENT: Kind = Kind {
    what: "event",
    coll: "events",
    elem: "event",
    cols: &[
        c("ID", "id", Text),
        c("TIME", "time", Text),
        c("SEVERITY", "severity", Text),
        c("CODE", "code", Text),
        c("DESCRIPTION", "description", Text),
    ],
};

pub static NETWORK: Kind = Kind {
    what: "network",
    coll: "networks",
    elem: "network",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("DATA CENTER", "data_center.id", Ref(&DATACENTER)),
        c("VLAN", "vlan.id", Text),
        c("MTU", "mtu", Text),
        c("USAGES", "usages.usage", List),
        c("DESCRIPTION", "description", Text),
    ],
};

/// A network as a cluster has it (`clusters/{id}/networks`).
pub static CLUSTER_NETWORK: Kind = Kind {
    what: "cluster network",
    coll: "networks",
    elem: "network",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("REQUIRED", "required", Text),
        c("USAGES", "usages.usage", List),
    ],
};

pub static VNIC_PROFILE: Kind = Kind {
    what: "vNIC profile",
    coll: "vnicprofiles",
    elem: "vnic_profile",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("NETWORK", "network.id", Ref(&NETWORK)),
    ],
};

/// A cluster's MAC pool (named and identified as its cluster).
pub static MAC_POOL: Kind = Kind {
    what: "MAC pool",
    coll: "macpools",
    elem: "mac_pool",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("RANGES", "ranges.range", List),
    ],
};

/// A VM's NIC (`vms/{id}/nics`).
pub static NIC: Kind = Kind {
    what: "NIC",
    coll: "nics",
    elem: "nic",
    cols: &[
        c("NAME", "name", Text),
        c("ID", "id", Text),
        c("MAC", "mac.address", Text),
        c("PROFILE", "vnic_profile.id", Ref(&VNIC_PROFILE)),
        c("INTERFACE", "interface", Text),
        c("PLUGGED", "plugged", Text),
        c("LINKED", "linked", Text),
    ],
};

/// A host's NIC, live from its node (`hosts/{id}/nics`; its id is its name).
pub static HOST_NIC: Kind = Kind {
    what: "host NIC",
    coll: "nics",
    elem: "host_nic",
    cols: &[
        c("NAME", "name", Text),
        c("STATUS", "status", Text),
        c("MAC", "mac.address", Text),
        c("MTU", "mtu", Text),
        c("ADDRESS", "ip.address", Text),
        c("NETWORK", "network.id", Ref(&NETWORK)),
    ],
};

/// Which host NIC carries which network (`hosts/{id}/networkattachments`).
pub static NETWORK_ATTACHMENT: Kind = Kind {
    what: "network attachment",
    coll: "networkattachments",
    elem: "network_attachment",
    cols: &[
        c("ID", "id", Text),
        c("NETWORK", "network.id", Ref(&NETWORK)),
        c("NIC", "host_nic.id", Text),
        c("IN SYNC", "in_sync", Text),
    ],
};
