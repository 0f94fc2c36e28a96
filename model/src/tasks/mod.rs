//! Task models built on the X-VLM core: pre-training now, fine-tuning tasks beside it.

pub mod pretrain;

pub use pretrain::{PretrainBatch, PretrainModel, PretrainOutput, RegionInputs};
