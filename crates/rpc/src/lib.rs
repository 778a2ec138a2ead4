//! The wire of the node API.
//!
//! The node serves VDSM's verbs as JSON-RPC 2.0 over HTTPS with mutual TLS, the same verbs over
//! XML-RPC for third-party tools, a read-only REST view, and an event stream. This crate owns the
//! protocol codecs ([`jsonrpc`], [`xmlrpc`]), the HTTPS server loop with its limits
//! ([`server`]), and the client the engine (and tests) use ([`client`]). It knows no verbs:
//! method names and parameters are the node's and the engine's business.
//!
//! Architecture invariant: every request is bounded — body size, header and handshake time,
//! concurrent connections — before any handler sees it; a malformed request is answered with an
//! error and reaches no handler.

pub mod client;
pub mod jsonrpc;
pub mod server;
pub mod xmlrpc;

pub use client::{ClientError, RpcClient};
pub use jsonrpc::RpcError;
pub use server::{serve, Handler, HttpRequest, Limits, Reply};
