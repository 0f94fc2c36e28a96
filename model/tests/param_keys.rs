//! Checkpoint compatibility: the pre-training models built from the real base configs (Swin-B + BERT-base,
//! CLIP-ViT-B/16 + RoBERTa-base) have exactly the official state-dict keys, shapes and dtypes
//! (`param_keys_pretrain*.tsv`); only the computed buffers `relative_position_index`, `attn_mask` and
//! `position_ids` may be left out.

use xvlm_model::parity::param_keys;

fn check(only: &str, expected_files: usize) {
    let dir = xvlm_model::fixtures_dir().join("param_keys");
    let rows = param_keys::run_filtered(&dir, Some(only)).expect("the key sets are compared");
    for row in &rows {
        println!("{row}");
    }
    let summaries = rows
        .iter()
        .filter(|r| r.name.starts_with("param_keys_"))
        .count();
    assert_eq!(summaries, expected_files, "one summary per TSV");
    let failures: Vec<_> = rows.iter().filter(|r| !r.passed).collect();
    assert!(failures.is_empty(), "failures: {failures:#?}");
}

/// `param_keys_pretrain.tsv`: Swin-B/224 + BertForMaskedLM + all heads, 644 entries.
#[test]
fn pretrain_swin_bert_keys_match_official() {
    let dir = xvlm_model::fixtures_dir().join("param_keys");
    let official = param_keys::read_tsv(&dir.join("param_keys_pretrain.tsv")).unwrap();
    assert_eq!(official.len(), 644);
    let sd = param_keys::build_model("pretrain", &param_keys::configs_dir())
        .unwrap()
        .expect("the pre-training model is implemented");
    let ours = param_keys::model_keys(&sd);
    let rows = param_keys::compare_keys("param_keys_pretrain", &official, &ours);
    let failures: Vec<_> = rows.iter().filter(|r| !r.passed).collect();
    assert!(failures.is_empty(), "failures: {failures:#?}");
    // Every entry, the computed buffers included.
    assert_eq!(ours.len(), 644);
}

/// `param_keys_pretrain_clipvit_roberta.tsv`: CLIP-ViT-B/16 + RobertaForMaskedLM + all heads.
#[test]
fn pretrain_clipvit_roberta_keys_match_official() {
    check("pretrain_clipvit", 1);
}

/// The fine-tuning models (retrieval, grounding_bbox, NLVR2 with shared cross key/value, VQA with its
/// decoder) at Swin-B/384 + BERT-base also have exactly the official keys.
#[test]
fn finetune_model_keys_match_official() {
    for name in ["retrieval", "grounding_bbox", "nlvr", "vqa"] {
        check(name, 1);
    }
}
