//! The Trainer: runs steps and evaluation given a Collective; knows nothing of gRPC.
