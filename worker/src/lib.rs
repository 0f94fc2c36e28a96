//! The xvlm worker: node daemon, trainer process, collective backends (TCP ring, NCCL) and the
//! all-reduce benchmark.

pub mod bench;
pub mod checkpoint;
pub mod comm;
pub mod cpu_share;
pub mod daemon;
pub mod devices;
pub mod error;
pub mod metrics;
pub mod process;
pub mod progress_queue;
mod supervision;
pub mod trainer;
pub mod trainer_logs;

pub use error::WorkerError;
