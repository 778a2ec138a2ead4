-- The engine's model, version 1.
--
-- Portable between SQLite and PostgreSQL: ids are canonical UUID text, times are BIGINT
-- milliseconds since the epoch (UTC), booleans are BIGINT 0/1, enums are their lowercase oVirt
-- names. `@SERIAL_PK@` is the only backend-specific token (an auto-increment primary key).
-- `revision` columns carry optimistic concurrency: every update checks and bumps them.

CREATE TABLE data_centers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    storage_pool_id TEXT NOT NULL UNIQUE,
    compat_major BIGINT NOT NULL,
    compat_minor BIGINT NOT NULL,
    is_local BIGINT NOT NULL DEFAULT 0 CHECK (is_local IN (0, 1)),
    status TEXT NOT NULL,
    master_version BIGINT NOT NULL DEFAULT 0,
    -- The SPM role is one row's compare-and-set, so two hosts can never both hold it here.
    spm_host_id TEXT,
    spm_status TEXT NOT NULL DEFAULT 'none',
    spm_lver BIGINT,
    created_at BIGINT NOT NULL,
    revision BIGINT NOT NULL DEFAULT 1
);

CREATE TABLE clusters (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    data_center_id TEXT NOT NULL REFERENCES data_centers (id),
    cpu_type TEXT NOT NULL,
    cpu_architecture TEXT NOT NULL,
    scheduling_policy TEXT NOT NULL,
    memory_overcommit_percent BIGINT NOT NULL CHECK (memory_overcommit_percent > 0),
    compat_major BIGINT NOT NULL,
    compat_minor BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    revision BIGINT NOT NULL DEFAULT 1
);
CREATE INDEX clusters_data_center ON clusters (data_center_id);

CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    address TEXT NOT NULL,
    port BIGINT NOT NULL CHECK (port > 0 AND port < 65536),
    cluster_id TEXT NOT NULL REFERENCES clusters (id),
    status TEXT NOT NULL,
    status_detail TEXT,
    spm_priority BIGINT NOT NULL CHECK (spm_priority >= -1 AND spm_priority <= 10),
    certificate_fingerprint TEXT,
    cpu_cores BIGINT,
    memory_bytes BIGINT,
    free_memory_bytes BIGINT,
    last_seen_at BIGINT,
    created_at BIGINT NOT NULL,
    revision BIGINT NOT NULL DEFAULT 1,
    UNIQUE (address, port)
);
CREATE INDEX hosts_cluster ON hosts (cluster_id);

-- A host's id in the lockspaces of a data center's domains (sanlock host id, VDSM limits it to
-- 250). Allocated once per (data center, host) and kept, so a host always uses the same slot.
CREATE TABLE host_spm_ids (
    data_center_id TEXT NOT NULL REFERENCES data_centers (id) ON DELETE CASCADE,
    host_id TEXT NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    spm_id BIGINT NOT NULL CHECK (spm_id >= 1 AND spm_id <= 250),
    PRIMARY KEY (data_center_id, host_id),
    UNIQUE (data_center_id, spm_id)
);

CREATE TABLE storage_domains (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    domain_type TEXT NOT NULL,
    storage_type TEXT NOT NULL,
    address TEXT,
    path TEXT NOT NULL,
    mount_options TEXT,
    vfs_type TEXT,
    format_version BIGINT NOT NULL,
    capacity_bytes BIGINT,
    free_bytes BIGINT,
    created_at BIGINT NOT NULL,
    revision BIGINT NOT NULL DEFAULT 1
);

-- Which domains a data center's storage pool holds, with each domain's status there. A domain
-- with no row here is unattached.
CREATE TABLE storage_pool_members (
    data_center_id TEXT NOT NULL REFERENCES data_centers (id),
    storage_domain_id TEXT NOT NULL REFERENCES storage_domains (id),
    status TEXT NOT NULL,
    is_master BIGINT NOT NULL DEFAULT 0 CHECK (is_master IN (0, 1)),
    PRIMARY KEY (data_center_id, storage_domain_id)
);
CREATE INDEX storage_pool_members_domain ON storage_pool_members (storage_domain_id);
CREATE UNIQUE INDEX storage_pool_one_master ON storage_pool_members (data_center_id) WHERE is_master = 1;

CREATE TABLE templates (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    cluster_id TEXT REFERENCES clusters (id),
    memory_bytes BIGINT NOT NULL CHECK (memory_bytes > 0),
    cpu_sockets BIGINT NOT NULL CHECK (cpu_sockets > 0),
    cpu_cores BIGINT NOT NULL CHECK (cpu_cores > 0),
    cpu_threads BIGINT NOT NULL CHECK (cpu_threads > 0),
    status TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revision BIGINT NOT NULL DEFAULT 1
);

-- The built-in Blank template: always present, never removed.
INSERT INTO templates (id, name, description, cluster_id, memory_bytes, cpu_sockets, cpu_cores, cpu_threads, status, created_at)
VALUES ('00000000-0000-0000-0000-000000000000', 'Blank', 'Blank template', NULL, 1073741824, 1, 1, 1, 'ok', 0);

-- A disk is an image (its id is the image id) on one storage domain.
CREATE TABLE disks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    format TEXT NOT NULL,
    sparse BIGINT NOT NULL CHECK (sparse IN (0, 1)),
    provisioned_size BIGINT NOT NULL CHECK (provisioned_size > 0),
    actual_size BIGINT NOT NULL DEFAULT 0,
    storage_domain_id TEXT NOT NULL REFERENCES storage_domains (id),
    status TEXT NOT NULL,
    -- The saga (or other owner) holding the disk `locked`: relocking by the same owner is a
    -- no-op and only the owner unlocks, so retried and undone lock steps stay correct.
    locked_by TEXT,
    shareable BIGINT NOT NULL DEFAULT 0 CHECK (shareable IN (0, 1)),
    wipe_after_delete BIGINT NOT NULL DEFAULT 0 CHECK (wipe_after_delete IN (0, 1)),
    created_at BIGINT NOT NULL,
    revision BIGINT NOT NULL DEFAULT 1
);
CREATE INDEX disks_storage_domain ON disks (storage_domain_id);
CREATE INDEX disks_name ON disks (name);

-- The volumes of an image's chain. A thin clone's base volume has the template's volume as
-- parent (VDSM links it into the image's directory), so a parent may belong to another disk.
CREATE TABLE volumes (
    id TEXT PRIMARY KEY,
    disk_id TEXT NOT NULL REFERENCES disks (id) ON DELETE CASCADE,
    storage_domain_id TEXT NOT NULL REFERENCES storage_domains (id),
    parent_id TEXT REFERENCES volumes (id),
    voltype TEXT NOT NULL,
    format TEXT NOT NULL,
    actual_size BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE INDEX volumes_disk ON volumes (disk_id);
CREATE INDEX volumes_parent ON volumes (parent_id);

CREATE TABLE template_disks (
    template_id TEXT NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    disk_id TEXT NOT NULL REFERENCES disks (id),
    PRIMARY KEY (template_id, disk_id)
);
CREATE INDEX template_disks_disk ON template_disks (disk_id);

CREATE TABLE vms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    cluster_id TEXT NOT NULL REFERENCES clusters (id),
    template_id TEXT NOT NULL REFERENCES templates (id),
    memory_bytes BIGINT NOT NULL CHECK (memory_bytes > 0),
    memory_guaranteed_bytes BIGINT NOT NULL CHECK (memory_guaranteed_bytes >= 0),
    cpu_sockets BIGINT NOT NULL CHECK (cpu_sockets > 0),
    cpu_cores BIGINT NOT NULL CHECK (cpu_cores > 0),
    cpu_threads BIGINT NOT NULL CHECK (cpu_threads > 0),
    status TEXT NOT NULL,
    status_detail TEXT,
    run_on_host TEXT REFERENCES hosts (id),
    migrating_to_host TEXT REFERENCES hosts (id),
    ha_enabled BIGINT NOT NULL DEFAULT 0 CHECK (ha_enabled IN (0, 1)),
    ha_priority BIGINT NOT NULL DEFAULT 0,
    lease_storage_domain_id TEXT REFERENCES storage_domains (id),
    placement_affinity TEXT NOT NULL,
    placement_hosts TEXT NOT NULL DEFAULT '[]',
    created_at BIGINT NOT NULL,
    revision BIGINT NOT NULL DEFAULT 1
);
CREATE INDEX vms_cluster ON vms (cluster_id);
CREATE INDEX vms_run_on_host ON vms (run_on_host);
CREATE INDEX vms_template ON vms (template_id);
CREATE INDEX vms_status ON vms (status);

CREATE TABLE disk_attachments (
    vm_id TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    disk_id TEXT NOT NULL REFERENCES disks (id) ON DELETE CASCADE,
    interface TEXT NOT NULL,
    bootable BIGINT NOT NULL DEFAULT 0 CHECK (bootable IN (0, 1)),
    active BIGINT NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    read_only BIGINT NOT NULL DEFAULT 0 CHECK (read_only IN (0, 1)),
    PRIMARY KEY (vm_id, disk_id)
);
CREATE INDEX disk_attachments_disk ON disk_attachments (disk_id);

CREATE TABLE nics (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    network TEXT,
    mac TEXT NOT NULL UNIQUE,
    interface TEXT NOT NULL,
    plugged BIGINT NOT NULL DEFAULT 1 CHECK (plugged IN (0, 1)),
    linked BIGINT NOT NULL DEFAULT 1 CHECK (linked IN (0, 1)),
    UNIQUE (vm_id, name)
);

CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    description TEXT NOT NULL DEFAULT '',
    snapshot_type TEXT NOT NULL,
    status TEXT NOT NULL,
    persist_memory BIGINT NOT NULL DEFAULT 0 CHECK (persist_memory IN (0, 1)),
    vm_configuration TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX snapshots_vm ON snapshots (vm_id);
-- Every VM has exactly one "Active VM" snapshot: the volumes it runs on now.
CREATE UNIQUE INDEX snapshots_one_active ON snapshots (vm_id) WHERE snapshot_type = 'active';

-- Which volume each disk had when the snapshot was taken.
CREATE TABLE snapshot_disks (
    snapshot_id TEXT NOT NULL REFERENCES snapshots (id) ON DELETE CASCADE,
    disk_id TEXT NOT NULL REFERENCES disks (id) ON DELETE CASCADE,
    volume_id TEXT NOT NULL REFERENCES volumes (id),
    PRIMARY KEY (snapshot_id, disk_id)
);
CREATE INDEX snapshot_disks_volume ON snapshot_disks (volume_id);
CREATE INDEX snapshot_disks_disk ON snapshot_disks (disk_id);

CREATE TABLE affinity_groups (
    id TEXT PRIMARY KEY,
    cluster_id TEXT NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    positive BIGINT NOT NULL CHECK (positive IN (0, 1)),
    enforcing BIGINT NOT NULL CHECK (enforcing IN (0, 1)),
    created_at BIGINT NOT NULL,
    UNIQUE (cluster_id, name)
);

CREATE TABLE affinity_group_vms (
    group_id TEXT NOT NULL REFERENCES affinity_groups (id) ON DELETE CASCADE,
    vm_id TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, vm_id)
);
CREATE INDEX affinity_group_vms_vm ON affinity_group_vms (vm_id);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    status TEXT NOT NULL,
    correlation_id TEXT,
    saga_id TEXT,
    auto_cleared BIGINT NOT NULL DEFAULT 1 CHECK (auto_cleared IN (0, 1)),
    started_at BIGINT NOT NULL,
    ended_at BIGINT,
    last_updated BIGINT NOT NULL
);
CREATE INDEX jobs_correlation ON jobs (correlation_id);
CREATE INDEX jobs_status ON jobs (status);

CREATE TABLE job_steps (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    parent_id TEXT REFERENCES job_steps (id) ON DELETE CASCADE,
    number BIGINT NOT NULL,
    step_type TEXT NOT NULL,
    description TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    ended_at BIGINT
);
CREATE INDEX job_steps_job ON job_steps (job_id);

-- The audit log. References are plain ids, not foreign keys: an event outlives its objects.
CREATE TABLE events (
    id @SERIAL_PK@,
    severity TEXT NOT NULL,
    code BIGINT NOT NULL,
    description TEXT NOT NULL,
    correlation_id TEXT,
    vm_id TEXT,
    host_id TEXT,
    storage_domain_id TEXT,
    data_center_id TEXT,
    cluster_id TEXT,
    template_id TEXT,
    time BIGINT NOT NULL
);
CREATE INDEX events_correlation ON events (correlation_id);
CREATE INDEX events_vm ON events (vm_id);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    domain TEXT NOT NULL,
    password_hash TEXT,
    email TEXT,
    is_admin BIGINT NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
    created_at BIGINT NOT NULL,
    UNIQUE (name, domain)
);

-- Bearer tokens are stored only as their SHA-256: a leaked database yields no usable token.
CREATE TABLE sso_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX sso_tokens_expiry ON sso_tokens (expires_at);

CREATE TABLE sagas (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    params TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    undo_error TEXT,
    job_id TEXT,
    correlation_id TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX sagas_state ON sagas (state);

CREATE TABLE saga_steps (
    saga_id TEXT NOT NULL REFERENCES sagas (id) ON DELETE CASCADE,
    step_index BIGINT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    output TEXT,
    error TEXT,
    job_step_id TEXT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (saga_id, step_index)
);
