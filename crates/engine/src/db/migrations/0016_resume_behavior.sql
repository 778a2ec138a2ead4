-- What the node does with a VM that storage errors stopped (oVirt's
-- storage_error_resume_behaviour): auto_resume, leave_paused or kill (always kill for HA VMs).
ALTER TABLE vms ADD COLUMN resume_behavior TEXT NOT NULL DEFAULT 'auto_resume';
