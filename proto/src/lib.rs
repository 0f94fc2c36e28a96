//! The xvlm wire contract (gRPC package `xvlm.v1`) and the small tch-free pieces shared by every binary:
//! the job spec (`job.yaml`) and logging.

pub mod logging;
pub mod spec;
#[cfg(feature = "storage")]
pub mod storage;

/// Wire protocol version announced on `Register` and `Submit`; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// Generated gRPC types and services of package `xvlm.v1`.
#[cfg(feature = "grpc")]
pub mod v1 {
    tonic::include_proto!("xvlm.v1");
}
