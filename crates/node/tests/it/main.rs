//! The node's integration tests in one binary (`--test it`): VMs on real QEMU and host network
//! setup. One binary rather than one per file because each test binary compiles the node's
//! generic code again; nextest still runs every test in its own process.

mod common;
mod net_setup;
mod vm_cdrom;
mod vm_cpus;

mod vm_lifecycle;
mod vm_memory;
mod vm_thin;
