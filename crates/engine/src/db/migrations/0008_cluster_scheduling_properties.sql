-- A cluster's own values for its scheduling policy's properties (oVirt's
-- `custom_scheduling_policy_properties`: HighVmCount, CpuOverCommitDurationMinutes…), as a JSON
-- object of name → value; properties it does not name keep the policy's defaults.
ALTER TABLE clusters ADD COLUMN scheduling_properties TEXT NOT NULL DEFAULT '{}';
