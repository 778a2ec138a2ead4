-- OVF stores: the volumes on each data domain that keep the OVFs of its VMs and templates
-- (oVirt's OVF_STORE disks), whether each exists on storage yet, and what was last written (a JSON map of
-- entity id to the SHA-256 of its OVF).
CREATE TABLE ovf_stores (
    disk_id TEXT PRIMARY KEY,
    storage_domain_id TEXT NOT NULL REFERENCES storage_domains (id) ON DELETE CASCADE,
    volume_id TEXT NOT NULL,
    ready BIGINT NOT NULL DEFAULT 0 CHECK (ready IN (0, 1)),
    updated_at BIGINT,
    entity_hashes TEXT
);
CREATE INDEX ovf_stores_sd ON ovf_stores (storage_domain_id);

-- VMs and templates an attached domain's OVF stores describe and the engine has no record of
-- (oVirt's unregistered_ovf_of_entities): offered for registration, and written back into the
-- domain's stores until registered or removed.
CREATE TABLE unregistered_ovfs (
    entity_id TEXT NOT NULL,
    storage_domain_id TEXT NOT NULL REFERENCES storage_domains (id) ON DELETE CASCADE,
    entity_type TEXT NOT NULL,
    name TEXT NOT NULL,
    ovf TEXT NOT NULL,
    vm_status BIGINT,
    PRIMARY KEY (entity_id, storage_domain_id)
);
