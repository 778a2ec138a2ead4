-- oVirt's tags: a tree of labels (parent_id NULL: under the root tag, which is not stored),
-- put on VMs, hosts and templates. Names are unique, as in oVirt. Removing a tag or what it
-- is on removes the assignment.
CREATE TABLE tags (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    parent_id TEXT REFERENCES tags (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL
);

CREATE TABLE tag_vms (
    tag_id TEXT NOT NULL REFERENCES tags (id) ON DELETE CASCADE,
    vm_id TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    PRIMARY KEY (tag_id, vm_id)
);
CREATE INDEX tag_vms_vm ON tag_vms (vm_id);

CREATE TABLE tag_hosts (
    tag_id TEXT NOT NULL REFERENCES tags (id) ON DELETE CASCADE,
    host_id TEXT NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    PRIMARY KEY (tag_id, host_id)
);
CREATE INDEX tag_hosts_host ON tag_hosts (host_id);

CREATE TABLE tag_templates (
    tag_id TEXT NOT NULL REFERENCES tags (id) ON DELETE CASCADE,
    template_id TEXT NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    PRIMARY KEY (tag_id, template_id)
);
CREATE INDEX tag_templates_template ON tag_templates (template_id);
