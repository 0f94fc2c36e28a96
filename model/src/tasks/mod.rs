//! Task models built on the X-VLM core: pre-training, NLVR2, grounding with boxes; the other fine-tuning tasks slot in beside.

pub mod grounding_bbox;
pub mod nlvr;
pub mod pretrain;

pub use grounding_bbox::{GroundingBboxModel, GroundingBboxOutput};
pub use nlvr::{NlvrModel, NlvrOutput};
pub use pretrain::{PretrainBatch, PretrainModel, PretrainOutput, RegionInputs};
