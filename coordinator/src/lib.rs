//! The xvlm coordinator: job spec validation, the job state machine and its store, rank and generation
//! assignment, shard plans, and the gRPC services. It never links libtorch.

pub mod auth;
pub mod client;
pub mod commit;
pub mod config;
pub mod convert;
pub mod curves;
pub mod dashboard;
pub mod error;
pub mod http;
pub mod local;
pub mod logs;
pub mod planner;
pub mod ring_secret;
pub mod security;
pub mod server;
pub mod state;
pub mod status_text;
pub mod store;
pub mod tensorboard;
pub mod tls;
pub mod watch_view;

pub use config::CoordConfig;
pub use error::CoordError;
