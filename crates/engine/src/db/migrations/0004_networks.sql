-- Networks (issue 11): logical networks of data centers, their attachment to clusters, host
-- network attachments, what hosts report, and each cluster's MAC address pool.
--
-- A VM NIC names its network (`nics.network`) within its VM's data center; a network's vNIC
-- profile has the network's id, so it needs no table.

CREATE TABLE networks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    data_center_id TEXT NOT NULL REFERENCES data_centers (id) ON DELETE CASCADE,
    -- NULL: the default (1500).
    mtu BIGINT CHECK (mtu IS NULL OR (mtu >= 68 AND mtu <= 65535)),
    vlan_id BIGINT CHECK (vlan_id IS NULL OR (vlan_id >= 0 AND vlan_id <= 4094)),
    vm_network BIGINT NOT NULL DEFAULT 1 CHECK (vm_network IN (0, 1)),
    created_at BIGINT NOT NULL,
    revision BIGINT NOT NULL DEFAULT 1,
    UNIQUE (data_center_id, name)
);
CREATE INDEX networks_data_center ON networks (data_center_id);

CREATE TABLE cluster_networks (
    cluster_id TEXT NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    network_id TEXT NOT NULL REFERENCES networks (id) ON DELETE CASCADE,
    required BIGINT NOT NULL DEFAULT 1 CHECK (required IN (0, 1)),
    management BIGINT NOT NULL DEFAULT 0 CHECK (management IN (0, 1)),
    PRIMARY KEY (cluster_id, network_id)
);
CREATE INDEX cluster_networks_network ON cluster_networks (network_id);
CREATE UNIQUE INDEX cluster_networks_one_management ON cluster_networks (cluster_id) WHERE management = 1;

-- What the engine configured on a host (applied through Host.setupNetworks and confirmed).
CREATE TABLE host_network_attachments (
    id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    network_id TEXT NOT NULL REFERENCES networks (id),
    nic TEXT NOT NULL,
    boot_protocol TEXT NOT NULL,
    address TEXT,
    prefix BIGINT,
    gateway TEXT,
    default_route BIGINT NOT NULL DEFAULT 0 CHECK (default_route IN (0, 1)),
    UNIQUE (host_id, network_id)
);
CREATE INDEX host_network_attachments_network ON host_network_attachments (network_id);

-- The networks each host last reported present (monitoring): the scheduler's network filter
-- reads them without calling nodes.
CREATE TABLE host_reported_networks (
    host_id TEXT NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    PRIMARY KEY (host_id, name)
);

-- A cluster's MAC address pool: its ranges and where the next search starts. The addresses
-- in use are the MACs of the NICs (unique), so an allocation is exactly a NIC row and a
-- removed NIC's address is free again.
CREATE TABLE cluster_mac_pools (
    cluster_id TEXT PRIMARY KEY REFERENCES clusters (id) ON DELETE CASCADE,
    ranges TEXT NOT NULL,
    cursor TEXT
);
