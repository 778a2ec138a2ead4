-- Power management (issue 10): a host's fence agent, as JSON {"command": [program, args...]};
-- the engine appends the action (on, off, status) and also writes `action=<action>` on its
-- standard input, as oVirt's fence agents expect. NULL: the host has none.
ALTER TABLE hosts ADD COLUMN fence_agent TEXT;
