//! The engine's integration tests in one binary (`--test it`): the database on SQLite and
//! PostgreSQL, sagas, and the REST API over a real HTTPS listener. One binary rather than one per
//! file because each test binary compiles the whole engine's generic code again; nextest still
//! runs every test in its own process.

#[macro_use]
mod common;
mod db;
mod networks_db;
mod rest;
mod rest_common;
mod rest_networks;
mod rest_scheduling;
mod saga;
