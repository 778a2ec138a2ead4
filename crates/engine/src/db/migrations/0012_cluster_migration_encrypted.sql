-- Whether live migrations of a cluster's VMs are encrypted (TLS between the nodes, with their
-- certificates; oVirt's cluster `migration.encrypted`). Off by default, as in oVirt.
ALTER TABLE clusters ADD COLUMN migration_encrypted BIGINT NOT NULL DEFAULT 0 CHECK (migration_encrypted IN (0, 1));
