//! The engine: the only component with a database; drives nodes over their API.
//!
//! Architecture invariant: the engine never touches storage or QEMU directly.

pub mod enroll;
