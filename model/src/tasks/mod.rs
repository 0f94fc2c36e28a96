//! Task models built on the X-VLM core: pre-training, NLVR2; the other fine-tuning tasks slot in beside.

pub mod nlvr;
pub mod pretrain;

pub use nlvr::{NlvrModel, NlvrOutput};
pub use pretrain::{PretrainBatch, PretrainModel, PretrainOutput, RegionInputs};
