//! The xvlm wire contract (gRPC package `xvlm.v1`) and the small tch-free pieces shared by every binary.

pub mod logging;

/// Generated gRPC types and services of package `xvlm.v1`.
#[cfg(feature = "grpc")]
pub mod v1 {
    tonic::include_proto!("xvlm.v1");
}
