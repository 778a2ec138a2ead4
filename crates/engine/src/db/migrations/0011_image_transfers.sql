-- Image transfers: a disk uploaded or downloaded through a host's transfer listener
-- (ovirt-imageio's protocol). No foreign key to disks: a failed upload removes its disk, and
-- the transfer's record stays to say so.
CREATE TABLE image_transfers (
    id TEXT PRIMARY KEY,
    disk_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    direction TEXT NOT NULL,
    format TEXT NOT NULL,
    phase TEXT NOT NULL,
    transfer_url TEXT,
    inactivity_timeout BIGINT NOT NULL,
    transferred BIGINT NOT NULL DEFAULT 0,
    active BIGINT NOT NULL DEFAULT 0 CHECK (active IN (0, 1)),
    -- Why a transfer failed or was cancelled.
    message TEXT,
    saga_id TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX image_transfers_disk ON image_transfers (disk_id);
