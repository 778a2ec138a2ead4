//! The route table: every path and method the API serves, with the operation that serves it.
//! Dispatch ([`resolve`]) and the OpenAPI description ([`super::openapi`]) both read it.

use http::Method;

use super::fault::ApiError;

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Api,
    OpenApi,
    DcList,
    DcAdd,
    DcGet,
    DcUpdate,
    DcRemove,
    DcClusters,
    DcSdList,
    DcSdAttach,
    DcSdGet,
    DcSdDetach,
    DcSdActivate,
    DcSdDeactivate,
    ClusterList,
    ClusterAdd,
    ClusterGet,
    ClusterUpdate,
    ClusterRemove,
    HostList,
    HostAdd,
    HostGet,
    HostUpdate,
    HostRemove,
    HostActivate,
    HostForceSelectSpm,
    HostDeactivate,
    HostFence,
    HostAgentList,
    HostAgentAdd,
    HostAgentGet,
    HostAgentUpdate,
    HostAgentRemove,
    PolicyList,
    PolicyGet,
    GroupList,
    GroupAdd,
    GroupGet,
    GroupUpdate,
    GroupRemove,
    GroupVmList,
    GroupVmAdd,
    QosList,
    QosAdd,
    QosGet,
    QosUpdate,
    QosRemove,
    ProfileList,
    ProfileAdd,
    ProfileGet,
    ProfileUpdate,
    ProfileRemove,
    SdProfileList,
    SdProfileAdd,
    TagList,
    TagAdd,
    TagGet,
    TagUpdate,
    TagRemove,
    VmTagList,
    VmTagAdd,
    VmTagGet,
    VmTagRemove,
    HostTagList,
    HostTagAdd,
    HostTagGet,
    HostTagRemove,
    TemplateTagList,
    TemplateTagAdd,
    TemplateTagGet,
    TemplateTagRemove,
    GroupVmRemove,
    SdList,
    SdAdd,
    SdGet,
    SdUpdate,
    SdRemove,
    SdDisks,
    SdDiskRegister,
    SdVms,
    SdVmGet,
    SdVmRegister,
    SdVmRemove,
    SdTemplates,
    SdTemplateGet,
    SdTemplateRegister,
    SdTemplateRemove,
    SdUpdateOvfStore,
    SdDiskSnapshots,
    VmSnapDisks,
    DiskList,
    DiskAdd,
    DiskGet,
    DiskUpdate,
    DiskRemove,
    DiskMove,
    DiskCopy,
    TransferList,
    TransferAdd,
    TransferGet,
    TransferFinalize,
    TransferCancel,
    VmList,
    VmAdd,
    VmGet,
    VmUpdate,
    VmRemove,
    VmStart,
    VmStop,
    VmShutdown,
    VmSuspend,
    VmReboot,
    VmCancelMigration,
    VmMigrate,
    VmPreviewSnapshot,
    VmCommitSnapshot,
    VmUndoSnapshot,
    VmAttList,
    VmAttAdd,
    VmAttGet,
    VmAttUpdate,
    VmAttRemove,
    VmNumaNodes,
    VmCdromList,
    VmClone,
    VmStatList,
    VmStatGet,
    HostStatList,
    HostStatGet,
    VmCdromGet,
    VmCdromUpdate,
    VmConsoleList,
    VmConsoleGet,
    VmConsoleTicket,
    VmConsoleFile,
    VmNicList,
    TemplateNicList,
    TemplateNicGet,
    VmNicAdd,
    VmNicGet,
    VmNicUpdate,
    VmNicRemove,
    VmNicActivate,
    VmNicDeactivate,
    NetList,
    NetAdd,
    NetGet,
    NetUpdate,
    NetRemove,
    NetProfiles,
    DcNetList,
    DcNetAdd,
    DcNetGet,
    DcNetUpdate,
    DcNetRemove,
    ClusterNetList,
    ClusterNetAdd,
    ClusterNetGet,
    ClusterNetUpdate,
    ClusterNetRemove,
    HostNicList,
    HostNicGet,
    HostAttList,
    HostAttAdd,
    HostAttGet,
    HostAttUpdate,
    HostAttRemove,
    HostSetupNetworks,
    VnicProfileList,
    VnicProfileGet,
    MacPoolList,
    MacPoolGet,
    MacPoolUpdate,
    VmSnapList,
    VmSnapAdd,
    VmSnapGet,
    VmSnapRemove,
    VmSnapRestore,
    TemplateList,
    TemplateAdd,
    TemplateGet,
    TemplateUpdate,
    TemplateRemove,
    TemplateAttList,
    JobList,
    JobGet,
    JobSteps,
    JobRetry,
    EventAdd,
    EventRemove,
    EventList,
    EventGet,
    UserList,
    UserGet,
}

pub struct Route {
    pub method: Method,
    /// Relative to `/ovirt-engine/api`; `{name}` segments are parameters.
    pub path: &'static str,
    pub op: Op,
    pub summary: &'static str,
    /// The root element of the request body (adds, updates, actions).
    pub body: Option<&'static str>,
    /// The root element of the response.
    pub reply: &'static str,
}

macro_rules! r {
    ($m:ident $p:literal $op:ident $reply:literal $body:expr, $s:literal) => {
        Route {
            method: Method::$m,
            path: $p,
            op: Op::$op,
            summary: $s,
            body: $body,
            reply: $reply,
        }
    };
}

const N: Option<&str> = None;
const A: Option<&str> = Some("action");

pub static ROUTES: &[Route] = &[
    r!(GET "/" Api "api" N, "The API root: product, special objects, summary, time"),
    r!(GET "/openapi.json" OpenApi "openapi" N, "This description (OpenAPI 3)"),
    r!(GET "/datacenters" DcList "data_centers" N, "List data centers (search, max, follow)"),
    r!(POST "/datacenters" DcAdd "data_center" Some("data_center"), "Add a data center"),
    r!(GET "/datacenters/{datacenter}" DcGet "data_center" N, "Get a data center"),
    r!(PUT "/datacenters/{datacenter}" DcUpdate "data_center" Some("data_center"), "Update a data center's name or description"),
    r!(DELETE "/datacenters/{datacenter}" DcRemove "action" N, "Remove a data center (force accepted)"),
    r!(GET "/datacenters/{datacenter}/clusters" DcClusters "clusters" N, "The data center's clusters"),
    r!(GET "/datacenters/{datacenter}/storagedomains" DcSdList "storage_domains" N, "Storage domains attached to the data center"),
    r!(POST "/datacenters/{datacenter}/storagedomains" DcSdAttach "storage_domain" Some("storage_domain"), "Attach a storage domain (by id or name)"),
    r!(GET "/datacenters/{datacenter}/storagedomains/{storagedomain}" DcSdGet "storage_domain" N, "An attached storage domain with its status in the data center"),
    r!(DELETE "/datacenters/{datacenter}/storagedomains/{storagedomain}" DcSdDetach "action" N, "Detach a storage domain in maintenance"),
    r!(POST "/datacenters/{datacenter}/storagedomains/{storagedomain}/activate" DcSdActivate "action" A, "Activate an attached storage domain"),
    r!(POST "/datacenters/{datacenter}/storagedomains/{storagedomain}/deactivate" DcSdDeactivate "action" A, "Move an attached storage domain to maintenance"),
    r!(GET "/clusters" ClusterList "clusters" N, "List clusters"),
    r!(POST "/clusters" ClusterAdd "cluster" Some("cluster"), "Add a cluster to a data center (scheduling_policy by id or name, memory_policy.over_commit.percent)"),
    r!(GET "/clusters/{cluster}" ClusterGet "cluster" N, "Get a cluster"),
    r!(PUT "/clusters/{cluster}" ClusterUpdate "cluster" Some("cluster"), "Update a cluster: name, description, CPU type, scheduling_policy (id or name), memory_policy.over_commit.percent (100-1000)"),
    r!(DELETE "/clusters/{cluster}" ClusterRemove "action" N, "Remove an empty cluster"),
    r!(GET "/hosts" HostList "hosts" N, "List hosts"),
    r!(POST "/hosts" HostAdd "host" Some("host"), "Add a host: it joins when its node enrolls with the CA fingerprint"),
    r!(GET "/hosts/{host}" HostGet "host" N, "Get a host"),
    r!(PUT "/hosts/{host}" HostUpdate "host" Some("host"), "Update a host's name or SPM priority"),
    r!(DELETE "/hosts/{host}" HostRemove "action" N, "Remove a host in maintenance"),
    r!(POST "/hosts/{host}/activate" HostActivate "action" A, "Take a host out of maintenance"),
    r!(POST "/hosts/{host}/deactivate" HostDeactivate "action" A, "Move a host to maintenance (its VMs migrate)"),
    r!(POST "/hosts/{host}/forceselectspm" HostForceSelectSpm "action" A, "Make this host the SPM (the current one steps down)"),
    r!(POST "/hosts/{host}/fence" HostFence "action" A, "Power management: fence_type status (answers power_management.status), stop, start, restart, or manual (confirm the host was rebooted)"),
    r!(GET "/hosts/{host}/fenceagents" HostAgentList "agents" N, "The host's fence agent (at most one)"),
    r!(POST "/hosts/{host}/fenceagents" HostAgentAdd "agent" Some("agent"), "Give the host its fence agent: type script (option command) or T (runs fence_T), address, username, password, port, options"),
    r!(GET "/hosts/{host}/fenceagents/{agent}" HostAgentGet "agent" N, "Get the host's fence agent (its id is the host's)"),
    r!(PUT "/hosts/{host}/fenceagents/{agent}" HostAgentUpdate "agent" Some("agent"), "Change the host's fence agent"),
    r!(DELETE "/hosts/{host}/fenceagents/{agent}" HostAgentRemove "action" N, "Remove the host's fence agent"),
    r!(GET "/schedulingpolicies" PolicyList "scheduling_policies" N, "The built-in scheduling policies (read-only)"),
    r!(GET "/schedulingpolicies/{policy}" PolicyGet "scheduling_policy" N, "Get a scheduling policy"),
    r!(GET "/clusters/{cluster}/affinitygroups" GroupList "affinity_groups" N, "The cluster's affinity groups"),
    r!(POST "/clusters/{cluster}/affinitygroups" GroupAdd "affinity_group" Some("affinity_group"), "Add an affinity group (name, description, vms_rule enabled/positive/enforcing, vms of this cluster)"),
    r!(GET "/clusters/{cluster}/affinitygroups/{group}" GroupGet "affinity_group" N, "Get an affinity group"),
    r!(PUT "/clusters/{cluster}/affinitygroups/{group}" GroupUpdate "affinity_group" Some("affinity_group"), "Update an affinity group (vms, when given, replace its members)"),
    r!(DELETE "/clusters/{cluster}/affinitygroups/{group}" GroupRemove "action" N, "Remove an affinity group"),
    r!(GET "/clusters/{cluster}/affinitygroups/{group}/vms" GroupVmList "vms" N, "The affinity group's VMs"),
    r!(POST "/clusters/{cluster}/affinitygroups/{group}/vms" GroupVmAdd "vm" Some("vm"), "Add a VM of the cluster to the affinity group (by id or name)"),
    r!(DELETE "/clusters/{cluster}/affinitygroups/{group}/vms/{vm}" GroupVmRemove "action" N, "Take a VM out of the affinity group"),
    r!(GET "/storagedomains" SdList "storage_domains" N, "List storage domains"),
    r!(POST "/storagedomains" SdAdd "storage_domain" Some("storage_domain"), "Create a storage domain through a host"),
    r!(GET "/storagedomains/{storagedomain}" SdGet "storage_domain" N, "Get a storage domain"),
    r!(PUT "/storagedomains/{storagedomain}" SdUpdate "storage_domain" Some("storage_domain"), "Update a storage domain's name or description"),
    r!(DELETE "/storagedomains/{storagedomain}" SdRemove "action" N, "Remove an unattached storage domain (destroy, format, host)"),
    r!(GET "/storagedomains/{storagedomain}/disks" SdDisks "disks" N, "Disks on a storage domain; with unregistered=true those on storage the engine has no record of (an imported domain's)"),
    r!(POST "/storagedomains/{storagedomain}/disks" SdDiskRegister "disk" Some("disk"), "With unregistered=true: registers the unregistered disk <disk id> of the domain, with its volume chain"),
    r!(GET "/storagedomains/{storagedomain}/vms" SdVms "vms" N, "VMs with disks on the domain; with unregistered=true those its OVF stores describe that the engine has no record of (an imported or re-attached domain's)"),
    r!(GET "/storagedomains/{storagedomain}/vms/{vm}" SdVmGet "vm" N, "A VM with disks on the domain, or one of its unregistered VMs"),
    r!(POST "/storagedomains/{storagedomain}/vms/{vm}/register" SdVmRegister "action" A, "Register an unregistered VM with its disks, NICs and snapshots (cluster, vm name, allow_partial_import, reassign_bad_macs)"),
    r!(DELETE "/storagedomains/{storagedomain}/vms/{vm}" SdVmRemove "action" N, "Remove an unregistered VM: its disks on the domain are deleted"),
    r!(GET "/storagedomains/{storagedomain}/templates" SdTemplates "templates" N, "Templates with disks on the domain; with unregistered=true those its OVF stores describe that the engine has no record of"),
    r!(GET "/storagedomains/{storagedomain}/templates/{template}" SdTemplateGet "template" N, "A template with disks on the domain, or one of its unregistered templates"),
    r!(POST "/storagedomains/{storagedomain}/templates/{template}/register" SdTemplateRegister "action" A, "Register an unregistered template with its disks and NICs (cluster, template name, allow_partial_import)"),
    r!(DELETE "/storagedomains/{storagedomain}/templates/{template}" SdTemplateRemove "action" N, "Remove an unregistered template: its disks on the domain are deleted"),
    r!(POST "/storagedomains/{storagedomain}/updateovfstore" SdUpdateOvfStore "action" A, "Write the domain's OVF stores now"),
    r!(GET "/storagedomains/{storagedomain}/disksnapshots" SdDiskSnapshots "disk_snapshots" N, "The disk snapshots on a storage domain: each disk's data as of a VM snapshot (id: its volume's, what an image transfer's <snapshot id> downloads)"),
    r!(GET "/disks" DiskList "disks" N, "List disks"),
    r!(POST "/disks" DiskAdd "disk" Some("disk"), "Create a floating disk"),
    r!(GET "/disks/{disk}" DiskGet "disk" N, "Get a disk"),
    r!(PUT "/disks/{disk}" DiskUpdate "disk" Some("disk"), "Update a disk's alias or description; a bigger provisioned_size extends it (live under a running VM)"),
    r!(DELETE "/disks/{disk}" DiskRemove "action" N, "Remove a disk and its volumes"),
    r!(POST "/disks/{disk}/move" DiskMove "action" A, "Move a disk to another active data domain (<storage_domain>); live when its VM is up"),
    r!(POST "/disks/{disk}/copy" DiskCopy "action" A, "Copy a disk whose VMs are down into a new disk of one volume on an active data domain (<storage_domain>; <disk><alias> names the copy)"),
    r!(GET "/vms" VmList "vms" N, "List VMs"),
    r!(POST "/vms" VmAdd "vm" Some("vm"), "Create a VM from Blank or as a thin clone of a template"),
    r!(GET "/vms/{vm}" VmGet "vm" N, "Get a VM"),
    r!(PUT "/vms/{vm}" VmUpdate "vm" Some("vm"), "Update a VM's configuration"),
    r!(DELETE "/vms/{vm}" VmRemove "action" N, "Remove a VM that is down, with its disks (detach_only keeps them)"),
    r!(POST "/vms/{vm}/start" VmStart "action" A, "Start a VM (host, pause)"),
    r!(POST "/vms/{vm}/stop" VmStop "action" A, "Power a VM off"),
    r!(POST "/vms/{vm}/shutdown" VmShutdown "action" A, "Shut a VM down through ACPI"),
    r!(POST "/vms/{vm}/suspend" VmSuspend "action" A, "Suspend a running VM: its memory goes to a volume, start resumes it"),
    r!(POST "/vms/{vm}/reboot" VmReboot "action" A, "Reboot a running guest (system reset); the VM stays on its host"),
    r!(POST "/vms/{vm}/cancelmigration" VmCancelMigration "action" A, "Cancel a VM's migration: it runs on where it was"),
    r!(POST "/vms/{vm}/clone" VmClone "action" A, "Clone a VM that is down (<vm><name>): its configuration, NICs with new MACs, each disk copied into one volume of its own"),
    r!(POST "/vms/{vm}/migrate" VmMigrate "action" A, "Live-migrate a VM (host optional)"),
    r!(POST "/vms/{vm}/previewsnapshot" VmPreviewSnapshot "action" A, "Run the VM on a snapshot's data until commit or undo"),
    r!(POST "/vms/{vm}/commitsnapshot" VmCommitSnapshot "action" A, "Keep the previewed snapshot"),
    r!(POST "/vms/{vm}/undosnapshot" VmUndoSnapshot "action" A, "Return from a preview to the data before it"),
    r!(GET "/vms/{vm}/diskattachments" VmAttList "disk_attachments" N, "A VM's disk attachments"),
    r!(POST "/vms/{vm}/diskattachments" VmAttAdd "disk_attachment" Some("disk_attachment"), "Attach a disk, creating it when it has no id"),
    r!(GET "/vms/{vm}/diskattachments/{attachment}" VmAttGet "disk_attachment" N, "Get a disk attachment"),
    r!(PUT "/vms/{vm}/diskattachments/{attachment}" VmAttUpdate "disk_attachment" Some("disk_attachment"), "Update an attachment (active, bootable, interface; <disk><provisioned_size> extends the disk, live when the VM runs)"),
    r!(DELETE "/vms/{vm}/diskattachments/{attachment}" VmAttRemove "action" N, "Detach a disk (detach_only=false also removes it)"),
    r!(GET "/vms/{vm}/numanodes" VmNumaNodes "vm_numa_nodes" N, "A VM's virtual NUMA nodes (none: oxvirt VMs have one implicit node)"),
    r!(GET "/vms/{vm}/statistics" VmStatList "statistics" N, "A VM's statistics (memory, CPU shares, migration progress), as oVirt names them"),
    r!(GET "/vms/{vm}/statistics/{statistic}" VmStatGet "statistic" N, "One of a VM's statistics"),
    r!(GET "/vms/{vm}/cdroms" VmCdromList "cdroms" N, "A VM's CD-ROM (one, id 00000000-0000-0000-0000-000000000000); current=true: what the running VM has in it"),
    r!(GET "/vms/{vm}/cdroms/{cdrom}" VmCdromGet "cdrom" N, "A VM's CD-ROM and the ISO disk in it (<file id>); current=true: the running VM's"),
    r!(PUT "/vms/{vm}/cdroms/{cdrom}" VmCdromUpdate "cdrom" Some("cdrom"), "Put an ISO disk in the CD-ROM (<file id=\"ISO disk\"/>; an empty id ejects): for the next start, or with current=true into the running VM"),
    r!(GET "/vms/{vm}/graphicsconsoles" VmConsoleList "graphics_consoles" N, "A VM's graphics consoles: one VNC console (id 766e63, as oVirt names it)"),
    r!(GET "/vms/{vm}/graphicsconsoles/{console}" VmConsoleGet "graphics_console" N, "A VM's VNC console"),
    r!(POST "/vms/{vm}/graphicsconsoles/{console}/ticket" VmConsoleTicket "action" A, "Open a running VM's console with a ticket (<ticket><value/><expiry/></ticket>; a random one for 120 s by default)"),
    r!(POST "/vms/{vm}/graphicsconsoles/{console}/remoteviewerconnectionfile" VmConsoleFile "action" A, "A remote-viewer (.vv) file for a running VM's console, with a fresh ticket"),
    r!(GET "/vms/{vm}/nics" VmNicList "nics" N, "A VM's NICs"),
    r!(POST "/vms/{vm}/nics" VmNicAdd "nic" Some("nic"), "Add a NIC (vnic_profile, MAC from the cluster's pool unless given); hot plugged on a running VM"),
    r!(GET "/vms/{vm}/nics/{nic}" VmNicGet "nic" N, "Get a NIC"),
    r!(PUT "/vms/{vm}/nics/{nic}" VmNicUpdate "nic" Some("nic"), "Update a NIC (linked and plugged act on a running VM)"),
    r!(DELETE "/vms/{vm}/nics/{nic}" VmNicRemove "action" N, "Remove a NIC (hot unplugged from a running VM); its MAC returns to the pool"),
    r!(POST "/vms/{vm}/nics/{nic}/activate" VmNicActivate "action" A, "Plug a NIC"),
    r!(POST "/vms/{vm}/nics/{nic}/deactivate" VmNicDeactivate "action" A, "Unplug a NIC"),
    r!(GET "/networks" NetList "networks" N, "List logical networks"),
    r!(POST "/networks" NetAdd "network" Some("network"), "Add a logical network to a data center (name, mtu, vlan, usages)"),
    r!(GET "/networks/{network}" NetGet "network" N, "Get a logical network"),
    r!(PUT "/networks/{network}" NetUpdate "network" Some("network"), "Update a logical network"),
    r!(DELETE "/networks/{network}" NetRemove "action" N, "Remove a logical network no host, NIC or cluster management uses"),
    r!(GET "/networks/{network}/vnicprofiles" NetProfiles "vnic_profiles" N, "The network's vNIC profile"),
    r!(GET "/datacenters/{datacenter}/networks" DcNetList "networks" N, "The data center's logical networks"),
    r!(POST "/datacenters/{datacenter}/networks" DcNetAdd "network" Some("network"), "Add a logical network to the data center"),
    r!(GET "/datacenters/{datacenter}/networks/{network}" DcNetGet "network" N, "Get a logical network of the data center"),
    r!(PUT "/datacenters/{datacenter}/networks/{network}" DcNetUpdate "network" Some("network"), "Update a logical network of the data center"),
    r!(DELETE "/datacenters/{datacenter}/networks/{network}" DcNetRemove "action" N, "Remove a logical network of the data center"),
    r!(GET "/clusters/{cluster}/networks" ClusterNetList "networks" N, "Networks attached to the cluster (required, management)"),
    r!(POST "/clusters/{cluster}/networks" ClusterNetAdd "network" Some("network"), "Attach a network to the cluster (required by default)"),
    r!(GET "/clusters/{cluster}/networks/{network}" ClusterNetGet "network" N, "Get a cluster network"),
    r!(PUT "/clusters/{cluster}/networks/{network}" ClusterNetUpdate "network" Some("network"), "Make a cluster network required or optional"),
    r!(DELETE "/clusters/{cluster}/networks/{network}" ClusterNetRemove "action" N, "Detach a network from the cluster"),
    r!(GET "/hosts/{host}/statistics" HostStatList "statistics" N, "A host's statistics (memory, swap, CPU, load, boot time), live from its node when it is up"),
    r!(GET "/hosts/{host}/statistics/{statistic}" HostStatGet "statistic" N, "One of a host's statistics"),
    r!(GET "/hosts/{host}/nics" HostNicList "host_nics" N, "The host's NICs and bonds (live from the node)"),
    r!(GET "/hosts/{host}/nics/{nic}" HostNicGet "host_nic" N, "Get a host NIC (its id is its name)"),
    r!(GET "/hosts/{host}/networkattachments" HostAttList "network_attachments" N, "Which host NIC carries which network"),
    r!(POST "/hosts/{host}/networkattachments" HostAttAdd "network_attachment" Some("network_attachment"), "Attach a network to a host NIC (setupNetworks with connectivity check)"),
    r!(GET "/hosts/{host}/networkattachments/{attachment}" HostAttGet "network_attachment" N, "Get a network attachment"),
    r!(PUT "/hosts/{host}/networkattachments/{attachment}" HostAttUpdate "network_attachment" Some("network_attachment"), "Change a network attachment (NIC, addresses)"),
    r!(DELETE "/hosts/{host}/networkattachments/{attachment}" HostAttRemove "action" N, "Detach a network from the host"),
    r!(POST "/hosts/{host}/setupnetworks" HostSetupNetworks "action" A, "Change the host's networks at once; rolled back by the host without the engine's confirmation"),
    r!(GET "/vnicprofiles" VnicProfileList "vnic_profiles" N, "vNIC profiles (one per VM network)"),
    r!(GET "/vnicprofiles/{profile}" VnicProfileGet "vnic_profile" N, "Get a vNIC profile"),
    r!(GET "/macpools" MacPoolList "mac_pools" N, "MAC address pools (one per cluster, named and identified as it)"),
    r!(GET "/macpools/{macpool}" MacPoolGet "mac_pool" N, "Get a cluster's MAC address pool (ranges, addresses free)"),
    r!(PUT "/macpools/{macpool}" MacPoolUpdate "mac_pool" Some("mac_pool"), "Replace a MAC pool's ranges"),
    r!(GET "/vms/{vm}/snapshots" VmSnapList "snapshots" N, "A VM's snapshots (the active one included)"),
    r!(POST "/vms/{vm}/snapshots" VmSnapAdd "snapshot" Some("snapshot"), "Take a snapshot (live when the VM runs)"),
    r!(GET "/vms/{vm}/snapshots/{snapshot}/disks" VmSnapDisks "disks" N, "The VM's disks as of a snapshot (<image_id>: the volume, a disk snapshot)"),
    r!(GET "/vms/{vm}/snapshots/{snapshot}" VmSnapGet "snapshot" N, "Get a snapshot"),
    r!(DELETE "/vms/{vm}/snapshots/{snapshot}" VmSnapRemove "action" N, "Remove a snapshot (merge)"),
    r!(POST "/vms/{vm}/snapshots/{snapshot}/restore" VmSnapRestore "action" A, "Restore a VM that is down to a snapshot"),
    r!(GET "/templates" TemplateList "templates" N, "List templates (Blank included)"),
    r!(POST "/templates" TemplateAdd "template" Some("template"), "Make a template from a VM that is down"),
    r!(GET "/templates/{template}" TemplateGet "template" N, "Get a template"),
    r!(PUT "/templates/{template}" TemplateUpdate "template" Some("template"), "Update a template's name or description"),
    r!(DELETE "/templates/{template}" TemplateRemove "action" N, "Remove a template no VM uses"),
    r!(GET "/templates/{template}/diskattachments" TemplateAttList "disk_attachments" N, "A template's disks"),
    r!(GET "/templates/{template}/nics" TemplateNicList "nics" N, "A template's NICs (every VM made from it gets them, with MACs of its own)"),
    r!(GET "/templates/{template}/nics/{nic}" TemplateNicGet "nic" N, "Get a template's NIC"),
    r!(GET "/imagetransfers" TransferList "image_transfers" N, "List image transfers"),
    r!(POST "/imagetransfers" TransferAdd "image_transfer" Some("image_transfer"), "Start uploading (direction upload) or downloading a disk whose VMs are down (<disk id>, optional <host>, <inactivity_timeout>); the data goes to transfer_url with ovirt-imageio's protocol"),
    r!(GET "/imagetransfers/{imagetransfer}" TransferGet "image_transfer" N, "Get an image transfer: phase, transfer_url, transferred bytes"),
    r!(POST "/imagetransfers/{imagetransfer}/finalize" TransferFinalize "action" A, "The client is done: close the transfer and unlock the disk (phase finished_success)"),
    r!(POST "/imagetransfers/{imagetransfer}/cancel" TransferCancel "action" A, "Stop a transfer; a cancelled upload removes its disk, as in oVirt"),
    r!(GET "/jobs" JobList "jobs" N, "List jobs (search by status, correlation_id)"),
    r!(GET "/jobs/{job}" JobGet "job" N, "Get a job"),
    r!(GET "/jobs/{job}/steps" JobSteps "steps" N, "A job's steps"),
    r!(POST "/jobs/{job}/retry" JobRetry "action" A, "oxvirt: retry the failed command behind a job that waits for an administrator (its rollback failed, or it failed past its point of no return), once the cause is fixed"),
    r!(GET "/events" EventList "events" N, "List events (from, max, search)"),
    r!(POST "/events" EventAdd "event" Some("event"), "Add an external event (<description>, <severity>, <origin>, <custom_id> unique per origin, optional <vm>, <host>, <storage_domain>, <data_center>, <cluster>, <template>)"),
    r!(DELETE "/events/{event}" EventRemove "action" N, "Remove an event from the log"),
    r!(GET "/events/{event}" EventGet "event" N, "Get an event"),
    r!(GET "/datacenters/{datacenter}/qoss" QosList "qoss" N, "The data center's QoS entries (storage: MB/s and IOPS limits)"),
    r!(POST "/datacenters/{datacenter}/qoss" QosAdd "qos" Some("qos"), "Add a storage QoS (<type>storage</type>, max_throughput or max_read/write_throughput in MB/s, max_iops or max_read/write_iops)"),
    r!(GET "/datacenters/{datacenter}/qoss/{qos}" QosGet "qos" N, "Get a QoS"),
    r!(PUT "/datacenters/{datacenter}/qoss/{qos}" QosUpdate "qos" Some("qos"), "Change a QoS: running VMs' disks under it get the new limits at once"),
    r!(DELETE "/datacenters/{datacenter}/qoss/{qos}" QosRemove "action" N, "Remove a QoS: its disk profiles become unlimited"),
    r!(GET "/diskprofiles" ProfileList "disk_profiles" N, "List disk profiles"),
    r!(POST "/diskprofiles" ProfileAdd "disk_profile" Some("disk_profile"), "Add a disk profile to a storage domain (<storage_domain>, optional <qos id> of its data center)"),
    r!(GET "/diskprofiles/{profile}" ProfileGet "disk_profile" N, "Get a disk profile"),
    r!(PUT "/diskprofiles/{profile}" ProfileUpdate "disk_profile" Some("disk_profile"), "Change a disk profile (<qos/>: unlimited); running VMs' disks get the new limits"),
    r!(DELETE "/diskprofiles/{profile}" ProfileRemove "action" N, "Remove a disk profile no disk uses"),
    r!(GET "/storagedomains/{storagedomain}/diskprofiles" SdProfileList "disk_profiles" N, "A storage domain's disk profiles"),
    r!(POST "/storagedomains/{storagedomain}/diskprofiles" SdProfileAdd "disk_profile" Some("disk_profile"), "Add a disk profile to the storage domain"),
    r!(GET "/tags" TagList "tags" N, "List tags (the root tag, all zeros, first)"),
    r!(POST "/tags" TagAdd "tag" Some("tag"), "Add a tag (name, description, <parent> by id or name; under the root tag by default)"),
    r!(GET "/tags/{tag}" TagGet "tag" N, "Get a tag"),
    r!(PUT "/tags/{tag}" TagUpdate "tag" Some("tag"), "Rename a tag, change its description or move it under another tag"),
    r!(DELETE "/tags/{tag}" TagRemove "action" N, "Remove a tag with the tags under it; they come off what they were on"),
    r!(GET "/vms/{vm}/tags" VmTagList "tags" N, "The tags on a VM"),
    r!(POST "/vms/{vm}/tags" VmTagAdd "tag" Some("tag"), "Put a tag on a VM (by id or name)"),
    r!(GET "/vms/{vm}/tags/{tag}" VmTagGet "tag" N, "A tag on a VM"),
    r!(DELETE "/vms/{vm}/tags/{tag}" VmTagRemove "action" N, "Take a tag off a VM"),
    r!(GET "/hosts/{host}/tags" HostTagList "tags" N, "The tags on a host"),
    r!(POST "/hosts/{host}/tags" HostTagAdd "tag" Some("tag"), "Put a tag on a host (by id or name)"),
    r!(GET "/hosts/{host}/tags/{tag}" HostTagGet "tag" N, "A tag on a host"),
    r!(DELETE "/hosts/{host}/tags/{tag}" HostTagRemove "action" N, "Take a tag off a host"),
    r!(GET "/templates/{template}/tags" TemplateTagList "tags" N, "The tags on a template"),
    r!(POST "/templates/{template}/tags" TemplateTagAdd "tag" Some("tag"), "Put a tag on a template (by id or name)"),
    r!(GET "/templates/{template}/tags/{tag}" TemplateTagGet "tag" N, "A tag on a template"),
    r!(DELETE "/templates/{template}/tags/{tag}" TemplateTagRemove "action" N, "Take a tag off a template"),
    r!(GET "/users" UserList "users" N, "List users"),
    r!(GET "/users/{user}" UserGet "user" N, "Get a user"),
];

fn matches(pattern: &str, path: &str, params: &mut Vec<String>) -> bool {
    params.clear();
    let mut p = pattern.split('/').filter(|s| !s.is_empty());
    let mut s = path.split('/').filter(|s| !s.is_empty());
    loop {
        match (p.next(), s.next()) {
            (None, None) => return true,
            (Some(pp), Some(ss)) => {
                if pp.starts_with('{') {
                    params.push(super::url_decode(ss));
                } else if pp != ss {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// The operation and path parameters for a request; 404 for an unknown path, 405 for a known
/// path with another method.
pub fn resolve(method: &Method, path: &str) -> Result<(Op, Vec<String>), ApiError> {
    let mut params = Vec::new();
    let mut path_known = false;
    for r in ROUTES {
        if matches(r.path, path, &mut params) {
            if r.method == *method {
                return Ok((r.op, params));
            }
            path_known = true;
        }
    }
    if path_known {
        let allowed: Vec<&str> = ROUTES
            .iter()
            .filter(|r| matches(r.path, path, &mut params))
            .map(|r| r.method.as_str())
            .collect();
        return Err(ApiError::new(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed",
            format!(
                "{method} is not served on {path}; allowed: {}",
                allowed.join(", ")
            ),
        ));
    }
    Err(ApiError::not_found(format!("no such path {}{path}", super::API)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_resolve_with_parameters() {
        let (op, p) = resolve(&Method::POST, "/vms/abc/snapshots/def/restore").unwrap();
        assert_eq!(op, Op::VmSnapRestore);
        assert_eq!(p, ["abc", "def"]);
        assert_eq!(resolve(&Method::GET, "/").unwrap().0, Op::Api);
        assert_eq!(resolve(&Method::GET, "/vms/").unwrap().0, Op::VmList);
        assert_eq!(
            resolve(&Method::PATCH, "/vms").unwrap_err().status,
            http::StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            resolve(&Method::GET, "/nothing").unwrap_err().status,
            http::StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn every_route_is_unique() {
        let mut seen = std::collections::HashSet::new();
        for r in ROUTES {
            assert!(
                seen.insert((r.method.as_str(), r.path)),
                "{} {}",
                r.method,
                r.path
            );
        }
    }
}
