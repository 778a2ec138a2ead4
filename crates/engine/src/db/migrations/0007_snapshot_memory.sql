-- The memory and device state a snapshot saved of its running VM (oVirt's memory volume), and
-- the VM's size then: previewing or restoring the snapshot with its memory makes the VM's next
-- start resume from this state, which fits only a VM of the same memory and CPUs.
CREATE TABLE snapshot_memory (
    snapshot_id TEXT PRIMARY KEY REFERENCES snapshots (id) ON DELETE CASCADE,
    storage_domain_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    volume_id TEXT NOT NULL,
    memory_bytes BIGINT NOT NULL,
    cpus BIGINT NOT NULL
);
CREATE INDEX snapshot_memory_image ON snapshot_memory (image_id);
