//! QEMU as oxvirt drives it.
//!
//! This crate owns everything that knows QEMU's interfaces: finding the binaries and their
//! versions, probing the accelerator, turning a VM description into a QEMU command line, and
//! (as later modules) the `qemu-img` wrapper and the QMP client.
//!
//! Architecture invariant: this crate keeps no state. It translates between oxvirt's types and
//! QEMU's command lines and protocols; who runs what, and when, is decided by `storage` and `node`.

pub mod accel;
pub mod cmdline;
pub mod img;
pub mod nbd;
pub mod qga;
pub mod qmp;
pub mod tools;

pub use accel::{probe_kvm, Accel, KvmProbe};
pub use cmdline::{
    BlockProtocol, Boot, BootDevice, CdromBus, CdromSpec, CpuDevice, Dimm, DiskBus, DiskSpec, ImageFormat,
    LayerSpec, NicBackend, NicSpec, VmSpec, WriteErrorPolicy, SATA_PORTS, SCSI_CONTROLLER,
};
pub use tools::{QemuTool, ToolError, ToolVersion};
