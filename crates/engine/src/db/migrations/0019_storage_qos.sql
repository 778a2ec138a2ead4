-- oVirt's storage QoS: limits per data center (MB/s and IOPS; NULL: unlimited), disk profiles
-- per storage domain pointing at one (or none), and each disk's profile. Removing a QoS leaves
-- its profiles unlimited; a profile is not removed while a disk uses it.
CREATE TABLE qoss (
    id TEXT PRIMARY KEY,
    data_center_id TEXT NOT NULL REFERENCES data_centers (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    max_throughput BIGINT,
    max_read_throughput BIGINT,
    max_write_throughput BIGINT,
    max_iops BIGINT,
    max_read_iops BIGINT,
    max_write_iops BIGINT,
    UNIQUE (data_center_id, name)
);

CREATE TABLE disk_profiles (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    storage_domain_id TEXT NOT NULL REFERENCES storage_domains (id) ON DELETE CASCADE,
    qos_id TEXT REFERENCES qoss (id) ON DELETE SET NULL,
    UNIQUE (storage_domain_id, name)
);

ALTER TABLE disks ADD COLUMN disk_profile_id TEXT REFERENCES disk_profiles (id);
