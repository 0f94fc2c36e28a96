//! The xvlm wire contract (gRPC package `xvlm.v1`) and the small tch-free pieces shared by every binary:
//! the job spec (`job.yaml`) and the task-config key table it checks overrides against, logging,
//! child processes that die with their parent, object stores from URLs and the checkpoint commit
//! protocol.

pub mod backoff;
#[cfg(feature = "storage")]
pub mod checkpoint;
pub mod duplicate_keys;
pub mod logging;
pub mod process;
#[cfg(feature = "grpc")]
pub mod security;
pub mod spec;
#[cfg(feature = "storage")]
pub mod storage;
pub mod task_keys;

/// Wire protocol version announced on `Register` and `Submit`; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 2;

/// Exit code of a trainer that committed a checkpoint and left because its worker is draining
/// (`EX_TEMPFAIL`): the generation ends, but not by a failure that counts against `max_restarts`.
pub const EXIT_PREEMPTED: u8 = 75;

/// Generated gRPC types and services of package `xvlm.v1`.
#[cfg(feature = "grpc")]
pub mod v1 {
    tonic::include_proto!("xvlm.v1");
}
