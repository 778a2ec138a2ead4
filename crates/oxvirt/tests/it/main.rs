//! The `oxvirt` crate's integration tests in one binary (`--test it`): each module is one area,
//! run against the real `oxvirt` binary, real nodes, QEMU and storage. One binary rather than one
//! per file because each test binary compiles and links the whole engine and node again; nextest
//! still runs every test in its own process, and `.config/nextest.toml` selects the QEMU tests by
//! module name (`vm_nodes::`, `ha::`, …).

mod balancing;
mod cdroms;
mod cli;
mod common;
mod domain_cli;
mod engine_backup;
mod engine_e2e;
mod engine_restart;
mod ha;
mod lease_cli;
mod live_storage;
mod networks;
mod networks_engine;
mod networks_rollback;
mod node_daemon;
mod ovf_stores;
mod pool_spm;
mod portal_browser;
mod rest_clients;
mod saga_faults;
mod sd_import;
mod spm_maintenance;
mod storage_errors;
mod storage_qos;
mod transfers;
mod up;
mod vm_nodes;
