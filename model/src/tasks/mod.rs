//! Task models built on the X-VLM core: pre-training, retrieval, VQA, NLVR2, grounding with boxes, and the
//! weakly supervised grounding evaluation (Grad-CAM on the retrieval model); other tasks slot in beside.

pub mod bbox_pretrain;
pub mod grounding_bbox;
pub mod grounding_weak;
pub mod nlvr;
pub mod nlvr_pretrain;
pub mod pretrain;
pub mod retrieval;
pub mod vqa;

pub use grounding_bbox::{GroundingBboxModel, GroundingBboxOutput};
pub use nlvr::{NlvrModel, NlvrOutput};
pub use pretrain::{PretrainBatch, PretrainModel, PretrainOutput, RegionInputs};
pub use retrieval::{RetrievalModel, RetrievalTrainOutput};
pub use vqa::{AnswerRanking, VqaModel};
