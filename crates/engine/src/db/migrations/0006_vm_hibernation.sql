-- A suspended (hibernated) VM's saved state: the volume on shared storage holding its memory
-- and device state, from which its next start resumes it (oVirt's hibernation volume).
CREATE TABLE vm_hibernation (
    vm_id TEXT PRIMARY KEY REFERENCES vms (id) ON DELETE CASCADE,
    storage_domain_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    volume_id TEXT NOT NULL
);
