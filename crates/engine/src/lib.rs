//! The engine: the only component with a database; drives nodes over their API.
//!
//! - [`db`]: the database handle ([`db::Db`]), migrations and every repository function;
//! - [`model`]: the typed rows (data centers … users) and their enums;
//! - [`saga`]: multi-step commands persisted step by step, resumed or unwound after a crash;
//! - [`time`]: timestamps and the injected clock;
//! - [`enroll`]: host enrollment (certificates for nodes);
//! - [`rest`]: the oVirt REST API v4 and SSO ([`rest::routes`] plugs into [`daemon::Engine::start`]).
//!
//! Architecture invariant: the engine never touches storage or QEMU directly; the database is
//! its only state.

pub mod allinone;
pub mod app;
pub mod backup;
pub mod balance;
pub mod commands;
pub mod daemon;
pub mod db;
pub mod enroll;
pub mod fence;
pub mod ha;
pub mod model;
pub mod monitor;
pub mod network;
pub mod nodes;
pub mod ovf;
pub mod portal;
pub mod rest;
pub mod saga;
pub mod scheduling;
pub mod time;

pub use db::{Db, DbError, Tx};
