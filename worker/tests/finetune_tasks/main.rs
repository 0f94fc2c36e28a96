//! The part-2 fine-tune tasks on the runner, one test binary (each links libtorch): learning on their
//! synthetic splits, exact resume, distributed evaluation.

#[path = "../task_common/mod.rs"]
mod task_common;

mod domain_pretrain;
mod grounding;
mod nlvr;
mod vqa;

/// Training draws from libtorch's process-global generator (dropout, fresh weights): the training
/// tests of this binary take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
