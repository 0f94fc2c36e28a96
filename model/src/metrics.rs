//! Evaluation metrics of the fine-tuning tasks, one file per task: retrieval recall@K now; VQA accuracy,
//! NLVR2 accuracy and grounding accuracy@IoU0.5 go beside it.

pub mod retrieval;
