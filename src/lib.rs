//! fn-image-resolver: pins Porch KRM function images to digests, fills their
//! entrypoints from the image config, and mirrors the registry pull secret.
//!
//! The binary is a thin shell over this library so that the CLI, the server and
//! the tests all run the same code.

pub mod admission;
pub mod app;
pub mod cache;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod health;
pub mod managed_tls;
pub mod metrics;
pub mod prewarm;
pub mod registration;
pub mod registry;
pub mod reload;
pub mod secrets;
pub mod server;
pub mod telemetry;
