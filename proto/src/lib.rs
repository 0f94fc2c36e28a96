//! The xvlm wire contract (gRPC package `xvlm.v1`) and the small tch-free pieces shared by every binary:
//! the job spec (`job.yaml`), logging, object stores from URLs and the checkpoint commit protocol.

#[cfg(feature = "storage")]
pub mod checkpoint;
pub mod logging;
pub mod spec;
#[cfg(feature = "storage")]
pub mod storage;

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
