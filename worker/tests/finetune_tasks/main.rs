//! The part-2 fine-tune tasks on the runner, one test binary (each links libtorch): learning on their
//! synthetic splits, exact resume, distributed evaluation.

#[path = "../task_common/mod.rs"]
mod task_common;

mod nlvr;
mod vqa;
