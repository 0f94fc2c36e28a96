//! Evaluation metrics of the fine-tuning tasks, one file per task: retrieval recall@K and the RefCOCO+
//! grounding accuracy@IoU0.5 per split now; VQA and NLVR2 accuracy go beside them.

pub mod grounding;
pub mod retrieval;
pub mod vqa;
