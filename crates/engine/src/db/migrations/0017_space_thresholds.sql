-- oVirt's per-domain space thresholds: free space below warning_low_space_indicator percent
-- raises a warning; below critical_space_action_blocker GiB an error, and what would consume
-- space on the domain is refused. oVirt's defaults: 10 % and 5 GiB.
ALTER TABLE storage_domains ADD COLUMN warning_low_space_indicator BIGINT NOT NULL DEFAULT 10;
ALTER TABLE storage_domains ADD COLUMN critical_space_action_blocker BIGINT NOT NULL DEFAULT 5;
