-- A template's NICs, copied from the VM it was made of: every VM made from the template gets
-- the same NICs (name, network, interface, link), each with a MAC of its own from its cluster's
-- pool, as in oVirt.
CREATE TABLE template_nics (
    id TEXT PRIMARY KEY,
    template_id TEXT NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    network TEXT,
    interface TEXT NOT NULL,
    linked BIGINT NOT NULL DEFAULT 1 CHECK (linked IN (0, 1)),
    UNIQUE (template_id, name)
);
