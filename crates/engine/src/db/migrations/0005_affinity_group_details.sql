-- Affinity groups as the REST API shows them (oVirt 4.4's AffinityGroup): a description, and
-- whether the group's VM rule is enabled (`vms_rule.enabled`; a disabled rule keeps the group
-- and its members but neither filters nor weighs hosts).
ALTER TABLE affinity_groups ADD COLUMN description TEXT NOT NULL DEFAULT '';
ALTER TABLE affinity_groups ADD COLUMN vms_rule_enabled BIGINT NOT NULL DEFAULT 1 CHECK (vms_rule_enabled IN (0, 1));
