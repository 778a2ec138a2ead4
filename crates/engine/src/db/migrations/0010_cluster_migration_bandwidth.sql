-- A cluster's migration bandwidth limit in Mbps (oVirt's migration policy bandwidth with the
-- `custom` assignment method); NULL: no limit of ours (`auto`).
ALTER TABLE clusters ADD COLUMN migration_bandwidth_mbps BIGINT;
