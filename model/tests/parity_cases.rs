//! Parity of every task forward with the official code, at each case's `case.yaml` tolerance: every loss
//! and intermediate in `expected.safetensors` is compared, with the weights read from the official
//! `model.th` and from `model.safetensors` (tied tensors stored twice there).

use xvlm_model::parity::{run_case, WeightsSource};

/// Runs `case` with weights from `source`; at least `min_rows` tensors must be compared, all passing.
fn check(case: &str, source: WeightsSource, min_rows: usize) {
    let dir = xvlm_model::fixtures_dir().join(case);
    let report = run_case(&dir, source).expect("the case runs");
    for row in &report.rows {
        println!("{row}");
    }
    assert!(
        report.rows.len() >= min_rows,
        "{case}: only {} tensors compared",
        report.rows.len()
    );
    assert!(report.passed(), "{case} failures: {:#?}", report.failures());
}

/// Pre-training, tiny Swin + BERT: general batch (ITC, ITM, MLM) and region batch (+ bbox).
#[test]
fn pretrain_swin_bert_from_model_th() {
    check("pretrain_swin_bert", WeightsSource::TorchSave, 44);
}

#[test]
fn pretrain_swin_bert_from_safetensors() {
    check("pretrain_swin_bert", WeightsSource::Safetensors, 44);
}

/// Pre-training, tiny CLIP-ViT (local attention on regions) + RoBERTa.
#[test]
fn pretrain_clipvit_roberta_from_model_th() {
    check("pretrain_clipvit_roberta", WeightsSource::TorchSave, 44);
}

#[test]
fn pretrain_clipvit_roberta_from_safetensors() {
    check("pretrain_clipvit_roberta", WeightsSource::Safetensors, 44);
}

/// Retrieval: ITC similarities, ITM re-ranking of the top-k, recall metrics, a training forward.
#[test]
fn retrieval_from_model_th() {
    check("retrieval", WeightsSource::TorchSave, 28);
}

/// VQA: answer ranking and the weighted-answer training loss.
#[test]
fn vqa_from_model_th() {
    check("vqa", WeightsSource::TorchSave, 12);
}

/// NLVR2: doubled fusion layers with shared cross-attention key/value.
#[test]
fn nlvr_from_model_th() {
    check("nlvr", WeightsSource::TorchSave, 6);
}

/// Grounding with boxes: predicted boxes, L1 + GIoU, IoU scoring.
#[test]
fn grounding_bbox_from_model_th() {
    check("grounding_bbox", WeightsSource::TorchSave, 10);
}

/// Retrieval fine-tuning: 4 steps of the official `Retrieval.train` loop through the shared fine-tune
/// step (ITC + ITM with `idx`, the fine-tune param groups, the schedule stepped per update, no clipping).
#[test]
fn retrieval_train_steps_from_model_th() {
    check("retrieval_train_steps", WeightsSource::TorchSave, 200);
}

/// VQA fine-tuning: 4 steps of `VQA.train` (answers + `[SEP]`, answer weights, `k` repeats, the summed
/// per-answer NLL over B; the decoder cross K/V in the lr_mult groups).
#[test]
fn vqa_train_steps_from_model_th() {
    check("vqa_train_steps", WeightsSource::TorchSave, 200);
}

/// NLVR2 fine-tuning: 4 steps of `NLVR.train` (two images, shared cross K/V, `cls_head` at lr_mult).
#[test]
fn nlvr_train_steps_from_model_th() {
    check("nlvr_train_steps", WeightsSource::TorchSave, 200);
}

/// Box grounding fine-tuning: 4 steps of `Grounding_bbox.train` (L1 + GIoU).
#[test]
fn grounding_bbox_train_steps_from_model_th() {
    check("grounding_bbox_train_steps", WeightsSource::TorchSave, 200);
}

/// Fine-tuning data: the official annotation layouts, datasets and collate functions end to end.
#[test]
fn finetune_data_case() {
    check("finetune_data", WeightsSource::Auto, 63);
}

/// RefCOCO+ weakly supervised evaluation: Grad-CAM of the ITM score over the cross-attention of text layer
/// `block_num`, bicubic upsampling to each image, detection scoring (alpha 0.5), accuracy@IoU0.5 per split.
#[test]
fn grounding_weak_eval_case() {
    check("grounding_weak_eval", WeightsSource::TorchSave, 27);
}
