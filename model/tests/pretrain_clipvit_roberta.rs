//! Parity of the pre-training forward (tiny CLIP-ViT + RoBERTa) with the official code: every loss and
//! intermediate of the general and the region batch, with the weights read from the official `model.th`
//! and from `model.safetensors`.

use xvlm_model::parity::{run_case, WeightsSource};

fn check(source: WeightsSource) {
    let dir = xvlm_model::fixtures_dir().join("pretrain_clipvit_roberta");
    let report = run_case(&dir, source).expect("the case runs");
    for row in &report.rows {
        println!("{row}");
    }
    assert!(report.rows.len() >= 44, "every expected tensor is compared");
    assert!(report.passed(), "failures: {:#?}", report.failures());
}

/// Weights from the official `torch.save` checkpoint.
#[test]
fn pretrain_clipvit_roberta_from_model_th() {
    check(WeightsSource::TorchSave);
}

/// Weights from the safetensors copy (tied tensors stored twice).
#[test]
fn pretrain_clipvit_roberta_from_safetensors() {
    check(WeightsSource::Safetensors);
}
